"""spiced/http/app.py, routes.py, sql.py, observe.py: the HTTP API through a real Hypercorn on port 0
(in-process, plain HTTP), queried with httpx and curl; large results against the real `spiced`
process, where the server's memory can be watched on its own.

    with api_server(loop, make_state(workdir)) as api:   # tests/http_rig.py
        httpx.post(api.url + "/v1/sql", content="SELECT 1")
"""

from __future__ import annotations

import csv
import io
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pyarrow.csv as pacsv
import pytest
from pyarrow import ipc

from spiced.http.app import NOT_SERVED_ROUTE, create_app, create_metrics_app
from spiced.http.openapi import OPENAPI
from spiced.state import Endpoint
from tests.http_rig import ApiServer, api_server, curl, make_state, sample_value, samples
from tests.support import TRIPS_TABLE, run_spiced, write_pod
from tests.tlsprobe import LoopThread, wait_for

POD = """\
version: v1
kind: Spicepod
name: api-test
datasets:
  - from: file:trips.csv
    name: trips
    acceleration:
      enabled: true
  - from: file:cities.csv
    name: cities
"""
CITIES_CSV = "city,state\nSeattle,WA\nPortland,OR\n"
TWO_MIB = 2 * 1024 * 1024


# ------------------------------------------------------------------ in-process server


@pytest.fixture(scope="module")
def api(loop: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    workdir = write_pod(tmp_path_factory.mktemp("api"), POD)
    (workdir / "cities.csv").write_text(CITIES_CSV)
    state = make_state(workdir)
    state.endpoints["flight"] = Endpoint("flight", "127.0.0.1:50999", "Ready")
    with api_server(loop, state) as server:
        yield server


@pytest.fixture(scope="module")
def http(api: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=30) as client:
        yield client


# ------------------------------------------------------------------ health, readiness, routing


def test_health_is_ok_newline_text(http: httpx.Client) -> None:
    r = http.get("/health")
    assert (r.status_code, r.content, r.headers["content-type"]) == (200, b"ok\n", "text/plain; charset=utf-8")


def test_ready_once_datasets_loaded(http: httpx.Client) -> None:
    r = http.get("/v1/ready")
    assert (r.status_code, r.text) == (200, "ready")


def test_not_ready_and_dataset_error_while_a_dataset_failed(loop: LoopThread, tmp_path: Path) -> None:
    pod = POD + "  - from: file:broken.parquet\n    name: broken\n    acceleration:\n      enabled: true\n"
    workdir = write_pod(tmp_path, pod)
    (workdir / "cities.csv").write_text(CITIES_CSV)
    (workdir / "broken.parquet").write_bytes(b"this is not parquet")
    with api_server(loop, make_state(workdir)) as server:
        r = httpx.get(server.url + "/v1/ready")
        assert (r.status_code, r.text) == (503, "not ready")
        items = {d["name"]: d for d in httpx.get(server.url + "/v1/datasets?status=true").json()}
    assert items["broken"]["status"] == "Error" and items["broken"]["error"]
    assert items["trips"]["status"] == "Ready" and "error" not in items["trips"]


def test_unknown_path_is_404_with_empty_body(http: httpx.Client) -> None:
    for path in ("/nope", "/health/", "/v1/sql/extra"):
        r = http.get(path)
        assert (r.status_code, r.content) == (404, b""), path


def test_wrong_method_is_405_with_allow(http: httpx.Client) -> None:
    r = http.get("/v1/sql")
    assert (r.status_code, r.content, r.headers["allow"]) == (405, b"", "POST")
    r = http.post("/v1/datasets")
    assert r.status_code == 405 and r.content == b"" and "GET" in r.headers["allow"]


# ------------------------------------------------------------------ /v1/sql


def test_select_one_with_curl(api: ApiServer) -> None:
    out = curl("-i", api.url + "/v1/sql", "-d", "SELECT 1")
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-type: application/json\r\n" in head.lower() + b"\r\n"
    assert body == b'[{"Int64(1)":1}]'


def test_json_rows_nulls_omitted_and_empty_result(http: httpx.Client) -> None:
    r = http.post("/v1/sql",
                  content="SELECT id, city, CASE WHEN id = 2 THEN NULL ELSE fare END AS fare FROM trips ORDER BY id")
    assert r.json() == [{"id": 1, "city": "Seattle", "fare": 12.5}, {"id": 2, "city": "Portland"},
                        {"id": 3, "city": "Seattle", "fare": 30.0}]
    r = http.post("/v1/sql", content="SELECT * FROM trips WHERE id > 100")
    assert (r.status_code, r.content) == (200, b"[]")


def test_csv_text_and_arrow_stream_parse_back(http: httpx.Client) -> None:
    sql = "SELECT * FROM trips ORDER BY id"
    expected = http.post("/v1/sql", content=sql).json()

    r = http.post("/v1/sql", content=sql, headers={"Accept": "text/csv"})
    assert r.headers["content-type"] == "text/csv"
    table = pacsv.read_csv(io.BytesIO(r.content))
    assert table.to_pylist() == expected

    r = http.post("/v1/sql", content=sql, headers={"Accept": "application/vnd.apache.arrow.stream"})
    assert r.headers["content-type"] == "application/vnd.apache.arrow.stream"
    assert ipc.open_stream(r.content).read_all().to_pylist() == expected

    r = http.post("/v1/sql", content=sql, headers={"Accept": "text/plain"})
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.text == TRIPS_TABLE


def test_csv_with_no_rows_is_header_only_and_arrow_stream_keeps_the_schema(http: httpx.Client) -> None:
    sql = "SELECT id, city FROM trips WHERE id > 100"
    r = http.post("/v1/sql", content=sql, headers={"Accept": "text/csv"})
    assert r.status_code == 200 and r.text in ("", "id,city\n")
    r = http.post("/v1/sql", content=sql, headers={"Accept": "application/vnd.apache.arrow.stream"})
    table = ipc.open_stream(r.content).read_all()
    assert table.num_rows == 0 and table.schema.names == ["id", "city"]


@pytest.mark.parametrize(("accept", "expected"), [
    ("text/csv;q=0.5, text/plain", "text/plain; charset=utf-8"),
    ("text/plain; charset=utf-8, text/csv;q=0.1", "text/csv"),  # a parameter breaks the match
    ("*/*", "application/json"),
    ("application/xml", "application/json"),
    ("text/csv;q=0", "application/json"),
])
def test_accept_negotiation(http: httpx.Client, accept: str, expected: str) -> None:
    r = http.post("/v1/sql", content="SELECT 1", headers={"Accept": accept})
    assert (r.status_code, r.headers["content-type"]) == (200, expected)


@pytest.mark.parametrize(("sql", "message"), [
    ("SELECT * FROM foo", "Failed to execute query: Error during planning: table 'spice.public.foo' not found"),
    ("", "Failed to execute query: Error during planning: No SQL statements were provided in the query string"),
    ("SELEC 1", 'Failed to execute query: SQL error: ParserError("Expected: an SQL statement, '
                'found: SELEC at Line: 1, Column: 1")'),
    ("CREATE TABLE x (a INT)", "Failed to execute query: Error during planning: DDL not supported: CreateMemoryTable"),
    ("DROP TABLE trips", "Failed to execute query: Error during planning: DDL not supported: DropTable"),
    ("INSERT INTO trips VALUES (4, 'Boise', 1.0)",
     "Failed to execute query: Error during planning: DML not supported: Insert Into"),
    ("SET datafusion.execution.batch_size = 1",
     "Failed to execute query: Error during planning: Statement not supported: SetVariable"),
    ("SELECT 1; SELECT 2", "Failed to execute query: This feature is not implemented: "
                           "The context currently only supports a single SQL statement"),
    ("SELECT 1/0", "Failed to execute query: Arrow error: Divide by zero error"),
])
def test_refused_and_failing_queries_are_400_with_the_engine_text(http: httpx.Client, sql: str, message: str) -> None:
    r = http.post("/v1/sql", content=sql)
    assert (r.status_code, r.headers["content-type"], r.text) == (400, "text/plain; charset=utf-8", message)


def test_invalid_utf8_is_400_with_the_decode_error(http: httpx.Client) -> None:
    r = http.post("/v1/sql", content=b"SELECT '\xff'")
    assert r.status_code == 400
    assert r.text.startswith("Request body didn't contain valid UTF-8: ") and "0xff" in r.text


def test_body_limit_two_mib(api: ApiServer, http: httpx.Client, tmp_path: Path) -> None:
    fits = ("SELECT 1 --" + "x" * TWO_MIB)[:TWO_MIB].encode()
    assert http.post("/v1/sql", content=fits).json() == [{"Int64(1)": 1}]

    big = tmp_path / "big.sql"
    big.write_bytes(fits + b"x")
    out = curl("-o", "/dev/null", "-w", "%{http_code}", "--data-binary", f"@{big}", api.url + "/v1/sql")
    assert out.stdout == b"413"  # refused from Content-Length
    r = http.post("/v1/sql", content=fits + b"x")  # the same from httpx, which sends the whole body first
    assert (r.status_code, r.text) == (413, "Failed to buffer the request body: length limit exceeded")

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(4):
            yield b"-" * (TWO_MIB // 2)

    r = http.post("/v1/sql", content=chunked())
    assert (r.status_code, r.text) == (413, "Failed to buffer the request body: length limit exceeded")
    assert http.get("/health").status_code == 200


def test_a_huge_declared_body_is_refused_before_it_is_read(api: ApiServer) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as raw:
        raw.sendall(b"POST /v1/sql HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\nSELECT")
        answer = raw.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 ")


def _responses(raw: socket.socket, count: int) -> list[h11.Response]:
    """Up to `count` responses read off one keep-alive connection, fewer if the server closes it."""
    conn, found = h11.Connection(h11.CLIENT), []
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))  # h11 tracks one cycle per request
    conn.send(h11.EndOfMessage())
    while len(found) < count:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(raw.recv(65536))
        elif isinstance(event, h11.Response):
            found.append(event)
        elif isinstance(event, h11.EndOfMessage):
            if len(found) == count:
                break
            conn.start_next_cycle()
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
        elif isinstance(event, h11.ConnectionClosed):
            break
    return found


def test_a_body_the_route_does_not_read_keeps_the_connection_usable(api: ApiServer) -> None:
    # The body arrives after the route has its answer ready (a GET sent with a body): the answer
    # waits for it, so the connection stays reusable, instead of being closed unannounced.
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as raw:
        raw.sendall(b"GET /v1/datasets HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        time.sleep(0.3)
        raw.sendall(b"hello" + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first, second = _responses(raw, 2)
    assert (first.status_code, second.status_code) == (200, 200)
    assert (b"connection", b"close") not in first.headers


@pytest.mark.parametrize("declared, sent", [(b"Content-Length: 5", b""), (b"Content-Length: 1000000", b"x" * 1000),
                                            (b"Transfer-Encoding: chunked", b"5\r\nhello\r\n")])
def test_a_body_that_cannot_be_drained_is_announced_with_connection_close(api: ApiServer, declared: bytes,
                                                                          sent: bytes) -> None:
    # Withheld, too big to drain, or of unknown length: the answer says the connection ends.
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as raw:
        raw.sendall(b"GET /v1/datasets HTTP/1.1\r\nHost: x\r\n" + declared + b"\r\n\r\n" + sent)
        start = time.monotonic()
        [response] = _responses(raw, 1)
    assert response.status_code == 200
    assert (b"connection", b"close") in response.headers
    assert time.monotonic() - start < 3


def test_error_after_the_first_batch_cuts_the_stream(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    # Rows of the first batch are fine; a later batch divides by zero.
    sql = "SELECT value, 1 / (CASE WHEN value > 50000 THEN 0 ELSE 1 END) AS x FROM generate_series(1, 200000)"
    with caplog.at_level(logging.WARNING, logger="runtime.query"), http.stream("POST", "/v1/sql", content=sql) as r:
        assert r.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            r.read()
    failed = [m for m in caplog.messages if m.startswith("Query failed ")]
    assert len(failed) == 1 and "protocol=http err_code=InternalError" in failed[0]
    assert failed[0].endswith(' error="Arrow error: Divide by zero error"')
    assert http.get("/health").status_code == 200


def test_the_same_failure_with_curl_is_a_transfer_error(api: ApiServer) -> None:
    sql = "SELECT value, 1 / (CASE WHEN value > 50000 THEN 0 ELSE 1 END) AS x FROM generate_series(1, 200000)"
    out = curl("-o", "/dev/null", "-w", "%{http_code}", api.url + "/v1/sql", "-d", sql)
    assert out.stdout == b"200" and out.returncode == 18  # partial file: the body never completed


def test_client_going_away_mid_stream_ends_the_query(api: ApiServer, http: httpx.Client) -> None:
    def active() -> float:
        return sample_value(api.state.metrics.exposition().body.decode(), "query_active_count", protocol="http")

    with httpx.Client(timeout=30) as other, other.stream(
            "POST", api.url + "/v1/sql", content="SELECT * FROM generate_series(1, 50000000)") as r:
        assert r.status_code == 200
        next(r.iter_raw())
        assert active() == 1
    wait_for(lambda: active() == 0, timeout=10)  # long before 50M rows could have been encoded
    assert http.post("/v1/sql", content="SELECT 1").status_code == 200


def test_query_timeout_is_504_before_the_first_batch_and_cuts_a_stream_after(loop: LoopThread, tmp_path: Path) -> None:
    pod = POD.replace("datasets:", "runtime:\n  query:\n    timeout: 250ms\ndatasets:")
    workdir = write_pod(tmp_path, pod)
    (workdir / "cities.csv").write_text(CITIES_CSV)
    with api_server(loop, make_state(workdir)) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/sql", content="SELECT count(*) FROM generate_series(1, 300000000)")
        assert (r.status_code, r.text) == (504, "Failed to execute query: Query timed out after 0.25s")
        with c.stream("POST", "/v1/sql", content="SELECT * FROM generate_series(1, 1000000000)") as r:
            assert r.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                r.read()
        assert c.post("/v1/sql", content="SELECT 1").json() == [{"Int64(1)": 1}]


# ------------------------------------------------------------------ datasets, status, spicepods, refresh


def test_datasets_json_csv_status_and_source(http: httpx.Client) -> None:
    assert http.get("/v1/datasets").json() == [
        {"from": "file:trips.csv", "name": "trips", "replication_enabled": False, "acceleration_enabled": True},
        {"from": "file:cities.csv", "name": "cities", "replication_enabled": False, "acceleration_enabled": False},
    ]
    with_status = http.get("/v1/datasets", params={"status": "true"}).json()
    assert [d["status"] for d in with_status] == ["Ready", "Ready"]
    assert http.get("/v1/datasets", params={"source": "s3"}).json() == []
    assert len(http.get("/v1/datasets", params={"source": "file"}).json()) == 2
    r = http.get("/v1/datasets", params={"format": "csv", "status": "true"})
    assert r.headers["content-type"] == "text/csv"
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert rows[0] == {"from": "file:trips.csv", "name": "trips", "replication_enabled": "false",
                       "acceleration_enabled": "true", "status": "Ready", "error": ""}
    r = http.get("/v1/datasets", params={"format": "xml"})
    assert r.status_code == 400 and "expected `json` or `csv`" in r.text


def test_status_lists_every_endpoint(api: ApiServer, http: httpx.Client) -> None:
    assert http.get("/v1/status").json() == [
        {"name": "http", "endpoint": f"127.0.0.1:{api.port}", "status": "Ready"},
        {"name": "flight", "endpoint": "127.0.0.1:50999", "status": "Ready"},
        {"name": "metrics", "endpoint": "N/A", "status": "Disabled"},
    ]
    rows = list(csv.reader(io.StringIO(http.get("/v1/status?format=csv").text)))
    assert rows[0] == ["name", "endpoint", "status"] and rows[3] == ["metrics", "N/A", "Disabled"]


def test_spicepods_json_and_csv(http: httpx.Client) -> None:
    pods = http.get("/v1/spicepods").json()
    assert len(pods) == 1 and pods[0]["name"] == "api-test" and len(pods[0]["datasets"]) == 2
    rows = list(csv.DictReader(io.StringIO(http.get("/v1/spicepods?format=csv").text)))
    assert rows == [{"name": "api-test", "version": "v1", "datasets_count": "2", "models_count": "0",
                     "dependencies_count": "0"}]


def test_spicepods_never_echo_inline_tls_material_or_api_keys(loop: LoopThread, tmp_path: Path) -> None:
    secrets = ["-----BEGIN PRIVATE KEY-----SECRETKEY", "-----BEGIN CERTIFICATE-----CERTBODY",
               "-----BEGIN CERTIFICATE-----CABODY", "api-key-one", "api-key-two"]
    pod = POD.replace("datasets:", f"""runtime:
  tls:
    enabled: false
    key: "{secrets[0]}"
    certificate: "{secrets[1]}"
    client_auth_ca: "{secrets[2]}"
  auth:
    api-key:
      keys: ["{secrets[3]}", "{secrets[4]}"]
datasets:""")
    workdir = write_pod(tmp_path, pod)
    (workdir / "cities.csv").write_text(CITIES_CSV)
    with api_server(loop, make_state(workdir)) as server:
        r = httpx.get(server.url + "/v1/spicepods", headers={"X-API-Key": "api-key-one"})
    assert r.status_code == 200
    for secret in secrets:
        assert secret not in r.text
    tls = r.json()[0]["runtime"]["tls"]
    assert tls == {"enabled": False, "key": "<redacted>", "certificate": "<redacted>", "client_auth_ca": "<redacted>"}
    assert r.json()[0]["runtime"]["auth"]["api-key"]["keys"] == ["<redacted>", "<redacted>"]


def test_refresh_reloads_the_dataset(loop: LoopThread, tmp_path: Path) -> None:
    workdir = write_pod(tmp_path, POD)
    (workdir / "cities.csv").write_text(CITIES_CSV)
    with api_server(loop, make_state(workdir)) as server, httpx.Client(base_url=server.url) as c:
        def count() -> Any:
            return c.post("/v1/sql", content="SELECT count(*) AS n FROM trips").json()[0]["n"]

        assert count() == 3
        with (workdir / "trips.csv").open("a") as f:
            f.write("4,Boise,9.0\n")
        r = c.post("/v1/datasets/TRIPS/acceleration/refresh", content="{not json")  # malformed: no overrides
        assert (r.status_code, r.json()) == (201, {"message": "Dataset refresh triggered for TRIPS."})
        assert r.headers["content-type"] == "application/json"
        wait_for(lambda: count() == 4, timeout=10)

        r = c.post("/v1/datasets/nope/acceleration/refresh")
        assert (r.status_code, r.json()) == (404, {"message": "Dataset nope not found"})
        r = c.post("/v1/datasets/cities/acceleration/refresh")
        assert (r.status_code, r.json()) == (400, {"message": "Dataset cities does not have acceleration enabled"})


def test_openapi_describes_every_route(http: httpx.Client, api: ApiServer) -> None:
    served = http.get("/v1/openapi.json").json()
    assert served == OPENAPI and served["openapi"].startswith("3.")
    app = create_app(api.state)
    for route in app.routes:
        if getattr(route, "name", None) == NOT_SERVED_ROUTE:
            continue  # upstream endpoints answered "not available" (test below)
        methods = {m.lower() for m in (getattr(route, "methods", None) or ())} - {"head"}
        assert methods <= served["paths"][route.path].keys(), route.path  # type: ignore[attr-defined]


# ------------------------------------------------------------------ metrics and the access log


def test_request_and_query_metrics(http: httpx.Client) -> None:
    http.post("/v1/sql", content="SELECT 1")
    http.post("/v1/sql", content="SELECT * FROM nope")
    http.post("/v1/datasets/nope/acceleration/refresh")
    http.get("/does-not-exist")
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert sample_value(text, "http_requests_total", method="POST", path="/v1/sql", status="200") >= 1
    assert sample_value(text, "http_requests_total", method="POST", path="/v1/sql", status="400") >= 1
    assert sample_value(text, "http_requests_total", method="POST", status="404",
                        path="/v1/datasets/{name}/acceleration/refresh") >= 1
    assert sample_value(text, "http_requests_total", method="GET", path="unmatched", status="404") >= 1
    assert sample_value(text, "http_requests_duration_ms_count", method="POST", path="/v1/sql", status="200") >= 1
    assert sample_value(text, "query_executions_total", protocol="http") >= 2
    assert sample_value(text, "query_failures_total", protocol="http", err_code="QueryPlanningError") >= 1
    assert sample_value(text, "query_duration_ms_count", protocol="http") >= 2
    assert sample_value(text, "query_returned_rows_total") >= 1
    assert sample_value(text, "query_active_count", protocol="http") == 0


def test_metrics_listener_app(loop: LoopThread, api: ApiServer) -> None:
    with api_server(loop, api.state, factory=create_metrics_app, load=False) as server:
        assert httpx.get(server.url + "/health").content == b"OK"
        r = httpx.get(server.url + "/metrics")
        assert r.status_code == 200 and samples(r.text)
        assert httpx.get(server.url + "/v1/sql").status_code == 404
    api.state.endpoints["http"] = Endpoint("http", f"127.0.0.1:{api.port}", "Ready")


def test_access_log_one_debug_line_per_request_and_quiet_at_info(http: httpx.Client,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="runtime.http"):
        http.get("/health")
    assert not [r for r in caplog.records if r.name == "runtime.http"]
    def lines() -> list[str]:
        # The /health line above is written after its response was sent, so it may land late: skip it.
        return [r.getMessage() for r in caplog.records if r.name == "runtime.http" and r.levelno == logging.DEBUG
                and not r.getMessage().startswith("GET /health")]

    with caplog.at_level(logging.DEBUG, logger="runtime.http"):
        http.post("/v1/sql", content="SELECT 1")
        http.get("/nope")
        wait_for(lambda: len(lines()) >= 2, timeout=5)  # logged when the response has been sent
    assert len(lines()) == 2
    first, second = lines()
    assert first.startswith("POST /v1/sql 200 ") and first.endswith("ms client=anonymous")
    assert second.startswith("GET /nope 404 ")


# ------------------------------------------------------------------ large results, the real process


@pytest.fixture(scope="module")
def runtime_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with run_spiced(write_pod(tmp_path_factory.mktemp("proc"))) as rt:
        yield rt


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_large_result_streams_progressively_with_flat_server_memory(runtime_process: Any) -> None:
    rt = runtime_process
    sql = "SELECT value, value * 2 AS doubled, concat('row-', value) AS label FROM generate_series(1, {n})"
    with httpx.Client(timeout=60) as c:
        # The first large result grows the allocators' pools once (tens of MiB, kept for reuse);
        # only growth beyond that would mean the result is being held.
        with c.stream("POST", rt.http_url + "/v1/sql", content=sql.format(n=500_000)) as r:
            for _ in r.iter_raw():
                pass
        baseline = _rss_kib(rt.proc.pid)
        peak = baseline
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _rss_kib(rt.proc.pid))
                stop.wait(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.perf_counter()
        first_byte = None
        size = chunks = rows = 0
        tail = b""
        token = b'"label":"row-'
        try:
            with c.stream("POST", rt.http_url + "/v1/sql", content=sql.format(n=2_000_000)) as r:
                assert r.status_code == 200
                for chunk in r.iter_raw():
                    if first_byte is None:
                        first_byte = time.perf_counter() - started
                    size += len(chunk)
                    chunks += 1
                    rows += (tail[-(len(token) - 1):] + chunk).count(token)  # tokens split across chunks too
                    tail = (tail + chunk)[-200:]
        finally:
            stop.set()
            watcher.join()
        total = time.perf_counter() - started
    assert rows == 2_000_000 and tail.endswith(b'"}]')  # no ORDER BY: any row may come last
    assert first_byte is not None and first_byte < total / 4, (first_byte, total)
    assert chunks > 20
    growth_mib = (peak - baseline) / 1024
    body_mib = size / 2**20
    assert body_mib > 100
    assert growth_mib < 48, f"server RSS grew {growth_mib:.0f} MiB while streaming {body_mib:.0f} MiB"
    print(f"first byte {first_byte:.3f}s of {total:.2f}s, {chunks} chunks, {body_mib:.0f} MiB, "
          f"RSS +{growth_mib:.0f} MiB")


def test_upstream_endpoints_not_served_yet_say_so_in_json(tmp_path: Path) -> None:
    cases = [("POST", "/v1/nsql"), ("POST", "/v1/search")]  # /v1/queries: 503 (tests/test_async_queries.py)
    with run_spiced(write_pod(tmp_path)) as rt:
        for method, path in cases:
            r = httpx.request(method, rt.http_url + path, json={"query": "x"})
            assert r.status_code == 404
            assert r.headers["content-type"] == "application/json"
            assert r.json()["message"].startswith(f"{method} {path} is not available in this runtime: ")

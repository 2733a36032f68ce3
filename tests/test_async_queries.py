"""The async query API (`/v1/queries`, spiced/http/async_queries.py and spiced/jobs.py) end to end, on real
processes: a `spiced --role scheduler -v` and two executors over mTLS (tests/cluster_rig.py), a dataset of
4 Parquet files (not accelerated, so its queries run on the executors), API keys on; a second scheduler
without executors whose results are kept 1 s (SPICED_ASYNC_QUERY_RESULT_TTL); and a plain runtime, where
the API answers 503. httpx is the client; every result is compared with /v1/sql's for the same SQL.

Covers: submit → poll → results (a distributed GROUP BY), chunks of 10,000 rows and their links,
parameters (bound, and ones that cannot be), a failing query's error, timeout_seconds, maximum_size,
cancelling long-running queries (their threads are freed), jobs scoped to the API key that submitted
them, unknown and malformed ids, malformed bodies and query strings, the list and its filters, expiry
(410), the OpenAPI document, 503 on a runtime that is not a scheduler, and a shutdown that cancels a
running query.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.cluster_rig import Cluster, make_pki, run_cluster
from tests.support import Runtime, run_spiced, write_pod
from tests.tlsprobe import wait_for

KEY_A, KEY_B = "async-key-a", "async-key-b"
FILES, ROWS_PER_FILE, GROUPS = 4, 10_000, 50
SPICEPOD = f"""\
version: v1
kind: Spicepod
name: async
runtime:
  caching:
    sql_results:
      enabled: false
  auth:
    api-key:
      keys: [{KEY_A}, {KEY_B}]
datasets:
  - from: file:t/
    name: t
    params:
      file_format: parquet
"""
SMALL_POD = "version: v1\nkind: Spicepod\nname: small\n"
GROUP_BY = "SELECT grp, count(*) AS n, sum(amount) AS total FROM t GROUP BY grp ORDER BY grp"
MANY = "SELECT id, amount FROM t WHERE id < 25000 ORDER BY id"  # 3 chunks: 10,000 + 10,000 + 5,000 rows
LONG = "SELECT count(*) AS n FROM generate_series(1, 10000000000)"  # minutes, on one core, until stopped
ID = re.compile(r"^[0-9A-F]{5}-[0-9A-F]{3}-[0-9A-F]{3}-[0-9A-F]{6}$")
UNKNOWN = "01ABC-DEF-456-7890AB"
NOT_SCHEDULER = {"error": "Async queries API requires distributed mode with `runtime.scheduler.state_location` "
                          "configured. Start with: spiced --role scheduler"}
ROUTES = [("POST", "/v1/queries"), ("GET", "/v1/queries"), ("GET", f"/v1/queries/{UNKNOWN}"),
          ("GET", f"/v1/queries/{UNKNOWN}/status"), ("GET", f"/v1/queries/{UNKNOWN}/results"),
          ("GET", f"/v1/queries/{UNKNOWN}/results/chunks/0"), ("POST", f"/v1/queries/{UNKNOWN}/cancel")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("async-queries")
    folder = root / "pod" / "t"
    folder.mkdir(parents=True)
    for f in range(FILES):
        ids = pa.array(range(f * ROWS_PER_FILE, (f + 1) * ROWS_PER_FILE), pa.int64())
        pq.write_table(pa.table({"id": ids, "grp": pa.array([i % GROUPS for i in ids.to_pylist()], pa.int32()),
                                 "amount": pa.array([i * 0.25 for i in ids.to_pylist()])}), folder / f"p{f}.parquet")
    (root / "pod" / "spicepod.yaml").write_text(SPICEPOD)
    pki = make_pki(root / "pki", "scheduler1", "executor1", "executor2", "scheduler2")
    with run_cluster(root, root / "pod", pki, ("executor1", "executor2")) as cluster:
        status = cluster.scheduler.http_url + "/v1/status"
        wait_for(lambda: sum(r["name"] == "executor" for r in httpx.get(status, headers={"X-API-Key": KEY_A})
                             .json()) == 2, timeout=30)
        yield cluster


@pytest.fixture(scope="module")
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.scheduler.http_url, headers={"X-API-Key": KEY_A}, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def short_lived(cluster: Cluster) -> Iterator[Runtime]:
    """A scheduler without executors (queries run on it) that keeps results 1 s."""
    root = cluster.root / "short"
    (root / "pod").mkdir(parents=True)
    (root / "pod" / "spicepod.yaml").write_text(SMALL_POD)
    with run_cluster(root, root / "pod", cluster.pki, (), scheduler="scheduler2",
                     env={"SPICED_ASYNC_QUERY_RESULT_TTL": "1s"}) as small:
        yield small.scheduler


# ---------------------------------------------------------------- helpers


def submit(http: httpx.Client, sql: str, **fields: Any) -> str:
    r = http.post("/v1/queries", json={"sql": sql, **fields})
    assert r.status_code == 202, r.text
    body = r.json()
    query_id = body["query_id"]
    assert ID.match(query_id), query_id
    assert body == {"query_id": query_id, "status": "PENDING", "status_url": f"/v1/queries/{query_id}/status",
                    "results_url": f"/v1/queries/{query_id}/results"}
    return str(query_id)


def finished(http: httpx.Client, query_id: str, timeout: float = 30) -> dict[str, Any]:
    """The query's `/status` once it is no longer PENDING or RUNNING."""
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"/v1/queries/{query_id}/status")
        assert r.status_code == 200, r.text
        if r.json()["status"] not in ("PENDING", "RUNNING"):
            return dict(r.json())
        assert time.monotonic() < deadline, f"{query_id} still {r.json()['status']}"
        time.sleep(0.05)


def wait_status(http: httpx.Client, query_id: str, status: str) -> None:
    wait_for(lambda: http.get(f"/v1/queries/{query_id}/status").json()["status"] == status, timeout=15)


def sql_rows(http: httpx.Client, sql: str, parameters: Any = None) -> list[dict[str, Any]]:
    r = http.post("/v1/sql", json={"sql": sql, "parameters": parameters}) if parameters is not None else \
        http.post("/v1/sql", content=sql)
    assert r.status_code == 200, r.text
    return list(r.json())


def parsed(text: str) -> datetime:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?\+00:00", text), text
    return datetime.fromisoformat(text)


# ---------------------------------------------------------------- results


def test_a_distributed_group_by_gives_sql_s_result(cluster: Cluster, http: httpx.Client) -> None:
    logged = len(cluster.scheduler.logs())
    query_id = submit(http, GROUP_BY)
    assert finished(http, query_id) == {"status": "SUCCEEDED"}
    cluster.scheduler.wait_for_log(r"Query ran \d+ stage\(s\) as \d+ task\(s\) on 2 executor\(s\)", after=logged)
    body = http.get(f"/v1/queries/{query_id}").json()
    assert list(body) == ["query_id", "status", "manifest", "result", "created_at", "started_at", "completed_at",
                          "expires_at"]
    assert (body["query_id"], body["status"]) == (query_id, "SUCCEEDED")
    assert body["manifest"] == {"format": "ARROW_IPC", "schema": {"column_count": 3, "columns": [
        {"name": "grp", "type_name": "Int32", "nullable": True, "position": 0},
        {"name": "n", "type_name": "Int64", "nullable": False, "position": 1},
        {"name": "total", "type_name": "Float64", "nullable": True, "position": 2}]},
        "total_row_count": GROUPS, "total_chunk_count": 1}
    assert body["result"] == {"chunk_index": 0, "row_offset": 0, "row_count": GROUPS,
                              "data_array": sql_rows(http, GROUP_BY)}
    created, started, completed, expires = (parsed(body[k]) for k in ("created_at", "started_at", "completed_at",
                                                                      "expires_at"))
    assert created <= started <= completed and (expires - completed).total_seconds() == 12 * 3600
    results = http.get(f"/v1/queries/{query_id}/results")
    assert (results.status_code, results.headers["content-type"]) == (200, "application/json")
    assert results.json() == body["result"]


def test_results_come_in_chunks_of_10000_rows(http: httpx.Client) -> None:
    query_id = submit(http, MANY)
    assert finished(http, query_id)["status"] == "SUCCEEDED"
    body = http.get(f"/v1/queries/{query_id}").json()
    assert (body["manifest"]["total_row_count"], body["manifest"]["total_chunk_count"]) == (25_000, 3)
    chunks, chunk = [], body["result"]
    while True:
        chunks.append(chunk)
        if "next_chunk_url" not in chunk:
            break
        assert chunk["next_chunk_url"] == f"/v1/queries/{query_id}/results/chunks/{chunk['next_chunk_index']}"
        chunk = http.get(chunk["next_chunk_url"]).json()
    assert [(c["chunk_index"], c["row_offset"], c["row_count"], c.get("next_chunk_index")) for c in chunks] == \
        [(0, 0, 10_000, 1), (1, 10_000, 10_000, 2), (2, 20_000, 5_000, None)]
    assert [row for c in chunks for row in c["data_array"]] == sql_rows(http, MANY)
    assert http.get(f"/v1/queries/{query_id}/results", params={"partition": 2}).json() == chunks[2]
    assert http.get(f"/v1/queries/{query_id}/results", params={"partition": 1, "format": "JSON"}).json() == chunks[1]
    for path in (f"/v1/queries/{query_id}/results?partition=3", f"/v1/queries/{query_id}/results/chunks/3"):
        r = http.get(path)
        assert (r.status_code, r.json()) == (404, {"error": f"Result chunk 3 not found for job {query_id}"})
    r = http.get(f"/v1/queries/{query_id}/results", params={"format": "csv"})
    assert (r.status_code, r.json()) == (400, {"error": "Unsupported result format 'csv'. Supported format: json"})


def test_a_result_without_rows_has_a_manifest_and_no_chunk(http: httpx.Client) -> None:
    query_id = submit(http, "SELECT id FROM t WHERE id < 0")
    assert finished(http, query_id)["status"] == "SUCCEEDED"
    body = http.get(f"/v1/queries/{query_id}").json()
    assert "result" not in body and (body["manifest"]["total_row_count"], body["manifest"]["total_chunk_count"]) == \
        (0, 0)
    r = http.get(f"/v1/queries/{query_id}/results")
    assert (r.status_code, r.json()) == (404, {"error": f"Job {query_id} completed with no rows returned"})


def test_parameters_bind_as_on_sql(http: httpx.Client) -> None:
    cases = [("SELECT id, amount FROM t WHERE id < $1 AND grp = $2 ORDER BY id", [500, 7]),
             ("SELECT $name AS name, $flag AS flag, $ratio AS ratio", {"name": "x", "flag": True, "ratio": 0.5})]
    for sql, parameters in cases:
        query_id = submit(http, sql, parameters=parameters)
        assert finished(http, query_id)["status"] == "SUCCEEDED"
        assert http.get(f"/v1/queries/{query_id}/results").json()["data_array"] == sql_rows(http, sql, parameters)
    unbound = [("SELECT $1 AS a", [[1]], "Nested arrays or objects are not supported as parameter values"),
               ("SELECT $1 AS a", 5, "Parameters must be a JSON array or an object"),
               ("SELECT $2 AS a", [1], "Failed to execute query: Error during planning: No value found for "
                                       "placeholder with name $2")]
    for sql, parameters, message in unbound:
        query_id = submit(http, sql, parameters=parameters)
        assert finished(http, query_id) == {"status": "FAILED", "error": {
            "error_code": "PARAMETER_BINDING_FAILED", "message": message}}


def test_a_failing_query_reports_its_error(http: httpx.Client) -> None:
    query_id = submit(http, "SELECT * FROM nope")
    message = "Failed to execute query: Error during planning: table 'spice.public.nope' not found"
    error = {"error_code": "EXECUTION_FAILED", "message": message}
    assert finished(http, query_id) == {"status": "FAILED", "error": error}
    assert http.post("/v1/sql", content="SELECT * FROM nope").text == message  # the same text as /v1/sql's 400
    body = http.get(f"/v1/queries/{query_id}").json()
    assert list(body) == ["query_id", "status", "error", "created_at", "started_at", "completed_at", "expires_at"]
    assert body["error"] == error
    r = http.get(f"/v1/queries/{query_id}/results")
    assert (r.status_code, r.json()) == (500, {"error": "Query execution failed", "status": "FAILED"})
    r = http.get(f"/v1/queries/{query_id}/results/chunks/0")
    assert (r.status_code, r.json()) == (500, {"error": "Query execution failed"})


def test_timeout_seconds_fails_the_query(http: httpx.Client) -> None:
    started = time.monotonic()
    query_id = submit(http, LONG, timeout_seconds=1)
    assert finished(http, query_id) == {"status": "FAILED", "error": {"error_code": "TIMEOUT",
                                                                      "message": "Job execution timed out"}}
    assert time.monotonic() - started < 8


def test_maximum_size_fails_a_larger_result(http: httpx.Client) -> None:
    query_id = submit(http, MANY, maximum_size=100_000)  # the first chunk alone is about 160 kB
    assert finished(http, query_id) == {"status": "FAILED", "error": {
        "error_code": "FETCHING_RESULTS_FAILED",
        "message": "Failed to write results to object store. The maximum job size of '100000' bytes was exceeded."}}
    query_id = submit(http, MANY, maximum_size=10_000_000)
    assert finished(http, query_id)["status"] == "SUCCEEDED"


def test_cancel_stops_long_running_queries(http: httpx.Client) -> None:
    # As many as the pool runs at once (spiced.jobs.MAX_RUNNING): a query that did not stop would keep
    # its thread, and the last query below would wait behind it.
    ids = [submit(http, LONG) for _ in range(4)]
    for query_id in ids:
        wait_status(http, query_id, "RUNNING")
    for query_id in ids:
        r = http.post(f"/v1/queries/{query_id}/cancel")
        assert r.status_code == 200, r.text
        body = r.json()
        assert list(body) == ["query_id", "status", "created_at", "started_at", "completed_at", "expires_at"]
        assert (body["query_id"], body["status"]) == (query_id, "CANCELLED")
    quick = submit(http, "SELECT 1 AS one")
    assert finished(http, quick, timeout=10)["status"] == "SUCCEEDED"
    for query_id in ids:
        assert finished(http, query_id) == {"status": "CANCELLED"}
        r = http.get(f"/v1/queries/{query_id}/results")
        assert (r.status_code, r.json()) == (410, {"error": "Query was cancelled", "status": "CANCELLED"})
        r = http.get(f"/v1/queries/{query_id}/results/chunks/0")
        assert (r.status_code, r.json()) == (410, {"error": "Query was cancelled"})
    again = http.post(f"/v1/queries/{ids[0]}/cancel")  # a finished query is returned as it is
    assert (again.status_code, again.json()["status"]) == (200, "CANCELLED")
    done = http.post(f"/v1/queries/{quick}/cancel")
    assert (done.status_code, done.json()["status"], "manifest" in done.json()) == (200, "SUCCEEDED", True)


def test_a_running_query_is_not_ready(http: httpx.Client) -> None:
    query_id = submit(http, LONG)
    wait_status(http, query_id, "RUNNING")
    assert http.get("/health").status_code == 200  # the event loop is free
    r = http.get(f"/v1/queries/{query_id}/results")
    assert (r.status_code, r.json()) == (425, {"error": "Query not yet complete (status: RUNNING)",
                                               "status": "RUNNING"})
    r = http.get(f"/v1/queries/{query_id}/results/chunks/0")
    assert (r.status_code, r.json()) == (409, {"error": "Query not yet complete (status: RUNNING)"})
    body = http.get(f"/v1/queries/{query_id}").json()
    assert list(body) == ["query_id", "status", "created_at", "started_at"]
    assert http.post(f"/v1/queries/{query_id}/cancel").json()["status"] == "CANCELLED"


# ---------------------------------------------------------------- the list, owners, bad requests


def test_the_list_filters_by_status_and_limits(http: httpx.Client) -> None:
    cancelled = submit(http, LONG)
    http.post(f"/v1/queries/{cancelled}/cancel")
    failed = submit(http, "SELECT * FROM nope")
    succeeded = submit(http, "SELECT 2 AS two")
    finished(http, cancelled), finished(http, failed), finished(http, succeeded)

    def listed(**params: Any) -> list[dict[str, Any]]:
        r = http.get("/v1/queries", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["total_count"] == len(body["queries"])
        return list(body["queries"])

    every = listed()
    assert [q["query_id"] for q in every][:3] == [succeeded, failed, cancelled]  # newest first
    assert every[0] == {"query_id": succeeded, "status": "SUCCEEDED", "sql_preview": "SELECT 2 AS two",
                        "created_at": every[0]["created_at"]}
    parsed(every[0]["created_at"])
    for name, status in (("failed", "FAILED"), ("FAILED", "FAILED"), ("completed", "SUCCEEDED"),
                         ("succeeded", "SUCCEEDED"), ("cancelled", "CANCELLED")):
        chosen = listed(status=name)
        assert chosen and {q["status"] for q in chosen} == {status}, name
    assert failed in [q["query_id"] for q in listed(status="failed")]
    assert succeeded not in [q["query_id"] for q in listed(status="failed")]
    assert listed(status="nonsense") == every  # upstream: an unknown status filters nothing
    assert [q["query_id"] for q in listed(limit=1)] == [succeeded]
    assert listed(limit=0) == []
    long_sql = "SELECT " + " + ".join(["1"] * 60) + " AS s"
    finished(http, submit(http, long_sql))
    preview = listed(limit=1)[0]["sql_preview"]
    assert len(preview) == 100 and preview == long_sql[:97] + "..."


def test_a_query_belongs_to_the_api_key_that_submitted_it(http: httpx.Client) -> None:
    query_id = submit(http, "SELECT 3 AS three")
    finished(http, query_id)
    other = {"X-API-Key": KEY_B}
    for method, path in [("GET", f"/v1/queries/{query_id}"), ("GET", f"/v1/queries/{query_id}/status"),
                         ("GET", f"/v1/queries/{query_id}/results"), ("POST", f"/v1/queries/{query_id}/cancel")]:
        r = http.request(method, path, headers=other)
        assert (r.status_code, r.json()) == (404, {"error": f"Job {query_id} not found"}), path
    assert query_id not in [q["query_id"] for q in http.get("/v1/queries", headers=other).json()["queries"]]
    assert query_id in [q["query_id"] for q in http.get("/v1/queries").json()["queries"]]
    assert http.get(f"/v1/queries/{query_id}", headers={"X-API-Key": "wrong"}).status_code == 401


def test_unknown_and_malformed_ids(http: httpx.Client) -> None:
    for method, path in ROUTES[2:]:
        r = http.request(method, path)
        assert (r.status_code, r.json()) == (404, {"error": f"Job {UNKNOWN} not found"}), path
        bad = path.replace(UNKNOWN, "not-a-query")
        r = http.request(method, bad)
        assert (r.status_code, r.json()) == (400, {"error": "Invalid job ID format: not-a-query"}), bad
    assert http.get("/v1/queries/a/b/c").status_code == 404
    r = http.delete(f"/v1/queries/{UNKNOWN}")
    assert (r.status_code, set(r.headers["allow"].split(", "))) == (405, {"GET", "HEAD"})


@pytest.mark.parametrize(("body", "headers", "status", "text"), [
    (b'{"sql": "SELECT 1"}', {}, 415, "Expected request with `Content-Type: application/json`"),
    (b"{", {"content-type": "application/json"}, 400, "Failed to parse the request body as JSON: "),
    (b"[1]", {"content-type": "application/json"}, 422,
     "Failed to deserialize the JSON body into the target type: invalid type: sequence, expected struct "
     "SubmitQueryRequest"),
    (b"{}", {"content-type": "application/json"}, 422,
     "Failed to deserialize the JSON body into the target type: missing field `sql`"),
    (b'{"sql": 5}', {"content-type": "application/json"}, 422,
     "Failed to deserialize the JSON body into the target type: sql: invalid type: integer `5`, expected a string"),
    (b'{"sql": "SELECT 1", "timeout_seconds": -1}', {"content-type": "application/json"}, 422,
     "Failed to deserialize the JSON body into the target type: timeout_seconds: invalid value: integer `-1`, "
     "expected u64"),
    (b'{"sql": "SELECT 1", "maximum_size": "big"}', {"content-type": "application/json; charset=utf-8"}, 422,
     'Failed to deserialize the JSON body into the target type: maximum_size: invalid type: string "big", '
     "expected u64"),
])
def test_malformed_submissions_are_4xx_with_a_message(http: httpx.Client, body: bytes, headers: dict[str, str],
                                                      status: int, text: str) -> None:
    r = http.post("/v1/queries", content=body, headers=headers)
    assert r.status_code == status and r.text.startswith(text), (r.status_code, r.text)


def test_malformed_query_strings_and_chunk_indexes_are_400(http: httpx.Client) -> None:
    query_id = submit(http, "SELECT 1 AS one")
    finished(http, query_id)
    cases = [(f"/v1/queries/{query_id}/results?partition=x",
              "Failed to deserialize query string: partition: invalid digit found in string"),
             (f"/v1/queries/{query_id}/results?partition=-1",
              "Failed to deserialize query string: partition: invalid digit found in string"),
             (f"/v1/queries/{query_id}/results?partition=1&partition=2",
              "Failed to deserialize query string: duplicate field `partition`"),
             ("/v1/queries?limit=",
              "Failed to deserialize query string: limit: cannot parse integer from empty string"),
             ("/v1/queries?limit=99999999999999999999999",
              "Failed to deserialize query string: limit: number too large to fit in target type"),
             (f"/v1/queries/{query_id}/results/chunks/x",
              "Invalid URL: Cannot parse value at index 1 with value `x` to a `usize`")]
    for path, text in cases:
        r = http.get(path)
        assert (r.status_code, r.text) == (400, text), path


def test_the_openapi_document_describes_the_api(http: httpx.Client) -> None:
    paths = http.get("/v1/openapi.json").json()["paths"]
    assert {"/v1/queries", "/v1/queries/{query_id}", "/v1/queries/{query_id}/status",
            "/v1/queries/{query_id}/results", "/v1/queries/{query_id}/results/chunks/{chunk_index}",
            "/v1/queries/{query_id}/cancel"} <= paths.keys()
    assert paths["/v1/queries"].keys() == {"get", "post"}


# ---------------------------------------------------------------- expiry, other runtimes, shutdown


def test_results_expire_after_the_retention_time(short_lived: Runtime) -> None:
    with httpx.Client(base_url=short_lived.http_url, timeout=30) as http:
        query_id = submit(http, "SELECT 1 AS one")
        assert finished(http, query_id)["status"] == "SUCCEEDED"
        body = http.get(f"/v1/queries/{query_id}").json()
        assert (parsed(body["expires_at"]) - parsed(body["completed_at"])).total_seconds() == 1
        assert body["result"]["data_array"] == [{"one": 1}]
        wait_for(lambda: http.get(f"/v1/queries/{query_id}/status").status_code == 410, timeout=5)
        for method, path in ROUTES[2:]:
            r = http.request(method, path.replace(UNKNOWN, query_id))
            assert (r.status_code, r.json()) == (410, {"error": f"Job {query_id} results have expired"}), path
        assert http.get("/v1/queries").json() == {"queries": [], "total_count": 0}


def test_a_runtime_that_is_not_a_scheduler_answers_503(tmp_path: Path) -> None:
    with run_spiced(write_pod(tmp_path)) as rt:
        for method, path in ROUTES + [("GET", "/v1/queries/not-an-id/status")]:
            r = httpx.request(method, rt.http_url + path, json={"sql": "SELECT 1"})
            assert (r.status_code, r.headers["content-type"], r.json()) == \
                (503, "application/json", NOT_SCHEDULER), path
        assert not any(p.startswith("/v1/queries") for p in httpx.get(rt.http_url + "/v1/openapi.json").json()["paths"])


def test_shutdown_cancels_a_running_query(short_lived: Runtime) -> None:
    with httpx.Client(base_url=short_lived.http_url, timeout=30) as http:
        query_id = submit(http, LONG)
        wait_status(http, query_id, "RUNNING")
    started = time.monotonic()
    assert short_lived.stop() == 0
    assert time.monotonic() - started < 10
    short_lived.wait_for_log("Cancelled 1 async query at shutdown")

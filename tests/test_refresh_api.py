"""Upstream's refresh API on the real runtime: `POST /v1/datasets/{name}/acceleration/refresh` with
its `RefreshOverrides` body, `PATCH /v1/datasets/{name}/acceleration` (`refresh_sql`), and the
`spice refresh` command. Overrides are proven by the rows queried after the refresh.

(`tests/test_http_api.py` has the plain refresh: reload, malformed body, 404 and not accelerated.)
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support import SPICE, Runtime, dataset_yaml, run_spiced, spicepod_yaml, sql_json
from tests.tlsprobe import wait_for

TRIPS_CSV = "id,city\n1,Seattle\n2,Portland\n3,Boise\n"
CITIES_CSV = "city,state\nSeattle,WA\n"
API_KEY = "refresh-test-key"
REFRESHED = 30.0  # seconds a triggered refresh may take to show in the data
T0 = datetime(2024, 1, 1)


def _workdir(tmp: Path, *datasets: str, pod_extra: str = "") -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "spicepod.yaml").write_text(spicepod_yaml(*datasets) + pod_extra)
    (tmp / "trips.csv").write_text(TRIPS_CSV)
    (tmp / "cities.csv").write_text(CITIES_CSV)
    return tmp


TRIPS = dataset_yaml("file:trips.csv", "trips", accelerated=True)
CITIES = dataset_yaml("file:cities.csv", "cities")
EVENTS = ("  - from: file:events.parquet\n    name: events\n    time_column: ts\n"
          "    acceleration:\n      enabled: true\n")


def _write_events(workdir: Path, ids: list[int]) -> None:
    """events.parquet with these ids, each `ts` = T0 + id hours; replaced atomically."""
    table = pa.table({"id": pa.array(ids, pa.int64()),
                      "ts": pa.array([T0 + timedelta(hours=i) for i in ids], pa.timestamp("us"))})
    tmp = workdir / "events.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, workdir / "events.parquet")


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """For statuses and messages only: nothing here depends on what the refreshes load."""
    with run_spiced(_workdir(tmp_path_factory.mktemp("refresh"), TRIPS, CITIES)) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def http(rt: Runtime) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rt.http_url, timeout=30) as client:
        yield client


def post_refresh(c: httpx.Client, name: str, body: Any = None, *, content: bytes | None = None) -> httpx.Response:
    return c.post(f"/v1/datasets/{name}/acceleration/refresh", json=body, content=content)


def patch(c: httpx.Client, name: str, body: Any = None, *, content: bytes | None = None) -> httpx.Response:
    return c.patch(f"/v1/datasets/{name}/acceleration", json=body, content=content)


def ids(rt: Runtime, table: str) -> list[object]:
    return [row["id"] for row in sql_json(rt, f"SELECT id FROM {table} ORDER BY id", cached=False)]


def eventually(rt: Runtime, table: str, expected: list[int]) -> None:
    seen: list[list[object]] = []

    def check() -> bool:
        seen.append(ids(rt, table))
        return seen[-1] == expected

    try:
        wait_for(check, timeout=REFRESHED, interval=0.1)
    except AssertionError:
        raise AssertionError(f"{table}: expected ids {expected}, last saw {seen[-1]}\n"
                             + "\n".join(rt.logs()[-20:])) from None


def spice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPICE, *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "NO_COLOR": "1"})


# ------------------------------------------------------------------ POST …/refresh: the body


@pytest.mark.parametrize("body", [
    {"refresh_sql": None, "refresh_mode": None, "refresh_jitter_max": None},
    {"refresh_mode": "full"},
    {"refresh_mode": "append"},
    {"refresh_jitter_max": "500ms"},
    {"refresh_sql": "SELECT id, city FROM trips WHERE id > 1"},
    {"refresh_sql": "select * from TRIPS"},
    {"something_else": 1},  # unknown fields are ignored, as upstream
])
def test_valid_overrides_trigger_a_refresh(http: httpx.Client, body: dict[str, Any]) -> None:
    r = post_refresh(http, "trips", body)
    assert (r.status_code, r.json()) == (201, {"message": "Dataset refresh triggered for trips."})


@pytest.mark.parametrize("content", [b"[1, 2]", b'"full"', b"null", b"\xff\xfe{", b"[" * 100_000])
def test_a_body_that_is_not_a_json_object_is_no_overrides(http: httpx.Client, content: bytes) -> None:
    r = post_refresh(http, "trips", content=content)
    assert (r.status_code, r.json()) == (201, {"message": "Dataset refresh triggered for trips."})


@pytest.mark.parametrize(("body", "text"), [
    ({"refresh_mode": "changes"},
     "refresh_mode changes is not supported: change data capture is not supported by this runtime "
     "(use full or append)"),
    ({"refresh_mode": "disabled"},
     "refresh_mode disabled is not supported: an on-demand refresh cannot disable refreshes (use full or append)"),
    ({"refresh_mode": "snapshot"}, "unknown refresh_mode 'snapshot': expected full or append"),
    ({"refresh_mode": 1}, "refresh_mode must be a string or null, got 1"),
    ({"refresh_sql": 5}, "refresh_sql must be a string or null, got 5"),
    ({"refresh_sql": ["SELECT 1"]}, 'refresh_sql must be a string or null, got ["SELECT 1"]'),
    ({"refresh_jitter_max": "10x"}, "refresh_jitter_max: invalid duration '10x' (expected e.g. 10s, 500ms, 1m)"),
    ({"refresh_jitter_max": 10}, "refresh_jitter_max must be a string or null, got 10"),
    ({"refresh_sql": "SELECT * FROM cities"},
     "refresh_sql: must select from the dataset trips only (got 'SELECT * FROM cities')"),
    ({"refresh_sql": "DELETE FROM trips"}, "refresh_sql: expected SELECT … FROM trips (got 'DELETE FROM trips')"),
])
def test_bad_overrides_are_400_with_a_message(http: httpx.Client, body: dict[str, Any], text: str) -> None:
    r = post_refresh(http, "trips", body)
    assert (r.status_code, r.headers["content-type"], r.json()) == (400, "application/json", {"message": text})


@pytest.mark.parametrize("sql", ["'", '"', "SELECT * FROM trips WHERE city = 'x", "(" * 5000])
def test_sql_the_parser_cannot_read_is_400_not_500(http: httpx.Client, sql: str) -> None:
    r = post_refresh(http, "trips", {"refresh_sql": sql})
    assert r.status_code == 400 and r.json()["message"].startswith("refresh_sql: "), r.text
    r = patch(http, "trips", {"refresh_sql": sql})
    assert r.status_code == 400 and r.json()["message"].startswith("Request failed. cannot parse "), r.text


def test_dataset_checks_come_before_the_body(http: httpx.Client) -> None:
    r = post_refresh(http, "nope", {"refresh_mode": "changes"})
    assert (r.status_code, r.json()) == (404, {"message": "Dataset nope not found"})
    r = post_refresh(http, "Cities", {"refresh_mode": "changes"})
    assert (r.status_code, r.json()) == (400, {"message": "Dataset Cities does not have acceleration enabled"})


# ------------------------------------------------------------------ PATCH …/acceleration: statuses


@pytest.mark.parametrize("body", [{}, {"refresh_sql": None}, {"other": "x"}])
def test_patch_without_refresh_sql_is_a_200_no_op(http: httpx.Client, body: dict[str, Any]) -> None:
    r = patch(http, "trips", body)
    assert (r.status_code, r.content) == (200, b"")
    assert patch(http, "cities", body).status_code == 200  # as upstream: nothing asked, nothing checked


def test_patch_statuses_and_messages(http: httpx.Client) -> None:
    r = patch(http, "nope", {"refresh_sql": "SELECT * FROM nope"})
    assert (r.status_code, r.json()) == (404, {"message": "Dataset nope not found"})
    r = patch(http, "cities", {"refresh_sql": "SELECT * FROM cities"})
    assert (r.status_code, r.json()) == (400, {"message": "Dataset cities does not have acceleration enabled"})
    r = patch(http, "trips", {"refresh_sql": 7})
    assert (r.status_code, r.json()) == (400, {"message": "refresh_sql must be a string or null, got 7"})
    r = patch(http, "TRIPS", {"refresh_sql": "SELECT * FROM cities"})
    assert (r.status_code, r.json()) == (400, {
        "message": "Request failed. must select from the dataset trips only (got 'SELECT * FROM cities')"})
    for content in (b"", b"{nope", b"[1]", b"\xff"):
        r = patch(http, "trips", content=content)
        assert r.status_code == 400 and r.json()["message"].startswith("Failed to parse the request body as JSON")
    r = http.get("/v1/datasets/trips/acceleration")
    assert (r.status_code, r.headers["allow"]) == (405, "PATCH")


def test_patch_is_behind_the_api_key_gate(tmp_path: Path) -> None:
    auth = f"runtime:\n  auth:\n    api-key:\n      keys: [{API_KEY}]\n"
    with run_spiced(_workdir(tmp_path, TRIPS, pod_extra=auth)) as keyed, \
            httpx.Client(base_url=keyed.http_url) as c:
        assert patch(c, "trips", {}).status_code == 401
        assert post_refresh(c, "trips").status_code == 401
        assert c.patch("/v1/datasets/trips/acceleration", json={}, headers={"X-API-Key": API_KEY}).status_code == 200
        done = spice("refresh", "trips", "--http-endpoint", keyed.http_url)
        assert (done.returncode, done.stderr) == (1, "Unauthorized\n")
        done = spice("refresh", "trips", "--http-endpoint", keyed.http_url, "--api-key", API_KEY)
        assert (done.returncode, done.stdout) == (0, "Refreshing dataset trips ...\n"
                                                     "Dataset refresh triggered for trips.\n")


def test_openapi_describes_both_routes(http: httpx.Client) -> None:
    paths = http.get("/v1/openapi.json").json()["paths"]
    post = paths["/v1/datasets/{name}/acceleration/refresh"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(body) == {"refresh_sql", "refresh_mode", "refresh_jitter_max"}
    assert {"201", "400", "404"} <= post["responses"].keys()
    assert {"200", "400", "404"} <= paths["/v1/datasets/{name}/acceleration"]["patch"]["responses"].keys()


# ------------------------------------------------------------------ the data each override loads


def test_refresh_sql_override_applies_to_that_refresh_only(tmp_path: Path) -> None:
    with run_spiced(_workdir(tmp_path, TRIPS)) as runtime, httpx.Client(base_url=runtime.http_url) as c:
        assert ids(runtime, "trips") == [1, 2, 3]
        assert post_refresh(c, "trips", {"refresh_sql": "SELECT * FROM trips WHERE id > 2"}).status_code == 201
        eventually(runtime, "trips", [3])
        assert post_refresh(c, "trips").status_code == 201  # no override: the spicepod's (all rows)
        eventually(runtime, "trips", [1, 2, 3])


def test_patched_refresh_sql_is_used_by_later_refreshes(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, TRIPS)
    with run_spiced(workdir) as runtime, httpx.Client(base_url=runtime.http_url) as c:
        r = patch(c, "trips", {"refresh_sql": "SELECT id, city FROM trips WHERE id < 3"})
        assert (r.status_code, r.content) == (200, b""), r.text
        assert post_refresh(c, "trips").status_code == 201
        eventually(runtime, "trips", [1, 2])
        (workdir / "trips.csv").write_text(TRIPS_CSV + "0,Tacoma\n5,Eugene\n")
        assert post_refresh(c, "trips").status_code == 201  # the patched SQL again, on the new file
        eventually(runtime, "trips", [0, 1, 2])


def test_refresh_mode_append_adds_the_new_rows_to_the_loaded_ones(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, EVENTS)
    _write_events(workdir, [1, 2, 3])
    with run_spiced(workdir) as runtime, httpx.Client(base_url=runtime.http_url) as c:
        assert ids(runtime, "events") == [1, 2, 3]
        _write_events(workdir, [4, 5])
        assert post_refresh(c, "events", {"refresh_mode": "append"}).status_code == 201
        eventually(runtime, "events", [1, 2, 3, 4, 5])
        assert post_refresh(c, "events").status_code == 201  # the spicepod's full mode again
        eventually(runtime, "events", [4, 5])


def test_refresh_jitter_max_still_refreshes(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, TRIPS)
    with run_spiced(workdir) as runtime, httpx.Client(base_url=runtime.http_url) as c:
        (workdir / "trips.csv").write_text(TRIPS_CSV + "4,Tacoma\n")
        assert post_refresh(c, "trips", {"refresh_jitter_max": "1s"}).status_code == 201
        eventually(runtime, "trips", [1, 2, 3, 4])


# ------------------------------------------------------------------ spice refresh


def test_cli_refresh_prints_the_runtimes_answer(rt: Runtime) -> None:
    done = spice("refresh", "TRIPS", "--http-endpoint", rt.http_url)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "Refreshing dataset TRIPS ...\nDataset refresh triggered for TRIPS.\n", "")
    done = spice("refresh", "trips", "--refresh-mode", "full", "--http-endpoint", rt.http_url)
    assert (done.returncode, done.stdout) == (
        0, "Refreshing dataset trips with full mode...\nDataset refresh triggered for trips.\n")


@pytest.mark.parametrize(("args", "stderr"), [
    (["nope"], "Dataset nope not found\n"),
    (["cities"], "Dataset cities does not have acceleration enabled\n"),
    (["trips", "--refresh-sql", "SELECT * FROM cities"],
     "refresh_sql: must select from the dataset trips only (got 'SELECT * FROM cities')\n"),
])
def test_cli_refresh_refused_prints_the_message_and_exits_1(rt: Runtime, args: list[str], stderr: str) -> None:
    done = spice("refresh", *args, "--http-endpoint", rt.http_url)
    assert (done.returncode, done.stderr) == (1, stderr)
    assert done.stdout == f"Refreshing dataset {args[0]} ...\n"


def test_cli_refresh_without_a_runtime_is_one_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused
        done = spice("refresh", "trips", "--http-endpoint", url)
    assert (done.returncode, done.stderr) == (1, f"the Spice runtime is unavailable at {url}. Is it running?\n")


def test_cli_refresh_mode_must_be_full_or_append() -> None:
    done = spice("refresh", "trips", "--refresh-mode", "changes")
    assert done.returncode == 2 and "'changes' is not one of 'full', 'append'" in done.stderr


def test_cli_refresh_overrides_change_the_data(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, EVENTS)
    _write_events(workdir, [1, 2, 3])
    with run_spiced(workdir) as runtime:
        url = ["--http-endpoint", runtime.http_url]
        done = spice("refresh", "events", "--refresh-sql", "SELECT * FROM events WHERE id >= 2", *url)
        assert (done.returncode, done.stdout) == (0, "Refreshing dataset events ...\n"
                                                     "Dataset refresh triggered for events.\n"), done.stderr
        eventually(runtime, "events", [2, 3])
        _write_events(workdir, [7])
        done = spice("refresh", "events", "--refresh-mode", "append", *url)
        assert (done.returncode, done.stdout) == (0, "Refreshing dataset events with append mode...\n"
                                                     "Dataset refresh triggered for events.\n"), done.stderr
        eventually(runtime, "events", [2, 3, 7])

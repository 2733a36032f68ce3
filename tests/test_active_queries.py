"""spiced/queries.py, spiced/interrupt.py, spiced/http/queries.py: `GET /v1/sql/active` and
`POST /v1/sql/{id}/cancel` against the real `spiced` process.

Long queries run in client threads; the test finds them in the active list, cancels them, and
checks what their client sees (HTTP 499 / gRPC CANCELLED `Query <id> was cancelled`), that they
leave the list, and that the work really stopped: the runtime process's CPU time stops growing.
The official JavaScript SDK lists and cancels one too (the listActive / cancelActive steps of
tests/js/sdk_client.mjs).

pyarrow's `read_all()` turns a CANCELLED status into a simulated SIGINT in the main thread (its
SignalStopHandler), so Flight results are read here with `read_chunk()`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pyarrow.flight as fl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spiced.queries import PREVIEW_CHARS
from tests.jsclient import ensure_installed, run_sdk
from tests.query_rig import (
    ENDLESS,
    Outcome,
    active,
    assert_busy,
    assert_stopped,
    cancel,
    find,
    flight_read,
    flight_ticket,
    http_query,
    in_thread,
    long_sql,
    wait_listed,
)
from tests.support import Runtime, run_spiced, write_pod
from tests.tlsprobe import wait_for

KEY = "active-queries-key"


def failures(rt: Runtime) -> dict[tuple[str, str], float]:
    """query_failures_total by (protocol, err_code), from the real /metrics."""
    text = httpx.get(rt.http_url + "/metrics", headers={"X-API-Key": KEY}, timeout=10).text
    return {(s.labels["protocol"], s.labels["err_code"]): s.value for family in text_string_to_metric_families(text)
            if family.name == "query_failures" for s in family.samples if s.name == "query_failures_total"}


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    with run_spiced(write_pod(tmp_path_factory.mktemp("active"))) as runtime:
        yield runtime


# ---------------------------------------------------------------- HTTP


def test_a_running_http_query_is_listed_then_cancelled_and_stops(rt: Runtime) -> None:
    sql_text = long_sql("http_long")
    before = failures(rt).get(("http", "QueryCancelled"), 0)
    outcome = http_query(rt, sql_text)
    listed = wait_listed(rt, sql_text)
    query_id = uuid.UUID(listed["query_id"])
    assert query_id.version == 7
    assert listed["protocol"] == "http"
    assert abs(listed["started_at_ms"] - time.time() * 1000) < 60_000
    assert set(listed) == {"query_id", "protocol", "sql_preview", "started_at_ms"}
    assert active(rt)["total_count"] >= 1
    assert_busy(rt)

    r = cancel(rt, listed["query_id"])
    assert (r.status_code, r.json()) == (200, {"query_id": listed["query_id"], "status": "cancelled"})
    response = outcome.wait().value
    assert outcome.error is None
    assert (response.status_code, response.text) == (499, f"Query {query_id} was cancelled")
    assert find(rt, sql_text) is None
    assert_stopped(rt)
    assert failures(rt)[("http", "QueryCancelled")] == before + 1
    line = rt.wait_for_log(f"Query failed query_id={query_id} ")
    assert line.split(" WARN runtime::query: ")[1] == (
        f'Query failed query_id={query_id} protocol=http err_code=QueryCancelled '
        f'error="Query {query_id} was cancelled"')
    assert cancel(rt, listed["query_id"]).status_code == 404  # gone


def test_cancelling_a_streaming_http_response_cuts_it(rt: Runtime) -> None:
    sql_text = long_sql("http_stream", ENDLESS)
    with httpx.Client(timeout=60) as client, client.stream("POST", rt.http_url + "/v1/sql", content=sql_text) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()
        next(chunks)
        listed = wait_listed(rt, sql_text)
        assert cancel(rt, listed["query_id"]).status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in chunks:
                pass
    wait_for(lambda: find(rt, sql_text) is None, timeout=10)
    assert_stopped(rt)


# ---------------------------------------------------------------- Flight


@pytest.mark.parametrize("protocol", ["flight", "flightsql"])
def test_a_running_flight_query_is_listed_then_cancelled_and_stops(rt: Runtime, protocol: str) -> None:
    sql_text = long_sql(f"{protocol}_long")
    before = failures(rt).get((protocol, "QueryCancelled"), 0)
    outcome = in_thread(lambda: flight_read(rt, flight_ticket(sql_text, protocol)))
    listed = wait_listed(rt, sql_text)
    assert listed["protocol"] == protocol
    assert_busy(rt)

    assert cancel(rt, listed["query_id"]).status_code == 200
    error = outcome.wait().error
    assert isinstance(error, fl.FlightCancelledError), repr(error)
    # pyarrow's server appends its status detail to CANCELLED (spiced/flight/results.py).
    assert str(error).startswith(f"Query {listed['query_id']} was cancelled. Detail: Cancelled. "
                                 "gRPC client debug context: ")
    assert "Traceback" not in str(error)
    assert find(rt, sql_text) is None
    assert_stopped(rt)
    assert failures(rt)[(protocol, "QueryCancelled")] == before + 1


def test_a_flight_stream_cancelled_mid_way_ends_unknown_with_the_text(rt: Runtime) -> None:
    """Once batches have gone out, the C stream cannot carry CANCELLED: UNKNOWN, the same clean text."""
    sql_text = long_sql("flight_stream", ENDLESS)
    with fl.connect(rt.flight_uri) as client:
        reader = client.do_get(fl.Ticket(sql_text.encode()))
        reader.read_chunk()
        listed = wait_listed(rt, sql_text)
        assert cancel(rt, listed["query_id"]).status_code == 200
        with pytest.raises(fl.FlightServerError) as error:
            while True:
                reader.read_chunk()
    assert str(error.value).startswith(f"Query {listed['query_id']} was cancelled. gRPC client debug context: UNKNOWN")
    wait_for(lambda: find(rt, sql_text) is None, timeout=10)
    assert_stopped(rt)


def test_several_queries_are_listed_newest_first(rt: Runtime) -> None:
    texts = [long_sql(f"several_{protocol}") for protocol in ("flight", "http", "flightsql")]
    starts: list[Callable[[], Outcome]] = [
        lambda: in_thread(lambda: flight_read(rt, flight_ticket(texts[0], "flight"))),
        lambda: http_query(rt, texts[1]),
        lambda: in_thread(lambda: flight_read(rt, flight_ticket(texts[2], "flightsql"))),
    ]
    outcomes = []
    for text, start in zip(texts, starts, strict=True):
        outcomes.append(start())
        wait_listed(rt, text)
        time.sleep(0.01)  # distinct start milliseconds
    listing = active(rt)
    mine = [q for q in listing["queries"] if q["sql_preview"] in texts]
    assert [q["sql_preview"] for q in mine] == texts[::-1]
    assert listing["total_count"] == len(listing["queries"]) >= 3
    for q in mine:
        assert cancel(rt, q["query_id"]).status_code == 200
    for outcome in outcomes:
        outcome.wait()
    wait_for(lambda: not [q for q in active(rt)["queries"] if q["sql_preview"] in texts], timeout=10)
    assert_stopped(rt)


# ---------------------------------------------------------------- finished queries, refusals


def test_finished_and_failed_queries_leave_the_list(rt: Runtime) -> None:
    assert httpx.post(rt.http_url + "/v1/sql", content="SELECT 1").status_code == 200
    assert httpx.post(rt.http_url + "/v1/sql", content="SELECT * FROM nope").status_code == 400
    assert flight_read(rt, b"SELECT * FROM trips") == 3
    with pytest.raises(fl.FlightInternalError):
        flight_read(rt, b"SELECT * FROM nope")
    wait_for(lambda: active(rt) == {"queries": [], "total_count": 0}, timeout=10)


def test_a_long_sql_text_is_previewed(rt: Runtime) -> None:
    padding = " " * (PREVIEW_CHARS + 100)
    sql_text = long_sql("previewed") + padding
    outcome = http_query(rt, sql_text)
    preview = sql_text[:PREVIEW_CHARS] + "…"
    listed = wait_listed(rt, preview)
    assert cancel(rt, listed["query_id"]).status_code == 200
    assert outcome.wait().value.status_code == 499


_CHAR = "invalid character: expected an optional prefix of `urn:uuid:` followed by [0-9a-fA-F-], found "


@pytest.mark.parametrize("text, problem", [  # the texts of Rust's uuid crate, which upstream shows
    ("not-a-uuid", _CHAR + "`n` at 1"),
    ("0198f0a1-9c3d-7c4e-8a11-2b3c4d5e6f7g", _CHAR + "`g` at 36"),
    ("1234", "invalid length: expected length 32 for simple format, found 4"),
    ("0198f0a1-9c3d-7c4e-8a112b3c4d5e6f70", "invalid group count: expected 5, found 4"),
    ("0198f0a19-c3d-7c4e-8a11-2b3c4d5e6f70", "invalid group length in group 0: expected 8, found 9"),
])
def test_cancel_with_an_invalid_id_is_400(rt: Runtime, text: str, problem: str) -> None:
    r = cancel(rt, text)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": f"Invalid query_id (expected UUID): {problem}"}


def test_cancel_of_an_unknown_query_is_404(rt: Runtime) -> None:
    query_id = uuid.uuid4()
    for form in (str(query_id).upper(), query_id.hex, f"{{{query_id}}}", f"urn:uuid:{query_id}"):
        r = cancel(rt, form)
        assert (r.status_code, r.json()) == (404, {"error": f"Active SQL query '{query_id}' not found"})
    assert httpx.get(f"{rt.http_url}/v1/sql/{query_id}/cancel").status_code == 405
    assert httpx.post(f"{rt.http_url}/v1/sql/active").status_code == 405


# ---------------------------------------------------------------- API keys


POD_WITH_KEY = f"""\
version: v1
kind: Spicepod
name: keyed
runtime:
  auth:
    api-key:
      keys: [{KEY}]
datasets:
  - from: file:trips.csv
    name: trips
"""


def test_both_routes_need_the_api_key(tmp_path: Path) -> None:
    auth = {"X-API-Key": KEY}
    with run_spiced(write_pod(tmp_path, POD_WITH_KEY)) as keyed:
        assert httpx.get(keyed.http_url + "/v1/sql/active").status_code == 401
        assert httpx.get(keyed.http_url + "/v1/sql/active", headers={"X-API-Key": "wrong"}).status_code == 401
        assert cancel(keyed, str(uuid.uuid4())).status_code == 401
        assert cancel(keyed, "not-a-uuid").status_code == 401
        assert active(keyed, auth) == {"queries": [], "total_count": 0}

        sql_text = long_sql("keyed")
        bearer = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {KEY}".encode())])
        outcome = in_thread(lambda: flight_read(keyed, sql_text.encode(), bearer))
        listed = wait_listed(keyed, sql_text, auth)
        assert cancel(keyed, listed["query_id"]).status_code == 401
        assert find(keyed, sql_text, auth) is not None  # still running
        r = cancel(keyed, listed["query_id"], {"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        assert isinstance(outcome.wait().error, fl.FlightCancelledError)
        assert_stopped(keyed)


# ---------------------------------------------------------------- the official JavaScript SDK


def test_the_javascript_sdk_lists_and_cancels_a_query(rt: Runtime) -> None:
    ensure_installed()
    sql_text = long_sql("js_sdk")
    outcome = http_query(rt, sql_text)
    unknown_id = str(uuid.uuid4())
    # Polls listActiveQueries() for the query, cancels it, then captures the SDK's errors for an
    # invalid and an unknown id.
    out = run_sdk({"httpUrl": rt.http_url, "maxRetries": 0, "steps": [
        {"call": "cancelActive", "sqlPreview": sql_text},
        {"call": "cancelActive", "queryId": "not-a-uuid", "continueOnError": True},
        {"call": "cancelActive", "queryId": unknown_id, "continueOnError": True},
    ]}, timeout=60, check=False)
    assert len(out["results"]) == 3, out.get("error") or out["stderr"]
    found, invalid, unknown = out["results"]
    listed = found["listed"]
    assert listed["protocol"] == "http" and listed["sql_preview"] == sql_text
    assert found["cancelled"] == {"query_id": listed["query_id"], "status": "cancelled"}
    assert invalid["error"] == ("Query id 'not-a-uuid' is not a valid UUID. Use the query_id from listActiveQueries().")
    assert unknown["error"] == (f"No active query '{unknown_id}' found. It may have already finished, "
                                "or it was submitted by a different client.")
    response = outcome.wait().value
    assert (response.status_code, response.text) == (499, f"Query {listed['query_id']} was cancelled")
    assert_stopped(rt)

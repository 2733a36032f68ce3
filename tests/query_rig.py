"""Long-running queries on the real runtime, and what the tests of active queries and query
outcomes watch them with: started in threads, listed, cancelled, and the runtime's CPU after."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import pyarrow.flight as fl

from spiced.flight import flight_sql_pb2 as pb
from spiced.flight import sql
from tests.support import Runtime
from tests.tlsprobe import wait_for

# Runs for minutes (a single-partition aggregation: the first batch is the only batch).
LONG = "SELECT count(*) AS {tag} FROM generate_series(1, 10000000000)"
# Streams for minutes.
ENDLESS = "SELECT value AS {tag} FROM generate_series(1, 10000000000)"


def long_sql(tag: str, template: str = LONG) -> str:
    return template.format(tag=tag)


@dataclass
class Outcome:
    """What a client thread got: `value` (a response, rows) or `error`."""

    thread: threading.Thread
    value: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float = 10.0) -> Outcome:
        assert self.done.wait(timeout), "the client did not get an answer"
        return self


def in_thread(fn: Callable[[], Any]) -> Outcome:
    outcome = Outcome(threading.Thread(daemon=True))

    def run() -> None:
        try:
            outcome.value = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            outcome.error = e
        finally:
            outcome.done.set()

    outcome.thread = threading.Thread(target=run, daemon=True)
    outcome.thread.start()
    return outcome


def http_query(rt: Runtime, sql_text: str, headers: dict[str, str] | None = None) -> Outcome:
    return in_thread(lambda: httpx.post(rt.http_url + "/v1/sql", content=sql_text, headers=headers, timeout=120))


def flight_read(rt: Runtime, ticket: bytes, options: fl.FlightCallOptions | None = None) -> int:
    """Rows of a DoGet, read chunk by chunk (not read_all: module docstring)."""
    with fl.connect(rt.flight_uri) as client:
        reader = client.do_get(fl.Ticket(ticket), options or fl.FlightCallOptions())
        rows = 0
        while True:
            try:
                rows += reader.read_chunk().data.num_rows
            except StopIteration:
                return rows


def flight_ticket(sql_text: str, protocol: str) -> bytes:
    return sql_text.encode() if protocol == "flight" else sql.pack(pb.CommandStatementQuery(query=sql_text))


def active(rt: Runtime, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = httpx.get(rt.http_url + "/v1/sql/active", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body: dict[str, Any] = r.json()
    return body


def find(rt: Runtime, sql_text: str, headers: dict[str, str] | None = None) -> dict[str, Any] | None:
    return next((q for q in active(rt, headers)["queries"] if q["sql_preview"] == sql_text), None)


def wait_listed(rt: Runtime, sql_text: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    wait_for(lambda: find(rt, sql_text, headers) is not None, timeout=15)
    listed = find(rt, sql_text, headers)
    assert listed is not None
    return listed


def cancel(rt: Runtime, query_id: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{rt.http_url}/v1/sql/{query_id}/cancel", headers=headers, timeout=10)


def cpu_seconds(rt: Runtime) -> float:
    """CPU time of the runtime process (every thread; the TLS front is a separate process)."""
    times = psutil.Process(rt.proc.pid).cpu_times()
    return float(times.user + times.system)


def cpu_over(rt: Runtime, seconds: float = 1.0) -> float:
    before = cpu_seconds(rt)
    time.sleep(seconds)
    return cpu_seconds(rt) - before


def assert_busy(rt: Runtime) -> None:
    assert cpu_over(rt) > 0.5, "the long query is not running"


def assert_stopped(rt: Runtime) -> None:
    """The work is over by the time the client has its answer: over the next second the process
    is idle (a query still running keeps a whole core busy)."""
    spent = cpu_over(rt, 1.0)
    assert spent < 0.25, f"the runtime used {spent:.2f} s of CPU in the second after the cancel"

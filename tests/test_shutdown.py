"""SIGTERM while serving (issue 6): in-flight HTTP responses and Flight DoGet streams run to their
end, new connections are refused as soon as the drain starts, and the process exits 0 within the
drain bound (spiced/runtime.py `DRAIN_SECONDS`), even when a client stops reading altogether.
Also the query time limit (`runtime.query.timeout`): 504 on HTTP, DEADLINE_EXCEEDED on Flight, and
the query really ends.

The in-flight work is made long enough to observe by reading slowly: a large JSON result and a
large Flight stream are opened and partly read, SIGTERM is sent, and only then read to the end.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pyarrow import flight

from spiced.runtime import DRAIN_SECONDS
from tests.pki import Pki
from tests.soak_rig import write_workdir
from tests.support import Runtime, run_spiced
from tests.tlsprobe import TimedOut, wait_for

ROWS = 1_000_000
SQL = "SELECT id, v FROM numbers"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_workdir(tmp_path_factory.mktemp("shutdown"), rows=ROWS)


@pytest.fixture(scope="module")
def pki(work: Path) -> Pki:
    return Pki.create(work / "pki")


@pytest.fixture
def rt(work: Path, pki: Pki) -> Iterator[Runtime]:
    with run_spiced(work, "--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
                    "--tls-key-file", str(pki.server.key), metrics=True, timeout=60) as runtime:
        yield runtime


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def http_client(rt: Runtime, pki: Pki) -> httpx.Client:
    return httpx.Client(base_url=rt.http_url.replace("127.0.0.1", "localhost"),
                        verify=ssl.create_default_context(cafile=str(pki.ca.cert)), timeout=60)


def flight_client(rt: Runtime, pki: Pki) -> flight.FlightClient:
    return flight.FlightClient(rt.flight_uri.replace("127.0.0.1", "localhost"), tls_root_certs=pki.ca.cert_pem)


def test_sigterm_drains_in_flight_work_and_refuses_new_connections(rt: Runtime, pki: Pki) -> None:
    ports = {"http": rt.http_port, "flight": rt.flight_port, "metrics": int(rt.addresses["metrics"].rsplit(":", 1)[1])}
    with http_client(rt, pki) as http, flight_client(rt, pki) as fl, \
            http.stream("POST", "/v1/sql", content=SQL) as response:
        assert response.status_code == 200
        chunks = response.iter_raw(64 * 1024)
        body = [next(chunks)]  # the response is under way ...
        reader = fl.do_get(flight.Ticket(SQL.encode()))
        first = reader.read_chunk()  # ... and so is the stream
        rows = first.data.num_rows
        assert rows < ROWS

        rt.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # New connections are refused while both are still in flight.
        try:
            wait_for(lambda: all(refused(p) for p in ports.values()), 5.0)
        except TimedOut:
            pytest.fail(f"still accepted: {[name for name, p in ports.items() if not refused(p)]}")

        body.extend(chunks)
        for chunk in reader:
            rows += chunk.data.num_rows
    finished = time.monotonic()
    text = b"".join(body)
    assert text.startswith(b"[{") and text.endswith(b"}]") and text.count(b'"id":') == ROWS
    assert rows == ROWS
    assert rt.proc.wait(DRAIN_SECONDS + 5) == 0
    assert time.monotonic() - signalled < DRAIN_SECONDS + 5
    assert time.monotonic() - finished < 3.0  # the drain ends with the work it waited for
    rt.wait_for_log(r" INFO runtime: Goodbye!$", timeout=5)
    assert "Traceback" not in "\n".join(rt.logs())


def test_idle_server_exits_at_once(rt: Runtime, pki: Pki) -> None:
    with http_client(rt, pki) as http, flight_client(rt, pki) as fl:
        assert http.get("/health").status_code == 200  # keep-alive connections stay open, idle
        assert fl.do_get(flight.Ticket(b"SELECT 1")).read_all().num_rows == 1
        started = time.monotonic()
        rt.send_signal(signal.SIGTERM)
        assert rt.proc.wait(DRAIN_SECONDS + 5) == 0
        took = time.monotonic() - started
    assert took < 3.0, f"idle connections held the drain for {took:.1f} s"


def test_a_client_that_stops_reading_cannot_hold_shutdown(rt: Runtime, pki: Pki) -> None:
    with http_client(rt, pki) as http, flight_client(rt, pki) as fl, \
            http.stream("POST", "/v1/sql", content=SQL) as response:
        next(response.iter_raw(64 * 1024))
        reader = fl.do_get(flight.Ticket(SQL.encode()))
        reader.read_chunk()
        started = time.monotonic()
        rt.send_signal(signal.SIGTERM)  # and never read again
        assert rt.proc.wait(DRAIN_SECONDS + 5) == 0
        took = time.monotonic() - started
    assert took < DRAIN_SECONDS + 3, f"exited after {took:.1f} s"
    assert "Traceback" not in "\n".join(rt.logs())


# ------------------------------------------------------------------------------ query time limit

# Fine-grained work (5 ms per batch, about 90 s in all): DataFusion cancels at its yield points,
# so a query that spends seconds inside one batch would keep a core busy that long after the timeout.
SLOW_SQL = "SELECT count(*) AS n FROM generate_series(1, 100000000) g JOIN numbers n ON g.value % 1000 = n.id % 1000"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_query_timeout_ends_the_query_on_both_protocols(tmp_path: Path, pki: Pki) -> None:
    work = write_workdir(tmp_path, rows=200_000)
    pod = (work / "spicepod.yaml").read_text()
    (work / "spicepod.yaml").write_text(pod.replace("name: soak\n",
                                                    "name: soak\nruntime:\n  query:\n    timeout: 1s\n"))
    problems = []
    with run_spiced(work, "--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
                    "--tls-key-file", str(pki.server.key), timeout=60) as rt:
        try:
            with http_client(rt, pki) as http, flight_client(rt, pki) as fl:
                started = time.monotonic()
                r = http.post("/v1/sql", content=SLOW_SQL)
                if (r.status_code, r.text) != (504, "Failed to execute query: Query timed out after 1s") \
                        or time.monotonic() - started > 3.0:
                    problems.append(f"HTTP: {r.status_code} {r.text!r} after {time.monotonic() - started:.1f} s")
                started = time.monotonic()
                try:  # DEADLINE_EXCEEDED from the server, well before the client's own deadline
                    fl.do_get(flight.Ticket(SLOW_SQL.encode()), options=flight.FlightCallOptions(timeout=5)).read_all()
                    problems.append("Flight: the query completed")
                except flight.FlightTimedOutError as e:
                    if time.monotonic() - started > 3.0:
                        problems.append(f"Flight: no server-side deadline, the client's own fired: {str(e)[:80]}")
                # A timed-out query is over, not left running: the server goes idle again.
                try:
                    wait_for(lambda: _idle(rt.proc.pid), 3.0)
                except TimedOut:
                    problems.append("a timed-out query keeps a CPU busy")
                # ... and other queries are served at once (an abandoned query holds an engine worker)
                try:
                    fl.do_get(flight.Ticket(b"SELECT 1"), options=flight.FlightCallOptions(timeout=5)).read_all()
                except flight.FlightTimedOutError:
                    problems.append("SELECT 1 over Flight did not answer within 5 s of the timeouts")
            rt.send_signal(signal.SIGTERM)
            try:
                if rt.proc.wait(DRAIN_SECONDS + 2) != 0:
                    problems.append(f"exit code {rt.proc.returncode}")
            except subprocess.TimeoutExpired:
                problems.append(f"no exit within {DRAIN_SECONDS + 2:.0f} s of SIGTERM")
        finally:
            if rt.proc.poll() is None:
                rt.proc.kill()
                rt.proc.wait()
    assert not problems, "\n".join(problems)


def _idle(pid: int) -> bool:
    before = cpu_seconds(pid)
    time.sleep(1.0)  # sampling window for the CPU counter
    return cpu_seconds(pid) - before < 0.3

"""spiced/flight/front_process.py: the Flight TLS front in its own process, with the runtime as the
one owner of TLS material, client identities, signals and shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import psutil
import pyarrow.flight as fl
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client.parser import text_string_to_metric_families

from spiced.flight.front import PEER_PREFIX
from spiced.flight.front_process import FlightFrontProcess
from spiced.identity import ClientIdentity
from spiced.metrics import Metrics
from spiced.runtime import DRAIN_SECONDS
from spiced.tls.manager import TlsManager
from tests.flight_rig import mtls_backend, serving, value
from tests.pki import Pki
from tests.support import Runtime, run_spiced, write_pod
from tests.tlsprobe import file_settings, replace_atomically, wait_for


def front_pids(rt: Runtime) -> list[int]:
    return [child.pid for child in psutil.Process(rt.proc.pid).children()
            if "spiced.flight.front_process" in child.cmdline()]


def alive(pid: int) -> bool:
    """Whether any thread of `pid` still runs. A killed process's main thread can show as a zombie
    while its other threads are still exiting, and those still hold its sockets."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError):
            states.append(stat.read_text().rpartition(")")[2].split()[0])
    return any(state not in ("Z", "X") for state in states)


def select_1(rt: Runtime, pki: Pki, **cert: bytes) -> list[dict[str, int]]:
    with fl.FlightClient(rt.flight_uri.replace("127.0.0.1", "localhost"), tls_root_certs=pki.ca.cert_pem,
                         **cert) as c:
        rows: list[dict[str, int]] = c.do_get(fl.Ticket(b"SELECT 1"),
                                              fl.FlightCallOptions(timeout=10)).read_all().to_pylist()
        return rows


def accepted(rt: Runtime, pki: Pki, **cert: bytes) -> bool:
    try:
        return select_1(rt, pki, **cert) == [{"Int64(1)": 1}]
    except fl.FlightUnavailableError:
        return False


def tls_args(pki: Pki, *extra: str) -> list[str]:
    return ["--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
            "--tls-key-file", str(pki.server.key), *extra]


def test_every_new_connection_reaches_its_first_call_with_its_identity(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The identity crosses from the front process before the call needs it: fresh connections,
    one call each, identified and anonymous in turn, are each counted and logged correctly."""
    caplog.set_level(logging.DEBUG, logger="runtime.flight")
    b = mtls_backend(tmp_path)
    pki, metrics = b.pki, b.metrics
    front = FlightFrontProcess(b.listener, b.sock_path, b.manager, metrics)
    uri = f"grpc+tls://localhost:{b.listener.getsockname()[1]}"
    with serving(b.state, f"grpc+unix://{b.sock_path}", identities=front.identity_for):
        front.start()
        try:
            for _ in range(8):
                with fl.FlightClient(uri, tls_root_certs=pki.ca.cert_pem, cert_chain=pki.client.cert_pem,
                                     private_key=pki.client.key_pem) as identified:
                    assert identified.do_get(fl.Ticket(b"SELECT 1")).read_all().num_rows == 1
                with fl.FlightClient(uri, tls_root_certs=pki.ca.cert_pem) as anonymous:
                    assert anonymous.do_get(fl.Ticket(b"SELECT 1")).read_all().num_rows == 1
        finally:
            front.stop_accepting()
            front.stop(1.0)
    assert value(metrics, "client_cert_requests") == 8
    assert value(metrics, "client_cert_absent_requests") == 8
    subject = f'"{pki.client.certificate.subject.rfc4514_string()}"'
    calls = [r.fields for r in caplog.records if r.getMessage() == "Flight call"]  # type: ignore[attr-defined]
    assert [c.get("client_subject") for c in calls] == [subject, None] * 8
    assert front._peers == {}  # every closed connection was forgotten


def test_a_call_waits_for_the_word_on_its_connection_but_only_for_front_peers(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    manager = TlsManager.create(file_settings(pki, pki.server.cert, pki.server.key), Metrics())
    front = FlightFrontProcess(socket.socket(), str(tmp_path / "none.sock"), manager, Metrics())
    identity = ClientIdentity.from_der(pki.client.certificate.public_bytes(Encoding.DER))
    peer = PEER_PREFIX + "1-1"
    threading.Timer(0.3, front._connected, (peer, identity)).start()
    t0 = time.monotonic()
    assert front.identity_for(peer) == identity
    assert time.monotonic() - t0 >= 0.25  # it waited for the announcement rather than answer "anonymous"
    t0 = time.monotonic()
    assert front.identity_for("ipv4:127.0.0.1:50000") is None
    assert front.identity_for(PEER_PREFIX + "1-2") is None  # never announced: anonymous after the bound
    assert time.monotonic() - t0 < 2.0


def restarts(rt: Runtime, pki: Pki) -> dict[str, float]:
    """runtime_flight_tls_front_restarts_total by reason, from the real /metrics."""
    text = httpx.get(rt.http_url + "/metrics", verify=ssl.create_default_context(cafile=str(pki.ca.cert)),
                     timeout=5).text
    return {s.labels["reason"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "runtime_flight_tls_front_restarts" for s in family.samples if s.name.endswith("_total")}


def watch_readiness(rt: Runtime, pki: Pki, stop: threading.Event, seen: set[int]) -> None:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca.cert)), timeout=2) as client:
        while not stop.is_set():
            seen.add(client.get(rt.http_url + "/v1/ready").status_code)
            time.sleep(0.05)


@pytest.mark.parametrize("how", ["killed", "wedged"])
def test_a_front_that_dies_or_wedges_is_started_again_counted_and_not_ready_meanwhile(tmp_path: Path, how: str) -> None:
    """SIGKILL ends the front; SIGSTOP leaves it alive but silent, as a wedged event loop would be.
    Either way the supervisor starts a new front, logs one WARN line, counts it, and /v1/ready
    answers 503 while no front serves."""
    pki = Pki.create(tmp_path / "pki")
    with run_spiced(write_pod(tmp_path / "pod"), *tls_args(pki)) as rt:
        [first] = front_pids(rt)
        assert select_1(rt, pki) == [{"Int64(1)": 1}]
        seen: set[int] = set()
        stop = threading.Event()
        watcher = threading.Thread(target=watch_readiness, args=(rt, pki, stop, seen))
        watcher.start()
        try:
            os.kill(first, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
            line = rt.wait_for_log(r"The Flight TLS front (exited|has not answered)", timeout=10)
            wait_for(lambda: [p for p in front_pids(rt) if p != first and alive(p)], timeout=10)
            wait_for(lambda: accepted(rt, pki), timeout=10)
            wait_for(lambda: 200 in seen and 503 in seen, timeout=5)
        finally:
            stop.set()
            watcher.join()
        assert " WARN " in line
        if how == "killed":
            assert line.endswith("The Flight TLS front exited with code -9; starting it again")
        else:
            assert re.search(r"has not answered for \d\.\d s; killed it; starting it again$", line)
        assert not alive(first)
        assert restarts(rt, pki) == {"exited" if how == "killed" else "unresponsive": 1.0}
        [second] = front_pids(rt)
        assert second != first
        assert rt.proc.poll() is None


def test_sigterm_ends_the_whole_tree_in_bounded_time_with_a_wedged_front_and_clients_connected(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    with run_spiced(write_pod(tmp_path / "pod"), *tls_args(pki)) as rt:
        [front] = front_pids(rt)
        idle = fl.FlightClient(rt.flight_uri.replace("127.0.0.1", "localhost"), tls_root_certs=pki.ca.cert_pem)
        stalled = fl.FlightClient(rt.flight_uri.replace("127.0.0.1", "localhost"), tls_root_certs=pki.ca.cert_pem)
        try:
            idle.do_get(fl.Ticket(b"SELECT 1")).read_all()
            reader = stalled.do_get(fl.Ticket(b"SELECT * FROM generate_series(1, 20000000)"))
            reader.read_chunk()  # then never reads again
            os.kill(front, signal.SIGSTOP)
            start = time.monotonic()
            assert rt.stop(timeout=DRAIN_SECONDS + 10) == 0
            took = time.monotonic() - start
            wait_for(lambda: not alive(front), timeout=5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(front, signal.SIGKILL)
            idle.close()
            stalled.close()
        assert took < DRAIN_SECONDS + 5, took
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", rt.flight_port), timeout=2).close()


def test_the_front_ignores_signals_meant_for_the_runtime(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the whole process group; only the runtime decides to stop."""
    pki = Pki.create(tmp_path / "pki")
    with run_spiced(write_pod(tmp_path / "pod"), *tls_args(pki)) as rt:
        [front] = front_pids(rt)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(front, sig)
        time.sleep(0.3)
        assert alive(front) and select_1(rt, pki) == [{"Int64(1)": 1}]
        assert rt.stop() == 0
        assert not alive(front)


@pytest.mark.parametrize("front_state", ["running", "stopped"])
def test_the_front_ends_with_the_runtime_even_when_it_is_killed(tmp_path: Path, front_state: str) -> None:
    """A stopped front cannot read the end of its control channel: only the parent-death signal
    (SIGKILL, delivered even to a stopped process) ends it."""
    pki = Pki.create(tmp_path / "pki")
    with run_spiced(write_pod(tmp_path / "pod"), *tls_args(pki)) as rt:
        [front] = front_pids(rt)
        if front_state == "stopped":
            os.kill(front, signal.SIGSTOP)
        rt.proc.kill()
        rt.proc.wait()
        wait_for(lambda: not alive(front), timeout=5)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", rt.flight_port), timeout=2).close()


def test_a_client_ca_rotation_reaches_the_front(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    bundle = tmp_path / "clients.pem"
    bundle.write_bytes(pki.client_ca.cert_pem)
    args = tls_args(pki, "--tls-client-auth-mode", "required", "--tls-client-auth-ca-file", str(bundle))
    old = {"cert_chain": pki.client.cert_pem, "private_key": pki.client.key_pem}
    new = {"cert_chain": pki.foreign_client.cert_pem, "private_key": pki.foreign_client.key_pem}
    with run_spiced(write_pod(tmp_path / "pod"), *args) as rt:
        assert select_1(rt, pki, **old) == [{"Int64(1)": 1}]
        with pytest.raises(fl.FlightUnavailableError):
            select_1(rt, pki, **new)
        replace_atomically(bundle, pki.foreign_ca.cert_pem)
        rt.wait_for_log("TLS reload: swapped client CA bundle")
        wait_for(lambda: accepted(rt, pki, **new), timeout=2)  # the front hears of it right after the log line
        with pytest.raises(fl.FlightUnavailableError):
            select_1(rt, pki, **old)

"""The Flight TLS front survives every way a TLS peer can leave or misbehave.

Real `spiced` runtimes (client auth `none` and `required`), real TLS clients on 127.0.0.1: Python's
ssl on memory BIOs over raw sockets, so that every close_notify, FIN, reset and record fragment is
sent exactly when the test says (tests/rawtls.py), `openssl s_client` for renegotiation and key
updates, and pyarrow for a client that stops reading. Every case ends with `FrontHealth.check`: a
fresh client is served, the front is idle, its descriptors and memory came back.

A front that spins (the close_notify bug: `SSLObject.read` returns b"" after close_notify, forever)
is reported as such within seconds rather than after the health check's 10 s call timeout, and is
killed after the test (the runtime starts another) so that the next test starts clean and a
runaway front cannot eat the machine's memory.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.flight as fl
import pytest

from tests.front_health import FrontHealth, front_process, served
from tests.pki import Pki
from tests.rawtls import (
    EMPTY_SETTINGS,
    H2_PREFACE,
    GrpcDoGet,
    RawTls,
    SClient,
    client_hello,
    ping_ack_frame,
    ping_frame,
    wait_closed,
)
from tests.support import Runtime, run_spiced, write_pod
from tests.tlsprobe import client_context, wait_for

ROUNDS = 5  # each cheap case runs this many times before the health check, so a per-connection leak shows
CLOSE_WITHIN = 5.0  # how long the front may take to end a connection its peer has left
HANDSHAKE_WITHIN = 3.0
BIG_SQL = b"SELECT repeat('x', 1000) FROM generate_series(1, 200000)"  # ~190 MB of results
STALL_SECONDS = 3.0
STALL_RSS_BOUND = 64 * 1024 * 1024  # what the front may hold for a client that stopped reading
RUNAWAY_RSS = 768 * 1024 * 1024  # a front this far over its baseline is killed mid-test
SPIN_WINDOW = 0.3  # seconds over which a spinning front shows (a third of a core or more, on a busy machine)
SERVER_SETTINGS = b"\x04\x00\x00\x00\x00\x00"  # a SETTINGS frame's header after its length: type 4, no flags, stream 0

BOTH = pytest.mark.parametrize("target", ["none", "required"], indirect=True)
PLAIN = pytest.mark.parametrize("target", ["none"], indirect=True)


# ---------------------------------------------------------------------- runtimes and health


@dataclass
class Target:
    rt: Runtime
    pki: Pki
    mode: str

    @property
    def mtls(self) -> bool:
        return self.mode == "required"

    @property
    def port(self) -> int:
        return self.rt.flight_port

    def context(self, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        ctx = client_context(self.pki, self.pki.client if self.mtls else None, alpn=["h2"])
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        return ctx

    def s_client_args(self) -> list[str]:
        return ["-cert", str(self.pki.client.cert), "-key", str(self.pki.client.key)] if self.mtls else []


@pytest.fixture(scope="module")
def runtimes(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Target]]:
    """One runtime per client-auth mode, started when a test first asks for it. A front left wedged
    is killed before its runtime is stopped (the runtime would wait for it, be killed, and leave it
    spinning as an orphan), and any front still alive after the stop is killed too."""
    with ExitStack() as stack:
        made: dict[str, Target] = {}

        def get(mode: str) -> Target:
            if mode not in made:
                args = ["--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
                        "--tls-key-file", str(pki.server.key)]
                if mode == "required":
                    args += ["--tls-client-auth-mode", "required", "--tls-client-auth-ca-file", str(pki.client_ca.cert)]
                seen: list[psutil.Process] = []
                stack.callback(_kill_all, seen)  # runs after the runtime's stop
                rt = stack.enter_context(run_spiced(write_pod(tmp_path_factory.mktemp(f"pod-{mode}")), *args))
                made[mode] = target = Target(rt, pki, mode)
                stack.callback(_before_stop, target, seen)
            return made[mode]

        yield get


def _before_stop(target: Target, seen: list[psutil.Process]) -> None:
    seen.extend(_fronts(target.rt))
    for proc in seen:
        if _wedged(target, proc):
            _kill_all([proc])


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            if proc.is_running():  # psutil checks the pid was not reused
                proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def target(request: pytest.FixtureRequest, runtimes: Callable[[str], Target]) -> Target:
    return runtimes(request.param)


def _fronts(rt: Runtime) -> list[psutil.Process]:
    try:
        children = psutil.Process(rt.proc.pid).children()
    except psutil.NoSuchProcess:
        return []
    fronts = []
    for child in children:
        try:
            if "spiced.flight.front_process" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                fronts.append(child)
        except psutil.NoSuchProcess:
            continue
    return fronts


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _answers(target: Target, timeout: float = 2.0) -> bool:
    try:
        RawTls.connect(target.port, target.context(), timeout=timeout).sock.close()
        return True
    except (OSError, ssl.SSLError):
        return False


def _wedged(target: Target, proc: psutil.Process) -> bool:
    """Spinning (a third of a core or more while nobody talks to it) or not answering handshakes."""
    try:
        before = _cpu(proc)
        time.sleep(SPIN_WINDOW)
        return _cpu(proc) - before > SPIN_WINDOW / 3 or not _answers(target)
    except psutil.NoSuchProcess:
        return False


class RunawayGuard:
    """Kills the front should its RSS run away mid-test (a spinning front grows ~25 MB/s)."""

    def __init__(self, pid: int, baseline: int) -> None:
        self.pid, self.baseline, self.killed = pid, baseline, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="runaway-guard", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            try:
                if psutil.Process(self.pid).memory_info().rss > self.baseline + RUNAWAY_RSS:
                    os.kill(self.pid, signal.SIGKILL)
                    self.killed = True
                    return
            except psutil.NoSuchProcess:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _put_down_if_wedged(target: Target, pid: int) -> None:
    """After each test: a front left wedged is killed, and the runtime's next one awaited."""
    proc: psutil.Process | None
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        proc = None
    if proc is not None:
        if not _wedged(target, proc):
            return
        _kill_all([proc])
    wait_for(lambda: front_process(target.rt).pid != pid, timeout=15, interval=0.1)

    def serves() -> bool:
        try:
            served(target.rt, target.pki, client_cert=target.mtls)
            return True
        except fl.FlightError:
            return False

    wait_for(serves, timeout=15, interval=0.2)


@pytest.fixture
def health(target: Target) -> Iterator[FrontHealth]:
    baseline = FrontHealth.of(target.rt, target.pki, client_cert=target.mtls)
    guard = RunawayGuard(baseline.pid, baseline.rss)
    try:
        yield baseline
    finally:
        guard.stop()
        _put_down_if_wedged(target, baseline.pid)
    assert not guard.killed, "the front's memory ran away: it was killed"


def healthy(target: Target, health: FrontHealth, what: str) -> None:
    """`health.check`, after a quick handshake (a wedged front is reported at once with its CPU use,
    rather than by the check's call after its 10 s timeout)."""
    connect(target).sock.close()
    health.check(what)


def _diagnosis(proc: psutil.Process, cpu_before: float, elapsed: float) -> str:
    try:
        spent = _cpu(proc) - cpu_before
        rss = proc.memory_info().rss
    except psutil.NoSuchProcess:
        return "the front process is gone"
    verdict = " - it is spinning" if spent > elapsed / 4 else ""
    return f"the front spent {spent:.1f} CPU-s in those {elapsed:.1f} s, RSS now {rss >> 20} MiB{verdict}"


def connect(target: Target, version: ssl.TLSVersion | None = None) -> RawTls:
    """A handshaken raw TLS client; a front that does not answer is reported with its CPU use."""
    proc = front_process(target.rt)
    before, t0 = _cpu(proc), time.monotonic()
    try:
        return RawTls.connect(target.port, target.context(version), timeout=HANDSHAKE_WITHIN)
    except (OSError, ssl.SSLError) as e:
        raise AssertionError(f"no TLS handshake within {HANDSHAKE_WITHIN:.0f} s ({e!r}); "
                             f"{_diagnosis(proc, before, time.monotonic() - t0)}") from e


def front_closes(target: Target, sock: socket.socket, what: str, timeout: float = CLOSE_WITHIN) -> bytes:
    """Wait for the front to close its side of `sock` (FIN or RST); the raw bytes it sent first."""
    proc = front_process(target.rt)
    before, t0 = _cpu(proc), time.monotonic()
    try:
        return wait_closed(sock, timeout)
    except AssertionError:
        raise AssertionError(f"the front kept the connection open {timeout:.0f} s after {what}; "
                             f"{_diagnosis(proc, before, time.monotonic() - t0)}") from None


def one_call(conn: RawTls) -> GrpcDoGet:
    """A real Flight DoGet over `conn`, answered in full; the HTTP/2 connection stays open."""
    grpc = GrpcDoGet(conn.send, conn.recv)
    assert grpc.call(b"SELECT 1 AS one").to_pylist() == [{"one": 1}]
    return grpc


def shut_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the front already reset it


# ---------------------------------------------------------------------- 1, 2: close_notify


@BOTH
def test_close_notify_then_fin_leaves_the_front_idle(target: Target, health: FrontHealth) -> None:
    """A client that ends like a polite TLS client after a call: close_notify, then FIN and close
    (the FIN by shutdown, as close alone would send an RST should a frame of the server's be unread)."""
    for _ in range(ROUNDS):
        with connect(target) as conn:
            one_call(conn)
            conn.send_close_notify()
            conn.sock.shutdown(socket.SHUT_WR)
    healthy(target, health, "close_notify + FIN")


@BOTH
def test_close_notify_with_the_socket_left_open_is_ended_by_the_front(target: Target, health: FrontHealth) -> None:
    """close_notify and nothing more: the front must end the connection itself, without spinning
    meanwhile, and stay healthy while the client still holds its socket."""
    for _ in range(ROUNDS):
        with connect(target) as conn:
            one_call(conn)
            conn.send_close_notify()
            front_closes(target, conn.sock, "the client's close_notify (socket left open)")
    with connect(target) as conn:  # health checked while this one is left open after close_notify
        one_call(conn)
        conn.send_close_notify()
        healthy(target, health, "close_notify with the socket left open")
        front_closes(target, conn.sock, "the client's close_notify (socket left open)")


@PLAIN
def test_close_notify_is_answered_with_close_notify(target: Target, health: FrontHealth) -> None:
    """A clean closure both ways (RFC 8446 6.1): the front's last record is its own close_notify,
    so the client can tell the end of the connection from a truncation."""
    with connect(target) as conn:
        one_call(conn)
        conn.send_close_notify()
        conn.incoming.write(front_closes(target, conn.sock, "the client's close_notify"))
        conn.incoming.write_eof()
        assert _ending(conn) == "close_notify"
    healthy(target, health, "an answered close_notify")


def _ending(conn: RawTls) -> str:
    """How the records the server sent end (whatever application data came first is skipped)."""
    while True:
        try:
            if not conn.tls.read(65536):
                return "close_notify"
        except ssl.SSLZeroReturnError:
            return "close_notify"
        except ssl.SSLEOFError:
            return "a FIN without close_notify"
        except ssl.SSLError as e:
            return f"an error: {e}"


# ---------------------------------------------------------------------- 3: FIN without close_notify


@BOTH
@pytest.mark.parametrize("when", ["after_handshake", "after_call"])
def test_fin_without_close_notify_is_ended_by_the_front(target: Target, health: FrontHealth, when: str) -> None:
    """A FIN under the TLS layer with no close_notify (a crashed or careless client), seen with a
    shutdown so that the front's own close can be watched: the front ends the connection."""
    for _ in range(ROUNDS):
        with connect(target) as conn:
            if when == "after_call":
                one_call(conn)
            conn.sock.shutdown(socket.SHUT_WR)
            front_closes(target, conn.sock, f"a FIN without close_notify ({when})")
    healthy(target, health, f"FIN without close_notify {when}")


# ---------------------------------------------------------------------- 4: RST


@BOTH
@pytest.mark.parametrize("when", ["after_handshake", "after_settings", "mid_stream"])
def test_rst_leaves_nothing_behind(target: Target, health: FrontHealth, when: str) -> None:
    """An RST right after the handshake, after the HTTP/2 SETTINGS exchange, and in the middle of a
    ~190 MB DoGet the backend is still streaming through the front."""
    for _ in range(ROUNDS if when != "mid_stream" else 2):
        conn = connect(target)
        try:
            if when == "after_settings":
                conn.send(H2_PREFACE + EMPTY_SETTINGS)
                conn.recv_until(SERVER_SETTINGS)
            elif when == "mid_stream":
                grpc = GrpcDoGet(conn.send, conn.recv)
                grpc.start(BIG_SQL)
                while grpc.received < 1024 * 1024:
                    grpc.pump(10)
        finally:
            conn.reset()
    healthy(target, health, f"an RST {when}")


# ---------------------------------------------------------------------- 5: half-close


@PLAIN
def test_tcp_half_close_after_preface_bytes_is_ended_by_the_front(target: Target, health: FrontHealth) -> None:
    """Part of the HTTP/2 preface, then a TCP half-close without close_notify: the front ends the
    connection (TLS cannot carry a half-close to gRPC) rather than keep it half-open."""
    for _ in range(ROUNDS):
        with connect(target) as conn:
            conn.send(H2_PREFACE[:10])
            conn.sock.shutdown(socket.SHUT_WR)
            front_closes(target, conn.sock, "preface bytes and a TCP half-close")
    healthy(target, health, "a TCP half-close")


@PLAIN
def test_tls_half_close_mid_connection_is_ended_by_the_front(target: Target, health: FrontHealth) -> None:
    """The HTTP/2 connection is up (SETTINGS both ways), then close_notify while the client keeps
    reading: the front ends the connection."""
    for _ in range(ROUNDS):
        with connect(target) as conn:
            conn.send(H2_PREFACE + EMPTY_SETTINGS)
            conn.recv_until(SERVER_SETTINGS)
            conn.send_close_notify()
            front_closes(target, conn.sock, "close_notify mid-connection, the client still reading")
    healthy(target, health, "a TLS half-close")


# ---------------------------------------------------------------------- 6: mid-handshake


@BOTH
def test_disconnect_mid_client_hello_is_noticed_at_once(target: Target, health: FrontHealth) -> None:
    """Half a real ClientHello, then FIN: the front lets go at the FIN, not at its handshake timeout."""
    hello = client_hello(target.context())
    for _ in range(ROUNDS):
        with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
            sock.sendall(hello[:len(hello) // 2])
            shut_write(sock)
            front_closes(target, sock, "half a ClientHello and a FIN")
    healthy(target, health, "a disconnect mid-ClientHello")


@PLAIN
def test_connect_and_close_with_nothing_sent_leaves_nothing_behind(target: Target, health: FrontHealth) -> None:
    """A port scan: connect, send nothing, leave (watched by a shutdown first, then plain closes)."""
    for _ in range(ROUNDS):
        with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
            shut_write(sock)
            front_closes(target, sock, "a connection closed with nothing sent")
    for _ in range(ROUNDS):
        socket.create_connection(("127.0.0.1", target.port), timeout=5).close()
    healthy(target, health, "connect-and-close")


# ---------------------------------------------------------------------- 7: mid-record


@PLAIN
@pytest.mark.parametrize("cut", ["in_the_header", "after_the_header", "in_the_body"])
def test_disconnect_mid_record_is_noticed_at_once(target: Target, health: FrontHealth, cut: str) -> None:
    """After the handshake, part of a real application-data record, then FIN: the front ends the
    connection at the FIN instead of waiting for the rest of the record."""
    for _ in range(ROUNDS):
        with connect(target) as conn:
            record = conn.seal(b"x" * 1000)  # one application-data record, ~1 KB
            upto = {"in_the_header": 3, "after_the_header": 5, "in_the_body": len(record) // 2}[cut]
            conn.sock.sendall(record[:upto])
            conn.sock.shutdown(socket.SHUT_WR)
            front_closes(target, conn.sock, f"a record cut {cut} and a FIN")
    healthy(target, health, f"a disconnect mid-record ({cut})")


# ---------------------------------------------------------------------- 8: garbage


GARBAGE = {
    "http_request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "random_64k": b"\x42" + random.Random(20240607).randbytes(64 * 1024 - 1),  # 0x42: no TLS content type
}


@PLAIN
@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_before_the_handshake_is_refused_at_once(target: Target, health: FrontHealth, kind: str) -> None:
    """Not TLS at all: the front closes the connection on its own (an alert at most), without
    waiting for more bytes or for its handshake timeout."""
    for _ in range(ROUNDS):
        with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
            try:
                sock.sendall(GARBAGE[kind])
            except OSError:
                pass  # the front already refused it and reset the connection
            reply = front_closes(target, sock, f"{kind} instead of a ClientHello")
            assert not reply or reply[0] == 0x15, f"the front answered garbage with {reply[:40]!r}, not an alert"
    healthy(target, health, f"garbage before the handshake ({kind})")


@BOTH
def test_garbage_after_the_handshake_ends_the_connection(target: Target, health: FrontHealth) -> None:
    """Random bytes where records belong (after a call, with the backend connected)."""
    noise = random.Random(7).randbytes(4096)
    for _ in range(ROUNDS):
        with connect(target) as conn:
            one_call(conn)
            try:
                conn.sock.sendall(noise)
            except OSError:
                pass
            front_closes(target, conn.sock, "garbage in the record layer")
    healthy(target, health, "garbage after the handshake")


# ---------------------------------------------------------------------- 9: TLS versions


VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@BOTH
@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_each_tls_version_serves_a_grpc_call_over_openssl(target: Target, health: FrontHealth, version: str) -> None:
    """`openssl s_client -tls1_x -alpn h2` negotiates that version and carries a whole DoGet (the
    HTTP/2 frames written to its stdin, the answer read from its stdout); it ends killed, i.e.
    with a FIN and no close_notify."""
    flag = "-tls1_2" if version == "1.2" else "-tls1_3"
    with SClient(target.port, target.pki.ca.cert, flag, "-brief", *target.s_client_args()) as s:
        s.wait_err("Ciphersuite: ")  # -brief's summary, the line after the version
        assert f"Protocol version: TLSv{version}\n" in s.err, s.err
        grpc = GrpcDoGet(s.write, s.recv)  # only an h2 server answers this: ALPN chose h2
        assert grpc.call(b"SELECT 1 AS one").to_pylist() == [{"one": 1}]
    healthy(target, health, f"a TLS {version} call over s_client")


@PLAIN
@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_each_tls_version_serves_a_grpc_call_and_closes_cleanly_over_python_ssl(
        target: Target, health: FrontHealth, version: str) -> None:
    """A Python client pinned to the version: a whole DoGet, then close_notify (what `unwrap()`
    sends) and the front ends the connection."""
    for _ in range(ROUNDS):
        with connect(target, VERSIONS[version]) as conn:
            assert conn.tls.version() == f"TLSv{version}"
            assert conn.tls.selected_alpn_protocol() == "h2"
            one_call(conn)
            conn.send_close_notify()
            front_closes(target, conn.sock, f"close_notify on TLS {version}")
    healthy(target, health, f"a TLS {version} call and close_notify")


# ---------------------------------------------------------------------- 10, 11: renegotiation, key update


@BOTH
def test_renegotiation_is_refused(target: Target, health: FrontHealth, tmp_path: Path) -> None:
    """`s_client -tls1_2` asked to renegotiate ("R") on an established connection: the server sends
    no second ServerHello (it answers no_renegotiation, or the connection ends)."""
    msgs = tmp_path / "msg.txt"
    with SClient(target.port, target.pki.ca.cert, "-tls1_2", "-brief", *target.s_client_args(), msgfile=msgs) as s:
        s.wait(lambda: len(s.out) >= 9, 5, "HTTP/2 SETTINGS from the server")  # the connection is up
        s.command("R")
        s.wait_err("RENEGOTIATING")
        s.wait(lambda: s.proc.poll() is not None or "no_renegotiation" in s.messages(), 5,
               "refusal of the renegotiation (an alert or the end of the connection)")
        time.sleep(0.2)  # a second ServerHello, were the server to answer, would be in by now
        trace = s.messages()
    server_hellos = [line for line in trace.splitlines() if line.startswith("<<<") and "ServerHello" in line
                     and "ServerHelloDone" not in line]
    assert len(server_hellos) == 1, f"the server answered the renegotiation:\n{trace}"
    healthy(target, health, "a refused renegotiation")


@BOTH
def test_key_update_keeps_the_connection_usable(target: Target, health: FrontHealth, tmp_path: Path) -> None:
    """TLS 1.3 KeyUpdate with update_requested ("K": the front must answer with its own) and without
    ("k"); after each, an HTTP/2 PING crosses the front and gRPC's PING ACK comes back."""
    msgs = tmp_path / "msg.txt"
    with SClient(target.port, target.pki.ca.cert, "-tls1_3", "-brief", *target.s_client_args(), msgfile=msgs) as s:
        s.wait(lambda: len(s.out) >= 9, 5, "HTTP/2 SETTINGS from the server")
        s.command("K")
        s.wait_err("KEYUPDATE")
        s.write(H2_PREFACE + EMPTY_SETTINGS + ping_frame(b"update:K"))
        s.wait_out(ping_ack_frame(b"update:K"))
        received = [line for line in s.messages().splitlines() if line.startswith("<<<") and "KeyUpdate" in line]
        assert received, "the front did not answer a KeyUpdate that requested one"
        s.command("k")
        s.wait(lambda: s.err.count("KEYUPDATE") == 2, 5, "the second KEYUPDATE")
        s.write(ping_frame(b"update:k"))
        s.wait_out(ping_ack_frame(b"update:k"))
        assert s.proc.poll() is None, s.err
    healthy(target, health, "two key updates")


# ---------------------------------------------------------------------- 12: a client that stops reading


def _stall_a_big_doget(target: Target) -> int:
    """Start a ~190 MB DoGet with pyarrow, read one batch, then nothing for STALL_SECONDS while a
    fresh client is served; the front's peak RSS meanwhile. The reader is gone when this returns
    (it keeps the connection open even after `client.close()`)."""
    proc = front_process(target.rt)
    client = fl.FlightClient(target.rt.flight_uri, tls_root_certs=target.pki.ca.cert_pem)
    try:
        reader = client.do_get(fl.Ticket(BIG_SQL), fl.FlightCallOptions(timeout=60))
        assert reader.read_chunk().data.num_rows > 0
        peak, t0, fresh_served = 0, time.monotonic(), False
        while time.monotonic() - t0 < STALL_SECONDS:
            peak = max(peak, proc.memory_info().rss)
            if not fresh_served and time.monotonic() - t0 > 1.0:
                served(target.rt, target.pki)  # a fresh client, while the stalled one holds its stream
                fresh_served = True
            time.sleep(0.05)
        reader.cancel()
        return peak
    finally:
        client.close()


@PLAIN
def test_a_client_that_stops_reading_is_held_back_in_the_socket_not_in_the_front(
        target: Target, health: FrontHealth) -> None:
    """A ~190 MB DoGet whose client reads one batch and then nothing for 3 s: the front applies
    backpressure (the rest waits in gRPC and the sockets, not in the front's memory) and serves a
    fresh client meanwhile."""
    grown = _stall_a_big_doget(target) - health.rss
    assert grown < STALL_RSS_BOUND, f"the front's RSS grew by {grown >> 20} MiB for a client that stopped reading"
    healthy(target, health, "a client that stopped reading, then closed")


@PLAIN
def test_a_raw_client_that_opens_its_window_and_stops_reading_is_held_back_by_the_front(
        target: Target, health: FrontHealth) -> None:
    """Backpressure in the front itself: the client grants gRPC 2 GiB of HTTP/2 window, so gRPC may
    send the whole ~190 MB at once, and then stops reading its socket (a small receive buffer).
    The front must stop reading the backend while the client's socket is full, not buffer it."""
    proc = front_process(target.rt)
    conn = RawTls.connect(target.port, target.context(), timeout=HANDSHAKE_WITHIN, rcvbuf=64 * 1024)
    try:
        grpc = GrpcDoGet(conn.send, conn.recv, open_window=True)
        grpc.start(BIG_SQL)
        while grpc.received < 1024 * 1024:  # the stream flows
            grpc.pump(10)
        peak, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < STALL_SECONDS:  # not a byte read meanwhile
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.05)
        served(target.rt, target.pki)  # a fresh client, while the stalled one fills its pipe
        peak = max(peak, proc.memory_info().rss)
    finally:
        conn.reset()
    grown = peak - health.rss
    assert grown < STALL_RSS_BOUND, f"the front's RSS grew by {grown >> 20} MiB for a client that stopped reading"
    healthy(target, health, "a raw client that opened its window and stopped reading")

"""Slow and withholding HTTP/2 clients against the real runtime over TLS (ALPN "h2"), framed by hand
with the `h2` library: they cannot hold the HTTP listener.

tests/test_fuzz_http.py does this for HTTP/1.1. Over h2 a connection is not a request: one client
can open streams and leave them unfinished, send only control frames (PING, SETTINGS), trickle a
header block in CONTINUATION frames, or stop reading a large result. The server bounds that are
checked here (spiced/http/hypercorn_patches.py, spiced/http/body.py):

  * a connection with no request in progress is closed after the keep-alive timeout (15 s), however
    busy the client keeps it with frames that are not requests (seen at 15.0 s);
  * a request body that does not arrive within BODY_SECONDS (10 s) is answered 408 (at 10.0 s),
    and the connection is then closed by the keep-alive timeout, body still trickling or not;
  * a connection the server closes is also released by it (its socket closed) about a second
    later, though the client never answers TLS close_notify: measured on the server's own sockets
    (/proc), not only as the client's end of stream (Hypercorn alone held them 30 s more);
  * a client that stops reading its responses costs bounded memory (one encoded batch, a few MB,
    a stream), delays nobody else, and does not hold the process past the drain bound (10 s) on
    SIGTERM.

Everything slow is opened at once when the module starts (the `swarm` fixture) and watched by one
thread, while another thread keeps asking the server for quick answers over h2; the tests then
check what was recorded. The module takes about 50 s: 27 s for the swarm, about 20 s for the
client-that-stops-reading test on its own runtime.
"""

from __future__ import annotations

import select
import signal
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import httpx
import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame

from spiced.http.body import BODY_SECONDS
from spiced.http.server import make_config
from spiced.runtime import DRAIN_SECONDS
from tests.pki import Pki
from tests.support import Runtime, rss_bytes, run_spiced, server_peers, write_pod

KEEP_ALIVE = float(make_config(None).keep_alive_timeout)  # 15 s
MARGIN = 5.0
IDLE_BOUND = KEEP_ALIVE + MARGIN  # 20 s: a connection without a request in progress
ANSWER_BOUND = BODY_SECONDS + 3.0  # 13 s: a stream whose body never (fully) arrives gets its 408
CONNECTION_BOUND = BODY_SECONDS + KEEP_ALIVE + MARGIN  # 30 s: 408, then idle, then closed
QUICK = 1.5  # every answer to the well-behaved client, in seconds
MIB = 1024 * 1024

SPICEPOD = """version: v1
kind: Spicepod
name: slowloris-h2
datasets:
  - from: file:trips.csv
    name: trips
    acceleration:
      enabled: true
"""
BIG_SQL = "SELECT value, value * 2 AS twice FROM generate_series(1, 2000000)"  # about 70 MB as JSON


@contextmanager
def start(workdir: Path, pki: Pki) -> Iterator[Runtime]:
    with run_spiced(write_pod(workdir, SPICEPOD), "--tls-enabled", "true",
                    "--tls-certificate-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key)) as rt:
        yield rt


# ------------------------------------------------------------------------------ observing the server


def tls_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    ctx.set_alpn_protocols(["h2"])
    return ctx


# ------------------------------------------------------------------------------ hand-framed h2 clients


def request_headers(method: str, path: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [(":method", method), (":path", path), (":scheme", "https"), (":authority", "localhost"), *extra]


@dataclass
class Stream:
    opened: float
    status: int | None = None
    answered: float | None = None
    ended: float | None = None
    reset: float | None = None
    received: int = 0


@dataclass
class H2Client:
    """One TLS connection that negotiated h2. `tick` runs about once a second on the watcher thread
    (trickling); `preface` False leaves the connection preface to `tick` as well."""

    kind: str
    sock: ssl.SSLSocket
    conn: h2.connection.H2Connection
    opened: float
    port: int
    tick: Callable[[H2Client, int], None] | None = None
    ack_data: bool = True  # False: never return flow-control credit for received DATA
    raw: bool = False  # True: frames are written by hand; what `conn` would send (SETTINGS ACK) is dropped
    script: bytes = b""  # what `tick` trickles: the connection preface, or a header block
    trickled: list[int] = field(default_factory=list)  # streams whose body gets one more byte a second
    followup: int | None = None  # a request made later on the same connection
    streams: dict[int, Stream] = field(default_factory=dict)
    out: bytearray = field(default_factory=bytearray)
    closed: float | None = None  # the client saw the end of the connection (close_notify, FIN or reset)
    released: float | None = None  # the server no longer holds the connection's socket
    goaway: float | None = None
    protocol_error: str | None = None

    @classmethod
    def open(cls, rt: Runtime, ctx: ssl.SSLContext, kind: str, *, preface: bool = True,
             window: int | None = None) -> H2Client:
        raw = socket.create_connection(("127.0.0.1", rt.http_port), timeout=10)
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        if window is not None:
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        client = cls(kind, sock, conn, time.monotonic(), sock.getsockname()[1])
        if preface:
            client.flush()
        return client

    def request(self, method: str, path: str, *extra: tuple[str, str], body: bytes | None = None,
                end: bool = False) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, request_headers(method, path, *extra), end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.streams[sid] = Stream(time.monotonic())
        self.flush()
        return sid

    def flush(self, data: bytes = b"") -> None:
        generated = self.conn.data_to_send()
        self.out += data if self.raw else generated + data
        while self.out and self.closed is None:
            try:
                sent = self.sock.send(self.out)
            except (TimeoutError, ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except (OSError, ssl.SSLError):
                self.closed = self.closed or time.monotonic()
                return
            del self.out[:sent]

    def read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return  # a TLS record without application data (a session ticket)
        except (OSError, ssl.SSLError):
            data = b""
        now = time.monotonic()
        if not data:
            self.closed = now
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self.protocol_error = self.protocol_error or repr(e)
            return
        for event in events:
            stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived) and stream is not None:
                headers: dict[Any, Any] = dict(event.headers)  # str: header_encoding is set
                stream.status = int(headers[":status"])
                stream.answered = now
            elif isinstance(event, h2.events.DataReceived):
                if stream is not None:
                    stream.received += len(event.data)
                if self.ack_data and event.flow_controlled_length:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and stream is not None:
                stream.ended = now
            elif isinstance(event, h2.events.StreamReset) and stream is not None:
                stream.reset = now
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = now
        self.flush()

    def send_trickled_byte(self, sid: int) -> None:
        """One more byte of the body of stream `sid` (until the server resets it)."""
        try:
            self.conn.send_data(sid, b" ")
        except h2.exceptions.ProtocolError:  # StreamClosedError included: the server reset it
            return
        self.flush()

    @property
    def last_answer(self) -> float:
        """When the server last finished a stream of this connection (or the connection opened)."""
        return max([self.opened, *(t for s in self.streams.values() for t in (s.ended, s.reset) if t is not None)])


@dataclass
class Watcher:
    """Drives every hand-framed client from one thread: reads what the server sends, runs each
    client's `tick` once a second, and records when the server released each connection."""

    rt: Runtime
    clients: list[H2Client] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        for c in self.clients:
            c.sock.setblocking(False)
        self.thread = threading.Thread(target=self.run, name="h2-slow-clients", daemon=True)
        self.thread.start()

    def run(self) -> None:
        next_tick = time.monotonic()
        second = 0
        while not self.stop.is_set():
            reading = [c for c in self.clients if c.closed is None]
            if reading:
                readable, _, _ = select.select([c.sock for c in reading], [], [], 0.2)
                for c in reading:
                    if c.sock in readable or c.sock.pending():
                        c.read()
            else:
                time.sleep(0.2)
            now = time.monotonic()
            if now >= next_tick:
                next_tick += 1.0
                second += 1
                for c in self.clients:
                    if c.tick is not None and c.closed is None:
                        c.tick(c, second)
                    c.flush()
                held = server_peers(self.rt) if self.rt.proc.poll() is None else {}
                for c in self.clients:
                    if c.released is None and c.port not in held:
                        c.released = now
            if all(c.released is not None for c in self.clients):
                return

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
        for c in self.clients:
            c.sock.close()

    def of(self, *kinds: str) -> list[H2Client]:
        return [c for c in self.clients if c.kind in kinds]

    def wait(self, clients: list[H2Client], done: Callable[[H2Client], bool], until: float) -> None:
        while time.monotonic() < until and not all(done(c) for c in clients):
            time.sleep(0.2)


# ------------------------------------------------------------------------------ a well-behaved client


@dataclass
class Prober:
    """A normal client asking for quick answers over h2 while the slow clients are connected: one
    keep-alive connection, and one new connection (a full TLS handshake) for every fifth request."""

    rt: Runtime
    pki: Pki
    samples: list[tuple[float, str, int | str, float]] = field(default_factory=list)  # (at, what, status, secs)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="h2-prober", daemon=True)
        self.thread.start()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.rt.http_url.replace("127.0.0.1", "localhost"), http2=True,
                            verify=ssl.create_default_context(cafile=str(self.pki.ca.cert)), timeout=10)

    def ask(self, client: httpx.Client, what: str) -> None:
        started = time.monotonic()
        try:
            if what.endswith("/v1/sql"):
                r = client.post("/v1/sql", content=b"SELECT 1 AS one")
                ok = r.status_code == 200 and r.json() == [{"one": 1}]
            else:
                r = client.get("/health")
                ok = r.status_code == 200
            status: int | str = r.status_code if ok else f"{r.status_code} {r.text[:80]!r}"
            if r.http_version != "HTTP/2":
                status = f"not h2: {r.http_version}"
        except httpx.HTTPError as e:
            status = repr(e)
        self.samples.append((started, what, status, time.monotonic() - started))

    def run(self) -> None:
        with self.client() as keep:
            n = 0
            while not self.stop.is_set():
                n += 1
                self.ask(keep, "keep-alive POST /v1/sql")
                self.ask(keep, "keep-alive GET /health")
                if n % 5 == 0:
                    with self.client() as fresh:
                        self.ask(fresh, "new connection POST /v1/sql")
                self.stop.wait(0.1)

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(15)


# ------------------------------------------------------------------------------ the swarm


def trickle_preface(c: H2Client, second: int) -> None:
    c.flush(c.script[second - 1:second])


def ping(c: H2Client, second: int) -> None:
    c.conn.ping(b"%08d" % second)


def trickle_header_block(c: H2Client, second: int) -> None:
    if second == 1:
        c.flush(HeadersFrame(1, c.script[:1]).serialize())  # no END_HEADERS: a header block follows
    elif second <= len(c.script):
        c.flush(ContinuationFrame(1, c.script[second - 1:second]).serialize())  # never END_HEADERS


def trickle_bodies(c: H2Client, second: int) -> None:
    for sid in c.trickled:
        c.send_trickled_byte(sid)


def health_after_408(c: H2Client, second: int) -> None:
    trickle_bodies(c, second)
    if second == int(BODY_SECONDS) + 3 and c.followup is None:
        c.followup = c.request("GET", "/health", end=True)


@dataclass
class Swarm:
    rt: Runtime
    watcher: Watcher
    prober: Prober
    started: float


IDLE_KINDS = ("settings then silence", "pings only", "preface trickled", "no preface", "header block trickled")
BODY_KINDS = ("body withheld", "body withheld, no content-length", "body trickled", "body trickled, then a request")
CROWD = "crowd: three streams, bodies withheld or trickled"
CROWD_SIZE = 50


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Runtime]:
    with start(tmp_path_factory.mktemp("slowloris-h2"), pki) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def swarm(rt: Runtime, pki: Pki) -> Iterator[Swarm]:
    ctx = tls_context(pki)
    watcher = Watcher(rt)
    add = watcher.clients.append
    started = time.monotonic()
    for _ in range(3):
        # 1. Connections without a request in progress.
        add(H2Client.open(rt, ctx, "settings then silence"))
        c = H2Client.open(rt, ctx, "pings only")
        c.tick = ping
        add(c)
        c = H2Client.open(rt, ctx, "preface trickled", preface=False)
        c.raw = True
        c.script = c.conn.data_to_send()
        c.tick = trickle_preface
        add(c)
        c = H2Client.open(rt, ctx, "no preface", preface=False)
        c.raw = True  # the preface is prepared and never sent
        add(c)
        c = H2Client.open(rt, ctx, "header block trickled")
        c.raw = True  # nothing else may interrupt a header block, not even a SETTINGS ACK
        c.script = hpack.Encoder().encode(request_headers("POST", "/v1/sql", ("x-pad", "p" * 200)))
        c.tick = trickle_header_block
        add(c)
        # 2. A request whose body is withheld or trickled.
        c = H2Client.open(rt, ctx, "body withheld")
        c.request("POST", "/v1/sql", ("content-length", "100"), body=b"SELECT")
        add(c)
        c = H2Client.open(rt, ctx, "body withheld, no content-length")
        c.request("POST", "/v1/sql")
        add(c)
        for kind, tick in (("body trickled", trickle_bodies), ("body trickled, then a request", health_after_408)):
            c = H2Client.open(rt, ctx, kind)
            c.trickled = [c.request("POST", "/v1/sql", ("content-length", "100000"))]
            c.tick = tick
            add(c)
    # 3. Many connections, each with three unfinished streams.
    for _ in range(CROWD_SIZE):
        c = H2Client.open(rt, ctx, CROWD)
        c.request("POST", "/v1/sql", ("content-length", "100"), body=b"SELECT")
        c.request("POST", "/v1/sql")
        c.trickled = [c.request("POST", "/v1/sql", ("content-length", "100000"), body=b"SELECT")]
        c.tick = trickle_bodies
        add(c)
    watcher.start()
    prober = Prober(rt, pki)
    prober.start()
    yield Swarm(rt, watcher, prober, started)
    prober.finish()
    watcher.close()


def summary(clients: list[H2Client], what: Callable[[H2Client], float | None]) -> str:
    times = [t for t in (what(c) for c in clients) if t is not None]
    if not times:
        return "none"
    return f"{min(times):.1f}..{max(times):.1f} s (n={len(times)}/{len(clients)})"


# ------------------------------------------------------------------------------ 1. no request in progress


@pytest.mark.timeout(90)
def test_connections_without_a_request_are_closed_after_the_keep_alive_timeout(swarm: Swarm) -> None:
    idle = swarm.watcher.of(*IDLE_KINDS)
    swarm.watcher.wait(idle, lambda c: c.released is not None, swarm.started + IDLE_BOUND + 2)
    report = {kind: (summary(swarm.watcher.of(kind), lambda c: c.closed and c.closed - c.opened),
                     summary(swarm.watcher.of(kind), lambda c: c.released and c.released - c.opened))
              for kind in IDLE_KINDS}
    print("\nclosed / released after:", report)
    for c in idle:
        assert c.closed is not None and c.closed - c.opened <= IDLE_BOUND, (c.kind, report)
        assert c.closed - c.opened >= KEEP_ALIVE - 1, (c.kind, "closed before the keep-alive timeout", report)
        assert c.released is not None and c.released - c.opened <= IDLE_BOUND, (c.kind, "still held", report)
        assert c.protocol_error is None, (c.kind, c.protocol_error)


# ------------------------------------------------------------------------------ 2. bodies withheld or trickled


@pytest.mark.timeout(90)
def test_withheld_and_trickled_bodies_get_408_and_the_connection_is_closed(swarm: Swarm) -> None:
    slow = swarm.watcher.of(*BODY_KINDS)
    swarm.watcher.wait(slow, lambda c: c.released is not None, swarm.started + CONNECTION_BOUND + 2)
    report = {kind: (summary(swarm.watcher.of(kind), lambda c: min(s.answered or s.reset or 1e9 for s in
                                                                   c.streams.values()) - c.opened),
                     summary(swarm.watcher.of(kind), lambda c: c.closed and c.closed - c.last_answer),
                     summary(swarm.watcher.of(kind), lambda c: c.released and c.released - c.last_answer))
              for kind in BODY_KINDS}
    print("\n408 after / then closed / released after:", report)
    for c in slow:
        first = c.streams[1]
        assert first.status == 408 or first.reset is not None, (c.kind, first, report)
        assert (first.answered or first.reset or 1e9) - first.opened <= ANSWER_BOUND, (c.kind, first, report)
        # Once nothing is in progress, the keep-alive timeout applies, body still trickling or not.
        assert c.closed is not None and c.closed - c.last_answer <= IDLE_BOUND, (c.kind, report)
        assert c.released is not None and c.released - c.last_answer <= IDLE_BOUND, (c.kind, "still held", report)
        assert c.protocol_error is None, (c.kind, c.protocol_error)
    for c in swarm.watcher.of(*BODY_KINDS[:3]):
        assert c.released is not None and c.released - c.opened <= CONNECTION_BOUND, (c.kind, report)
    for c in swarm.watcher.of("body trickled, then a request"):
        # The body kept coming after the 408; the connection serves another request all the same.
        assert c.followup is not None, ("connection gone before the request", c.closed and c.closed - c.opened)
        followup = c.streams[c.followup]
        assert (followup.status, followup.ended is not None) == (200, True), followup


# ------------------------------------------------------------------------------ 3. many at once


@pytest.mark.timeout(120)
def test_many_slow_h2_connections_do_not_slow_down_other_clients(swarm: Swarm) -> None:
    crowd = swarm.watcher.of(CROWD)
    everyone = swarm.watcher.clients
    swarm.watcher.wait(everyone, lambda c: c.released is not None, swarm.started + CONNECTION_BOUND + 2)
    swarm.prober.finish()
    samples = swarm.prober.samples
    bad = [s for s in samples if s[2] != 200]
    secs = [s[3] for s in samples]
    print(f"\ncrowd 408s: {summary(crowd, lambda c: max((s.answered or 1e9) - s.opened for s in c.streams.values()))}"
          f", closed: {summary(crowd, lambda c: c.closed and c.closed - c.opened)}"
          f", released: {summary(crowd, lambda c: c.released and c.released - c.opened)}"
          f"; prober: {len(samples)} answers over {samples[-1][0] - samples[0][0]:.0f} s, "
          f"median {statistics.median(secs) * 1000:.0f} ms, max {max(secs) * 1000:.0f} ms")
    assert bad == [], bad[:5]
    assert samples[0][0] - swarm.started < 5.0 and samples[-1][0] - swarm.started > CONNECTION_BOUND - MARGIN
    slowest = max(samples, key=lambda s: s[3])
    assert slowest[3] < QUICK, slowest
    for c in crowd:
        for sid, s in c.streams.items():
            assert s.status == 408 or s.reset is not None, (sid, s)
            assert (s.answered or s.reset or 1e9) - s.opened <= ANSWER_BOUND, (sid, s)
        assert c.released is not None and c.released - c.opened <= CONNECTION_BOUND
    text = "\n".join(swarm.rt.logs())
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]


# ------------------------------------------------------------------------------ 4. a client that stops reading

STALLED_CONNECTIONS = 8
STREAMS_EACH = 4
PER_STREAM = 16 * MIB  # what one stalled result may keep in the server (one encoded batch is ~2-5 MB)


@pytest.mark.timeout(120)
def test_clients_that_stop_reading_cost_bounded_memory_and_do_not_hold_shutdown(tmp_path: Path, pki: Pki) -> None:
    stalled: list[H2Client] = []
    watcher: Watcher | None = None
    with start(tmp_path, pki) as rt:
        try:
            ctx = tls_context(pki)
            with Prober(rt, pki).client() as warm:  # warm up the engine and the encoders
                r = warm.post("/v1/sql", content=b"SELECT value, value * 2 AS twice FROM generate_series(1, 200000)")
                assert r.status_code == 200 and len(r.json()) == 200_000
            before = rss_bytes(rt)
            for i in range(STALLED_CONNECTIONS):
                if i % 2:
                    # A window of 16 bytes per stream, never widened: the server has to wait for credit.
                    c = H2Client.open(rt, ctx, "tiny window, never widened", window=16)
                    c.ack_data = False
                else:
                    # Every window wide open, and the socket never read: TCP pushes back instead.
                    c = H2Client.open(rt, ctx, "never reads the socket", window=2**31 - 1)
                    c.conn.increment_flow_control_window(2**31 - 1 - 65535)
                for _ in range(STREAMS_EACH):
                    c.request("POST", "/v1/sql", body=BIG_SQL.encode(), end=True)
                stalled.append(c)
            watcher = Watcher(rt, [c for c in stalled if not c.ack_data])  # these read (control frames, 16 bytes)
            watcher.start()
            streams = STALLED_CONNECTIONS * STREAMS_EACH
            tiny_streams = [s for c in stalled if not c.ack_data for s in c.streams.values()]
            deaf = [c for c in stalled if c.ack_data]
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (
                    all(s.received >= 16 for s in tiny_streams)
                    and all(server_peers(rt).get(c.port, 0) > 0 for c in deaf)):  # TCP pushes back
                time.sleep(0.2)
            time.sleep(1.0)
            settled = rss_bytes(rt)
            unsent = server_peers(rt)
            assert all(unsent.get(c.port, 0) > 0 for c in deaf), unsent
            # Others are served at once while the large results are stuck.
            with Prober(rt, pki).client() as other:
                for _ in range(10):
                    started = time.monotonic()
                    assert other.post("/v1/sql", content=b"SELECT 1 AS one").json() == [{"one": 1}]
                    assert other.get("/health").status_code == 200
                    assert time.monotonic() - started < QUICK
                started = time.monotonic()
                r = other.post("/v1/sql", content=b"SELECT value FROM generate_series(1, 200000)")
                assert r.status_code == 200 and len(r.json()) == 200_000
                medium = time.monotonic() - started
            time.sleep(3.0)
            after = rss_bytes(rt)
            tiny = {s.received for s in tiny_streams}
            print(f"\nRSS before {before / MIB:.0f} MiB, {streams} results stalled {settled / MIB:.0f} MiB, "
                  f"{(settled - before) / streams / MIB:.1f} MiB a stream, then {after / MIB:.0f} MiB; "
                  f"200k rows for another client in {medium:.1f} s; bytes on each tiny-window stream: {tiny}")
            assert tiny == {16}, tiny  # flow control is obeyed, and each stream did start
            # Each pending result is ~70 MB of JSON; Hypercorn alone buffered all of it (GBs in seconds).
            assert settled - before < streams * PER_STREAM, (before, settled, after)
            assert after - settled < 2 * PER_STREAM, (before, settled, after)  # and nothing more piles up

            rt.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert rt.proc.wait(DRAIN_SECONDS + 5) == 0
            took = time.monotonic() - signalled
            print(f"SIGTERM with {streams} stalled streams: exited 0 after {took:.1f} s")
            assert took < DRAIN_SECONDS + 3, f"exited after {took:.1f} s"
            text = "\n".join(rt.logs())
            assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
        finally:
            if watcher is not None:
                watcher.close()
            for c in stalled:
                c.sock.close()

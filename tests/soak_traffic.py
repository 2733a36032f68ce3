"""Traffic for a soak phase (bench/soak.py, tests/test_rotation_load.py): the load generators that
need nothing installed, and the observers.

Loads are real clients of the real runtime on loopback: Python's http.client and pyarrow Flight
(wrk, h2load, stunnel and httpx over HTTP/2 are the full soak's, in bench/soak_load.py). Each runs
until `stop()` and reports what it sent and what failed; nothing retries, so a request lost during
a rotation shows up as a failure.

    load = PyHttpLoad("http", port, client_ctx(ca)); load.start(); ...; load.stop()  # -> LoadResult

Observers: a probe that makes fresh handshakes on every listener and records the certificate each
was served (or that it was refused), and the reload counter read from /metrics.

    probe = Probe(probe_targets(http, flight, metrics), {"-": probe_contexts(ca)}); probe.start()
    ...; probe.stop(); probe.records            # ProbeRecord(listener, who, started, ended, serial, error)
    ReloadCounter(metrics_url, ca).read()       # {"ok": 3, "parse_error": 1}
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow.compute as pc
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from pyarrow import flight

SQL_BODY = b"SELECT count(*) FROM trips"
MAX_ERRORS_KEPT = 5


@dataclass
class LoadResult:
    name: str
    sent: int = 0
    failed: int = 0
    detail: str = ""
    errors: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failed += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message)


class Load(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> LoadResult: ...

    def across(self, windows: list[tuple[float, float]]) -> list[str]:
        """Once stopped: what ran across the phase's rotation windows (files landed, swap counted),
        added to the result's detail, and the failures that follow from it."""
        ...


# ------------------------------------------------------------------------------------- Python HTTP


class PyHttpLoad:
    """HTTP/1.1 load from Python's http.client: `keepalive` threads each reuse one connection, and
    `fresh` threads open a new TLS connection for every request. Slower than wrk, but it can present
    a client certificate and needs nothing installed (the fast test variant uses it)."""

    def __init__(self, name: str, port: int, ctx: ssl.SSLContext, *, keepalive: int = 16, fresh: int = 2,
                 body: bytes = SQL_BODY) -> None:
        self.name = name
        self._port, self._ctx, self._body = port, ctx, body
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.result = LoadResult(name)
        self._threads = [threading.Thread(target=self._keepalive, name=f"{name}-ka-{i}", daemon=True)
                         for i in range(keepalive)]
        self._threads += [threading.Thread(target=self._fresh, name=f"{name}-new-{i}", daemon=True)
                          for i in range(fresh)]
        self._new_connections = 0

    def _conn(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("localhost", self._port, context=self._ctx, timeout=30)

    def _one(self, conn: http.client.HTTPSConnection) -> bool:
        try:
            conn.request("POST", "/v1/sql", body=self._body, headers={"Content-Type": "text/plain"})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            self._record(f"{type(e).__name__}: {e}")
            return False
        if response.status != 200:
            self._record(f"HTTP {response.status}: {data[:200]!r}")
            return True
        self._record(None)
        return True

    def _record(self, error: str | None) -> None:
        with self._lock:
            self.result.sent += 1
            if error is not None:
                self.result.fail(error)

    def _keepalive(self) -> None:
        conn = self._conn()
        sock = None
        try:
            while not self._stop.is_set():
                if not self._one(conn):
                    conn.close()
                    conn = self._conn()
                    sock = None
                    continue
                # http.client reconnects silently when the server closes; a keep-alive connection
                # must outlive every rotation, so a new socket here is a failure.
                if sock is not None and conn.sock is not sock:
                    with self._lock:
                        self.result.fail("a keep-alive connection was closed by the server")
                sock = conn.sock
        finally:
            conn.close()

    def _fresh(self) -> None:
        while not self._stop.is_set():
            conn = self._conn()
            try:
                self._one(conn)
            finally:
                conn.close()
            with self._lock:
                self._new_connections += 1

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        self.result.detail = f"{len(self._threads)} threads, {self._new_connections} new connections"
        return self.result

    def across(self, windows: list[tuple[float, float]]) -> list[str]:
        return []  # a keep-alive connection closed by the server is already a failure


# ------------------------------------------------------------------------------------------- Flight


@dataclass(frozen=True)
class FlightTarget:
    uri: str
    roots: bytes
    cert: bytes | None = None
    key: bytes | None = None

    def client(self) -> flight.FlightClient:
        kw: dict[str, object] = {"tls_root_certs": self.roots}
        if self.cert is not None:
            kw.update(cert_chain=self.cert, private_key=self.key)
        return flight.FlightClient(self.uri, **kw)  # type: ignore[arg-type]


class FlightLoad:
    """DoGet streams of `sql` (expecting `rows` rows whose `id` sums to `id_sum`) on three loops:
    one long-lived client (its connection outlives rotations), a new client per stream (a new
    handshake each), and a slow reader whose streams last across rotations."""

    def __init__(self, name: str, target: FlightTarget, sql: str, rows: int, id_sum: int, *,
                 slow_seconds: float = 5.0) -> None:
        self.name = name
        self._target, self._ticket = target, flight.Ticket(sql.encode())
        self._rows, self._id_sum, self.slow_seconds = rows, id_sum, slow_seconds
        self._batches = 0  # batches in a stream, learnt from the first complete one
        self._learned = threading.Event()
        self._slow_since: float | None = None  # start of the slow stream in progress
        self.spans: list[tuple[str, float, float]] = []  # (kind, started, ended) of every good stream
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.result = LoadResult(name)
        self.kinds: Counter[str] = Counter()
        self.longest_stream = 0.0
        self._threads = [threading.Thread(target=fn, name=f"{name}-{fn.__name__}", daemon=True)
                         for fn in (self._keepalive, self._fresh, self._slow)]

    def _stream(self, client: flight.FlightClient, kind: str, slow: bool = False) -> None:
        started = time.monotonic()
        error = None
        pace = self.slow_seconds / max(self._batches, 1) if slow else 0.0
        if slow:
            self._slow_since = started
        try:
            reader = client.do_get(self._ticket)
            rows, total, batches = 0, 0, 0
            for chunk in reader:
                batch = chunk.data
                rows += batch.num_rows
                batches += 1
                total += pc.sum(batch.column("id")).as_py() or 0
                # A slow consumer, so that the stream spans a rotation. The wait ends early when
                # the load stops; the stream, cancelled, is not counted.
                if pace and self._stop.wait(pace):
                    reader.cancel()
                    self._slow_since = None
                    return
            if (rows, total) != (self._rows, self._id_sum):
                error = f"{kind}: got {rows} rows (id sum {total}), expected {self._rows} ({self._id_sum})"
            elif not self._learned.is_set():
                self._batches = batches
                self._learned.set()
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the stream failed
            error = f"{kind}: {type(e).__name__}: {str(e)[:300]}"
        ended = time.monotonic()
        if slow:
            self._slow_since = None
        with self._lock:
            self.result.sent += 1
            self.kinds[kind] += 1
            self.longest_stream = max(self.longest_stream, ended - started)
            if error is not None:
                self.result.fail(error)
            else:
                self.spans.append((kind, started, ended))

    def _keepalive(self) -> None:
        client = self._target.client()
        try:
            while not self._stop.is_set():
                self._stream(client, "keep-alive")
        finally:
            client.close()

    def _fresh(self) -> None:
        while not self._stop.is_set():
            with self._target.client() as client:
                self._stream(client, "new-connection")

    def _slow(self) -> None:
        self._learned.wait(60)  # pace by the batch count a full-speed stream showed
        while not self._stop.is_set():
            with self._target.client() as client:
                self._stream(client, "slow", slow=True)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def slow_stream_young(self, within: float = 0.5) -> bool:
        """A slow stream started less than `within` seconds ago and is still running."""
        since = self._slow_since
        return since is not None and time.monotonic() - since < within

    def spanning(self, windows: list[tuple[float, float]]) -> Counter[str]:
        """Good streams, by kind, that were running across a whole window (start, end): a rotation
        from the files landing to the swap being counted."""
        with self._lock:
            return Counter(kind for kind, s, e in self.spans if any(s < a and e > b for a, b in windows))

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        self.result.detail = f"DoGet streams: {kinds}; longest {self.longest_stream:.1f} s"
        return self.result

    def across(self, windows: list[tuple[float, float]]) -> list[str]:
        spanning = self.spanning(windows)
        self.result.detail += f"; streams running across a swap: {dict(spanning) or 0}"
        return ["no slow Flight stream ran across a rotation"] if windows and not spanning["slow"] else []


# -------------------------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class ProbeTarget:
    listener: str  # "http", "flight", "metrics"
    port: int
    alpn: str  # the protocol the handshake must negotiate
    request: bytes | None  # an HTTP/1.1 request expecting 200; None: send the h2 preface (Flight)


@dataclass(frozen=True)
class ProbeRecord:
    listener: str
    who: str  # which client certificate was presented ("-" for none)
    started: float
    ended: float
    serial: int | None  # None: the connection was refused
    error: str | None
    handshaked: float | None = None  # when the TLS handshake completed (the served certificate is known)


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def probe_once(target: ProbeTarget, ctx: ssl.SSLContext, timeout: float = 15.0,
               handshaked: list[float] | None = None) -> tuple[int | None, str | None]:
    """One fresh connection: full handshake, then one request (HTTP) or the h2 preface (Flight) and
    an answer read back, because under TLS 1.3 a refused client certificate shows only on the first
    read. Returns (served serial, None) or (None, reason refused)."""
    try:
        with socket.create_connection(("127.0.0.1", target.port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            if handshaked is not None:
                handshaked.append(time.monotonic())
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            serial = x509.load_der_x509_certificate(der).serial_number
            if tls.selected_alpn_protocol() != target.alpn:
                return None, f"ALPN {tls.selected_alpn_protocol()!r}, expected {target.alpn!r}"
            if target.request is None:
                tls.sendall(H2_PREFACE)
                answer = b""
                while len(answer) < 9:  # the header of the server's SETTINGS frame
                    chunk = tls.recv(9 - len(answer))
                    if not chunk:
                        return None, f"connection closed after the handshake; got {answer!r}"
                    answer += chunk
                if answer[3:4] != b"\x04":
                    return None, f"unexpected h2 frame {answer!r}"
                return serial, None
            tls.sendall(target.request)
            data = b""
            while b"\r\n" not in data:
                chunk = tls.recv(4096)
                if not chunk:
                    return None, f"connection closed; got {data!r}"
                data += chunk
            status = data.split(b"\r\n", 1)[0]
            if b" 200 " not in status + b" ":
                return None, f"status line {status!r}"
            return serial, None
    except (OSError, ssl.SSLError) as e:
        return None, f"{type(e).__name__}: {e}"


def http_probe_request(body: bytes = b"SELECT 1") -> bytes:
    return (b"POST /v1/sql HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


class Probe:
    """Fresh handshakes against every target, one thread per target and client certificate, back to
    back with `gap` seconds between them, each recorded with the serial the server presented.
    `clients` maps a name (which certificate it presents) to its client contexts by ALPN protocol
    (see `probe_contexts`)."""

    def __init__(self, targets: list[ProbeTarget], clients: dict[str, dict[str, ssl.SSLContext]],
                 gap: float = 0.02, parallel: int = 3) -> None:
        self._targets, self._clients, self._gap = targets, clients, gap
        self.records: list[ProbeRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Several staggered probes per target: a rotation's first new handshake is then not held
        # back by a probe that started just before it and is still waiting behind the load.
        self._threads = [threading.Thread(target=self._run, args=(t, who, contexts[t.alpn], n * gap),
                                          name=f"soak-probe-{who}-{t.listener}-{n}", daemon=True)
                         for who, contexts in clients.items() for t in targets for n in range(parallel)]

    def _run(self, target: ProbeTarget, who: str, ctx: ssl.SSLContext, delay: float = 0.0) -> None:
        self._stop.wait(delay)
        while not self._stop.is_set():
            self.record(self.once(target, who, ctx))
            self._stop.wait(self._gap)

    @staticmethod
    def once(target: ProbeTarget, who: str, ctx: ssl.SSLContext) -> ProbeRecord:
        started, handshaked = time.monotonic(), []
        serial, error = probe_once(target, ctx, handshaked=handshaked)
        return ProbeRecord(target.listener, who, started, time.monotonic(), serial, error,
                           handshaked[0] if handshaked else None)

    def record(self, rec: ProbeRecord) -> None:
        with self._lock:
            self.records.append(rec)

    def snapshot(self) -> list[ProbeRecord]:
        with self._lock:
            return list(self.records)

    @property
    def streams(self) -> int:
        return len(self._threads)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def probe_targets(http_port: int, flight_port: int, metrics_port: int | None) -> list[ProbeTarget]:
    targets = [ProbeTarget("http", http_port, "http/1.1", http_probe_request()),
               ProbeTarget("flight", flight_port, "h2", None)]
    if metrics_port is not None:
        targets.append(ProbeTarget("metrics", metrics_port, "http/1.1", GET_HEALTH))
    return targets


def client_ctx(ca: Path, cert: Path | None = None, key: Path | None = None, alpn: str = "http/1.1") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols([alpn])
    return ctx


def probe_contexts(ca: Path, cert: Path | None = None, key: Path | None = None) -> dict[str, ssl.SSLContext]:
    """One context per ALPN protocol the targets need, keyed by protocol."""
    return {alpn: client_ctx(ca, cert, key, alpn) for alpn in ("http/1.1", "h2")}


# ------------------------------------------------------------------------------------------ metrics


class ReloadCounter:
    """`runtime_tls_reload_total{scope="public"}` by result, read from a /metrics endpoint."""

    def __init__(self, url: str, ca: Path) -> None:
        import httpx

        self._client = httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=30)
        self._url = url + "/metrics"

    def read(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        text = self._client.get(self._url).raise_for_status().text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "runtime_tls_reload_total" and sample.labels.get("scope") == "public":
                    counts[sample.labels["result"]] = int(sample.value)
        return counts

    def close(self) -> None:
        self._client.close()

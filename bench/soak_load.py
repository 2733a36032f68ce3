"""Traffic for the soak: the load generators.

Everything here is a real client of the real runtime on loopback: wrk and h2load (Debian), stunnel
(so wrk can present a client certificate under mTLS), Python's http.client, and pyarrow Flight.
Each generator runs until `stop()` and reports what it sent and what failed; nothing retries, so a
request lost during a rotation shows up as a failure.

    load = Wrk("wrk", url, connections=16); load.start(); ...; load.stop()  # -> LoadResult
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow.compute as pc
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


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------- wrk

# wrk's Lua hooks: POST the body; count statuses per thread; print one JSON line at the end.
_WRK_LUA = r'''
wrk.method = "POST"
wrk.body = "%s"
wrk.headers["Content-Type"] = "text/plain"
%s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body)
  local k = tostring(status)
  statuses[k] = (statuses[k] or 0) + 1
end
function done(summary, latency, requests)
  local parts = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do table.insert(parts, string.format('"%%s":%%d', k, v)) end
  end
  io.write(string.format('SOAKJSON {"requests":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,' ..
    '"timeout":%%d,"p99_ms":%%.1f,"statuses":{%%s}}\n', summary.requests, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(99) / 1000, table.concat(parts, ",")))
end
'''


class Wrk:
    """wrk POSTing SQL to /v1/sql until stopped. `new_connections` closes each connection after one
    response (`Connection: close`), so every request is a fresh TCP connection and TLS handshake."""

    def __init__(self, name: str, url: str, *, connections: int, new_connections: bool = False,
                 body: bytes = SQL_BODY, max_seconds: int = 900) -> None:
        self.name = name
        self._dir = Path(tempfile.mkdtemp(prefix="soak-wrk-"))
        header = 'wrk.headers["Connection"] = "close"' if new_connections else ""
        script = self._dir / "post.lua"
        script.write_text(_WRK_LUA % (body.decode(), header))
        self._argv = ["wrk", "-t1", f"-c{connections}", f"-d{max_seconds}s", "--timeout", "30s", "--latency",
                      "-s", str(script), url]
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(self._argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> LoadResult:
        """SIGINT makes wrk stop and print its summary; requests still in flight are not counted."""
        assert self._proc is not None
        result = LoadResult(self.name)
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            out, _ = self._proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
            result.fail("wrk did not stop on SIGINT")
        shutil.rmtree(self._dir, ignore_errors=True)
        line = next((ln for ln in out.splitlines() if ln.startswith("SOAKJSON ")), None)
        if line is None:
            result.fail(f"wrk printed no summary: {out[-400:]!r}")
            return result
        s = json.loads(line.removeprefix("SOAKJSON "))
        socket_errors = s["connect"] + s["read"] + s["write"] + s["timeout"]
        non_2xx = sum(v for k, v in s["statuses"].items() if not k.startswith("2"))
        result.sent = s["requests"] + s["read"] + s["write"] + s["timeout"]
        result.failed = socket_errors + non_2xx
        result.detail = f"statuses {s['statuses']}, p99 {s['p99_ms']} ms"
        if result.failed:
            result.errors.append(f"socket errors connect={s['connect']} read={s['read']} write={s['write']} "
                                 f"timeout={s['timeout']}, statuses {s['statuses']}")
        return result


# ------------------------------------------------------------------------------------------- h2load


class H2loadLoop:
    """h2load over HTTP/2 in bounded rounds (`-n` requests on `clients` new connections each) until
    stopped: every round is new TLS handshakes that must negotiate `h2` with whatever certificate is
    current. h2load fails a round if ALPN does not give h2."""

    def __init__(self, name: str, url: str, *, clients: int = 2, streams: int = 4, per_round: int = 200,
                 body: bytes = SQL_BODY) -> None:
        self.name = name
        self._dir = Path(tempfile.mkdtemp(prefix="soak-h2load-"))
        (self._dir / "body.sql").write_bytes(body)
        self._argv = ["h2load", f"-c{clients}", f"-m{streams}", f"-n{per_round}", "-d", str(self._dir / "body.sql"),
                      "-H", "content-type: text/plain", url]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.result = LoadResult(name)
        self._rounds = 0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import re

        while not self._stop.is_set():
            done = subprocess.run(self._argv, capture_output=True, text=True, timeout=300, check=False)
            self._rounds += 1
            m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                          r"(\d+) errored, (\d+) timeout", done.stdout)
            codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", done.stdout)
            if done.returncode != 0 or m is None or codes is None or "Application protocol: h2" not in done.stdout:
                self.result.fail(f"h2load round failed (rc {done.returncode}): {(done.stdout + done.stderr)[-300:]!r}")
                continue
            total, _, _, succeeded, failed, errored, timeouts = map(int, m.groups())
            self.result.sent += total
            non_2xx = int(codes.group(2)) + int(codes.group(3)) + int(codes.group(4))
            bad = max(failed + errored + timeouts + non_2xx, total - succeeded)
            if bad:
                self.result.failed += bad
                if len(self.result.errors) < MAX_ERRORS_KEPT:
                    self.result.errors.append(f"h2load round: {m.group(0)}; {codes.group(0)}")

    def stop(self) -> LoadResult:
        self._stop.set()
        self._thread.join(330)
        shutil.rmtree(self._dir, ignore_errors=True)
        self.result.detail = f"{self._rounds} rounds of new h2 connections"
        return self.result


# ------------------------------------------------------------------------------------------ stunnel


class Stunnel:
    """A client-side TLS tunnel that presents a client certificate, so that wrk (which cannot) can
    load the runtime under `client_auth_mode: required`. Each connection wrk opens to `port` becomes
    one TLS connection (full handshake, client certificate verified) to the runtime."""

    def __init__(self, target_port: int, ca: Path, cert: Path, key: Path) -> None:
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="soak-stunnel-"))
        conf = self._dir / "stunnel.conf"
        conf.write_text(f"""foreground = yes
pid =
debug = 4
output = {self._dir / 'stunnel.log'}
[spiced]
client = yes
accept = 127.0.0.1:{self.port}
connect = 127.0.0.1:{target_port}
sni = localhost
checkHost = localhost
verifyChain = yes
CAfile = {ca}
cert = {cert}
key = {key}
""")
        self._proc = subprocess.Popen([self.binary(), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(self._listening, 10):
            self.stop()
            raise RuntimeError("stunnel did not start listening")

    @staticmethod
    def binary() -> str:
        return shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel4"

    @staticmethod
    def available() -> bool:
        return shutil.which("stunnel4") is not None or shutil.which("stunnel") is not None

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


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
        self._threads += [threading.Thread(target=self._fresh, name=f"{name}-new-{i}", daemon=True) for i in range(fresh)]
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
        self._rows, self._id_sum, self._slow_seconds = rows, id_sum, slow_seconds
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
        pace = self._slow_seconds / max(self._batches, 1) if slow else 0.0
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
        return Counter(kind for kind, s, e in self.spans if any(s < a and e > b for a, b in windows))

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        self.result.detail = f"DoGet streams: {kinds}; longest {self.longest_stream:.1f} s"
        return self.result

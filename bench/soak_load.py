"""Traffic for the full soak: the load generators that need more than Python and pyarrow (the
others, Python's http.client and pyarrow Flight, are in tests/soak_traffic.py, shared with the
soak's fast variant among the tests).

Everything here is a real client of the real runtime on loopback: wrk and h2load (Debian), stunnel
(so wrk can present a client certificate under mTLS), and httpx over HTTP/2 (in a child process; it
presents the client certificate where h2load cannot). Each generator runs until `stop()` and
reports what it sent and what failed; nothing retries, so a request lost during a rotation shows up
as a failure.

    load = Wrk("wrk", url, connections=16); load.start(); ...; load.stop()  # -> LoadResult
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from tests.soak_traffic import MAX_ERRORS_KEPT, SQL_BODY, LoadResult
from tests.tlsprobe import TimedOut, wait_for


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

    def across(self, windows: list[tuple[float, float]]) -> list[str]:
        return []  # every socket error and non-2xx status is already counted as failed


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

    def across(self, windows: list[tuple[float, float]]) -> list[str]:
        return []  # every round is new connections: none runs across a rotation


# ---------------------------------------------------------------------------------- Python HTTP/2


class HttpxH2Load:
    """HTTP/2 load from httpx (http2=True) in a child process of its own, so that it presents a
    client certificate where h2load cannot (mTLS: stunnel forwards no ALPN, so h2load through it
    would speak h2 without ever negotiating `h2`). Two loops run in the child:

      long-lived: one connection carrying `streams` concurrent POST streams until stopped; the
                  connection must outlive every rotation (a second connection is a failure);
      new-conn:   a new client (new TCP connection, full handshake with the client certificate)
                  per round of `per_conn` requests, `new_streams` of them in flight at a time.

    Every response must be 200 over HTTP/2 on a connection whose ALPN negotiated `h2` (httpx keeps
    HTTP/1.1 enabled, so `HTTP/2` here means the server chose h2 by ALPN, not prior knowledge).
    Nothing retries. The child stops when its stdin closes and writes its counts as JSON; its
    requests in flight at that moment complete and are counted."""

    def __init__(self, name: str, url: str, ca: Path, cert: Path | None = None, key: Path | None = None, *,
                 streams: int = 4, new_streams: int = 2, per_conn: int = 6, body: bytes = SQL_BODY) -> None:
        self.name = name
        self._dir = Path(tempfile.mkdtemp(prefix="soak-httpx-h2-"))
        self._out, self._ready = self._dir / "result.json", self._dir / "ready"
        config = {"url": url, "ca": str(ca), "cert": str(cert) if cert else None, "key": str(key) if key else None,
                  "streams": streams, "new_streams": new_streams, "per_conn": per_conn, "body": body.decode(),
                  "out": str(self._out), "ready": str(self._ready)}
        (self._dir / "config.json").write_text(json.dumps(config))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None
        self.result = LoadResult(name)
        self.long_lived: list[tuple[float, float, int]] = []  # (first, last response, requests) per connection

    def start(self) -> None:
        self._log = (self._dir / "child.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "bench.soak_load", "httpx-h2", str(self._dir / "config.json")],
                                cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE,
                                stdout=self._log, stderr=subprocess.STDOUT)
        self._proc = proc
        # both loops have had a response (or the child died): the load runs before the first rotation
        with suppress(TimedOut):  # a child that never got going shows in its counts
            wait_for(lambda: self._ready.exists() or proc.poll() is not None, 60)

    def stop(self) -> LoadResult:
        assert self._proc is not None and self._proc.stdin is not None
        result = self.result
        try:
            self._proc.stdin.close()  # the child's signal to stop
        except OSError:
            pass
        try:
            self._proc.wait(90)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            result.fail("the httpx h2 child did not stop when told")
        if self._log is not None:
            self._log.close()
        out = self._out
        if not out.exists():
            log = (self._dir / "child.log").read_text(errors="replace")
            result.fail(f"httpx h2 child (rc {self._proc.returncode}) wrote no result: {log[-400:]!r}")
            shutil.rmtree(self._dir, ignore_errors=True)
            return result
        s = json.loads(out.read_text())
        shutil.rmtree(self._dir, ignore_errors=True)
        result.sent += s["sent"]
        result.failed += s["failed"]
        result.errors += s["errors"][: MAX_ERRORS_KEPT - len(result.errors)]
        self.long_lived = [tuple(c) for c in s["long_lived"]]  # type: ignore[misc]
        for loop, n in s["sent_by_loop"].items():
            if not n:
                result.fail(f"the {loop} loop sent nothing")
        long_requests = sum(n for _, _, n in self.long_lived)
        result.detail = (f"statuses {s['statuses']}, protocols {s['protocols']}; long-lived: "
                         f"{len(self.long_lived)} conn, {s['streams']} streams, {long_requests} req; "
                         f"new-conn: {s['new_connections']} conns, {s['sent_by_loop']['new-conn']} req")
        return result

    def spanning(self, windows: list[tuple[float, float]]) -> int:
        """Rotation windows (files landed, swap counted) that the long-lived connection served
        requests on both sides of."""
        return sum(1 for a, b in windows if any(first < a and last > b for first, last, _ in self.long_lived))

    def across(self, windows: list[tuple[float, float]]) -> list[str]:
        spanned = self.spanning(windows)
        self.result.detail += f"; long-lived conn across {spanned} of {len(windows)} swaps"
        if spanned < len(windows):
            return [f"{self.name}: the long-lived h2 connection ran across only {spanned} of {len(windows)} rotations"]
        return []


def _httpx_h2_child(config_path: str) -> int:
    """The child process of `HttpxH2Load` (python -m bench.soak_load httpx-h2 CONFIG)."""
    import asyncio

    import httpx

    cfg = json.loads(Path(config_path).read_text())
    ctx = ssl.create_default_context(cafile=cfg["ca"])
    if cfg["cert"]:
        ctx.load_cert_chain(cfg["cert"], cfg["key"])
    body, url = cfg["body"].encode(), cfg["url"]
    headers = {"content-type": "text/plain"}
    sent_by_loop: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    protocols: Counter[str] = Counter()
    errors: list[str] = []
    failed = 0
    new_connections = 0
    long_lived: dict[int, list[float]] = {}  # id(connection) -> [first, last, requests]
    keep: list[object] = []  # the connections seen, kept alive so that their ids stay unique

    def fail(message: str) -> None:
        nonlocal failed
        failed += 1
        if len(errors) < MAX_ERRORS_KEPT:
            errors.append(message)

    async def one(client: httpx.AsyncClient, loop: str) -> object | None:
        """One POST; returns the network stream (the connection) it was answered on."""
        sent_by_loop[loop] += 1
        try:
            response = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as e:
            fail(f"{loop}: {type(e).__name__}: {str(e)[:200]}")
            return None
        stream = response.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        statuses[str(response.status_code)] += 1
        protocols[f"{response.http_version} (ALPN {alpn})"] += 1
        if response.status_code != 200:
            fail(f"{loop}: HTTP {response.status_code}: {response.content[:200]!r}")
        elif response.http_version != "HTTP/2" or alpn != "h2":
            fail(f"{loop}: answered over {response.http_version}, ALPN {alpn!r}")
        return stream

    def client() -> httpx.AsyncClient:
        # one connection per client; HTTP/1.1 stays enabled so that h2 must come from ALPN
        return httpx.AsyncClient(verify=ctx, http2=True, timeout=30.0,
                                 limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def watch_stdin() -> None:
            while sys.stdin.buffer.read(4096):
                pass
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch_stdin, daemon=True).start()
        ready = {"long-lived": asyncio.Event(), "new-conn": asyncio.Event()}

        async def long_stream(c: httpx.AsyncClient) -> None:
            while not stop.is_set():
                stream = await one(c, "long-lived")
                ready["long-lived"].set()
                if stream is None:
                    await asyncio.sleep(0.1)  # counted; do not spin against a server that is gone
                    continue
                now = time.monotonic()
                if id(stream) not in long_lived:
                    keep.append(stream)
                    long_lived[id(stream)] = [now, now, 0]
                    if len(long_lived) > 1:
                        fail("long-lived: the connection was replaced (closed by the server?)")
                span = long_lived[id(stream)]
                span[1], span[2] = now, span[2] + 1

        async def long_lived_loop() -> None:
            async with client() as c:
                await asyncio.gather(*(long_stream(c) for _ in range(cfg["streams"])))

        async def new_connection() -> None:
            """One new client: `per_conn` requests, `new_streams` in flight, on one new connection."""
            nonlocal new_connections
            streams: list[object] = []  # kept alive so that their ids stay unique
            remaining = cfg["per_conn"]

            async def worker(c: httpx.AsyncClient) -> None:
                nonlocal remaining
                while remaining > 0 and not stop.is_set():
                    remaining -= 1
                    stream = await one(c, "new-conn")
                    if stream is None:
                        await asyncio.sleep(0.1)
                    elif all(stream is not s for s in streams):
                        streams.append(stream)

            async with client() as c:
                await asyncio.gather(*(worker(c) for _ in range(cfg["new_streams"])))
            ready["new-conn"].set()
            new_connections += len(streams)
            if len(streams) > 1:
                fail(f"new-conn: one client's requests were spread over {len(streams)} connections")

        async def new_conn_loop() -> None:
            while not stop.is_set():
                await new_connection()

        async def mark_ready() -> None:
            await asyncio.gather(*(e.wait() for e in ready.values()))
            Path(cfg["ready"]).touch()

        marker = asyncio.create_task(mark_ready())
        await asyncio.gather(long_lived_loop(), new_conn_loop())
        marker.cancel()

    asyncio.run(main())
    result = {"sent": sum(sent_by_loop.values()), "failed": failed, "errors": errors,
              "sent_by_loop": {k: sent_by_loop[k] for k in ("long-lived", "new-conn")},
              "statuses": dict(statuses), "protocols": dict(protocols), "new_connections": new_connections,
              "long_lived": list(long_lived.values()), "streams": cfg["streams"]}
    tmp = Path(cfg["out"] + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, cfg["out"])
    return 0


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
        try:
            wait_for(self._listening, 10)
        except TimedOut:
            self.stop()
            raise RuntimeError("stunnel did not start listening") from None

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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "httpx-h2":
        sys.exit(_httpx_h2_child(sys.argv[2]))
    sys.exit("usage: python -m bench.soak_load httpx-h2 CONFIG.json  (the child of HttpxH2Load)")

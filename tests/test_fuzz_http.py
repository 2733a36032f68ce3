"""Bad input on the HTTP API of the real runtime over TLS (issue 6): random and malformed SQL
bodies, headers and Accept values, invalid UTF-8, huge and lying bodies, random methods and
paths, malformed request lines, a schemathesis run against the published OpenAPI description,
and slow clients. Never a 5xx, never a hang, no stuck query, bounded memory, the server alive.

Slow clients (slow-loris) are opened when the module starts and stay connected while every other
test runs, so all of it happens while they hold their connections; the last test checks that the
server dropped each of them within `SLOW_CLIENT_BOUND` seconds.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Runtime, rss_bytes, run_tls_target, server_peers, write_pod
from tests.tlsprobe import wait_for

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CONTENT_TYPES = {"application/json", "text/csv", "text/plain; charset=utf-8"}
MIB = 1024 * 1024
# A client that has not finished sending its request may keep its connection this long at most.
# (The TLS handshake is already bounded at 10 s; the same order of bound for headers and body.)
SLOW_CLIENT_BOUND = 20.0

SPICEPOD = """version: v1
kind: Spicepod
name: fuzz
runtime:
  query:
    timeout: 10s
datasets:
  - from: file:trips.csv
    name: trips
    acceleration:
      enabled: true
"""


# ------------------------------------------------------------------------------------ fixtures


@dataclass
class SlowClient:
    kind: str
    sock: socket.socket
    opened: float
    trickle: bytes = b""  # one byte of this is sent per second; b"": the client sends nothing more
    closed: float | None = None
    sent: int = 0


@dataclass
class SlowClients:
    """Slow-loris clients on their own thread: each trickles (or withholds) its request and records
    when the server closes the connection."""

    clients: list[SlowClient] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            open_ = [c for c in self.clients if c.closed is None]
            if not open_:
                return
            readable, _, _ = select.select([c.sock for c in open_], [], [], 1.0)
            now = time.monotonic()
            for c in open_:
                if c.sock in readable:
                    try:
                        data = c.sock.recv(4096)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                        data = None  # a TLS record without application data (a session ticket)
                    except (OSError, ssl.SSLError):
                        data = b""
                    if data == b"":
                        c.closed = now
                        continue
                if c.trickle and now - c.opened >= c.sent:  # one byte a second
                    try:
                        c.sock.send(c.trickle[c.sent % len(c.trickle):][:1])
                        c.sent += 1
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                        pass
                    except (OSError, ssl.SSLError):
                        c.closed = now


def _tls_socket(rt: Runtime, alpn: str = "http/1.1") -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(rt.pki.ca.cert))  # type: ignore[attr-defined]
    ctx.set_alpn_protocols([alpn])
    raw = socket.create_connection(("127.0.0.1", rt.http_port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    with run_tls_target(write_pod(tmp_path_factory.mktemp("fuzz-http"), SPICEPOD)) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def slow(rt: Runtime) -> Iterator[SlowClients]:
    clients = SlowClients()
    now = time.monotonic()
    for i in range(10):
        # headers never finished, one more header byte each second
        s = _tls_socket(rt)
        s.sendall(b"POST /v1/sql HTTP/1.1\r\nHost: localhost\r\n")
        clients.clients.append(SlowClient("headers trickled", s, now, b"X-Slow-Header-%d: a\r\n" % i))
        # headers complete, body promised and never sent
        s = _tls_socket(rt)
        s.sendall(b"POST /v1/sql HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\nSELECT")
        clients.clients.append(SlowClient("body withheld", s, now))
        # headers complete, body trickled a byte a second
        s = _tls_socket(rt)
        s.sendall(b"POST /v1/sql HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n")
        clients.clients.append(SlowClient("body trickled", s, now, b"SELECT 1 "))
        # TCP only, no ClientHello
        raw = socket.create_connection(("127.0.0.1", rt.http_port), timeout=10)
        clients.clients.append(SlowClient("no TLS handshake", raw, now))
    for c in clients.clients:
        c.sock.setblocking(False)  # the watcher must never wait on one client
    thread = threading.Thread(target=clients.run, name="slow-clients", daemon=True)
    thread.start()
    yield clients
    clients.stop.set()
    thread.join(5)
    for c in clients.clients:
        c.sock.close()


@pytest.fixture(scope="module")
def client(rt: Runtime, slow: SlowClients) -> Iterator[httpx.Client]:
    ctx = ssl.create_default_context(cafile=str(rt.pki.ca.cert))  # type: ignore[attr-defined]
    with httpx.Client(base_url=rt.http_url.replace("127.0.0.1", "localhost"), verify=ctx, timeout=30) as c:
        yield c


def post_sql(client: httpx.Client, body: bytes,
             headers: dict[str, str] | dict[str, bytes] | None = None) -> httpx.Response:
    r = client.post("/v1/sql", content=body, headers=headers or {})
    assert r.status_code < 500, (r.status_code, body[:200], r.text[:300])
    return r


def alive(client: httpx.Client) -> None:
    started = time.monotonic()
    r = client.post("/v1/sql", content=b"SELECT count(*) AS n FROM trips")
    assert (r.status_code, r.json()) == (200, [{"n": 3}])
    assert time.monotonic() - started < 5.0


# ------------------------------------------------------------------------------ SQL bodies

TOKENS = ["SELECT", "FROM", "trips", "WHERE", "1", "'a'", "(", ")", ",", "*", "GROUP BY", "ORDER BY", "city", "fare",
          "id", "LIMIT", "-1", "NULL", "CAST(", "AS", "INT", "::text", "count(*)", "sum(fare)", "JOIN", "ON", "UNION",
          "VALUES", "interval '1 day'", "make_array(1, 2)", "{'a': 1}", "1e400", "X'00ff'", "now()", ";", "--", "/*",
          "'", '"', "\\", "information_schema.tables", "DROP TABLE trips", "INSERT INTO trips VALUES (1)", "SET x = 1",
          "arrow_cast(1, 'Decimal128(38,10)')", "0.1", "9223372036854775807", "NaN", "'\u00e9\u4e2d\U0001f600'",
          "CREATE TABLE t AS SELECT 1", "EXPLAIN", "COPY trips TO 'x.csv'", "unnest(make_array(1,2))"]
sql_like = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=12).map(" ".join)
sql_bodies = st.one_of(sql_like.map(str.encode), st.text(max_size=300).map(str.encode), st.binary(max_size=300))


@FUZZ
@given(body=sql_bodies)
def test_random_sql_bodies(client: httpx.Client, body: bytes) -> None:
    r = post_sql(client, body)
    assert r.status_code in (200, 400, 504), (r.status_code, body, r.text[:300])
    assert r.headers.get("content-type") in CONTENT_TYPES
    if r.status_code == 400:
        assert r.text  # a message says what was wrong


@FUZZ
@given(body=st.binary(min_size=1, max_size=200).filter(lambda b: not _is_utf8(b)))
def test_invalid_utf8_is_400(client: httpx.Client, body: bytes) -> None:
    r = post_sql(client, body)
    assert r.status_code == 400 and "UTF-8" in r.text


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ------------------------------------------------------------------------------ headers

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~", min_size=1,
                max_size=20)
# header values as bytes: visible Latin-1 and spaces, sent as they are
header_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
                       max_size=80).map(lambda v: v.strip().encode("latin-1"))
media = st.one_of(st.sampled_from(["application/json", "text/csv", "text/plain", "*/*", "text/*", "application/*",
                                   "application/vnd.apache.arrow.stream", "application/vnd.spiceai.sql.v1+json",
                                   "text/html", "image/png", ""]).map(str.encode),
                  st.builds(lambda a, b: f"{a}/{b}".encode(), token, token), header_value)
accept = st.lists(st.tuples(media, st.one_of(st.none(), st.floats(0, 1.5, allow_nan=False).map(lambda q: b"%.3f" % q),
                                             header_value)), min_size=1, max_size=5).map(
    lambda items: b", ".join(m if q is None else m + b";q=" + q for m, q in items).strip())
hop_by_hop = {"connection", "content-length", "transfer-encoding", "host", "te", "upgrade", "keep-alive", "trailer",
              "expect", "proxy-connection", "http2-settings"}
extra_headers = st.dictionaries(token.filter(lambda t: t.lower() not in hop_by_hop), header_value, max_size=6)


@FUZZ
@given(accept_value=accept, headers=extra_headers, content_type=st.one_of(st.none(), header_value))
def test_random_accept_and_headers(client: httpx.Client, accept_value: bytes, headers: dict[str, bytes],
                                   content_type: bytes | None) -> None:
    h: dict[str, bytes] = dict(headers)
    h["Accept"] = accept_value
    if content_type is not None:
        h["Content-Type"] = content_type
    r = post_sql(client, b"SELECT 1 AS one", h)
    if r.status_code == 401:  # no auth is configured: a 401 would be a bug
        pytest.fail(r.text)
    assert r.status_code in (200, 400, 406, 415), (r.status_code, h, r.text[:200])
    if r.status_code == 200:
        ctype = r.headers["content-type"]
        assert ctype in CONTENT_TYPES | {"application/vnd.apache.arrow.stream", "application/vnd.spiceai.sql.v1+json"}
        assert r.content


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO"]),
       path=st.one_of(st.sampled_from(["/v1/sql", "/health", "/v1/ready", "/v1/status", "/v1/datasets", "/metrics",
                                       "/v1/spicepods", "/v1/datasets/trips/acceleration/refresh", "/v1/openapi.json",
                                       "/v1/datasets/%00/acceleration/refresh", "/v1/catalogs"]),
                      st.text(max_size=60).map(lambda p: "/" + quote(p, safe="/?=&"))),
       query=st.one_of(st.just(""), st.text(max_size=40).map(lambda q: "?" + quote(q, safe="=&"))),
       body=st.one_of(st.just(b""), st.binary(max_size=200), st.just(b'{"refresh_sql": 5}'), st.just(b"{")))
def test_random_methods_paths_and_bodies(client: httpx.Client, method: str, path: str, query: str, body: bytes) -> None:
    r = client.request(method, path + query, content=body)
    assert r.status_code < 500, (method, path + query, body[:100], r.status_code, r.text[:300])


# ------------------------------------------------------------------------------ sizes


def test_huge_bodies_are_413_and_memory_stays_bounded(rt: Runtime, client: httpx.Client) -> None:
    before = rss_bytes(rt)
    big = b"-- " + b"x" * (3 * MIB) + b"\nSELECT 1"
    for _ in range(5):
        r = post_sql(client, big)
        assert r.status_code == 413
    for _ in range(5):  # chunked: no Content-Length, the limit is enforced while reading
        r = client.post("/v1/sql", content=iter([b"-- " + b"y" * MIB] * 3))
        assert r.status_code == 413, r.text
    for _ in range(20):  # just under the limit: read in full, then a 400 or 200
        r = post_sql(client, b"SELECT 1 -- " + b"z" * (2 * MIB - 64))
        assert r.status_code == 200
    alive(client)
    grown = rss_bytes(rt) - before
    assert grown < 150 * MIB, f"RSS grew by {grown / MIB:.0f} MiB"


def test_lying_content_length_is_not_a_5xx(rt: Runtime, client: httpx.Client) -> None:
    with _tls_socket(rt) as s:
        s.sendall(b"POST /v1/sql HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nSELECT 1")
        data = s.recv(4096)
    assert data == b"" or data.startswith((b"HTTP/1.1 4", b"HTTP/1.1 200")), data[:200]
    with _tls_socket(rt) as s:
        s.sendall(b"POST /v1/sql HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\nSELECT 1")
        data = s.recv(4096)
    assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:200]
    alive(client)


def test_a_connection_the_server_closes_is_released_without_the_clients_close_notify(rt: Runtime) -> None:
    # `Connection: close`: the server sends its answer, then close_notify. This client reads it all
    # and then neither answers the close_notify nor closes; asyncio alone held the server's socket
    # 30 s more. Measured on the server's own sockets.
    with _tls_socket(rt) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):  # b"" at the server's close_notify
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 ")
        port = s.getsockname()[1]
        assert wait_for(lambda: port not in server_peers(rt), timeout=20) < 4
        # SSLSocket.close() closes the socket without a close_notify


@FUZZ
@given(line=st.binary(max_size=200))
def test_malformed_request_bytes(rt: Runtime, line: bytes) -> None:
    with _tls_socket(rt) as s:
        s.settimeout(15)
        s.sendall(line + b"\r\nHost: localhost\r\n\r\n")
        try:
            data = s.recv(4096)
        except (ConnectionError, ssl.SSLError):
            data = b""
    if line.startswith(b"PRI * HTTP/2.0") and data[3:4] == b"\x04":
        return  # read as HTTP/2 with prior knowledge (as hyper does upstream): the server's SETTINGS
    status = data[9:12]
    assert data == b"" or (data.startswith(b"HTTP/1.1 ") and not status.startswith(b"5")), data[:200]


# ------------------------------------------------------------------------------ schemathesis


def test_schemathesis_finds_no_server_error(rt: Runtime, tmp_path: Path) -> None:
    st_bin = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if st_bin is None:
        pytest.fail("schemathesis is a test dependency (pip install schemathesis)")
    url = rt.http_url.replace("127.0.0.1", "localhost")
    # Response-side checks (status codes, content types, schemas, headers as documented) and no 5xx.
    # Not the request-side acceptance checks: upstream is lenient with unknown query values and
    # malformed refresh bodies on purpose, which schemathesis would count as failures.
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
              "response_headers_conformance")
    done = subprocess.run([st_bin, "run", url + "/v1/openapi.json", "--checks", checks,
                           "--tls-verify", str(rt.pki.ca.cert), "--max-examples", "15",  # type: ignore[attr-defined]
                           "--phases", "examples,coverage,fuzzing",
                           "--generation-deterministic", "--no-color", "--request-timeout", "30",
                           "--continue-on-failure"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
                          env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert "passed" in done.stdout


# ------------------------------------------------------------------------------ at the end


def test_no_query_left_running(rt: Runtime, client: httpx.Client) -> None:
    alive(client)
    text = client.get("/metrics").text
    active = [s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "query_active_count" and s.labels.get("protocol") == "http"]
    assert active in ([0.0], []), active


def test_slow_clients_were_disconnected(rt: Runtime, client: httpx.Client, slow: SlowClients) -> None:
    # Everything above ran while these clients held their connections.
    alive(client)
    deadline = min(c.opened for c in slow.clients) + SLOW_CLIENT_BOUND
    while time.monotonic() < deadline and any(c.closed is None for c in slow.clients):
        time.sleep(0.2)
    held = {}
    for c in slow.clients:
        if c.closed is None:
            held[c.kind] = held.get(c.kind, 0) + 1
    assert held == {}, f"still connected after {SLOW_CLIENT_BOUND:.0f} s: {held}"
    alive(client)

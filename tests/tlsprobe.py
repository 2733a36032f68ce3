"""Test helpers for the TLS layer: a real TLS server on a listener context, real clients that report
what was served, settings builders and counter readings. Nothing here stands in for TLS.

    with LoopThread() as lt:
        port = lt.call(serve_echo(mgr.listener_context("http")))   # TLS line-echo server, port 0
        hs = handshake(port, pki)                                  # serial, version, ALPN, identity seen
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from spiced.config import ClientAuthMode, MaterialSource, TlsSettings
from spiced.metrics import Metrics
from tests.pki import Issued, Pki

T = TypeVar("T")


class LoopThread:
    """An asyncio loop on a thread, for servers that tests talk to from the main thread."""

    def __enter__(self) -> LoopThread:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()
        return self

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return self.submit(coro).result(timeout)

    def __exit__(self, *exc: object) -> None:
        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(_cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


async def serve_echo(ctx: ssl.SSLContext) -> int:
    """A TLS server on 127.0.0.1:0: each line received is answered with `<client subject or ->|<version>`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True)
        who = x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else "-"
        try:
            while line := await reader.readline():
                writer.write(f"{who}|{obj.version()}|{line.decode().strip()}\n".encode())
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return int(server.sockets[0].getsockname()[1])


@dataclass
class Handshake:
    serial: int
    version: str
    alpn: str | None
    reply: str  # the server's answer to one line: "<client subject or ->|<version>|ping"
    session: ssl.SSLSession | None
    session_reused: bool


def client_context(pki: Pki, client: Issued | None = None, *, alpn: list[str] | None = None,
                   max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def handshake(port: int, ctx: ssl.SSLContext, *, session: ssl.SSLSession | None = None,
              server_hostname: str = "localhost", timeout: float = 5.0) -> Handshake:
    """Connect, exchange one line (TLS 1.3 reports a refused client cert only on the first read), close cleanly."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        tls = ctx.wrap_socket(raw, server_hostname=server_hostname, session=session)
        try:
            tls.sendall(b"ping\n")
            reply = _readline(tls)
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            result = Handshake(x509.load_der_x509_certificate(der).serial_number, str(tls.version()),
                               tls.selected_alpn_protocol(), reply, tls.session, bool(tls.session_reused))
            tls.unwrap()  # a clean close keeps a TLS 1.2 session resumable on the server
            return result
        finally:
            tls.close()


def _readline(tls: ssl.SSLSocket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = tls.recv(4096)
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data.decode().strip()


def refused(port: int, ctx: ssl.SSLContext, **kw: Any) -> Exception | None:
    """The error a handshake (plus first read) ends with, or None if it succeeded."""
    try:
        handshake(port, ctx, **kw)
    except (ssl.SSLError, ConnectionError, OSError) as e:
        return e
    return None


def s_client(port: int, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                          input="", capture_output=True, text=True, timeout=timeout, check=False)


def s_client_serial(port: int, ca: Path) -> int:
    """The serial of the certificate a fresh `openssl s_client` handshake is served."""
    done = s_client(port, "-CAfile", str(ca), "-verify_return_error", "-servername", "localhost")
    assert done.returncode == 0, done.stderr
    pem = done.stdout[done.stdout.index("-----BEGIN CERTIFICATE-----"):]
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


class TimedOut(AssertionError):
    """`wait_for` gave up. An AssertionError, so a test fails with it as with an assert; callers
    that carry on after a timeout (the soak records it and goes on) catch exactly this."""


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Poll `predicate` until true; returns the seconds it took. Raises TimedOut after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimedOut(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start


def file_settings(pki: Pki, cert: Path, key: Path, mode: ClientAuthMode = "none",
                  ca: Path | None = None) -> TlsSettings:
    return TlsSettings(MaterialSource("cli_file", path=cert), MaterialSource("cli_file", path=key), mode,
                       MaterialSource("cli_file", path=ca) if ca is not None else None)


def reload_counts(metrics: Metrics) -> dict[str, float]:
    """`runtime_tls_reload_total{scope="public"}` by result, parsed from the Prometheus exposition."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.exposition().body.decode()):
        for sample in family.samples:
            if sample.name == "runtime_tls_reload_total" and sample.labels.get("scope") == "public":
                counts[sample.labels["result"]] = sample.value
    return counts


def key_body_lines(*keys: Path) -> Iterator[str]:
    """The base64 lines of private keys: none of them may ever appear in a log or an error."""
    for key in keys:
        for line in key.read_text().splitlines():
            if line and not line.startswith("-----"):
                yield line


def replace_atomically(path: Path, data: bytes) -> None:
    """Write `data` beside `path` and rename it into place, as cert-manager and `mv` do."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def rotate_pair(cert: Path, key: Path, issued: Issued) -> None:
    """Rename a new key, then its certificate, into place."""
    replace_atomically(key, issued.key_pem)
    replace_atomically(cert, issued.cert_pem)

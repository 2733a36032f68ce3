"""spiced/http/hypercorn_patches.py: the verified client certificate reaches the ASGI app over HTTP/1.1 and h2,
through a real Hypercorn on port 0 serving the TLS manager's listener context, with httpx as client.

This guards the Hypercorn internal that server.py replaces (`hypercorn.asyncio.run.TCPServer`)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from spiced.http.server import serve
from spiced.http.tls_info import current_tls_info
from spiced.metrics import Metrics
from spiced.tls.manager import TlsManager
from tests.pki import Issued, Pki
from tests.tlsprobe import LoopThread, file_settings, rotate_pair

PROTOCOLS = pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])


async def whoami(request: Request) -> JSONResponse:
    info = current_tls_info()
    assert info is not None
    return JSONResponse({
        "identity": info.identity.subject if info.identity else None,
        "fingerprint": info.identity.fingerprint if info.identity else None,
        "tls_version": info.tls_version, "cipher": info.cipher, "alpn": info.alpn,
        "http_version": request.scope["http_version"],
        "client_port": request.client.port if request.client else None,
        "asgi_tls": info.asgi_extension(),
    })


async def refuse(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Unauthorized", status_code=401)  # without reading the body, like an auth gate


APP = Starlette(routes=[Route("/whoami", whoami), Route("/refuse", refuse, methods=["POST"])])


@dataclass
class Server:
    url: str
    port: int
    mgr: TlsManager
    cert: Path
    key: Path


@pytest.fixture
def server(request: pytest.FixtureRequest, pki: Pki, loop: LoopThread, tmp_path: Path) -> Iterator[Server]:
    mode = getattr(request, "param", "request")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copyfile(pki.server.cert, cert)
    shutil.copyfile(pki.server.key, key)
    ca = pki.client_ca.cert if mode != "none" else None
    mgr = TlsManager.create(file_settings(pki, cert, key, mode, ca), Metrics())  # type: ignore[arg-type]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    port = sock.getsockname()[1]

    async def start() -> tuple[asyncio.Event, asyncio.Task[None]]:
        shutdown = asyncio.Event()
        return shutdown, asyncio.create_task(serve(APP, sock, mgr.listener_context("http"), shutdown,
                                                   graceful_timeout=1.0))

    shutdown, task = loop.call(start())
    try:
        yield Server(f"https://localhost:{port}", port, mgr, cert, key)
    finally:
        loop.loop.call_soon_threadsafe(shutdown.set)

        async def finished() -> None:
            await task

        loop.call(finished())
        sock.close()


def client(pki: Pki, issued: Issued | None = None, *, http2: bool) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    if issued is not None:
        ctx.load_cert_chain(issued.cert, issued.key)
    return httpx.Client(verify=ctx, http2=http2, http1=not http2, timeout=5.0)


def served_serial(response: httpx.Response) -> int:
    der = response.extensions["network_stream"].get_extra_info("ssl_object").getpeercert(True)
    return x509.load_der_x509_certificate(der).serial_number


@PROTOCOLS
def test_verified_identity_reaches_the_app(server: Server, pki: Pki, http2: bool) -> None:
    with client(pki, pki.client, http2=http2) as c:
        r = c.get(server.url + "/whoami")
    assert r.status_code == 200
    body = r.json()
    assert body["identity"] == "O=spiced tests,CN=client"
    assert body["fingerprint"] == pki.client.certificate.fingerprint(
        __import__("cryptography").hazmat.primitives.hashes.SHA256()).hex()
    assert body["http_version"] == ("2" if http2 else "1.1")
    assert body["alpn"] == ("h2" if http2 else "http/1.1")
    assert (body["tls_version"], body["asgi_tls"]["tls_version"]) == ("TLSv1.3", 0x0304)
    assert body["cipher"].startswith("TLS_")
    assert body["asgi_tls"]["client_cert_name"] == "O=spiced tests,CN=client"
    [pem] = body["asgi_tls"]["client_cert_chain"]
    assert x509.load_pem_x509_certificate(pem.encode()).serial_number == pki.client.serial


@PROTOCOLS
def test_anonymous_client_is_served_without_identity(server: Server, pki: Pki, http2: bool) -> None:
    with client(pki, http2=http2) as c:
        body = c.get(server.url + "/whoami").json()
    assert body["identity"] is None and body["asgi_tls"]["client_cert_chain"] == []


@pytest.mark.parametrize("server", ["required"], indirect=True)
@PROTOCOLS
def test_required_mode_admits_certless_connections_for_the_middleware_to_answer(server: Server, pki: Pki,
                                                                                  http2: bool) -> None:
    with client(pki, http2=http2) as c:
        assert c.get(server.url + "/whoami").json()["identity"] is None
    with client(pki, pki.client, http2=http2) as c:
        assert c.get(server.url + "/whoami").json()["identity"] == "O=spiced tests,CN=client"


@pytest.mark.parametrize("server", ["none"], indirect=True)
def test_mode_none_never_sees_a_certificate(server: Server, pki: Pki) -> None:
    with client(pki, pki.client, http2=True) as c:
        assert c.get(server.url + "/whoami").json()["identity"] is None


@pytest.mark.parametrize("which", ["foreign", "expired"])
@PROTOCOLS
def test_unverifiable_certificates_never_reach_the_app(server: Server, pki: Pki, http2: bool, which: str) -> None:
    issued = pki.foreign_client if which == "foreign" else pki.expired_client
    with client(pki, issued, http2=http2) as c, pytest.raises(httpx.TransportError):
        c.get(server.url + "/whoami")


@PROTOCOLS
def test_every_request_of_a_connection_carries_its_identity(server: Server, pki: Pki, http2: bool) -> None:
    with client(pki, pki.client, http2=http2) as c:
        bodies = [c.get(server.url + "/whoami").json() for _ in range(5)]
    assert {b["client_port"] for b in bodies} == {bodies[0]["client_port"]}  # one connection
    assert {b["identity"] for b in bodies} == {"O=spiced tests,CN=client"}


def test_concurrent_h2_streams_carry_identity(server: Server, pki: Pki) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    ctx.load_cert_chain(pki.client.cert, pki.client.key)

    async def many() -> list[Any]:
        async with httpx.AsyncClient(verify=ctx, http2=True, http1=False) as c:
            responses = await asyncio.gather(*(c.get(server.url + "/whoami") for _ in range(20)))
            return [r.json() for r in responses]

    bodies = asyncio.run(many())
    assert len({b["client_port"] for b in bodies}) == 1
    assert {(b["identity"], b["http_version"]) for b in bodies} == {("O=spiced tests,CN=client", "2")}


@PROTOCOLS
def test_keep_alive_connection_survives_a_rotation(server: Server, pki: Pki, http2: bool) -> None:
    v2 = pki.issue_server(f"rot-{'h2' if http2 else 'h11'}")
    with client(pki, pki.client, http2=http2) as c:
        before = c.get(server.url + "/whoami")
        rotate_pair(server.cert, server.key, v2)
        server.mgr.check_for_changes()
        after = c.get(server.url + "/whoami")
        assert after.status_code == 200
        assert after.json()["client_port"] == before.json()["client_port"]  # same connection
        assert served_serial(after) == pki.server.serial
    with client(pki, pki.client, http2=http2) as fresh:
        r = fresh.get(server.url + "/whoami")
        assert served_serial(r) == v2.serial and r.json()["identity"] == "O=spiced tests,CN=client"


def test_plaintext_is_not_answered_on_the_tls_port(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
    assert b"HTTP/" not in data and b"whoami" not in data


@PROTOCOLS
def test_small_responses_do_not_wait_for_delayed_acks(server: Server, pki: Pki, http2: bool) -> None:
    # Without TCP_NODELAY on accepted sockets each response took ~40 ms (Nagle + delayed ACK).
    with client(pki, http2=http2) as c:
        c.get(server.url + "/whoami")
        times = []
        for _ in range(30):
            start = time.perf_counter()
            c.get(server.url + "/whoami")
            times.append(time.perf_counter() - start)
    assert sorted(times)[len(times) // 2] < 0.02


def test_answering_before_the_body_is_read_is_not_an_error(server: Server, pki: Pki,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    # The client is still sending when the server closes TLS: APPLICATION_DATA_AFTER_CLOSE_NOTIFY,
    # which Hypercorn alone reports as an app error and an unhandled connection exception.
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            with client(pki, http2=False) as c:
                assert c.post(server.url + "/refuse", content=b"x" * 2_000_000).status_code == 401
            with client(pki, http2=False) as c:  # the server stays healthy
                assert c.get(server.url + "/whoami").status_code == 200
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []

"""spiced/http/hypercorn_patches.py `_release_when_delivered`: a TLS connection the server has closed is let go
about CLOSE_NOTIFY_GRACE after all it wrote has left, not 30 s later (asyncio waits that long for
the client's close_notify), and never before: a client that stops reading for longer than the
grace still gets every byte. Real asyncio TLS server, real ssl client socket."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

from spiced.http.hypercorn_patches import CLOSE_NOTIFY_GRACE, _release_when_delivered
from tests.pki import Pki
from tests.tlsprobe import LoopThread, client_context

ANSWER = 8 * 1024 * 1024  # far beyond what the kernel buffers for a client that does not read


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    with LoopThread() as lt:
        yield lt


class _Answer(asyncio.Protocol):
    """Writes ANSWER bytes at once, closes, and hands the close to `_release_when_delivered`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        ssl_protocol: Any = transport._ssl_protocol
        tcp = ssl_protocol._transport
        transport.write(b"x" * ANSWER)
        transport.close()
        self.release = asyncio.get_running_loop().create_task(_release_when_delivered(ssl_protocol, tcp))


async def _serve(ctx: ssl.SSLContext) -> int:
    server = await asyncio.get_running_loop().create_server(_Answer, "127.0.0.1", 0, ssl=ctx)
    return int(server.sockets[0].getsockname()[1])


def _server_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server.cert, pki.server.key)
    return ctx


def _connect(pki: Pki, port: int) -> ssl.SSLSocket:
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # a small window: the rest waits in the server
    raw.settimeout(10)
    raw.connect(("127.0.0.1", port))
    return client_context(pki).wrap_socket(raw, server_hostname="localhost")


def test_a_client_that_pauses_longer_than_the_grace_still_gets_everything(loop: LoopThread, pki: Pki) -> None:
    port = loop.call(_serve(_server_context(pki)))
    with _connect(pki, port) as s:
        time.sleep(CLOSE_NOTIFY_GRACE * 2.5)  # the answer is written and closed; most of it still waits
        received = 0
        while chunk := s.recv(65536):  # b"" at the server's close_notify
            received += len(chunk)
    assert received == ANSWER


def test_a_client_that_never_sends_close_notify_is_let_go_after_the_grace(loop: LoopThread, pki: Pki) -> None:
    port = loop.call(_serve(_server_context(pki)))
    with _connect(pki, port) as s:
        received = 0
        while chunk := s.recv(65536):
            received += len(chunk)
        assert received == ANSWER
        start = time.monotonic()
        # The client neither answers the close_notify nor closes; the server's FIN (or reset) comes anyway.
        try:
            while socket.socket.recv(s, 4096):
                pass
        except ConnectionResetError:
            pass
        assert time.monotonic() - start < CLOSE_NOTIFY_GRACE + 2

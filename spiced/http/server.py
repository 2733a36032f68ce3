"""Hypercorn, embedded, serving an ASGI app on a socket the runtime already bound.

With TLS, the listener context comes from the shared TLS manager (never from raw files), and each
connection's TLS facts (the verified client certificate, version, cipher) are published to request
handling through `current_tls_info()`.

Hypercorn 0.18 gives an ASGI app no way to reach the transport, so `_TlsAwareTCPServer` replaces
its connection handler (`hypercorn.asyncio.run.TCPServer`, looked up at call time): it reads the
finished handshake and sets a ContextVar before the connection's tasks start, and every request
task of that connection, HTTP/1.1 or each h2 stream, inherits it. The same subclass sets
TCP_NODELAY and tolerates the TLS error of closing on a client that is still sending. Hypercorn
is pinned in pyproject.toml for this; tests/test_http_identity.py guards it over h11 and h2.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import hypercorn.asyncio.run
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.run import worker_serve
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config, Sockets

from ..identity import ClientIdentity

log = logging.getLogger("runtime.http")

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """The TLS side of one connection. `identity` is set only for a certificate that verified."""

    identity: ClientIdentity | None
    tls_version: str | None  # "TLSv1.3"
    cipher: str | None  # OpenSSL name, e.g. "TLS_AES_256_GCM_SHA384"
    alpn: str | None

    @classmethod
    def from_ssl_object(cls, obj: ssl.SSLObject) -> TlsInfo:
        # With a client CA loaded, a certificate that fails verification aborts the handshake,
        # so any peer certificate seen here has been verified.
        der = obj.getpeercert(binary_form=True)
        cipher = obj.cipher()
        return cls(ClientIdentity.from_der(der) if der else None, obj.version(),
                   cipher[0] if cipher else None, obj.selected_alpn_protocol())

    def asgi_extension(self) -> dict[str, Any]:
        """The ASGI TLS extension (`scope["extensions"]["tls"]`) for this connection."""
        chain = [ssl.DER_cert_to_PEM_cert(self.identity.der)] if self.identity else []
        return {
            "server_cert": None,
            "client_cert_chain": chain,
            "client_cert_name": self.identity.subject if self.identity else None,
            "client_cert_error": None,
            "tls_version": _TLS_VERSIONS.get(self.tls_version or ""),
            "cipher_suite": None,  # Python exposes the suite's name, not its IANA number
        }


_tls_info: ContextVar[TlsInfo | None] = ContextVar("spiced_tls_info", default=None)


def current_tls_info() -> TlsInfo | None:
    """TLS facts of the connection the current request arrived on (None for plaintext)."""
    return _tls_info.get()


class _TlsAwareTCPServer(TCPServer):
    async def run(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets TCP_NODELAY only on sockets created with proto=IPPROTO_TCP; without it a
            # response written in two parts waits ~40 ms for the client's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            _tls_info.set(TlsInfo.from_ssl_object(ssl_object))
        await super().run()

    async def _close(self) -> None:
        try:
            await super()._close()
        except ssl.SSLError:
            # Closing TLS while the client is still sending (a request body the app answered, e.g.
            # with a 401, without reading) ends in APPLICATION_DATA_AFTER_CLOSE_NOTIFY. Hypercorn
            # expects only plain socket errors here and would report it as an app error; the
            # connection is closed either way.
            pass


    async def _initiate_server_close(self) -> None:
        await super()._initiate_server_close()
        if self.context.terminated.is_set():
            # An idle keep-alive connection closed for shutdown: its client is not reading, so it
            # never answers TLS close_notify, and waiting for that would hold the exit for the
            # whole drain bound. Nothing is in flight on it, so dropping it loses nothing.
            self.writer.transport.abort()


hypercorn.asyncio.run.TCPServer = _TlsAwareTCPServer  # type: ignore[attr-defined]


class ListenerConfig(Config):
    """Hypercorn config whose TLS context is supplied by the caller (the TLS manager)."""

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._listener_context = ssl_context

    @property
    def ssl_enabled(self) -> bool:
        return self._listener_context is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._listener_context


def make_config(ssl_context: ssl.SSLContext | None, *, graceful_timeout: float = 10.0) -> ListenerConfig:
    cfg = ListenerConfig(ssl_context)
    cfg.graceful_timeout = graceful_timeout
    cfg.keep_alive_max_requests = 1_000_000_000  # Hypercorn's default (1000) closes busy keep-alive connections
    cfg.keep_alive_timeout = 15  # also bounds a client that trickles its request headers
    cfg.h11_max_incomplete_size = 64 * 1024
    cfg.ssl_handshake_timeout = 10
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    return cfg


async def serve(app: Any, sock: socket.socket, ssl_context: ssl.SSLContext | None, shutdown: asyncio.Event,
                *, graceful_timeout: float = 10.0) -> None:
    cfg = make_config(ssl_context, graceful_timeout=graceful_timeout)
    sockets = Sockets([sock], [], []) if ssl_context is not None else Sockets([], [sock], [])
    # worker_serve takes Hypercorn's app wrapper, not the bare ASGI callable.
    await worker_serve(ASGIWrapper(app), cfg, sockets=sockets, shutdown_trigger=shutdown.wait)

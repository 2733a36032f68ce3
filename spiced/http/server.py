"""Hypercorn, embedded, serving an ASGI app on a socket the runtime already bound.

With TLS, the listener context comes from the shared TLS manager (never from raw files). Hypercorn's
internals are extended in spiced/http/hypercorn_patches.py, installed by `serve()`; the TLS facts of
each connection reach request handling through spiced/http/tls_info.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets

from . import hypercorn_patches


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
    hypercorn_patches.install()
    cfg = make_config(ssl_context, graceful_timeout=graceful_timeout)
    sockets = Sockets([sock], [], []) if ssl_context is not None else Sockets([], [sock], [])
    # worker_serve takes Hypercorn's app wrapper, not the bare ASGI callable.
    await worker_serve(ASGIWrapper(app), cfg, sockets=sockets, shutdown_trigger=shutdown.wait)

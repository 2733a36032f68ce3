"""Binding the runtime's TCP sockets up front, so bind failures stop start-up with one clear line
and port 0 resolves to a real address before anything is logged."""

from __future__ import annotations

import socket

from .errors import ConfigError

_NAMES = {"http": "HTTP", "flight": "Flight", "metrics": "Metrics"}


def bind_tcp(name: str, address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # lets asyncio set TCP_NODELAY
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as e:
        sock.close()
        reason = f"{e.strerror} (os error {e.errno})" if e.errno else str(e)
        raise ConfigError(
            f"Unable to start Spice Runtime servers: Unable to start {_NAMES[name]} server: "
            f"Unable to bind to address: {reason}"
        ) from None
    sock.setblocking(False)
    return sock


def display_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""Dask's `Security` from the cluster TLS profile.

Dask hands `ssl_context` to Tornado, which calls `wrap_socket` for every connection, inbound and
outbound. `NodeContext` passes Dask's `isinstance(ctx, ssl.SSLContext)` check but never handshakes
itself: each wrap goes to the profile's current context, so new connections pick up rotated material
while open ones keep what they were wrapped with.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

import distributed

from ..tls.cluster import ClusterTls


class NodeContext(ssl.SSLContext):
    _current: Callable[[], ssl.SSLContext]

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return self._current().wrap_socket(sock, server_side, do_handshake_on_connect, suppress_ragged_eofs,
                                           server_hostname, session)

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return self._current().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def node_context(current: Callable[[], ssl.SSLContext], *, server_side: bool) -> NodeContext:
    ctx = NodeContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx._current = current
    return ctx


class ClusterSecurity(distributed.Security):
    """mTLS for every role (scheduler, worker, client) from one node's profile."""

    def __init__(self, tls: ClusterTls) -> None:
        super().__init__(require_encryption=True)
        self._listen = node_context(lambda: tls.current(server_side=True), server_side=True)
        self._connect = node_context(lambda: tls.current(server_side=False), server_side=False)

    def get_listen_args(self, role: str) -> dict[str, Any]:
        return {"ssl_context": self._listen, "require_encryption": True}

    def get_connection_args(self, role: str) -> dict[str, Any]:
        return {"ssl_context": self._connect, "require_encryption": True, "extra_conn_args": {}}


def security_for(tls: ClusterTls | None) -> distributed.Security:
    """mTLS from the profile, or plaintext when the node runs with --allow-insecure-connections."""
    return ClusterSecurity(tls) if tls is not None else distributed.Security(require_encryption=False)

"""Dask settings for a node: no HTTP routes (the dashboard servers Dask always starts are bound to
127.0.0.1 by the callers and answer nothing), no profiler sampling the worker threads, bounded
connects, and one log line per refused handshake (ours, spiced/tls/cluster.py, naming the peer) instead
of Dask's repeats."""

from __future__ import annotations

import logging

import dask

# Dask starts an HTTP server on every scheduler and worker even with the dashboard off.
LOOPBACK_EPHEMERAL = "127.0.0.1:0"

_SETTINGS = {
    "distributed.scheduler.http.routes": [],
    "distributed.worker.http.routes": [],
    "distributed.worker.profile.enabled": False,
    "distributed.comm.timeouts.connect": "10s",
}


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._prefix)


_configured = False


def configure() -> None:
    """Apply the settings above to this process (once)."""
    global _configured
    if _configured:
        return
    _configured = True
    dask.config.set(_SETTINGS)
    # Dask's listener repeats each failed handshake that NodeSocket has already logged with its peer.
    logging.getLogger("distributed.comm.tcp").addFilter(_DropPrefix("Listener on %r: TLS handshake failed"))
    # A worker that fails to start cannot tell a scheduler it never reached; the executor says why.
    logging.getLogger("distributed.worker").addFilter(_DropPrefix("Failed to log closing event"))

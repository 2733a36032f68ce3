"""The Dask scheduler inside a `--role scheduler` runtime: the node listener, the app-definition
handler executors call before they join, and the in-process client behind `ClusterNode`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed import Client, Scheduler

from ..config import ClusterSettings, Spicepod
from ..errors import ConfigError
from ..tls.cluster import ClusterTls
from ..tls.material import os_error_text
from . import daskconf
from .definition import HANDLER, definition
from .node import ClusterNode, endpoint_of
from .security import security_for

log = logging.getLogger("runtime.cluster.servers")


async def start_scheduler(settings: ClusterSettings, tls: ClusterTls | None, spicepod: Callable[[], Spicepod],
                          workdir: Path) -> ClusterNode:
    """Listen on the node port and serve; ConfigError when the port cannot be bound.

    `spicepod` gives the runtime's current spicepod: executors get the one in effect when they ask."""
    daskconf.configure()
    security = security_for(tls)
    host, port = settings.bind_addr
    scheduler = Scheduler(host=host, port=port, protocol=settings.scheme, security=security, dashboard=False,
                          dashboard_address=daskconf.LOOPBACK_EPHEMERAL)
    try:
        await scheduler
    except RuntimeError as e:
        cause = e.__cause__
        reason = os_error_text(cause) if isinstance(cause, OSError) else str(cause or e)
        raise ConfigError("Unable to start Spice Runtime servers: Unable to start cluster server: "
                          f"Unable to bind to address: {reason}") from None

    def app_definition() -> dict[str, Any]:
        return definition(spicepod(), workdir)

    scheduler.handlers[HANDLER] = app_definition
    endpoint = endpoint_of(scheduler.listeners[0].listen_address)
    # The runtime's own client needs no network: a second, in-process listener. The client is synchronous,
    # on its own IO thread, for query threads (its handshake with the scheduler needs this loop: a thread).
    await scheduler.listen("inproc://")
    client = await asyncio.to_thread(Client, scheduler.listeners[-1].contact_address, security=security,
                                     set_as_default=False)
    if tls is not None:
        log.info("Cluster mTLS enabled for internal cluster server")
    else:
        log.warning("Cluster mTLS disabled for internal cluster server (--allow-insecure-connections flag is set)")
    log.info("Spice Runtime internal cluster server listening on %s", endpoint)
    return ClusterNode(scheduler, client, tls, endpoint)

"""The scheduler's view of the cluster, for query execution: a Dask client and the executors."""

from __future__ import annotations

import asyncio
from contextlib import suppress
from dataclasses import dataclass
from typing import Literal

from distributed import Client, Scheduler
from distributed.comm import get_address_host_port

from ..tls.cluster import ClusterTls
from ..tls.expiry import CertificateFacts

ExecutorStatus = Literal["Initializing", "Ready", "ShuttingDown"]
_STATUS: dict[str, ExecutorStatus] = {"running": "Ready", "paused": "Ready", "closing_gracefully": "ShuttingDown",
                                      "closing": "ShuttingDown", "closed": "ShuttingDown"}


@dataclass(frozen=True, slots=True)
class ExecutorInfo:
    address: str  # Dask's address: tls://host:port
    name: str
    nthreads: int
    status: ExecutorStatus

    @property
    def endpoint(self) -> str:
        return endpoint_of(self.address)


def endpoint_of(address: str) -> str:
    """`host:port` of a Dask address (`tls://host:port`), as the runtime's listeners are shown."""
    host, port = get_address_host_port(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ClusterNode:
    """A scheduler node. `client` is a synchronous Dask client on its own IO thread: call it from threads
    (query execution), never from the runtime's event loop, which runs the scheduler it talks to. It
    reaches the scheduler in-process, and executors over mTLS with this node's certificate."""

    def __init__(self, scheduler: Scheduler, client: Client, tls: ClusterTls | None, endpoint: str) -> None:
        self.client = client
        self.tls = tls
        self.endpoint = endpoint  # the node port as bound: host:port
        self._scheduler = scheduler

    def executors(self) -> tuple[ExecutorInfo, ...]:
        """The executors registered with the scheduler now, in address order (callable from any thread)."""
        return tuple(ExecutorInfo(ws.address, str(ws.name), ws.nthreads, _STATUS.get(ws.status.name, "Initializing"))
                     for ws in sorted(self._scheduler.workers.values(), key=lambda ws: ws.address))

    def threads(self) -> dict[str, int]:
        """Each registered executor's address → its threads (callable from any thread, no round trip)."""
        return {ws.address: ws.nthreads for ws in list(self._scheduler.workers.values())}

    async def wait_for_executors(self, count: int, timeout: float) -> None:
        """Until `count` executors are registered (TimeoutError after `timeout` seconds)."""
        async with asyncio.timeout(timeout):
            while len(self._scheduler.workers) < count:
                await asyncio.sleep(0.05)

    def certificates(self) -> tuple[CertificateFacts, ...]:
        return self.tls.certificates() if self.tls is not None else ()

    async def close(self, timeout: float) -> None:
        """Close the client, then the scheduler (its executors see the connection end and rejoin later)."""
        with suppress(Exception):
            await asyncio.wait_for(asyncio.to_thread(self.client.close, timeout / 2), timeout / 2)
        with suppress(Exception):
            await asyncio.wait_for(self._scheduler.close(), timeout / 2)

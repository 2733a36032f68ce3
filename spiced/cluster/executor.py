"""A cluster executor process: its lifecycle, from the node material to the Dask worker.

Order: cluster mTLS material (bad material ends the process, exit 1) → bind the HTTP health listener
→ serve it → join: fetch the app definition from the scheduler, then start a Dask `Worker` in this
process (no Nanny: the worker keeps the live TLS profile) with the spicepod installed before it
registers. A scheduler that cannot be reached, or that goes away, is retried with Fibonacci backoff
(up to 5 s), as upstream's poll loop does. SIGINT/SIGTERM close the worker (bounded) and exit 0;
SIGHUP reloads the node material.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Iterator
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from distributed import Worker
from distributed.core import rpc

from ..config import DEFAULT_EXPIRY_WARNING_DAYS, ClusterSettings, ExecutorConfig, Spicepod
from ..errors import ConfigError
from ..listeners import bind_tcp, display_address
from ..metrics import Metrics
from ..tls.cluster import ClusterTls
from ..tls.expiry import monitor_for
from ..tls.material import os_error_text
from . import daskconf
from .definition import HANDLER, received_spicepod
from .health import health_app, metrics_app
from .node import endpoint_of
from .plugin import SpicepodPlugin
from .security import security_for

if TYPE_CHECKING:
    from ..tls.manager import TlsManager

log = logging.getLogger("runtime")
spiced_log = logging.getLogger("spiced")
cluster_log = logging.getLogger("runtime.cluster")
servers_log = logging.getLogger("runtime.cluster.servers")

JOIN_TIMEOUT = 10.0  # one attempt to register with the scheduler
BACKOFF_MAX = 5.0
DRAIN_SECONDS = 10.0


def fibonacci_backoff(limit: float = BACKOFF_MAX) -> Iterator[float]:
    a, b = 0.5, 0.5
    while True:
        yield min(a, limit)
        a, b = b, a + b


class ExecutorRuntime:
    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._http_shutdown = asyncio.Event()
        self._sockets: dict[str, socket.socket] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._worker: Worker | None = None
        self._cluster_tls: ClusterTls | None = None
        self._public_tls: TlsManager | None = None
        self._failure: ConfigError | None = None  # ends the process with exit 1 once drained

    @property
    def ready(self) -> bool:
        worker = self._worker
        return worker is not None and worker.status.name == "running"

    # ------------------------------------------------------------------ entry

    def run(self) -> int:
        from ..http import hypercorn_patches

        try:
            hypercorn_patches.install()
        except hypercorn_patches.HypercornMismatch as e:
            raise ConfigError(f"Unable to start Spice Runtime servers: {e}") from None
        mtls = self.config.cluster.mtls
        if mtls is not None:
            self._cluster_tls = ClusterTls.create(mtls, self.metrics)
        if self.config.tls is not None:
            from ..tls.manager import TlsManager

            self._public_tls = TlsManager.create(self.config.tls, self.metrics)
        try:
            self._sockets["http"] = bind_tcp("http", self.config.http_addr)
            if self.config.metrics_addr is not None:
                self._sockets["metrics"] = bind_tcp("metrics", self.config.metrics_addr)
            code = asyncio.run(self._serve())
        finally:
            for sock in self._sockets.values():
                with suppress(OSError):
                    sock.close()
        if self._failure is not None:
            raise self._failure
        return code

    async def _serve(self) -> int:
        from ..http.server import serve

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        for warning in (*self.config.cluster.warnings, *self.config.warnings):
            log.warning("%s", warning)
        spiced_log.info("Starting as a cluster executor, without a Spicepod. The runtime will initialize its "
                        "components upon joining the cluster.")
        daskconf.configure()
        public = self._public_tls
        http_sock = self._sockets["http"]
        self._spawn(serve(health_app(lambda: self.ready), http_sock,
                          public.listener_context("http") if public else None, self._http_shutdown,
                          graceful_timeout=DRAIN_SECONDS))
        logging.getLogger("runtime.http").info("Spice Runtime HTTP health endpoint listening on %s",
                                               display_address(http_sock))
        if "metrics" in self._sockets:
            msock = self._sockets["metrics"]
            self._spawn(serve(metrics_app(self.metrics), msock,
                              public.listener_context("metrics") if public else None, self._http_shutdown,
                              graceful_timeout=DRAIN_SECONDS))
            logging.getLogger("runtime.metrics_server").info("Spice Runtime Metrics listening on %s",
                                                             display_address(msock))
        expiry = monitor_for(public.expiry if public else None,
                             self._cluster_tls.certificates if self._cluster_tls else None, self.metrics,
                             self.config.tls.expiry_warning_days if self.config.tls else DEFAULT_EXPIRY_WARNING_DAYS)
        if expiry is not None:
            self._spawn(expiry.run(self._stop))
        if public is not None:
            public.log_startup()
            if self.config.tls is not None and self.config.tls.reloadable:
                self._spawn(public.watch(self._stop, notifications=self.config.tls.watch == "notify"))
        if self._cluster_tls is not None:
            self._spawn(self._cluster_tls.watch(self._stop))
        self._spawn(asyncio.to_thread(_warm_datafusion))
        joining = asyncio.create_task(self._join(), name="cluster join")
        await self._stop.wait()
        await self._drain(joining)
        if self._failure is None:
            log.info("Goodbye!")
        return 0

    def _spawn(self, work: Awaitable[Any]) -> None:
        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("executor component failed: %s", e)
                self._stop.set()

        self._tasks.append(asyncio.create_task(guarded()))

    # ------------------------------------------------------------------ joining the cluster

    async def _join(self) -> None:
        settings = self.config.cluster
        security = security_for(self._cluster_tls)
        delays = fibonacci_backoff()
        while not self._stop.is_set():
            try:
                spicepod = await self._fetch_spicepod(security)
                worker = await self._start_worker(security, spicepod)
            except Exception as e:  # any failure to join is retried, but a node port taken by another process
                self._failure = _bind_failure(e)
                if self._failure is not None:
                    self._stop.set()
                    return
                _log_join_failure(settings, e)
                await self._pause(next(delays))
                continue
            delays = fibonacci_backoff()
            self._worker = worker
            await worker.finished()
            if self._stop.is_set():
                return
            self._worker = None
            cluster_log.warning("Scheduler poll loop ended for %s: the connection to the scheduler was lost",
                                settings.scheduler_url)
            await self._pause(next(delays))

    async def _fetch_spicepod(self, security: Any) -> Spicepod:
        settings = self.config.cluster
        async with rpc(settings.scheduler_address, connection_args=security.get_connection_args("worker")) as r:
            message = await getattr(r, HANDLER)()
        assert settings.scheduler is not None
        host, port = settings.scheduler
        cluster_log.info("Scheduler membership: %s", json.dumps([f"{host}:{port}"]))
        spicepod = received_spicepod(message)
        cluster_log.info("Received spicepod %s from the scheduler: %d datasets, %d views", spicepod.name,
                         len(spicepod.datasets), len(spicepod.views))
        for warning in spicepod.warnings:
            cluster_log.warning("%s", warning)
        return spicepod

    async def _start_worker(self, security: Any, spicepod: Spicepod) -> Worker:
        settings = self.config.cluster
        host, port, contact = _listen_address(settings)
        worker = Worker(settings.scheduler_address, security=security, host=host, port=port,
                        protocol=settings.scheme, contact_address=contact, dashboard=False,
                        dashboard_address=daskconf.LOOPBACK_EPHEMERAL, death_timeout=JOIN_TIMEOUT,
                        plugins=(SpicepodPlugin(spicepod),))
        await worker
        if self._cluster_tls is not None:
            servers_log.info("Cluster mTLS enabled for executor server")
        else:
            servers_log.warning("Cluster mTLS disabled for executor server (--allow-insecure-connections flag is set)")
        servers_log.info("Spice Runtime executor listening on %s (advertised as %s)",
                         endpoint_of(worker.listen_address), worker.contact_address)
        return worker

    async def _pause(self, seconds: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    # ------------------------------------------------------------------ signals and shutdown

    def _on_stop(self) -> None:
        if self._stop.is_set():
            spiced_log.warning("Second signal received, exiting now")
            os._exit(0)
        self._stop.set()

    def _on_sighup(self) -> None:
        if self._cluster_tls is not None:
            spiced_log.info("TLS reload: SIGHUP received, reloading TLS material")
            self._cluster_tls.reload_all()
        if self._public_tls is not None and self.config.tls is not None and self.config.tls.reloadable:
            self._public_tls.reload_all("sighup")

    async def _drain(self, joining: asyncio.Task[None]) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
        worker = self._worker
        if worker is not None:
            # A heartbeat in flight when the close shuts the worker's connections fails, and Dask
            # logs that as an ERROR with a traceback: on our own shutdown it is not one.
            logging.getLogger("distributed.worker").addFilter(_not_heartbeat_failure)
            with suppress(Exception):
                await asyncio.wait_for(worker.close(reason="spiced shutdown"), DRAIN_SECONDS)
        joining.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await joining
        self._http_shutdown.set()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=max(deadline - time.monotonic(), 0.1))
            for t in late:
                t.cancel()


def _not_heartbeat_failure(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to communicate with scheduler during heartbeat")


def _listen_address(settings: ClusterSettings) -> tuple[str, int, str | None]:
    """Where the worker listens, and the address it gives the cluster when that is not the bound one.

    An advertised host other than the bound one needs the port up front: an ephemeral port (0) is
    chosen here, by binding it once."""
    host, port = settings.bind_addr
    if settings.advertise_host == host:
        return host, port, None
    if port == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
    advertised = f"[{settings.advertise_host}]" if ":" in settings.advertise_host else settings.advertise_host
    return host, port, f"{settings.scheme}://{advertised}:{port}"


def _bind_failure(e: BaseException) -> ConfigError | None:
    """A worker that cannot listen on --node-bind-address ends the executor (exit 1), as a bind does."""
    cause = e.__cause__ or e  # Dask wraps start failures (`Worker failed to start.`)
    if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
        return ConfigError("Unable to start Spice Runtime servers: Unable to start executor server: "
                           f"Unable to bind to address: {os_error_text(cause)}")
    return None


def _log_join_failure(settings: ClusterSettings, e: BaseException) -> None:
    if isinstance(e, ConfigError):  # the definition arrived but does not build here
        cluster_log.warning("Unable to load the spicepod received from the scheduler at %s: %s",
                            settings.scheduler_url, e)
        return
    cluster_log.warning("Unable to connect to scheduler at %s: %s", settings.scheduler_url, _root_cause(e))


def _root_cause(e: BaseException) -> str:
    """The first error of a chain: Dask wraps a refused connect twice (`Timed out…`, `in <TLSConnector…>`)."""
    while e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, OSError) and e.errno is not None and not isinstance(e, ssl.SSLError):
        return os_error_text(e)
    return str(e) or type(e).__name__


def _warm_datafusion() -> None:
    """Load DataFusion's native library now, not in the first task (0.8-1.6 s measured)."""
    import datafusion

    datafusion.SessionContext()

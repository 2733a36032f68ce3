"""Start order, signals, readiness and bounded shutdown: the one owner of the process lifecycle.

Order, as upstream: config is already valid → TLS material → bind every socket → serve → load
datasets in the background, so bad TLS material or a taken port ends the process before anything
is served. SIGINT/SIGTERM drain (bounded) and exit 0; a second one forces exit. SIGHUP reloads
file-backed TLS material.

With `--role scheduler` the cluster's node material is loaded with the public TLS material and the
Dask scheduler (spiced/cluster/scheduler.py) starts before any other listener serves, so a bad node
certificate or a taken node port also ends the process first. Executors run
spiced/cluster/executor.py instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .auth import ApiKeys
from .config import DEFAULT_EXPIRY_WARNING_DAYS, RuntimeConfig
from .engine import Engine
from .errors import ConfigError
from .listeners import bind_tcp, display_address
from .metrics import Metrics
from .state import RuntimeState
from .tls.expiry import monitor_for

if TYPE_CHECKING:
    from .jobs import Jobs
    from .tls.cluster import ClusterTls

log = logging.getLogger("runtime")
spiced_log = logging.getLogger("spiced")
DRAIN_SECONDS = 10.0


class Runtime:
    def __init__(self, config: RuntimeConfig, args: argparse.Namespace | None = None) -> None:
        self.config = config
        self.args = args  # read again when the spicepod changes (--pods-watcher-enabled)
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._http_shutdown = asyncio.Event()
        self._sockets: dict[str, socket.socket] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._flight: Any = None
        self._front: Any = None
        self._private_dir: Path | None = None
        self._cluster_tls: ClusterTls | None = None
        self._jobs: Jobs | None = None  # a scheduler's async queries (/v1/queries), cancelled by _drain

    # ------------------------------------------------------------------ entry

    def run(self) -> int:
        from .http import hypercorn_patches

        try:
            hypercorn_patches.install()
        except hypercorn_patches.HypercornMismatch as e:
            raise ConfigError(f"Unable to start Spice Runtime servers: {e}") from None
        tls = None
        if self.config.tls is not None:
            from .tls.manager import TlsManager

            tls = TlsManager.create(self.config.tls, self.metrics)  # raises TlsConfigError → exit 1
        if self.config.cluster is not None and self.config.cluster.mtls is not None:
            from .tls.cluster import ClusterTls

            self._cluster_tls = ClusterTls.create(self.config.cluster.mtls, self.metrics)  # ConfigError → exit 1
        self._bind_all()
        engine = Engine(self.config.spicepod, self.metrics, self.config.results_cache)
        self.state = RuntimeState(self.config, engine, self.metrics, ApiKeys(self.config.api_keys), tls)
        try:
            return asyncio.run(self._serve())
        finally:
            self._cleanup()

    def _bind_all(self) -> None:
        try:
            self._sockets["http"] = bind_tcp("http", self.config.http_addr)
            if self.config.tls is not None:
                self._sockets["flight"] = bind_tcp("flight", self.config.flight_addr)
            if self.config.metrics_addr is not None:
                self._sockets["metrics"] = bind_tcp("metrics", self.config.metrics_addr)
        except ConfigError:
            self._cleanup()
            raise

    def _cleanup(self) -> None:
        for sock in self._sockets.values():
            with suppress(OSError):
                sock.close()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)

    # ------------------------------------------------------------------ serving

    async def _serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        state, tls = self.state, self.state.tls
        if self.config.cluster is not None:
            await self._start_scheduler()
        for warning in self.config.spicepod.warnings:
            log.warning("%s", warning)
        state.engine.datasets.register_all()

        from .http.app import create_app, create_metrics_app
        from .http.server import serve

        self._start_flight()
        http_sock = self._sockets["http"]
        self._tasks.append(asyncio.create_task(self._guard("http", serve(
            create_app(state, self._new_jobs()), http_sock, tls.listener_context("http") if tls else None,
            self._http_shutdown, graceful_timeout=DRAIN_SECONDS))))
        self._listening("http", display_address(http_sock), "runtime.http", "HTTP")
        self.metrics.http_server_started.add(1)
        if "metrics" in self._sockets:
            msock = self._sockets["metrics"]
            self._tasks.append(asyncio.create_task(self._guard("metrics", serve(
                create_metrics_app(state), msock, tls.listener_context("metrics") if tls else None,
                self._http_shutdown, graceful_timeout=DRAIN_SECONDS))))
            self._listening("metrics", display_address(msock), "runtime.metrics_server", "Metrics")
        expiry = monitor_for(tls.expiry if tls else None, self._cluster_tls.certificates if self._cluster_tls else None,
                             self.metrics, self.config.tls.expiry_warning_days if self.config.tls else
                             DEFAULT_EXPIRY_WARNING_DAYS)
        if expiry is not None:
            self._tasks.append(asyncio.create_task(expiry.run(self._stop)))
        if tls is not None and self.config.tls is not None:
            tls.log_startup()
            if self.config.tls.reloadable:
                notifications = self.config.tls.watch == "notify"
                self._tasks.append(asyncio.create_task(tls.watch(self._stop, notifications=notifications)))
        if self._cluster_tls is not None:
            self._tasks.append(asyncio.create_task(self._cluster_tls.watch(self._stop)))
        if state.api_keys.enabled and state.client_auth_mode == "required":
            log.info("mTLS-as-channel mode active: client cert AND `runtime.auth` credentials are both required")

        self._tasks.append(asyncio.create_task(state.engine.datasets.load_all()))
        if self.config.pods_watcher and self.args is not None:
            from .pods_watcher import PodsWatcher

            watcher = PodsWatcher(self.config, self.args, state.engine)
            self._tasks.append(asyncio.create_task(watcher.run(self._stop), name="pods watcher"))
        await self._stop.wait()
        await self._drain()
        self.state.engine.close()
        log.info("Goodbye!")
        return 0

    async def _start_scheduler(self) -> None:
        from .cluster.scheduler import start_scheduler

        settings = self.config.cluster
        assert settings is not None
        for warning in settings.warnings:
            log.warning("%s", warning)
        engine = self.state.engine
        self.state.cluster = await start_scheduler(settings, self._cluster_tls, lambda: engine.spicepod,
                                                   self.config.workdir)
        from .cluster.execution import ClusterExecutor

        executor = ClusterExecutor(self.state.cluster.client, threads=self.state.cluster.threads)
        # A synchronous client: off the loop that runs the scheduler.
        await asyncio.to_thread(executor.prepare)
        engine.cluster = executor

    def _new_jobs(self) -> Jobs | None:
        if self.state.cluster is None:
            return None
        from .jobs import Jobs

        self._jobs = Jobs(self.state.engine, result_ttl=self.config.async_query_ttl)
        return self._jobs

    def _listening(self, name: str, address: str, logger: str, label: str) -> None:
        endpoint = self.state.endpoints[name]
        endpoint.address, endpoint.status = address, "Ready"
        logging.getLogger(logger).info("Spice Runtime %s listening on %s", label, address)

    async def _guard(self, name: str, work: Awaitable[None]) -> None:
        """A listener that dies stops the runtime instead of leaving a half-served process."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("%s listener failed: %s", name, e)
            self.state.endpoints[name].status = "Error"
            self._stop.set()

    def _start_flight(self) -> None:
        from .flight.service import SpiceFlightServer

        state, tls = self.state, self.state.tls
        if tls is None:
            host, port = self.config.flight_addr
            try:
                self._flight = SpiceFlightServer(f"grpc://{host}:{port}", state)
            except Exception as e:
                raise ConfigError(
                    f"Unable to start Spice Runtime servers: Unable to start Flight server: {e}") from None
            address = f"{host}:{self._flight.port}"
        else:
            from .flight.front_process import FlightFrontProcess

            self._private_dir = Path(tempfile.mkdtemp(prefix="spiced-"))
            os.chmod(self._private_dir, 0o700)
            backend = str(self._private_dir / "flight.sock")
            self._front = FlightFrontProcess(self._sockets["flight"], backend, tls, self.metrics,
                                             on_serving=self._flight_serving)
            self._flight = SpiceFlightServer(f"grpc+unix://{backend}", state, identities=self._front.identity_for)
            self._front.start()
            address = display_address(self._sockets["flight"])
        self._listening("flight", address, "runtime.flight", "Flight")
        self.metrics.flight_server_started.add(1)

    def _flight_serving(self, serving: bool) -> None:
        """From the front's supervisor: whether a Flight TLS front is serving (readiness follows)."""
        self.state.endpoints["flight"].status = "Ready" if serving else "Error"

    # ------------------------------------------------------------------ signals and shutdown

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        def on_stop() -> None:
            if self._stop.is_set():
                spiced_log.warning("Second signal received, exiting now")
                os._exit(0)
            self._stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        tls = self.state.tls
        public = tls is not None and self.config.tls is not None and self.config.tls.reloadable
        if not public and self._cluster_tls is None:
            return
        spiced_log.info("TLS reload: SIGHUP received, reloading TLS material")
        if public and tls is not None:
            tls.reload_all("sighup")
        if self._cluster_tls is not None:
            self._cluster_tls.reload_all()

    async def _drain(self) -> None:
        """Stop accepting everywhere, let in-flight requests and streams finish within DRAIN_SECONDS."""
        self._http_shutdown.set()
        self.state.engine.datasets.stop()
        flight_done = asyncio.create_task(self._stop_flight())
        listeners = [t for t in self._tasks if not t.done()]
        if self._jobs is not None:  # running async queries are cancelled, not drained
            listeners.append(asyncio.create_task(asyncio.to_thread(self._jobs.close, DRAIN_SECONDS)))
        done, pending = await asyncio.wait([flight_done, *listeners], timeout=DRAIN_SECONDS + 1)
        for t in pending:
            t.cancel()
        for t in pending:
            with suppress(asyncio.CancelledError, Exception):
                await t
        if self.state.cluster is not None:
            await self.state.cluster.close(timeout=5.0)

    async def _stop_flight(self) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
        # gRPC's Shutdown closes a connection as soon as its last call has returned, which can cut
        # the tail of a stream still on its way through the TLS front. So the front stops accepting
        # first, and gRPC is shut down once the calls are over and their bytes have left the front.
        if self._front is not None and self._flight is not None:
            self._front.stop_accepting()
            while time.monotonic() < deadline:
                if self._flight.active_calls == 0 and await self._front.settled(0.1):
                    break
                await asyncio.sleep(0.05)
        # The front keeps open connections until gRPC closes them (or the bound is reached); gRPC's
        # Shutdown waits for running calls. Both block, so they run in threads under the bound.
        left = max(deadline - time.monotonic(), 0.0)
        stoppers = []
        if self._front is not None:
            stoppers.append(threading.Thread(target=self._front.stop, args=(left,), daemon=True))
        if self._flight is not None:
            stoppers.append(threading.Thread(target=self._flight.shutdown, daemon=True))
        for t in stoppers:
            t.start()
        for t in stoppers:
            await asyncio.to_thread(t.join, left + 1.0)

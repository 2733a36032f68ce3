"""The HTTP API through a real Hypercorn on port 0, in-process, for the HTTP tests:

    with api_server(loop, make_state(workdir)) as api:
        httpx.post(api.url + "/v1/sql", content="SELECT 1")
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from spiced.auth import ApiKeys
from spiced.config import load_config
from spiced.engine import Engine
from spiced.http.app import create_app
from spiced.http.server import serve
from spiced.metrics import Metrics
from spiced.state import Endpoint, RuntimeState
from tests.tlsprobe import LoopThread


@dataclass
class ApiServer:
    url: str
    port: int
    state: RuntimeState


def make_state(workdir: Path, *, tls: Any = None, api_keys: tuple[str, ...] | None = None,
               metrics: Metrics | None = None) -> RuntimeState:
    """The runtime state for the spicepod in `workdir` (datasets are loaded by `api_server`)."""
    config = load_config([], workdir=workdir)
    metrics = metrics or Metrics()
    keys = ApiKeys(config.api_keys if api_keys is None else api_keys)
    return RuntimeState(config, Engine(config.spicepod, metrics), metrics, keys, tls)


@contextmanager
def api_server(loop: LoopThread, state: RuntimeState, *, ssl_context: ssl.SSLContext | None = None,
               factory: Callable[[RuntimeState], Starlette] = create_app, load: bool = True) -> Iterator[ApiServer]:
    """Hypercorn serving `factory(state)` on 127.0.0.1:0; the socket listens before serving starts,
    so clients can connect at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    state.endpoints["http"] = Endpoint("http", f"127.0.0.1:{port}", "Ready")

    async def start() -> tuple[asyncio.Event, asyncio.Task[None]]:
        if load:
            state.engine.datasets.register_all()
            await state.engine.datasets.load_all()
        shutdown = asyncio.Event()
        task = asyncio.create_task(serve(factory(state), sock, ssl_context, shutdown, graceful_timeout=1.0))
        return shutdown, task

    shutdown, task = loop.call(start(), timeout=30)
    scheme = "https" if ssl_context is not None else "http"
    try:
        yield ApiServer(f"{scheme}://127.0.0.1:{port}", port, state)
    finally:
        loop.loop.call_soon_threadsafe(shutdown.set)

        async def finished() -> None:
            await task

        loop.call(finished(), timeout=15)
        state.engine.datasets.stop()
        sock.close()


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=30, check=False)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def sample_value(text: str, name: str, **labels: str) -> float:
    return sum(v for n, lb, v in samples(text) if n == name and all(lb.get(k) == x for k, x in labels.items()))

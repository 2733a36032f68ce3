"""A real SpiceFlightServer over a real Engine for the Flight tests: the spicepod, the runtime state,
serving on an ephemeral port or unix socket, metric samples, and the material behind a TLS front."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from prometheus_client.parser import text_string_to_metric_families

from spiced.auth import ApiKeys
from spiced.config import load_config
from spiced.engine import Engine
from spiced.flight.service import SpiceFlightServer
from spiced.metrics import Metrics
from spiced.state import RuntimeState
from spiced.tls.manager import TlsManager
from tests.pki import Pki
from tests.support import write_pod
from tests.tlsprobe import file_settings

POD = """\
version: v1
kind: Spicepod
name: flighttest
datasets:
  - from: file:trips.csv
    name: trips
    acceleration:
      enabled: true
views:
  - name: seattle_trips
    sql: SELECT * FROM trips WHERE city = 'Seattle'
"""


TRIPS = pa.schema([("id", pa.int64()), ("city", pa.string()), ("fare", pa.float64())])


KEY = "s3cret-key"


def make_state(workdir: Path, keys: tuple[str, ...] = (), *, tls: TlsManager | None = None,
               metrics: Metrics | None = None) -> RuntimeState:
    write_pod(workdir, POD)
    config = load_config([], workdir=workdir)
    metrics = metrics or Metrics()
    engine = Engine(config.spicepod, metrics)
    engine.datasets.register_all()
    asyncio.run(engine.datasets.load_all())
    assert engine.datasets.ready()
    return RuntimeState(config, engine, metrics, ApiKeys(keys), tls=tls)


@contextmanager
def serving(state: RuntimeState, location: str = "grpc://127.0.0.1:0", **kw: Any) -> Iterator[SpiceFlightServer]:
    server = SpiceFlightServer(location, state, **kw)
    try:
        yield server
    finally:
        server.shutdown()
        server.wait()


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of `name` by label set; a counter matches with or without the exporter's `_total`."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(metrics.exposition().body.decode()):
        for s in family.samples:
            if s.name in (name, f"{name}_total"):  # the exporter fills labels a series lacks with "": drop them
                out[tuple(sorted((k, v) for k, v in s.labels.items() if v))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics, name).get(tuple(sorted(labels.items())), 0.0)


def clean(text: str) -> None:
    assert "Traceback" not in text and "Python exception" not in text, text


@dataclass
class MtlsBackend:
    """What a TLS front in `request` mode stands on: material, runtime state, the Flight server's
    private unix socket path and the public listener."""

    pki: Pki
    metrics: Metrics
    manager: TlsManager
    state: RuntimeState
    sock_path: str
    listener: socket.socket


def mtls_backend(tmp_path: Path) -> MtlsBackend:
    pki = Pki.create(tmp_path / "pki")
    metrics = Metrics()
    manager = TlsManager.create(file_settings(pki, pki.server.cert, pki.server.key, "request", pki.client_ca.cert),
                                metrics)
    state = make_state(tmp_path / "pod", tls=manager, metrics=metrics)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return MtlsBackend(pki, metrics, manager, state, str(private / "flight.sock"), listener)

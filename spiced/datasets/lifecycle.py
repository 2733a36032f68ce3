"""Each dataset from registration to shutdown: load (into the accelerator, or registered in place),
retry with backoff while its source is unreachable, refresh on its interval, and report its state.

A dataset is ready once it has loaded once: a later failed refresh keeps the last good data,
sets the state to Error with the cause, and does not take readiness away.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
from datafusion import SessionContext

from ..config import Dataset, Spicepod
from ..connectors import CONNECTORS
from ..connectors.base import Source, SqlSource
from ..errors import engine_message
from ..federation import Federation
from ..metrics import Metrics
from ..plans import READ_ONLY
from .arrow_store import ArrowStore

log = logging.getLogger("runtime")
refresh_log = logging.getLogger("runtime.accelerated_table.refresh_task")

DatasetStatus = Literal["Initializing", "Ready", "Disabled", "Error", "Refreshing", "ShuttingDown"]
_STATE_CODES = {"Initializing": 0, "Ready": 1, "Disabled": 2, "Error": 3, "Refreshing": 4, "ShuttingDown": 5}
RETRY_MAX_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class DatasetState:
    dataset: Dataset
    status: DatasetStatus
    error: str | None = None


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """Upstream's humantime style: `6s 812ms`, `1m 3s`, `45ms`."""
    ms = int(round(seconds * 1000))
    parts = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        if ms >= size:
            parts.append(f"{ms // size}{unit}")
            ms %= size
    return " ".join(parts) or "0ms"


def _shape(message: str | None) -> str:
    """A failure's text without what changes between tries of the same cause (timings, request ids)."""
    return re.sub(r"[0-9A-Za-z+/=_-]{20,}|\d+(\.\d+)?", "#", message or "")


def backoff(attempt: int, cap: float = RETRY_MAX_SECONDS) -> float:
    """Fibonacci seconds (1, 1, 2, 3, 5, ...) up to `cap`, as upstream's refresh retries."""
    a, b = 1.0, 1.0
    for _ in range(attempt):
        a, b = b, a + b
    return min(a, cap)


class Datasets:
    def __init__(self, spicepod: Spicepod, ctx: SessionContext, store: ArrowStore, federation: Federation,
                 metrics: Metrics, on_loaded: Callable[[str], None] | None = None) -> None:
        self.spicepod = spicepod
        self.ctx = ctx
        self.store = store
        self.federation = federation
        self.metrics = metrics
        self._on_loaded = on_loaded  # told each dataset whose data changed (the results cache drops its entries)
        self._states: dict[str, DatasetState] = {}
        self._loaded: set[str] = set()  # loaded once: ready from then on
        self._lock = threading.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._sources: dict[str, Source] = {}
        self._views_registered = False

    def source(self, ds: Dataset) -> Source:
        with self._lock:
            if ds.name not in self._sources:
                self._sources[ds.name] = CONNECTORS[ds.connector].open(ds.options)
            return self._sources[ds.name]

    # -------------------------------------------------------------- state

    def _set_state(self, ds: Dataset, status: DatasetStatus, error: str | None = None) -> None:
        with self._lock:
            self._states[ds.name] = DatasetState(ds, status, error)
            if status == "Ready":
                self._loaded.add(ds.name)
        self.metrics.dataset_load_state.set(_STATE_CODES[status], {"dataset": ds.name})

    def states(self) -> list[DatasetState]:
        with self._lock:
            return [self._states[d.name] for d in self.spicepod.datasets if d.name in self._states]

    def ready(self) -> bool:
        """Ready once every dataset has loaded once and the views are registered."""
        with self._lock:
            return self._views_registered and all(d.name in self._loaded for d in self.spicepod.datasets)

    # -------------------------------------------------------------- loading

    def register_all(self) -> None:
        """Log each dataset's registration line; loading happens in `load_all`."""
        for ds in self.spicepod.datasets:
            self._set_state(ds, "Initializing")
            for warning in ds.warnings:
                log.warning("%s", warning)
            accel = ""
            if ds.accelerated and ds.acceleration:
                a = ds.acceleration
                extras = ["arrow"]
                if a.refresh_mode == "append":
                    extras.append("append")
                if a.refresh_check_interval_text:
                    extras.append(f"{a.refresh_check_interval_text} refresh")
                accel = f", acceleration ({', '.join(extras)})"
            log.info("Dataset %s registered (%s)%s.", ds.name, ds.from_, accel)
            self.metrics.dataset_active.add(1, {"engine": "arrow" if ds.accelerated else "none"})

    def load_one(self, ds: Dataset, *, refresh: bool = False) -> bool:
        """Load `ds` once; on failure say why (WARN) and keep what was there. True when it loaded."""
        started = time.monotonic()
        with self._lock:
            previous = self._states.get(ds.name)
        try:
            source = self.source(ds)
            if ds.accelerated:
                if refresh:
                    self._set_state(ds, "Refreshing")
                refresh_log.info("Loading data for dataset %s", ds.name)
                table = self.store.replace(ds.name, source.read(self.ctx))
                refresh_log.info("Loaded %s rows (%s) for dataset %s in %s.", f"{table.num_rows:,}",
                                 format_size(table.nbytes), ds.name, format_duration(time.monotonic() - started))
            elif isinstance(source, SqlSource):
                self._register_federated(ds, source)
            else:
                source.register(self.ctx, ds.name)
            self._set_state(ds, "Ready")
            if self._on_loaded is not None:
                self._on_loaded(ds.name)
            return True
        except Exception as e:  # an unreachable or broken source must not stop the runtime
            message = " ".join(line.strip() for line in engine_message(e).splitlines() if line.strip())
            kept = " (the last loaded data is kept)" if ds.name in self._loaded else ""
            # One WARN per cause: retries that fail the same way say so at DEBUG.
            repeated = previous is not None and previous.status == "Error" and _shape(previous.error) == _shape(message)
            (refresh_log.debug if repeated else refresh_log.warning)(
                "Failed to load data for dataset %s: %s%s", ds.name, message, kept)
            self.metrics.dataset_load_errors.add(1, {"dataset": ds.name})
            self._set_state(ds, "Error", message)
            return False

    def _register_federated(self, ds: Dataset, source: SqlSource) -> None:
        """Planning needs the table's schema: an empty table stands in for it, and every query that
        reads it goes through the federation, which asks the source."""
        schema = source.schema()
        if self.ctx.table_exist(ds.name):
            self.ctx.deregister_table(ds.name)
        self.ctx.register_record_batches(ds.name, [[pa.RecordBatch.from_pylist([], schema=schema)]])
        self.federation.add(ds.name, source)

    async def _load_until_loaded(self, ds: Dataset, tried: asyncio.Event) -> None:
        attempt = 0
        while not await asyncio.to_thread(self.load_one, ds):
            tried.set()
            await asyncio.sleep(backoff(attempt))
            attempt += 1
        tried.set()

    async def load_all(self) -> None:
        """Load every dataset (each retried with backoff until it loads), then the views, then
        start the refresh schedules."""
        tried = {ds.name: asyncio.Event() for ds in self.spicepod.datasets}
        self._tasks.extend(asyncio.create_task(self._load_until_loaded(ds, tried[ds.name]), name=f"load {ds.name}")
                           for ds in self.spicepod.datasets)
        # Views are planned over the datasets: wait for the first attempt of each (not its retries).
        await asyncio.gather(*(event.wait() for event in tried.values()))
        await asyncio.to_thread(self.register_views)
        for ds in self.spicepod.datasets:
            a = ds.acceleration
            if ds.accelerated and a is not None and a.refresh_check_interval:
                self._tasks.append(asyncio.create_task(self._refresh_loop(ds, a.refresh_check_interval)))

    def register_views(self) -> None:
        for v in self.spicepod.views:
            try:
                self.ctx.register_view(v.name, self.ctx.sql_with_options(v.sql, READ_ONLY))
                log.info("View %s registered.", v.name)
            except Exception as e:
                log.error("Failed to register view %s: %s", v.name, engine_message(e))
        with self._lock:
            self._views_registered = True

    async def _refresh_loop(self, ds: Dataset, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if ds.name in self._loaded:  # the first load has its own retries
                await asyncio.to_thread(self.load_one, ds, refresh=True)

    async def refresh(self, ds: Dataset) -> None:
        await asyncio.to_thread(self.load_one, ds, refresh=True)

    def stop(self) -> None:
        """No more loads or refreshes; queries under way go on."""
        for t in self._tasks:
            t.cancel()

    def close(self) -> None:
        with self._lock:
            sources, self._sources = list(self._sources.values()), {}
        for source in sources:
            try:
                source.close()
            except Exception as e:  # closing must not stop the shutdown
                log.debug("Closing a source failed: %s", e)

"""Each dataset from registration to shutdown: load (into its accelerator, or registered in
place), retry with backoff while its source is unreachable, refresh on its interval (full or
append, with refresh_sql, the data window and jitter), drop what retention says, and report its state.

A dataset is ready once it has loaded once (or at registration, with `ready_state:
on_registration`; its queries go to the source until then). A later failed refresh keeps the last
good data, sets the state to Error with the cause, and does not take readiness away. In file mode
a dataset whose data an earlier run left in the accelerator file is ready at startup.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
from datafusion import SessionConfig, SessionContext
from sqlglot import exp

from ..acceleration import AccelerationError, check_refresh_sql, retention_condition
from ..config import Dataset, Spicepod
from ..connectors import CONNECTORS
from ..connectors.base import Source, SqlSource
from ..errors import engine_message
from ..federation import Federation
from ..metrics import Metrics
from ..plans import READ_ONLY
from .accelerator import Accelerator
from .arrow_store import ArrowStore
from .embedded_store import EmbeddedAccelerator
from .overrides import RefreshOverrides
from .refresh import read_source, refresh_query
from .time_filter import compare, cutoff

log = logging.getLogger("runtime")
refresh_log = logging.getLogger("runtime.accelerated_table.refresh_task")
retention_log = logging.getLogger("runtime.accelerated_table.retention")

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
                 metrics: Metrics, config: Callable[[], SessionConfig],
                 on_loaded: Callable[[str], None] | None = None) -> None:
        self.spicepod = spicepod
        self.ctx = ctx
        self.store = store
        self.federation = federation
        self.metrics = metrics
        self._config = config  # a new session's settings (a refresh through DataFusion reads in one)
        self._on_loaded = on_loaded  # told each dataset whose data changed (the results cache drops its entries)
        self._states: dict[str, DatasetState] = {}
        self._loaded: set[str] = set()  # loaded once: ready from then on
        self._lock = threading.Lock()
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}  # per dataset: its load, refresh and retention
        self._sources: dict[str, Source] = {}
        self._accelerators: dict[tuple[str, str], EmbeddedAccelerator] = {}
        self._writing: dict[str, threading.Lock] = {}  # one refresh or retention at a time per dataset
        self._refresh_sql: dict[str, str] = {}  # set by PATCH /v1/datasets/{name}/acceleration, until restart
        self._views_registered = False

    def source(self, ds: Dataset) -> Source:
        with self._lock:
            if ds.name not in self._sources:
                self._sources[ds.name] = CONNECTORS[ds.connector].open(ds.options)
            return self._sources[ds.name]

    def accelerator(self, ds: Dataset) -> Accelerator:
        """The accelerator holding `ds`, opened on first use (a DuckDB or SQLite database is shared
        by the datasets that name its file)."""
        a = ds.acceleration
        assert a is not None
        if a.engine == "arrow":
            return self.store
        with self._lock:
            accelerator = self._accelerators.get(_database(ds))
            if accelerator is None:
                sharing = [d.acceleration for d in self.spicepod.datasets if d.acceleration is not None
                           and d.acceleration.engine == a.engine and d.acceleration.settings.file == a.settings.file]
                accelerator = EmbeddedAccelerator(a.engine, a.settings.file, a.settings,
                                                  recreate=any(s.mode == "file_create" for s in sharing),
                                                  store=self.store, federation=self.federation)
                self._accelerators[_database(ds)] = accelerator
            accelerator.set_indexes(ds.name, a.indexes, a.primary_key)
        return accelerator

    def _write_lock(self, ds: Dataset) -> threading.Lock:
        with self._lock:
            return self._writing.setdefault(ds.name, threading.Lock())

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
        """Ready once every dataset has loaded once (or is ready at registration) and the views are registered."""
        with self._lock:
            return self._views_registered and all(d.name in self._loaded or d.ready_state == "on_registration"
                                                  for d in self.spicepod.datasets)

    def from_source(self, names: Iterable[str], *, zero_rows: bool = False) -> dict[str, Source]:
        """Of the datasets `names`, those whose queries read their source now: accelerated with
        `ready_state: on_registration` and not loaded yet, or (`zero_rows`: the accelerated
        query returned none) with `on_zero_results: use_source`."""
        wanted = set(names)
        out: dict[str, Source] = {}
        for ds in self.spicepod.datasets:
            if ds.name not in wanted or not ds.accelerated or ds.acceleration is None:
                continue
            with self._lock:
                loaded = ds.name in self._loaded
            if (not loaded and ds.ready_state == "on_registration") or \
                    (zero_rows and loaded and ds.acceleration.on_zero_results == "use_source"):
                out[ds.name] = self.source(ds)
        return out

    # -------------------------------------------------------------- loading

    def register_all(self) -> None:
        """Log each dataset's registration line; loading happens in `load_all`."""
        for ds in self.spicepod.datasets:
            self._register(ds)

    def _register(self, ds: Dataset) -> None:
        self._set_state(ds, "Initializing")
        for warning in ds.warnings:
            log.warning("%s", warning)
        accel = ""
        engine = "none"
        if ds.accelerated and ds.acceleration:
            a = ds.acceleration
            engine = a.engine
            extras = [a.engine if a.mode == "memory" else f"{a.engine}:{a.mode}"]
            if a.refresh_mode == "append":
                extras.append("append")
            if a.refresh_check_interval_text:
                extras.append(f"{a.refresh_check_interval_text} refresh")
            accel = f", acceleration ({', '.join(extras)})"
        log.info("Dataset %s registered (%s)%s.", ds.name, ds.from_, accel)
        self.metrics.dataset_active.add(1, {"engine": engine})

    def load_one(self, ds: Dataset, *, refresh: bool = False, overrides: RefreshOverrides | None = None) -> bool:
        """Load `ds` once; on failure say why (WARN) and keep what was there. True when it loaded."""
        started = time.monotonic()
        with self._lock:
            previous = self._states.get(ds.name)
        try:
            source = self.source(ds)
            if ds.accelerated:
                with self._write_lock(ds):
                    if refresh:
                        self._set_state(ds, "Refreshing")
                    self._refresh(ds, source, overrides or RefreshOverrides(), started)
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

    def _refresh(self, ds: Dataset, source: Source, overrides: RefreshOverrides, started: float) -> None:
        """One full or append refresh of an accelerated dataset (its write lock held)."""
        a = ds.acceleration
        assert a is not None
        accelerator = self.accelerator(ds)
        appending = (overrides.refresh_mode or a.refresh_mode) == "append" and accelerator.holds(ds.name)
        dialect = source.dialect if isinstance(source, SqlSource) else None
        conditions: list[exp.Expression] = []
        if a.refresh_data_window is not None and ds.time_column:
            conditions.append(compare(ds.time_column, exp.GT, cutoff(ds.time_format, a.refresh_data_window),
                                      ds.time_format, dialect))
        if appending and ds.time_column:
            newest = accelerator.newest(ds.name, ds.time_column)
            if newest is not None:  # only rows newer than the newest held
                conditions.append(compare(ds.time_column, exp.GT, newest, ds.time_format, dialect))
        with self._lock:
            patched = self._refresh_sql.get(ds.name)
        query = refresh_query(ds.name, overrides.refresh_sql or patched or a.refresh_sql, conditions)
        refresh_log.info("Loading data for dataset %s", ds.name)
        reader = read_source(ds.name, source, query, self.ctx, self._config)
        written = accelerator.append(ds.name, reader) if appending else accelerator.replace(ds.name, reader)
        refresh_log.info("Loaded %s rows (%s) for dataset %s in %s.", f"{written.rows:,}", format_size(written.nbytes),
                         ds.name, format_duration(time.monotonic() - started))

    def set_refresh_sql(self, ds: Dataset, sql: str) -> None:
        """PATCH /v1/datasets/{name}/acceleration: later refreshes use `sql`, until restart."""
        try:
            check_refresh_sql(sql, ds.name)
        except AccelerationError as e:
            raise ValueError(str(e).removeprefix("refresh_sql: ")) from None
        with self._lock:
            self._refresh_sql[ds.name] = sql

    def _restore(self, ds: Dataset) -> dt.datetime | None:
        """File mode: the data an earlier run left, queryable now; when it was last refreshed."""
        try:
            checkpoint = self.accelerator(ds).checkpoint(ds.name)
        except Exception as e:  # an unreadable file: load from the source as if it were new
            refresh_log.warning("Failed to read the accelerated data of dataset %s from its file: %s",
                                ds.name, engine_message(e))
            return None
        if checkpoint is None:
            return None
        refresh_log.info("Dataset %s is ready from its accelerator file (last refreshed %s).", ds.name,
                         checkpoint.updated_at.isoformat(timespec="seconds"))
        self._set_state(ds, "Ready")
        if self._on_loaded is not None:
            self._on_loaded(ds.name)
        return checkpoint.updated_at

    def _register_federated(self, ds: Dataset, source: SqlSource) -> None:
        """Planning needs the table's schema: an empty table stands in for it, and every query that
        reads it goes through the federation, which asks the source."""
        schema = source.schema()
        if self.ctx.table_exist(ds.name):
            self.ctx.deregister_table(ds.name)
        self.ctx.register_record_batches(ds.name, [[pa.RecordBatch.from_pylist([], schema=schema)]])
        self.federation.add(ds.name, source)

    async def _load_until_loaded(self, ds: Dataset, tried: asyncio.Event) -> None:
        """The first load, retried with backoff (as `refresh_retry_*` say, for an accelerated dataset)."""
        attempt = 0
        while not await asyncio.to_thread(self._load_first, ds):
            tried.set()
            if not self._may_retry(ds, attempt):
                return  # the refresh schedule, if any, tries again
            await asyncio.sleep(backoff(attempt))
            attempt += 1
        tried.set()

    def _load_first(self, ds: Dataset) -> bool:
        """One attempt at the first load. With `ready_state: on_registration` the dataset is
        queryable meanwhile: a stand-in with the source's schema lets queries plan, and the engine
        sends them to the source (`from_source`) until the accelerator holds the data."""
        if ds.ready_state == "on_registration" and ds.accelerated and not self.ctx.table_exist(ds.name):
            try:
                source = self.source(ds)
                if isinstance(source, SqlSource):
                    self.store.register(ds.name, [pa.RecordBatch.from_pylist([], schema=source.schema())], held=False)
                else:
                    source.register(self.ctx, ds.name)
            except Exception as e:  # the load below says why, once
                log.debug("No stand-in for dataset %s yet: %s", ds.name, engine_message(e))
        return self.load_one(ds)

    @staticmethod
    def _may_retry(ds: Dataset, attempt: int) -> bool:
        a = ds.acceleration if ds.accelerated else None
        if a is None:
            return True
        return a.retry_enabled and (a.retry_max_attempts is None or attempt < a.retry_max_attempts)

    async def load_all(self) -> None:
        """Load every dataset (each retried with backoff until it loads), then the views; each
        dataset's refresh and retention schedules start with it."""
        tried = [self._start(ds) for ds in self.spicepod.datasets]
        # Views are planned over the datasets: wait for the first attempt of each (not its retries).
        await asyncio.gather(*(event.wait() for event in await asyncio.gather(*tried)))
        await asyncio.to_thread(self.register_views)

    async def _start(self, ds: Dataset, *, restore: bool = True) -> asyncio.Event:
        """Begin loading `ds` and its schedules; the event is set once its first attempt is over.
        `restore`: in file mode, serve what an earlier load left in the file (not after an edit of
        the dataset, whose data must follow its new settings)."""
        tried = asyncio.Event()
        a = ds.acceleration if ds.accelerated else None
        restored = await asyncio.to_thread(self._restore, ds) if a is not None and a.persistent and restore else None
        first_refresh = a.refresh_check_interval if a is not None else None
        if a is not None and restored is not None:
            tried.set()
            if a.refresh_on_startup == "always":
                first_refresh = 0.0
            elif a.refresh_check_interval is not None:  # auto: resume the schedule
                since = (dt.datetime.now(dt.UTC) - restored).total_seconds()
                first_refresh = max(0.0, a.refresh_check_interval - since)
        else:
            self._spawn(ds, self._load_until_loaded(ds, tried), "load")
        if a is not None and first_refresh is not None:
            self._spawn(ds, self._refresh_loop(ds, first_refresh), "refresh")
        if a is not None and a.retention is not None:
            self._spawn(ds, self._retention_loop(ds, a.retention.check_interval), "retention")
        return tried

    def _spawn(self, ds: Dataset, work: Coroutine[None, None, None], what: str) -> None:
        task = asyncio.create_task(work, name=f"{what} {ds.name}")
        tasks = self._tasks.setdefault(ds.name, [])
        tasks.append(task)

        def done(t: asyncio.Task[None]) -> None:
            if t in tasks:
                tasks.remove(t)

        task.add_done_callback(done)

    # -------------------------------------------------------------- spicepod changes (--pods-watcher-enabled)

    async def apply(self, new: Spicepod) -> None:
        """Make the running datasets and views those of `new`: a dataset added is loaded, one
        removed is dropped, one whose spicepod entry changed is loaded again; the others keep
        serving throughout. The views are registered again when anything they may read changed."""
        old = {d.name: d for d in self.spicepod.datasets}
        fresh = {d.name: d for d in new.datasets}
        before, after = _entries(self.spicepod), _entries(new)
        changed = {n for n in old.keys() & fresh.keys() if before.get(n) != after.get(n)}
        gone, added = old.keys() - fresh.keys(), fresh.keys() - old.keys()
        views_changed = self.spicepod.raw.get("views") != new.raw.get("views")
        if not (changed or gone or added or views_changed):
            return
        with self._lock:
            self._views_registered = False
        await asyncio.to_thread(self._drop_views)
        for name in sorted(gone | changed):
            await self._stop_tasks(name)
            await asyncio.to_thread(self._drop, old[name])
            log.info("Dataset %s unregistered.", name)
        self.spicepod = new
        starting = [ds for ds in new.datasets if ds.name in added | changed]
        for ds in starting:
            self._register(ds)
        tried = await asyncio.gather(*(self._start(ds, restore=ds.name not in changed) for ds in starting))
        await asyncio.gather(*(event.wait() for event in tried))
        await asyncio.to_thread(self.register_views)

    async def _stop_tasks(self, name: str) -> None:
        tasks = self._tasks.pop(name, [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _drop(self, ds: Dataset) -> None:
        """Forget `ds`: no longer queryable, its source closed; an accelerator file keeps its table."""
        with self._write_lock(ds):
            self.store.drop(ds.name)
            self.federation.remove(ds.name)
            with self._lock:
                opened = self._accelerators.get(_database(ds)) if ds.acceleration is not None else None
            if opened is not None:  # never opened for a dataset about to go (its file may not even open)
                opened.forget(ds.name)
            with self._lock:
                source = self._sources.pop(ds.name, None)
                self._states.pop(ds.name, None)
                self._loaded.discard(ds.name)
                self._refresh_sql.pop(ds.name, None)
        if source is not None:
            try:
                source.close()
            except Exception as e:  # closing must not stop the change
                log.debug("Closing the source of %s failed: %s", ds.name, e)
        self.metrics.dataset_active.add(-1, {"engine": ds.acceleration.engine if ds.accelerated and
                                             ds.acceleration is not None else "none"})
        if self._on_loaded is not None:
            self._on_loaded(ds.name)

    def _drop_views(self) -> None:
        for v in self.spicepod.views:
            if self.ctx.table_exist(v.name):
                self.ctx.deregister_table(v.name)

    def register_views(self) -> None:
        for v in self.spicepod.views:
            try:
                self.ctx.register_view(v.name, self.ctx.sql_with_options(v.sql, READ_ONLY))
                log.info("View %s registered.", v.name)
            except Exception as e:
                log.error("Failed to register view %s: %s", v.name, engine_message(e))
        with self._lock:
            self._views_registered = True

    # -------------------------------------------------------------- refresh and retention

    async def _refresh_loop(self, ds: Dataset, first: float) -> None:
        a = ds.acceleration
        assert a is not None
        delay = first
        while True:
            await asyncio.sleep(delay)
            await self._refresh_retrying(ds, RefreshOverrides())
            if a.refresh_check_interval is None:
                return  # refresh_on_startup: always, without a schedule
            delay = a.refresh_check_interval

    async def _refresh_retrying(self, ds: Dataset, overrides: RefreshOverrides) -> None:
        """One refresh after its jitter; a failure is retried with backoff as `refresh_retry_*` say,
        but never past the next scheduled refresh."""
        a = ds.acceleration
        assert a is not None
        jitter = overrides.refresh_jitter_max if overrides.refresh_jitter_max is not None else a.jitter_max
        if jitter:
            await asyncio.sleep(random.uniform(0, jitter))  # noqa: S311 - spreading load, not a secret
        started = time.monotonic()
        attempt = 0
        while not await asyncio.to_thread(self.load_one, ds, refresh=ds.name in self._loaded, overrides=overrides):
            wait = backoff(attempt)
            interval = a.refresh_check_interval
            if not self._may_retry(ds, attempt) or \
                    (interval is not None and time.monotonic() - started + wait >= interval):
                return
            await asyncio.sleep(wait)
            attempt += 1

    async def refresh(self, ds: Dataset, overrides: RefreshOverrides | None = None) -> None:
        """An on-demand refresh (the HTTP API, `spice refresh`); it waits for one under way."""
        await self._refresh_retrying(ds, overrides or RefreshOverrides())

    async def _retention_loop(self, ds: Dataset, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.retain, ds)

    def retain(self, ds: Dataset) -> int:
        """Drop the rows retention says are too old (`retention_period` on the time column, or
        `retention_sql`); how many went."""
        a = ds.acceleration
        assert a is not None and a.retention is not None
        r = a.retention
        try:
            with self._write_lock(ds):
                accelerator = self.accelerator(ds)
                if not accelerator.holds(ds.name):
                    return 0
                if r.sql is not None:
                    condition = retention_condition(r.sql, ds.name)
                else:
                    assert ds.time_column is not None and r.period is not None
                    condition = compare(ds.time_column, exp.LT, cutoff(ds.time_format, r.period), ds.time_format,
                                        accelerator.dialect, accelerator.time_unit(ds.name, ds.time_column))
                deleted = accelerator.delete(ds.name, condition)
        except Exception as e:  # the data stays; the next check tries again
            retention_log.warning("Failed to apply retention to dataset %s: %s", ds.name, engine_message(e))
            return 0
        if deleted:
            retention_log.info("Evicted %s rows from dataset %s (retention).", f"{deleted:,}", ds.name)
            if self._on_loaded is not None:
                self._on_loaded(ds.name)
        return deleted

    def stop(self) -> None:
        """No more loads or refreshes; queries under way go on."""
        for tasks in self._tasks.values():
            for t in tasks:
                t.cancel()

    def close(self) -> None:
        with self._lock:
            sources, self._sources = list(self._sources.values()), {}
            accelerators, self._accelerators = list(self._accelerators.values()), {}
        for source in sources:
            try:
                source.close()
            except Exception as e:  # closing must not stop the shutdown
                log.debug("Closing a source failed: %s", e)
        for accelerator in accelerators:
            accelerator.close()


def _entries(spicepod: Spicepod) -> dict[str, Mapping[str, object]]:
    """Each dataset's entry in the spicepod as written, by name."""
    raw = spicepod.raw.get("datasets")
    entries = raw if isinstance(raw, list) else []
    return {str(e.get("name")): e for e in entries if isinstance(e, Mapping)}


def _database(ds: Dataset) -> tuple[str, str]:
    """Which DuckDB or SQLite database an accelerated dataset is held in: engine and file."""
    a = ds.acceleration
    assert a is not None
    return a.engine, str(a.settings.file) if a.settings.file is not None else "memory"

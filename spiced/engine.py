"""The SQL engine: one DataFusion session holding the spicepod's datasets and views.

Read-only by construction (DDL, DML and statements are refused by DataFusion's SQLOptions);
results leave as Arrow record-batch streams, never as one collected Python object. Datasets are
loaded and kept by `spiced.datasets`; queries that read a database in place go through
`spiced.federation`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
from datafusion import DataFrame, SessionConfig, SessionContext
from datafusion.expr import (
    Aggregate,
    Distinct,
    Filter,
    Join,
    Limit,
    Projection,
    Sort,
    SubqueryAlias,
    TableScan,
    Union,
    Window,
)
from datafusion.record_batch import RecordBatchStream

from .batches import PLAIN_ARROW_TYPES, plain_schema
from .config import Spicepod
from .connectors.files import FileOptions, ObjectStores, read_by_datafusion
from .datasets.arrow_store import ArrowStore
from .datasets.lifecycle import Datasets, format_size
from .errors import QueryError, engine_error
from .federation import Federation
from .interrupt import WATCHDOG, Stopped, Stopper, bounded_call
from .metrics import Metrics
from .plans import READ_ONLY, dataset_name, scanned
from .quick import QuickQueries
from .results_cache import (
    CacheRequest,
    CacheSettings,
    CacheStatus,
    Entry,
    KnownPlan,
    KnownPlans,
    ResultsCache,
    not_cached,
)
from .stream import Deadline, QueryStream, WaitLoop

if TYPE_CHECKING:
    from .cluster.execution import ClusterExecutor, DistributedQuery

cache_log = logging.getLogger("runtime.init.caching")
cluster_log = logging.getLogger("runtime.cluster")

T = TypeVar("T")
Params = Mapping[str, Any]  # placeholder name ("1", "name") → Python value or pyarrow scalar


def session_config() -> SessionConfig:
    config = (SessionConfig()
              .with_default_catalog_and_schema("spice", "public")
              .with_create_default_catalog_and_schema(True)
              .with_information_schema(True))
    for key, value in PLAIN_ARROW_TYPES.items():
        config = config.set(key, value)
    return config


class Engine:
    def __init__(self, spicepod: Spicepod, metrics: Metrics, cache: CacheSettings | None = None) -> None:
        self.ctx = SessionContext(session_config())
        # DataFusion keeps folder listings without expiry: a file added to a dataset's folder would
        # never be read, by its queries or its refreshes.
        self.ctx.sql("SET datafusion.runtime.list_files_cache_limit = '0K'").collect()
        self.spicepod = spicepod
        self.metrics = metrics
        self.store = ArrowStore(self.ctx)
        self.federation = Federation(self.ctx, spicepod, session_config)
        self.cache = ResultsCache(cache, metrics) if cache is not None and cache.enabled else None
        self._known_plans = KnownPlans()
        self.datasets = Datasets(spicepod, self.ctx, self.store, self.federation, metrics, session_config,
                                 on_loaded=self.cache.invalidate if self.cache is not None else None)
        self._loop = WaitLoop()
        self.quick = QuickQueries()
        self.cluster: ClusterExecutor | None = None  # a scheduler's executors (spiced.cluster.execution)
        self._partitions = os.cpu_count() or 1  # DataFusion's target_partitions, its default
        self._partitions_checked = 0.0
        self._applied = 0  # spicepod changes applied
        self._use(spicepod)
        if cache is not None:
            for warning in cache.warnings:
                cache_log.warning("%s", warning)
            if cache.enabled:
                cache_log.info("Initialized sql results cache; max size: %s, item ttl: %s, hashing algorithm: none "
                               "(keys compared whole), encoding: none", format_size(cache.max_size),
                               cache.item_ttl_text)

    def _use(self, spicepod: Spicepod) -> None:
        self.spicepod = spicepod
        self.federation.spicepod = spicepod
        self._cacheable = {d.name for d in spicepod.datasets} | {v.name for v in spicepod.views}
        self._may_read_sources = any(d.accelerated and d.acceleration is not None and (
            d.ready_state == "on_registration" or d.acceleration.on_zero_results == "use_source")
            for d in spicepod.datasets)

    async def apply(self, spicepod: Spicepod) -> None:
        """A changed spicepod (--pods-watcher-enabled): its datasets and views from now on."""
        await self.datasets.apply(spicepod)
        self._use(spicepod)
        self._applied += 1
        if self.cache is not None:
            self.cache.clear()

    @property
    def catalog_version(self) -> int:
        """Changes whenever an Arrow table is replaced or the spicepod changes."""
        return self.store.swaps + self._applied

    def close(self) -> None:
        """After the drain: queries are over."""
        self._loop.stop()
        self.datasets.close()

    def plan(self, sql: str, params: Params | None = None) -> DataFrame:
        """Plan one read-only statement; planning errors become QueryError with DataFusion's text.

        `params` binds placeholders: `$1`, `$2` by the keys "1", "2"; `$name` and `:name` by "name".
        Values are Python values or pyarrow scalars (which keep their Arrow type)."""
        swaps = self.store.swaps
        try:
            return self._plan(sql, params)
        except QueryError:
            if swaps % 2 == 0 and swaps == self.store.swaps:
                raise
        self.store.wait_for_swap()  # a table was being replaced meanwhile: plan again once it is back
        return self._plan(sql, params)

    def _plan(self, sql: str, params: Params | None) -> DataFrame:
        try:
            return self.ctx.sql_with_options(sql, READ_ONLY, param_values=dict(params) if params else None)
        except Exception as e:
            raise engine_error(e) from None

    def schema(self, sql: str, params: Params | None = None) -> pa.Schema:
        return plain_schema(self.plan(sql, params).schema())

    def execute(self, sql: str, timeout: float | None = None, params: Params | None = None,
                stopper: Stopper | None = None, cache: CacheRequest | None = None) -> QueryStream:
        """Plan and start executing; errors raised before the first batch are QueryErrors.

        With a `timeout` (seconds from now), a batch not ready by then ends the query with a
        QueryError of kind `timeout`; `stopper.stop(error)` ends it with `error` (a cancel). Either
        way the query stops running (see `QueryStream`)."""
        stopper = stopper or Stopper()
        if self.cluster is not None:
            self._fit_partitions()
        deadline = Deadline(timeout, self._loop.get()) if timeout is not None else None
        version = self.catalog_version  # before planning: a plan made while it changes is never reused
        if self.cache is not None and cache is not None and (known := self._known_hit(version, sql, params, cache)):
            return _from_cache(*known, deadline, stopper)
        df = self.plan(sql, params)
        cached = self._cached(version, df, sql, params, cache) if self.cache is not None and cache is not None else None
        if cached is not None and cached.hit is not None:
            return _from_cache(df.schema(), cached.status, cached.hit, deadline, stopper)
        result = self._run(df, sql, params, deadline, stopper)
        if cached is not None:
            result.cache_status = cached.status
            result.keep(cached.store, cached.limit)
        return result

    def _known_hit(self, version: int, sql: str, params: Params | None,
                   request: CacheRequest) -> tuple[pa.Schema, CacheStatus, Entry] | None:
        """A cached result for a query planned before at this catalog version, found without planning it."""
        assert self.cache is not None
        known = self._known_plans.get(version, sql, params)
        if known is None:
            return None
        lookup = self.cache.hit(self.cache.key(request, sql, known.text, params), request)
        if lookup is None or lookup.entry is None:
            return None
        return known.schema, lookup.status, lookup.entry

    def _cached(self, version: int, df: DataFrame, sql: str, params: Params | None,
                request: CacheRequest) -> _Cached | None:
        """The cache's answer for a cacheable query (None: the cache does not apply to it)."""
        assert self.cache is not None
        plan = df.logical_plan()
        if not isinstance(plan.to_variant(), (Projection, Aggregate, Sort, Limit, Filter, Join, Distinct,
                                              SubqueryAlias, Union, TableScan, Window)):
            return None  # EXPLAIN, DESCRIBE, SHOW and the like
        text = plan.display_indent()
        if "TableScan: " not in text:
            return None  # reads no dataset
        # Only datasets and views, whose scans the plan's text describes whole: a table function
        # (generate_series) shows as a bare `tmp_table`, without its arguments. The catalog
        # (information_schema) is never a dataset.
        if any(dataset_name(*ref) not in self._cacheable for ref in scanned(text)):
            return None
        self._known_plans.put(version, sql, params, KnownPlan(text, df.schema()))
        key = self.cache.key(request, sql, text, params)
        lookup = self.cache.lookup(key, request)
        if lookup.entry is None and request.only_if_cached:
            raise not_cached()
        cache = self.cache

        def store(batches: list[pa.RecordBatch]) -> None:
            # The datasets behind views, for invalidation: only an optimized plan inlines views,
            # so it is made only for a result that is stored, never on a hit.
            tables = [table for *_, table in scanned(df.optimized_logical_plan())]
            cache.store(key, plain_schema(df.schema()), batches, tables)

        return _Cached(lookup.status, lookup.entry, store, cache.settings.max_size)

    def _run(self, df: DataFrame, sql: str, params: Params | None, deadline: Deadline | None,
             stopper: Stopper) -> QueryStream:
        names = self._accelerated_names(df)
        if names and (early := self.datasets.from_source(names)):  # not loaded yet: ready_state on_registration
            return self._guarded(df, deadline, stopper, self.federation.from_sources, sql, params, early, df.schema())
        stored = self.store.stored_scan(df)
        if stored is not None:
            return self._or_source(df, sql, params, names, QueryStream(df.schema(), stored, deadline, stopper),
                                   deadline, stopper)

        def start() -> Iterator[pa.RecordBatch] | RecordBatchStream:
            federated = _bounded(stopper, deadline, self.federation.run, df, sql, params)
            if federated is not None:
                return federated
            if self.cluster is not None and (stores := self._on_executors(df)) is not None and (
                    on_cluster := stopper.call(self.cluster.execute, self.ctx, df, stores)):
                return _distributed(on_cluster, stopper, deadline)
            return stopper.call(df.execute_stream)

        stream = _as_query_error(start)
        return self._or_source(df, sql, params, names, QueryStream(df.schema(), stream, deadline, stopper),
                               deadline, stopper)

    def _on_executors(self, df: DataFrame) -> ObjectStores | None:
        """When every dataset a query reads is files DataFusion reads itself, not accelerated (local
        files, which the executors read at the same paths, or files in an object store), the object
        stores the executors need for it; None when it must run here (accelerated data lives on the
        scheduler, databases are federated)."""
        readable = {d.name: d.options for d in self.spicepod.datasets if not d.accelerated
                    and isinstance(d.options, FileOptions) and read_by_datafusion(d.options)}
        names = {dataset_name(*ref) or "" for ref in scanned(df.optimized_logical_plan())}
        if not names <= readable.keys():
            return None
        return ObjectStores(tuple(readable[name] for name in sorted(names) if readable[name].store is not None))

    def _fit_partitions(self) -> None:
        """On a scheduler, plan with a partition for each executor thread (at least one per local
        core): each partition of a stage is one task, so fewer would leave executors idle. Checked
        at most once a second; a DataFrame keeps the settings it was planned with."""
        assert self.cluster is not None
        now = time.monotonic()
        if now - self._partitions_checked < 1.0:
            return
        self._partitions_checked = now
        partitions = max(os.cpu_count() or 1, sum(self.cluster.threads().values()))
        if partitions != self._partitions:
            self.ctx.sql(f"SET datafusion.execution.target_partitions = {partitions}").collect()
            self._partitions = partitions

    def _accelerated_names(self, df: DataFrame) -> set[str]:
        """The accelerated datasets a query reads (through views too) when any may read its source instead."""
        if not self._may_read_sources:
            return set()
        return {n for ref in scanned(df.optimized_logical_plan()) if (n := dataset_name(*ref)) is not None}

    def _guarded(self, df: DataFrame, deadline: Deadline | None, stopper: Stopper,
                 fn: Callable[..., Iterator[pa.RecordBatch]], *args: object) -> QueryStream:
        batches = _as_query_error(lambda: _bounded(stopper, deadline, fn, *args))
        return QueryStream(df.schema(), batches, deadline, stopper)

    def _or_source(self, df: DataFrame, sql: str, params: Params | None, names: set[str], result: QueryStream,
                   deadline: Deadline | None, stopper: Stopper) -> QueryStream:
        """`on_zero_results: use_source`: a query over such datasets that returns no rows is
        answered from their sources instead."""
        if not names or not self.datasets.from_source(names, zero_rows=True):
            return result

        def rows() -> Iterator[pa.RecordBatch]:
            count = 0
            for batch in result:
                count += batch.num_rows
                yield batch
            if count == 0 and (sources := self.datasets.from_source(names, zero_rows=True)):
                yield from self._guarded(df, deadline, stopper, self.federation.from_sources, sql, params, sources,
                                         df.schema())

        return QueryStream(df.schema(), rows(), deadline, stopper)

    def table_schema(self, name: str) -> pa.Schema | None:
        try:
            return plain_schema(self.ctx.table(name).schema())
        except Exception:
            return None


@dataclass(frozen=True, slots=True)
class _Cached:
    status: CacheStatus
    hit: Entry | None
    store: Callable[[list[pa.RecordBatch]], None]
    limit: int  # bytes: a larger result is not kept


def _from_cache(schema: pa.Schema, status: CacheStatus, entry: Entry, deadline: Deadline | None,
                stopper: Stopper) -> QueryStream:
    result = QueryStream(schema, iter(entry.batches), deadline, stopper)
    result.cache_status = status
    return result


def _as_query_error(start: Callable[[], T]) -> T:
    """`start()`, its failures as the QueryErrors a client is answered with."""
    try:
        return start()
    except Stopped as e:
        raise e.error from None
    except QueryError:
        raise
    except Exception as e:
        raise engine_error(e) from None


def _distributed(query: DistributedQuery, stopper: Stopper, deadline: Deadline | None) -> Iterator[pa.RecordBatch]:
    """A query running on the cluster's executors, fetched through the query's `Stopper.call` and
    bounded by its time limit while it runs (waiting for a stage's partitions is its computing);
    its stages cancelled however the stream ends."""
    alarm = None if deadline is None else WATCHDOG.arm(deadline.at, stopper, deadline.error())
    try:
        yield from query
        stats = query.stats
        cluster_log.debug("Query ran %d stage(s) as %d task(s) on %d executor(s); %d bytes came back",
                          stats.stages, stats.tasks, stats.executors, stats.bytes_received)
    finally:
        if alarm is not None:
            WATCHDOG.disarm(alarm)
        query.close()


def _bounded(stopper: Stopper, deadline: Deadline | None, fn: Callable[..., T], *args: object) -> T:
    """`stopper.call(fn, *args)`, stopped with the time-limit error if the deadline passes first
    (a database's first batch: its driver is asked to cancel, spiced.connectors.sql_source)."""
    if deadline is None:
        return stopper.call(fn, *args)
    return bounded_call(stopper, deadline.at, deadline.error(), fn, *args)

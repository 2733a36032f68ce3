"""Distributed query execution in cluster mode: the file-reading stages of a query run on the
cluster's executors (Dask workers), the rest on the scheduler node, both in DataFusion.

What is distributed. DataFusion plans the query on the scheduler exactly as it would alone. A
*stage* is a largest subtree of that physical plan made of file scans (`DataSourceExec` over
Parquet, CSV or JSON files, local or in an object store) under operators that compute their output
partition i from their input partition i alone: filters, projections, aggregates (in practice the
Partial half; the Final half sits above an exchange), per-partition sorts (ORDER BY ... LIMIT's
TopK) and limits. Exchanges (RepartitionExec, CoalescePartitionsExec, SortPreservingMergeExec),
joins, unions and windows stay on the scheduler; a join's inputs are stages of their own. A query
is distributed when its plan has a stage and reads nothing but files (a constant row is fine).
Anything else makes `ClusterExecutor.execute` return None, and the caller runs the query locally:
in-memory and accelerated tables, federated databases, table functions, information_schema,
`count(*)` answered from file statistics (no file is read), and plans DataFusion cannot serialize.

How. Each stage is serialized once (`ExecutionPlan.to_bytes()`, about 2 KB) and its partition i is
sent to executor i, round robin over the executors the client sees. An executor decodes the stage
in its own session, with file-stream work stealing off (with it on, one partition of a decoded scan
reads every file), and returns partition i as a pyarrow Table, which Dask moves as Arrow. On the
scheduler, each stage is replaced in the serialized plan by an in-memory source holding the
returned partitions one for one (partition i stays partition i, its batches in order), so the
operators above it (final aggregates, joins, merges, sorts, limits) are DataFusion's own and see
what they would have seen locally: the results are the single-node results, COUNT(DISTINCT) and
AVG included. The scheduler waits for every stage partition before the first batch (a filtered
projection too): results come back whole, not streamed.

Limits. A stage has the partitions DataFusion planned: the session's `target_partitions` (the
scheduler's cores by default) splits the files, so a cluster with more executor threads than that
wants a larger setting. Executors never exchange rows with each other: what crosses an exchange goes
through the scheduler, so a GROUP BY with about as many groups as rows, a join of two large tables
or an ORDER BY without LIMIT sends most of its rows to the scheduler (partial aggregates always
aggregate on executors, unlike DataFusion's default, which gives up when groups are many). There
the results also go through the serialized plan, at about 150 MB/s (2M rows, 32 MB: 0.3 s).

Failures. The partitions of an executor that dies mid-query run again on another one (Dask retries
a task whose worker died, `distributed.scheduler.allowed-failures` times, then the query fails with
a QueryError naming the lost task). An error on an executor fails the query with DataFusion's text,
classified as it would be locally. Executors must see the files as the scheduler does: the same
paths, or the object stores each query brings with it (`execute`'s `setup`, run once per session
on each executor).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
from datafusion import DataFrame, ExecutionPlan, SessionConfig, SessionContext
from distributed import Client, Future, KilledWorker, Worker, get_worker
from distributed.client import FutureCancelledError, FuturesCancelledError
from distributed.diagnostics.plugin import WorkerPlugin

from ..batches import PLAIN_ARROW_TYPES
from ..errors import QueryError, engine_error
from ..plans import READ_ONLY
from . import protowire

PLUGIN_NAME = "spiced-datafusion"

# Operators whose output partition i is computed from their input's partition i alone.
_PARTITION_LOCAL = frozenset({"FilterExec", "ProjectionExec", "CoalesceBatchesExec", "CooperativeExec",
                              "AggregateExec", "SortExec", "LocalLimitExec", "GlobalLimitExec"})
_CONSTANT_LEAVES = frozenset({"PlaceholderRowExec", "EmptyExec"})
_FILE_SCAN = re.compile(r"DataSourceExec: file_groups=\{.*, file_type=(parquet|csv|json)\b")
_EMPTY_GROUPS = re.compile(r"file_groups=\{\d+ groups?: \[(\[\](, )?)+\]\}")

ConfigureSession = Callable[[SessionContext, Worker], None]  # an executor's session, on that executor


# --- Splitting a plan into stages (scheduler side) ---------------------------------------------

class _NotDistributable(Exception):
    """A plan, or a part of it, that does not leave the scheduler."""


# A plan's outline: each operator's name and partition count ("" at a stage, whose inside may change).
_Shape = tuple[str, int, tuple["_Shape", ...]]


@dataclass(frozen=True, slots=True)
class Stage:
    plan: bytes  # the serialized subtree
    partitions: int
    path: tuple[int, ...]  # where it sits in the serialized plan: field positions, outermost first
    empty: bytes  # the subtree reading no file: what stands for it when no partition has a row


@dataclass(frozen=True, slots=True)
class Split:
    plan: bytes  # the whole serialized plan
    stages: tuple[Stage, ...]
    shape: _Shape

    @property
    def whole(self) -> bool:
        """The plan is one stage: its partitions are the result."""
        return self.stages[0].path == ()


@dataclass(frozen=True, slots=True)
class _Candidate:
    plan: ExecutionPlan
    encoded: bytes
    path: tuple[int, ...]
    scans: list[tuple[int, ...]]  # absolute paths


@dataclass(slots=True)
class _Visit:
    local: bool  # the subtree is partition-local down to its file scans
    stages: list[_Candidate]  # stages below (when not local)
    scans: list[tuple[int, ...]]  # file scans below (when local)
    shape: _Shape


def split_plan(plan: ExecutionPlan, ctx: SessionContext) -> Split | None:
    """The stages of `plan` to run on executors; None when the plan stays on the scheduler. `ctx`
    is the session that planned it (with its object stores: DataFusion decodes a scan only where
    its store is registered)."""
    try:  # _NotDistributable, or DataFusion cannot serialize an operator (information_schema's)
        encoded = plan.to_bytes()
        visit = _visit(plan, encoded, ())
        candidates = [_Candidate(plan, encoded, (), visit.scans)] if visit.local else visit.stages
        stages = [_stage(candidate, ctx) for candidate in candidates]
    except Exception:
        return None
    return Split(encoded, tuple(stages), visit.shape) if stages else None


def _visit(plan: ExecutionPlan, encoded: bytes, path: tuple[int, ...]) -> _Visit:
    name, partitions = _name(plan), plan.partition_count
    children = _located(plan, encoded)
    if not children:
        if _FILE_SCAN.match(plan.display()):
            return _Visit(True, [], [path], ("", partitions, ()))
        if name in _CONSTANT_LEAVES:
            return _Visit(False, [], [], (name, partitions, ()))
        raise _NotDistributable(name)
    visits = [_visit(child, data, path + at) for child, data, at in children]
    if name in _PARTITION_LOCAL and all(v.local for v in visits):
        return _Visit(True, [], [scan for v in visits for scan in v.scans], ("", partitions, ()))
    stages: list[_Candidate] = []
    for v, (child, data, at) in zip(visits, children, strict=True):
        stages += [_Candidate(child, data, path + at, v.scans)] if v.local else v.stages
    return _Visit(False, stages, [], (name, partitions, tuple(v.shape for v in visits)))


def _stage(candidate: _Candidate, ctx: SessionContext) -> Stage:
    plan, path = candidate.plan, candidate.path
    empty = _without_files(candidate.encoded, [scan[len(path):] for scan in candidate.scans])
    decoded = ExecutionPlan.from_bytes(ctx, empty)
    if decoded.partition_count != plan.partition_count or not _reads_nothing(decoded):
        raise _NotDistributable("the stage cannot be emptied")
    return Stage(candidate.encoded, plan.partition_count, path, empty)


def _without_files(stage: bytes, scans: list[tuple[int, ...]]) -> bytes:
    """The stage with every file group of its scans emptied: the same schema and partitions, and
    nothing read. (Stage results without a row carry no schema to build an in-memory source with.)"""
    edits: dict[tuple[int, ...], bytes] = {}
    for scan in scans:
        # A file scan operator's field 1 is its FileScanExecConf, whose field 1 is the file groups.
        operator = protowire.at(stage, scan + (0,))
        conf_index = next((i for i, f in enumerate(protowire.fields(operator)) if f.number == 1), None)
        if conf_index is None:
            raise _NotDistributable("a file scan without its configuration")
        for group, f in enumerate(protowire.fields(protowire.at(operator, (conf_index,)))):
            if f.number == 1:
                edits[scan + (0, conf_index, group)] = b""
    return protowire.rewrite(stage, edits)


def _reads_nothing(plan: ExecutionPlan) -> bool:
    children = plan.children()
    if children:
        return all(_reads_nothing(child) for child in children)
    return _EMPTY_GROUPS.search(plan.display()) is not None


def _name(plan: ExecutionPlan) -> str:
    return plan.display().split(":", 1)[0].strip()


def _located(plan: ExecutionPlan, encoded: bytes) -> list[tuple[ExecutionPlan, bytes, tuple[int, int]]]:
    """Each child of `plan`, serialized, with its position in `encoded`. A serialized plan node is a
    message of one field, the operator, whose own fields include its children, each serialized as
    it would be alone."""
    children = plan.children()
    if not children:
        return []
    operator = protowire.operator(encoded)
    body = encoded[operator.body:operator.end]
    fields = protowire.fields(body)
    taken: set[int] = set()
    located = []
    for child in children:
        data = child.to_bytes()
        index = next((i for i, f in enumerate(fields)
                      if i not in taken and f.wire == protowire.LEN and body[f.body:f.end] == data), None)
        if index is None:
            raise _NotDistributable(f"{_name(child)} is not found in the encoding of {_name(plan)}")
        taken.add(index)
        located.append((child, data, (0, index)))
    return located


# --- Putting the final plan together (scheduler side) -------------------------------------------

@functools.cache
def _scratch() -> SessionContext:
    """A plain session, where stage results become in-memory plans."""
    return SessionContext()


def _in_memory(tables: Sequence[pa.Table | None]) -> bytes | None:
    """A serialized source with the tables as its partitions, one for one; None when all are empty
    (without a batch there is no schema to give it)."""
    schema = next((t.schema for t in tables if t is not None), None)
    if schema is None:
        return None
    empty = pa.RecordBatch.from_pylist([], schema=schema)
    # One batch a partition: DataFusion serializes an in-memory source at about a millisecond a batch.
    partitions = [(t.combine_chunks().to_batches() if t is not None else []) or [empty] for t in tables]
    name = f"stage_{uuid.uuid4().hex}"
    _scratch().register_record_batches(name, partitions)
    try:
        return _scratch().table(name).execution_plan().to_bytes()
    finally:
        _scratch().deregister_table(name)


def _matches(plan: ExecutionPlan, shape: _Shape) -> bool:
    name, partitions, children = shape
    if plan.partition_count != partitions:
        return False
    if not name:
        return True
    kids = plan.children()
    return (_name(plan) == name and len(kids) == len(children)
            and all(_matches(kid, child) for kid, child in zip(kids, children, strict=True)))


def final_plan(ctx: SessionContext, split: Split, results: Sequence[Sequence[pa.Table | None]]) -> ExecutionPlan:
    """The plan with each stage replaced by its results, decoded in `ctx` (the runtime's session:
    what is not distributed may need its functions)."""
    edits = {stage.path: _in_memory(tables) or stage.empty
             for stage, tables in zip(split.stages, results, strict=True)}
    plan = ExecutionPlan.from_bytes(ctx, protowire.rewrite(split.plan, edits))
    if not _matches(plan, split.shape):
        raise QueryError("Cluster execution failed: the final plan does not match the planned one")
    return plan


# --- Executors (worker side) -------------------------------------------------------------------

def executor_config() -> SessionConfig:
    config = (SessionConfig()
              # With work stealing, one partition of a decoded scan reads the other partitions' files too.
              .set("datafusion.execution.enable_file_stream_work_stealing", "false")
              # DataFusion stops a partial aggregate from aggregating once its groups are nearly as many
              # as its rows, which costs nothing in memory: here every row would cross the network (a
              # GROUP BY over 100,000 groups of 20M rows sent back 480 MB instead of 4.8 MB).
              .set("datafusion.execution.skip_partial_aggregation_probe_rows_threshold", str(2**64 - 1)))
    for key, value in PLAIN_ARROW_TYPES.items():
        config = config.set(key, value)
    return config


class DataFusionExecutor(WorkerPlugin):
    """Gives each executor, present or future, its DataFusion session when it joins: importing and
    starting DataFusion costs up to a second, which would otherwise fall on the first query (on 2
    cores: 0.23-1.2 s without the plugin, 0.07-0.10 s with it, 0.04 s warm). `configure` (pickled
    to the workers) prepares the session: the object stores of the spicepod's datasets."""

    def __init__(self, configure: ConfigureSession | None = None) -> None:
        self.configure = configure
        self.session: SessionContext | None = None

    async def setup(self, worker: Worker) -> None:
        # Off the worker's event loop, which keeps answering the scheduler meanwhile.
        self.session = await asyncio.to_thread(_warm_session, self.configure, worker)


def _warm_session(configure: ConfigureSession | None, worker: Worker) -> SessionContext:
    session = SessionContext(executor_config())
    if configure is not None:
        configure(session, worker)
    session.sql("SELECT 1").collect()  # starts DataFusion's runtime
    return session


class StageError(Exception):
    """A stage partition that failed on an executor; the message is DataFusion's."""


SessionSetup = Callable[[SessionContext], None]  # hashable and picklable: e.g. the object stores a query reads through
_SET_UP: dict[int, set[SessionSetup]] = {}  # per executor session (by id: sessions live as long as the worker)
_SET_UP_LOCK = threading.Lock()


def run_partition(plan: bytes, partition: int, setup: SessionSetup | None = None) -> pa.Table | None:
    """On an executor: partition `partition` of the serialized stage `plan` (None: no rows), in a
    session that `setup` has prepared (once per session)."""
    session = _executor_session()
    if setup is not None:
        with _SET_UP_LOCK:
            done = _SET_UP.setdefault(id(session), set())
            if setup not in done:
                setup(session)
                done.add(setup)
    try:
        stage = ExecutionPlan.from_bytes(session, plan)
        batches = [batch.to_pyarrow() for batch in session.execute(stage, partition)]
    except Exception as e:
        raise StageError(str(e)) from None  # plain text: DataFusion's exceptions need not unpickle elsewhere
    return pa.Table.from_batches(batches) if batches else None


def _executor_session() -> SessionContext:
    try:
        plugin = get_worker().plugins.get(PLUGIN_NAME)
    except ValueError:  # not on a worker
        plugin = None
    if isinstance(plugin, DataFusionExecutor) and plugin.session is not None:
        return plugin.session
    return _plain_executor_session()


@functools.cache
def _plain_executor_session() -> SessionContext:
    """For a worker without the plugin: local files only."""
    return SessionContext(executor_config())


# --- Running a query (scheduler side) ----------------------------------------------------------

@dataclass(slots=True)
class ClusterStats:
    stages: int
    tasks: int
    executors: int  # that the client saw when the query started
    bytes_received: int = 0  # Arrow bytes of the stage results


class ClusterExecutor:
    """Runs the stages of queries on the executors of `client` (synchronous or asynchronous, with
    or without TLS: taken as given). Call it from threads other than the client's event loop (the
    engine's query threads). `no_executors_grace`: seconds a query waits while no executor is left."""

    def __init__(self, client: Client, *, no_executors_grace: float = 10.0) -> None:
        self.client = client
        self.no_executors_grace = no_executors_grace
        self._turn = itertools.count()

    def prepare(self, configure: ConfigureSession | None = None) -> None:
        """Give every executor, present and future, a warm session made by `configure`."""
        self.client.register_plugin(DataFusionExecutor(configure), name=PLUGIN_NAME)

    def execute(self, ctx: SessionContext, query: str | DataFrame,
                setup: SessionSetup | None = None) -> DistributedQuery | None:
        """Start `query` (SQL, or a DataFrame the engine planned in `ctx`) on the cluster; None when
        it is not distributed (the caller runs it locally). Planning errors are QueryErrors. `setup`
        prepares each executor's session for it (the object stores its files are read through)."""
        try:
            df = ctx.sql_with_options(query, READ_ONLY) if isinstance(query, str) else query
            split = split_plan(df.execution_plan(), ctx)
        except Exception as e:
            raise engine_error(e) from None
        if split is None:
            return None
        executors = sorted(self.client.nthreads())
        if not executors:
            return None
        tag, order = uuid.uuid4().hex[:12], itertools.count(next(self._turn))

        def submit(index: int, stage: Stage, partition: int) -> Future[pa.Table | None]:
            # Round robin, each query starting one executor further; a partition may run on another
            # executor when its own is gone (Dask runs the tasks of a lost worker again).
            executor = executors[next(order) % len(executors)]
            return self.client.submit(run_partition, stage.plan, partition, setup, workers=[executor],
                                      allow_other_workers=True, pure=False,
                                      key=f"spiced-stage-{tag}-{index}-{partition}")

        futures = [[submit(index, stage, partition) for partition in range(stage.partitions)]
                   for index, stage in enumerate(split.stages)]
        stats = ClusterStats(len(split.stages), sum(len(f) for f in futures), len(executors))
        return DistributedQuery(self, ctx, df.schema(), split, futures, stats)


@dataclass(eq=False)
class DistributedQuery:
    """A running distributed query: an iterator of record batches with the schema of the single-node
    result. The first `next()` waits for the stages (in short waits, so that an interrupt from
    spiced.interrupt lands between them); `close()` cancels what still runs."""

    executor: ClusterExecutor
    ctx: SessionContext
    schema: pa.Schema
    split: Split
    futures: list[list[Future[pa.Table | None]]]
    stats: ClusterStats
    _batches: Iterator[pa.RecordBatch] | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)

    def __iter__(self) -> DistributedQuery:
        return self

    def __next__(self) -> pa.RecordBatch:
        if self._batches is None:
            self._batches = self._run()
        try:
            batch = next(self._batches)
        except (StopIteration, QueryError):
            raise
        except Exception as e:
            raise engine_error(e) from None
        if batch.schema.equals(self.schema):
            return batch
        return pa.RecordBatch.from_arrays(batch.columns, schema=self.schema)  # nullability as planned

    def close(self) -> None:
        """Cancel the stages still running (a cancelled or abandoned query); a waiting `next()`
        then raises a QueryError of kind `cancelled`."""
        self._closed = True
        self._release()

    def _release(self) -> None:
        futures = [f for stage in self.futures for f in stage]
        self.futures = []
        if futures:
            self.executor.client.cancel(futures)

    def _run(self) -> Iterator[pa.RecordBatch]:
        results = self._gather()
        if self.split.whole:
            yield from (batch for table in results[0] if table is not None for batch in table.to_batches())
            return
        plan = final_plan(self.ctx, self.split, results)
        for partition in range(plan.partition_count):
            for batch in self.ctx.execute(plan, partition):
                yield batch.to_pyarrow()

    def _gather(self) -> list[list[pa.Table | None]]:
        flat = [f for stage in self.futures for f in stage]
        tables: list[pa.Table | None] = []
        try:
            if not self._closed:
                self._wait(flat)
                tables = self.executor.client.gather(flat)
        except Exception as e:
            if not self._closed:  # else the failure is the cancel's doing
                raise _query_error(e) from None
        finally:
            self._release()
        if self._closed:
            raise QueryError("Cluster execution: the query was cancelled", kind="cancelled")
        self.stats.bytes_received = sum(t.nbytes for t in tables if t is not None)
        results, start = [], 0
        for stage in self.split.stages:
            results.append(tables[start:start + stage.partitions])
            start += stage.partitions
        return results

    def _wait(self, futures: Sequence[Future[pa.Table | None]]) -> None:
        """Until every task is done or one has failed, watching that executors remain."""
        settled, lock, left = threading.Event(), threading.Lock(), [len(futures)]

        def done(future: Future[pa.Table | None]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last or future.status != "finished":
                settled.set()

        for future in futures:
            future.add_done_callback(done)
        alone_since: float | None = None
        while not settled.wait(0.5):
            if self.executor.client.nthreads():
                alone_since = None
                continue
            alone_since = alone_since or time.monotonic()
            if time.monotonic() - alone_since > self.executor.no_executors_grace:
                raise QueryError("Cluster execution failed: no executor is left in the cluster", kind="unavailable")


def _query_error(e: Exception) -> QueryError:
    """A failure while the stages ran, as the QueryError the client sees."""
    if isinstance(e, QueryError):
        return e
    if isinstance(e, StageError):  # DataFusion's own text, classified as it would be locally
        return engine_error(e)
    if isinstance(e, KilledWorker):
        return QueryError(f"Cluster execution failed: executors died running this query: {e}", kind="unavailable")
    if isinstance(e, (FutureCancelledError, FuturesCancelledError)):
        return QueryError(f"Cluster execution failed: a stage was cancelled: {e}", kind="unavailable")
    return QueryError(f"Cluster execution failed: {type(e).__name__}: {e}", kind="unavailable")

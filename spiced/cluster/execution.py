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
AVG included. A query that is one stage as a whole (a filtered projection) streams the executors'
batches as they come back.

Failures. The partitions of an executor that dies mid-query run again on another one (Dask retries
a task whose worker died, `distributed.scheduler.allowed-failures` times, then the query fails with
a QueryError naming the lost task). An error on an executor fails the query with DataFusion's text,
classified as it would be locally. Executors must see the files as the scheduler does: the same
paths, or object stores registered by `ClusterExecutor.prepare`'s `configure`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datafusion import DataFrame, ExecutionPlan, SessionConfig, SessionContext
from distributed import Client, Future, KilledWorker, Worker, get_worker
from distributed.client import FutureCancelledError, FuturesCancelledError
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol import deserialize, serialize

from ..batches import PLAIN_ARROW_TYPES
from ..errors import QueryError, engine_error
from ..plans import READ_ONLY

PLUGIN_NAME = "spiced-datafusion"

# Operators whose output partition i is computed from their input's partition i alone.
_PARTITION_LOCAL = frozenset({"FilterExec", "ProjectionExec", "CoalesceBatchesExec", "CooperativeExec",
                              "AggregateExec", "SortExec", "LocalLimitExec", "GlobalLimitExec"})
_CONSTANT_LEAVES = frozenset({"PlaceholderRowExec", "EmptyExec"})
_FILE_SCAN = re.compile(r"DataSourceExec: file_groups=\{.*, file_type=(parquet|csv|json)\b")

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
    scans: tuple[tuple[int, ...], ...]  # its file scans, as paths from the stage


@dataclass(frozen=True, slots=True)
class Split:
    plan: bytes  # the whole serialized plan
    stages: tuple[Stage, ...]
    shape: _Shape

    @property
    def whole(self) -> bool:
        """The plan is one stage: its partitions are the result."""
        return self.stages[0].path == ()


@dataclass(slots=True)
class _Visit:
    local: bool  # the subtree is partition-local down to its file scans
    stages: list[Stage]  # stages below (when not local)
    scans: list[tuple[int, ...]]  # file scans below (when local)
    shape: _Shape


def split_plan(plan: ExecutionPlan) -> Split | None:
    """The stages of `plan` to run on executors; None when the plan stays on the scheduler."""
    try:
        encoded = plan.to_bytes()
        visit = _visit(plan, encoded, ())
    except _NotDistributable:
        return None
    except Exception:  # DataFusion cannot serialize an operator (a Python table, information_schema)
        return None
    stages = [_stage(plan, encoded, (), visit.scans)] if visit.local else visit.stages
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
    stages: list[Stage] = []
    for v, (child, data, at) in zip(visits, children, strict=True):
        stages += [_stage(child, data, path + at, v.scans)] if v.local else v.stages
    return _Visit(False, stages, [], (name, partitions, tuple(v.shape for v in visits)))


def _stage(plan: ExecutionPlan, encoded: bytes, path: tuple[int, ...], scans: list[tuple[int, ...]]) -> Stage:
    try:  # what an executor's plain session cannot decode (a UDF of the runtime's) stays here
        ExecutionPlan.from_bytes(_scratch(), encoded)
    except Exception as e:
        raise _NotDistributable(str(e)) from None
    return Stage(encoded, plan.partition_count, path, tuple(scan[len(path):] for scan in scans))


def _name(plan: ExecutionPlan) -> str:
    return plan.display().split(":", 1)[0].strip()


def _located(plan: ExecutionPlan, encoded: bytes) -> list[tuple[ExecutionPlan, bytes, tuple[int, int]]]:
    """Each child of `plan`, serialized, with its position in `encoded`. A serialized plan node is a
    message of one field, the operator, whose own fields include its children, each serialized as
    it would be alone."""
    children = plan.children()
    if not children:
        return []
    operator = _operator(encoded)
    body = encoded[operator.body:operator.end]
    fields = _fields(body)
    taken: set[int] = set()
    located = []
    for child in children:
        data = child.to_bytes()
        index = next((i for i, f in enumerate(fields)
                      if i not in taken and f.wire == _LEN and body[f.body:f.end] == data), None)
        if index is None:
            raise _NotDistributable(f"{_name(child)} is not found in the encoding of {_name(plan)}")
        taken.add(index)
        located.append((child, data, (0, index)))
    return located


@functools.cache
def _scratch() -> SessionContext:
    """A plain session: stages are checked in it, and stage results become in-memory plans there."""
    return SessionContext()


# --- Protobuf wire format: just enough to replace a nested message -----------------------------

_LEN = 2  # the wire type of a length-delimited field (a nested message, bytes)


@dataclass(frozen=True, slots=True)
class _Field:
    number: int
    wire: int
    start: int  # the key's first byte
    body: int  # the value's first byte (after the length, for a length-delimited field)
    end: int


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(buf):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _NotDistributable("a truncated protobuf varint")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf: bytes) -> list[_Field]:
    fields, pos = [], 0
    while pos < len(buf):
        key, body = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            end = _varint(buf, body)[1]
        elif wire == 1:
            end = body + 8
        elif wire == 5:
            end = body + 4
        elif wire == _LEN:
            size, body = _varint(buf, body)
            end = body + size
        else:
            raise _NotDistributable(f"protobuf wire type {wire}")
        if end > len(buf):
            raise _NotDistributable("a truncated protobuf field")
        fields.append(_Field(key >> 3, wire, pos, body, end))
        pos = end
    return fields


def _operator(node: bytes) -> _Field:
    fields = _fields(node)
    if len(fields) != 1 or fields[0].wire != _LEN:
        raise _NotDistributable("a plan node that is not one operator message")
    return fields[0]


def _at(buf: bytes, path: tuple[int, ...]) -> bytes:
    for index in path:
        f = _fields(buf)[index]
        buf = buf[f.body:f.end]
    return buf


def _rewrite(buf: bytes, edits: Mapping[tuple[int, ...], bytes]) -> bytes:
    """`buf` with the length-delimited field at each path (field positions, outermost first)
    replaced by the given bytes, the lengths of the messages around it updated."""
    if () in edits:
        return edits[()]
    fields = _fields(buf)
    nested: dict[int, dict[tuple[int, ...], bytes]] = {}
    for path, value in edits.items():
        nested.setdefault(path[0], {})[path[1:]] = value
    out, pos = bytearray(), 0
    for index in sorted(nested):
        f = fields[index]
        value = _rewrite(buf[f.body:f.end], nested[index])
        out += buf[pos:f.start]
        out += _encode_varint(f.number << 3 | _LEN) + _encode_varint(len(value)) + value
        pos = f.end
    out += buf[pos:]
    return bytes(out)


# --- Putting the final plan together (scheduler side) -------------------------------------------

def _in_memory(tables: Sequence[pa.Table | None]) -> bytes | None:
    """A serialized source with the tables as its partitions, one for one; None when all are empty
    (without a batch there is no schema to give it)."""
    schema = next((t.schema for t in tables if t is not None), None)
    if schema is None:
        return None
    empty = pa.RecordBatch.from_pylist([], schema=schema)
    partitions = [(t.to_batches() if t is not None else []) or [empty] for t in tables]
    name = f"stage_{uuid.uuid4().hex}"
    _scratch().register_record_batches(name, partitions)
    try:
        return _scratch().table(name).execution_plan().to_bytes()
    finally:
        _scratch().deregister_table(name)


def _without_files(stage: Stage) -> bytes:
    """The stage with its file groups emptied: the same schema and partitions, nothing read. It
    stands for a stage whose every partition came back empty."""
    edits: dict[tuple[int, ...], bytes] = {}
    for scan in stage.scans:
        # FileScanExecConf `base_conf` is field 1 of every file scan operator; its file groups, field 1.
        operator = _at(stage.plan, scan + (0,))
        conf_index = next(i for i, f in enumerate(_fields(operator)) if f.number == 1)
        conf = _at(operator, (conf_index,))
        for group, f in enumerate(_fields(conf)):
            if f.number == 1:
                edits[scan + (0, conf_index, group)] = b""
    return _rewrite(stage.plan, edits)


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
    edits = {stage.path: _in_memory(tables) or _without_files(stage)
             for stage, tables in zip(split.stages, results, strict=True)}
    plan = ExecutionPlan.from_bytes(ctx, _rewrite(split.plan, edits))
    if not _matches(plan, split.shape):
        raise QueryError("Cluster execution: the final plan does not match the planned one", kind="internal")
    return plan


# --- Executors (worker side) -------------------------------------------------------------------

def executor_config() -> SessionConfig:
    config = SessionConfig().set("datafusion.execution.enable_file_stream_work_stealing", "false")
    for key, value in PLAIN_ARROW_TYPES.items():
        config = config.set(key, value)
    return config


class DataFusionExecutor(WorkerPlugin):
    """Gives each executor, present or future, its DataFusion session when it joins: starting
    DataFusion costs about a second, which would otherwise fall on the first query. `configure`
    (pickled to the workers) prepares the session: the object stores of the spicepod's datasets."""

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
    with tempfile.TemporaryDirectory() as folder:
        _warm_up(session, Path(folder))
    return session


def _warm_up(session: SessionContext, folder: Path) -> None:
    """A small stage's whole path once, Arrow serialization included: a first query costs about
    0.15 s more without it (DataFusion's runtime and Parquet reader, Dask's Arrow serializer)."""
    pq.write_table(pa.table({"n": [1, 2]}), folder / "warm.parquet")
    session.register_parquet("warm", str(folder / "warm.parquet"))
    try:
        plan = ExecutionPlan.from_bytes(session, session.sql("SELECT sum(n) FROM warm").execution_plan().to_bytes())
        batches = [batch.to_pyarrow() for p in range(plan.partition_count) for batch in session.execute(plan, p)]
    finally:
        session.deregister_table("warm")
    deserialize(*serialize(pa.Table.from_batches(batches)))


class StageError(Exception):
    """A stage partition that failed on an executor; the message is DataFusion's."""


def run_partition(plan: bytes, partition: int) -> pa.Table | None:
    """On an executor: partition `partition` of the serialized stage `plan` (None: no rows)."""
    session = _executor_session()
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
        with tempfile.TemporaryDirectory() as folder:  # this side's share of a first query
            _warm_up(_scratch(), Path(folder))
        _in_memory([pa.table({"n": [1]})])

    def execute(self, ctx: SessionContext, query: str | DataFrame) -> DistributedQuery | None:
        """Start `query` (SQL, or a DataFrame the engine planned in `ctx`) on the cluster; None when
        it is not distributed (the caller runs it locally). Planning errors are QueryErrors."""
        try:
            df = ctx.sql_with_options(query, READ_ONLY) if isinstance(query, str) else query
            split = split_plan(df.execution_plan())
        except Exception as e:
            raise engine_error(e) from None
        if split is None:
            return None
        executors = sorted(self.client.nthreads())
        if not executors:
            return None
        turn, tag = next(self._turn), uuid.uuid4().hex[:12]
        order = itertools.count(turn)
        futures = [[self.client.submit(run_partition, stage.plan, partition, key=f"spiced-stage-{tag}-{s}-{partition}",
                                       workers=[executors[next(order) % len(executors)]], allow_other_workers=True,
                                       pure=False)
                    for partition in range(stage.partitions)]
                   for s, stage in enumerate(split.stages)]
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
                raise QueryError("Cluster execution failed: no executor is left in the cluster")


def _query_error(e: Exception) -> QueryError:
    """A failure while the stages ran, as the QueryError the client sees."""
    if isinstance(e, QueryError):
        return e
    if isinstance(e, StageError):  # DataFusion's own text, classified as it would be locally
        return engine_error(e)
    if isinstance(e, KilledWorker):
        return QueryError(f"Cluster execution failed: executors died running this query: {e}")
    if isinstance(e, (FutureCancelledError, FuturesCancelledError)):
        return QueryError(f"Cluster execution failed: a stage was cancelled: {e}")
    return QueryError(f"Cluster execution failed: {type(e).__name__}: {e}")

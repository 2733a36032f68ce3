"""The SQL engine: one DataFusion session holding the spicepod's datasets and views.

Read-only by construction (DDL, DML and statements are refused by DataFusion's SQLOptions);
results leave as Arrow record-batch streams, never as one collected Python object.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
from datafusion import DataFrame, LogicalPlan, SessionConfig, SessionContext, SQLOptions
from datafusion.record_batch import RecordBatchStream

from .config import Dataset, Spicepod
from .errors import QueryError, QueryErrorKind
from .interrupt import Stopped, Stopper
from .metrics import Metrics

log = logging.getLogger("runtime")
refresh_log = logging.getLogger("runtime.accelerated_table.refresh_task")

DatasetStatus = Literal["Initializing", "Ready", "Disabled", "Error", "Refreshing", "ShuttingDown"]
_STATE_CODES = {"Initializing": 0, "Ready": 1, "Disabled": 2, "Error": 3, "Refreshing": 4, "ShuttingDown": 5}
_READ_ONLY = SQLOptions().with_allow_ddl(False).with_allow_dml(False).with_allow_statements(False)


def engine_message(e: BaseException) -> str:
    """DataFusion's text without the Python binding's `DataFusion error: ` wrapper."""
    text = str(e)
    return text.removeprefix("DataFusion error: ")


# DataFusionError's Display prefixes → kind (upstream's error_code.rs classifies the same variants).
_KINDS: tuple[tuple[str, QueryErrorKind], ...] = (
    ("SQL error: ", "syntax"),
    ("Error during planning: ", "planning"),
    ("Schema error: ", "planning"),
    ("Execution error: ", "execution"),
    ("Object Store error: ", "execution"),
    ("External error: ", "execution"),
    ("This feature is not implemented: ", "unsupported"),
    ("Resources exhausted: ", "resources_exhausted"),
)


def classify(message: str) -> QueryErrorKind:
    """The kind of a DataFusion error from its text; a `Context` wrapper (`<what>\ncaused by\n<error>`)
    is classified by the error it wraps, as upstream unwraps Context and Shared."""
    inner = message.rpartition("caused by\n")[2].lstrip()
    for prefix, kind in _KINDS:
        if inner.startswith(prefix):
            return kind
    return "internal"


def engine_error(e: BaseException) -> QueryError:
    """A DataFusion failure as the QueryError the client sees, classified once."""
    message = engine_message(e)
    return QueryError(message, kind=classify(message))


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


@dataclass(frozen=True, slots=True)
class DatasetState:
    dataset: Dataset
    status: DatasetStatus
    error: str | None = None


Params = Mapping[str, Any]  # placeholder name ("1", "name") → Python value or pyarrow scalar

# Results leave as Utf8, Binary and List, never as view types (Utf8View, BinaryView): many
# clients cannot decode views (apache-arrow in JS, used by the official Spice SDK, fails with
# "Unrecognized type ... (24)"). Parquet is read and SQL string types are planned without views, so
# nothing is converted; a view that a query still yields (`arrow_cast(x, 'Utf8View')`) is cast once
# per batch by `QueryStream`.
PLAIN_ARROW_TYPES = {
    "datafusion.execution.parquet.schema_force_view_types": "false",
    "datafusion.sql_parser.map_string_types_to_utf8view": "false",
}


def _plain_type(t: pa.DataType) -> pa.DataType:
    if t == pa.string_view():
        return pa.string()
    if t == pa.binary_view():
        return pa.binary()
    if pa.types.is_list_view(t) or pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_plain_type(t.value_type)))
    if pa.types.is_large_list_view(t) or pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_plain_type(t.value_type)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_plain_type(t.value_type)), t.list_size)
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_plain_type(f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(_plain_type(t.key_type)), t.item_field.with_type(_plain_type(t.item_type)),
                       t.keys_sorted)
    return t


def plain_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with every view type (at any depth) replaced by its plain counterpart."""
    return pa.schema([f.with_type(_plain_type(f.type)) for f in schema], schema.metadata)


class Engine:
    def __init__(self, spicepod: Spicepod, metrics: Metrics) -> None:
        config = (SessionConfig()
                  .with_default_catalog_and_schema("spice", "public")
                  .with_create_default_catalog_and_schema(True)
                  .with_information_schema(True))
        for key, value in PLAIN_ARROW_TYPES.items():
            config = config.set(key, value)
        self.ctx = SessionContext(config)
        self.spicepod = spicepod
        self.metrics = metrics
        self._states: dict[str, DatasetState] = {}
        self._lock = threading.Lock()
        self._refresh_tasks: list[asyncio.Task[None]] = []
        self._loop = _WaitLoop()
        self._stored: dict[str, list[pa.RecordBatch]] = {}  # accelerated datasets' Arrow batches
        # A refresh replaces a table by deregistering and registering it (DataFusion has no swap);
        # a query planned in between would not find it, so it waits for the swap and plans again.
        self._swap_lock = threading.Lock()
        self._swaps = 0  # swaps begun; odd while one is under way

    # -------------------------------------------------------------- datasets

    def _set_state(self, ds: Dataset, status: DatasetStatus, error: str | None = None) -> None:
        with self._lock:
            self._states[ds.name] = DatasetState(ds, status, error)
        self.metrics.dataset_load_state.set(_STATE_CODES[status], {"dataset": ds.name})

    def states(self) -> list[DatasetState]:
        with self._lock:
            return [self._states[d.name] for d in self.spicepod.datasets if d.name in self._states]

    def ready(self) -> bool:
        """Ready once every dataset has loaded (a failed dataset never becomes ready)."""
        with self._lock:
            return all(self._states.get(d.name, None) is not None
                       and self._states[d.name].status in ("Ready", "Refreshing")
                       for d in self.spicepod.datasets)

    def _read(self, ds: Dataset) -> DataFrame:
        path = str(ds.path)
        if ds.file_format == "parquet":
            return self.ctx.read_parquet(path)
        if ds.file_format == "csv":
            p = ds.params
            return self.ctx.read_csv(
                path,
                has_header=p.get("csv_has_header", "true").lower() == "true",
                delimiter=p.get("csv_delimiter", ","),
                schema_infer_max_records=int(p.get("csv_schema_infer_max_records", "1000")),
                file_extension=ds.path.suffix or ".csv",
            )
        return self.ctx.read_json(path, file_extension=ds.path.suffix or ".json")

    def _register_source(self, ds: Dataset) -> None:
        """Non-accelerated: the table reads the file on every query."""
        path, p = str(ds.path), ds.params
        if ds.file_format == "parquet":
            self.ctx.register_parquet(ds.name, path)
        elif ds.file_format == "csv":
            self.ctx.register_csv(
                ds.name, path,
                has_header=p.get("csv_has_header", "true").lower() == "true",
                delimiter=p.get("csv_delimiter", ","),
                schema_infer_max_records=int(p.get("csv_schema_infer_max_records", "1000")),
                file_extension=ds.path.suffix or ".csv",
            )
        else:
            self.ctx.register_json(ds.name, path, file_extension=ds.path.suffix or ".json")

    def _load_accelerated(self, ds: Dataset) -> pa.Table:
        table = self._read(ds).to_arrow_table()
        # Stored as batches of up to 256K rows and 4 MB: a plain scan hands them out as they are
        # (see `_stored_scan`), in a few large messages. DataFusion needs at least one batch to
        # know the schema: an empty file gets an empty batch.
        batches = list(coalesce(table.to_batches(), 262_144, first_alone=False)) \
            or [pa.RecordBatch.from_pylist([], schema=table.schema)]
        with self._swap_lock:
            self._swaps += 1
            try:
                if self.ctx.table_exist(ds.name):
                    self.ctx.deregister_table(ds.name)
                self.ctx.register_record_batches(ds.name, [batches])
                with self._lock:
                    self._stored[ds.name] = batches
            finally:
                self._swaps += 1
        return table

    def register_all(self) -> None:
        """Register every dataset and view, and log the registration lines; loading happens in `load_all`."""
        for ds in self.spicepod.datasets:
            self._set_state(ds, "Initializing")
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

    def load_one(self, ds: Dataset, *, refresh: bool = False) -> None:
        started = time.monotonic()
        try:
            if ds.accelerated:
                if refresh:
                    self._set_state(ds, "Refreshing")
                refresh_log.info("Loading data for dataset %s", ds.name)
                table = self._load_accelerated(ds)
                refresh_log.info("Loaded %s rows (%s) for dataset %s in %s.", f"{table.num_rows:,}",
                                 format_size(table.nbytes), ds.name, format_duration(time.monotonic() - started))
            else:
                self._register_source(ds)
            self._set_state(ds, "Ready")
        except Exception as e:  # a broken file must not stop the runtime; the dataset reports Error
            message = engine_message(e)
            log.error("Failed to load dataset %s: %s", ds.name, message)
            self.metrics.dataset_load_errors.add(1, {"dataset": ds.name})
            self._set_state(ds, "Error", message)

    def register_views(self) -> None:
        for v in self.spicepod.views:
            try:
                self.ctx.register_view(v.name, self.ctx.sql_with_options(v.sql, _READ_ONLY))
                log.info("View %s registered.", v.name)
            except Exception as e:
                log.error("Failed to register view %s: %s", v.name, engine_message(e))

    async def load_all(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(self.load_one, ds) for ds in self.spicepod.datasets))
        await asyncio.to_thread(self.register_views)
        for ds in self.spicepod.datasets:
            a = ds.acceleration
            if ds.accelerated and a is not None and a.refresh_check_interval:
                self._refresh_tasks.append(asyncio.create_task(self._refresh_loop(ds, a.refresh_check_interval)))

    async def _refresh_loop(self, ds: Dataset, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.load_one, ds, refresh=True)

    async def refresh(self, ds: Dataset) -> None:
        await asyncio.to_thread(self.load_one, ds, refresh=True)

    def stop(self) -> None:
        """No more refreshes; queries under way go on."""
        for t in self._refresh_tasks:
            t.cancel()

    def close(self) -> None:
        """After the drain: queries are over."""
        self._loop.stop()

    # -------------------------------------------------------------- queries

    def plan(self, sql: str, params: Params | None = None) -> DataFrame:
        """Plan one read-only statement; planning errors become QueryError with DataFusion's text.

        `params` binds placeholders: `$1`, `$2` by the keys "1", "2"; `$name` and `:name` by "name".
        Values are Python values or pyarrow scalars (which keep their Arrow type)."""
        swaps = self._swaps
        try:
            return self._plan(sql, params)
        except QueryError:
            if swaps % 2 == 0 and swaps == self._swaps:
                raise
        with self._swap_lock:  # a table was being replaced meanwhile: plan again once it is back
            pass
        return self._plan(sql, params)

    def _plan(self, sql: str, params: Params | None) -> DataFrame:
        try:
            return self.ctx.sql_with_options(sql, _READ_ONLY, param_values=dict(params) if params else None)
        except Exception as e:
            raise engine_error(e) from None

    def schema(self, sql: str, params: Params | None = None) -> pa.Schema:
        return plain_schema(self.plan(sql, params).schema())

    def execute(self, sql: str, timeout: float | None = None, params: Params | None = None,
                stopper: Stopper | None = None) -> QueryStream:
        """Plan and start executing; errors raised before the first batch are QueryErrors.

        With a `timeout` (seconds from now), a batch not ready by then ends the query with a
        QueryError of kind `timeout`; `stopper.stop(error)` ends it with `error` (a cancel). Either
        way the query stops running (see `QueryStream`)."""
        stopper = stopper or Stopper()
        df = self.plan(sql, params)
        deadline = _Deadline(timeout, self._loop.get()) if timeout is not None else None
        stored = self._stored_scan(df)
        if stored is not None:
            return QueryStream(df.schema(), stored, deadline, stopper)
        try:
            stream = stopper.call(df.execute_stream)
        except Stopped as e:
            raise e.error from None
        except Exception as e:
            raise engine_error(e) from None
        return QueryStream(df.schema(), stream, deadline, stopper)

    def _stored_scan(self, df: DataFrame) -> Iterator[pa.RecordBatch] | None:
        """For a plain scan of an accelerated dataset (`SELECT <columns> FROM <dataset>`: no filter,
        limit, order, alias or expression), its stored Arrow batches, column-selected without a copy.
        DataFusion would only re-slice them into 8K-row batches and pass them on. None otherwise."""
        if not self._stored:
            return None
        try:
            if not _is_column_scan(df.logical_plan()):  # the cheap test first: SELECT 1 is common
                return None
            plan = df.optimized_logical_plan()
            top = plan.to_variant()
            if type(top).__name__ == "TableScan":
                scan, columns = top, None
            elif _is_column_scan(plan):
                scan = plan.inputs()[0].to_variant()
                columns = [expr.to_variant().name() for expr in top.projections()]
            else:
                return None
            if scan.filters() or scan.fetch() is not None:
                return None
            catalog, schema, name = scan.fqn()
            scanned = dict((column, index) for index, column in scan.projection())
            indices = list(scanned.values()) if columns is None else [scanned[c] for c in columns]
        except Exception:  # a plan shape these bindings cannot describe: let DataFusion run it
            return None
        if catalog not in (None, "spice") or schema not in (None, "public"):
            return None
        with self._lock:
            stored = self._stored.get(name)
        if not stored or not pa.schema([stored[0].schema.field(i) for i in indices]).equals(df.schema()):
            return None  # e.g. a refresh changed the schema since planning
        return (batch.select(indices) for batch in stored)

    def table_schema(self, name: str) -> pa.Schema | None:
        try:
            return plain_schema(self.ctx.table(name).schema())
        except Exception:
            return None


def coalesce(batches: Iterable[pa.RecordBatch], rows: int = 65_536,
             max_bytes: int = 4_000_000, *, first_alone: bool = True) -> Iterator[pa.RecordBatch]:
    """Merge small batches (DataFusion's are 8,192 rows) into ones of up to `rows` rows and
    `max_bytes` of Arrow data, so encoders and Flight make fewer, larger calls while a chunk in
    flight stays under gRPC's common 4 MiB message limit (Go and tonic clients keep it by default).
    Larger batches pass through uncopied. With `first_alone` the first batch goes out as it is,
    so the first byte leaves early."""
    pending: list[pa.RecordBatch] = []
    count = size = 0
    first = first_alone
    for batch in batches:
        if first:
            first = False
            yield batch
            continue
        if pending and (count + batch.num_rows > rows or size + batch.nbytes > max_bytes):
            yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)
            pending, count, size = [], 0, 0
        pending.append(batch)
        count += batch.num_rows
        size += batch.nbytes
        if count >= rows or size >= max_bytes:
            yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)
            pending, count, size = [], 0, 0
    if pending:
        yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)


class _WaitLoop:
    """An event loop on a thread of its own, started on first use, where timed queries wait for
    their first batch. DataFusion stops a query when its stream is dropped, but a blocking `next()`
    cannot be interrupted at a precise moment; an awaited `__anext__` can, and cancelling it drops
    the Rust future. (A cancel does not need that precision: spiced.interrupt.)"""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="query-deadlines", daemon=True).start()
                self._loop = loop
            return self._loop

    def stop(self) -> None:
        with self._lock:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._loop = None


class _Deadline:
    def __init__(self, seconds: float, loop: asyncio.AbstractEventLoop) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.loop = loop

    def error(self) -> QueryError:
        return QueryError(f"Query timed out after {self.seconds:g}s", kind="timeout")


def _is_column_scan(plan: LogicalPlan) -> bool:
    """A TableScan, or a Projection of bare columns straight over one."""
    node = plan.to_variant()
    if type(node).__name__ == "TableScan":
        return True
    if type(node).__name__ != "Projection":
        return False
    inputs = plan.inputs()
    return (len(inputs) == 1 and type(inputs[0].to_variant()).__name__ == "TableScan"
            and all(expr.variant_name() == "Column" for expr in node.projections()))


async def _next_within(stream: RecordBatchStream, seconds: float) -> object:
    return await asyncio.wait_for(stream.__anext__(), seconds)


class QueryStream:
    """A running query: its schema and an iterator of record batches (errors mid-stream are QueryErrors).

    Every blocking fetch runs through the query's Stopper, so `stopper.stop(error)` (a cancel) ends
    it, within about a second even while DataFusion is still computing a batch (spiced.interrupt).
    Under a deadline, the first batch (where sorts, aggregates and joins spend their time) is
    awaited on the wait loop for at most the time left; past it, or on a stop, the wait is
    cancelled. Later batches are fetched directly (an await costs about half a millisecond) and
    the deadline is checked between them. Either way the stream is dropped, which cancels
    DataFusion's tasks; DataFusion stops at its next yield point, so an operator busy on one huge
    batch runs on until it ends.
    """

    def __init__(self, schema: pa.Schema, stream: RecordBatchStream | Iterator[pa.RecordBatch],
                 deadline: _Deadline | None = None, stopper: Stopper | None = None) -> None:
        self.schema = plain_schema(schema)
        self._cast = not self.schema.equals(schema)  # the rare query that still yields a view type
        self._stream: RecordBatchStream | Iterator[pa.RecordBatch] | None = stream
        self._deadline = deadline
        self._stopper = stopper or Stopper()
        self._started = False  # whether the first batch has been asked for
        self.rows = 0

    def _next(self) -> object:
        outcome = self._fetch()
        if isinstance(outcome, QueryError):
            # Raised here, where no exception context or traceback holds the stream: dropping
            # this last reference is what stops the query.
            self._stream = None
            raise outcome
        return outcome

    def _fetch(self) -> object:
        """The next batch, or the QueryError that ends the query early (a stop or the time limit)."""
        stream, deadline = self._stream, self._deadline
        assert stream is not None
        first, self._started = not self._started, True
        if deadline is not None:
            left = deadline.at - time.monotonic()
            if left <= 0:
                return deadline.error()
            if first and isinstance(stream, RecordBatchStream):
                return self._first_within(stream, left, deadline)
        try:
            return self._stopper.call(next, stream)
        except Stopped as e:
            error = e.error
        return error

    def _first_within(self, stream: RecordBatchStream, left: float, deadline: _Deadline) -> object:
        waiting = asyncio.run_coroutine_threadsafe(_next_within(stream, left), deadline.loop)
        try:
            return self._stopper.wait(waiting)
        except StopAsyncIteration:
            raise StopIteration from None
        except TimeoutError:
            error = deadline.error()
        except Stopped as e:
            error = e.error
        del waiting  # its exception's traceback still holds the stream
        return error

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        while self._stream is not None:
            try:
                batch = self._next()
            except StopIteration:
                return
            except QueryError:
                raise
            except Exception as e:
                raise engine_error(e) from None
            rb = batch if isinstance(batch, pa.RecordBatch) else batch.to_pyarrow()  # type: ignore[attr-defined]
            if self._cast:
                rb = rb.cast(self.schema)
            elif not rb.schema.equals(self.schema):  # DataFusion plans a column nullable, then sends it non-null
                rb = pa.RecordBatch.from_arrays(rb.columns, schema=self.schema)
            self.rows += rb.num_rows
            yield rb

    def reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.schema, iter(self))

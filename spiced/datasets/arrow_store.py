"""The Arrow accelerator: a dataset's rows held in memory as record batches in the session.

A refresh replaces a table by deregistering and registering it (DataFusion has no swap); a query
planned in between would not find it, so `Engine.plan` waits for the swap and plans again
(`swapping`). A plain scan of a held dataset is answered with its batches as they are
(`stored_scan`): DataFusion would only re-slice them into 8K-row batches and pass them on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pyarrow as pa
from datafusion import DataFrame, LogicalPlan, SessionContext
from datafusion.expr import Projection, TableScan
from sqlglot import exp

from ..batches import coalesce
from ..plans import READ_ONLY
from .accelerator import Checkpoint, Written
from .time_filter import Value, newest_value


class ArrowStore:
    dialect = None

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        self._stored: dict[str, list[pa.RecordBatch]] = {}
        self._swap_lock = threading.Lock()
        self._swaps = 0  # swaps begun; odd while one is under way

    def replace(self, name: str, reader: pa.RecordBatchReader) -> Written:
        """Hold everything `reader` gives as `name`, in place of what was held."""
        table = reader.read_all()
        self._hold(name, table.schema, table.to_batches())
        return Written(table.num_rows, table.nbytes)

    def append(self, name: str, reader: pa.RecordBatchReader) -> Written:
        with self._lock:
            held = list(self._stored.get(name, ()))
        schema = held[0].schema if held else reader.schema
        added = reader.read_all()
        if added.num_rows:
            added = added.select(schema.names).cast(schema) if added.schema != schema else added
        self._hold(name, schema, [*held, *added.to_batches()])
        return Written(added.num_rows, added.nbytes)

    def holds(self, name: str) -> bool:
        with self._lock:
            return name in self._stored

    def newest(self, name: str, column: str) -> Value | None:
        with self._lock:
            held = self._stored.get(name, [])
        if not held:
            return None
        return newest_value(pa.chunked_array([b.column(column) for b in held], type=held[0].schema.field(column).type))

    def time_unit(self, name: str, column: str) -> str:
        with self._lock:
            held = self._stored.get(name)
        kind = held[0].schema.field(column).type if held else None
        return str(kind.unit) if kind is not None and pa.types.is_timestamp(kind) else "us"

    def delete(self, name: str, condition: exp.Expression) -> int:
        with self._lock:
            held = self._stored.get(name, [])
        before = sum(b.num_rows for b in held)
        kept = exp.select("*").from_(exp.to_table(name, quoted=True)).where(exp.Is(this=exp.paren(condition),
                                                                                     expression=exp.true()).not_())
        table = self.ctx.sql_with_options(kept.sql(), READ_ONLY).to_arrow_table()
        self._hold(name, table.schema, table.to_batches())
        return before - table.num_rows

    def checkpoint(self, name: str) -> Checkpoint | None:
        return None  # memory only: nothing outlives the process

    def close(self) -> None:
        pass

    def _hold(self, name: str, schema: pa.Schema, batches: list[pa.RecordBatch]) -> None:
        # Stored as batches of up to 256K rows and 4 MB: a plain scan hands them out as they are,
        # in a few large messages. DataFusion needs at least one batch to know the schema: an
        # empty source gets an empty batch.
        batches = list(coalesce(batches, 262_144, first_alone=False)) \
            or [pa.RecordBatch.from_pylist([], schema=schema)]
        self.register(name, batches, held=True)

    def register(self, name: str, batches: list[pa.RecordBatch], *, held: bool) -> None:
        """`name` reads `batches` from now on, swapped in as `Engine.plan` expects; `held`: they
        are the dataset's rows (else a placeholder with the schema of a table kept elsewhere)."""
        self._swap(name, batches, held=held)

    def drop(self, name: str) -> None:
        """`name` is no longer a table (its dataset left the spicepod)."""
        self._swap(name, None, held=False)

    def forget(self, name: str) -> None:
        self.drop(name)

    def _swap(self, name: str, batches: list[pa.RecordBatch] | None, *, held: bool) -> None:
        """Take `name` out of the session and put `batches` in (if any), counted in `swaps`."""
        with self._swap_lock:
            self._swaps += 1
            try:
                if self.ctx.table_exist(name):
                    self.ctx.deregister_table(name)
                if batches is not None:
                    self.ctx.register_record_batches(name, [batches])
                with self._lock:
                    if held and batches is not None:
                        self._stored[name] = batches
                    else:
                        self._stored.pop(name, None)
            finally:
                self._swaps += 1

    @property
    def swaps(self) -> int:
        return self._swaps

    def wait_for_swap(self) -> None:
        with self._swap_lock:
            pass

    def stored_scan(self, df: DataFrame) -> Iterator[pa.RecordBatch] | None:
        """For a plain scan of a held dataset (`SELECT <columns> FROM <dataset>`: no filter,
        limit, order, alias or expression), its batches, column-selected without a copy. None otherwise."""
        if not self._stored:
            return None
        try:
            if not _is_column_scan(df.logical_plan()):  # the cheap test first: SELECT 1 is common
                return None
            plan = df.optimized_logical_plan()
            top = plan.to_variant()
            if isinstance(top, TableScan):
                scan, columns = top, None
            elif _is_column_scan(plan) and isinstance(top, Projection):
                inner = plan.inputs()[0].to_variant()
                assert isinstance(inner, TableScan)
                scan = inner
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


def _is_column_scan(plan: LogicalPlan) -> bool:
    """A TableScan, or a Projection of bare columns straight over one."""
    node = plan.to_variant()
    if isinstance(node, TableScan):
        return True
    if not isinstance(node, Projection):
        return False
    inputs = plan.inputs()
    return (len(inputs) == 1 and isinstance(inputs[0].to_variant(), TableScan)
            and all(expr.variant_name() == "Column" for expr in node.projections()))

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

from ..batches import coalesce


class ArrowStore:
    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        self._stored: dict[str, list[pa.RecordBatch]] = {}
        self._swap_lock = threading.Lock()
        self._swaps = 0  # swaps begun; odd while one is under way

    def replace(self, name: str, reader: pa.RecordBatchReader) -> pa.Table:
        """Hold everything `reader` gives as `name`, in place of what was held; returns it."""
        table = reader.read_all()
        # Stored as batches of up to 256K rows and 4 MB: a plain scan hands them out as they are,
        # in a few large messages. DataFusion needs at least one batch to know the schema: an
        # empty source gets an empty batch.
        batches = list(coalesce(table.to_batches(), 262_144, first_alone=False)) \
            or [pa.RecordBatch.from_pylist([], schema=table.schema)]
        with self._swap_lock:
            self._swaps += 1
            try:
                if self.ctx.table_exist(name):
                    self.ctx.deregister_table(name)
                self.ctx.register_record_batches(name, [batches])
                with self._lock:
                    self._stored[name] = batches
            finally:
                self._swaps += 1
        return table

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

"""Arrow batches as they leave the runtime: plain (non-view) types, and coalesced into few large batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa

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


def conformed(reader: Iterator[pa.RecordBatch], target: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Batches cast, column by column in order, to the schema DataFusion planned."""
    def conform(batch: pa.RecordBatch) -> pa.RecordBatch:
        if batch.num_columns != len(target):
            raise ValueError(f"the source returned {batch.num_columns} columns, {len(target)} were planned")
        if batch.schema.equals(target):
            return batch
        return pa.RecordBatch.from_arrays([c.cast(f.type) for c, f in zip(batch.columns, target, strict=True)],
                                          schema=target)

    for batch in reader:
        yield conform(batch)

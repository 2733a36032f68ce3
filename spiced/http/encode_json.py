"""Arrow record batches → a JSON array of row objects, built by Arrow kernels, never row by row.

Per batch: strings are JSON-escaped by pyarrow kernels, nested values are printed one by one,
and then a single DataFusion projection casts numbers and timestamps to text (arrow-rs, so they
read exactly as upstream's arrow-json writes them) and assembles every row with `concat`, which
skips null fields, so they are omitted. The rows' text leaves as views of the Arrow buffers.
bench/http_json.py compares this with DataFusion's own JSON writer on 1M rows.

Small batches (a few hundred rows of ints, doubles, decimals, strings, nested values, dates, times
and timestamps) skip the projection, whose planning would cost more than the rows: they are printed
value by value with the same rules (spiced/http/temporal.py for the temporal ones), and a test holds
both paths to byte-identical output.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from . import temporal
from .values import (
    SMALL_ROWS,
    BatchSql,
    finite_or_null,
    json_escape,
    json_text,
    kind_of,
    number_formatter,
    plain,
    python_json,
    sql_string,
    value_bytes,
)

# A slice's text must stay far below the 2 GiB reach of int32 string offsets.
SLICE_ROWS = 65_536


def _value_sql(index: int, kind: str) -> tuple[str, str]:
    """The SQL text of one value and the literal that must follow it (a closing quote or nothing)."""
    if kind == "number":
        return f"arrow_cast(c{index}, 'Utf8')", ""
    if kind == "temporal":
        return f"arrow_cast(c{index}, 'Utf8')", '"'
    if kind == "text":
        return f"c{index}", '"'
    return f"c{index}", ""  # already JSON text


def _key(name: str, kind: str) -> str:
    return json.dumps(name, ensure_ascii=False) + ":" + ('"' if kind in ("temporal", "text") else "")


def row_sql(columns: list[tuple[int, str, str, bool]]) -> str:
    """One projection turning a prepared batch into row texts `,{"k":v,…}`.

    `columns` holds (index, name, kind, has_nulls) for every printed column. A column without
    nulls in this batch is spliced into a single `concat` as literal key + value; a column with
    nulls becomes a `'"key":' || value` fragment, null where the value is, which `concat` skips.
    When the first column holds nulls the comma placement is left to `concat_ws`.
    """
    if columns[0][3]:
        fragments = []
        for index, name, kind, _ in columns:
            value, close = _value_sql(index, kind)
            fragments.append(f"{sql_string(_key(name, kind))} || {value}"
                             + (f" || {sql_string(close)}" if close else ""))
        return f"SELECT concat(',{{', concat_ws(',', {', '.join(fragments)}), '}}') FROM b"
    args: list[str] = []
    pending = ",{"
    for position, (index, name, kind, has_nulls) in enumerate(columns):
        key = ("," if position else "") + _key(name, kind)
        value, close = _value_sql(index, kind)
        if has_nulls:
            if pending:
                args.append(sql_string(pending))
            args.append(f"{sql_string(key)} || {value}" + (f" || {sql_string(close)}" if close else ""))
            pending = ""
        else:
            args += [sql_string(pending + key), value]
            pending = close
    args.append(sql_string(pending + "}"))
    return f"SELECT concat({', '.join(args)}) FROM b"


class JsonEncoder:
    """`[` + one `{…}` per row, comma separated + `]`; keys are the column names, nulls omitted."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._kinds = [kind_of(f.type) for f in schema]
        self._engine = BatchSql(SLICE_ROWS)
        self._queries: dict[tuple[tuple[int, bool], ...], str] = {}  # by (column, holds nulls) printed
        self._small = small_rows_encoder(schema)
        self._first = True

    def begin(self) -> list[bytes]:
        return [b"["]

    def end(self) -> list[bytes]:
        return [b"]"]

    def batch(self, batch: pa.RecordBatch) -> list[bytes | memoryview]:
        """The rows' text; large batches as views of Arrow buffers (no copy on the way out)."""
        chunks: list[Any] | None = None
        if batch.num_rows <= SMALL_ROWS and self._small is not None:
            with contextlib.suppress(temporal.NotPrintable):
                chunks = [self._small(batch).encode()] if batch.num_rows else []
        if chunks is None:
            chunks = [value_bytes(rows) for start in range(0, batch.num_rows, SLICE_ROWS)
                      for rows in self.rows(batch.slice(start, SLICE_ROWS))]
        if self._first:
            for i, chunk in enumerate(chunks):
                if len(chunk):
                    chunks[i] = chunk[1:] if isinstance(chunk, bytes) else chunk.slice(1)  # no comma before row 1
                    self._first = False
                    break
        return [chunk if isinstance(chunk, bytes) else memoryview(chunk) for chunk in chunks if len(chunk)]

    def rows(self, batch: pa.RecordBatch) -> list[pa.Array]:
        """Row texts `,{"k":v,…}`, each with its leading comma, as string arrays in row order."""
        if not batch.num_rows:
            return []
        columns = []
        printed: list[tuple[int, str, str, bool]] = []
        for index, (field, column, kind) in enumerate(zip(self.schema, batch.columns, self._kinds, strict=False)):
            if kind == "skip" or column.null_count == len(column):
                columns.append(pa.nulls(len(column), pa.int8()))
                continue
            column = plain(column)
            if kind == "number":
                column = finite_or_null(column)
            elif kind == "text":
                column = json_escape(column)
            elif kind == "python":
                column = python_json(column)
            columns.append(column)
            printed.append((index, field.name, kind, column.null_count > 0))
        if not printed:
            return [pa.array([",{}"] * batch.num_rows, pa.string())]
        signature = tuple((index, has_nulls) for index, _, _, has_nulls in printed)
        sql = self._queries.get(signature)
        if sql is None:
            sql = self._queries[signature] = row_sql(printed)
        prepared = pa.RecordBatch.from_arrays(columns, names=[str(i) for i in range(len(columns))])
        return [b.column(0) for b in self._engine.run(sql, prepared)]


# ------------------------------------------------------------------ small batches, value by value


Values = Callable[[pa.Array], list[Any]]


def _to_python(column: pa.Array) -> list[Any]:
    return column.to_pylist()


def _formatter(t: pa.DataType) -> tuple[Callable[[Any], str | None], Values] | None:
    """How the values of type `t` are read and each printed on the small path, or None if only the
    kernels can print them."""
    kind = kind_of(t)
    if kind == "number" and (fmt := number_formatter(t)) is not None:
        return fmt, _to_python
    if kind == "text":
        return (lambda v: json.dumps(v, ensure_ascii=False)), _to_python
    if kind == "python" and not isinstance(t, pa.BaseExtensionType):
        return json_text, _to_python
    if kind == "temporal" and (printer := temporal.formatter(t)) is not None:
        as_int = temporal.storage(t)
        return (lambda v: '"' + printer(v) + '"'), (lambda column: column.view(as_int).to_pylist())
    return None  # float32, named time zones, extension types


def small_rows_encoder(schema: pa.Schema) -> Callable[[pa.RecordBatch], str] | None:
    """The value-by-value printer for this schema, or None when some column needs the kernels. The
    printer raises temporal.NotPrintable for a value only the kernels print."""
    keys: list[str] = []
    formats: list[tuple[Callable[[Any], str | None], Values] | None] = []
    for field in schema:
        keys.append(json.dumps(field.name, ensure_ascii=False) + ":")
        if pa.types.is_null(field.type):
            formats.append(None)
            continue
        fmt = _formatter(field.type)
        if fmt is None:
            return None
        formats.append(fmt)

    def encode(batch: pa.RecordBatch) -> str:
        columns = [(key, spec[0], spec[1](column))
                   for key, spec, column in zip(keys, formats, batch.columns, strict=False)
                   if spec is not None]
        rows = []
        for r in range(batch.num_rows):
            fields = []
            for key, fmt, values in columns:
                value = values[r]
                if value is not None:
                    text = fmt(value)
                    if text is not None:
                        fields.append(key + text)
            rows.append(",{" + ",".join(fields) + "}")
        return "".join(rows)

    return encode

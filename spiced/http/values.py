"""Value text for the HTTP encoders: how one Arrow column becomes strings, column at a time.

Scalars are printed by DataFusion's own casts (arrow-rs, the code upstream uses), run over one
batch at a time in a private session (`BatchSql`), so timestamps, floats and decimals read exactly
as upstream prints them. Strings are JSON-escaped with pyarrow kernels. Only nested, binary and
duration values, which have no Arrow kernel for JSON, are printed value by value, and so are
the numbers of small batches, by rules that match arrow-rs (tests hold both to the same bytes).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import os
from collections.abc import Callable
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from datafusion import SessionConfig, SessionContext

# How a column is printed:
#   skip      the null type: every value is null
#   number    ints, floats, decimals, booleans: DataFusion cast, unquoted in JSON
#   temporal  dates, times, timestamps: DataFusion cast, quoted in JSON
#   text      strings: as they are (escaped for JSON)
#   python    nested, binary, durations and anything else: one value at a time
Kind = Literal["skip", "number", "temporal", "text", "python"]


def plain(array: pa.Array) -> pa.Array:
    """Decode dictionaries and unwrap extension types so kernels see the values themselves."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if isinstance(array.type, pa.BaseExtensionType):
        array = array.storage
    return array


def kind_of(t: pa.DataType) -> Kind:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if isinstance(t, pa.BaseExtensionType):
        t = t.storage_type
    if pa.types.is_null(t):
        return "skip"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t):
        return "number"
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t):
        return "temporal"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    return "python"


def as_string(array: pa.Array) -> pa.Array:
    return array if array.type == pa.string() else pc.cast(array, pa.string())


def finite_or_null(array: pa.Array) -> pa.Array:
    """NaN and ±inf have no JSON form: they become null (and so are omitted), as in arrow-json."""
    if array.type == pa.float16():
        array = pc.cast(array, pa.float32())  # DataFusion cannot cast half floats to text
    if not pa.types.is_floating(array.type):
        return array
    finite = pc.is_finite(array)
    if pc.all(finite).as_py() is False:
        array = pc.if_else(finite, array, pa.scalar(None, array.type))
    return array


def value_bytes(array: pa.Array) -> pa.Buffer:
    """The UTF-8 bytes of all values of a string array, back to back, without copying."""
    array = as_string(array)  # the layout read below is that of `string` (int32 offsets)
    offsets = pa.Array.from_buffers(pa.int32(), len(array) + 1, [None, array.buffers()[1]], offset=array.offset)
    first, last = offsets[0].as_py(), offsets[-1].as_py()
    data = array.buffers()[2]
    if data is None or last == first:
        return pa.py_buffer(b"")
    return data.slice(first, last - first)


# ------------------------------------------------------------------ JSON strings

_SHORT_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_OTHER_CONTROL = "[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f]"  # control characters without a short escape


def json_escape(array: pa.Array) -> pa.Array:
    """JSON string escaping of a string array (the surrounding quotes are not added).

    One scan of the raw value bytes tells whether anything needs escaping (usually nothing
    does); backslashes, quotes, \\n, \\r and \\t are replaced by kernels, and the few values holding
    other control characters are escaped one by one by `json.dumps`.
    """
    array = as_string(array)
    data = value_bytes(array)
    if not data.size:
        return array
    raw = pa.Array.from_buffers(pa.uint8(), data.size, [None, data])
    control = pc.any(pc.less(raw, 0x20)).as_py()
    present = {c for c in '\\"' if pc.any(pc.equal(raw, ord(c))).as_py()}
    if not control and not present:
        return array
    other_mask = pc.match_substring_regex(array, _OTHER_CONTROL) if control else None
    others = None
    if other_mask is not None and pc.any(other_mask).as_py():
        values = pc.filter(array, other_mask).to_pylist()
        others = pa.array([json.dumps(v, ensure_ascii=False)[1:-1] for v in values], pa.string())
    for char, escaped in _SHORT_ESCAPES.items():  # backslash first, so later escapes are not doubled
        if char in present or (control and char in "\n\r\t"):
            array = pc.replace_substring(array, char, escaped)
    if others is not None:
        array = pc.replace_with_mask(array, other_mask, others)
    return array


# ------------------------------------------------------------------ one value at a time


def json_text(value: Any) -> str:
    """JSON of one nested or unusual value, shaped like arrow-json: struct fields that are null are
    omitted, maps become objects, binary is hex, NaN is null, decimals keep their digits."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return float_text(value) or "null"
    if isinstance(value, decimal.Decimal):
        return str(value) if value.is_finite() else "null"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{json_text(v)}"
                              for k, v in value.items() if v is not None) + "}"
    if isinstance(value, list):
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):  # a map's entries
            return "{" + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{json_text(v)}" for k, v in value) + "}"
        return "[" + ",".join(json_text(v) for v in value) + "]"
    return json.dumps(scalar_text(value), ensure_ascii=False)


def scalar_text(value: Any) -> str:
    """Text of a scalar that JSON has no type for (binary, temporal, durations)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, dt.timedelta):
        seconds = value / dt.timedelta(seconds=1)
        digits = f"{abs(seconds):.9f}".rstrip("0").rstrip(".")
        return f"{'-' if seconds < 0 else ''}PT{digits}S"
    if isinstance(value, dt.datetime):
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if hasattr(value, "isoformat"):  # dates, times, and pandas Timestamps for nanosecond values
        return str(value.isoformat())
    return str(value)


def python_json(array: pa.Array) -> pa.Array:
    """JSON text of each value (null stays null)."""
    return pa.array([None if v is None else json_text(v) for v in array.to_pylist()], pa.string())


def python_display(array: pa.Array) -> pa.Array:
    """Like `python_json`, but a value that is a JSON string is given without quotes."""
    out: list[str | None] = []
    for v in array.to_pylist():
        if v is None or isinstance(v, (dict, list)):
            out.append(None if v is None else json_text(v))
        else:
            out.append(scalar_text(v))
    return pa.array(out, pa.string())


# ------------------------------------------------------------------ small batches, value by value

# Below this many rows, encoders print numbers and strings value by value instead of planning a
# DataFusion projection (which costs about a millisecond); the rules below match arrow-rs.
SMALL_ROWS = 256


def float_text(value: float) -> str | None:
    """A double as arrow-rs prints it: Python's shortest repr, but `1e16` rather than `1e+16` and
    positional digits down to 1e-5 (`0.000015`). None for NaN and ±inf (no JSON form)."""
    if not math.isfinite(value):
        return None
    text = repr(value)
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    power = int(exponent)
    if power == -5:
        sign = "-" if mantissa.startswith("-") else ""
        return f"{sign}0.0000{mantissa.lstrip('-').replace('.', '')}"
    return f"{mantissa}e{power}"


def _float_display(value: float) -> str:
    text = float_text(value)
    if text is not None:
        return text
    return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def number_formatter(t: pa.DataType, *, display: bool = False) -> Callable[[Any], str | None] | None:
    """Printer of one value of a number type as arrow-rs casts it to text, where Python can match it
    exactly: booleans, integers, doubles, decimals with a scale ≥ 0 (not float32/16)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_boolean(t):
        return lambda v: "true" if v else "false"
    if pa.types.is_integer(t):
        return str
    if t == pa.float64():
        return _float_display if display else float_text
    if pa.types.is_decimal(t) and t.scale >= 0:
        return lambda v: format(v, "f")
    return None


# ------------------------------------------------------------------ DataFusion over one batch


_CORES = os.cpu_count() or 1


class BatchSql:
    """Runs SQL over one record batch at a time with DataFusion's kernels.

    The batch is registered as table `b` with its columns renamed `c0`, `c1`, … so that any
    result column name (quotes, dots, duplicates) is safe. The batch is cut into `partitions`
    consecutive pieces that DataFusion works on in parallel; results come back per partition,
    so the row order is kept.
    """

    def __init__(self, batch_rows: int = 65_536, partitions: int | None = None) -> None:
        self._partitions = max(1, min(partitions or _CORES, 4))
        self._batch_rows = batch_rows
        self._session: SessionContext | None = None

    @property
    def _ctx(self) -> SessionContext:
        if self._session is None:  # created on first use: small results never need one
            config = (SessionConfig().with_target_partitions(self._partitions).with_batch_size(self._batch_rows)
                      # Partitions are concatenated in order; no repartitioning may shuffle rows.
                      .set("datafusion.optimizer.enable_round_robin_repartition", "false"))
            self._session = SessionContext(config)
        return self._session

    def run(self, sql: str, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        renamed = batch.rename_columns([f"c{i}" for i in range(batch.num_columns)])
        size = -(-batch.num_rows // self._partitions) or 1
        parts = [[renamed.slice(start, size)] for start in range(0, max(batch.num_rows, 1), size)]
        self._ctx.register_record_batches("b", parts)
        try:
            return [b for partition in self._ctx.sql(sql).collect_partitioned() for b in partition]
        finally:
            self._ctx.deregister_table("b")


def sql_string(text: str) -> str:
    """An SQL string literal (DataFusion keeps backslashes literally; quotes are doubled)."""
    return "'" + text.replace("'", "''") + "'"


def display_columns(batch: pa.RecordBatch, sql: BatchSql) -> list[pa.Array]:
    """Each column of a non-empty batch as display text (upstream's table and CSV forms); nulls
    stay null. Strings are as they are; numbers, dates, times and durations as arrow-rs casts
    them; nested and binary values as JSON text and hex."""
    columns = [plain(c) for c in batch.columns]
    texts: dict[int, pa.Array] = {}
    cast: list[int] = []
    for i, column in enumerate(columns):
        t = column.type
        fmt = number_formatter(t, display=True) if batch.num_rows <= SMALL_ROWS else None
        if fmt is not None:
            texts[i] = pa.array([None if v is None else fmt(v) for v in column.to_pylist()], pa.string())
        elif kind_of(t) in ("number", "temporal") or pa.types.is_duration(t):
            cast.append(i)
        elif pa.types.is_null(t):
            texts[i] = pa.nulls(len(column), pa.string())
        elif kind_of(t) == "text":
            texts[i] = as_string(column)
        else:
            texts[i] = python_display(column)
    if cast:
        # DataFusion has no text cast for half floats.
        inputs = [pc.cast(columns[i], pa.float32()) if columns[i].type == pa.float16() else columns[i] for i in cast]
        query = "SELECT " + ", ".join(f"arrow_cast(c{j}, 'Utf8')" for j in range(len(cast))) + " FROM b"
        result = pa.Table.from_batches(sql.run(query, pa.RecordBatch.from_arrays(inputs, names=[str(i) for i in cast])))
        texts.update({i: result.column(j).combine_chunks() for j, i in enumerate(cast)})
    return [texts[i] for i in range(len(columns))]

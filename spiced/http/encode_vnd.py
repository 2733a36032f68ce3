"""Arrow record batches → upstream's `application/vnd.spiceai.sql.v1+json` envelope:

    {"row_count": N, "schema": {"fields": [...], "metadata": {}}, "data": [<row objects>]}

`data` holds exactly what the plain JSON encoder (spiced/http/encode_json.py) writes for the
same batches; `schema` is the Arrow schema as arrow-rs serializes it with serde (each field
`{"name","data_type","nullable","dict_id","dict_is_ordered","metadata"}`, `data_type` a string
for simple types and an object for parameterised ones); a result without rows has `"schema": {}`.

The envelope is buffered: `row_count` comes first, so nothing can be sent before the last batch.
Upstream collects the whole result for this format too. The row text stays as the JSON
encoder's chunks (views of Arrow buffers, no copy) until `end` sends them all behind the head;
/v1/sql pulls every batch before it answers (see `COLLECTED` in spiced/http/encode.py), so a
query failing on a late batch still gets its 400 rather than a cut 200.
"""

from __future__ import annotations

import json
from typing import Any, Final

import pyarrow as pa

from .encode_json import JsonEncoder

MEDIA_TYPE: Final = "application/vnd.spiceai.sql.v1+json"

DataTypeJson = str | dict[str, Any]

# arrow-rs DataType unit variants, serialized by serde as their bare names
_SIMPLE: dict[pa.DataType, str] = {
    pa.null(): "Null", pa.bool_(): "Boolean",
    pa.int8(): "Int8", pa.int16(): "Int16", pa.int32(): "Int32", pa.int64(): "Int64",
    pa.uint8(): "UInt8", pa.uint16(): "UInt16", pa.uint32(): "UInt32", pa.uint64(): "UInt64",
    pa.float16(): "Float16", pa.float32(): "Float32", pa.float64(): "Float64",
    pa.date32(): "Date32", pa.date64(): "Date64",
    pa.binary(): "Binary", pa.large_binary(): "LargeBinary", pa.binary_view(): "BinaryView",
    pa.string(): "Utf8", pa.large_string(): "LargeUtf8", pa.string_view(): "Utf8View",
}
_UNITS = {"s": "Second", "ms": "Millisecond", "us": "Microsecond", "ns": "Nanosecond"}
_DECIMALS: dict[type, str] = {pa.Decimal32Type: "Decimal32", pa.Decimal64Type: "Decimal64",
                              pa.Decimal128Type: "Decimal128", pa.Decimal256Type: "Decimal256"}
_LISTS: dict[type, str] = {pa.ListType: "List", pa.LargeListType: "LargeList", pa.ListViewType: "ListView",
                           pa.LargeListViewType: "LargeListView"}
_UNIT_TYPES: dict[type, str] = {pa.Time32Type: "Time32", pa.Time64Type: "Time64", pa.DurationType: "Duration"}


def data_type_json(t: pa.DataType) -> DataTypeJson:
    """`t` as serde writes arrow-rs's `DataType` (an externally tagged enum)."""
    if isinstance(t, pa.BaseExtensionType):
        return data_type_json(t.storage_type)
    simple = _SIMPLE.get(t)
    if simple is not None:
        return simple
    if t == pa.month_day_nano_interval():  # the only interval type pyarrow has
        return {"Interval": "MonthDayNano"}
    if isinstance(t, pa.TimestampType):
        return {"Timestamp": [_UNITS[t.unit], t.tz]}
    kind = type(t)
    if kind in _UNIT_TYPES:
        return {_UNIT_TYPES[kind]: _UNITS[t.unit]}  # type: ignore[attr-defined]
    if kind in _DECIMALS:
        return {_DECIMALS[kind]: [t.precision, t.scale]}  # type: ignore[attr-defined]
    if kind in _LISTS:
        return {_LISTS[kind]: field_json(t.value_field)}  # type: ignore[attr-defined]
    if isinstance(t, pa.FixedSizeListType):
        return {"FixedSizeList": [field_json(t.value_field), t.list_size]}
    if isinstance(t, pa.FixedSizeBinaryType):
        return {"FixedSizeBinary": t.byte_width}
    if isinstance(t, pa.StructType):
        return {"Struct": [field_json(f) for f in t]}
    if isinstance(t, pa.MapType):
        entries = pa.field("entries", pa.struct([t.key_field, t.item_field]), nullable=False)
        return {"Map": [field_json(entries), t.keys_sorted]}
    if isinstance(t, pa.DictionaryType):
        return {"Dictionary": [data_type_json(t.index_type), data_type_json(t.value_type)]}
    if isinstance(t, pa.UnionType):
        return {"Union": [[[code, field_json(f)] for code, f in zip(t.type_codes, t, strict=True)],
                          t.mode.capitalize()]}
    if isinstance(t, pa.RunEndEncodedType):
        return {"RunEndEncoded": [field_json(pa.field("run_ends", t.run_end_type, nullable=False)),
                                  field_json(pa.field("values", t.value_type))]}
    return str(t)  # a type arrow-rs has no name for; not produced by DataFusion


def _metadata(raw: dict[bytes, bytes] | None) -> dict[str, str]:
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (raw or {}).items()}


def field_json(field: pa.Field) -> dict[str, Any]:
    """An arrow-rs `Field` as serde writes it; an extension type is its storage type plus the
    `ARROW:extension:*` metadata (arrow-rs keeps extensions in field metadata)."""
    metadata = _metadata(field.metadata)
    if isinstance(field.type, pa.BaseExtensionType):
        metadata["ARROW:extension:name"] = field.type.extension_name
        metadata["ARROW:extension:metadata"] = field.type.__arrow_ext_serialize__().decode(errors="replace")
    return {"name": field.name, "data_type": data_type_json(field.type), "nullable": field.nullable,
            "dict_id": 0, "dict_is_ordered": isinstance(field.type, pa.DictionaryType) and field.type.ordered,
            "metadata": metadata}


def schema_json(schema: pa.Schema) -> dict[str, Any]:
    return {"fields": [field_json(f) for f in schema], "metadata": _metadata(schema.metadata)}


class VndEncoder:
    """Collects the JSON encoder's row chunks and sends them inside the envelope at `end`."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._rows = JsonEncoder(schema)
        self._data: list[bytes | memoryview] = []
        self._count = 0

    def begin(self) -> list[bytes | memoryview]:
        self._data += self._rows.begin()
        return []

    def batch(self, batch: pa.RecordBatch) -> list[bytes | memoryview]:
        self._count += batch.num_rows
        self._data += self._rows.batch(batch)
        return []

    def end(self) -> list[bytes | memoryview]:
        schema = schema_json(self.schema) if self._count else {}
        head = (f'{{"row_count":{self._count},"schema":'
                f'{json.dumps(schema, ensure_ascii=False, separators=(",", ":"))},"data":')
        body = [head.encode(), *self._data, *self._rows.end(), b"}"]
        self._data = []
        return body

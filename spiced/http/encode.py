"""Arrow record batches → response bytes in the format the client asked for.

Every encoder has the same three steps (`begin`, `batch`, `end`) so `/v1/sql` streams any of
them batch by batch: JSON (spiced/http/encode_json.py), CSV, a bordered text table (collected:
it is for humans), an Arrow IPC stream, or upstream's `application/vnd.spiceai.sql.v1+json`
envelope (spiced/http/encode_vnd.py, buffered whole).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol

import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import ipc

from . import encode_vnd
from .encode_json import JsonEncoder
from .values import BatchSql, display_columns, value_bytes

MediaType = Literal["application/json", "text/csv", "text/plain", "application/vnd.apache.arrow.stream",
                    "application/vnd.spiceai.sql.v1+json"]
MEDIA_TYPES: tuple[MediaType, ...] = ("application/json", "text/csv", "text/plain",
                                      "application/vnd.apache.arrow.stream", encode_vnd.MEDIA_TYPE)
CONTENT_TYPES: dict[MediaType, str] = {
    "application/json": "application/json",
    "text/csv": "text/csv",
    "text/plain": "text/plain; charset=utf-8",
    "application/vnd.apache.arrow.stream": "application/vnd.apache.arrow.stream",
    encode_vnd.MEDIA_TYPE: encode_vnd.MEDIA_TYPE,
}
# Formats whose body can only go out after the last batch: /v1/sql pulls every batch before it
# answers, so a late failure is still a 400 (as upstream, which collects these results too).
COLLECTED: frozenset[MediaType] = frozenset({encode_vnd.MEDIA_TYPE})


def negotiate(accept: str | None) -> MediaType:
    """Accept negotiation, as upstream: rank by q; the first media type that is exactly one we serve
    wins; otherwise JSON.

    A media type with parameters other than q (`text/plain; charset=utf-8`) does not match.
    """
    ranked: list[tuple[float, int, str]] = []
    for index, item in enumerate((accept or "").split(",")):
        media, *params = (p.strip() for p in item.split(";"))
        q, other = 1.0, False
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
            else:
                other = True
        if q > 0 and not other:
            ranked.append((-q, index, media.lower()))
    for _, _, media in sorted(ranked):
        if media in MEDIA_TYPES:
            return media
    return "application/json"


Chunks = Sequence[bytes | memoryview]


class Encoder(Protocol):
    """Each step returns the body chunks it produced (possibly none), ready for the socket."""

    def begin(self) -> Chunks: ...
    def batch(self, batch: pa.RecordBatch) -> Chunks: ...
    def end(self) -> Chunks: ...


def encoder_for(media_type: MediaType, schema: pa.Schema) -> Encoder:
    if media_type == "text/csv":
        return CsvEncoder(schema)
    if media_type == "text/plain":
        return TableEncoder(schema)
    if media_type == "application/vnd.apache.arrow.stream":
        return ArrowStreamEncoder(schema)
    if media_type == encode_vnd.MEDIA_TYPE:
        return encode_vnd.VndEncoder(schema)
    return JsonEncoder(schema)


def encode_all(encoder: Encoder, batches: Iterable[pa.RecordBatch]) -> bytes:
    """The whole body at once (small results and tests)."""
    chunks = [*encoder.begin(), *(c for b in batches for c in encoder.batch(b)), *encoder.end()]
    return b"".join(chunks)


# ------------------------------------------------------------------ CSV


def csv_field(text: pa.Array) -> pa.Array:
    """Quote a field only when it needs it (delimiter, quote or line break), as arrow-csv does."""
    needs = pc.match_substring_regex(text, '[",\r\n]')
    if pc.any(needs).as_py():
        quoted = pc.binary_join_element_wise('"', pc.replace_substring(text, '"', '""'), '"', "")
        text = pc.if_else(needs, quoted, text)
    return text


def csv_lines(columns: list[pa.Array]) -> pa.Array:
    """One `a,b,c\\n` string per row; null is an empty field."""
    pieces: list[Any] = []
    for i, column in enumerate(columns):
        pieces += ([","] if i else []) + [csv_field(column)]
    return pc.binary_join_element_wise(*pieces, "\n", "", null_handling="replace", null_replacement="")


class CsvEncoder:
    """A header row (sent with the first batch) then one line per row; no batches, no body."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._sql = BatchSql()
        self._header = True

    def begin(self) -> Chunks:
        return []

    def end(self) -> Chunks:
        return []

    def batch(self, batch: pa.RecordBatch) -> Chunks:
        out: list[bytes | memoryview] = []
        if self._header and self.schema.names:
            out.append(value_bytes(csv_lines([pa.array([name]) for name in self.schema.names])).to_pybytes())
        self._header = False
        if batch.num_rows and batch.num_columns:
            out.append(memoryview(value_bytes(csv_lines(display_columns(batch, self._sql)))))
        return out


# ------------------------------------------------------------------ text table


def render_table(names: list[str], columns: list[list[str]]) -> str:
    """The `+---+` bordered table: header, separator, rows, bottom border; cells left-aligned."""
    if not names:
        return ""
    cells = [[name, *column] for name, column in zip(names, columns, strict=False)]
    widths = [max(len(c) for c in column) for column in cells]
    border = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [border]
    for r in range(len(cells[0])):
        lines.append("|" + "|".join(f" {column[r].ljust(w)} " for column, w in zip(cells, widths, strict=True)) + "|")
        if r == 0:
            lines.append(border)
    lines.append(border)
    return "\n".join(lines) + "\n"


class TableEncoder:
    """Collects the cell texts (tables are for humans) and renders them at the end."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._sql = BatchSql()
        self._columns: list[list[str]] = [[] for _ in schema.names]

    def begin(self) -> Chunks:
        return []

    def batch(self, batch: pa.RecordBatch) -> Chunks:
        if batch.num_rows:
            for cells, text in zip(self._columns, display_columns(batch, self._sql), strict=False):
                cells.extend("" if v is None else v for v in text.to_pylist())
        return []

    def end(self) -> Chunks:
        return [render_table(self.schema.names, self._columns).encode()]


# ------------------------------------------------------------------ Arrow IPC stream


class _Sink:
    """A file-like object that hands over what the IPC writer wrote since the last `take`."""

    closed = False

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        return len(chunk)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class ArrowStreamEncoder:
    """The Arrow IPC streaming format: schema message, one message per batch, end-of-stream marker."""

    def __init__(self, schema: pa.Schema) -> None:
        self._sink = _Sink()
        self._writer = ipc.new_stream(self._sink, schema)

    def begin(self) -> Chunks:
        return [self._sink.take()]

    def batch(self, batch: pa.RecordBatch) -> Chunks:
        self._writer.write_batch(batch)
        return [self._sink.take()]

    def end(self) -> Chunks:
        self._writer.close()
        return [self._sink.take()]

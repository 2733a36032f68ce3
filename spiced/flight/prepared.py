"""Flight SQL prepared statements with parameters, as upstream serves them, on a stateless server.

- `prepare`: the query is scanned once; JDBC `?` placeholders become `$1`, `$2`… (quotes, quoted
  identifiers, dollar-quoted strings and comments are respected) and more than one statement is refused.
- `parameter_schema`: one field per placeholder (`$1`…, `$name`), typed from the DataFusion plan
  where DataFusion inferred a type, Null where it did not.
- Handles carry everything, as upstream's postcard `{query, parameters}` does, so nothing is kept
  between calls: an unbound handle is the (rewritten) SQL text in UTF-8; `bind` (DoPut) returns a new
  handle, `HANDLE_MAGIC` + the SQL's length (4 bytes, big-endian) + the SQL + the Arrow IPC stream
  of the parameter batch (its schema and at most one row). `0xFF` never occurs in UTF-8, so the two
  forms cannot be confused.
- `Bound.query` is what runs: the bound row as the engine's parameters (upstream's
  `record_to_param_values`: each value keeps its column's Arrow type), and the SQL with those
  placeholders cast to their values' types (`cast_placeholders`, as upstream does since 2026).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from ..batches import plain_schema
from ..engine import Params

MULTIPLE_STATEMENTS = "Multiple statements found in query. Only one statement is supported."
HANDLE_MAGIC = b"\xffspiced.prepared.v1\x00"
_LENGTH = struct.Struct(">I")
_POSITIONAL = re.compile(r"\$?([0-9]+)")
_WORD_CHARS = re.compile(r"[\w$#@]*")
_DOLLAR_TAG = re.compile(r"\w*")
# Planning errors caused by placeholders whose type is still unknown (typed Null): the statement is
# still created, and the error, if the bound values do not cure it, comes from the execution.
_UNTYPED_PLACEHOLDER_ERRORS = re.compile(r"\bNull\b|placeholder|Cannot get result type|Invalid arithmetic operation"
                                         r"|type inference", re.IGNORECASE)


# What Arrow's Flight reader says when the parameter stream's schema messages are at fault → upstream's text.
# (A record batch before any schema is refused by Arrow itself, before DoPut runs: UNKNOWN
# `Expected IPC message of type schema but got record batch`.)
_STREAM_ERRORS = (
    ("never sent a data message", "parameter flight data must have a schema"),
    ("Expected IPC message of type schema", "parameter flight data must have a known schema"),
    ("is not RecordBatch", "parameter flight data must contain a single schema"),
)


class PreparedError(ValueError):
    """The client's mistake (a refused query, handle or parameter batch); the text is what it gets."""


# ---------------------------------------------------------------- the query


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str  # `?` rewritten to `$1`, `$2`…
    placeholders: tuple[str, ...]  # `$1`, `$name`, each once, in order of appearance


def prepare(query: str) -> Statement:
    """Rewrite JDBC placeholders and list the statement's placeholders; one statement only."""
    scan = _Scan(query)
    if scan.statements > 1:
        raise PreparedError(MULTIPLE_STATEMENTS)
    return Statement("".join(scan.out), tuple(dict.fromkeys(scan.placeholders)))


def defers(statement: Statement, planning_error: str) -> bool:
    """Whether a planning error of CreatePreparedStatement should wait for the bound values."""
    return bool(statement.placeholders) and _UNTYPED_PLACEHOLDER_ERRORS.search(planning_error) is not None


def cast_placeholders(sql: str, types: Mapping[str, pa.DataType]) -> str:
    """`sql` with each `$X` whose value has a type in `types` (keyed by X) written `CAST($X AS <type>)`,
    as upstream runs a bound statement: DataFusion plans before it binds, and a placeholder whose
    type it cannot infer (`sum($1)`) would not plan. Strings are left alone (a cast would stop
    DataFusion pushing the filter into the scan), and so is any type without an exact SQL name."""
    casts = {key: name for key, t in types.items() if (name := _sql_type(t)) is not None}
    return "".join(_Scan(sql, casts).out) if casts else sql


def _sql_type(t: pa.DataType) -> str | None:
    if pa.types.is_decimal128(t):
        return f"DECIMAL({t.precision}, {t.scale})"
    return _SQL_TYPES.get(t)


_SQL_TYPES: dict[pa.DataType, str] = {
    pa.int8(): "TINYINT", pa.int16(): "SMALLINT", pa.int32(): "INT", pa.int64(): "BIGINT",
    pa.uint8(): "TINYINT UNSIGNED", pa.uint16(): "SMALLINT UNSIGNED", pa.uint32(): "INT UNSIGNED",
    pa.uint64(): "BIGINT UNSIGNED", pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN",
    pa.date32(): "DATE",
}


class _Scan:
    """One pass over the SQL text, lexed as DataFusion's generic dialect does: `'…'` (`''` escapes;
    `E'…'` also backslash escapes), `"…"` and backquoted identifiers, `$$…$$` / `$tag$…$tag$`,
    `--` and nested `/* */` comments, and words (which may contain `$`, as in `a$1`).

    `out` is the text with `?` numbered as `$1`, `$2`…, and `$X` written `CAST($X AS casts[X])`."""

    def __init__(self, query: str, casts: Mapping[str, str] | None = None) -> None:
        self.query = query
        self.out: list[str] = []
        self.placeholders: list[str] = []
        self.statements = 0
        self._casts = casts or {}
        self._pending = False  # something other than blanks and comments since the last `;`
        self._next_jdbc = 1
        self._run()

    def _run(self) -> None:
        q, i = self.query, 0
        while i < len(q):
            c = q[i]
            if c == "-" and q.startswith("--", i):
                j = q.find("\n", i)
                i = self._copy(i, len(q) if j < 0 else j, significant=False)
            elif c == "/" and q.startswith("/*", i):
                i = self._copy(i, _block_comment_end(q, i), significant=False)
            elif c == "'":
                i = self._copy(i, _quoted_end(q, i, backslash=self._escape_string(i)))
            elif c in '"`':
                i = self._copy(i, _quoted_end(q, i, backslash=False))
            elif c == "$":
                i = self._dollar(i)
            elif c == "?":
                self._placeholder(str(self._next_jdbc))
                self._next_jdbc += 1
                i += 1
            elif c == ";":
                self._end_statement()
                self.out.append(c)
                i += 1
            elif c.isalpha() or c == "_":
                i = self._copy(i, _WORD_CHARS.match(q, i).end())  # type: ignore[union-attr]
            else:
                i = self._copy(i, i + 1, significant=not c.isspace())
        self._end_statement()

    def _copy(self, start: int, end: int, *, significant: bool = True) -> int:
        self.out.append(self.query[start:end])
        self._pending = self._pending or significant
        return end

    def _escape_string(self, quote: int) -> bool:
        """`E'…'`: the quote follows a lone `E` word."""
        q = self.query
        return (quote >= 1 and q[quote - 1] in "eE"
                and (quote < 2 or not (q[quote - 2].isalnum() or q[quote - 2] in "_$#@")))

    def _dollar(self, i: int) -> int:
        q = self.query
        tag_end = _DOLLAR_TAG.match(q, i + 1).end()  # type: ignore[union-attr]
        tag = q[i + 1:tag_end]
        if tag_end < len(q) and q[tag_end] == "$" and not tag[:1].isdigit():  # $$…$$ or $tag$…$tag$
            opener = q[i:tag_end + 1]
            close = q.find(opener, tag_end + 1)
            return self._copy(i, len(q) if close < 0 else close + len(opener))
        if not tag:
            return self._copy(i, i + 1)
        self._placeholder(tag)
        return tag_end

    def _placeholder(self, key: str) -> None:
        name = "$" + key
        self.placeholders.append(name)
        cast = self._casts.get(key)
        self.out.append(name if cast is None else f"CAST({name} AS {cast})")
        self._pending = True

    def _end_statement(self) -> None:
        if self._pending:
            self.statements += 1
        self._pending = False


def _quoted_end(q: str, start: int, *, backslash: bool) -> int:
    """The index after the quote that closes the one at `start` (a doubled quote is an escape)."""
    quote, i = q[start], start + 1
    while i < len(q):
        if backslash and q[i] == "\\":
            i += 2
        elif q[i] == quote:
            if q.startswith(quote, i + 1):
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return len(q)  # unterminated: DataFusion reports it


def _block_comment_end(q: str, start: int) -> int:
    depth, i = 0, start
    while i < len(q):
        if q.startswith("/*", i):
            depth += 1
            i += 2
        elif q.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(q)


# ---------------------------------------------------------------- the parameter schema


def parameter_schema(statement: Statement, plan: Any | None) -> pa.Schema | None:
    """The placeholders as fields (`$1`, `$2`… by number, then names alphabetically), typed from
    `plan` (a DataFusion LogicalPlan) where DataFusion inferred a type, else Null; None without any."""
    types = _placeholder_types(plan) if plan is not None else {}
    names = list(dict.fromkeys([*statement.placeholders, *types]))
    if not names:
        return None
    names.sort(key=_placeholder_order)
    return plain_schema(pa.schema([pa.field(n, types.get(n) or pa.null()) for n in names]))


def _placeholder_order(name: str) -> tuple[int, int, str]:
    index = _positional_index(name)
    return (0, index, "") if index is not None else (1, 0, name)


def _positional_index(name: str) -> int | None:
    match = _POSITIONAL.fullmatch(name)
    return int(match.group(1)) if match else None


def _placeholder_types(plan: Any) -> dict[str, pa.DataType | None]:
    """Placeholder id → the type DataFusion inferred for it, for the placeholders the Python bindings
    can reach (not those inside subqueries, window functions or aggregate FILTERs). Best effort."""
    walk = _PlanWalk()
    try:
        walk.plan(plan)
    except Exception:  # a plan shape these bindings cannot describe: what was found so far stands
        pass
    return walk.types


class _PlanWalk:
    """Walks a DataFusion plan through its Python bindings: each node's variant object is asked
    for everything it exposes without arguments (expressions, sort keys, subqueries…)."""

    _NOT_CHILDREN = frozenset({"input", "inputs", "schema", "to_variant"})
    _LEAVES = frozenset({"Literal", "Column", "ScalarVariable", "Wildcard"})  # no placeholder inside
    _MAX_CALLS = 20_000

    def __init__(self) -> None:
        self.types: dict[str, pa.DataType | None] = {}
        self._calls = 0

    def plan(self, plan: Any) -> None:
        self._members(plan.to_variant())
        for child in plan.inputs():
            self.plan(child)

    def _expr(self, expr: Any) -> None:
        kind = expr.variant_name()
        if kind in self._LEAVES:
            return
        if kind == "Placeholder":
            placeholder = expr.to_variant()
            field = placeholder.field()
            if self.types.get(placeholder.id()) is None:
                self.types[placeholder.id()] = field.type if field is not None else None
            return
        try:
            variant = expr.to_variant()
        except Exception:  # e.g. window functions have no Python variant
            for operand in expr.rex_call_operands():
                self._expr(operand)
            return
        self._members(variant)

    def _members(self, node: Any) -> None:
        for name in dir(node):
            if name.startswith("_") or name in self._NOT_CHILDREN:
                continue
            self._calls += 1
            if self._calls > self._MAX_CALLS:
                raise RecursionError("plan too large to walk")
            try:
                value = getattr(node, name)()
            except Exception:  # needs arguments, or does not apply to this node
                continue
            if type(value) is not type(node):  # a conversion (Literal.into_type), not a child: it would recurse
                self._value(value)

    def _value(self, value: Any) -> None:
        if isinstance(value, (list, tuple)):
            for item in value:
                self._value(item)
        elif hasattr(value, "variant_name") and hasattr(value, "rex_call_operands"):
            self._expr(value)
        elif hasattr(value, "inputs") and hasattr(value, "to_variant"):
            self.plan(value)
        elif type(value).__module__ == "datafusion.expr":  # Subquery, SortExpr, …
            self._members(value)


# ---------------------------------------------------------------- handles and bound values


@dataclass(frozen=True, slots=True)
class Bound:
    """A decoded handle: the statement's SQL and, once DoPut bound them, the parameter batch."""

    sql: str
    parameters: pa.Table | None = None

    @property
    def values(self) -> Params | None:
        return param_values(self.parameters) if self.parameters is not None else None

    def query(self) -> tuple[str, Params | None]:
        """The SQL to run, its placeholders cast to the bound values' types, and the values."""
        values = self.values
        if not values:
            return self.sql, values
        return cast_placeholders(self.sql, {key: value.type for key, value in values.items()}), values


def encode_handle(sql: str, parameters: pa.Table | None = None) -> bytes:
    text = sql.encode("utf-8")
    if parameters is None:
        return text
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, parameters.schema) as writer:
        writer.write_table(parameters)
    return HANDLE_MAGIC + _LENGTH.pack(len(text)) + text + sink.getvalue().to_pybytes()


def decode_handle(handle: bytes) -> Bound:
    if not handle.startswith(HANDLE_MAGIC):
        try:
            return Bound(handle.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise PreparedError(f"Invalid prepared statement handle: {e}") from None
    try:
        start = len(HANDLE_MAGIC) + _LENGTH.size
        (length,) = _LENGTH.unpack_from(handle, len(HANDLE_MAGIC))
        sql = handle[start:start + length].decode("utf-8")
        parameters = pa.ipc.open_stream(pa.py_buffer(handle[start + length:])).read_all()
        parameters.validate(full=True)  # handles come from clients
    except (struct.error, UnicodeDecodeError, pa.ArrowException) as e:
        raise PreparedError(f"Invalid prepared statement handle: {e}") from None
    return Bound(sql, parameters)


def bind(handle: bytes, reader: flight.MetadataRecordBatchReader) -> bytes:
    """DoPut: the new handle, carrying the statement of `handle` and the parameter batch read from `reader`."""
    statement = decode_handle(handle)
    return encode_handle(statement.sql, read_parameters(reader))


def read_parameters(reader: flight.MetadataRecordBatchReader) -> pa.Table:
    """The parameter batch of a DoPut: one schema, then at most one row in all its batches."""
    try:
        schema = reader.schema
    except (pa.ArrowException, OSError) as e:
        raise PreparedError(_stream_error(e)) from None
    batches: list[pa.RecordBatch] = []
    rows = 0
    for batch in _batches(reader):
        rows += batch.num_rows
        if rows > 1:  # refused before the rest is read, however much the client sends
            raise PreparedError("parameters should contain a single row")
        batches.append(batch)
    parameters = pa.Table.from_batches(batches, schema)
    try:
        parameters.validate(full=True)
    except pa.ArrowException as e:
        raise PreparedError(f"parameter flight data could not be read: {e}") from None
    return parameters


def _batches(reader: flight.MetadataRecordBatchReader) -> Iterator[pa.RecordBatch]:
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise PreparedError(_stream_error(e)) from None
        if chunk.data is not None:  # app_metadata-only messages carry no rows
            yield chunk.data


def _stream_error(e: Exception) -> str:
    """Upstream's text when the stream's schema messages are at fault, else the reader's own."""
    text = str(e).split(". Detail:")[0]
    for marker, message in _STREAM_ERRORS:
        if marker in text:
            return message
    return f"parameter flight data could not be read: {text}"


def param_values(parameters: pa.Table) -> Params | None:
    """The bound row as engine parameters (upstream's `record_to_param_values`).

    Columns all named `$N` or `N` are positional, bound to `$1`, `$2`… in the order of N (so `0`,
    `1` from ADBC's DB-API work too). Any other name makes the set named: `id` binds `$id` and `:id`,
    and positional columns among named ones bind `$N` by their own N. Values are pyarrow scalars,
    so each keeps its column's Arrow type. No row means no values."""
    if parameters.num_rows == 0:
        return None
    positional: list[tuple[int, pa.Scalar]] = []
    named: dict[str, pa.Scalar] = {}
    for name, column in zip(parameters.column_names, parameters.columns, strict=True):
        index = _positional_index(name)
        if index is None:
            named[name] = column[0]
        else:
            positional.append((index, column[0]))
    if not named:
        positional.sort(key=lambda entry: entry[0])
        return {str(i): value for i, (_, value) in enumerate(positional, start=1)}
    return {**{str(index): value for index, value in positional}, **named}

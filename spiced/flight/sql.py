"""Flight SQL: decoding `Any`-wrapped commands, and the metadata answers (catalogs, schemas, tables,
table types, primary keys, SqlInfo) with the standard Flight SQL result schemas.

Metadata comes from DataFusion's information_schema, so it always matches what SQL sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import pyarrow as pa
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from .. import __version__
from . import flight_sql_pb2 as pb

if TYPE_CHECKING:
    from ..engine import Engine

TYPE_URL_PREFIX = "type.googleapis.com/"
_PACKAGE = "arrow.flight.protocol.sql."

_COMMANDS: dict[str, type[Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (pb.CommandStatementQuery, pb.TicketStatementQuery, pb.CommandPreparedStatementQuery,
                pb.CommandGetSqlInfo, pb.CommandGetCatalogs, pb.CommandGetDbSchemas, pb.CommandGetTables,
                pb.CommandGetTableTypes, pb.CommandGetPrimaryKeys)
}

ACTION_CREATE_PREPARED_STATEMENT = "CreatePreparedStatement"
ACTION_CLOSE_PREPARED_STATEMENT = "ClosePreparedStatement"
ACTIONS = (
    (ACTION_CREATE_PREPARED_STATEMENT, "Creates a reusable prepared statement resource on the server.\n"
                                       "Request Message: ActionCreatePreparedStatementRequest\n"
                                       "Response Message: ActionCreatePreparedStatementResult"),
    (ACTION_CLOSE_PREPARED_STATEMENT, "Closes a reusable prepared statement resource on the server.\n"
                                      "Request Message: ActionClosePreparedStatementRequest\n"
                                      "Response Message: N/A"),
)


@dataclass(frozen=True, slots=True)
class RawSql:
    """A descriptor command or ticket that is plain SQL bytes (pyarrow, spicepy)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class UnknownCommand:
    """An `Any` whose type we do not serve (updates, Substrait, XDBC, keys, ...)."""

    type_url: str


@dataclass(frozen=True, slots=True)
class CorruptCommand:
    """An `Any` of a command type we serve whose payload does not decode: the client's error."""

    message: str


Command: TypeAlias = RawSql | UnknownCommand | CorruptCommand | Message


def pack(message: Message) -> bytes:
    wrapped = any_pb2.Any()
    wrapped.Pack(message)  # type URL `type.googleapis.com/arrow.flight.protocol.sql.<Message>`
    return wrapped.SerializeToString()


def parse_command(data: bytes) -> Command:
    """Decode a descriptor command or ticket: a Flight SQL `Any`, some other `Any`, or raw SQL.

    Only bytes that decode as an `Any` with a `type.googleapis.com/` URL count as protobuf; SQL text
    that happens to parse as protobuf stays SQL.
    """
    wrapped = any_pb2.Any()
    try:
        wrapped.ParseFromString(data)
    except DecodeError:
        return RawSql(data)
    if not wrapped.type_url.startswith(TYPE_URL_PREFIX):
        return RawSql(data)
    name = wrapped.type_url[len(TYPE_URL_PREFIX):]
    cls = _COMMANDS.get(name)
    if cls is None:
        return UnknownCommand(wrapped.type_url)
    message = cls()
    try:
        if not wrapped.Unpack(message):
            return UnknownCommand(wrapped.type_url)
    except DecodeError as e:
        return CorruptCommand(f"Invalid {name}: {e}")
    return message


def unpack_action(body: bytes, cls: type[Message]) -> Message:
    """An action body: the Flight SQL spec wraps it in `Any`; a bare message is accepted too."""
    message = cls()
    wrapped = any_pb2.Any()
    try:
        wrapped.ParseFromString(body)
        if wrapped.type_url.startswith(TYPE_URL_PREFIX) and wrapped.Unpack(message):
            return message
        message.ParseFromString(body)
    except DecodeError as e:
        raise ValueError(f"Unable to decode {cls.DESCRIPTOR.name}: {e}") from None
    return message


def command_label(message: Message) -> str:
    """`CommandGetDbSchemas` → `get_db_schemas`, the metrics label upstream uses."""
    name = message.DESCRIPTOR.name.removeprefix("Command")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# ---------------------------------------------------------------- result schemas

CATALOGS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8(), nullable=False)])
DB_SCHEMAS_SCHEMA = pa.schema([
    pa.field("catalog_name", pa.utf8()),
    pa.field("db_schema_name", pa.utf8(), nullable=False),
])
TABLES_SCHEMA = pa.schema([
    pa.field("catalog_name", pa.utf8()),
    pa.field("db_schema_name", pa.utf8()),
    pa.field("table_name", pa.utf8(), nullable=False),
    pa.field("table_type", pa.utf8(), nullable=False),
])
TABLES_WITH_SCHEMA_SCHEMA = TABLES_SCHEMA.append(pa.field("table_schema", pa.binary(), nullable=False))
TABLE_TYPES_SCHEMA = pa.schema([pa.field("table_type", pa.utf8(), nullable=False)])
PRIMARY_KEYS_SCHEMA = pa.schema([
    pa.field("catalog_name", pa.utf8()),
    pa.field("db_schema_name", pa.utf8()),
    pa.field("table_name", pa.utf8(), nullable=False),
    pa.field("column_name", pa.utf8(), nullable=False),
    pa.field("key_name", pa.utf8()),
    pa.field("key_sequence", pa.int32(), nullable=False),
])

# The dense-union member order is part of the protocol: clients index children by type code.
_SQL_INFO_MEMBERS = [
    pa.field("string_value", pa.utf8()),
    pa.field("bool_value", pa.bool_()),
    pa.field("bigint_value", pa.int64()),
    pa.field("int32_bitmask", pa.int32()),
    pa.field("string_list", pa.list_(pa.utf8())),
    pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(pa.int32()))),
]
SQL_INFO_SCHEMA = pa.schema([
    pa.field("info_name", pa.uint32(), nullable=False),
    pa.field("value", pa.dense_union(_SQL_INFO_MEMBERS), nullable=False),
])

TABLE_TYPES = ("BASE TABLE", "VIEW")


def result_schema(message: Message) -> pa.Schema:
    if isinstance(message, pb.CommandGetCatalogs):
        return CATALOGS_SCHEMA
    if isinstance(message, pb.CommandGetDbSchemas):
        return DB_SCHEMAS_SCHEMA
    if isinstance(message, pb.CommandGetTables):
        return TABLES_WITH_SCHEMA_SCHEMA if message.include_schema else TABLES_SCHEMA
    if isinstance(message, pb.CommandGetTableTypes):
        return TABLE_TYPES_SCHEMA
    if isinstance(message, pb.CommandGetPrimaryKeys):
        return PRIMARY_KEYS_SCHEMA
    if isinstance(message, pb.CommandGetSqlInfo):
        return SQL_INFO_SCHEMA
    raise TypeError(f"not a metadata command: {message.DESCRIPTOR.name}")


def is_metadata(message: Message) -> bool:
    return isinstance(message, (pb.CommandGetCatalogs, pb.CommandGetDbSchemas, pb.CommandGetTables,
                                pb.CommandGetTableTypes, pb.CommandGetPrimaryKeys, pb.CommandGetSqlInfo))


# ---------------------------------------------------------------- metadata answers


def like(pattern: str) -> re.Pattern[str]:
    """SQL LIKE (`%`, `_`, backslash escape) as an anchored, case-sensitive regex."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "%" else "." if c == "_" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _rows(engine: Engine, sql: str) -> list[dict[str, object]]:
    return engine.plan(sql).to_arrow_table().to_pylist()  # type: ignore[no-any-return]


def _quote(*parts: str) -> str:
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


def _schemas(engine: Engine) -> list[tuple[str, str]]:
    # `schemata` omits information_schema; tables list it, so take the union.
    pairs = {(str(r["catalog_name"]), str(r["schema_name"]))
             for r in _rows(engine, "SELECT catalog_name, schema_name FROM information_schema.schemata")}
    pairs |= {(str(r["table_catalog"]), str(r["table_schema"]))
              for r in _rows(engine, "SELECT DISTINCT table_catalog, table_schema FROM information_schema.tables")}
    return sorted(pairs)


def catalogs(engine: Engine) -> pa.Table:
    names = sorted({c for c, _ in _schemas(engine)})
    return pa.Table.from_pydict({"catalog_name": names}, schema=CATALOGS_SCHEMA)


def db_schemas(engine: Engine, cmd: pb.CommandGetDbSchemas) -> pa.Table:
    pattern = like(cmd.db_schema_filter_pattern) if cmd.HasField("db_schema_filter_pattern") else None
    rows = [(c, s) for c, s in _schemas(engine)
            if (not cmd.HasField("catalog") or c == cmd.catalog) and (pattern is None or pattern.fullmatch(s))]
    return pa.Table.from_pydict({"catalog_name": [c for c, _ in rows], "db_schema_name": [s for _, s in rows]},
                                schema=DB_SCHEMAS_SCHEMA)


def tables(engine: Engine, cmd: pb.CommandGetTables) -> pa.Table:
    schema_pattern = like(cmd.db_schema_filter_pattern) if cmd.HasField("db_schema_filter_pattern") else None
    table_pattern = like(cmd.table_name_filter_pattern) if cmd.HasField("table_name_filter_pattern") else None
    types = set(cmd.table_types)
    rows = sorted(
        (str(r["table_catalog"]), str(r["table_schema"]), str(r["table_name"]), str(r["table_type"]))
        for r in _rows(engine,
                       "SELECT table_catalog, table_schema, table_name, table_type FROM information_schema.tables"))
    rows = [r for r in rows
            if (not cmd.HasField("catalog") or r[0] == cmd.catalog)
            and (schema_pattern is None or schema_pattern.fullmatch(r[1]))
            and (table_pattern is None or table_pattern.fullmatch(r[2]))
            and (not types or r[3] in types)]
    columns: dict[str, list[object]] = {
        "catalog_name": [r[0] for r in rows], "db_schema_name": [r[1] for r in rows],
        "table_name": [r[2] for r in rows], "table_type": [r[3] for r in rows],
    }
    if not cmd.include_schema:
        return pa.Table.from_pydict(columns, schema=TABLES_SCHEMA)
    serialized = []
    kept = []
    for i, r in enumerate(rows):
        schema = engine.table_schema(_quote(*r[:3]))
        if schema is None:  # dropped between the listing and now
            continue
        kept.append(i)
        serialized.append(schema.serialize().to_pybytes())
    columns = {k: [v[i] for i in kept] for k, v in columns.items()}
    columns["table_schema"] = serialized
    return pa.Table.from_pydict(columns, schema=TABLES_WITH_SCHEMA_SCHEMA)


def table_types() -> pa.Table:
    return pa.Table.from_pydict({"table_type": list(TABLE_TYPES)}, schema=TABLE_TYPES_SCHEMA)


def primary_keys() -> pa.Table:
    return PRIMARY_KEYS_SCHEMA.empty_table()


# ---------------------------------------------------------------- SqlInfo


@dataclass(frozen=True, slots=True)
class Int32:
    """An `int32_bitmask` member (enums and bitmasks); plain ints are `bigint_value`."""

    value: int


SqlInfoValue = str | bool | int | Int32 | list[str] | dict[int, list[int]]

# Codes from the Flight SQL `SqlInfo` enum. Static: we are read-only, SQL-only, without transactions.
SQL_INFO: dict[int, SqlInfoValue] = {
    0: "Spice.ai",                 # FLIGHT_SQL_SERVER_NAME
    1: __version__,                # FLIGHT_SQL_SERVER_VERSION
    2: "1.3",                      # FLIGHT_SQL_SERVER_ARROW_VERSION (Arrow IPC format)
    3: True,                       # FLIGHT_SQL_SERVER_READ_ONLY
    4: True,                       # FLIGHT_SQL_SERVER_SQL
    5: False,                      # FLIGHT_SQL_SERVER_SUBSTRAIT
    8: Int32(0),                   # FLIGHT_SQL_SERVER_TRANSACTION: none
    9: False,                      # FLIGHT_SQL_SERVER_CANCEL
    10: False,                     # FLIGHT_SQL_SERVER_BULK_INGESTION
    100: Int32(0),                 # FLIGHT_SQL_SERVER_STATEMENT_TIMEOUT
    101: Int32(0),                 # FLIGHT_SQL_SERVER_TRANSACTION_TIMEOUT
    500: False,                    # SQL_DDL_CATALOG
    501: False,                    # SQL_DDL_SCHEMA
    502: False,                    # SQL_DDL_TABLE
    503: Int32(3),                 # SQL_IDENTIFIER_CASE: lowercase (unquoted identifiers fold)
    504: '"',                      # SQL_IDENTIFIER_QUOTE_CHAR
    505: Int32(1),                 # SQL_QUOTED_IDENTIFIER_CASE
    506: True,                     # SQL_ALL_TABLES_ARE_SELECTABLE
    507: Int32(0),                 # SQL_NULL_ORDERING: sorted high
    513: "\\",                     # SQL_SEARCH_STRING_ESCAPE
    514: "",                       # SQL_EXTRA_NAME_CHARACTERS
    515: True,                     # SQL_SUPPORTS_COLUMN_ALIASING
    516: True,                     # SQL_NULL_PLUS_NULL_IS_NULL
    520: True,                     # SQL_SUPPORTS_EXPRESSIONS_IN_ORDER_BY
    521: True,                     # SQL_SUPPORTS_ORDER_BY_UNRELATED
    523: True,                     # SQL_SUPPORTS_LIKE_ESCAPE_CLAUSE
    524: True,                     # SQL_SUPPORTS_NON_NULLABLE_COLUMNS
    529: "schema",                 # SQL_SCHEMA_TERM
    530: "procedure",              # SQL_PROCEDURE_TERM
    531: "catalog",                # SQL_CATALOG_TERM
    532: False,                    # SQL_CATALOG_AT_START
    536: False,                    # SQL_SELECT_FOR_UPDATE_SUPPORTED
    537: False,                    # SQL_STORED_PROCEDURES_SUPPORTED
    539: True,                     # SQL_CORRELATED_SUBQUERIES_SUPPORTED
    563: False,                    # SQL_TRANSACTIONS_SUPPORTED
    573: False,                    # SQL_SAVEPOINTS_SUPPORTED
    574: False,                    # SQL_NAMED_PARAMETERS_SUPPORTED
}


def _member(value: SqlInfoValue) -> int:
    if isinstance(value, str):
        return 0
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return 2
    if isinstance(value, Int32):
        return 3
    if isinstance(value, list):
        return 4
    return 5


def sql_info(requested: list[int] | None = None) -> pa.Table:
    """The SqlInfo answer: every known code, or the requested ones we know (unknown codes are skipped)."""
    codes = [c for c in (requested or sorted(SQL_INFO)) if c in SQL_INFO]
    members: list[list[object]] = [[] for _ in _SQL_INFO_MEMBERS]
    type_ids: list[int] = []
    offsets: list[int] = []
    for code in codes:
        value = SQL_INFO[code]
        member = _member(value)
        type_ids.append(member)
        offsets.append(len(members[member]))
        if isinstance(value, Int32):
            members[member].append(value.value)
        elif isinstance(value, dict):
            members[member].append(list(value.items()))
        else:
            members[member].append(value)
    children = [pa.array(values, type=f.type) for values, f in zip(members, _SQL_INFO_MEMBERS, strict=True)]
    union = pa.UnionArray.from_dense(pa.array(type_ids, pa.int8()), pa.array(offsets, pa.int32()), children,
                                     [f.name for f in _SQL_INFO_MEMBERS])
    return pa.Table.from_arrays([pa.array(codes, pa.uint32()), union], schema=SQL_INFO_SCHEMA)


def metadata_table(engine: Engine, message: Message) -> pa.Table:
    if isinstance(message, pb.CommandGetCatalogs):
        return catalogs(engine)
    if isinstance(message, pb.CommandGetDbSchemas):
        return db_schemas(engine, message)
    if isinstance(message, pb.CommandGetTables):
        return tables(engine, message)
    if isinstance(message, pb.CommandGetTableTypes):
        return table_types()
    if isinstance(message, pb.CommandGetPrimaryKeys):
        return primary_keys()
    if isinstance(message, pb.CommandGetSqlInfo):
        return sql_info(list(message.info))
    raise TypeError(f"not a metadata command: {message.DESCRIPTOR.name}")

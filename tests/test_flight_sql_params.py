"""Flight SQL prepared statements with parameters (spiced/flight/prepared.py and the DoPut of
service.py), against a real SpiceFlightServer on an ephemeral port: the ADBC Flight SQL driver (Go),
pyarrow's FlightClient for the wire details, and the official JavaScript SDK's parameterized `sql()`.

Refused parameter batches arrive as FlightServerError (UNKNOWN) with upstream's clean text: pyarrow
cannot send INVALID_ARGUMENT from DoPut without the Python traceback (see the service docstring).
Errors found when the bound statement runs are DoGet errors and keep INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import adbc_driver_flightsql.dbapi as dbapi
import pyarrow as pa
import pyarrow.flight as fl
import pytest

from spiced.flight import flight_sql_pb2 as pb
from spiced.flight import prepared, sql
from spiced.flight.service import SpiceFlightServer
from tests.flight_rig import clean, make_state, serving
from tests.jsclient import run_sdk

PORTLAND = (2, "Portland", 8.25)
SEATTLE = [(1, "Seattle", 12.5), (3, "Seattle", 30.0)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpiceFlightServer]:
    with serving(make_state(tmp_path_factory.mktemp("params"))) as s:
        yield s


@pytest.fixture
def conn(server: SpiceFlightServer) -> Iterator[dbapi.Connection]:
    with dbapi.connect(f"grpc://127.0.0.1:{server.port}", autocommit=True) as c:
        yield c


@pytest.fixture
def client(server: SpiceFlightServer) -> Iterator[fl.FlightClient]:
    with fl.connect(f"grpc://127.0.0.1:{server.port}") as c:
        yield c


# ------------------------------------------------------------------------- ADBC (Go driver)


def test_adbc_positional_parameter(conn: dbapi.Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM trips WHERE id = ?", (2,))
        assert cur.fetchall() == [PORTLAND]


def test_adbc_string_parameter(conn: dbapi.Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM trips WHERE city = ? ORDER BY id", ("Seattle",))
        assert cur.fetchall() == SEATTLE


def test_adbc_several_parameters(conn: dbapi.Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM trips WHERE city = ? AND fare > ? AND id <> ? ORDER BY id", ("Seattle", 10.0, 99))
        assert cur.fetchall() == [(1,), (3,)]


def test_adbc_reexecutes_the_statement_with_new_values(conn: dbapi.Connection) -> None:
    # Prepared once; each execute binds again over the handle the previous DoPut returned.
    query = "SELECT city FROM trips WHERE id = ?"
    with conn.cursor() as cur:
        for trip, city in [(1, "Seattle"), (2, "Portland"), (3, "Seattle"), (4, None)]:
            cur.execute(query, (trip,))
            assert cur.fetchall() == ([(city,)] if city else [])


def test_adbc_parameter_schema(conn: dbapi.Connection) -> None:
    with conn.cursor() as cur:
        cur.adbc_prepare("SELECT * FROM trips WHERE id = ? AND city = ? AND fare < $3")
        assert pa.schema(cur.adbc_statement.get_parameter_schema()) == pa.schema(
            [("$1", pa.int64()), ("$2", pa.string()), ("$3", pa.float64())])
        # Literals above the placeholder (count(*) is count(Int64(1))) do not hide it.
        cur.adbc_prepare("SELECT city, count(*) AS n FROM trips WHERE id >= ? GROUP BY city")
        assert pa.schema(cur.adbc_statement.get_parameter_schema()) == pa.schema([("$1", pa.int64())])
        cur.adbc_prepare("SELECT id + 1 AS next FROM trips WHERE id = $1 LIMIT 5")
        assert pa.schema(cur.adbc_statement.get_parameter_schema()) == pa.schema([("$1", pa.int64())])
        cur.adbc_prepare("SELECT $name AS n, ? AS untyped")  # no type to infer: Null
        assert pa.schema(cur.adbc_statement.get_parameter_schema()) == pa.schema(
            [("$1", pa.null()), ("$name", pa.null())])


def test_adbc_named_parameters_and_arrow_types(conn: dbapi.Connection) -> None:
    with conn.cursor() as cur:
        # Column names that are not numbers bind by name: `id` binds `$id` (and `:id`).
        cur.execute("SELECT city FROM trips WHERE id = $id", pa.record_batch({"id": [3]}))
        assert cur.fetchall() == [("Seattle",)]
        cur.execute("SELECT id FROM trips WHERE city = :city", pa.record_batch({"city": ["Portland"]}))
        assert cur.fetchall() == [(2,)]
        # The column's Arrow type is the value's type.
        cur.execute("SELECT $1 AS v", pa.record_batch({"$1": pa.array([5], pa.int16())}))
        assert cur.fetch_arrow_table().schema.field("v").type == pa.int16()


def test_adbc_multiple_statements_are_refused(conn: dbapi.Connection) -> None:
    with conn.cursor() as cur, pytest.raises(dbapi.Error, match=prepared.MULTIPLE_STATEMENTS) as info:
        cur.execute("SELECT 1; SELECT ?", (1,))
    clean(str(info.value))


# ------------------------------------------------------------------------- the wire, with pyarrow


def create(client: fl.FlightClient, query: str) -> pb.ActionCreatePreparedStatementResult:
    request = sql.pack(pb.ActionCreatePreparedStatementRequest(query=query))
    [result] = list(client.do_action(fl.Action("CreatePreparedStatement", request)))
    created = sql.unpack_action(result.body.to_pybytes(), pb.ActionCreatePreparedStatementResult)
    assert isinstance(created, pb.ActionCreatePreparedStatementResult)
    return created


def descriptor(handle: bytes) -> fl.FlightDescriptor:
    return fl.FlightDescriptor.for_command(sql.pack(pb.CommandPreparedStatementQuery(prepared_statement_handle=handle)))


def put(client: fl.FlightClient, handle: bytes, *batches: pa.RecordBatch, schema: pa.Schema | None = None) -> bytes:
    """DoPut the batches; the new handle of the DoPutPreparedStatementResult answer."""
    writer, metadata = client.do_put(descriptor(handle), schema or batches[0].schema)
    with writer:
        for batch in batches:
            writer.write_batch(batch)
        writer.done_writing()
        answer = metadata.read()
    assert answer is not None
    result = pb.CommandPreparedStatementQuery()  # DoPutPreparedStatementResult has the same wire form
    result.ParseFromString(answer.to_pybytes())
    return result.prepared_statement_handle


def run(client: fl.FlightClient, handle: bytes) -> pa.Table:
    info = client.get_flight_info(descriptor(handle))
    [endpoint] = info.endpoints
    return client.do_get(endpoint.ticket).read_all()


def test_create_bind_and_run(client: fl.FlightClient) -> None:
    created = create(client, "SELECT city, fare FROM trips WHERE id = ? -- a comment with ?")
    assert created.prepared_statement_handle == b"SELECT city, fare FROM trips WHERE id = $1 -- a comment with ?"
    assert pa.ipc.read_schema(pa.py_buffer(created.dataset_schema)) == pa.schema([("city", pa.string()),
                                                                                  ("fare", pa.float64())])
    assert pa.ipc.read_schema(pa.py_buffer(created.parameter_schema)) == pa.schema([("$1", pa.int64())])
    bound = put(client, created.prepared_statement_handle, pa.record_batch({"$1": [2]}))
    assert bound != created.prepared_statement_handle
    assert run(client, bound).to_pylist() == [{"city": "Portland", "fare": 8.25}]
    assert client.get_schema(descriptor(bound)).schema == pa.schema([("city", pa.string()), ("fare", pa.float64())])
    rebound = put(client, bound, pa.record_batch({"$1": [3]}))  # a bound handle binds again
    assert run(client, rebound).column("city").to_pylist() == ["Seattle"]
    close = sql.pack(pb.ActionClosePreparedStatementRequest(prepared_statement_handle=rebound))
    assert [r.body.to_pybytes() for r in client.do_action(fl.Action("ClosePreparedStatement", close))] == [b""]


def test_no_placeholders_no_parameter_schema(client: fl.FlightClient) -> None:
    created = create(client, "SELECT '?' AS q, \"id\" FROM trips /* ? /* nested ? */ */ WHERE $$?$$ <> 'a''?'")
    assert created.parameter_schema == b""
    assert created.prepared_statement_handle.count(b"?") == 5


def test_an_unbound_placeholder_fails_when_the_statement_runs(client: fl.FlightClient) -> None:
    created = create(client, "SELECT city FROM trips WHERE id = ?")
    with pytest.raises(pa.ArrowInvalid, match=r"^Placeholder '\$1' was not provided a value for execution") as info:
        run(client, created.prepared_statement_handle)
    clean(str(info.value))
    bound = put(client, created.prepared_statement_handle, pa.record_batch({"other": [1]}))
    with pytest.raises(pa.ArrowInvalid, match=r"^No value found for placeholder with name \$1") as info:
        run(client, bound)
    clean(str(info.value))


def test_a_statement_needing_its_values_to_plan_is_still_created(client: fl.FlightClient) -> None:
    created = create(client, "SELECT sum(?) AS s FROM trips")  # sum(Null) does not plan until $1 has a type
    assert pa.ipc.read_schema(pa.py_buffer(created.dataset_schema)) == pa.schema([])
    assert pa.ipc.read_schema(pa.py_buffer(created.parameter_schema)) == pa.schema([("$1", pa.null())])
    bound = put(client, created.prepared_statement_handle, pa.record_batch({"0": [2]}))
    assert run(client, bound).to_pylist() == [{"s": 6}]
    with pytest.raises(fl.FlightServerError, match="^table 'spice.public.nope' not found"):
        create(client, "SELECT * FROM nope WHERE id = ?")  # not a placeholder's fault: refused now


def test_two_rows_are_refused(client: fl.FlightClient) -> None:
    handle = create(client, "SELECT city FROM trips WHERE id = $1").prepared_statement_handle
    for batches in ([pa.record_batch({"$1": [1, 2]})], [pa.record_batch({"$1": [1]}), pa.record_batch({"$1": [2]})]):
        with pytest.raises(fl.FlightServerError, match="^parameters should contain a single row") as info:
            put(client, handle, *batches)
        clean(str(info.value))


def test_no_row_binds_no_values(client: fl.FlightClient) -> None:
    handle = create(client, "SELECT count(*) AS n FROM trips").prepared_statement_handle
    bound = put(client, handle, schema=pa.schema([("$1", pa.int64())]))
    assert run(client, bound).to_pylist() == [{"n": 3}]


def test_do_put_is_only_for_prepared_statements(client: fl.FlightClient) -> None:
    for command in (b"SELECT 1", sql.pack(pb.CommandStatementQuery(query="SELECT 1"))):
        writer, _ = client.do_put(fl.FlightDescriptor.for_command(command), pa.schema([("a", pa.int64())]))
        with pytest.raises(fl.FlightServerError, match="^Not yet implemented") as info:
            writer.close()
        clean(str(info.value))


def test_invalid_bound_handle(client: fl.FlightClient) -> None:
    handle = prepared.HANDLE_MAGIC + b"\x00\x00\x00\x08SELECT 1not an IPC stream"
    with pytest.raises(pa.ArrowInvalid, match="^Invalid prepared statement handle: ") as info:
        run(client, handle)
    clean(str(info.value))
    with pytest.raises(fl.FlightServerError, match="^Invalid prepared statement handle: ") as info:
        put(client, handle, pa.record_batch({"$1": [1]}))
    clean(str(info.value))


# ------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize(("query", "rewritten", "placeholders"), [
    ("SELECT * FROM t WHERE a = ? AND b = ?", "SELECT * FROM t WHERE a = $1 AND b = $2", ("$1", "$2")),
    ("SELECT 'test?', \"?\", `?` FROM t WHERE id = ?", "SELECT 'test?', \"?\", `?` FROM t WHERE id = $1", ("$1",)),
    ("SELECT 'it''s ?', E'\\'?' , ?", "SELECT 'it''s ?', E'\\'?' , $1", ("$1",)),
    ("SELECT $$ ? $$, $q$ ? $q$, ?", "SELECT $$ ? $$, $q$ ? $q$, $1", ("$1",)),
    ("SELECT ? /* ? /* ? */ ? */ -- ?\n, ?", "SELECT $1 /* ? /* ? */ ? */ -- ?\n, $2", ("$1", "$2")),
    ("SELECT a$1, $10, $2, $name, $10 FROM t", "SELECT a$1, $10, $2, $name, $10 FROM t", ("$10", "$2", "$name")),
    ("SELECT 1;  -- trailing\n", "SELECT 1;  -- trailing\n", ()),
])
def test_prepare_rewrites_jdbc_placeholders(query: str, rewritten: str, placeholders: tuple[str, ...]) -> None:
    statement = prepared.prepare(query)
    assert (statement.sql, statement.placeholders) == (rewritten, placeholders)


@pytest.mark.parametrize("query", ["SELECT 1; SELECT 2", "SELECT ?; /* c */ SELECT ?", "SELECT ';'; SELECT 2"])
def test_prepare_refuses_several_statements(query: str) -> None:
    with pytest.raises(prepared.PreparedError, match=f"^{prepared.MULTIPLE_STATEMENTS}$"):
        prepared.prepare(query)


def values(**columns: Any) -> dict[str, Any] | None:
    bound = prepared.param_values(pa.table({name: [value] for name, value in columns.items()}))
    return None if bound is None else {k: v.as_py() for k, v in bound.items()}


def test_param_values_naming() -> None:
    # Numbers (with or without `$`) are positional, in the order of the numbers.
    assert values(**{"$2": "b", "$1": "a", "$10": "c"}) == {"1": "a", "2": "b", "3": "c"}
    assert values(**{"0": "a", "1": "b"}) == {"1": "a", "2": "b"}  # ADBC's DB-API names
    # Any other name makes the set named; numbers among names bind their own `$N`.
    assert values(id=3, **{"$2": "x"}) == {"id": 3, "2": "x"}
    assert prepared.param_values(pa.table({"$1": pa.array([], pa.int64())})) is None
    typed = prepared.param_values(pa.table({"$1": pa.array([1], pa.int8())}))
    assert typed is not None and typed["1"].type == pa.int8()


def test_cast_placeholders_to_the_bound_types() -> None:
    types = {"1": pa.int32(), "2": pa.string(), "n": pa.decimal128(10, 2), "3": pa.null()}
    assert prepared.cast_placeholders("SELECT sum($1), $2, $n, $3, '$1', a$1 -- $1", types) == (
        "SELECT sum(CAST($1 AS INT)), $2, CAST($n AS DECIMAL(10, 2)), $3, '$1', a$1 -- $1")


# ------------------------------------------------------------------------- the JavaScript SDK


def run_sdk_params(server: SpiceFlightServer, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """`sql(query, {parameters})` over plaintext Flight only (the `sql` step of tests/js/sdk_client.mjs),
    each call on a new SpiceClient with setMaxRetries(0); the job stops at the first failure."""
    job = {"flightUrl": f"127.0.0.1:{server.port}", "maxRetries": 0, "steps": [{"call": "sql", **c} for c in calls]}
    out = run_sdk(job, timeout=60, check=False)
    assert out["ok"] == (out["exit_code"] == 0), out["stderr"]
    return out


def test_js_sdk_parameterized_sql_over_flight(server: SpiceFlightServer) -> None:
    out = run_sdk_params(server, [
        {"query": "SELECT * FROM trips WHERE id = $1", "parameters": [2]},
        {"query": "SELECT * FROM trips WHERE id = $id", "parameters": {"id": 2}},
        {"query": "SELECT id FROM trips WHERE city = $1 AND fare > $2 ORDER BY id", "parameters": ["Seattle", 20.5]},
        {"query": "SELECT $1 + 1 AS v", "parameters": [{"value": 41, "type": "Int32"}]},
    ])
    assert out["ok"], out
    rows = [r["rows"] for r in out["results"]]
    portland = {"id": 2, "city": "Portland", "fare": 8.25}
    assert rows == [[portland], [portland], [{"id": 3}], [{"v": 42}]]


def test_js_sdk_refused_parameters_keep_the_message(server: SpiceFlightServer) -> None:
    out = run_sdk_params(server, [{"query": "SELECT * FROM trips WHERE id = $id", "parameters": {"other": 2}}])
    assert not out["ok"]
    assert out["code"] == 3 and out["details"] == "No value found for placeholder with name $id", out

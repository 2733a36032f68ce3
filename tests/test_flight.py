"""spiced/flight/service.py (+ sql.py, stream.py, peers.py): a real SpiceFlightServer on an ephemeral
port over a real Engine, queried with pyarrow's FlightClient.

What the client sees for errors: DoGet errors keep their exact gRPC code (INVALID_ARGUMENT shows up
as ArrowInvalid, UNIMPLEMENTED as ArrowNotImplementedError); other refused unary calls arrive as
FlightServerError (UNKNOWN) with the same clean text (see the service docstring for why).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as fl
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf import any_pb2

from spiced.auth import ApiKeys
from spiced.config import load_config
from spiced.engine import Engine
from spiced.flight import flight_sql_pb2 as pb
from spiced.flight import sql, stream
from spiced.flight.front import FlightTlsFront
from spiced.flight.service import SpiceFlightServer
from spiced.identity import ClientIdentity
from spiced.metrics import Metrics
from spiced.state import RuntimeState
from tests.flight_rig import KEY, TRIPS, clean, make_state, mtls_backend, serving, value
from tests.pki import Pki
from tests.support import write_pod
from tests.tlsprobe import wait_for

MID_STREAM_FAILURE = b"SELECT 10 / (value - 1500000) AS x FROM generate_series(1, 2000000)"


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> RuntimeState:
    return make_state(tmp_path_factory.mktemp("pod"))


@pytest.fixture(scope="module")
def server(state: RuntimeState) -> Iterator[SpiceFlightServer]:
    with serving(state) as s:
        yield s


@pytest.fixture
def client(server: SpiceFlightServer) -> Iterator[fl.FlightClient]:
    with fl.connect(f"grpc://127.0.0.1:{server.port}") as c:
        yield c


def flight_sql_info(client: fl.FlightClient, message: Any, **kw: Any) -> pa.Table:
    info = client.get_flight_info(fl.FlightDescriptor.for_command(sql.pack(message)), **kw)
    assert len(info.endpoints) == 1
    return client.do_get(info.endpoints[0].ticket, **kw).read_all()


# ---------------------------------------------------------------- queries


def test_raw_sql_ticket_streams_rows(client: fl.FlightClient) -> None:
    table = client.do_get(fl.Ticket(b"SELECT * FROM trips ORDER BY id")).read_all()
    assert table.schema == TRIPS
    assert table.column("city").to_pylist() == ["Seattle", "Portland", "Seattle"]


def test_flight_info_for_raw_sql_plans_without_executing(client: fl.FlightClient) -> None:
    info = client.get_flight_info(fl.FlightDescriptor.for_command(b"SELECT id, fare FROM trips WHERE fare > 10"))
    assert info.schema == pa.schema([("id", pa.int64()), ("fare", pa.float64())])
    [endpoint] = info.endpoints
    assert endpoint.ticket.ticket == b"SELECT id, fare FROM trips WHERE fare > 10"
    assert endpoint.locations == []
    assert client.do_get(endpoint.ticket).read_all().column("id").to_pylist() == [1, 3]
    # Execution would fail mid-stream; planning alone succeeds.
    failing = client.get_flight_info(fl.FlightDescriptor.for_command(MID_STREAM_FAILURE))
    assert failing.schema.names == ["x"]


def test_statement_query_ticket_is_the_same_command(client: fl.FlightClient) -> None:
    command = pb.CommandStatementQuery(query="SELECT city FROM seattle_trips")
    info = client.get_flight_info(fl.FlightDescriptor.for_command(sql.pack(command)))
    [endpoint] = info.endpoints
    assert sql.parse_command(endpoint.ticket.ticket) == command
    assert endpoint.ticket.ticket == sql.pack(command)
    assert client.do_get(endpoint.ticket).read_all().column("city").to_pylist() == ["Seattle", "Seattle"]


def test_get_schema_for_sql_path_and_statement(client: fl.FlightClient) -> None:
    assert client.get_schema(fl.FlightDescriptor.for_command(b"SELECT city FROM trips")).schema == pa.schema(
        [("city", pa.string())])
    assert client.get_schema(fl.FlightDescriptor.for_path("trips")).schema == TRIPS
    assert client.get_schema(fl.FlightDescriptor.for_path("spice", "public", "trips")).schema == TRIPS
    statement = sql.pack(pb.CommandStatementQuery(query="SELECT fare FROM trips"))
    assert client.get_schema(fl.FlightDescriptor.for_command(statement)).schema == pa.schema([("fare", pa.float64())])


def test_get_schema_of_an_unknown_path_is_not_found(client: fl.FlightClient) -> None:
    # pyarrow 26 attaches a traceback to every GetSchema error; the code is exact (NOT_FOUND).
    with pytest.raises(pa.ArrowKeyError, match="^Table not found"):
        client.get_schema(fl.FlightDescriptor.for_path("nope"))


def test_large_result_streams_batch_by_batch(client: fl.FlightClient, state: RuntimeState) -> None:
    reader = client.do_get(fl.Ticket(b"SELECT value FROM generate_series(1, 2000000)"))
    first = reader.read_chunk().data
    assert 0 < first.num_rows < 2_000_000
    # The server is still producing: nothing was collected before the first batch left.
    assert value(state.metrics, "query_active_count", protocol="flight") == 1
    assert stream.live_streams() >= 1
    rows, batches, last = first.num_rows, 1, first.column(0)[-1].as_py()
    for chunk in reader:
        assert chunk.data.column(0)[0].as_py() == last + 1
        last = chunk.data.column(0)[-1].as_py()
        rows += chunk.data.num_rows
        batches += 1
    assert (rows, last) == (2_000_000, 2_000_000)
    assert batches > 20  # coalesced to ~64K rows, still many batches, never one collected result
    assert value(state.metrics, "query_active_count", protocol="flight") == 0


def test_concurrent_queries(server: SpiceFlightServer) -> None:
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            with fl.connect(f"grpc://127.0.0.1:{server.port}") as c:
                for _ in range(5):
                    sql_text = f"SELECT count(*) AS n FROM generate_series(1, {n})".encode()
                    assert c.do_get(fl.Ticket(sql_text)).read_all().column("n").to_pylist() == [n]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(10_000 * (i + 1),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_abandoned_stream_is_released_and_counted(server: SpiceFlightServer, state: RuntimeState) -> None:
    before = value(state.metrics, "query_failures", protocol="flight", err_code="Cancelled")
    with fl.connect(f"grpc://127.0.0.1:{server.port}") as c:
        reader = c.do_get(fl.Ticket(b"SELECT value FROM generate_series(1, 2000000)"))
        reader.read_chunk()
        reader.cancel()
    wait_for(lambda: stream.live_streams() == 0, timeout=10)
    assert value(state.metrics, "query_active_count", protocol="flight") == 0
    assert value(state.metrics, "query_failures", protocol="flight", err_code="Cancelled") == before + 1


# ---------------------------------------------------------------- errors


def test_bad_flight_sql_statement_is_invalid_argument_with_the_bare_message(client: fl.FlightClient) -> None:
    # GetFlightInfo leaves the client's mistake to DoGet, the one place pyarrow can send
    # INVALID_ARGUMENT without a traceback.
    command = sql.pack(pb.CommandStatementQuery(query="SELECT * FROM nope"))
    info = client.get_flight_info(fl.FlightDescriptor.for_command(command))
    assert info.schema == pa.schema([]) and info.endpoints[0].ticket.ticket == command
    with pytest.raises(pa.ArrowInvalid) as error:
        client.do_get(info.endpoints[0].ticket).read_all()
    assert str(error.value).startswith(
        "table 'spice.public.nope' not found. gRPC client debug context: INVALID_ARGUMENT")
    clean(str(error.value))
    parser = sql.pack(pb.CommandStatementQuery(query="SELEC 1"))
    with pytest.raises(pa.ArrowInvalid, match=r'^SQL error: ParserError\("Expected: an SQL statement') as error:
        client.do_get(fl.Ticket(parser)).read_all()
    clean(str(error.value))


def test_bad_raw_sql_fails_to_execute(client: fl.FlightClient) -> None:
    # Straight to DoGet: upstream's INTERNAL with the full text.
    with pytest.raises(fl.FlightInternalError) as error:
        client.do_get(fl.Ticket(b"SELECT * FROM nope")).read_all()
    assert str(error.value).startswith(
        "Failed to execute query: Error during planning: table 'spice.public.nope' not found")
    clean(str(error.value))
    # Through GetFlightInfo: the ticket handed out for SQL that does not plan wraps it, and its DoGet
    # reports the mistake as Flight SQL does (tests/test_query_outcomes.py has the rest).
    info = client.get_flight_info(fl.FlightDescriptor.for_command(b"SELECT * FROM nope"))
    wrapped = sql.pack(pb.TicketStatementQuery(statement_handle=b"SELECT * FROM nope"))
    assert info.schema == pa.schema([]) and info.endpoints[0].ticket.ticket == wrapped
    with pytest.raises(pa.ArrowInvalid, match="^table 'spice.public.nope' not found. gRPC client debug context: "
                                              "INVALID_ARGUMENT") as invalid:
        client.do_get(info.endpoints[0].ticket).read_all()
    clean(str(invalid.value))


@pytest.mark.parametrize("statement, refusal", [
    ("CREATE TABLE t2 AS SELECT 1", "DDL not supported: CreateMemoryTable"),
    ("INSERT INTO trips VALUES (4, 'Tacoma', 1.0)", "DML not supported: Insert Into"),
    ("SET datafusion.execution.batch_size = 1", "Statement not supported: SetVariable"),
])
def test_ddl_dml_and_set_are_refused(client: fl.FlightClient, statement: str, refusal: str) -> None:
    command = fl.Ticket(sql.pack(pb.CommandStatementQuery(query=statement)))
    with pytest.raises(pa.ArrowInvalid, match=f"^{refusal}") as error:
        client.do_get(command).read_all()
    clean(str(error.value))
    with pytest.raises(fl.FlightInternalError, match=f"^Failed to execute query: Error during planning: {refusal}"):
        client.do_get(fl.Ticket(statement.encode())).read_all()
    assert client.do_get(fl.Ticket(b"SELECT count(*) AS n FROM trips")).read_all().column("n").to_pylist() == [3]


def test_invalid_utf8_ticket_is_invalid_argument(client: fl.FlightClient) -> None:
    with pytest.raises(pa.ArrowInvalid, match="^Invalid ticket: 'utf-8' codec can't decode byte 0xff") as info:
        client.do_get(fl.Ticket(b"\xff\xfeSELECT 1")).read_all()
    assert not isinstance(info.value, fl.FlightError)
    clean(str(info.value))


def test_invalid_prepared_statement_handle(client: fl.FlightClient) -> None:
    ticket = sql.pack(pb.CommandPreparedStatementQuery(prepared_statement_handle=b"\xc3\x28"))
    assert client.get_flight_info(fl.FlightDescriptor.for_command(ticket)).endpoints[0].ticket.ticket == ticket
    with pytest.raises(pa.ArrowInvalid, match="^Invalid prepared statement handle: ") as info:
        client.do_get(fl.Ticket(ticket)).read_all()
    clean(str(info.value))


def test_error_mid_stream_is_invalid_argument(client: fl.FlightClient, state: RuntimeState) -> None:
    # An Arrow error: upstream's err_code for it is InternalError (only Execution, ObjectStore and
    # External errors are QueryExecutionError).
    before = value(state.metrics, "query_failures", protocol="flight", err_code="InternalError")
    reader = client.do_get(fl.Ticket(MID_STREAM_FAILURE))
    rows = 0
    with pytest.raises(pa.ArrowInvalid, match="^Arrow error: Divide by zero error") as info:
        for chunk in reader:
            rows += chunk.data.num_rows
    assert 0 < rows < 2_000_000
    clean(str(info.value))
    assert value(state.metrics, "query_failures", protocol="flight", err_code="InternalError") == before + 1


def test_unknown_flight_sql_command(client: fl.FlightClient) -> None:
    update = b"\n" + bytes([len(url := b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementUpdate")]) + url
    with pytest.raises(pa.ArrowNotImplementedError, match="^Not yet implemented") as info:
        client.do_get(fl.Ticket(update)).read_all()
    clean(str(info.value))
    with pytest.raises(fl.FlightServerError, match="^Not yet implemented") as info2:
        client.get_flight_info(fl.FlightDescriptor.for_command(update))
    clean(str(info2.value))


def test_unknown_action_and_list_flights(client: fl.FlightClient) -> None:
    with pytest.raises(fl.FlightServerError, match="^Unknown action type") as info:
        list(client.do_action(fl.Action("DropEverything", b"")))
    clean(str(info.value))
    with pytest.raises(fl.FlightServerError, match="^Not yet implemented") as info2:
        list(client.list_flights())
    clean(str(info2.value))


# ---------------------------------------------------------------- Flight SQL metadata and actions


def test_get_sql_info(client: fl.FlightClient) -> None:
    table = flight_sql_info(client, pb.CommandGetSqlInfo(info=[0, 3, 4, 5, 8, 504, 99999]))
    assert table.schema == sql.SQL_INFO_SCHEMA
    assert table.schema.field("value").type.type_codes == [0, 1, 2, 3, 4, 5]
    values = {row["info_name"]: row["value"] for row in table.to_pylist()}
    assert values == {0: "Spice.ai", 3: True, 4: True, 5: False, 8: 0, 504: '"'}
    union = table.column("value").chunk(0)
    assert union.type_codes.to_pylist() == [0, 1, 1, 1, 3, 0]  # string, bool x3, int32 bitmask, string
    everything = flight_sql_info(client, pb.CommandGetSqlInfo())
    assert everything.num_rows == len(sql.SQL_INFO)


def test_catalogs_schemas_and_table_types(client: fl.FlightClient) -> None:
    catalogs = flight_sql_info(client, pb.CommandGetCatalogs())
    assert catalogs.schema == sql.CATALOGS_SCHEMA and catalogs.to_pylist() == [{"catalog_name": "spice"}]
    schemas = flight_sql_info(client, pb.CommandGetDbSchemas())
    assert schemas.schema == sql.DB_SCHEMAS_SCHEMA
    assert ("spice", "public") in {(r["catalog_name"], r["db_schema_name"]) for r in schemas.to_pylist()}
    filtered = flight_sql_info(client, pb.CommandGetDbSchemas(catalog="spice", db_schema_filter_pattern="pub%"))
    assert filtered.to_pylist() == [{"catalog_name": "spice", "db_schema_name": "public"}]
    assert flight_sql_info(client, pb.CommandGetDbSchemas(catalog="other")).num_rows == 0
    types = flight_sql_info(client, pb.CommandGetTableTypes())
    assert types.schema == sql.TABLE_TYPES_SCHEMA
    assert types.column("table_type").to_pylist() == ["BASE TABLE", "VIEW"]


def test_get_tables_with_filters_and_schemas(client: fl.FlightClient) -> None:
    public = flight_sql_info(client, pb.CommandGetTables(db_schema_filter_pattern="public"))
    assert public.schema == sql.TABLES_SCHEMA
    assert [(r["table_name"], r["table_type"]) for r in public.to_pylist()] == [
        ("seattle_trips", "VIEW"), ("trips", "BASE TABLE")]
    views = flight_sql_info(client, pb.CommandGetTables(db_schema_filter_pattern="public", table_types=["VIEW"]))
    assert views.column("table_name").to_pylist() == ["seattle_trips"]
    one = flight_sql_info(client, pb.CommandGetTables(catalog="spice", table_name_filter_pattern="t_ip%",
                                                      include_schema=True))
    assert one.schema == sql.TABLES_WITH_SCHEMA_SCHEMA
    [row] = one.to_pylist()
    assert (row["catalog_name"], row["db_schema_name"], row["table_name"]) == ("spice", "public", "trips")
    assert pa.ipc.read_schema(pa.py_buffer(row["table_schema"])) == TRIPS
    # `_` is a single-character wildcard, `\_` a literal underscore.
    assert flight_sql_info(client, pb.CommandGetTables(table_name_filter_pattern="seattle\\_trips")).num_rows == 1
    assert flight_sql_info(client, pb.CommandGetTables(table_name_filter_pattern="seattle\\_trip")).num_rows == 0


def test_primary_keys_are_empty_with_the_standard_schema(client: fl.FlightClient) -> None:
    keys = flight_sql_info(client, pb.CommandGetPrimaryKeys(table="trips"))
    assert keys.num_rows == 0 and keys.schema == sql.PRIMARY_KEYS_SCHEMA


def test_prepared_statement_actions(client: fl.FlightClient) -> None:
    actions = {a.type for a in client.list_actions()}
    assert actions == {"CreatePreparedStatement", "ClosePreparedStatement"}
    request = sql.pack(pb.ActionCreatePreparedStatementRequest(query="SELECT city FROM trips WHERE id = 2"))
    [result] = list(client.do_action(fl.Action("CreatePreparedStatement", request)))
    created = sql.unpack_action(result.body.to_pybytes(), pb.ActionCreatePreparedStatementResult)
    assert isinstance(created, pb.ActionCreatePreparedStatementResult)
    assert created.prepared_statement_handle == b"SELECT city FROM trips WHERE id = 2"
    assert pa.ipc.read_schema(pa.py_buffer(created.dataset_schema)) == pa.schema([("city", pa.string())])
    query = pb.CommandPreparedStatementQuery(prepared_statement_handle=created.prepared_statement_handle)
    assert flight_sql_info(client, query).to_pylist() == [{"city": "Portland"}]
    close = sql.pack(pb.ActionClosePreparedStatementRequest(
        prepared_statement_handle=created.prepared_statement_handle))
    assert [r.body.to_pybytes() for r in client.do_action(fl.Action("ClosePreparedStatement", close))] == [b""]
    bad = sql.pack(pb.ActionCreatePreparedStatementRequest(query="SELECT * FROM nope"))
    with pytest.raises(fl.FlightServerError, match="^table 'spice.public.nope' not found") as info:
        list(client.do_action(fl.Action("CreatePreparedStatement", bad)))
    clean(str(info.value))


def test_raw_sql_that_looks_like_protobuf_stays_sql(client: fl.FlightClient) -> None:
    # A newline then `S` (83): exactly 85 bytes parse as an `Any` whose type URL is "ELECT 42 ...".
    text = b"\nSELECT 42 AS answer --".ljust(85, b"-")
    assert any_pb2.Any.FromString(text).type_url.startswith("ELECT 42")
    assert isinstance(sql.parse_command(text), sql.RawSql)
    assert client.do_get(fl.Ticket(text)).read_all().column("answer").to_pylist() == [42]


# ---------------------------------------------------------------- handshake and API keys


class _PayloadReader(fl.ClientAuthHandler):
    def __init__(self) -> None:
        super().__init__()
        self.payload = b""

    def authenticate(self, outgoing: fl.ClientAuthSender, incoming: fl.ClientAuthReader) -> None:
        self.payload = incoming.read()

    def get_token(self) -> bytes:
        return b""


def test_handshake_without_keys_returns_a_fresh_uuid_bearer(client: fl.FlightClient) -> None:
    name, header = client.authenticate_basic_token("anyone", "anything")
    assert name == b"authorization" and header.startswith(b"Bearer ")
    first = header.removeprefix(b"Bearer ").decode()
    assert str(uuid.UUID(first)) == first
    assert client.authenticate_basic_token("", "")[1] != header
    handler = _PayloadReader()
    client.authenticate(handler)
    assert str(uuid.UUID(handler.payload.decode())) == handler.payload.decode()
    assert client.do_get(fl.Ticket(b"SELECT 1 AS one")).read_all().num_rows == 1  # nothing is checked


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SpiceFlightServer, RuntimeState]]:
    state = make_state(tmp_path_factory.mktemp("keyed"), keys=("other-key", KEY))
    with serving(state) as s:
        yield s, state


def _bearer(token: str) -> fl.FlightCallOptions:
    return fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


def test_api_key_as_bearer_header(keyed: tuple[SpiceFlightServer, RuntimeState]) -> None:
    server, _ = keyed
    with fl.connect(f"grpc://127.0.0.1:{server.port}") as c:
        assert c.do_get(fl.Ticket(b"SELECT 1 AS one"), _bearer(KEY)).read_all().num_rows == 1
        assert c.get_flight_info(fl.FlightDescriptor.for_command(b"SELECT 1"), _bearer("other-key")).endpoints
        for options in (None, _bearer("wrong"), _bearer(KEY + "x"),
                        fl.FlightCallOptions(headers=[(b"authorization", KEY.encode())])):
            with pytest.raises(fl.FlightUnauthenticatedError) as info:
                c.do_get(fl.Ticket(b"SELECT 1"), options).read_all()
            clean(str(info.value))
            assert KEY not in str(info.value)
        # pyarrow's client reports these two as OSError carrying the Flight status text.
        with pytest.raises((fl.FlightUnauthenticatedError, OSError), match="^Unauthenticated"):
            c.list_actions()
        with pytest.raises((fl.FlightUnauthenticatedError, OSError), match="^Unauthenticated"):
            c.get_schema(fl.FlightDescriptor.for_path("trips"))


def test_api_key_via_basic_handshake(keyed: tuple[SpiceFlightServer, RuntimeState]) -> None:
    server, _ = keyed
    with fl.connect(f"grpc://127.0.0.1:{server.port}") as c:
        name, header = c.authenticate_basic_token("ignored-user", KEY)
        assert (name, header) == (b"authorization", f"Bearer {KEY}".encode())
        options = fl.FlightCallOptions(headers=[(name, header)])
        assert c.do_get(fl.Ticket(b"SELECT * FROM trips"), options).read_all().num_rows == 3
        for user, password in (("", "wrong"), ("", ""), (KEY, "")):
            with pytest.raises(fl.FlightUnauthenticatedError) as info:
                c.authenticate_basic_token(user, password)
            clean(str(info.value))


# ---------------------------------------------------------------- metrics and identity


def test_request_and_query_metrics(server: SpiceFlightServer, state: RuntimeState) -> None:
    m = state.metrics
    do_get = value(m, "flight_requests", method="do_get")
    flight_sql_info_calls = value(m, "flight_requests", method="get_flight_info", command="statement_query")
    flight_runs = value(m, "query_executions", protocol="flight")
    sql_runs = value(m, "query_executions", protocol="flightsql")
    rows = value(m, "query_returned_rows")
    planning_failures = value(m, "query_failures", protocol="flight", err_code="QueryPlanningError")
    with fl.connect(f"grpc://127.0.0.1:{server.port}") as c:
        c.do_get(fl.Ticket(b"SELECT * FROM trips")).read_all()
        flight_sql_info(c, pb.CommandStatementQuery(query="SELECT id FROM trips WHERE id > 1"))
        with pytest.raises(fl.FlightInternalError):
            c.do_get(fl.Ticket(b"SELECT * FROM nope")).read_all()
    assert value(m, "flight_requests", method="do_get") == do_get + 2
    assert value(m, "flight_requests", method="get_flight_info", command="statement_query") == flight_sql_info_calls + 1
    assert value(m, "query_executions", protocol="flight") == flight_runs + 2
    assert value(m, "query_executions", protocol="flightsql") == sql_runs + 1
    assert value(m, "query_returned_rows") == rows + 5
    assert value(m, "query_failures", protocol="flight", err_code="QueryPlanningError") == planning_failures + 1
    assert value(m, "query_active_count", protocol="flightsql") == 0
    assert value(m, "flight_request_duration_ms_count", method="do_get", command="statement_query") >= 1
    assert value(m, "query_duration_ms_count", protocol="flightsql") >= 1


def test_identity_of_the_peer_reaches_the_call_record(state: RuntimeState, caplog: pytest.LogCaptureFixture,
                                                      tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    identity = ClientIdentity.from_der(pki.client.certificate.public_bytes(Encoding.DER))
    peers: list[str] = []

    def lookup(peer: str) -> ClientIdentity | None:
        peers.append(peer)
        return identity

    caplog.set_level(logging.DEBUG, logger="runtime.flight")
    with serving(state, identities=lookup) as s, fl.connect(f"grpc://127.0.0.1:{s.port}") as c:
        c.do_get(fl.Ticket(b"SELECT 1 AS one")).read_all()
    assert peers and peers[0].startswith("ipv4:127.0.0.1:")
    lines = [r for r in caplog.records if r.getMessage() == "Flight call" and r.fields["method"] == "do_get"]  # type: ignore[attr-defined]
    assert lines and lines[-1].fields["client_subject"] == f'"{identity.subject}"'  # type: ignore[attr-defined]


def test_mtls_behind_the_front_counts_identified_and_anonymous_calls(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """grpc+unix location behind the real TLS front in `request` mode: identity flows to the handler."""
    caplog.set_level(logging.DEBUG, logger="runtime.flight")
    b = mtls_backend(tmp_path)
    pki, metrics, sock_path, listener = b.pki, b.metrics, b.sock_path, b.listener
    front: FlightTlsFront | None = None

    def lookup(peer: str) -> ClientIdentity | None:
        return front.identity_for(peer) if front is not None else None

    with serving(b.state, f"grpc+unix://{sock_path}", identities=lookup):
        front = FlightTlsFront(listener, sock_path, b.manager.listener_context("flight"))
        front.start()
        try:
            uri = f"grpc+tls://127.0.0.1:{listener.getsockname()[1]}"
            with fl.FlightClient(uri, tls_root_certs=pki.ca.cert_pem, cert_chain=pki.client.cert_pem,
                                 private_key=pki.client.key_pem) as identified:
                assert identified.do_get(fl.Ticket(b"SELECT * FROM trips")).read_all().num_rows == 3
            with fl.FlightClient(uri, tls_root_certs=pki.ca.cert_pem) as anonymous:
                assert anonymous.do_get(fl.Ticket(b"SELECT 1 AS one")).read_all().num_rows == 1
                anonymous.list_actions()
        finally:
            front.stop(1.0)
    assert value(metrics, "client_cert_requests") == 1
    assert value(metrics, "client_cert_absent_requests") == 2
    calls = [r.fields for r in caplog.records if r.getMessage() == "Flight call"]  # type: ignore[attr-defined]
    subject = pki.client.certificate.subject.rfc4514_string()
    assert [c.get("client_subject") for c in calls if c["method"] == "do_get"] == [f'"{subject}"', None]
    assert all(c["peer"].startswith("unix-abstract:") for c in calls)


def test_large_results_fit_a_4_mib_grpc_message_limit(tmp_path: Path) -> None:
    """Go and tonic clients keep gRPC's default 4 MiB receive limit: no batch we send may exceed it,
    whether it comes from the stored batches of an accelerated dataset or from DataFusion."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids = pa.array(range(300_000), pa.int64())
    text = pc.binary_join_element_wise(pa.scalar("x" * 40), pc.cast(ids, pa.string()), "")
    pq.write_table(pa.table({"id": ids, "text": text}), tmp_path / "wide.parquet")
    write_pod(tmp_path, "version: v1\nkind: Spicepod\nname: wide\ndatasets:\n  - from: file:wide.parquet\n"
                        "    name: wide\n    acceleration:\n      enabled: true\n")
    config = load_config([], workdir=tmp_path)
    metrics = Metrics()
    engine = Engine(config.spicepod, metrics)
    engine.datasets.register_all()
    asyncio.run(engine.datasets.load_all())
    limit = [("grpc.max_receive_message_length", 4 * 1024 * 1024)]
    with serving(RuntimeState(config, engine, metrics, ApiKeys(()))) as server, \
            fl.connect(f"grpc://127.0.0.1:{server.port}", generic_options=limit) as client:
        for query in (b"SELECT * FROM wide", b"SELECT text, id FROM wide WHERE id >= 0"):
            try:
                assert client.do_get(fl.Ticket(query)).read_all().num_rows == 300_000
            except (fl.FlightError, KeyboardInterrupt) as e:  # pyarrow reports the cancelled read as ^C
                pytest.fail(f"{query!r}: {type(e).__name__} {e}")

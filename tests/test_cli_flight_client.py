"""spice_cli.flight_client + repl output against real in-process servers.

- `SqlServer`: a pyarrow FlightServerBase that decodes CommandStatementQuery with the generated protobuf
  module (cross-checking the CLI's hand-built `Any`) and records the metadata each call carried.
- `raw_grpc_server`: an HTTP/2 server (h2) answering every call with a chosen gRPC status, so every one
  of the 16 codes reaches pyarrow's client exactly as a non-Arrow server would send it.
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import h2.config
import h2.connection
import h2.events
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from google.protobuf import any_pb2

from spice_cli import CliError, repl
from spice_cli.flight_client import FlightSettings, SqlClient, classify, grpc_location, statement_query
from spiced.flight import flight_sql_pb2

TABLES = {
    "SELECT 1;": pa.table({"Int64(1)": [1]}),
    "SELECT * FROM trips;": pa.table({"id": [1, 2, 3], "city": ["Seattle", "Portland", None]}),
    "SELECT many;": pa.table({"n": list(range(1234))}),
    "SELECT none;": pa.table({"n": pa.array([], pa.int64())}),
}
FAILURES: dict[str, Exception] = {
    "FAIL invalid;": pa.ArrowInvalid("table 'spice.public.foo' not found"),
    "FAIL internal;": flight.FlightInternalError("Failed to execute query: disk on fire"),
    "FAIL unauthenticated;": flight.FlightUnauthenticatedError("who are you"),
    "FAIL unimplemented;": NotImplementedError("Not yet implemented"),
}


class _Recorder(flight.ServerMiddleware):  # type: ignore[misc]
    def __init__(self, headers: dict[str, list[str]]) -> None:
        self.headers = headers

    def sending_headers(self) -> dict[str, str]:
        return {"results-cache-status": "HIT"} if "x-want-cache" in self.headers else {}


class _RecorderFactory(flight.ServerMiddlewareFactory):  # type: ignore[misc]
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, list[str]]]] = []

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> _Recorder:
        self.calls.append((str(info.method), headers))
        return _Recorder(headers)


class SqlServer(flight.FlightServerBase):  # type: ignore[misc]
    def __init__(self, api_key: str | None = None) -> None:
        self.recorder = _RecorderFactory()
        self.api_key = api_key
        super().__init__("grpc://127.0.0.1:0", middleware={"recorder": self.recorder})

    def _sql(self, context: flight.ServerCallContext, command: bytes) -> str:
        if self.api_key is not None:
            sent = context.get_middleware("recorder").headers.get("authorization", [])
            if sent != [f"Bearer {self.api_key}"]:
                raise flight.FlightUnauthenticatedError("invalid API key")
        wrapper = any_pb2.Any()
        wrapper.ParseFromString(command)
        query = flight_sql_pb2.CommandStatementQuery()
        if not wrapper.Unpack(query):
            raise pa.ArrowInvalid(f"not a CommandStatementQuery: {wrapper.type_url}")
        if query.query in FAILURES:
            raise FAILURES[query.query]
        if query.query not in TABLES:
            raise pa.ArrowInvalid(f"unknown statement {query.query!r}")
        return query.query

    def get_flight_info(self, context: flight.ServerCallContext,
                        descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        sql = self._sql(context, descriptor.command)
        endpoint = flight.FlightEndpoint(descriptor.command, [])
        return flight.FlightInfo(TABLES[sql].schema, descriptor, [endpoint], -1, -1)

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.RecordBatchStream:
        return flight.RecordBatchStream(TABLES[self._sql(context, ticket.ticket)])


@pytest.fixture(scope="module")
def server() -> Iterator[SqlServer]:
    s = SqlServer()
    yield s
    s.shutdown()


def _client(port: int, **kw: object) -> SqlClient:
    return SqlClient(FlightSettings(f"grpc://127.0.0.1:{port}", **kw))  # type: ignore[arg-type]


def _run(client: SqlClient, sql: str) -> str:
    out = io.StringIO()
    repl.Repl(client, out).submit(sql)
    return out.getvalue()


def test_any_is_byte_identical_to_protobuf() -> None:
    packed = any_pb2.Any()
    packed.Pack(flight_sql_pb2.CommandStatementQuery(query="SELECT 'é' AS x;" * 20))
    assert statement_query("SELECT 'é' AS x;" * 20) == packed.SerializeToString()


@pytest.mark.parametrize(("endpoint", "location"), [
    ("grpc://h:1", "grpc+tcp://h:1"), ("http://h:1/", "grpc+tcp://h:1"), ("https://h:1", "grpc+tls://h:1"),
    ("grpc+tls://h:1", "grpc+tls://h:1"), ("HTTPS://h:1", "grpc+tls://h:1"),
])
def test_endpoint_schemes(endpoint: str, location: str) -> None:
    assert grpc_location(endpoint) == location


@pytest.mark.parametrize("endpoint", ["localhost:50051", "ftp://h:1", "grpc://"])
def test_bad_endpoint(endpoint: str) -> None:
    with pytest.raises(CliError, match="Invalid endpoint"):
        grpc_location(endpoint)


def test_table_then_time_line(server: SqlServer) -> None:
    out = _run(_client(server.port), "SELECT * FROM trips;")
    table, time_line = out.rstrip("\n").split("\n\n")
    assert table.splitlines() == ["+----+----------+", "| id | city     |", "+----+----------+",
                                  "| 1  | Seattle  |", "| 2  | Portland |", "| 3  |          |",
                                  "+----+----------+"]
    assert time_line.startswith("Time: ") and time_line.endswith(" seconds. 3 rows.")
    assert "e" not in time_line.split()[1]


def test_more_than_500_rows(server: SqlServer) -> None:
    out = _run(_client(server.port), "SELECT many;")
    assert out.rstrip("\n").endswith(" seconds. 500/1234 rows displayed.")
    assert "| 499 |" in out and "| 500 |" not in out


def test_no_results(server: SqlServer) -> None:
    out = _run(_client(server.port), "SELECT none;")
    assert out.startswith("No results.\n\nTime: ") and out.endswith(" seconds.\n")


def test_show_tables_is_rewritten_before_sending(server: SqlServer) -> None:
    out = _run(_client(server.port), "show tables")
    assert "unknown statement \"select table_catalog, table_schema, table_name, table_type from " \
           "information_schema.tables where table_schema != 'information_schema';\"" in out


def test_metadata_sent_with_every_call(server: SqlServer) -> None:
    client = _client(server.port, api_key="k1", cache_control="no-cache", user_agent="scripted/1.0",
                     headers=(("X-Team", "data"),))
    before = len(server.recorder.calls)
    assert "1 rows." in _run(client, "SELECT 1;")
    calls = server.recorder.calls[before:]
    assert [method for method, _ in calls] == ["FlightMethod.GET_FLIGHT_INFO", "FlightMethod.DO_GET"]
    for _, headers in calls:
        assert headers["authorization"] == ["Bearer k1"]
        assert headers["cache-control"] == ["no-cache"]
        assert headers["x-team"] == ["data"]
        # gRPC keeps its own tokens around ours: "grpc-c++/1.x scripted/1.0 grpc-c/…"
        assert "scripted/1.0" in headers["user-agent"][0].split()


def test_cache_hit_is_marked(server: SqlServer) -> None:
    out = _run(_client(server.port, headers=(("x-want-cache", "1"),)), "SELECT 1;")
    assert out.rstrip("\n").endswith(" seconds. 1 rows (cached).")
    assert "(cached)" not in _run(_client(server.port), "SELECT 1;")


@pytest.mark.parametrize(("sql", "line"), [
    ("FAIL invalid;", "Query Error: table 'spice.public.foo' not found"),
    ("FAIL internal;", "Internal Error: Unexpected internal error. Use '.error' for details."),
    ("FAIL unauthenticated;", "Authentication Failed: Invalid credentials. Verify credentials and try again."),
    ("FAIL unimplemented;",
     "Unsupported Operation: Feature not implemented. Check documentation for alternatives."),
])
def test_arrow_server_errors(server: SqlServer, sql: str, line: str) -> None:
    out = io.StringIO()
    r = repl.Repl(_client(server.port), out)
    r.submit(sql)
    assert out.getvalue() == line + "\n"
    r.submit(".error")
    details = out.getvalue().split("\n", 1)[1]
    assert details.split(":", 1)[0] in {"INVALID_ARGUMENT", "INTERNAL", "UNAUTHENTICATED", "UNIMPLEMENTED"}
    assert str(FAILURES[sql]) in details


def test_api_key_checked_by_server_but_not_by_probe() -> None:
    s = SqlServer(api_key="k1")
    try:
        assert "Authentication Failed:" in _run(repl.connect(FlightSettings(f"grpc://127.0.0.1:{s.port}")),
                                                "SELECT 1;")
        assert "1 rows." in _run(_client(s.port, api_key="k1"), "SELECT 1;")
    finally:
        s.shutdown()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_connection_failure_line() -> None:
    port = _closed_port()
    with pytest.raises(CliError) as info:
        repl.connect(FlightSettings(f"grpc://127.0.0.1:{port}"))
    message = str(info.value)
    assert message.startswith(f"SQL REPL Error: Connection failed to spiced at 'grpc://127.0.0.1:{port}': ")
    assert "Connection refused" in message
    assert message.endswith(". Check if the Spice runtime is running, endpoint including port is correct, "
                            "and TLS config (if used) is valid.")
    assert "\n" not in message


# --- every gRPC code, as a non-Arrow server sends it ----------------------------------------------

GRPC_CODES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
              "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
              "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"]


@contextmanager
def raw_grpc_server() -> Iterator[int]:
    """Answers each call with trailers-only `grpc-status: <x-code header>`, `grpc-message: boom <code>`."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        with conn:
            conn.sendall(h2c.data_to_send())
            while data := conn.recv(65535):
                for event in h2c.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        code = dict((k.decode(), v.decode()) for k, v in event.headers)["x-code"]
                        h2c.send_headers(event.stream_id, [
                            (":status", "200"), ("content-type", "application/grpc"),
                            ("grpc-status", code), ("grpc-message", f"boom {code}")], end_stream=True)
                    elif isinstance(event, h2.events.DataReceived):
                        h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                conn.sendall(h2c.data_to_send())

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        listener.close()


@pytest.fixture(scope="module")
def raw_port() -> Iterator[int]:
    with raw_grpc_server() as port:
        yield port


@pytest.mark.parametrize("code", range(1, 17))
def test_every_grpc_code_is_recognised(raw_port: int, code: int) -> None:
    client = _client(raw_port, headers=(("x-code", str(code)),))
    with pytest.raises(Exception) as info:
        client.query("SELECT 1;")
    failure = info.value.failure  # type: ignore[attr-defined]
    assert (failure.code, failure.message) == (GRPC_CODES[code], f"boom {code}")


@pytest.mark.parametrize(("code", "label"), [
    (3, "Query Error: boom 3"), (5, "Query Error: boom 5"), (6, "Query Error: boom 6"), (14, "Query Error: boom 14"),
    (13, "Internal Error: "), (2, "Error: Unexpected error."), (15, "Error: Unexpected error."),
    (9, "Error: Unexpected error."), (16, "Authentication Failed: "), (7, "Permission Denied: "),
    (4, "Timeout: "), (1, "Operation Cancelled: "), (10, "Operation Aborted: "), (8, "Resource Exhausted: "),
    (12, "Unsupported Operation: "), (11, "Result Limit Exceeded: "),
])
def test_repl_label_per_code(raw_port: int, code: int, label: str) -> None:
    assert _run(_client(raw_port, headers=(("x-code", str(code)),)), "SELECT 1;").startswith(label)


def test_non_grpc_error_is_unexpected_flight_error() -> None:
    failure = classify(OSError("socket exploded"))
    assert (failure.code, failure.message) == (None, "socket exploded")

"""The Arrow Flight / Flight SQL service: every Flight RPC of the runtime, from ticket or descriptor
to an engine call and back to a streamed Arrow answer, with the error codes and metrics of upstream.

Authentication and the per-call record are in `peers`, Flight SQL decoding and metadata in `sql`,
running one query for DoGet (tracking, failure codes) in `results`, and the error-carrying batch
streams in `stream`. TLS is terminated in front of this server.

Error codes. pyarrow appends the handler's Python traceback to the status message of any exception
other than its Flight error classes (verified: raising pa.ArrowInvalid in get_flight_info reaches
the client as `<msg>. Detail: Python exception: Traceback ...`), and those classes cover only
UNKNOWN, INTERNAL, UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE, CANCELLED and DEADLINE_EXCEEDED,
each with the status detail appended (`<msg>. Detail: Failed` for FlightServerError's UNKNOWN,
`. Detail: Cancelled` for CANCELLED). A DoGet stream, though, can fail with INVALID_ARGUMENT or
UNIMPLEMENTED and a clean message (`stream.failing_reader`). So:
- SQL the client got wrong (planning errors, undecodable SQL or handle) is reported by DoGet:
  GetFlightInfo answers such a query with an empty schema and a ticket whose DoGet fails with
  INVALID_ARGUMENT and the bare DataFusion message. For a Flight SQL command that ticket is the
  command itself. For raw SQL it is a Flight SQL `TicketStatementQuery` whose statement handle is
  the SQL (the query still runs as protocol `flight`); SQL that plans keeps upstream's ticket, the
  SQL bytes. A raw SQL ticket sent straight to DoGet gets upstream's INTERNAL `Failed to execute
  query: <full error>`. Errors mid-stream are INVALID_ARGUMENT; see `results` for every case.
- Other refusals of unary calls that upstream sends as INVALID_ARGUMENT / UNIMPLEMENTED / NOT_FOUND
  (unknown command or action, ListFlights, bad SQL in CreatePreparedStatement, a parameter batch
  DoPut refuses) go out as UNKNOWN (`FlightServerError`) with the same message and pyarrow's
  `. Detail: Failed` (see `_Refusal`): the unary calls and DoPut have no path to a clean
  INVALID_ARGUMENT or UNIMPLEMENTED, and these paths are left so.
- Prepared statements (`prepared`) are stateless: the handle carries the SQL, and after DoPut the
  bound parameter row too; the values are bound when GetFlightInfo, GetSchema and DoGet plan.
- GetSchema is the exception: pyarrow 26 has no Flight-error path there at all, so it sends the
  exact code and pyarrow's traceback comes with it.
- INTERNAL, DEADLINE_EXCEEDED, CANCELLED and UNAUTHENTICATED are exact everywhere, but for a query
  that times out or is cancelled after its first batches were sent: the C stream cannot carry
  those codes, so that stream ends with UNKNOWN and the same clean text (`results`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import Message

from ..batches import plain_schema
from ..engine import Params
from ..errors import CLIENT_ERROR_KINDS, QueryError
from ..identity import ClientIdentity
from ..state import RuntimeState
from . import flight_sql_pb2 as pb
from . import prepared, sql
from . import stream as streams
from .peers import MIDDLEWARE_KEY, CallMiddlewareFactory, CallRecord, HandshakeAuth, IdentityLookup, no_identity
from .results import bare, stream_query

NOT_IMPLEMENTED = "Not yet implemented"
RefusalCode = Literal["invalid_argument", "unimplemented", "not_found"]


class _Refusal(flight.FlightServerError):
    """A unary call refused for the client's reason; `code` is what upstream sends.

    Raised as a Flight error it goes out as UNKNOWN with a clean message: pyarrow can send
    INVALID_ARGUMENT / UNIMPLEMENTED / NOT_FOUND from a unary handler only with a traceback attached.
    """

    def __init__(self, message: str, code: RefusalCode = "invalid_argument") -> None:
        super().__init__(message)
        self.message = message
        self.code: RefusalCode = code

    def with_exact_code(self) -> Exception:
        """The pyarrow exception that carries `code` (and, unavoidably, a traceback)."""
        return _EXACT[self.code](self.message)


_EXACT: dict[RefusalCode, type[Exception]] = {
    "invalid_argument": pa.ArrowInvalid, "unimplemented": pa.ArrowNotImplementedError, "not_found": pa.ArrowKeyError}


def _planning_error(e: QueryError) -> flight.FlightError:
    """A unary call's planning failure: the client's mistakes are refusals, the rest INTERNAL."""
    if e.kind in CLIENT_ERROR_KINDS:
        return _Refusal(bare(str(e)))
    return flight.FlightInternalError(str(e))


def _decode_sql(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Refusal(f"{what}: {e}") from None


def _utf8_or_none(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _decode_handle(handle: bytes) -> prepared.Bound:
    try:
        return prepared.decode_handle(handle)
    except prepared.PreparedError as e:
        raise _Refusal(str(e)) from None


class SpiceFlightServer(flight.FlightServerBase):
    """Flight and Flight SQL over the runtime's engine.

    `location` is `grpc://127.0.0.1:0` (plaintext; `port` is the bound port) or
    `grpc+unix:///path/flight.sock` (behind the TLS front). `identities(context.peer())` gives the
    verified client certificate of a connection, when the TLS front knows one. Serving starts here;
    the runtime calls `shutdown()` and `wait()`.
    """

    def __init__(self, location: str, state: RuntimeState, identities: IdentityLookup = no_identity) -> None:
        self.state = state
        self._identities = identities
        calls = CallMiddlewareFactory(state.api_keys, state.metrics, state.config.access_log)
        self._active = calls.active
        super().__init__(location, auth_handler=HandshakeAuth(), middleware={MIDDLEWARE_KEY: calls})

    @property
    def active_calls(self) -> int:
        """Calls started and not yet completed (a DoGet completes once its last batch is written)."""
        return self._active.count

    # ------------------------------------------------------------ per call

    def _begin(self, context: flight.ServerCallContext, command: str | None = None) -> ClientIdentity | None:
        """Stamp the command and the client identity onto this call's record; count TLS requests.
        Returns the verified client identity, if any."""
        record = CallRecord.of(context)
        identity = self._identities(context.peer())
        if self.state.tls is not None:
            counter = self.state.metrics.client_cert_requests if identity else self.state.metrics.anonymous_requests
            counter.add(1)
        if record is not None:
            record.command = command
            record.identity = identity
            record.peer = context.peer()
        return identity

    def _refuse_undecodable(self, context: flight.ServerCallContext, command: sql.Command) -> None:
        """Unary calls: a command type we do not serve, or one whose payload does not decode."""
        if isinstance(command, sql.UnknownCommand):
            self._begin(context)
            raise _Refusal(NOT_IMPLEMENTED, "unimplemented")
        if isinstance(command, sql.CorruptCommand):
            self._begin(context)
            raise _Refusal(command.message, "invalid_argument")

    # ------------------------------------------------------------ queries

    def _plan_schema(self, sql_text: str, params: Params | None = None) -> pa.Schema:
        try:
            return self.state.engine.schema(sql_text, params)
        except QueryError as e:
            raise _planning_error(e) from None

    def _query_info(self, descriptor: flight.FlightDescriptor, sql_text: str | None, ticket: bytes,
                    params: Params | None = None, refused_ticket: bytes | None = None) -> flight.FlightInfo:
        """Plan only. The client's own mistakes (including SQL that is not UTF-8, None here) are left
        for DoGet to report, at `refused_ticket` when given (module docstring)."""
        schema = pa.schema([])
        if sql_text is not None:
            try:
                schema = self._plan_schema(sql_text, params)
            except _Refusal:
                ticket = refused_ticket or ticket
        return flight.FlightInfo(schema, descriptor, [flight.FlightEndpoint(ticket, [])], -1, -1)

    # ------------------------------------------------------------ RPCs

    def get_flight_info(self, context: flight.ServerCallContext,
                        descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            self._begin(context)
            raise _Refusal(NOT_IMPLEMENTED, "unimplemented")
        command = sql.parse_command(descriptor.command)
        if isinstance(command, sql.RawSql):
            self._begin(context)
            refused = sql.pack(pb.TicketStatementQuery(statement_handle=command.data))
            return self._query_info(descriptor, _utf8_or_none(command.data), command.data, refused_ticket=refused)
        self._refuse_undecodable(context, command)
        self._begin(context, sql.command_label(command))
        ticket = sql.pack(command)  # stateless: the ticket is the command itself
        if isinstance(command, pb.CommandStatementQuery):
            return self._query_info(descriptor, command.query, ticket)
        if isinstance(command, pb.CommandPreparedStatementQuery):
            try:
                bound = prepared.decode_handle(command.prepared_statement_handle)
            except prepared.PreparedError:
                return self._query_info(descriptor, None, ticket)
            text, values = bound.query()
            return self._query_info(descriptor, text, ticket, values)
        if sql.is_metadata(command):
            return flight.FlightInfo(sql.result_schema(command), descriptor, [flight.FlightEndpoint(ticket, [])],
                                     -1, -1)
        raise _Refusal(NOT_IMPLEMENTED, "unimplemented")

    def get_schema(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        try:
            return self._get_schema(context, descriptor)
        except _Refusal as e:
            # pyarrow 26's GetSchema callback has no Flight-error path (every exception gets a
            # traceback), so at least send the exact code.
            raise e.with_exact_code() from None

    def _get_schema(self, context: flight.ServerCallContext,
                    descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        if descriptor.descriptor_type == flight.DescriptorType.PATH:
            self._begin(context)
            name = ".".join(p.decode("utf-8", "replace") if isinstance(p, bytes) else p for p in descriptor.path)
            schema = self.state.engine.table_schema(name)
            if schema is None:
                raise _Refusal("Table not found", "not_found")
            return flight.SchemaResult(schema)
        command = sql.parse_command(descriptor.command)
        if isinstance(command, sql.RawSql):
            self._begin(context)
            return flight.SchemaResult(self._plan_schema(_decode_sql(command.data, "Invalid command")))
        self._refuse_undecodable(context, command)
        self._begin(context, sql.command_label(command))
        if isinstance(command, pb.CommandStatementQuery):
            return flight.SchemaResult(self._plan_schema(command.query))
        if isinstance(command, pb.CommandPreparedStatementQuery):
            bound = _decode_handle(command.prepared_statement_handle)
            return flight.SchemaResult(self._plan_schema(*bound.query()))
        if sql.is_metadata(command):
            return flight.SchemaResult(sql.result_schema(command))
        raise _Refusal(NOT_IMPLEMENTED, "unimplemented")

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        command = sql.parse_command(ticket.ticket)
        if isinstance(command, (sql.RawSql, pb.TicketStatementQuery)):
            # Raw SQL, or the ticket raw-SQL GetFlightInfo gives SQL that does not plan (module docstring).
            identity = self._begin(context)
            raw = isinstance(command, sql.RawSql)
            data = command.data if isinstance(command, sql.RawSql) else command.statement_handle
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                return flight.RecordBatchStream(streams.failing_reader("invalid_argument", f"Invalid ticket: {e}"))
            return stream_query(self.state, text, "flight", identity, raw=raw, context=context)
        if isinstance(command, sql.UnknownCommand):
            self._begin(context)
            return flight.RecordBatchStream(streams.failing_reader("unimplemented", NOT_IMPLEMENTED))
        if isinstance(command, sql.CorruptCommand):
            self._begin(context)
            return flight.RecordBatchStream(streams.failing_reader("invalid_argument", command.message))
        identity = self._begin(context, sql.command_label(command))
        if isinstance(command, pb.CommandStatementQuery):
            return stream_query(self.state, command.query, "flightsql", identity, context=context)
        if isinstance(command, pb.CommandPreparedStatementQuery):
            try:
                bound = prepared.decode_handle(command.prepared_statement_handle)
            except prepared.PreparedError as e:
                return flight.RecordBatchStream(streams.failing_reader("invalid_argument", str(e)))
            text, values = bound.query()
            return stream_query(self.state, text, "flightsql", identity, values, context=context)
        if sql.is_metadata(command):
            try:
                return flight.RecordBatchStream(sql.metadata_table(self.state.engine, command))
            except QueryError as e:
                raise flight.FlightInternalError(str(e)) from None
        return flight.RecordBatchStream(streams.failing_reader("unimplemented", NOT_IMPLEMENTED))

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> list[flight.Result]:
        kind = action.type
        body = action.body.to_pybytes() if action.body is not None else b""
        if kind == sql.ACTION_CREATE_PREPARED_STATEMENT:
            self._begin(context, "create_prepared_statement")
            request = self._action_body(body, pb.ActionCreatePreparedStatementRequest)
            assert isinstance(request, pb.ActionCreatePreparedStatementRequest)
            return [flight.Result(sql.pack(self._create_prepared_statement(request.query)))]
        if kind == sql.ACTION_CLOSE_PREPARED_STATEMENT:
            self._begin(context, "close_prepared_statement")
            self._action_body(body, pb.ActionClosePreparedStatementRequest)
            return [flight.Result(b"")]  # handles carry the statement and its values: nothing to free
        self._begin(context)
        raise _Refusal("Unknown action type")

    def _create_prepared_statement(self, query: str) -> pb.ActionCreatePreparedStatementResult:
        """Planned once: the result schema, and the placeholders with the types DataFusion inferred.
        A planning error that only unknown placeholder types cause is left for the execution."""
        try:
            statement = prepared.prepare(query)
        except prepared.PreparedError as e:
            raise _Refusal(str(e)) from None
        try:
            df = self.state.engine.plan(statement.sql)
        except QueryError as e:
            if not prepared.defers(statement, str(e)):
                raise _planning_error(e) from None
            df = None
        dataset = plain_schema(df.schema()) if df is not None else pa.schema([])
        parameters = prepared.parameter_schema(statement, df.logical_plan() if df is not None else None)
        return pb.ActionCreatePreparedStatementResult(
            prepared_statement_handle=prepared.encode_handle(statement.sql),
            dataset_schema=dataset.serialize().to_pybytes(),
            parameter_schema=parameters.serialize().to_pybytes() if parameters is not None else b"")

    @staticmethod
    def _action_body(body: bytes, cls: type[Message]) -> Message:
        try:
            return sql.unpack_action(body, cls)
        except ValueError as e:
            raise _Refusal(str(e)) from None

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        self._begin(context)
        return list(sql.ACTIONS)

    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> Iterator[flight.FlightInfo]:
        self._begin(context)
        raise _Refusal(NOT_IMPLEMENTED, "unimplemented")

    def do_put(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor,
               reader: flight.MetadataRecordBatchReader, writer: flight.FlightMetadataWriter) -> None:
        """Only parameter binding: the reply's app_metadata is a DoPutPreparedStatementResult whose new
        handle carries the bound row (the client must use it). Refusals go out as UNKNOWN with a clean
        message: pyarrow has no clean INVALID_ARGUMENT for DoPut (module docstring)."""
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            self._begin(context)
            raise _Refusal(NOT_IMPLEMENTED, "unimplemented")
        command = sql.parse_command(descriptor.command)
        self._refuse_undecodable(context, command)
        if not isinstance(command, pb.CommandPreparedStatementQuery):
            self._begin(context)
            raise _Refusal(NOT_IMPLEMENTED, "unimplemented")
        self._begin(context, sql.command_label(command))
        try:
            handle = prepared.bind(command.prepared_statement_handle, reader)
        except prepared.PreparedError as e:
            raise _Refusal(str(e)) from None
        # DoPutPreparedStatementResult{prepared_statement_handle = 1} has the wire form of this message.
        result = pb.CommandPreparedStatementQuery(prepared_statement_handle=handle)
        writer.write(pa.py_buffer(result.SerializeToString()))

    def do_exchange(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor,
                    reader: flight.MetadataRecordBatchReader, writer: flight.MetadataRecordBatchWriter) -> None:
        self._begin(context)
        raise _Refusal(NOT_IMPLEMENTED, "unimplemented")

"""Fuzzed Flight input against the real runtime over TLS (issue 6): garbage tickets, unknown and
corrupt Flight SQL `Any` commands, garbage actions and descriptors, and garbage on the wire. Every
answer is a gRPC error with a proper code and a clean message (no Python traceback, which would
leak server paths and source lines), and the server keeps serving.

Codes: upstream's gRPC status codes, with the deviation documented in
spiced/flight/service.py: unary refusals that upstream sends as INVALID_ARGUMENT/UNIMPLEMENTED go
out as UNKNOWN with the same clean message, because pyarrow cannot send those codes from a unary
handler without a traceback.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Callable, Iterator

import pyarrow as pa
import pytest
from google.protobuf import any_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyarrow import flight

from spiced.flight import flight_sql_pb2 as pb
from tests.support import Runtime, run_tls_target, write_pod

SQL_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."
KNOWN = sorted(name for name in pb.DESCRIPTOR.message_types_by_name if name.startswith(("Command", "Action")))
TRACEBACK = re.compile(r"Traceback|File \"|\.py\", line|Python exception")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# pyarrow's client exception for each gRPC status code (subclasses before their bases).
_CODES: list[tuple[type[BaseException], str]] = [
    (flight.FlightUnauthenticatedError, "UNAUTHENTICATED"), (flight.FlightUnavailableError, "UNAVAILABLE"),
    (flight.FlightInternalError, "INTERNAL"), (flight.FlightTimedOutError, "DEADLINE_EXCEEDED"),
    (flight.FlightCancelledError, "CANCELLED"), (flight.FlightServerError, "UNKNOWN"),
    (pa.ArrowNotImplementedError, "UNIMPLEMENTED"), (pa.ArrowKeyError, "NOT_FOUND"),
    (pa.ArrowInvalid, "INVALID_ARGUMENT"),
]


def code_of(e: BaseException) -> str:
    for cls, code in _CODES:
        if isinstance(e, cls):
            return code
    return f"unexpected {type(e).__name__}"


def outcome(call: Callable[[], object]) -> tuple[str, str]:
    """("OK", "") or (gRPC code, message) for one call."""
    try:
        call()
    except (flight.FlightError, pa.ArrowException) as e:
        return code_of(e), str(e)
    return "OK", ""


def assert_clean(code: str, message: str, allowed: set[str]) -> None:
    assert code in allowed, (code, message)
    assert not TRACEBACK.search(message), f"traceback sent to the client: {message[:600]}"


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    with run_tls_target(write_pod(tmp_path_factory.mktemp("fuzz-flight"))) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def client(rt: Runtime) -> Iterator[flight.FlightClient]:
    c = flight.FlightClient(rt.flight_uri.replace("127.0.0.1", "localhost"), tls_root_certs=rt.pki.ca.cert_pem)  # type: ignore[attr-defined]
    yield c
    c.close()


def alive(client: flight.FlightClient) -> None:
    assert client.do_get(flight.Ticket(b"SELECT 1")).read_all().to_pylist() == [{"Int64(1)": 1}]


def any_bytes(type_url: str, value: bytes) -> bytes:
    return any_pb2.Any(type_url=type_url, value=value).SerializeToString()


# ------------------------------------------------------------------------------- raw tickets


@FUZZ
@given(ticket=st.binary(max_size=300))
def test_garbage_tickets(client: flight.FlightClient, ticket: bytes) -> None:
    code, message = outcome(lambda: client.do_get(flight.Ticket(ticket)).read_all())
    try:
        ticket.decode("utf-8")
    except UnicodeDecodeError:
        assert code == "INVALID_ARGUMENT" and message.startswith("Invalid ticket: "), (code, message)
    else:
        # raw SQL text: upstream answers planning failures with INTERNAL "Failed to execute query"
        assert_clean(code, message, {"OK", "INTERNAL", "INVALID_ARGUMENT", "UNIMPLEMENTED"})


@FUZZ
@given(sql=st.text(max_size=200))
def test_random_sql_text(client: flight.FlightClient, sql: str) -> None:
    code, message = outcome(lambda: client.do_get(flight.Ticket(sql.encode())).read_all())
    assert_clean(code, message, {"OK", "INTERNAL", "INVALID_ARGUMENT"})
    code, message = outcome(lambda: client.get_flight_info(flight.FlightDescriptor.for_command(sql.encode())))
    assert_clean(code, message, {"OK", "INVALID_ARGUMENT", "UNKNOWN"})


# ------------------------------------------------------------------------- Flight SQL commands


@FUZZ
@given(name=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", min_size=1, max_size=40)
       .filter(lambda n: n not in KNOWN), value=st.binary(max_size=100))
def test_unknown_flight_sql_commands(client: flight.FlightClient, name: str, value: bytes) -> None:
    command = any_bytes(SQL_PREFIX + name, value)
    code, message = outcome(lambda: client.do_get(flight.Ticket(command)).read_all())
    assert_clean(code, message, {"UNIMPLEMENTED"})
    code, message = outcome(lambda: client.get_flight_info(flight.FlightDescriptor.for_command(command)))
    assert_clean(code, message, {"UNIMPLEMENTED", "UNKNOWN"})
    assert "Not yet implemented" in message


@FUZZ
@given(name=st.sampled_from(KNOWN), value=st.binary(min_size=1, max_size=100))
def test_flight_sql_commands_with_garbage_bodies(client: flight.FlightClient, name: str, value: bytes) -> None:
    # A known command type whose bytes may not decode: a client error, answered cleanly.
    command = any_bytes(SQL_PREFIX + name, value)
    code, message = outcome(lambda: client.do_get(flight.Ticket(command)).read_all())
    assert_clean(code, message, {"OK", "INVALID_ARGUMENT", "UNIMPLEMENTED", "INTERNAL"})
    code, message = outcome(lambda: client.get_flight_info(flight.FlightDescriptor.for_command(command)))
    assert_clean(code, message, {"OK", "INVALID_ARGUMENT", "UNIMPLEMENTED", "UNKNOWN"})


def test_a_corrupt_statement_query_is_invalid_argument(client: flight.FlightClient) -> None:
    # the single case the property above shrinks to, kept as a plain example
    command = any_bytes(SQL_PREFIX + "CommandStatementQuery", b"\xff\xff\xff")
    code, message = outcome(lambda: client.do_get(flight.Ticket(command)).read_all())
    assert_clean(code, message, {"INVALID_ARGUMENT"})


# ------------------------------------------------------------------------- actions, descriptors


@FUZZ
@given(kind=st.one_of(st.text(max_size=40), st.sampled_from(["CreatePreparedStatement", "ClosePreparedStatement"])),
       body=st.binary(max_size=100))
def test_garbage_actions(client: flight.FlightClient, kind: str, body: bytes) -> None:
    code, message = outcome(lambda: list(client.do_action(flight.Action(kind, body))))
    assert_clean(code, message, {"OK", "INVALID_ARGUMENT", "UNKNOWN", "UNIMPLEMENTED"})
    if kind not in ("CreatePreparedStatement", "ClosePreparedStatement"):
        assert (code, message.split(". Detail")[0]) in {("UNKNOWN", "Unknown action type"),
                                                         ("INVALID_ARGUMENT", "Unknown action type")}


@FUZZ
@given(path=st.lists(st.text(max_size=20), min_size=1, max_size=3))
def test_garbage_path_descriptors(client: flight.FlightClient, path: list[str]) -> None:
    code, message = outcome(lambda: client.get_flight_info(flight.FlightDescriptor.for_path(*path)))
    assert_clean(code, message, {"UNIMPLEMENTED", "UNKNOWN"})


@pytest.mark.xfail(strict=True, reason="pyarrow 26's GetSchema callback turns every handler exception, its own "
                   "Flight errors included, into a status carrying the Python traceback; no clean path exists")
def test_get_schema_errors_carry_no_traceback(client: flight.FlightClient) -> None:
    code, message = outcome(lambda: client.get_schema(flight.FlightDescriptor.for_path("no_such_table")))
    assert_clean(code, message, {"NOT_FOUND"})
    code, message = outcome(lambda: client.get_schema(flight.FlightDescriptor.for_command(b"SELEC nothing")))
    assert_clean(code, message, {"INVALID_ARGUMENT"})


def test_unimplemented_rpcs(client: flight.FlightClient) -> None:
    code, message = outcome(lambda: list(client.list_flights()))
    assert_clean(code, message, {"UNIMPLEMENTED", "UNKNOWN"})
    code, message = outcome(lambda: client.do_exchange(flight.FlightDescriptor.for_command(b"x"))[1].read_all())
    assert_clean(code, message, {"UNIMPLEMENTED", "UNKNOWN"})
    alive(client)


# ---------------------------------------------------------------------------------- on the wire


def _tls(rt: Runtime) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(rt.pki.ca.cert))  # type: ignore[attr-defined]
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", rt.flight_port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _drain(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (bounded by the socket timeout)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if len(data) > 1 << 20:
                break
    except (TimeoutError, ssl.SSLError, ConnectionError):
        pass
    return data


@pytest.mark.parametrize("seed", range(5))
def test_garbage_on_the_wire(rt: Runtime, client: flight.FlightClient, seed: int) -> None:
    junk = os.urandom(64 + 300 * seed)
    # 1. plaintext to the TLS port: never answered in plaintext (at most a TLS alert record)
    with socket.create_connection(("127.0.0.1", rt.flight_port), timeout=10) as raw:
        raw.sendall(junk)
        answer = _drain(raw)
    assert answer == b"" or answer[:1] == b"\x15", answer[:40]
    # 2. garbage instead of the HTTP/2 preface, after a good handshake
    with _tls(rt) as tls:
        tls.sendall(junk)
        _drain(tls)
    # 3. a good preface, then garbage frames
    with _tls(rt) as tls:
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + junk)
        _drain(tls)
    alive(client)

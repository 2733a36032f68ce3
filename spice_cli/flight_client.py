"""Flight SQL client for the REPL: endpoint and TLS settings, the connection probe, one query at a time.

Failures leave this module as `QueryFailed` / `ConnectionFailed` carrying a gRPC code name, so the REPL
never sees pyarrow's exception classes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# gRPC core logs handshake failures to stderr; the CLI reports them itself, in one line.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import pyarrow as pa  # noqa: E402
import pyarrow.flight as flight  # noqa: E402

from spice_cli import CliError, __version__  # noqa: E402

DEFAULT_ENDPOINT = "http://localhost:50051"
DEFAULT_TLS_ENDPOINT = "https://localhost:50051"
_SCHEMES = {"http": "grpc+tcp", "grpc": "grpc+tcp", "grpc+tcp": "grpc+tcp", "https": "grpc+tls", "grpc+tls": "grpc+tls"}
_STATEMENT_QUERY_URL = "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
PROBE_TIMEOUT = 10.0

CacheControl = Literal["cache", "no-cache"]


@dataclass(frozen=True, slots=True)
class FlightSettings:
    endpoint: str
    tls_root_certificate_file: Path | None = None
    client_certificate_file: Path | None = None
    client_key_file: Path | None = None
    api_key: str | None = None
    cache_control: CacheControl | None = None
    user_agent: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


def default_endpoint(tls_root_certificate_file: Path | None) -> str:
    return DEFAULT_TLS_ENDPOINT if tls_root_certificate_file else DEFAULT_ENDPOINT


def grpc_location(endpoint: str) -> str:
    """`http://h:p` / `grpc://h:p` -> `grpc+tcp://h:p`; `https://` / `grpc+tls://` -> `grpc+tls://h:p`."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme.lower() not in _SCHEMES or not rest.strip("/"):
        raise CliError(f"Invalid endpoint '{endpoint}': expected grpc://, grpc+tls://, http:// or https:// "
                       "followed by host:port")
    return f"{_SCHEMES[scheme.lower()]}://{rest.rstrip('/')}"


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed call: `code` is the gRPC code name (None when not a gRPC status), `message` the server's text."""

    code: str | None
    message: str
    details: str


class QueryFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class ConnectionFailed(Exception):
    """The endpoint could not be reached (refused, unresolvable, TLS handshake rejected)."""


# pyarrow's text for statuses that arrive without Arrow's own status trailer (any non-Arrow server).
_PHRASES = {
    "invalid argument": "INVALID_ARGUMENT", "timeout": "DEADLINE_EXCEEDED", "not found": "NOT_FOUND",
    "already exists": "ALREADY_EXISTS", "unauthorized": "PERMISSION_DENIED",
    "resource exhausted": "RESOURCE_EXHAUSTED", "precondition failed": "FAILED_PRECONDITION",
    "aborted": "ABORTED", "out-of-range": "OUT_OF_RANGE", "unimplemented": "UNIMPLEMENTED",
    "internal": "INTERNAL", "unavailable": "UNAVAILABLE", "data loss": "DATA_LOSS",
    "unauthenticated": "UNAUTHENTICATED",
}
_PREFIX = re.compile(r"^(?:Unknown: )?(?:(?:Flight|gRPC) returned (?P<phrase>[a-z -]+?) error, with message: "
                     r"|Flight (?P<cancelled>cancelled) call, with message: "
                     r"|Flight RPC (?P<failed>failed) with message: )")
# Arrow's status trailer (pyarrow servers) arrives as the exception class plus a `. Detail: ...` suffix.
_TYPES: tuple[tuple[type[BaseException], str], ...] = (
    (flight.FlightCancelledError, "CANCELLED"), (flight.FlightTimedOutError, "DEADLINE_EXCEEDED"),
    (flight.FlightUnauthenticatedError, "UNAUTHENTICATED"), (flight.FlightUnauthorizedError, "PERMISSION_DENIED"),
    (flight.FlightUnavailableError, "UNAVAILABLE"), (flight.FlightInternalError, "INTERNAL"),
    (flight.FlightServerError, "UNKNOWN"), (pa.ArrowInvalid, "INVALID_ARGUMENT"), (pa.ArrowKeyError, "NOT_FOUND"),
    (pa.ArrowNotImplementedError, "UNIMPLEMENTED"), (pa.ArrowCancelled, "CANCELLED"),
)
_SUFFIX = re.compile(r"(?:\. Detail: (?:Python exception: .*|[A-Za-z]+)|\. gRPC client debug context: .*"
                     r"|\. Client context: .*)\Z", re.S)


def classify(exc: BaseException) -> Failure:
    """Map a pyarrow Flight exception to its gRPC code and the server's bare message."""
    details = str(exc)
    text = _SUFFIX.sub("", details)
    m = _PREFIX.match(text)
    if m:
        code = ("CANCELLED" if m.group("cancelled") else "UNKNOWN" if m.group("failed")
                else _PHRASES.get(m.group("phrase") or ""))
        return Failure(code, text[m.end():], details)
    for kind, name in _TYPES:
        if isinstance(exc, kind):
            return Failure(name, text, details)
    return Failure(None, text, details)


def statement_query(sql: str) -> bytes:
    """A Flight SQL `CommandStatementQuery{query}` packed in a protobuf `Any`, encoded by hand (two fields)."""
    inner = _field(1, sql.encode())
    return _field(1, _STATEMENT_QUERY_URL.encode()) + _field(2, inner)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        reason = e.strerror or str(e)
        raise CliError(f"Failed to read {what} from '{path}': {reason}. "
                       "Verify the file path and permissions.") from None


class _CacheStatus(flight.ClientMiddleware):  # type: ignore[misc]
    def __init__(self, sink: dict[str, bool]) -> None:
        self._sink = sink

    def received_headers(self, headers: dict[str, list[str]]) -> None:
        values = [v.lower() for v in headers.get("results-cache-status", [])]
        values += ["hit" for v in headers.get("x-cache", []) if v.lower().startswith("hit")]
        if values:
            self._sink["cached"] = values[0] == "hit"


class _CacheStatusFactory(flight.ClientMiddlewareFactory):  # type: ignore[misc]
    def __init__(self) -> None:
        self.last: dict[str, bool] = {}

    def start_call(self, info: object) -> _CacheStatus:
        return _CacheStatus(self.last)


@dataclass(frozen=True, slots=True)
class Result:
    table: pa.Table
    cached: bool


class SqlClient:
    """One Flight connection; `query` runs CommandStatementQuery via GetFlightInfo then DoGet."""

    def __init__(self, settings: FlightSettings) -> None:
        self.endpoint = settings.endpoint
        location = grpc_location(settings.endpoint)
        kwargs: dict[str, object] = {}
        if location.startswith("grpc+tls") and settings.tls_root_certificate_file:
            kwargs["tls_root_certs"] = _read(settings.tls_root_certificate_file, "TLS root certificate")
        if settings.client_certificate_file and settings.client_key_file:
            kwargs["cert_chain"] = _read(settings.client_certificate_file, "client TLS certificate")
            kwargs["private_key"] = _read(settings.client_key_file, "client TLS key")
        agent = settings.user_agent or f"spice-cli/{__version__}"
        self._cache = _CacheStatusFactory()
        self._client = flight.FlightClient(location, middleware=[self._cache],
                                           generic_options=[("grpc.primary_user_agent", agent)], **kwargs)
        headers = [(k.lower().encode(), v.encode()) for k, v in settings.headers]
        if settings.api_key:
            headers.append((b"authorization", f"Bearer {settings.api_key}".encode()))
        if settings.cache_control == "no-cache":
            headers.append((b"cache-control", b"no-cache"))
        self._headers = headers

    def _options(self, timeout: float | None = None) -> flight.FlightCallOptions:
        return flight.FlightCallOptions(headers=self._headers, timeout=timeout)

    def probe(self) -> None:
        """Reach the server once; only an unreachable endpoint counts (auth is judged per query, as upstream)."""
        try:
            list(self._client.list_flights(options=self._options(PROBE_TIMEOUT)))
        except (flight.FlightUnavailableError, flight.FlightTimedOutError) as e:
            raise ConnectionFailed(classify(e).message) from None
        except (flight.FlightError, pa.ArrowException, NotImplementedError, KeyError, ValueError):
            pass  # an answer of any kind proves the channel works

    def query(self, sql: str) -> Result:
        self._cache.last.clear()
        try:
            info = self._client.get_flight_info(flight.FlightDescriptor.for_command(statement_query(sql)),
                                                self._options())
            if not info.endpoints:
                return Result(info.schema.empty_table(), False)
            reader = self._client.do_get(info.endpoints[-1].ticket, self._options())
            table = reader.read_all()
        except (pa.ArrowException, NotImplementedError, KeyError, ValueError, OSError) as e:
            raise QueryFailed(classify(e)) from None
        return Result(table, self._cache.last.get("cached", False))

    def close(self) -> None:
        self._client.close()

"""Who is calling the Flight service: API-key / bearer authentication, the Handshake token, and a
per-call record (method, command, verified client certificate) that ends in the request metrics.

pyarrow gives a middleware only the method and the headers, and the handler only `context.peer()`;
so the middleware authenticates and times the call, and the handler stamps the command and the
client identity onto the same record (`CallRecord.of(context)`).

Access log: one "Flight call" line per call on `runtime::flight` when it completes (a DoGet once
its last batch is written), at INFO when the access log is on (`--access-log`, or
`runtime.access_log: true`), else at DEBUG:

    INFO runtime::flight: Flight call method=do_get command=statement_query peer=ipv4:127.0.0.1:50312
         duration_ms=12.4 status=OK client_subject="CN=client" client_fingerprint=1f2e…

`status` is the gRPC code the call ended with; a call without a verified client certificate has
`client=anonymous`. Calls refused for their API key are logged too (`status=UNAUTHENTICATED`,
`client=unknown`: the handler, which looks the certificate up, never ran).
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.flight as flight

from ..auth import ApiKeys, bearer_token
from ..identity import ClientIdentity
from ..metrics import Metrics

log = logging.getLogger("runtime.flight")

MIDDLEWARE_KEY = "spiced"
IdentityLookup = Callable[[str], "ClientIdentity | None"]

_METHODS = {
    flight.FlightMethod.HANDSHAKE: "handshake",
    flight.FlightMethod.LIST_FLIGHTS: "list_flights",
    flight.FlightMethod.GET_FLIGHT_INFO: "get_flight_info",
    flight.FlightMethod.GET_SCHEMA: "get_schema",
    flight.FlightMethod.DO_GET: "do_get",
    flight.FlightMethod.DO_PUT: "do_put",
    flight.FlightMethod.DO_ACTION: "do_action",
    flight.FlightMethod.LIST_ACTIONS: "list_actions",
    flight.FlightMethod.DO_EXCHANGE: "do_exchange",
}

# The Handshake's token travels from the middleware (which answers the header) to the auth handler
# (which writes the payload). Arrow runs both on the gRPC thread serving that call, one after the
# other. Keyed by OS thread id, not threading.local: each callback from a gRPC (non-Python) thread
# gets a fresh Python thread state, so thread-locals do not survive from one callback to the next.
_handshake_tokens: dict[int, str] = {}


def no_identity(peer: str) -> ClientIdentity | None:
    return None


def _first(headers: Mapping[str, Sequence[str | bytes]], name: str) -> str | None:
    values = headers.get(name)
    if not values:
        return None
    value = values[0]
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _basic_password(header: str | None) -> str | None:
    """The password of `Authorization: Basic base64(user:password)`; the username is ignored."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    encoded = encoded.strip()
    try:
        # Go clients (ADBC) send unpadded base64.
        decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, sep, password = decoded.partition(":")
    return password if sep else None


class ActiveCalls:
    """How many Flight calls have started and not completed; the drain waits for none."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def add(self, delta: int) -> None:
        with self._lock:
            self._count += delta

    @property
    def count(self) -> int:
        return self._count


# The gRPC code pyarrow sends for an exception a handler or stream ended with (most specific first).
_STATUS: tuple[tuple[type[BaseException], str], ...] = (
    (flight.FlightCancelledError, "CANCELLED"),
    (flight.FlightTimedOutError, "DEADLINE_EXCEEDED"),
    (flight.FlightInternalError, "INTERNAL"),
    (flight.FlightUnauthenticatedError, "UNAUTHENTICATED"),
    (flight.FlightUnauthorizedError, "PERMISSION_DENIED"),
    (flight.FlightUnavailableError, "UNAVAILABLE"),
    (flight.FlightError, "UNKNOWN"),
    (pa.ArrowInvalid, "INVALID_ARGUMENT"),
    (pa.ArrowNotImplementedError, "UNIMPLEMENTED"),
    (pa.ArrowKeyError, "NOT_FOUND"),
)


def grpc_status(exception: BaseException | None) -> str:
    if exception is None:
        return "OK"
    return next((code for cls, code in _STATUS if isinstance(exception, cls)), "UNKNOWN")


def _log_call(level: int, method: str, command: str | None, peer: str | None, elapsed_ms: float,
              exception: BaseException | None, identity: ClientIdentity | None, nobody: str = "anonymous") -> None:
    if not log.isEnabledFor(level):
        return
    fields = {"method": method, "command": command or "-", "peer": peer or "-",
              "duration_ms": f"{elapsed_ms:.1f}", "status": grpc_status(exception)}
    if identity is not None:
        fields["client_subject"] = f'"{identity.subject}"'
        fields["client_fingerprint"] = identity.fingerprint[:16]
    else:
        fields["client"] = nobody
    log.log(level, "Flight call", extra={"fields": fields})


class CallRecord(flight.ServerMiddleware):
    """One Flight call. `command` and `identity` are filled by the handler once it knows them."""

    def __init__(self, method: str, metrics: Metrics, active: ActiveCalls, token: str | None = None,
                 log_level: int = logging.DEBUG) -> None:
        self.method = method
        self.command: str | None = None
        self.identity: ClientIdentity | None = None
        self.peer: str | None = None
        self.started = time.perf_counter()
        self._metrics = metrics
        self._token = token
        self._active = active
        self._log_level = log_level
        self.cache_control: str | None = None  # the results-cache request headers (spiced/results_cache.py)
        self.cache_key: str | None = None
        self.api_key: str | None = None  # the bearer the call was let in with, when API keys are on
        active.add(1)

    @staticmethod
    def of(context: flight.ServerCallContext) -> CallRecord | None:
        record = context.get_middleware(MIDDLEWARE_KEY)
        return record if isinstance(record, CallRecord) else None

    def sending_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._token}"} if self._token is not None else {}

    def call_completed(self, exception: BaseException | None) -> None:
        self._active.add(-1)
        elapsed_ms = (time.perf_counter() - self.started) * 1000
        labels = {"method": self.method}
        if self.command:
            labels["command"] = self.command
        self._metrics.flight_requests.add(1, labels)
        self._metrics.flight_duration.record(elapsed_ms, labels)
        _log_call(self._log_level, self.method, self.command, self.peer, elapsed_ms, exception, self.identity)


class CallMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Authenticates every call (when API keys are configured) and opens its CallRecord;
    `access_log` puts the per-call line at INFO instead of DEBUG."""

    def __init__(self, api_keys: ApiKeys, metrics: Metrics, access_log: bool = False) -> None:
        self._keys = api_keys
        self._metrics = metrics
        self._log_level = logging.INFO if access_log else logging.DEBUG
        self.active = ActiveCalls()

    def start_call(self, info: flight.CallInfo, headers: Mapping[str, Sequence[str | bytes]]) -> CallRecord:
        started = time.perf_counter()
        method = _METHODS.get(info.method, "unknown")
        authorization = _first(headers, "authorization")
        try:
            if info.method == flight.FlightMethod.HANDSHAKE:
                token = self._handshake_token(authorization)
                _handshake_tokens[threading.get_ident()] = token
                return CallRecord(method, self._metrics, self.active, token, self._log_level)
            if self._keys.enabled and not self._keys.accepts(bearer_token(authorization)):
                raise flight.FlightUnauthenticatedError("Unauthenticated: invalid or missing API key")
        except flight.FlightUnauthenticatedError as e:
            _log_call(self._log_level, method, None, None, (time.perf_counter() - started) * 1000, e, None, "unknown")
            raise
        record = CallRecord(method, self._metrics, self.active, log_level=self._log_level)
        record.cache_control = _first(headers, "cache-control")
        record.cache_key = _first(headers, "spice-cache-key")
        record.api_key = bearer_token(authorization) if self._keys.enabled else None
        return record

    def _handshake_token(self, authorization: str | None) -> str:
        if not self._keys.enabled:
            return str(uuid.uuid4())  # credentials are ignored; later calls are not checked
        # Basic (username ignored, password = key) or an already-issued bearer. The token we hand
        # back is the key itself, so clients that replay it as `Bearer <token>` pass the check above.
        candidate = _basic_password(authorization) or bearer_token(authorization)
        if not self._keys.accepts(candidate):
            raise flight.FlightUnauthenticatedError("Unauthenticated: invalid or missing API key")
        assert candidate is not None
        return candidate


class HandshakeAuth(flight.ServerAuthHandler):
    """Answers the Handshake with the token as payload; per-call checks live in the middleware.

    pyarrow refuses Handshake (UNIMPLEMENTED) without an auth handler, so one is always installed.
    """

    def authenticate(self, outgoing: flight.ServerAuthSender, incoming: flight.ServerAuthReader) -> None:
        token = _handshake_tokens.pop(threading.get_ident(), None)
        if token is not None:
            outgoing.write(token.encode())

    def is_valid(self, token: bytes) -> str:
        return ""  # pyarrow's `auth-token-bin` scheme is unused: bearer headers are checked in start_call

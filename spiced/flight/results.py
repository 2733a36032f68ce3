"""One query for a DoGet: run it under its QueryTracker (active list, metrics, failure line) and
stream its batches, with each failure sent as the gRPC code its kind calls for.

Failures, by where they happen and the query's kind (spiced.errors):
- timeout / cancelled before the first batch went out: DEADLINE_EXCEEDED / CANCELLED with
  `Query timed out after <t>s` / `Query <id> was cancelled`. pyarrow can only send CANCELLED through
  FlightCancelledError, and Arrow then appends the status detail: the client reads
  `Query <id> was cancelled. Detail: Cancelled` (no C-stream errno maps to CANCELLED; see below).
- planning (the engine refused to plan or start it): a raw-SQL ticket (`raw=True`) gets upstream's
  INTERNAL `Failed to execute query: <full error>`; otherwise the client's mistakes (syntax,
  planning, execution, unsupported) get INVALID_ARGUMENT with the bare DataFusion message, and the
  rest INTERNAL `Failed to execute query: <error>`.
- in the first batches (still before the stream): INVALID_ARGUMENT with the bare message.
- mid-stream: INVALID_ARGUMENT with the bare message; timeout, cancelled and a cluster's lost
  executors (`unavailable`; UNAVAILABLE when raised before the stream) end the stream UNKNOWN
  with the same clean text, because the stream is handed to Flight through the Arrow C stream
  interface (spiced.flight.stream), whose errno → code mapping only knows EINVAL/EDOM/ERANGE
  (INVALID_ARGUMENT) and ENOSYS (UNIMPLEMENTED): every other errno, checked 1–133, is UNKNOWN.
- the client cancelling the call or going away before the end: counted `err_code=Cancelled`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Literal

import pyarrow as pa
import pyarrow.flight as flight

from ..batches import coalesce
from ..engine import Params
from ..errors import CLIENT_ERROR_KINDS, QueryError
from ..identity import ClientIdentity
from ..results_cache import CacheRequest, CacheRequestError, parse_request, principal_of, response_headers
from ..state import RuntimeState
from ..stream import QueryStream
from ..tracker import QueryTracker, disconnected
from . import stream as streams
from .peers import CallRecord

_BARE = ("Error during planning: ", "Execution error: ", "External error: ")


def bare(message: str) -> str:
    """The message without DataFusion's kind prefix, as upstream sends INVALID_ARGUMENT texts."""
    for prefix in _BARE:
        message = message.removeprefix(prefix)
    return message


def _stopped_early(e: QueryError) -> flight.FlightError | None:
    if e.kind == "timeout":
        return flight.FlightTimedOutError(str(e))
    if e.kind == "cancelled":
        return flight.FlightCancelledError(str(e))
    if e.kind in ("not_cached", "unavailable"):
        return flight.FlightUnavailableError(str(e))
    return None


def _refused(e: QueryError, raw: bool) -> flight.FlightDataStream:
    """The engine did not start the query."""
    early = _stopped_early(e)
    if early is not None:
        raise early
    if raw or e.kind not in CLIENT_ERROR_KINDS:
        raise flight.FlightInternalError(f"Failed to execute query: {e}")
    return flight.RecordBatchStream(streams.failing_reader("invalid_argument", bare(str(e))))


def _stream_error(e: QueryError) -> streams.StreamError:
    if e.kind in ("timeout", "cancelled", "unavailable"):
        return streams.StreamError("unknown", str(e))
    return streams.StreamError("invalid_argument", bare(str(e)))


def cache_request(context: flight.ServerCallContext, identity: ClientIdentity | None) -> CacheRequest:
    record = CallRecord.of(context)
    return parse_request(record.cache_control if record else None, record.cache_key if record else None,
                         principal_of(record.api_key if record else None, identity.fingerprint if identity else None))


def stream_query(state: RuntimeState, sql_text: str, protocol: Literal["flight", "flightsql"],
                 identity: ClientIdentity | None, params: Params | None = None, *,
                 raw: bool = False, context: flight.ServerCallContext | None = None) -> flight.FlightDataStream:
    """`raw`: a raw-SQL ticket sent straight to DoGet (planning errors as upstream: INTERNAL).
    `context`: the call, whose results-cache headers are read and answered."""
    try:
        cache = cache_request(context, identity) if context is not None else None
    except CacheRequestError as e:
        return flight.RecordBatchStream(streams.failing_reader("invalid_argument", str(e)))
    tracker = QueryTracker(state, protocol, sql_text, identity)
    try:
        result = state.engine.execute(sql_text, state.config.query_timeout, params, tracker.stopper, cache)
    except QueryError as e:
        tracker.finish(0, e)
        return _refused(e, raw)
    if context is not None and cache is not None:
        for name, value in response_headers(result.cache_status, cache).items():
            context.add_header(name.lower(), value)
    tracker.executing()
    pending = coalesce(result)
    head: list[pa.RecordBatch] = []
    try:
        # Small results (the latency-sensitive case) are sent as a plain table: the C stream
        # below costs close to a millisecond per call and is only needed for mid-stream errors.
        for _ in range(2):
            batch = next(pending, None)
            if batch is None:
                tracker.finish(result.rows)
                return flight.RecordBatchStream(pa.Table.from_batches(head, result.schema))
            head.append(batch)
    except QueryError as e:
        tracker.finish(result.rows, e)
        early = _stopped_early(e)
        if early is not None:
            raise early from None
        return flight.RecordBatchStream(streams.failing_reader("invalid_argument", bare(str(e)), result.schema))
    return flight.RecordBatchStream(streams.reader(result.schema, _Tail(head, pending, result, tracker)))


class _Tail:
    """The batches of a stream already under way. The tracker is finished however the stream ends,
    also when the client leaves before the first of them is asked for (the reader calls `close`)."""

    def __init__(self, head: list[pa.RecordBatch], pending: Iterator[pa.RecordBatch], result: QueryStream,
                 tracker: QueryTracker) -> None:
        self._head = deque(head)
        self._pending = pending
        self._result = result
        self._tracker = tracker

    def __iter__(self) -> _Tail:
        return self

    def __next__(self) -> pa.RecordBatch:
        if self._head:
            return self._head.popleft()
        try:
            return next(self._pending)
        except StopIteration:
            self._tracker.finish(self._result.rows)
            raise
        except QueryError as e:
            self._tracker.finish(self._result.rows, e)
            raise _stream_error(e) from None
        except Exception as e:
            self._tracker.finish(self._result.rows, QueryError(str(e), kind="internal"))
            raise

    def close(self) -> None:
        self._tracker.finish(self._result.rows, disconnected())
        close = getattr(self._pending, "close", None)
        if close is not None:
            close()  # the generators over the query's stream end now, dropping it

"""`POST /v1/sql`: read the SQL body, run it off the event loop, and stream the encoded result.

The body is the SQL text, or under `Content-Type: application/json` the object
`{"sql": "...", "parameters": [...] | {...}}` (spiced/http/params.py).

The first batch is pulled before any header is sent, so a query that fails at once gets a status
(below), not a broken 200. After that, each batch is fetched and encoded in a worker thread and
sent as it comes; an error then can only cut the stream short (the client sees an incomplete body),
never turn into a status code. Formats that are sent whole (`COLLECTED`: the vnd.spiceai envelope)
pull every batch before the header instead.

Statuses by the failure's kind (spiced.errors), as upstream: 504 `Failed to execute query: Query
timed out after <t>s`; 499 `Query <id> was cancelled` (POST /v1/sql/{id}/cancel, spiced.queries);
503 for `Resources exhausted` and for a cluster whose executors died under the query; 400 `Failed to
execute query: <DataFusion error>` for every other engine error; 500 when the results cannot be
encoded. Every query is tracked (active list, metrics, one WARN line when it fails) by
spiced.tracker; a client that leaves before the end counts as `err_code=Cancelled`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import pyarrow as pa
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.types import Send

from ..auth import bearer_token
from ..batches import coalesce
from ..engine import Params
from ..errors import QueryError
from ..identity import ClientIdentity
from ..interrupt import Stopper
from ..quick import attempt_inline
from ..results_cache import CacheRequest, CacheRequestError, parse_request, principal_of, response_headers
from ..state import RuntimeState
from ..tracker import QueryTracker, disconnected
from .body import body_or_refusal
from .encode import (
    COLLECTED,
    CONTENT_TYPES,
    Chunks,
    Encoder,
    MediaType,
    encoder_for,
    negotiate,
)
from .gates import client_identity
from .params import RequestError, is_json_body, parse_sql_request

log = logging.getLogger("runtime.http")

SMALL_RESULT_ROWS = 8191  # below DataFusion's batch size: a short first batch usually is the last


class StreamAborted(Exception):
    """The result stream failed after the headers went out; the response is cut short."""


class QueryRun:
    """One query from planning to its last batch. Its steps are blocking calls into DataFusion and
    the encoders; the caller runs each in a worker thread, one at a time."""

    def __init__(self, state: RuntimeState, sql: str, media_type: MediaType, params: Params | None = None,
                 identity: ClientIdentity | None = None, cache: CacheRequest | None = None) -> None:
        self.tracker = QueryTracker(state, "http", sql, identity)
        self.cache = cache
        self.cache_headers: dict[str, str] = {}
        self.state = state
        self.sql = sql
        self.params = params
        self.media_type = media_type
        self.rows = 0
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._encoder: Encoder | None = None
        self.done = False

    def start(self, stopper: Stopper | None = None) -> Chunks:
        """Plan, execute and encode the first batch (QueryError on failure); `stopper` stands for
        the query's own (spiced.quick.attempt_inline)."""
        self.rows, self.done = 0, False
        stream = self.state.engine.execute(self.sql, self.state.config.query_timeout, self.params,
                                           stopper or self.tracker.stopper, self.cache)
        if self.cache is not None:
            self.cache_headers = response_headers(stream.cache_status, self.cache)
        self.tracker.executing()
        self._batches = coalesce(iter(stream))
        self._encoder = encoder_for(self.media_type, stream.schema)
        chunks = [*self._encoder.begin(), *self.step()]
        if not self.done and self.rows <= SMALL_RESULT_ROWS:
            # A small first batch is often the whole result: finishing here lets it go out as one
            # plain response, without a second thread hop or chunked framing.
            chunks += self.step()
        return chunks

    async def first_chunks(self) -> Chunks:
        """What goes out with the header: the first batch, or every batch for a collected format
        (one worker-thread hop per batch, so a client that leaves is noticed between them). A query
        known to be quick starts on the event loop, within a time limit (spiced.quick)."""
        quick = self.state.engine.quick
        key = quick.key(self.sql, self.state.engine.catalog_version)
        started = time.perf_counter()
        first = None
        if quick.is_quick(key):
            first = attempt_inline(self.start, self.tracker.stopper, quick.slow)
            quick.record(key, time.perf_counter() - started, inline=True)
            if first is None:
                log.debug("Query %s took over %gs on the event loop; started again in a worker thread",
                          self.tracker.query.id, quick.slow)
        if first is None:
            first = await self.off_loop(lambda: self._timed_start(key))
        chunks = [*first]
        while not self.done and self.media_type in COLLECTED:
            chunks += await self.off_loop(self.step)
        return chunks

    def _timed_start(self, key: tuple[int, str]) -> Chunks:
        started = time.perf_counter()
        chunks = self.start()
        self.state.engine.quick.record(key, time.perf_counter() - started, inline=False)
        return chunks

    def step(self) -> Chunks:
        """The next batch's bytes; after the last batch, the encoder's closing bytes and `done`."""
        assert self._batches is not None and self._encoder is not None
        batch = next(self._batches, None)
        if batch is None:
            self.done = True
            return self._encoder.end()
        self.rows += batch.num_rows
        return self._encoder.batch(batch)

    def finish(self, error: QueryError | None = None) -> None:
        """Once the query is over: as asked, or a client gone if it ended before its last batch."""
        self.tracker.finish(self.rows, error if error is not None or self.done else disconnected())

    async def off_loop(self, step: Callable[[], Chunks]) -> Chunks:
        """Run one step in a worker thread. Cancellation (the client went away) waits for the step
        to finish, so the stream is never used by two threads; the engine bounds each step by the
        query's time limit and stops it on a cancel."""
        return await anyio.to_thread.run_sync(step)

    async def chunks(self, first: Chunks) -> AsyncIterator[bytes | memoryview]:
        try:
            for chunk in first:
                yield chunk
            while not self.done:
                for chunk in await self.off_loop(self.step):
                    yield chunk
        except QueryError as e:
            self.finish(e)
            raise StreamAborted(str(e)) from None
        except Exception as e:  # an encoder bug must not leave a half-sent body looking complete
            log.exception("Failed to encode query results")
            self.finish(QueryError(str(e), kind="internal"))
            raise StreamAborted(str(e)) from None
        finally:
            self.finish()


class QueryResponse(StreamingResponse):
    """Streams a QueryRun; on StreamAborted it stops without the final empty body message, so
    Hypercorn closes the connection and the client sees a truncated response."""

    def __init__(self, run: QueryRun, first: Chunks) -> None:
        # As a header rather than media_type: Starlette would add "; charset=utf-8" to text/csv.
        super().__init__(run.chunks(first), headers={"content-type": CONTENT_TYPES[run.media_type],
                                                     **run.cache_headers})

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        iterator = self.body_iterator
        try:
            async for chunk in iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except StreamAborted:
            return
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def bad_request(text: str) -> Response:
    return PlainTextResponse(text, status_code=400)


def read_query(body: bytes, content_type: str | None) -> tuple[str, Params | None]:
    """The SQL text and its parameters; RequestError (a 400) for a body that cannot be run."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"Request body didn't contain valid UTF-8: {e}") from None
    return parse_sql_request(text) if is_json_body(content_type) else (text, None)


async def sql_endpoint(request: Request) -> Response:
    state: RuntimeState = request.app.state.runtime
    if isinstance(body := await body_or_refusal(request), Response):
        return body
    try:
        sql, params = read_query(body, request.headers.get("content-type"))
    except RequestError as e:
        return bad_request(str(e))
    identity = client_identity(request.scope)
    try:
        cache = http_cache_request(request, state, identity)
    except CacheRequestError as e:
        return bad_request(str(e))
    run = QueryRun(state, sql, negotiate(request.headers.get("accept")), params, identity, cache)
    try:
        first = await run.first_chunks()
    except QueryError as e:
        run.finish(e)
        return failed(e)
    except Exception as e:
        log.exception("Failed to encode query results")
        run.finish(QueryError(str(e), kind="internal"))
        return PlainTextResponse("Failed to encode query results", status_code=500)
    except BaseException:  # cancelled: the client went away
        run.finish()
        raise
    if run.done:
        run.finish()
        return Response(b"".join(first), headers={"content-type": CONTENT_TYPES[run.media_type],
                                                  **run.cache_headers})
    return QueryResponse(run, first)


def http_cache_request(request: Request, state: RuntimeState, identity: ClientIdentity | None) -> CacheRequest:
    """The results-cache request of an HTTP query, for its `principal`."""
    headers = request.headers
    return parse_request(headers.get("cache-control"), headers.get("spice-cache-key"),
                         principal(request, state, identity))


def principal(request: Request, state: RuntimeState, identity: ClientIdentity | None) -> str | None:
    """Whom a request's results belong to: the API key the gate let in, else the verified client
    certificate; None for anyone."""
    api_key = None
    if state.api_keys.enabled:
        api_key = request.headers.get("x-api-key") or bearer_token(request.headers.get("authorization"))
    return principal_of(api_key, identity.fingerprint if identity else None)


def failed(e: QueryError) -> Response:
    """The status and text for a query that failed before its header went out (module docstring)."""
    if e.kind == "cancelled":
        return PlainTextResponse(str(e), status_code=499)
    status = {"timeout": 504, "not_cached": 504, "resources_exhausted": 503, "unavailable": 503}.get(e.kind, 400)
    return PlainTextResponse(f"Failed to execute query: {e}", status_code=status)

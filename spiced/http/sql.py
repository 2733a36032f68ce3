"""`POST /v1/sql`: read the SQL body, run it off the event loop, and stream the encoded result.

The body is the SQL text, or under `Content-Type: application/json` the object
`{"sql": "...", "parameters": [...] | {...}}` (spiced/http/params.py).

The first batch is pulled before any header is sent, so a query that fails at once is a 400,
not a broken 200. After that, each batch is fetched and encoded in a worker thread and sent as
it comes; an error then can only cut the stream short (the client sees an incomplete body and
the error is logged), never turn into a status code. Formats that are sent whole
(`COLLECTED`: the vnd.spiceai envelope) pull every batch before the header instead.
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

from ..engine import Params, coalesce
from ..errors import QueryError
from ..state import RuntimeState
from .body import BodyTooLarge, BodyTooSlow, read_body, too_large, too_slow
from .encode import (
    COLLECTED,
    CONTENT_TYPES,
    Chunks,
    Encoder,
    MediaType,
    encoder_for,
    negotiate,
)
from .params import RequestError, is_json_body, parse_sql_request

log = logging.getLogger("runtime.http")

PROTOCOL = {"protocol": "http"}
SMALL_RESULT_ROWS = 8191  # below DataFusion's batch size: a short first batch usually is the last


class StreamAborted(Exception):
    """The result stream failed after the headers went out; the response is cut short."""


class QueryRun:
    """One query from planning to its last batch, with its metrics. Its steps are blocking calls
    into DataFusion and the encoders; the caller runs each in a worker thread, one at a time."""

    def __init__(self, state: RuntimeState, sql: str, media_type: MediaType, params: Params | None = None) -> None:
        self.state = state
        self.sql = sql
        self.params = params
        self.media_type = media_type
        self.timeout = state.config.query_timeout
        self.started = time.perf_counter()
        self.engine_seconds = 0.0
        self.rows = 0
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._encoder: Encoder | None = None
        self.done = False
        self._finished = False
        state.metrics.query_executions.add(1, PROTOCOL)
        state.metrics.query_active.add(1, PROTOCOL)

    def start(self) -> Chunks:
        """Plan, execute and encode the first batch (QueryError on failure)."""
        began = time.perf_counter()
        stream = self.state.engine.execute(self.sql, self.timeout, self.params)
        self.engine_seconds += time.perf_counter() - began
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
        (one worker-thread hop per batch, so a client that leaves is noticed between them)."""
        chunks = [*await self.off_loop(self.start)]
        try:
            while not self.done and self.media_type in COLLECTED:
                chunks += await self.off_loop(self.step)
        except anyio.get_cancelled_exc_class():
            self.finish()  # the client went away: as when a stream is cut (see `chunks`)
            raise
        return chunks

    def step(self) -> Chunks:
        """The next batch's bytes; after the last batch, the encoder's closing bytes and `done`."""
        assert self._batches is not None and self._encoder is not None
        began = time.perf_counter()
        batch = next(self._batches, None)
        self.engine_seconds += time.perf_counter() - began
        if batch is None:
            self.done = True
            return self._encoder.end()
        self.rows += batch.num_rows
        return self._encoder.batch(batch)

    def finish(self, error: QueryError | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        m = self.state.metrics
        m.query_active.add(-1, PROTOCOL)
        m.query_duration.record((time.perf_counter() - self.started) * 1000, PROTOCOL)
        m.query_execution_duration.record(self.engine_seconds * 1000, PROTOCOL)
        if error is not None:
            m.query_failures.add(1, {**PROTOCOL, "err_code": error.kind})
        else:
            m.query_returned_rows.add(self.rows)

    async def off_loop(self, step: Callable[[], Chunks]) -> Chunks:
        """Run one step in a worker thread. Cancellation (the client went away) waits for the step
        to finish, so the stream is never used by two threads; the engine bounds each step by the
        query's time limit."""
        return await anyio.to_thread.run_sync(step)

    async def chunks(self, first: Chunks) -> AsyncIterator[bytes | memoryview]:
        try:
            for chunk in first:
                yield chunk
            while not self.done:
                for chunk in await self.off_loop(self.step):
                    yield chunk
        except QueryError as e:
            log.warning("%s; response cut short" if e.kind == "timeout" else "Error processing batch: %s", e)
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
        super().__init__(run.chunks(first), headers={"content-type": CONTENT_TYPES[run.media_type]})

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
    try:
        body = await read_body(request)
    except BodyTooLarge:
        return too_large()
    except BodyTooSlow:
        return too_slow()
    try:
        sql, params = read_query(body, request.headers.get("content-type"))
    except RequestError as e:
        return bad_request(str(e))
    run = QueryRun(state, sql, negotiate(request.headers.get("accept")), params)
    try:
        first = await run.first_chunks()
    except QueryError as e:
        run.finish(e)
        return PlainTextResponse(f"Failed to execute query: {e}", status_code=504 if e.kind == "timeout" else 400)
    except Exception as e:
        log.exception("Failed to encode query results")
        run.finish(QueryError(str(e), kind="internal"))
        return PlainTextResponse("Failed to encode query results", status_code=500)
    if run.done:
        run.finish()
        return Response(b"".join(first), headers={"content-type": CONTENT_TYPES[run.media_type]})
    return QueryResponse(run, first)

"""A running query's record batches, with its time limit and its stop (a cancel)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pyarrow as pa
from datafusion.record_batch import RecordBatchStream

from .batches import plain_schema
from .errors import QueryError, engine_error
from .interrupt import Stopped, Stopper
from .results_cache import CacheStatus


class WaitLoop:
    """An event loop on a thread of its own, started on first use, where timed queries wait for
    their first batch. DataFusion stops a query when its stream is dropped, but a blocking `next()`
    cannot be interrupted at a precise moment; an awaited `__anext__` can, and cancelling it drops
    the Rust future. (A cancel does not need that precision: spiced.interrupt.)"""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="query-deadlines", daemon=True).start()
                self._loop = loop
            return self._loop

    def stop(self) -> None:
        with self._lock:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._loop = None


class Deadline:
    def __init__(self, seconds: float, loop: asyncio.AbstractEventLoop) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.loop = loop

    def error(self) -> QueryError:
        return QueryError(f"Query timed out after {self.seconds:g}s", kind="timeout")


async def _next_within(stream: RecordBatchStream, seconds: float) -> object:
    return await asyncio.wait_for(stream.__anext__(), seconds)


class QueryStream:
    """A running query: its schema and an iterator of record batches (errors mid-stream are QueryErrors).

    Every blocking fetch runs through the query's Stopper, so `stopper.stop(error)` (a cancel) ends
    it, within about a second even while DataFusion is still computing a batch (spiced.interrupt).
    Under a deadline, the first batch (where sorts, aggregates and joins spend their time) is
    awaited on the wait loop for at most the time left; past it, or on a stop, the wait is
    cancelled. Later batches are fetched directly (an await costs about half a millisecond) and
    the deadline is checked between them. Either way the stream is dropped, which cancels
    DataFusion's tasks; DataFusion stops at its next yield point, so an operator busy on one huge
    batch runs on until it ends.
    """

    def __init__(self, schema: pa.Schema, stream: RecordBatchStream | Iterator[pa.RecordBatch],
                 deadline: Deadline | None = None, stopper: Stopper | None = None) -> None:
        self.schema = plain_schema(schema)
        self._cast = not self.schema.equals(schema)  # the rare query that still yields a view type
        self._stream: RecordBatchStream | Iterator[pa.RecordBatch] | None = stream
        self._deadline = deadline
        self._stopper = stopper or Stopper()
        self._started = False  # whether the first batch has been asked for
        self.rows = 0
        self.cache_status: CacheStatus | None = None  # None: the results cache does not apply
        self._keep: Callable[[list[pa.RecordBatch]], None] | None = None
        self._kept: list[pa.RecordBatch] = []
        self._kept_bytes = self._keep_limit = 0

    def keep(self, store: Callable[[list[pa.RecordBatch]], None], limit: int) -> None:
        """Hand every batch to `store` once the stream ends whole, if they add up to `limit` bytes
        at most (the results cache keeps them; a larger result is not held at all)."""
        self._keep, self._keep_limit = store, limit

    def _next(self) -> object:
        outcome = self._fetch()
        if isinstance(outcome, QueryError):
            # Raised here, where no exception context or traceback holds the stream: dropping
            # this last reference is what stops the query.
            self._stream = None
            raise outcome
        return outcome

    def _fetch(self) -> object:
        """The next batch, or the QueryError that ends the query early (a stop or the time limit)."""
        stream, deadline = self._stream, self._deadline
        assert stream is not None
        first, self._started = not self._started, True
        if deadline is not None:
            left = deadline.at - time.monotonic()
            if left <= 0:
                return deadline.error()
            if first and isinstance(stream, RecordBatchStream):
                return self._first_within(stream, left, deadline)
        try:
            return self._stopper.call(next, stream)
        except Stopped as e:
            error = e.error
        return error

    def _first_within(self, stream: RecordBatchStream, left: float, deadline: Deadline) -> object:
        waiting = asyncio.run_coroutine_threadsafe(_next_within(stream, left), deadline.loop)
        try:
            return self._stopper.wait(waiting)
        except StopAsyncIteration:
            raise StopIteration from None
        except TimeoutError:
            error = deadline.error()
        except Stopped as e:
            error = e.error
        del waiting  # its exception's traceback still holds the stream
        return error

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        while self._stream is not None:
            try:
                batch = self._next()
            except StopIteration:
                if self._keep is not None:
                    self._keep(self._kept)
                    self._keep, self._kept = None, []
                return
            except QueryError:
                raise
            except Exception as e:
                raise engine_error(e) from None
            rb = batch if isinstance(batch, pa.RecordBatch) else batch.to_pyarrow()  # type: ignore[attr-defined]
            if self._cast:
                rb = rb.cast(self.schema)
            elif not rb.schema.equals(self.schema):  # DataFusion plans a column nullable, then sends it non-null
                rb = pa.RecordBatch.from_arrays(rb.columns, schema=self.schema)
            self.rows += rb.num_rows
            if self._keep is not None:
                self._kept_bytes += rb.nbytes
                if self._kept_bytes > self._keep_limit:
                    self._keep, self._kept = None, []
                else:
                    self._kept.append(rb)
            yield rb

    def reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.schema, iter(self))

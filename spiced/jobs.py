"""Async SQL queries ("jobs") on a cluster scheduler: their lifecycle from submission to expiry.

Upstream's model (its `crates/runtime/src/jobs`), held in this process's memory instead of the
scheduler's object store:

    PENDING → RUNNING → SUCCEEDED | FAILED | CANCELLED        (a job that expired reads as gone: 410)

A job runs on a worker thread of its own pool (`MAX_RUNNING` at once, the rest wait as PENDING)
through the same `Engine.execute` as `POST /v1/sql`, so on a scheduler it is distributed to the
executors exactly like a synchronous query; `timeout_seconds` is that query's time limit, and its
`Stopper` is how a cancel or the runtime's shutdown end it. Its rows are cut into chunks of
`CHUNK_ROWS` rows, each kept as an Arrow IPC stream (upstream's `ARROW_IPC` manifest format);
their bytes count against the job's `maximum_size` (`DEFAULT_MAXIMUM_SIZE` when none is given) and
against `RESULTS_BUDGET`, the most this runtime holds for all jobs together. A result over either fails the job.

Every finished job is kept for the retention time (upstream's 12 hours; the environment variable
`SPICED_ASYNC_QUERY_RESULT_TTL`, a duration such as `30m`, changes it: spiced.config), then its results are
dropped and it answers "expired" for as long again before it is forgotten (404). Upstream expires
only succeeded jobs; here failed and cancelled ones expire too, so memory stays bounded. At most
`MAX_JOBS` jobs are held; past that a submission is refused until some expire.

Jobs belong to the principal that submitted them (the API key, else the verified client
certificate, else `public`, as upstream's newest releases scope them): any other caller is told
the job does not exist. This runtime has no read-only API keys and runs every statement read-only,
so a job is always read-only.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
from pyarrow import ipc

from .engine import Engine, Params
from .errors import QueryError
from .interrupt import Stopper
from .queries import uuid7
from .results_cache import CacheRequest

log = logging.getLogger("runtime.jobs")

JobStatus = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "CLOSED"]
TERMINAL: frozenset[JobStatus] = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "CLOSED"})
JobErrorCode = Literal["SCHEDULER_UNAVAILABLE", "SUBMISSION_FAILED", "EXECUTION_FAILED", "FETCHING_RESULTS_FAILED",
                       "CANCELLED", "PARAMETER_BINDING_FAILED", "NOT_FOUND", "INTERNAL", "TIMEOUT"]

DEFAULT_RESULT_TTL = 12 * 3600.0  # seconds, upstream's (matching Databricks)
CHUNK_ROWS = 10_000  # upstream's DEFAULT_CHUNK_SIZE
DEFAULT_MAXIMUM_SIZE = 256 * 1024 * 1024  # bytes of one job's result when the request sets no maximum_size
RESULTS_BUDGET = 1024 * 1024 * 1024  # bytes of results held for all jobs together
MAX_RUNNING = 4
MAX_JOBS = 10_000
PUBLIC_OWNER = "public"  # the owner of jobs submitted without an API key or a client certificate
TIMED_OUT = "Job execution timed out"

_JOB_ID = re.compile(r"[0-9A-Fa-f]{5}-[0-9A-Fa-f]{3}-[0-9A-Fa-f]{3}-[0-9A-Fa-f]{6}")


def new_job_id() -> str:
    """Upstream's Databricks-style id from a UUIDv7: timestamp hex 0-11, then 6 random hex digits
    (`01ABC-DEF-456-7890AB`)."""
    h = uuid7().hex
    return f"{h[0:5]}-{h[5:8]}-{h[8:11]}-{h[17:23]}".upper()


def is_job_id(text: str) -> bool:
    return _JOB_ID.fullmatch(text) is not None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A submitted query, as parsed from its request."""

    sql: str
    params: Params | None = None
    params_error: str | None = None  # parameters that cannot be bound: the job fails PARAMETER_BINDING_FAILED
    timeout_seconds: int | None = None  # None or 0: no limit
    maximum_size: int | None = None  # bytes; None: DEFAULT_MAXIMUM_SIZE
    owner: str = PUBLIC_OWNER
    cache: CacheRequest = field(default_factory=CacheRequest)


@dataclass(frozen=True, slots=True)
class JobError:
    error_code: JobErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    row_offset: int
    row_count: int
    data: pa.Buffer  # an Arrow IPC stream

    def batches(self) -> list[pa.RecordBatch]:
        return ipc.open_stream(self.data).read_all().to_batches()


@dataclass(frozen=True, slots=True)
class JobResult:
    schema: pa.Schema
    chunks: tuple[Chunk, ...]
    total_row_count: int
    total_byte_count: int


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as it stood when asked (the job itself keeps changing on its thread)."""

    job_id: str
    status: JobStatus
    sql_preview: str
    error: JobError | None
    result: JobResult | None
    created_at_ms: int
    started_at_ms: int | None
    completed_at_ms: int | None
    expires_at_ms: int | None


class JobsError(Exception):
    """A request about jobs that cannot be answered; the message is upstream's text."""


class JobNotFound(JobsError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"Job {job_id} not found")


class JobResultsExpired(JobsError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"Job {job_id} results have expired")


class JobNotComplete(JobsError):
    def __init__(self, job_id: str, status: JobStatus) -> None:
        super().__init__(f"Job {job_id} is not yet complete (status: {status})")


class ChunkNotFound(JobsError):
    def __init__(self, job_id: str, index: int) -> None:
        super().__init__(f"Result chunk {index} not found for job {job_id}")


class NoRowsReturned(JobsError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"Job {job_id} completed with no rows returned")


class JobsUnavailable(JobsError):
    """No job can be taken now (too many held, or the runtime is shutting down)."""


class _TooLarge(Exception):
    pass


def sql_preview(sql: str) -> str:
    """Upstream's: up to 100 characters, the longer ones cut to 97 and `...`."""
    return sql if len(sql) <= 100 else sql[:97] + "..."


@dataclass(eq=False)
class _Job:
    job_id: str
    owner: str
    sql_preview: str
    spec: JobSpec | None  # dropped once the job has run: only the preview is kept
    created_at_ms: int = field(default_factory=now_ms)
    status: JobStatus = "PENDING"
    error: JobError | None = None
    result: JobResult | None = None
    started_at_ms: int | None = None
    completed_at_ms: int | None = None
    expires_at_ms: int | None = None
    held: int = 0  # result bytes counted against the budget
    stopper: Stopper = field(default_factory=Stopper)
    future: concurrent.futures.Future[None] | None = None

    def view(self) -> JobView:
        return JobView(self.job_id, self.status, self.sql_preview, self.error, self.result, self.created_at_ms,
                       self.started_at_ms, self.completed_at_ms, self.expires_at_ms)

    def expired(self, now: int) -> bool:
        return self.expires_at_ms is not None and now >= self.expires_at_ms


class Jobs:
    """The jobs of one scheduler. Thread-safe: HTTP handlers call it from the event loop (every
    method returns at once), jobs run on its pool, expiry runs on a thread of its own."""

    def __init__(self, engine: Engine, *, result_ttl: float = DEFAULT_RESULT_TTL, running: int = MAX_RUNNING,
                 budget: int = RESULTS_BUDGET, max_jobs: int = MAX_JOBS) -> None:
        self._engine = engine
        self.result_ttl = result_ttl
        self._ttl_ms = int(result_ttl * 1000)
        self._budget = budget
        self._held = 0
        self._max_jobs = max_jobs
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(running, thread_name_prefix="async-query")
        self._stop_sweeping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="async-query-expiry", daemon=True)
        self._sweeper.start()

    # ------------------------------------------------------------------ the API's operations

    def submit(self, spec: JobSpec) -> JobView:
        with self._lock:
            if self._closed:
                raise JobsUnavailable("The runtime is shutting down")
            if len(self._jobs) >= self._max_jobs:
                self._sweep_locked(now_ms(), forget_expired=True)
            if len(self._jobs) >= self._max_jobs:
                raise JobsUnavailable(f"Too many async queries are held ({self._max_jobs}); "
                                      "retry once earlier results expire")
            job_id = new_job_id()
            while job_id in self._jobs:
                job_id = new_job_id()
            job = self._jobs[job_id] = _Job(job_id, spec.owner, sql_preview(spec.sql), spec)
            view = job.view()
        try:
            job.future = self._pool.submit(self._run, job)
        except RuntimeError:  # the pool was shut down meanwhile
            self._end(job, "CANCELLED")
        log.debug("Async query %s submitted", job_id)
        return view

    def view(self, job_id: str, owner: str) -> JobView:
        with self._lock:
            return self._owned(job_id, owner).view()

    def chunk(self, job_id: str, owner: str, index: int) -> tuple[JobView, Chunk]:
        view = self.view(job_id, owner)
        if view.status != "SUCCEEDED" or view.result is None:
            raise JobNotComplete(job_id, view.status)
        if not view.result.chunks:
            raise NoRowsReturned(job_id)
        if index >= len(view.result.chunks):
            raise ChunkNotFound(job_id, index)
        return view, view.result.chunks[index]

    def cancel(self, job_id: str, owner: str) -> JobView:
        """Stop a pending or running job; a finished one is returned as it is (as upstream)."""
        with self._lock:
            job = self._owned(job_id, owner)
        self._end(job, "CANCELLED")
        with self._lock:
            return job.view()

    def list(self, owner: str, status: JobStatus | None = None) -> list[JobView]:
        """The caller's jobs that have not expired, newest first (the dict keeps submission order)."""
        now = now_ms()
        with self._lock:
            return [j.view() for j in reversed(self._jobs.values())
                    if j.owner == owner and not j.expired(now) and (status is None or j.status == status)]

    def close(self, timeout: float) -> None:
        """At shutdown: no new job, every pending and running one cancelled, their threads given
        `timeout` seconds to end."""
        with self._lock:
            self._closed = True
            live = [j for j in self._jobs.values() if j.status not in TERMINAL]
        for job in live:
            self._end(job, "CANCELLED", "The runtime is shutting down")
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._stop_sweeping.set()
        futures = [j.future for j in live if j.future is not None]
        if futures:
            concurrent.futures.wait(futures, timeout)
        if live:
            log.info("Cancelled %d async quer%s at shutdown", len(live), "y" if len(live) == 1 else "ies")

    # ------------------------------------------------------------------ running a job

    def _run(self, job: _Job) -> None:
        with self._lock:
            if job.status != "PENDING" or job.spec is None:
                return
            job.status, job.started_at_ms = "RUNNING", now_ms()
            spec = job.spec
        try:
            outcome = self._execute(job, spec)
        except Exception as e:  # a bug: the job fails instead of staying RUNNING
            if job.status == "RUNNING":
                log.exception("Async query %s failed unexpectedly", job.job_id)
            outcome = JobError("INTERNAL", str(e))
        if isinstance(outcome, JobResult):
            self._end(job, "SUCCEEDED", result=outcome)
        else:
            self._end(job, "FAILED", error=outcome)

    def _execute(self, job: _Job, spec: JobSpec) -> JobResult | JobError:
        if spec.params_error is not None:
            return JobError("PARAMETER_BINDING_FAILED", spec.params_error)
        timeout = float(spec.timeout_seconds) if spec.timeout_seconds else None
        writer: _ChunkWriter | None = None
        try:
            stream = self._engine.execute(spec.sql, timeout, spec.params, job.stopper, spec.cache)
            limit = DEFAULT_MAXIMUM_SIZE if spec.maximum_size is None else spec.maximum_size
            writer = _ChunkWriter(stream.schema, limit, lambda size: self._reserve(job, size))
            batches = iter(stream)
            try:
                for batch in batches:
                    writer.add(batch)
            finally:
                close: Callable[[], None] | None = getattr(batches, "close", None)
                if close is not None:
                    close()  # the query stops here when it ends early
            return writer.finish()
        except QueryError as e:
            return _failure(e, fetching=writer is not None and writer.started)
        except _TooLarge as e:
            return JobError("FETCHING_RESULTS_FAILED", str(e))

    def _end(self, job: _Job, status: JobStatus, message: str | None = None, *, result: JobResult | None = None,
             error: JobError | None = None) -> None:
        """Move a job that has not ended yet to `status` (a job ends once: a late outcome of a
        cancelled job is dropped, with its bytes)."""
        with self._lock:
            ended = job.status not in TERMINAL
            if ended:
                job.status, job.result, job.error = status, result, error
                job.completed_at_ms = now_ms()
                job.expires_at_ms = job.completed_at_ms + self._ttl_ms
                job.spec = None
            if job.status != "SUCCEEDED":
                self._release_locked(job)
        if not ended:
            return
        if status == "CANCELLED":
            job.stopper.stop(QueryError(message or f"Job {job.job_id} was cancelled", kind="cancelled"))
            log.debug("Async query %s cancelled", job.job_id)
        elif error is not None:
            log.warning("Async query failed query_id=%s error_code=%s error=%s", job.job_id, error.error_code,
                        error.message)
        else:
            log.debug("Async query %s succeeded", job.job_id)

    def _reserve(self, job: _Job, size: int) -> None:
        """Count `size` more bytes of `job`'s result against the budget (_TooLarge past it)."""
        with self._lock:
            if self._held + size > self._budget:
                raise _TooLarge(f"Failed to write results: the async query results held by this runtime would "
                                f"exceed {self._budget} bytes; retry once earlier results expire")
            self._held += size
            job.held += size

    def _release_locked(self, job: _Job) -> None:
        self._held -= job.held
        job.held = 0
        job.result = None

    # ------------------------------------------------------------------ lookup and expiry

    def _owned(self, job_id: str, owner: str) -> _Job:
        """Under the lock. Another principal's job reads as missing, before its expiry is looked
        at, so an id it does not own is never confirmed."""
        job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            raise JobNotFound(job_id)
        if job.expired(now_ms()):
            raise JobResultsExpired(job_id)
        return job

    def _sweep_loop(self) -> None:
        every = min(max(self.result_ttl / 4, 0.05), 30.0)
        while not self._stop_sweeping.wait(every):
            with self._lock:
                self._sweep_locked(now_ms())

    def _sweep_locked(self, now: int, *, forget_expired: bool = False) -> None:
        """Drop the results of expired jobs; forget them a retention time later (or at once)."""
        for job_id, job in list(self._jobs.items()):
            if job.expired(now):
                self._release_locked(job)
                assert job.expires_at_ms is not None
                if forget_expired or now >= job.expires_at_ms + self._ttl_ms:
                    del self._jobs[job_id]


def _failure(e: QueryError, *, fetching: bool) -> JobError:
    """Upstream's error code for a query that failed; `fetching`: after its first batch came back."""
    if e.kind == "timeout":
        return JobError("TIMEOUT", TIMED_OUT)
    if e.kind == "cancelled":
        return JobError("CANCELLED", str(e))
    if fetching:
        return JobError("FETCHING_RESULTS_FAILED", f"Failed to read batch from result stream: {e}")
    if "placeholder" in str(e).lower():
        return JobError("PARAMETER_BINDING_FAILED", f"Failed to execute query: {e}")
    if e.kind == "internal":
        return JobError("INTERNAL", f"Failed to execute query: {e}")
    return JobError("EXECUTION_FAILED", f"Failed to execute query: {e}")


class _ChunkWriter:
    """Rows → Arrow IPC chunks of CHUNK_ROWS rows (the last one shorter), each counted against the
    job's limit and the runtime's budget as it is written."""

    def __init__(self, schema: pa.Schema, limit: int, reserve: Callable[[int], None]) -> None:
        self._schema = schema
        self._limit = limit
        self._reserve = reserve
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._chunks: list[Chunk] = []
        self.rows = self.bytes = 0
        self.started = False  # a first batch came back

    def add(self, batch: pa.RecordBatch) -> None:
        self.started = True
        if not batch.num_rows:
            return
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        while self._pending_rows >= CHUNK_ROWS:
            self._flush(CHUNK_ROWS)

    def finish(self) -> JobResult:
        if self._pending_rows:
            self._flush(self._pending_rows)
        return JobResult(self._schema, tuple(self._chunks), self.rows, self.bytes)

    def _flush(self, rows: int) -> None:
        table = pa.Table.from_batches(self._pending, self._schema)
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, self._schema) as out:
            out.write_table(table.slice(0, rows))
        data = sink.getvalue()
        if self.bytes + data.size > self._limit:
            raise _TooLarge("Failed to write results to object store. "
                            f"The maximum job size of '{self._limit}' bytes was exceeded.")
        self._reserve(data.size)
        self._chunks.append(Chunk(len(self._chunks), self.rows, rows, data))
        self.rows += rows
        self.bytes += data.size
        self._pending = table.slice(rows).to_batches()
        self._pending_rows -= rows

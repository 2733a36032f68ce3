"""Upstream's async query API (`/v1/queries`), served by a cluster scheduler (spiced/jobs.py runs the
jobs). Routes, statuses, JSON shapes and texts are upstream's (`crates/runtime/src/http/v1/queries.rs`):

    POST /v1/queries  {"sql", "parameters", "timeout_seconds", "maximum_size"}
                      → 202 {"query_id", "status": "PENDING", "status_url", "results_url"}
    GET  /v1/queries/{id}          → {"query_id", "status", "error"?, "manifest"?, "result"? (chunk 0),
                                      "created_at", "started_at"?, "completed_at"?, "expires_at"?}
    GET  /v1/queries/{id}/status   → {"status", "error"?}
    GET  /v1/queries/{id}/results?partition=N&format=json        → a chunk (425 while it runs)
    GET  /v1/queries/{id}/results/chunks/{n}                     → a chunk (409 while it runs)
    POST /v1/queries/{id}/cancel   → the query (a finished one unchanged)
    GET  /v1/queries?status=&limit=  → {"queries": [{"query_id", "status", "sql_preview", "created_at"}], "total_count"}

A chunk is `{"chunk_index", "row_offset", "row_count", "next_chunk_index"?, "next_chunk_url"?, "data_array"}`,
its rows written by /v1/sql's JSON encoder. Errors about a job are `{"error": "<upstream's text>"}`
(404 unknown, 410 expired or cancelled, 409 / 425 not finished, 500 for the results of a failed
one, as upstream); a request the extractors refuse is answered in axum's words, as text: 415 without
a JSON content type, 400 for JSON that does not parse or a bad query string or path, 422 for JSON of
the wrong shape. Beyond upstream: a malformed query id is a 400 `Invalid job ID format: <id>`.

On a runtime that is not a scheduler every route answers 503 with upstream's JSON error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import pyarrow as pa
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ..jobs import (
    PUBLIC_OWNER,
    Chunk,
    JobNotComplete,
    JobResultsExpired,
    Jobs,
    JobsError,
    JobSpec,
    JobStatus,
    JobsUnavailable,
    JobView,
    is_job_id,
)
from .body import body_or_refusal
from .encode_json import JsonEncoder
from .gates import client_identity
from .openapi import OPENAPI_SCHEDULER
from .params import RequestError, describe_json, json_parameters, load_json
from .routes import json_response, runtime
from .sql import http_cache_request, principal
from .values import BatchSql

NOT_SCHEDULER: Final = ("Async queries API requires distributed mode with `runtime.scheduler.state_location` "
                        "configured. Start with: spiced --role scheduler")
INITIALIZING: Final = "Queries API is initializing. Please retry shortly."
_PARSE = "Failed to parse the request body as JSON: "
_DESERIALIZE = "Failed to deserialize the JSON body into the target type: "
_QUERY_STRING = "Failed to deserialize query string: "
_U64_MAX = 2**64 - 1
_STATUS_FILTERS: dict[str, JobStatus] = {
    "queued": "PENDING", "pending": "PENDING", "running": "RUNNING", "completed": "SUCCEEDED",
    "succeeded": "SUCCEEDED", "failed": "FAILED", "cancelled": "CANCELLED", "closed": "CLOSED"}


class Rejected(Exception):
    """A request refused before it reaches a job (axum's extractor rejections: plain text)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class JsonRejected(Rejected):
    """A refusal answered `{"error": text}`."""


# ------------------------------------------------------------------ parsing requests


def parse_submit(body: bytes, content_type: str | None) -> JobSpec:
    """A submission as axum's `Json<SubmitQueryRequest>` reads it. Parameters that cannot be bound
    are not refused here: the job fails with PARAMETER_BINDING_FAILED, as upstream's does."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise Rejected(415, "Expected request with `Content-Type: application/json`")
    try:
        value = load_json(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise Rejected(400, f"{_PARSE}{e}") from None
    except RequestError as e:
        raise Rejected(400, str(e)) from None
    if not isinstance(value, dict):
        raise Rejected(422, f"{_DESERIALIZE}invalid type: {describe_json(value)}, expected struct SubmitQueryRequest")
    if "sql" not in value:
        raise Rejected(422, f"{_DESERIALIZE}missing field `sql`")
    sql = value["sql"]
    if type(sql) is not str:
        raise Rejected(422, f"{_DESERIALIZE}sql: invalid type: {describe_json(sql)}, expected a string")
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(400, f"{_PARSE}lone surrogate in a string escape") from None
    params, params_error = None, None
    if value.get("parameters") is not None:
        try:
            params = json_parameters(value["parameters"])
        except RequestError as e:
            params_error = str(e)
    return JobSpec(sql, params, params_error, _u64_field(value, "timeout_seconds"), _u64_field(value, "maximum_size"))


def _u64_field(fields: dict[str, Any], name: str) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if type(value) is int and 0 <= value <= _U64_MAX:
        return value
    problem = f"invalid value: integer `{value}`" if type(value) is int else f"invalid type: {describe_json(value)}"
    raise Rejected(422, f"{_DESERIALIZE}{name}: {problem}, expected u64")


def _usize(text: str) -> int:
    """Rust's `usize::from_str`, with its error texts (ValueError)."""
    digits = text[1:] if text.startswith("+") else text
    if not text:
        raise ValueError("cannot parse integer from empty string")
    if not digits or not all("0" <= c <= "9" for c in digits):
        raise ValueError("invalid digit found in string")
    value = int(digits)
    if value > _U64_MAX:
        raise ValueError("number too large to fit in target type")
    return value


def _query_param(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise Rejected(400, f"{_QUERY_STRING}duplicate field `{name}`")
    return values[0] if values else None


def _usize_param(request: Request, name: str) -> int | None:
    text = _query_param(request, name)
    if text is None:
        return None
    try:
        return _usize(text)
    except ValueError as e:
        raise Rejected(400, f"{_QUERY_STRING}{name}: {e}") from None


def _job_id(request: Request) -> str:
    job_id: str = request.path_params["query_id"]
    if not is_job_id(job_id):
        raise JsonRejected(400, f"Invalid job ID format: {job_id}")
    return job_id


# ------------------------------------------------------------------ answers


def iso8601(ms: int) -> str:
    """Unix milliseconds as chrono's `to_rfc3339` writes them (fraction only when not whole)."""
    whole, millis = divmod(ms, 1000)
    text = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{millis:03d}+00:00" if millis else f"{text}+00:00"


def _error_json(view: JobView) -> dict[str, Any] | None:
    return None if view.error is None else {"error_code": view.error.error_code, "message": view.error.message}


@functools.lru_cache(maxsize=256)
def type_names(schema: pa.Schema) -> tuple[str, ...]:
    """Each column's Arrow type as arrow-rs displays it (`Int64`, `Timestamp(ns)`), asked of DataFusion."""
    if not len(schema):
        return ()
    probe = pa.RecordBatch.from_arrays([pa.nulls(1, f.type) for f in schema],
                                       schema=pa.schema([f.with_nullable(True) for f in schema]))
    sql = "SELECT " + ", ".join(f"arrow_typeof(c{i})" for i in range(len(schema))) + " FROM b"
    try:
        row = BatchSql(1, 1).run(sql, probe)[0].to_pylist()[0]
    except Exception:
        return tuple(str(f.type) for f in schema)
    return tuple(str(v) for v in row.values())


def _manifest(view: JobView) -> dict[str, Any] | None:
    result = view.result
    if result is None:
        return None
    columns = [{"name": f.name, "type_name": t, "nullable": f.nullable, "position": i}
               for i, (f, t) in enumerate(zip(result.schema, type_names(result.schema), strict=True))]
    return {"format": "ARROW_IPC", "schema": {"column_count": len(columns), "columns": columns},
            "total_row_count": result.total_row_count, "total_chunk_count": len(result.chunks)}


_ROWS_MARK = "\x00data_array\x00"


def _chunk_json(view: JobView, chunk: Chunk) -> dict[str, Any]:
    assert view.result is not None
    content: dict[str, Any] = {"chunk_index": chunk.index, "row_offset": chunk.row_offset,
                               "row_count": chunk.row_count}
    following = chunk.index + 1
    if following < len(view.result.chunks):
        content["next_chunk_index"] = following
        content["next_chunk_url"] = f"/v1/queries/{view.job_id}/results/chunks/{following}"
    content["data_array"] = _ROWS_MARK
    return content


def _with_rows(content: dict[str, Any], view: JobView, chunk: Chunk | None) -> bytes:
    """`content` as JSON, the chunk's rows (by /v1/sql's encoder) in place of its data_array mark.
    Blocking (the encoder runs DataFusion kernels): called in a worker thread."""
    text = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
    if chunk is None:
        return text
    assert view.result is not None
    encoder = JsonEncoder(view.result.schema)
    rows = [*encoder.begin(), *(part for batch in chunk.batches() for part in encoder.batch(batch)), *encoder.end()]
    # Only timestamps follow the mark, so the last occurrence is the mark (a column name may hold one).
    head, _, tail = text.rpartition(json.dumps(_ROWS_MARK).encode())
    return b"".join([head, *rows, tail])


def _query_json(view: JobView, with_first_chunk: bool) -> tuple[dict[str, Any], Chunk | None]:
    content: dict[str, Any] = {"query_id": view.job_id, "status": view.status}
    if (error := _error_json(view)) is not None:
        content["error"] = error
    if (manifest := _manifest(view)) is not None:
        content["manifest"] = manifest
    first = None
    if with_first_chunk and view.status == "SUCCEEDED" and view.result is not None and view.result.chunks:
        first = view.result.chunks[0]
        content["result"] = _chunk_json(view, first)
    content["created_at"] = iso8601(view.created_at_ms)
    for key, ms in (("started_at", view.started_at_ms), ("completed_at", view.completed_at_ms),
                    ("expires_at", view.expires_at_ms)):
        if ms is not None:
            content[key] = iso8601(ms)
    return content, first


def _json(body: bytes, status_code: int = 200) -> Response:
    return Response(body, status_code=status_code, media_type="application/json")


async def _query_response(view: JobView, with_first_chunk: bool) -> Response:
    def build() -> bytes:
        content, first = _query_json(view, with_first_chunk)
        return _with_rows(content, view, first)
    return _json(await anyio.to_thread.run_sync(build))


async def _chunk_response(view: JobView, chunk: Chunk) -> Response:
    return _json(await anyio.to_thread.run_sync(lambda: _with_rows(_chunk_json(view, chunk), view, chunk)))


def _job_error(e: JobsError) -> Response:
    status = {JobResultsExpired: 410, JobNotComplete: 409, JobsUnavailable: 503}.get(type(e), 404)
    return json_response({"error": str(e)}, status)


# ------------------------------------------------------------------ handlers


Handler = Callable[[Request, Jobs], Any]


def _endpoint(handler: Handler) -> Callable[[Request], Any]:
    """The 503 for a runtime without jobs, then the handler; refusals and job errors answered."""

    async def endpoint(request: Request) -> Response:
        jobs: Jobs | None = getattr(request.app.state, "jobs", None)
        if jobs is None:
            waiting = runtime(request).cluster is not None
            return json_response({"error": INITIALIZING if waiting else NOT_SCHEDULER}, 503)
        try:
            response: Response = await handler(request, jobs)
        except JsonRejected as e:
            return json_response({"error": str(e)}, e.status)
        except Rejected as e:
            return PlainTextResponse(str(e), status_code=e.status)
        except JobsError as e:
            return _job_error(e)
        return response

    endpoint.__name__ = handler.__name__
    return endpoint


def _owner(request: Request) -> str:
    """Whose jobs the caller may see: the API key the gate let in, else the verified client
    certificate (the results cache's principal), else everyone's `public`."""
    return principal(request, runtime(request), client_identity(request.scope)) or PUBLIC_OWNER


async def submit(request: Request, jobs: Jobs) -> Response:
    if isinstance(body := await body_or_refusal(request), Response):
        return body
    spec = parse_submit(body, request.headers.get("content-type"))
    try:
        cache = http_cache_request(request, runtime(request), client_identity(request.scope))
    except ValueError as e:  # a bad Cache-Control or Spice-Cache-Key, as /v1/sql refuses it
        return PlainTextResponse(str(e), status_code=400)
    view = jobs.submit(dataclasses.replace(spec, owner=cache.principal or PUBLIC_OWNER, cache=cache))
    content: dict[str, Any] = {"query_id": view.job_id, "status": view.status}
    if (error := _error_json(view)) is not None:
        content["error"] = error
    content["status_url"] = f"/v1/queries/{view.job_id}/status"
    content["results_url"] = f"/v1/queries/{view.job_id}/results"
    return json_response(content, 202)


async def get_query(request: Request, jobs: Jobs) -> Response:
    return await _query_response(jobs.view(_job_id(request), _owner(request)), with_first_chunk=True)


async def get_status(request: Request, jobs: Jobs) -> Response:
    view = jobs.view(_job_id(request), _owner(request))
    content: dict[str, Any] = {"status": view.status}
    if (error := _error_json(view)) is not None:
        content["error"] = error
    return json_response(content)


def _unfinished(view: JobView, running_status: int) -> Response | None:
    """Upstream's answers for the results of a job that did not succeed."""
    if view.status == "SUCCEEDED":
        return None
    status, text = {"FAILED": (500, "Query execution failed"), "CANCELLED": (410, "Query was cancelled"),
                    "CLOSED": (410, "Query results have expired")}.get(
        view.status, (running_status, f"Query not yet complete (status: {view.status})"))
    content = {"error": text, "status": view.status} if running_status == 425 else {"error": text}
    return json_response(content, status)


async def get_results(request: Request, jobs: Jobs) -> Response:
    partition = _usize_param(request, "partition") or 0
    form = _query_param(request, "format")
    job_id = _job_id(request)
    if form is not None and form.lower() != "json":
        return json_response({"error": f"Unsupported result format '{form}'. Supported format: json"}, 400)
    return await _chunk(request, jobs, job_id, partition, running_status=425)


async def get_chunk(request: Request, jobs: Jobs) -> Response:
    text = request.path_params["chunk_index"]
    try:
        index = _usize(text)
    except ValueError:
        raise Rejected(400, f"Invalid URL: Cannot parse value at index 1 with value `{text}` to a `usize`") from None
    return await _chunk(request, jobs, _job_id(request), index, running_status=409)


async def _chunk(request: Request, jobs: Jobs, job_id: str, index: int, *, running_status: int) -> Response:
    """Chunk `index` of a job's results; `running_status` answers a job not finished yet."""
    owner = _owner(request)
    if (refused := _unfinished(jobs.view(job_id, owner), running_status)) is not None:
        return refused
    view, chunk = jobs.chunk(job_id, owner, index)
    return await _chunk_response(view, chunk)


async def cancel(request: Request, jobs: Jobs) -> Response:
    if isinstance(refused := await body_or_refusal(request), Response):  # the body is ignored, as upstream
        return refused
    return await _query_response(jobs.cancel(_job_id(request), _owner(request)), with_first_chunk=False)


async def list_queries(request: Request, jobs: Jobs) -> Response:
    status_text = _query_param(request, "status")
    limit = _usize_param(request, "limit")
    status = None if status_text is None else _STATUS_FILTERS.get(status_text.lower())  # unknown: no filter
    views = jobs.list(_owner(request), status)[:100 if limit is None else limit]
    queries = [{"query_id": v.job_id, "status": v.status, "sql_preview": v.sql_preview,
                "created_at": iso8601(v.created_at_ms)} for v in views]
    return json_response({"queries": queries, "total_count": len(queries)})


async def openapi(request: Request) -> Response:
    """`/v1/openapi.json` on a scheduler: the document with these routes."""
    return json_response(OPENAPI_SCHEDULER)


def routes(name: str | None) -> list[Route]:
    """The API's routes; `name` marks them for a runtime that does not serve them (503)."""
    table: list[tuple[str, Handler, str]] = [
        ("/v1/queries", list_queries, "GET"),
        ("/v1/queries", submit, "POST"),
        ("/v1/queries/{query_id}", get_query, "GET"),
        ("/v1/queries/{query_id}/status", get_status, "GET"),
        ("/v1/queries/{query_id}/results", get_results, "GET"),
        ("/v1/queries/{query_id}/results/chunks/{chunk_index}", get_chunk, "GET"),
        ("/v1/queries/{query_id}/cancel", cancel, "POST"),
    ]
    return [Route(path, _endpoint(handler), methods=[method], name=name) for path, handler, method in table]


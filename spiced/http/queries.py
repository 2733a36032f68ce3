"""`GET /v1/sql/active` and `POST /v1/sql/{query_id}/cancel`: the synchronous queries running in this
process (spiced.queries), with upstream's shapes and texts. Both sit behind the same gates as
`/v1/sql` (API key when configured; a verified client certificate under client_auth_mode=required).

    GET /v1/sql/active → 200 {"queries": [{"query_id", "protocol", "sql_preview", "started_at_ms"}, …],
                              "total_count": N}                       (newest first)
    POST /v1/sql/{id}/cancel → 200 {"query_id": "<id>", "status": "cancelled"}
                             → 400 {"error": "Invalid query_id (expected UUID): <parse error>"}
                               (the parse error in the words of Rust's uuid crate, as upstream)
                             → 404 {"error": "Active SQL query '<id>' not found"}

A 200 means the query was told to stop; it ends on its own thread within about a second, and its
client gets HTTP 499 / gRPC CANCELLED `Query <id> was cancelled` (or a cut stream, when results
had started to go out). A request body, if any, is ignored.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ..queries import parse_query_id
from .body import body_or_refusal
from .routes import json_response, runtime


async def active(request: Request) -> Response:
    queries = runtime(request).queries.running()
    return json_response({"queries": [q.as_json() for q in queries], "total_count": len(queries)})


async def cancel(request: Request) -> Response:
    text = request.path_params["query_id"]
    if isinstance(body := await body_or_refusal(request), Response):
        return body
    try:
        query_id = parse_query_id(text)
    except ValueError as e:
        return json_response({"error": f"Invalid query_id (expected UUID): {e}"}, 400)
    if not runtime(request).queries.cancel(query_id):
        return json_response({"error": f"Active SQL query '{query_id}' not found"}, 404)
    return json_response({"query_id": str(query_id), "status": "cancelled"})

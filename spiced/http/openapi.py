"""The OpenAPI 3 description of the HTTP API, served at `GET /v1/openapi.json` (and used by
schemathesis to probe every route)."""

from __future__ import annotations

from typing import Any

_TEXT = {"text/plain": {"schema": {"type": "string"}}}
_MESSAGE = {"application/json": {"schema": {
    "type": "object", "required": ["message"], "properties": {"message": {"type": "string"}}}}}
_UNAUTHORIZED = {"description": "Missing or invalid API key (`Unauthorized`), or no verified client certificate "
                                "under client_auth_mode=required (JSON message)"}
_FORMAT = {"name": "format", "in": "query", "required": False,
           "schema": {"type": "string", "enum": ["json", "csv"], "default": "json"}}


def _list_of(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "object", "properties": properties, "required": required}}


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "Dataset name (matched case-insensitively)"}

_PARAMETER = {"nullable": True, "anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
_SQL_REQUEST: dict[str, Any] = {"type": "object", "required": ["sql"], "properties": {
    "sql": {"type": "string"},
    "parameters": {"anyOf": [{"type": "array", "items": _PARAMETER},
                             {"type": "object", "additionalProperties": _PARAMETER}]}}}
_ROWS = {"type": "array", "items": {"type": "object"}}
_ENVELOPE = {"type": "object", "required": ["row_count", "schema", "data"], "properties": {
    "row_count": {"type": "integer", "minimum": 0},
    "schema": {"type": "object",
               "description": "The Arrow schema as arrow-rs serializes it; `{}` when there are no rows"},
    "data": _ROWS}}

_DATASET = {"from": {"type": "string"}, "name": {"type": "string"}, "replication_enabled": {"type": "boolean"},
            "acceleration_enabled": {"type": "boolean"},
            "status": {"type": "string",
                       "enum": ["Initializing", "Ready", "Disabled", "Error", "Refreshing", "ShuttingDown"]},
            "error": {"type": "string"}}
_ACTIVE_QUERY = {"query_id": {"type": "string", "format": "uuid"},
                 "protocol": {"type": "string", "enum": ["http", "flight", "flightsql"]},
                 "sql_preview": {"type": "string", "description": "The SQL, cut at 1000 characters (then `…`)"},
                 "started_at_ms": {"type": "integer", "description": "Unix milliseconds"}}
_ERROR = {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}
_ENDPOINT = {"name": {"type": "string", "enum": ["http", "flight", "metrics"]}, "endpoint": {"type": "string"},
             "status": {"type": "string", "enum": ["Initializing", "Ready", "Disabled", "Error", "Refreshing"]}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Spice runtime HTTP API (spiced for Python)", "version": "1"},
    "paths": {
        "/health": {"get": {"summary": "Liveness", "security": [],
                            "responses": {"200": {"description": "`ok` and a newline", "content": _TEXT}}}},
        "/v1/ready": {"get": {"summary": "Readiness: every dataset has loaded", "security": [], "responses": {
            "200": {"description": "`ready`", "content": _TEXT},
            "503": {"description": "`not ready`", "content": _TEXT}}}},
        "/metrics": {"get": {"summary": "Prometheus text exposition", "responses": {
            "200": {"description": "Prometheus text", "content": _TEXT}, "401": _UNAUTHORIZED}}},
        "/v1/sql": {"post": {
            "summary": "Run one read-only SQL statement",
            "description": "The body is the SQL text; with `Content-Type: application/json` it is "
                           "`{\"sql\", \"parameters\"}`: an array binds `$1`, `$2`…, an object binds `$name` and "
                           "`:name` (integer → Int64, other number → Float64, string → Utf8, bool → Boolean, "
                           "null → Utf8 null).",
            "requestBody": {"required": True, "content": {
                "text/plain": {"schema": {"type": "string", "maxLength": 2097152}},
                "application/json": {"schema": _SQL_REQUEST}}},
            "parameters": [{"name": "Accept", "in": "header", "required": False, "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "Rows: a JSON array of objects (null fields omitted), CSV, a text table, "
                                       "an Arrow IPC stream, or the rows with their Arrow schema, by Accept",
                        "content": {"application/json": {"schema": _ROWS},
                                    "text/csv": {"schema": {"type": "string"}},
                                    "text/plain": {"schema": {"type": "string"}},
                                    "application/vnd.apache.arrow.stream": {"schema": {"type": "string",
                                                                                       "format": "binary"}},
                                    "application/vnd.spiceai.sql.v1+json": {"schema": _ENVELOPE}}},
                "400": {"description": "`Failed to execute query: <engine error>`, a body that is not UTF-8, or a JSON "
                                       "body or parameters that cannot be used",
                        "content": _TEXT},
                "401": _UNAUTHORIZED,
                "413": {"description": "Body over 2 MiB", "content": _TEXT},
                "499": {"description": "`Query <id> was cancelled` (POST /v1/sql/{query_id}/cancel)", "content": _TEXT},
                "503": {"description": "`Failed to execute query: Resources exhausted: …`", "content": _TEXT},
                "504": {"description": "Query timed out (when runtime.query.timeout is set)", "content": _TEXT}}}},
        "/v1/sql/active": {"get": {
            "summary": "The synchronous queries running now (HTTP, Flight, Flight SQL), newest first",
            "responses": {"200": {"description": "Active queries", "content": {"application/json": {"schema": {
                "type": "object", "required": ["queries", "total_count"], "properties": {
                    "queries": _list_of(_ACTIVE_QUERY, ["query_id", "protocol", "sql_preview", "started_at_ms"]),
                    "total_count": {"type": "integer", "minimum": 0}}}}}},
                "401": _UNAUTHORIZED}}},
        "/v1/sql/{query_id}/cancel": {"post": {
            "summary": "Cancel a running query (it ends within about a second; its client gets 499 or gRPC CANCELLED)",
            "parameters": [{"name": "query_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The query was told to stop", "content": {
                "application/json": {"schema": {
                    "type": "object", "required": ["query_id", "status"], "properties": {
                        "query_id": {"type": "string", "format": "uuid"},
                        "status": {"type": "string", "enum": ["cancelled"]}}}}}},
                "400": {"description": "`Invalid query_id (expected UUID): <parse error>`", "content": _ERROR},
                "401": _UNAUTHORIZED,
                "404": {"description": "`Active SQL query '<id>' not found`", "content": _ERROR},
                "413": {"description": "Body over 2 MiB", "content": _TEXT}}}},
        "/v1/datasets": {"get": {
            "summary": "Datasets of the spicepod",
            "parameters": [_FORMAT,
                           {"name": "status", "in": "query", "required": False, "schema": {"type": "boolean"}},
                           {"name": "source", "in": "query", "required": False, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "Datasets", "content": {
                "application/json": {"schema": _list_of(_DATASET, ["from", "name", "replication_enabled",
                                                                   "acceleration_enabled"])},
                "text/csv": {"schema": {"type": "string"}}}},
                "400": {"description": "Bad query string", "content": _TEXT}, "401": _UNAUTHORIZED}}},
        "/v1/datasets/{name}/acceleration/refresh": {"post": {
            "summary": "Refresh an accelerated dataset now (in the background), with optional overrides",
            "description": "The body is optional; a body that is not a JSON object is ignored (no overrides), as "
                           "upstream. `refresh_mode` `disabled` and `changes` (upstream's) are answered 400.",
            "parameters": [_NAME],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {
                    "refresh_sql": {"type": "string", "nullable": True,
                                    "description": "`SELECT <columns or *> FROM <name> [WHERE …]` for this refresh"},
                    "refresh_mode": {"type": "string", "nullable": True, "enum": ["full", "append"]},
                    "refresh_jitter_max": {"type": "string", "nullable": True, "example": "10s",
                                           "description": "Wait a random time up to this before refreshing"}}}}}},
            "responses": {"201": {"description": "`Dataset refresh triggered for <name>.`", "content": _MESSAGE},
                          "400": {"description": "Dataset not accelerated, or an override that is wrongly typed, "
                                                 "not supported or not a valid refresh_sql / duration",
                                  "content": _MESSAGE},
                          "401": _UNAUTHORIZED,
                          "404": {"description": "`Dataset <name> not found`", "content": _MESSAGE},
                          "408": {"description": "Body not received in time", "content": _TEXT},
                          "413": {"description": "Body over 2 MiB", "content": _TEXT}}}},
        "/v1/datasets/{name}/acceleration": {"patch": {
            "summary": "Set the refresh_sql of an accelerated dataset (used by every later refresh)",
            "description": "A missing or null `refresh_sql` changes nothing (200). Upstream answers a rejected "
                           "refresh_sql with 500; this runtime with 400.",
            "parameters": [_NAME],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "properties": {
                    "refresh_sql": {"type": "string", "nullable": True,
                                    "description": "`SELECT <columns or *> FROM <name> [WHERE …]`"}}}}}},
            "responses": {"200": {"description": "Updated (empty body)"},
                          "400": {"description": "Body not a JSON object, refresh_sql not a string, dataset not "
                                                 "accelerated, or `Request failed. <why the SQL was rejected>`",
                                  "content": _MESSAGE},
                          "401": _UNAUTHORIZED,
                          "404": {"description": "`Dataset <name> not found`", "content": _MESSAGE},
                          "408": {"description": "Body not received in time", "content": _TEXT},
                          "413": {"description": "Body over 2 MiB", "content": _TEXT}}}},
        "/v1/status": {"get": {
            "summary": "Listeners and their state", "parameters": [_FORMAT],
            "responses": {"200": {"description": "Endpoints", "content": {
                "application/json": {"schema": _list_of(_ENDPOINT, ["name", "endpoint", "status"])},
                "text/csv": {"schema": {"type": "string"}}}},
                "400": {"description": "Bad query string", "content": _TEXT}, "401": _UNAUTHORIZED}}},
        "/v1/spicepods": {"get": {
            "summary": "The loaded spicepod (secrets redacted)", "parameters": [_FORMAT],
            "responses": {"200": {"description": "Spicepods, root last", "content": {
                "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
                "text/csv": {"schema": {"type": "string"}}}},
                "400": {"description": "Bad query string", "content": _TEXT}, "401": _UNAUTHORIZED}}},
        "/v1/openapi.json": {"get": {"summary": "This document", "responses": {
            "200": {"description": "OpenAPI 3", "content": {"application/json": {"schema": {"type": "object"}}}},
            "401": _UNAUTHORIZED}}},
    },
    "components": {"securitySchemes": {
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "bearer": {"type": "http", "scheme": "bearer"}}},
    "security": [{}, {"apiKey": []}, {"bearer": []}],
}

# ------------------------------------------------------------------ the async query API (a scheduler's)

_JOB_STATUS = {"type": "string", "enum": ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "CLOSED"]}
_JOB_ERROR = {"type": "object", "required": ["error_code", "message"], "properties": {
    "error_code": {"type": "string", "enum": ["SCHEDULER_UNAVAILABLE", "SUBMISSION_FAILED", "EXECUTION_FAILED",
                                              "FETCHING_RESULTS_FAILED", "CANCELLED", "PARAMETER_BINDING_FAILED",
                                              "NOT_FOUND", "INTERNAL", "TIMEOUT"]},
    "message": {"type": "string"}, "sql_state": {"type": "string"}}}
_CHUNK = {"type": "object", "required": ["chunk_index", "row_offset", "row_count", "data_array"], "properties": {
    "chunk_index": {"type": "integer", "minimum": 0}, "row_offset": {"type": "integer", "minimum": 0},
    "row_count": {"type": "integer", "minimum": 0}, "next_chunk_index": {"type": "integer", "minimum": 1},
    "next_chunk_url": {"type": "string"}, "data_array": _ROWS}}
_MANIFEST = {"type": "object", "required": ["format", "schema", "total_row_count", "total_chunk_count"], "properties": {
    "format": {"type": "string", "enum": ["ARROW_IPC"]},
    "schema": {"type": "object", "required": ["column_count", "columns"], "properties": {
        "column_count": {"type": "integer", "minimum": 0},
        "columns": _list_of({"name": {"type": "string"}, "type_name": {"type": "string"},
                             "nullable": {"type": "boolean"}, "position": {"type": "integer", "minimum": 0}},
                            ["name", "type_name", "nullable", "position"])}},
    "total_row_count": {"type": "integer", "minimum": 0}, "total_chunk_count": {"type": "integer", "minimum": 0}}}
_QUERY = {"type": "object", "required": ["query_id", "status", "created_at"], "properties": {
    "query_id": {"type": "string"}, "status": _JOB_STATUS, "error": _JOB_ERROR, "manifest": _MANIFEST,
    "result": _CHUNK, "created_at": {"type": "string"}, "started_at": {"type": "string"},
    "completed_at": {"type": "string"}, "expires_at": {"type": "string"}}}
_QUERY_ID = {"name": "query_id", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "Query ID (`01ABC-DEF-456-7890AB`)"}
_BAD_ID = {"description": "`Invalid job ID format: <id>`", "content": _ERROR}
_UNKNOWN = {"description": "`Job <id> not found` (or submitted by another principal)", "content": _ERROR}
_EXPIRED = {"description": "`Job <id> results have expired`, or the query was cancelled", "content": _ERROR}
_NOT_SCHEDULER = {"description": "Not a scheduler: `Async queries API requires distributed mode …`", "content": _ERROR}
_ROWS_OF = {"200": {"description": "A result chunk", "content": {"application/json": {"schema": _CHUNK}}}}

ASYNC_QUERY_PATHS: dict[str, Any] = {
    "/v1/queries": {
        "post": {
            "summary": "Submit a SQL query for asynchronous execution on the cluster",
            "description": "Parameters bind as on /v1/sql; ones that cannot be bound fail the query with "
                           "PARAMETER_BINDING_FAILED. `timeout_seconds` (0: none) fails it with TIMEOUT; results "
                           "over `maximum_size` bytes (256 MiB when absent) fail it. Results are kept 12 hours.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["sql"], "properties": {
                    **_SQL_REQUEST["properties"],
                    "timeout_seconds": {"type": "integer", "minimum": 0, "nullable": True},
                    "maximum_size": {"type": "integer", "minimum": 0, "nullable": True}}}}}},
            "responses": {
                "202": {"description": "Accepted", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["query_id", "status", "status_url", "results_url"], "properties": {
                        "query_id": {"type": "string"}, "status": _JOB_STATUS, "error": _JOB_ERROR,
                        "status_url": {"type": "string"}, "results_url": {"type": "string"}}}}}},
                "400": {"description": "JSON that does not parse, or a bad Cache-Control", "content": _TEXT},
                "401": _UNAUTHORIZED,
                "413": {"description": "Body over 2 MiB", "content": _TEXT},
                "415": {"description": "Not `Content-Type: application/json`", "content": _TEXT},
                "422": {"description": "JSON of the wrong shape", "content": _TEXT},
                "503": _NOT_SCHEDULER}},
        "get": {
            "summary": "The caller's queries that have not expired, newest first",
            "parameters": [
                {"name": "status", "in": "query", "required": False, "schema": {"type": "string"},
                 "description": "queued|pending, running, completed|succeeded, failed, cancelled, closed "
                                "(anything else: no filter)"},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 0, "default": 100}}],
            "responses": {
                "200": {"description": "Queries", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["queries", "total_count"], "properties": {
                        "queries": _list_of({"query_id": {"type": "string"}, "status": _JOB_STATUS,
                                             "sql_preview": {"type": "string"}, "created_at": {"type": "string"}},
                                            ["query_id", "status", "sql_preview", "created_at"]),
                        "total_count": {"type": "integer", "minimum": 0}}}}}},
                "400": {"description": "Bad query string", "content": _TEXT},
                "401": _UNAUTHORIZED, "503": _NOT_SCHEDULER}}},
    "/v1/queries/{query_id}": {"get": {
        "summary": "A query's status, result manifest and first chunk", "parameters": [_QUERY_ID],
        "responses": {"200": {"description": "The query", "content": {"application/json": {"schema": _QUERY}}},
                      "400": _BAD_ID, "401": _UNAUTHORIZED, "404": _UNKNOWN, "410": _EXPIRED,
                      "503": _NOT_SCHEDULER}}},
    "/v1/queries/{query_id}/status": {"get": {
        "summary": "A query's status", "parameters": [_QUERY_ID],
        "responses": {"200": {"description": "Status", "content": {"application/json": {"schema": {
            "type": "object", "required": ["status"], "properties": {"status": _JOB_STATUS, "error": _JOB_ERROR}}}}},
            "400": _BAD_ID, "401": _UNAUTHORIZED, "404": _UNKNOWN, "410": _EXPIRED, "503": _NOT_SCHEDULER}}},
    "/v1/queries/{query_id}/results": {"get": {
        "summary": "A chunk of a finished query's results", "parameters": [
            _QUERY_ID,
            {"name": "partition", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0},
             "description": "Chunk index (default 0)"},
            {"name": "format", "in": "query", "required": False, "schema": {"type": "string", "enum": ["json"]}}],
        "responses": {**_ROWS_OF, "400": {"description": "Bad id, query string or format", "content": _ERROR},
                      "401": _UNAUTHORIZED, "404": _UNKNOWN, "410": _EXPIRED,
                      "425": {"description": "`Query not yet complete (status: RUNNING)`", "content": _ERROR},
                      "500": {"description": "`Query execution failed` (the query failed)", "content": _ERROR},
                      "503": _NOT_SCHEDULER}}},
    "/v1/queries/{query_id}/results/chunks/{chunk_index}": {"get": {
        "summary": "One chunk of a finished query's results", "parameters": [
            _QUERY_ID, {"name": "chunk_index", "in": "path", "required": True,
                        "schema": {"type": "integer", "minimum": 0}}],
        "responses": {**_ROWS_OF, "400": {"description": "Bad id or chunk index", "content": _ERROR},
                      "401": _UNAUTHORIZED, "404": {"description": "Unknown query or chunk", "content": _ERROR},
                      "409": {"description": "`Query not yet complete (status: RUNNING)`", "content": _ERROR},
                      "410": _EXPIRED,
                      "500": {"description": "`Query execution failed` (the query failed)", "content": _ERROR},
                      "503": _NOT_SCHEDULER}}},
    "/v1/queries/{query_id}/cancel": {"post": {
        "summary": "Cancel a pending or running query (a finished one is returned unchanged)",
        "parameters": [_QUERY_ID],
        "responses": {"200": {"description": "The query", "content": {"application/json": {"schema": _QUERY}}},
                      "400": _BAD_ID, "401": _UNAUTHORIZED, "404": _UNKNOWN, "410": _EXPIRED,
                      "413": {"description": "Body over 2 MiB", "content": _TEXT}, "503": _NOT_SCHEDULER}}},
}

# What a scheduler serves (`/v1/openapi.json` there); other runtimes answer these routes 503.
OPENAPI_SCHEDULER: dict[str, Any] = {**OPENAPI, "paths": {**OPENAPI["paths"], **ASYNC_QUERY_PATHS}}

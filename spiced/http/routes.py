"""The HTTP API's small routes: health, readiness, metrics, datasets, status, spicepods, refresh and
the refresh_sql PATCH.

`POST /v1/sql` lives in spiced/http/sql.py. Response texts and JSON shapes are upstream's, so
clients written against upstream read them unchanged; `?format=csv` answers `text/csv` with a
header row.
"""

from __future__ import annotations

import asyncio
import copy
import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlglot.errors import SqlglotError
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ..acceleration import check_refresh_sql
from ..config import Dataset
from ..connectors import secret_params
from ..datasets.overrides import RefreshMode, RefreshOverrides
from ..durations import seconds
from ..state import RuntimeState
from ..tls.expiry import CertificateFacts
from .body import body_or_refusal
from .openapi import OPENAPI

REDACTED = "<redacted>"


def runtime(request: Request) -> RuntimeState:
    state: RuntimeState = request.app.state.runtime
    return state


def json_response(content: Any, status_code: int = 200) -> Response:
    body = json.dumps(content, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    return Response(body, status_code=status_code, media_type="application/json")


def message(text: str, status_code: int) -> Response:
    return json_response({"message": text}, status_code)


def csv_response(header: list[str], rows: Iterable[Mapping[str, Any]]) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(row.get(k)) for k in header])
    return Response(out.getvalue(), headers={"content-type": "text/csv"})


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def wants_csv(request: Request) -> bool | Response:
    """`?format=json|csv` (default json); anything else is a 400 naming the accepted values."""
    value = request.query_params.get("format", "json")
    if value.lower() in ("json", "csv"):
        return value.lower() == "csv"
    return PlainTextResponse(
        f"Failed to deserialize query string: format: unknown variant `{value}`, expected `json` or `csv`",
        status_code=400)


def flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "false").lower() == "true"


# ------------------------------------------------------------------ always open


async def health(request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def ready(request: Request) -> Response:
    state = runtime(request)
    if state.engine.datasets.ready() and state.serving():
        return PlainTextResponse("ready")
    return PlainTextResponse("not ready", status_code=503)


async def metrics(request: Request) -> Response:
    exposition = runtime(request).metrics.exposition()
    return Response(exposition.body, headers={"content-type": exposition.content_type})


async def openapi(request: Request) -> Response:
    return json_response(OPENAPI)


# ------------------------------------------------------------------ datasets


async def datasets(request: Request) -> Response:
    state = runtime(request)
    csv_format = wants_csv(request)
    if isinstance(csv_format, Response):
        return csv_format
    with_status = flag(request, "status")
    source = request.query_params.get("source")
    states = {s.dataset.name: s for s in state.engine.datasets.states()}
    items: list[dict[str, Any]] = []
    for ds in state.engine.spicepod.datasets:
        if source is not None and ds.from_.partition(":")[0] != source:
            continue
        item: dict[str, Any] = {"from": ds.from_, "name": ds.name, "replication_enabled": False,
                                "acceleration_enabled": ds.accelerated}
        if with_status:
            current = states.get(ds.name)
            item["status"] = current.status if current is not None else "Initializing"
            if current is not None and current.error:
                item["error"] = current.error
        items.append(item)
    if csv_format:
        header = (["from", "name", "replication_enabled", "acceleration_enabled"]
                  + (["status", "error"] if with_status else []))
        return csv_response(header, items)
    return json_response(items)


def _dataset(state: RuntimeState, name: str) -> Dataset | None:
    """Matched case-insensitively, as upstream."""
    return next((d for d in state.engine.spicepod.datasets if d.name.lower() == name.lower()), None)


class BadRequest(ValueError):
    """A request field this runtime cannot act on; answered 400 with this text as `message`."""


_MODES: dict[str, RefreshMode] = {"full": "full", "append": "append"}
_MODES_NOT_SERVED = {  # upstream's other refresh modes
    "disabled": "an on-demand refresh cannot disable refreshes",
    "changes": "change data capture is not supported by this runtime",
}


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _optional_str(fields: Mapping[str, Any], key: str) -> str | None:
    value = fields.get(key)
    if value is None or isinstance(value, str):
        return value
    raise BadRequest(f"{key} must be a string or null, got {json.dumps(value)[:100]}")


def _refresh_mode(fields: Mapping[str, Any]) -> RefreshMode | None:
    mode = _optional_str(fields, "refresh_mode")
    if mode is None:
        return None
    if mode in _MODES:
        return _MODES[mode]
    if mode in _MODES_NOT_SERVED:
        raise BadRequest(f"refresh_mode {mode} is not supported: {_MODES_NOT_SERVED[mode]} (use full or append)")
    raise BadRequest(f"unknown refresh_mode {mode[:100]!r}: expected full or append")


def _jitter(fields: Mapping[str, Any]) -> float | None:
    text = _optional_str(fields, "refresh_jitter_max")
    if text is None:
        return None
    value = seconds(text)
    if value is None:
        raise BadRequest(f"refresh_jitter_max: invalid duration {text[:100]!r} (expected e.g. 10s, 500ms, 1m)")
    return value


_PARSER_ERRORS = (SqlglotError, RecursionError)  # raised by the SQL parser besides ValueError (a lone quote)


def _unparsable(sql: str, e: Exception) -> str:
    return f"cannot parse {sql[:200]!r}: {(str(e).splitlines() or [type(e).__name__])[0][:200]}"


def _checked_refresh_sql(sql: str, ds: Dataset) -> str:
    try:
        check_refresh_sql(sql, ds.name)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    except _PARSER_ERRORS as e:
        raise BadRequest(f"refresh_sql: {_unparsable(sql, e)}") from None
    return sql


def refresh_overrides(body: bytes, ds: Dataset) -> RefreshOverrides | None:
    """Upstream's `RefreshOverrides` from a POST body. A body that is not a JSON object is no overrides
    (upstream ignores a malformed body); a known field with a wrong type or value raises BadRequest."""
    fields = _json_object(body)
    if fields is None:
        return None
    sql = _optional_str(fields, "refresh_sql")
    return RefreshOverrides(refresh_sql=None if sql is None else _checked_refresh_sql(sql, ds),
                            refresh_mode=_refresh_mode(fields), refresh_jitter_max=_jitter(fields))


async def refresh(request: Request) -> Response:
    state = runtime(request)
    name = request.path_params["name"]
    ds = _dataset(state, name)
    if ds is None:
        return message(f"Dataset {name} not found", 404)
    if not ds.accelerated:
        return message(f"Dataset {name} does not have acceleration enabled", 400)
    body = await body_or_refusal(request)
    if isinstance(body, Response):
        return body
    try:
        overrides = refresh_overrides(body, ds)
    except BadRequest as e:
        return message(str(e), 400)
    task = asyncio.create_task(state.engine.datasets.refresh(ds, overrides), name=f"refresh {ds.name}")
    _REFRESHES.add(task)  # keep a reference until it finishes
    task.add_done_callback(_REFRESHES.discard)
    return message(f"Dataset refresh triggered for {name}.", 201)


_REFRESHES: set[asyncio.Task[None]] = set()


async def acceleration(request: Request) -> Response:
    """`PATCH /v1/datasets/{name}/acceleration` `{"refresh_sql": …}`: the SQL later refreshes use."""
    state = runtime(request)
    name = request.path_params["name"]
    ds = _dataset(state, name)
    if ds is None:
        return message(f"Dataset {name} not found", 404)
    body = await body_or_refusal(request)
    if isinstance(body, Response):
        return body
    fields = _json_object(body)
    if fields is None:
        return message("Failed to parse the request body as JSON: expected an object such as "
                       '{"refresh_sql": "SELECT * FROM ' + ds.name + ' WHERE …"}', 400)
    try:
        sql = _optional_str(fields, "refresh_sql")
    except BadRequest as e:
        return message(str(e), 400)
    if sql is None:
        return Response(status_code=200)  # upstream: nothing to change
    if not ds.accelerated:
        return message(f"Dataset {name} does not have acceleration enabled", 400)
    # Deviation: upstream answers a refresh_sql it rejects with 500; a bad request is a 4xx here.
    try:
        state.engine.datasets.set_refresh_sql(ds, sql)
    except ValueError as e:
        return message(f"Request failed. {e}", 400)
    except _PARSER_ERRORS as e:
        return message(f"Request failed. {_unparsable(sql, e)}", 400)
    return Response(status_code=200)


# ------------------------------------------------------------------ status and spicepods


async def status(request: Request) -> Response:
    csv_format = wants_csv(request)
    if isinstance(csv_format, Response):
        return csv_format
    state = runtime(request)
    items: list[dict[str, Any]] = [{"name": e.name, "endpoint": e.address or "N/A", "status": e.status}
                                   for e in state.endpoints.values()]
    if state.tls is not None and not csv_format:  # ours, beyond upstream: what each TLS listener serves and trusts
        tls = tls_status(state.tls.certificates())
        for item in items:
            if item["endpoint"] != "N/A":
                item["tls"] = tls
    cluster = state.cluster
    if cluster is not None:  # a scheduler's node port, then each executor it sees
        node: dict[str, Any] = {"name": "cluster", "endpoint": cluster.endpoint, "status": "Ready"}
        if cluster.tls is not None and not csv_format:
            node["tls"] = tls_status(cluster.certificates(), "cluster")
        items.append(node)
        items.extend({"name": "executor", "endpoint": e.endpoint, "status": e.status} for e in cluster.executors())
    if csv_format:
        return csv_response(["name", "endpoint", "status"], items)
    return json_response(items)


def tls_status(certificates: Sequence[CertificateFacts], scope: str = "public") -> dict[str, Any]:
    served = [c.as_json() for c in certificates if c.kind == "server"]
    return {"scope": scope, "certificate": served[0] if served else None,
            "client_ca": [c.as_json() for c in certificates if c.kind == "client_ca"]}


def redacted_spicepod(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The spicepod as loaded, without secrets: inline TLS PEM values and every API-key value."""
    pod = copy.deepcopy(dict(raw))
    runtime_section = pod.get("runtime")
    if isinstance(runtime_section, dict):
        tls = runtime_section.get("tls")
        if isinstance(tls, dict):
            for key in ("key", "certificate", "client_auth_ca"):
                if tls.get(key) is not None:
                    tls[key] = REDACTED
        if "auth" in runtime_section:
            runtime_section["auth"] = _redact_leaves(runtime_section["auth"])
    for dataset in pod.get("datasets") or []:
        if isinstance(dataset, dict) and isinstance(dataset.get("params"), dict):
            secret = secret_params(str(dataset.get("from", "")).partition(":")[0])
            dataset["params"] = {k: REDACTED if k in secret else v for k, v in dataset["params"].items()}
    return pod


def _redact_leaves(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redact_leaves(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_leaves(v) for v in value]
    return value if isinstance(value, bool) or value is None else REDACTED


async def spicepods(request: Request) -> Response:
    csv_format = wants_csv(request)
    if isinstance(csv_format, Response):
        return csv_format
    pod = runtime(request).engine.spicepod
    if csv_format:
        raw = pod.raw
        row = {"name": pod.name, "version": pod.version, "datasets_count": len(pod.datasets),
               "models_count": len(raw.get("models") or []),  # type: ignore[arg-type]
               "dependencies_count": len(raw.get("dependencies") or [])}  # type: ignore[arg-type]
        return csv_response(["name", "version", "datasets_count", "models_count", "dependencies_count"], [row])
    return json_response([redacted_spicepod(pod.raw)])

"""Per-request metrics (`http_requests`, `http_requests_duration_ms`) and the access log.

Outermost middleware, so requests the gates refuse are counted and logged too. The `path`
label is the route template (`/v1/datasets/{name}/acceleration/refresh`), never the raw path,
so label cardinality stays bounded; requests that match no route are labelled `unmatched`.

Access log: one line per request on `runtime::http`, written once the response has gone out —
at INFO when the access log is on (`--access-log`, or `runtime.access_log: true` in the
spicepod), else at DEBUG (`-v`):

    INFO runtime::http: POST /v1/sql 200 1.84ms client_subject="CN=client" client_fingerprint=1f2e…
    INFO runtime::http: GET /v1/sql/active 200 0.41ms client=anonymous

The raw path is logged (never the query string or any header, so no API key).
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..state import RuntimeState
from .gates import client_identity

log = logging.getLogger("runtime.http")


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestObserver:
    def __init__(self, app: ASGIApp, state: RuntimeState) -> None:
        self.app = app
        self.metrics = state.metrics
        self.level = logging.INFO if state.config.access_log else logging.DEBUG

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app raises before responding, the server answers 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            labels = {"method": scope["method"], "path": route_template(scope), "status": str(status)}
            self.metrics.http_requests.add(1, labels)
            self.metrics.http_duration.record(elapsed_ms, labels)
            if log.isEnabledFor(self.level):
                identity = client_identity(scope)
                log.log(self.level, "%s %s %d %.2fms %s", scope["method"], scope["path"], status, elapsed_ms,
                        identity.log_fields() if identity is not None else "client=anonymous")

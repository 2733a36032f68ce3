"""The Starlette applications: the HTTP API (`create_app`) and the `--metrics` listener
(`create_metrics_app`).

Request path through the API: BodyDrain (keep-alive safety) → RequestObserver (metrics, access
log) → ClientCertGate → ApiKeyGate → route. `/v1/sql` is in spiced/http/sql.py, the active-query
routes (`/v1/sql/active`, `/v1/sql/{query_id}/cancel`) in spiced/http/queries.py, the rest in
spiced/http/routes.py, the async query API (`/v1/queries…`, a scheduler's) in
spiced/http/async_queries.py. Unknown paths answer 404 and known paths with the wrong method 405
with an `Allow` header, both with an empty body. Upstream endpoints this runtime does not serve yet
(NSQL, search, which the official SDKs call) answer 404 with a JSON body saying so; the async query
API on a runtime that is not a scheduler answers 503, as upstream.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ..jobs import Jobs
from ..state import RuntimeState
from . import async_queries, queries, routes
from .drain import BodyDrain
from .gates import ApiKeyGate, ClientCertGate
from .observe import RequestObserver
from .sql import sql_endpoint

NOT_SERVED_ROUTE = "not_served"
NOT_SERVED = {  # upstream endpoint → what it needs; answered 404 {"message": ...} (the SDKs show it)
    "/v1/nsql": "natural-language queries need models",
    "/v1/search": "search needs embeddings",
}


def _not_served(path: str, why: str) -> Route:
    async def answer(request: Request) -> Response:
        return routes.json_response(
            {"message": f"{request.method} {request.url.path} is not available in this runtime: {why}"}, 404)

    return Route(path, answer, methods=["GET", "POST"], name=NOT_SERVED_ROUTE)  # left out of the OpenAPI doc


async def _empty_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return Response(status_code=exc.status_code, headers=exc.headers)


def _starlette(route_list: list[Route], middleware: list[Middleware], state: RuntimeState) -> Starlette:
    app = Starlette(routes=route_list, middleware=[Middleware(BodyDrain), *middleware],
                    exception_handlers={HTTPException: _empty_error})
    app.router.redirect_slashes = False  # `/health/` is an unknown path, not a redirect
    app.state.runtime = state
    return app


def create_app(state: RuntimeState, jobs: Jobs | None = None) -> Starlette:
    """`jobs`: a scheduler's async queries (spiced.runtime owns them); without, /v1/queries answers 503."""
    app = _starlette(
        [
            Route("/health", routes.health, methods=["GET"]),
            Route("/v1/ready", routes.ready, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
            Route("/v1/sql", sql_endpoint, methods=["POST"]),
            Route("/v1/sql/active", queries.active, methods=["GET"]),
            Route("/v1/sql/{query_id}/cancel", queries.cancel, methods=["POST"]),
            Route("/v1/datasets", routes.datasets, methods=["GET"]),
            Route("/v1/datasets/{name}/acceleration/refresh", routes.refresh, methods=["POST"]),
            Route("/v1/datasets/{name}/acceleration", routes.acceleration, methods=["PATCH"]),
            Route("/v1/status", routes.status, methods=["GET"]),
            Route("/v1/spicepods", routes.spicepods, methods=["GET"]),
            Route("/v1/openapi.json", routes.openapi if jobs is None else async_queries.openapi, methods=["GET"]),
            *async_queries.routes(None if jobs is not None else NOT_SERVED_ROUTE),
            *(_not_served(path, why) for path, why in NOT_SERVED.items()),
        ],
        [Middleware(RequestObserver, state=state), Middleware(ClientCertGate, state=state),
         Middleware(ApiKeyGate, state=state)],
        state,
    )
    app.state.jobs = jobs
    return app


async def _metrics_health(request: Request) -> Response:
    return PlainTextResponse("OK")


def create_metrics_app(state: RuntimeState) -> Starlette:
    """`/metrics` and `/health` only; never gated: probes and scrapers present no client certificate
    and no API key, as upstream."""
    return _starlette(
        [Route("/metrics", routes.metrics, methods=["GET"]), Route("/health", _metrics_health, methods=["GET"])],
        [],
        state,
    )

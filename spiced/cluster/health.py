"""An executor's HTTP listeners: health and readiness for probes (upstream's executor serves no SQL),
and with `--metrics` the Prometheus exposition."""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ..metrics import Metrics


def health_app(ready: Callable[[], bool]) -> Starlette:
    """`/health` while the process serves; `/v1/ready` once the executor has joined with its spicepod."""

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readiness(request: Request) -> Response:
        if ready():
            return PlainTextResponse("ready")
        return PlainTextResponse("not ready", status_code=503)

    return Starlette(routes=[Route("/health", health, methods=["GET"]),
                             Route("/v1/ready", readiness, methods=["GET"])])


def metrics_app(metrics: Metrics) -> Starlette:
    async def exposition(request: Request) -> Response:
        body = metrics.exposition()
        return Response(body.body, headers={"content-type": body.content_type})

    async def health(request: Request) -> Response:
        return PlainTextResponse("OK")

    return Starlette(routes=[Route("/metrics", exposition, methods=["GET"]), Route("/health", health, methods=["GET"])])

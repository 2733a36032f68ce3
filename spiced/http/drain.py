"""Finish reading a request body the route did not read before its response goes out (HTTP/1.1).

Most routes never read the body (`GET /v1/datasets` sent with one is legal HTTP). When Hypercorn
completes a response while the body is still arriving, it closes the connection without having
said `Connection: close`, and a keep-alive client's next request on it fails with "server
disconnected". So when the response starts, the rest of a small body (Content-Length up to
DRAIN_BYTES) is read and dropped, for at most DRAIN_SECONDS; a body that is larger, chunked or
late gets `Connection: close` on the response instead, so the client knows not to reuse it.
"""

from __future__ import annotations

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DRAIN_BYTES = 64 * 1024
DRAIN_SECONDS = 1.0


class BodyDrain:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" and scope.get("http_version") == "1.1" else None
        if headers is None or not _has_body(headers):
            await self.app(scope, receive, send)
            return
        done = False

        async def tracking_receive() -> Message:
            nonlocal done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        async def draining_send(message: Message) -> None:
            nonlocal done
            if message["type"] == "http.response.start" and not done:
                done = await _drain(receive, _content_length(headers))
                if not done:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, tracking_receive, draining_send)


async def _drain(receive: Receive, length: int | None) -> bool:
    """Read and drop the rest of the body; whether it ended in time."""
    if length is None or length > DRAIN_BYTES:
        return False
    with anyio.move_on_after(DRAIN_SECONDS):
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return False  # the client is gone; the connection closes anyway
            if not message.get("more_body", False):
                return True
    return False


def _has_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "").strip() not in ("", "0")


def _content_length(headers: Headers) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None

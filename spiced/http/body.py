"""Request bodies with a size cap (2 MiB, checked from Content-Length first and while reading)
and a time cap (a client that withholds or trickles its body gets 408, not a held worker).

A body over the cap is never kept. The rest of it is read and dropped (up to 16 MiB more, for
at most 5 s) before the 413 goes out: a server that answers and closes while the client is
still sending makes the kernel reset the connection, and many clients (httpx among them) then
lose the answer. A body declared bigger than that is refused at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

MAX_BODY_BYTES = 2 * 1024 * 1024
DISCARD_BYTES = 16 * 1024 * 1024
DISCARD_SECONDS = 5.0
BODY_SECONDS = 10.0


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


async def read_body(request: Request, limit: int = MAX_BODY_BYTES, seconds: float = BODY_SECONDS) -> bytes:
    """The whole body; BodyTooLarge once it is known to exceed `limit`, BodyTooSlow past `seconds`."""
    with anyio.move_on_after(seconds):
        return await _read_capped(request, limit)
    raise BodyTooSlow


async def _read_capped(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    declared = int(length) if length is not None and length.strip().isdigit() else None
    if declared is not None and declared > limit + DISCARD_BYTES:
        raise BodyTooLarge
    chunks = request.stream()
    if declared is None or declared <= limit:
        parts: list[bytes] = []
        size = 0
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                break
            parts.append(chunk)
        else:
            return b"".join(parts)
    await _discard(chunks)
    raise BodyTooLarge


async def _discard(chunks: AsyncIterator[bytes]) -> None:
    budget = DISCARD_BYTES
    with anyio.move_on_after(DISCARD_SECONDS):
        async for chunk in chunks:
            budget -= len(chunk)
            if budget < 0:
                return


def too_slow() -> PlainTextResponse:
    return PlainTextResponse(f"Request body not received within {BODY_SECONDS:g} s", status_code=408,
                             headers={"connection": "close"})


def too_large() -> PlainTextResponse:
    return PlainTextResponse("Failed to buffer the request body: length limit exceeded", status_code=413)


async def body_or_refusal(request: Request) -> bytes | Response:
    """The body, or the answer to a body too large or too slow to read."""
    try:
        return await read_body(request)
    except BodyTooLarge:
        return too_large()
    except BodyTooSlow:
        return too_slow()

"""Serve a folder over HTTP(S) for tests/objectstores.py (`python -m tests.http_launcher ...`).

Starlette's StaticFiles does the file serving (GET/HEAD, single and multiple `Range`s, 416, ETag/Last-Modified;
anything else, e.g. WebDAV's PROPFIND, gets 405) and Hypercorn the HTTP/1.1, h2 and TLS. This module only adds:
  - optional Basic auth (401 + `WWW-Authenticate` when the header is missing or wrong);
  - one JSON line per request (method, path, Range, whether an Authorization header came, status), written before
    the response starts, so a test that has its answer can read every request that produced it;
  - port 0 bound here and printed, and an exit when stdin closes (the parent is gone) or on SIGTERM.
It runs as its own process because DataFusion in the test process may hold the GIL while it waits on I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import secrets
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, cast

from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

READY = "http_launcher listening on port "


class BasicAuth:
    """ASGI middleware: only requests with `Authorization: Basic base64(user:password)` reach the app."""

    def __init__(self, app: ASGIApp, user: str, password: str) -> None:
        self.app = app
        self.expected = f"{user}:{password}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"www-authenticate", b'Basic realm="objectstores", charset="UTF-8"'),
            (b"content-type", b"text/plain"), (b"content-length", b"12")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else b"Unauthorized"})

    def _allowed(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            return False
        return secrets.compare_digest(given, self.expected)


class RequestLog:
    """ASGI middleware: appends one JSON line per request to `path` when its response starts."""

    def __init__(self, app: ASGIApp, path: Path) -> None:
        self.app = app
        self.file = path.open("a", encoding="utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def logging_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self._write(scope, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        except BaseException:
            if not started:  # the app raised: Hypercorn answers 500
                self._write(scope, 500)
            raise

    def _write(self, scope: Scope, status: int) -> None:
        headers = dict(scope["headers"])
        record = {
            "method": scope["method"],
            "path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "range": headers[b"range"].decode("latin-1") if b"range" in headers else None,
            "authorization": b"authorization" in headers,
            "http_version": scope["http_version"],
            "status": status,
        }
        self.file.write(json.dumps(record) + "\n")  # one event loop: no lock needed
        self.file.flush()


def build_app(root: Path, request_log: Path, basic_auth: tuple[str, str] | None) -> ASGIApp:
    # Mounted in an app, not bare: StaticFiles raises HTTPException (405 for PROPFIND...) for the app to render.
    app: ASGIApp = Starlette(routes=[Mount("/", app=StaticFiles(directory=root))])
    if basic_auth:
        app = BasicAuth(app, *basic_auth)
    return RequestLog(app, request_log)


def make_config(fd: int, tls: tuple[str, str] | None) -> Config:
    """Hypercorn adopts the already-listening socket `fd` (`fd://`), TLS on it when `tls` is given."""
    config = Config()
    config.bind = [f"fd://{fd}"]
    if tls:
        config.certfile, config.keyfile = tls
    config.graceful_timeout = 1.0
    config.accesslog = None
    return config


async def run(app: ASGIApp, config: Config) -> None:
    """Serve until SIGTERM/SIGINT or until stdin closes."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def stop_at_stdin_eof() -> None:
        sys.stdin.read()  # returns when the parent closes its end, or dies
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=stop_at_stdin_eof, daemon=True).start()
    # cast: Starlette's ASGI types and Hypercorn's do not unify, though both are plain ASGI
    await serve(cast(Any, app), config, shutdown_trigger=stop.wait, mode="asgi")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--request-log", type=Path, required=True)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve HTTPS with this PEM pair")
    parser.add_argument("--basic-auth", nargs=2, metavar=("USER", "PASSWORD"))
    args: Any = parser.parse_args(argv)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    app = build_app(args.root, args.request_log, tuple(args.basic_auth) if args.basic_auth else None)
    config = make_config(sock.detach(), tuple(args.tls) if args.tls else None)
    print(READY + str(port), flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stdout carried only that line: the parent closes it
    asyncio.run(run(app, config))


if __name__ == "__main__":
    main()

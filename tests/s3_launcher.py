"""Run moto's S3 in its own process for tests/objectstores.py (`python -m tests.s3_launcher ...`).

Why a launcher instead of `python -m moto.server`:
  - it binds port 0 itself and prints the port it got, so there is no race for a "free" port;
  - a WSGI middleware writes one JSON line per request (method, path, query, Range, whether and with which key
    the request was signed, status) *before* the response goes out, so a test that has its answer can read every
    request that produced it: no sleeps, no parsing of werkzeug's coloured access log;
  - `--auth` turns on moto's IAM enforcement for one fixed access key (moto otherwise accepts any credentials);
  - unsigned requests get what a bucket policy grants to everyone and nothing else, in both modes (moto alone
    lets anyone list any bucket, and answers 500 to unsigned requests once IAM enforcement is on);
  - it exits when its standard input closes, so it cannot outlive a test process that was killed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server

ADMIN_HEADER = "X-Objectstores-Admin"  # requests from the test library itself: served, not logged
READY = "s3_launcher listening on port "
ACCOUNT_ID = "123456789012"  # moto's default account: where unsigned requests and unknown keys land
ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                 b"<Message>Access Denied</Message></Error>")

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_anonymous = threading.local()  # .allowed: this request thread carries an unsigned request the gate let through


def _access_key(authorization: str) -> str | None:
    """The key id of a SigV4 `Authorization` header (`AWS4-HMAC-SHA256 Credential=KEY/date/...`)."""
    _, found, rest = authorization.partition("Credential=")
    return rest.split("/", 1)[0] if found else None


def _signed(environ: dict[str, Any]) -> bool:
    return bool(environ.get("HTTP_AUTHORIZATION")) or "X-Amz-Signature=" in environ.get("QUERY_STRING", "")


class RequestLog:
    """WSGI middleware: appends one JSON line per request to `path`, flushed before the response starts."""

    def __init__(self, app: WsgiApp, path: Path) -> None:
        self.app = app
        self.file = path.open("a", encoding="utf-8")
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("HTTP_" + ADMIN_HEADER.upper().replace("-", "_")):
            return self.app(environ, start_response)
        started = False

        def logging_start_response(status: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            nonlocal started
            if not started:
                started = True
                self._write(environ, int(status.split(" ", 1)[0]))
            return start_response(status, headers, *args)

        try:
            return self.app(environ, logging_start_response)
        except BaseException:
            if not started:  # moto raised: werkzeug answers 500 (the traceback goes to stderr)
                self._write(environ, 500)
            raise

    def _write(self, environ: dict[str, Any], status: int) -> None:
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        record = {
            "method": environ["REQUEST_METHOD"],
            "path": environ.get("RAW_URI", "").split("?", 1)[0] or environ.get("PATH_INFO", ""),
            "query": environ.get("QUERY_STRING", ""),
            "range": environ.get("HTTP_RANGE"),
            "authorization": _signed(environ),
            "access_key": _access_key(authorization),
            "status": status,
        }
        with self.lock:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


class AnonymousGate:
    """WSGI middleware: an unsigned request gets only what its bucket's policy grants to everyone.

    GET/HEAD of an object needs `s3:GetObject`, GET/HEAD of a bucket `s3:ListBucket` (as on AWS); anything else
    unsigned is refused. A request let through skips moto's IAM check (`skip_iam_for_allowed_anonymous`), which would
    otherwise fail on the missing Authorization header. Path-style addressing only (`/bucket/key`).
    """

    def __init__(self, app: WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if _signed(environ) or environ.get("PATH_INFO", "/").startswith("/moto-api"):
            _anonymous.allowed = False
            return self.app(environ, start_response)
        if not self._granted(environ):
            start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                             ("Content-Length", str(len(ACCESS_DENIED)))])
            return [] if environ["REQUEST_METHOD"] == "HEAD" else [ACCESS_DENIED]
        _anonymous.allowed = True
        return self.app(environ, start_response)

    @staticmethod
    def _granted(environ: dict[str, Any]) -> bool:
        from moto.iam.access_control import PermissionResult
        from moto.s3.models import s3_backends

        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            return False
        bucket_name, _, key = environ.get("PATH_INFO", "/").lstrip("/").partition("/")
        bucket = s3_backends[ACCOUNT_ID]["aws"].buckets.get(bucket_name)
        if bucket is None:
            return True  # let moto answer NoSuchBucket
        action, resource = ("s3:GetObject", f"arn:aws:s3:::{bucket_name}/{key}") if key else \
            ("s3:ListBucket", f"arn:aws:s3:::{bucket_name}")
        return bucket.get_permission(action, resource) == PermissionResult.PERMITTED


def skip_iam_for_allowed_anonymous() -> None:
    """moto's IAM check, skipped for the unsigned requests `AnonymousGate` already judged by bucket policy."""
    from moto.core.authorization import ActionAuthenticatorMixin

    original = ActionAuthenticatorMixin._authenticate_and_authorize_action

    def checked(self: ActionAuthenticatorMixin, iam_request_cls: type, resource: str = "*") -> None:
        if not getattr(_anonymous, "allowed", False):
            original(self, iam_request_cls, resource)

    ActionAuthenticatorMixin._authenticate_and_authorize_action = checked  # type: ignore[method-assign]


def enforce_iam(key: str, secret: str) -> None:
    """Make moto check every signed S3 request's SigV4 signature against one IAM user holding `key`/`secret`.

    moto only verifies signatures once `settings.INITIAL_NO_AUTH_ACTION_COUNT` actions have passed (default:
    never). The user and its access key are made in this process's IAM backend directly, then given fixed
    values, because the IAM API would hand out random ones. A wrong secret then gets 403 SignatureDoesNotMatch,
    an unknown key 403 InvalidAccessKeyId.
    """
    from moto import settings
    from moto.iam.models import iam_backends

    iam = iam_backends[ACCOUNT_ID]["aws"]
    iam.create_user(region_name="us-east-1", user_name="objectstores-test")
    access = iam.create_access_key(user_name="objectstores-test")
    iam.access_keys.pop(access.physical_resource_id)
    access.access_key_id, access.secret_access_key = key, secret
    iam.access_keys[access.physical_resource_id] = access
    iam.put_user_policy("objectstores-test", "all-s3", json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }))
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0


def build_app(request_log: Path) -> WsgiApp:
    """moto's multi-service dispatcher (as `python -m moto.server` builds it), S3 loaded now, not on first call."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    app = DomainDispatcherApplication(create_backend_app)
    app.get_application({"PATH_INFO": "/", "HTTP_HOST": "s3.amazonaws.com"})  # warm up: imports the S3 backend
    skip_iam_for_allowed_anonymous()
    return RequestLog(AnonymousGate(app), request_log)


def announce(port: int) -> None:
    """The one line the parent waits for; later prints (moto has some) go to stderr, so stdout can close."""
    print(READY + str(port), flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def _shutdown_at_stdin_eof(server: BaseWSGIServer) -> None:
    sys.stdin.read()  # returns when the parent closes its end, or dies
    server.shutdown()


def serve(server: BaseWSGIServer) -> None:
    """Serve until SIGTERM/SIGINT or until stdin closes (the parent is gone)."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=_shutdown_at_stdin_eof, args=(server,), daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--request-log", type=Path, required=True)
    parser.add_argument("--auth", nargs=2, metavar=("KEY", "SECRET"), help="verify signatures for this key only")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve HTTPS with this PEM pair")
    args = parser.parse_args(argv)

    from moto.moto_server.werkzeug_app import MotoRequestHandler

    app = build_app(args.request_log)
    if args.auth:
        enforce_iam(*args.auth)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler,
                         ssl_context=tuple(args.tls) if args.tls else None)
    announce(server.server_port)
    serve(server)


if __name__ == "__main__":
    main()

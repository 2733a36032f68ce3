"""Who may use the HTTP API: the client-certificate gate, then the API-key gate (ASGI middleware).

1. Client certificate. The verified identity of the connection comes from the server
   (`spiced.http.tls_info.current_tls_info()`); it is put into `scope["extensions"]["tls"]` (the
   ASGI TLS extension) and `scope["spiced.client_identity"]`. Under `client_auth_mode=required`,
   a request without one answers 401 JSON on every route but `/health`, `/v1/ready`, `/metrics`.
2. API keys, read as upstream reads them: `X-API-Key`, else `Authorization: Bearer`; 401
   `Unauthorized` otherwise. `/health` and `/v1/ready` are open.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from ..auth import bearer_token
from ..identity import ClientIdentity
from ..state import RuntimeState
from .tls_info import current_tls_info

CERT_EXEMPT = frozenset({"/health", "/v1/ready", "/metrics"})
KEY_EXEMPT = frozenset({"/health", "/v1/ready"})
CERT_REQUIRED_BODY = b'{"message":"Valid client TLS certificate required"}'
IDENTITY_KEY = "spiced.client_identity"


def client_identity(scope: Scope) -> ClientIdentity | None:
    """The verified client identity the certificate gate recorded for this request."""
    identity = scope.get(IDENTITY_KEY)
    return identity if isinstance(identity, ClientIdentity) else None


async def _respond(send: Send, status: int, body: bytes, content_type: bytes | None) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ClientCertGate:
    def __init__(self, app: ASGIApp, state: RuntimeState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = current_tls_info()
        identity = info.identity if info is not None else None
        scope[IDENTITY_KEY] = identity
        if info is not None:
            extensions = scope.get("extensions") or {}
            extensions["tls"] = info.asgi_extension()
            scope["extensions"] = extensions
        if self.state.tls is not None:
            counter = self.state.metrics.client_cert_requests if identity else self.state.metrics.anonymous_requests
            counter.add(1)
        if self.state.client_auth_mode == "required" and identity is None and scope["path"] not in CERT_EXEMPT:
            await _respond(send, 401, CERT_REQUIRED_BODY, b"application/json")
            return
        await self.app(scope, receive, send)


class ApiKeyGate:
    def __init__(self, app: ASGIApp, state: RuntimeState) -> None:
        self.app = app
        self.keys = state.api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or scope["path"] in KEY_EXEMPT:
            await self.app(scope, receive, send)
            return
        api_key: str | None = None
        authorization: str | None = None
        for name, value in scope["headers"]:
            if name == b"x-api-key" and api_key is None:
                api_key = value.decode("latin-1")
            elif name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
        candidate = api_key if api_key is not None else bearer_token(authorization)
        if not self.keys.accepts(candidate):
            await _respond(send, 401, b"Unauthorized", None)
            return
        await self.app(scope, receive, send)

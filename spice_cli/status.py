"""`spice status`, `spice datasets` and `spice version`: the runtime's HTTP API read with httpx
(`send` is also what `spice refresh` posts with).

TLS: `--tls-root-certificate-file` trusts a CA and switches the default base URL to https; the client
certificate flags let the commands work when the runtime requires mTLS; `--api-key` is sent as X-API-Key.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx

from spice_cli import CliError, __version__
from spice_cli.render import plain_table

DEFAULT_HTTP = "http://127.0.0.1:8090"
DEFAULT_HTTPS = "https://127.0.0.1:8090"
TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class HttpSettings:
    endpoint: str | None = None
    tls_root_certificate_file: Path | None = None
    client_certificate_file: Path | None = None
    client_key_file: Path | None = None
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        if self.endpoint:
            return self.endpoint.rstrip("/")
        return DEFAULT_HTTPS if self.tls_root_certificate_file else DEFAULT_HTTP


def _ssl_context(s: HttpSettings) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(s.tls_root_certificate_file) if s.tls_root_certificate_file
                                         else None)
    except (OSError, ssl.SSLError) as e:
        raise CliError(f"Failed to read TLS root certificate from '{s.tls_root_certificate_file}': "
                       f"{getattr(e, 'strerror', None) or e}. Verify the file path and permissions.") from None
    if s.client_certificate_file and s.client_key_file:
        try:
            ctx.load_cert_chain(s.client_certificate_file, s.client_key_file)
        except (OSError, ssl.SSLError) as e:
            raise CliError(f"Failed to load client TLS certificate '{s.client_certificate_file}' and key "
                           f"'{s.client_key_file}': {getattr(e, 'strerror', None) or e}") from None
    return ctx


def _is_tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def send(s: HttpSettings, method: str, path: str, body: Any = None) -> httpx.Response:
    """One request to the runtime (`body`, when given, as JSON); a connection or TLS failure becomes
    one CliError line. Any HTTP status is returned."""
    base = s.base_url
    headers = {"user-agent": f"spice-cli/{__version__}"}
    if s.api_key:
        headers["x-api-key"] = s.api_key
    try:
        with httpx.Client(verify=_ssl_context(s), headers=headers, timeout=TIMEOUT) as client:
            return client.request(method, base + path, json=body)
    except httpx.ConnectError as e:
        if _is_tls_failure(e):
            raise CliError(f"ERROR TLS handshake with {base} failed: {e}") from None
        raise CliError(f"the Spice runtime is unavailable at {base}. Is it running?") from None
    except httpx.HTTPError as e:
        raise CliError(f"ERROR request to {base}{path} failed: {e or type(e).__name__}") from None


def get_json(s: HttpSettings, path: str) -> Any:
    """GET `path` from the runtime; every failure becomes one CliError line."""
    response = send(s, "GET", path)
    if response.status_code != 200:
        detail = f": {message_of(response)}" if response.content else ""
        raise CliError(f"ERROR GET {path} returned {response.status_code} {phrase_of(response)}{detail}")
    try:
        return response.json()
    except ValueError:
        raise CliError(f"ERROR GET {path} returned a body that is not JSON") from None


def phrase_of(response: httpx.Response) -> str:
    # HTTP/2 has no reason phrase on the wire; name the status ourselves.
    return response.reason_phrase or _phrase(response.status_code)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def message_of(response: httpx.Response) -> str:
    """The `message` of a JSON error body, else the body as text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()
    return str(body.get("message", json.dumps(body))) if isinstance(body, dict) else json.dumps(body)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def status_table(s: HttpSettings) -> str:
    entries = get_json(s, "/v1/status")
    table = plain_table(["name", "endpoint", "status"],
                        [[_text(e.get(k)) for k in ("name", "endpoint", "status")] for e in entries])
    scopes: dict[str, dict[str, Any]] = {}  # public listeners share one; a scheduler's node port has its own
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("tls"), dict):
            scopes.setdefault(str(e["tls"].get("scope", "public")), e["tls"])
    if not scopes:
        return table
    return "\n\n".join([table, *(certificates_table(tls) for tls in scopes.values())])


CERTIFICATE_COLUMNS = ("kind", "subject", "issuer", "serial", "not_after", "sha256", "source")
_KINDS = {"public": ("server", "client CA"), "cluster": ("node", "cluster CA")}


def certificates_table(tls: dict[str, Any]) -> str:
    """The certificate every TLS listener serves and the client CAs it trusts (spiced's `tls` field);
    for a scheduler's node port (scope `cluster`), its node certificate and the cluster CA."""
    served, trusted = _KINDS.get(str(tls.get("scope", "public")), _KINDS["public"])
    rows = [(served, tls.get("certificate"))] + [(trusted, ca) for ca in tls.get("client_ca") or []]
    return plain_table(list(CERTIFICATE_COLUMNS), [
        [kind, *(_text(c.get(k)) for k in ("subject", "issuer", "serial", "not_after")),
         _text(c.get("sha256_fingerprint", ""))[:16], _text(c.get("source"))]
        for kind, c in rows if isinstance(c, dict)])


def datasets_table(s: HttpSettings) -> str:
    entries = get_json(s, "/v1/datasets?status=true")
    keys = ("name", "from", "replication_enabled", "acceleration_enabled", "status", "error")
    return plain_table(["name", "from", "replication", "acceleration", "status", "error"],
                       [[_text(e.get(k)) for k in keys] for e in entries])


def version_text() -> str:
    """CLI and runtime versions; both ship in this installation, so the runtime is asked by import."""
    try:
        from spiced import __version__ as runtime_version
        runtime = f"v{runtime_version}"
    except ImportError:
        runtime = "not installed"
    return f"CLI version:     v{__version__}\nRuntime version: {runtime}"

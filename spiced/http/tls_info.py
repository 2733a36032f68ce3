"""The TLS side of the connection a request arrived on, as request handling sees it.

The HTTP server's connection handler (spiced/http/hypercorn_patches.py) sets it once the handshake is
done; every request task of that connection, HTTP/1.1 or each h2 stream, inherits the ContextVar.
"""

from __future__ import annotations

import ssl
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from ..identity import ClientIdentity

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """The TLS side of one connection. `identity` is set only for a certificate that verified."""

    identity: ClientIdentity | None
    tls_version: str | None  # "TLSv1.3"
    cipher: str | None  # OpenSSL name, e.g. "TLS_AES_256_GCM_SHA384"
    alpn: str | None

    @classmethod
    def from_ssl_object(cls, obj: ssl.SSLObject) -> TlsInfo:
        # With a client CA loaded, a certificate that fails verification aborts the handshake,
        # so any peer certificate seen here has been verified.
        der = obj.getpeercert(binary_form=True)
        cipher = obj.cipher()
        return cls(ClientIdentity.from_der(der) if der else None, obj.version(),
                   cipher[0] if cipher else None, obj.selected_alpn_protocol())

    def asgi_extension(self) -> dict[str, Any]:
        """The ASGI TLS extension (`scope["extensions"]["tls"]`) for this connection."""
        chain = [ssl.DER_cert_to_PEM_cert(self.identity.der)] if self.identity else []
        return {
            "server_cert": None,
            "client_cert_chain": chain,
            "client_cert_name": self.identity.subject if self.identity else None,
            "client_cert_error": None,
            "tls_version": _TLS_VERSIONS.get(self.tls_version or ""),
            "cipher_suite": None,  # Python exposes the suite's name, not its IANA number
        }


tls_info: ContextVar[TlsInfo | None] = ContextVar("spiced_tls_info", default=None)


def current_tls_info() -> TlsInfo | None:
    """TLS facts of the connection the current request arrived on (None for plaintext)."""
    return tls_info.get()

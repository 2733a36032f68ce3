"""The verified client-certificate identity, as request handling on both listeners sees it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """A client certificate that passed verification against the client CA during the handshake."""

    subject: str  # RFC 4514 string, e.g. "CN=client,O=Widgets"
    fingerprint: str  # hex SHA-256 of the leaf DER
    der: bytes

    @classmethod
    def from_der(cls, der: bytes) -> ClientIdentity:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        return cls(cert.subject.rfc4514_string(), hashlib.sha256(der).hexdigest(), der)

    def log_fields(self) -> str:
        return f'client_subject="{self.subject}" client_fingerprint={self.fingerprint[:16]}'

"""A throwaway PKI generated per test run with `cryptography` (nothing is committed).

    pki = Pki.create(tmp_path)          # CA, server cert (localhost, 127.0.0.1), clients
    pki.server.cert / .key              # file paths (PEM)
    pki.issue_server("v2")              # another server leaf from the same CA (new serial)
    pki.client, pki.foreign_client, pki.expired_client, pki.server_usage_client
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_SUBJECT = x509.Name([
    x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Washington"),
    x509.NameAttribute(NameOID.LOCALITY_NAME, "Seattle"),
    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Widgets, Inc."),
    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "IT"),
    x509.NameAttribute(NameOID.COMMON_NAME, "spiced.localhost"),
])
SERVER_SUBJECT_LINE = "CN=spiced.localhost, OU=IT, O=Widgets, Inc., L=Seattle, S=Washington, C=US"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Issued:
    name: str
    cert: Path
    key: Path
    serial: int
    certificate: x509.Certificate = field(repr=False)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    @property
    def key_pem(self) -> bytes:
        return self.key.read_bytes()


@dataclass
class Authority:
    name: str
    cert: Path
    certificate: x509.Certificate = field(repr=False)
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_ca(directory: Path, name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spiced tests")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(days=1)).not_valid_after(_now() + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(name, path, cert, key)


def issue(ca: Authority, directory: Path, name: str, *, server: bool, subject: x509.Name | None = None,
          expired: bool = False, usage: list[x509.ObjectIdentifier] | None = None, days: float = 365) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spiced tests")])
    if expired:
        start, end = _now() - dt.timedelta(days=10), _now() - dt.timedelta(days=1)
    else:
        start, end = _now() - dt.timedelta(hours=1), _now() + dt.timedelta(days=days)
    serial = x509.random_serial_number()
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.certificate.subject)
               .public_key(key.public_key()).serial_number(serial).not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()),
                              critical=False)
               .add_extension(x509.ExtendedKeyUsage(usage or ([ExtendedKeyUsageOID.SERVER_AUTH] if server
                                                              else [ExtendedKeyUsageOID.CLIENT_AUTH])), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(ca.private_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return Issued(name, cert_path, key_path, serial, cert)


@dataclass
class Pki:
    directory: Path
    ca: Authority
    server: Issued
    client_ca: Authority
    client: Issued
    foreign_ca: Authority
    foreign_client: Issued
    expired_client: Issued
    server_usage_client: Issued  # signed by client_ca but its EKU is serverAuth only

    @classmethod
    def create(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        ca = make_ca(directory, "ca")
        client_ca = make_ca(directory, "client-ca")
        foreign = make_ca(directory, "foreign-ca")
        return cls(
            directory, ca,
            issue(ca, directory, "server", server=True, subject=SERVER_SUBJECT),
            client_ca,
            issue(client_ca, directory, "client", server=False),
            foreign,
            issue(foreign, directory, "foreign-client", server=False),
            issue(client_ca, directory, "expired-client", server=False, expired=True),
            issue(client_ca, directory, "server-usage-client", server=False, usage=[ExtendedKeyUsageOID.SERVER_AUTH]),
        )

    def issue_server(self, name: str, *, days: float = 365, expired: bool = False) -> Issued:
        """Another server leaf from the same CA, for rotations (distinct serial)."""
        return issue(self.ca, self.directory, name, server=True, subject=SERVER_SUBJECT, days=days, expired=expired)

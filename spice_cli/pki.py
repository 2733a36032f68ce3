"""`spice tls`: a development PKI with `cryptography` (ECDSA P-256), replacing a page of openssl commands.

    spice tls init [--dir DIR]                                   DIR/ca.crt, DIR/ca.key
    spice tls add NAME [--host H ...] [--client] [--days N]      DIR/NAME.crt, DIR/NAME.key

Keys are written readable by their owner only (0600). Nothing is overwritten without `--force`.
The builders (`new_ca`, `new_leaf`, `write_issued`, `load_ca`) also make `spice cluster tls`'s PKI
(spice_cli/cluster_pki.py).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spice_cli import CliError

CA_NAME = "ca"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
LEAF_DAYS = 365
# Tolerate small clock differences between the machine issuing and the one verifying.
BACKDATE = dt.timedelta(minutes=5)
_HOSTNAME = re.compile(r"(?i)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")


@dataclass(frozen=True, slots=True)
class Issued:
    cert: Path
    key: Path


def _usage(*, signing: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=signing, crl_sign=signing, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         encipher_only=False, decipher_only=False)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Created with 0600 from the start: no window in which the key is readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CliError(f"{', '.join(existing)} already exists; pass --force to replace it")


def _days(days: int) -> int:
    if days < 1:
        raise CliError(f"--days must be at least 1 (got {days})")
    return days


def new_ca(subject: x509.Name, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA P-256 CA that signs leaves only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=_days(days)))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(signing=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def write_issued(issued: Issued, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *,
                 private_cert: bool = False) -> None:
    """The key (0600 from creation), then the certificate (0600 too with `private_cert`)."""
    _write_key(issued.key, key)
    _write_cert(issued.cert, cert)
    if private_cert:
        os.chmod(issued.cert, 0o600)


def init_ca(directory: Path, *, days: int = CA_DAYS, force: bool = False) -> Issued:
    """Create a self-signed CA in `directory` (ca.crt, ca.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    issued = Issued(directory / f"{CA_NAME}.crt", directory / f"{CA_NAME}.key")
    _refuse_overwrite([issued.cert, issued.key], force)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Spice dev CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spice tls")])
    cert, key = new_ca(subject, days)
    write_issued(issued, cert, key)
    return issued


def load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An ECDSA CA's certificate and key (CliError naming the file when it cannot be used)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise CliError(f"cannot load the CA from {cert_path.parent}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CliError(f"{key_path} is not an ECDSA key")
    return cert, key


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / f"{CA_NAME}.crt", directory / f"{CA_NAME}.key"
    if not cert_path.exists() or not key_path.exists():
        raise CliError(f"no CA in {directory}: run `spice tls init --dir {directory}` first")
    return load_ca(cert_path, key_path)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def new_leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str, *, hosts: Sequence[str],
             usages: Sequence[x509.ObjectIdentifier], days: int, key_encipherment: bool = False,
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An ECDSA P-256 leaf for CN=`name` signed by the CA, with `usages` as its EKUs and `hosts` as SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    key_usage = x509.KeyUsage(digital_signature=True, key_encipherment=key_encipherment, key_cert_sign=False,
                              crl_sign=False, content_commitment=False, data_encipherment=False,
                              key_agreement=False, encipher_only=False, decipher_only=False)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=_days(days)))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(key_usage, critical=True)
               .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def add(directory: Path, name: str, *, hosts: Sequence[str] = (), client: bool = False, days: int = LEAF_DAYS,
        force: bool = False) -> Issued:
    """Issue NAME.crt / NAME.key from the CA in `directory`: a server leaf (serverAuth, SANs from `hosts`,
    default localhost and 127.0.0.1) or a client leaf (clientAuth, SAN NAME unless `hosts` are given)."""
    if not name or "/" in name or name in (".", "..") or name == CA_NAME:
        raise CliError(f"invalid certificate name '{name}': use a plain file name other than '{CA_NAME}'")
    ca_cert, ca_key = _load_ca(directory)
    issued = Issued(directory / f"{name}.crt", directory / f"{name}.key")
    _refuse_overwrite([issued.cert, issued.key], force)
    if not hosts:
        # Client leaves carry their name as a SAN too: strict verifiers (RFC 5280 profiles) require one.
        hosts = ([name] if _HOSTNAME.fullmatch(name) else []) if client else list(DEFAULT_HOSTS)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert, key = new_leaf(ca_cert, ca_key, name, hosts=hosts, usages=[usage], days=days)
    write_issued(issued, cert, key)
    return issued

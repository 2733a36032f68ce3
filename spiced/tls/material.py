"""TLS material: read PEM bytes, validate them, and describe them (subject line, fingerprint).

Everything here works on bytes already read, so a reload validates and builds from exactly the
same content. Error texts follow upstream's wording and never contain key material: messages
name a file, a PEM label or a fixed reason, never a slice of the input.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import re
import shutil
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ..errors import MaterialError

_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_KEY_LABELS = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY")  # PKCS#8, PKCS#1, SEC1
_SUBJECT_ORDER = (
    (NameOID.COMMON_NAME, "CN"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "OU"),
    (NameOID.ORGANIZATION_NAME, "O"),
    (NameOID.LOCALITY_NAME, "L"),
    (NameOID.STATE_OR_PROVINCE_NAME, "S"),
    (NameOID.COUNTRY_NAME, "C"),
)


class PemError(ValueError):
    """A PEM section that cannot be decoded. The message names the label only."""


@dataclass(frozen=True, slots=True)
class PemBlock:
    label: bytes
    der: bytes = field(repr=False)

    def armored(self) -> bytes:
        body = binascii.b2a_base64(self.der, newline=False)
        lines = b"\n".join(body[i:i + 64] for i in range(0, len(body), 64))
        return b"-----BEGIN " + self.label + b"-----\n" + lines + b"\n-----END " + self.label + b"-----\n"


@dataclass(frozen=True, slots=True)
class CertKeyPair:
    """A validated certificate chain and the private key of its leaf, as canonical PEM."""

    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    leaf: x509.Certificate = field(repr=False)
    leaf_der: bytes = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.leaf_der)


@dataclass(frozen=True, slots=True)
class CaBundle:
    """A validated client-CA bundle (one or more certificates) as canonical PEM text."""

    pem: str
    count: int

    def certificates(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.pem.encode("ascii"))


def read_file(path: Path) -> bytes:
    """Read one material file; an `OSError` becomes an `io_error` with upstream's wording."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise MaterialError(f"failed to read TLS file at {path}: {os_error_text(e)}", "io_error") from None


def os_error_text(e: OSError) -> str:
    """Rust's `io::Error` display, which upstream prints: `No such file or directory (os error 2)`."""
    if e.errno is not None and e.strerror:
        return f"{e.strerror} (os error {e.errno})"
    return str(e)


def pem_blocks(data: bytes) -> list[PemBlock]:
    """Every PEM section in `data`, in order. Text outside sections is ignored, as rustls-pemfile does."""
    blocks: list[PemBlock] = []
    pos = 0
    while (m := _BEGIN.search(data, pos)) is not None:
        label = m.group(1)
        end_marker = b"-----END " + label + b"-----"
        end = data.find(end_marker, m.end())
        if end < 0:
            raise PemError(f'section end "{end_marker.decode()}" missing')
        body = re.sub(rb"\s+", b"", data[m.end():end])
        try:
            der = binascii.a2b_base64(body, strict_mode=True)
        except binascii.Error:
            raise PemError(f"invalid base64 in {label.decode()} section") from None
        blocks.append(PemBlock(label, der))
        pos = end + len(end_marker)
    return blocks


def _certificates(data: bytes, *, what: str) -> list[tuple[PemBlock, x509.Certificate]]:
    try:
        blocks = [b for b in pem_blocks(data) if b.label == b"CERTIFICATE"]
    except PemError as e:
        raise MaterialError(f"failed to parse {what}: {e}", "parse_error") from None
    certs = []
    for block in blocks:
        try:
            certs.append((block, x509.load_der_x509_certificate(block.der)))
        except ValueError as e:
            raise MaterialError(f"failed to parse {what}: {e}", "parse_error") from None
    return certs


def _private_key(data: bytes) -> tuple[PemBlock, object]:
    try:
        blocks = pem_blocks(data)
    except PemError as e:
        raise MaterialError(f"failed to parse TLS private key: {e}", "parse_error") from None
    for block in blocks:
        if block.label == b"ENCRYPTED PRIVATE KEY":
            raise MaterialError("failed to parse TLS private key: the key is encrypted; provide it unencrypted",
                                "parse_error")
        if block.label in _KEY_LABELS:
            try:
                key = serialization.load_pem_private_key(block.armored(), password=None)
            except TypeError:
                raise MaterialError("failed to parse TLS private key: the key is encrypted; provide it unencrypted",
                                    "parse_error") from None
            except Exception:
                # cryptography's messages describe the format problem; a fixed text is safer for key bytes.
                raise MaterialError(f"failed to parse TLS private key: {block.label.decode()} section is not a "
                                    "valid private key", "parse_error") from None
            return block, key
    raise MaterialError("TLS PEM contained no private key", "parse_error")


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_pair(cert_data: bytes, key_data: bytes) -> CertKeyPair:
    """Validate a certificate chain and its key, ending with a load on a scratch context."""
    certs = _certificates(cert_data, what="TLS certificate")
    if not certs:
        raise MaterialError("TLS PEM contained no certificates", "parse_error")
    key_block, key = _private_key(key_data)
    leaf_block, leaf = certs[0]
    if _spki(leaf.public_key()) != _spki(key.public_key()):  # type: ignore[attr-defined]
        raise MaterialError("TLS certificate and private key do not match", "parse_error")
    pair = CertKeyPair(b"".join(b.armored() for b, _ in certs), key_block.armored(), leaf, leaf_block.der)
    try:
        load_chain_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pair)
    except ssl.SSLError as e:
        # e.g. a key too small for OpenSSL's security level; OpenSSL's reason never echoes the key.
        raise MaterialError(f"failed to load TLS certificate and private key: {e.reason or e}", "parse_error") from None
    return pair


def load_ca_bundle(data: bytes) -> CaBundle:
    certs = _certificates(data, what="client CA bundle")
    if not certs:
        raise MaterialError("client CA bundle contained no certificates", "parse_error")
    pem = b"".join(b.armored() for b, _ in certs).decode("ascii")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=pem)
    except ssl.SSLError as e:
        raise MaterialError(f"failed to parse client CA bundle: {e.reason or e}", "parse_error") from None
    return CaBundle(pem, len(certs))


def load_chain_into(ctx: ssl.SSLContext, pair: CertKeyPair) -> None:
    """`load_cert_chain` from bytes: it only takes paths, so hand it anonymous in-memory files."""
    with _pem_paths(pair.chain_pem, pair.key_pem) as (cert_path, key_path):
        # The password callback keeps OpenSSL from ever prompting on a terminal.
        ctx.load_cert_chain(cert_path, key_path, password=_no_password)


def _no_password() -> bytes:
    return b""


@contextmanager
def _pem_paths(*blobs: bytes) -> Iterator[list[str]]:
    if hasattr(os, "memfd_create"):
        fds: list[int] = []
        try:
            for blob in blobs:
                fd = os.memfd_create("spiced-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                _write_all(fd, blob)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    # Without memfd: a private 0700 directory that lives only for the load.
    directory = tempfile.mkdtemp(prefix="spiced-tls-")
    try:
        paths = []
        for i, blob in enumerate(blobs):
            path = os.path.join(directory, f"{i}.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, blob)
            finally:
                os.close(fd)
            paths.append(path)
        yield paths
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fingerprint(der: bytes) -> str:
    """Hex of the first 8 bytes of the SHA-256 of a certificate's DER (the reload log's `fingerprint`)."""
    return hashlib.sha256(der).digest()[:8].hex()


def subject_line(cert: x509.Certificate) -> str | None:
    """Upstream's subject rendering: CN, OU, O, L, S, C grouped in that order, values raw.

    None when the subject cannot be read or holds none of those six types.
    """
    try:
        return name_line(cert.subject)
    except ValueError:
        return None


def name_line(name: x509.Name) -> str | None:
    """A distinguished name as `subject_line` renders it (also the issuer, for the cluster CA check)."""
    parts = [f"{short}={a.value!s}" for oid, short in _SUBJECT_ORDER for a in name if a.oid == oid]
    return ", ".join(parts) or None


def startup_line(cert: x509.Certificate) -> str:
    subject = subject_line(cert)
    if subject is None:
        return "All endpoints secured with TLS"
    return f"All endpoints secured with TLS using certificate: {subject}"

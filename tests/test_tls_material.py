"""spiced/tls/material.py: PEM reading and validation, upstream's error texts, subject line, fingerprint."""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from spiced.errors import MaterialError
from spiced.tls import material
from tests.pki import SERVER_SUBJECT, SERVER_SUBJECT_LINE, Pki
from tests.tlsprobe import key_body_lines


def self_signed(attrs: list[tuple[x509.ObjectIdentifier, str]], key: object = None) -> tuple[x509.Certificate, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    return cert, key


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: object, fmt: serialization.PrivateFormat, password: bytes | None = None) -> bytes:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, fmt, enc)  # type: ignore[attr-defined, no-any-return]


def failure(fn: object, *args: bytes) -> MaterialError:
    with pytest.raises(MaterialError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value


# ---------------------------------------------------------------- subject line


def test_subject_line_of_the_reference_certificate(pki: Pki) -> None:
    assert material.subject_line(pki.server.certificate) == SERVER_SUBJECT_LINE
    assert material.startup_line(pki.server.certificate) == (
        "All endpoints secured with TLS using certificate: " + SERVER_SUBJECT_LINE)
    # the certificate really holds them in openssl's order (C first), so the grouping is ours
    assert next(a.oid for a in pki.server.certificate.subject) == NameOID.COUNTRY_NAME
    assert pki.server.certificate.subject == SERVER_SUBJECT


def test_subject_line_groups_six_types_in_fixed_order_and_drops_the_rest() -> None:
    cert, _ = self_signed([
        (NameOID.COMMON_NAME, "Spice AI Test CA"), (NameOID.ORGANIZATION_NAME, "Spice AI"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"), (NameOID.STATE_OR_PROVINCE_NAME, "WA"),
        (NameOID.COUNTRY_NAME, "US"), (NameOID.LOCALITY_NAME, "Seattle"), (NameOID.EMAIL_ADDRESS, "hey@spice.ai"),
    ])
    assert material.subject_line(cert) == "CN=Spice AI Test CA, OU=Engineering, O=Spice AI, L=Seattle, S=WA, C=US"


def test_subject_line_keeps_repeated_types_together_in_certificate_order() -> None:
    cert, _ = self_signed([
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "Ops"), (NameOID.COMMON_NAME, "a"), (NameOID.SERIAL_NUMBER, "42"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "Dev, West"), (NameOID.DOMAIN_COMPONENT, "example"),
    ])
    assert material.subject_line(cert) == "CN=a, OU=Ops, OU=Dev, West"


def test_subject_without_any_of_the_six_types_logs_the_short_line() -> None:
    cert, _ = self_signed([(NameOID.EMAIL_ADDRESS, "hey@spice.ai"), (NameOID.SERIAL_NUMBER, "7")])
    assert material.subject_line(cert) is None
    assert material.startup_line(cert) == "All endpoints secured with TLS"


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_is_the_first_8_bytes_of_sha256_in_hex_as_openssl_computes_it(pki: Pki) -> None:
    pair = material.load_pair(pki.server.cert_pem, pki.server.key_pem)
    out = subprocess.run(["openssl", "x509", "-in", str(pki.server.cert), "-noout", "-fingerprint", "-sha256"],
                         capture_output=True, text=True, check=True).stdout
    openssl_hex = out.strip().split("=", 1)[1].replace(":", "").lower()
    assert pair.fingerprint == openssl_hex[:16]
    assert pair.fingerprint == hashlib.sha256(
        pki.server.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]


# ---------------------------------------------------------------- valid material


def test_chain_keeps_every_certificate_leaf_first_and_ignores_text_between_sections(pki: Pki) -> None:
    bundle = b"Bag Attributes\n    friendlyName: server\n" + pki.server.cert_pem + b"subject=...\n" + pki.ca.cert_pem
    pair = material.load_pair(bundle, pki.server.key_pem)
    certs = [x509.load_pem_x509_certificate(b"-----BEGIN" + block)
             for block in pair.chain_pem.split(b"-----BEGIN")[1:]]
    assert [c.serial_number for c in certs] == [pki.server.serial, pki.ca.certificate.serial_number]
    assert pair.leaf.serial_number == pki.server.serial


@pytest.mark.parametrize(("kind", "fmt", "label"), [
    ("ec", serialization.PrivateFormat.PKCS8, b"PRIVATE KEY"),
    ("rsa", serialization.PrivateFormat.PKCS8, b"PRIVATE KEY"),
    ("ec", serialization.PrivateFormat.TraditionalOpenSSL, b"EC PRIVATE KEY"),  # SEC1
    ("rsa", serialization.PrivateFormat.TraditionalOpenSSL, b"RSA PRIVATE KEY"),  # PKCS#1
])
def test_pkcs8_pkcs1_and_sec1_keys_are_accepted(kind: str, fmt: serialization.PrivateFormat, label: bytes) -> None:
    key = ec.generate_private_key(ec.SECP384R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    cert, _ = self_signed([(NameOID.COMMON_NAME, "k")], key)
    data = key_pem(key, fmt)
    assert data.startswith(b"-----BEGIN " + label + b"-----")
    assert material.load_pair(pem(cert), data).leaf == cert


def test_key_is_the_first_private_key_section(pki: Pki) -> None:
    other = key_pem(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8)
    assert material.load_pair(pki.server.cert_pem, pki.server.cert_pem + pki.server.key_pem + other)
    with pytest.raises(MaterialError, match="do not match"):
        material.load_pair(pki.server.cert_pem, other + pki.server.key_pem)


# ---------------------------------------------------------------- errors


def test_read_errors_use_upstreams_wording(tmp_path: Path) -> None:
    e = failure(material.read_file, tmp_path / "missing.pem")  # type: ignore[arg-type]
    assert str(e) == f"failed to read TLS file at {tmp_path / 'missing.pem'}: No such file or directory (os error 2)"
    assert e.result == "io_error"
    e = failure(material.read_file, tmp_path)  # type: ignore[arg-type]
    assert str(e) == f"failed to read TLS file at {tmp_path}: Is a directory (os error 21)"


def test_cert_file_without_certificates(pki: Pki) -> None:
    e = failure(material.load_pair, pki.server.key_pem, pki.server.key_pem)
    assert (str(e), e.result) == ("TLS PEM contained no certificates", "parse_error")
    assert str(failure(material.load_pair, b"", pki.server.key_pem)) == "TLS PEM contained no certificates"


def test_key_file_without_private_key(pki: Pki) -> None:
    e = failure(material.load_pair, pki.server.cert_pem, pki.server.cert_pem)
    assert (str(e), e.result) == ("TLS PEM contained no private key", "parse_error")


def test_malformed_certificate_pem(pki: Pki) -> None:
    broken = pki.server.cert_pem.replace(b"\n", b"\n!", 3)
    assert str(failure(material.load_pair, broken, pki.server.key_pem)) == (
        "failed to parse TLS certificate: invalid base64 in CERTIFICATE section")
    unterminated = pki.server.cert_pem.split(b"-----END")[0]
    assert str(failure(material.load_pair, unterminated, pki.server.key_pem)) == (
        'failed to parse TLS certificate: section end "-----END CERTIFICATE-----" missing')
    not_der = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    e = failure(material.load_pair, not_der, pki.server.key_pem)
    assert str(e).startswith("failed to parse TLS certificate: ") and e.result == "parse_error"


def test_malformed_key_pem_never_echoes_key_bytes(pki: Pki) -> None:
    lines = pki.server.key_pem.splitlines()
    variants = {
        "bad base64": b"\n".join(lines[:1] + [b"*" + lines[1]] + lines[2:]),
        "truncated": b"\n".join(lines[:1] + [lines[1][:-4]] + lines[-1:]),
        "unterminated": b"\n".join(lines[:-1]),
        "flipped": pki.server.key_pem.replace(lines[2], lines[2][::-1]),
    }
    body = list(key_body_lines(pki.server.key))
    for name, data in variants.items():
        e = failure(material.load_pair, pki.server.cert_pem, data)
        assert str(e).startswith("failed to parse TLS private key: ") or "do not match" in str(e), name
        assert e.result == "parse_error"
        for line in body:
            for i in range(0, len(line) - 12, 6):
                assert line[i:i + 12] not in str(e), name


def test_encrypted_key_is_refused_without_prompting(pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.server.key_pem, None)
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        e = failure(material.load_pair, pki.server.cert_pem, key_pem(key, fmt, b"secret"))
        assert str(e).startswith("failed to parse TLS private key: ")


def test_mismatched_key(pki: Pki) -> None:
    e = failure(material.load_pair, pki.server.cert_pem, pki.client.key_pem)
    assert (str(e), e.result) == ("TLS certificate and private key do not match", "parse_error")


def test_ca_bundle(pki: Pki) -> None:
    bundle = material.load_ca_bundle(pki.client_ca.cert_pem + pki.foreign_ca.cert_pem)
    assert bundle.count == 2
    e = failure(material.load_ca_bundle, pki.server.key_pem)
    assert (str(e), e.result) == ("client CA bundle contained no certificates", "parse_error")
    assert str(failure(material.load_ca_bundle, b"")) == "client CA bundle contained no certificates"
    e = failure(material.load_ca_bundle, b"-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n")
    assert str(e) == "failed to parse client CA bundle: invalid base64 in CERTIFICATE section"

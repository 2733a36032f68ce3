"""`spice tls init` / `spice tls add`: files checked with `cryptography`, then used by a real mTLS handshake."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from typer.testing import CliRunner

from spice_cli.app import app

runner = CliRunner()


def spice(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.fixture()
def pki(tmp_path: Path) -> Path:
    assert spice("tls", "init", "--dir", str(tmp_path))[0] == 0
    assert spice("tls", "add", "server", "--dir", str(tmp_path))[0] == 0
    assert spice("tls", "add", "client", "--client", "--dir", str(tmp_path), "--days", "7")[0] == 0
    return tmp_path


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_files_keys_and_permissions(pki: Path) -> None:
    assert sorted(p.name for p in pki.iterdir()) == ["ca.crt", "ca.key", "client.crt", "client.key",
                                                     "server.crt", "server.key"]
    for name in ("ca", "server", "client"):
        key_path = pki / f"{name}.key"
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        assert cert(pki / f"{name}.crt").public_key() == key.public_key()


def test_ca_is_a_ca(pki: Path) -> None:
    ca = cert(pki / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.issuer == ca.subject


def test_server_certificate(pki: Path) -> None:
    server = cert(pki / "server.crt")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.SERVER_AUTH]
    store = Store([cert(pki / "ca.crt")])
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        PolicyBuilder().store(store).build_server_verifier(name).verify(server, [])


def test_client_certificate(pki: Path) -> None:
    client = cert(pki / "client.crt")
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = client.not_valid_after_utc - client.not_valid_before_utc
    assert dt.timedelta(days=7) <= lifetime <= dt.timedelta(days=7, minutes=10)
    PolicyBuilder().store(Store([cert(pki / "ca.crt")])).build_client_verifier().verify(client, [])


def test_custom_hosts(pki: Path) -> None:
    code, out = spice("tls", "add", "edge", "--host", "spice.example", "--host", "10.1.2.3", "--host", "::1",
                      "--dir", str(pki))
    assert code == 0 and "edge.crt" in out
    sans = cert(pki / "edge.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["spice.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("::1")]


def test_refuses_to_overwrite_without_force(pki: Path) -> None:
    before = (pki / "ca.crt").read_bytes()
    code, out = spice("tls", "init", "--dir", str(pki))
    assert code == 1 and "already exists; pass --force to replace it" in out and out.count("\n") == 1
    assert (pki / "ca.crt").read_bytes() == before
    assert spice("tls", "add", "server", "--dir", str(pki))[0] == 1
    assert spice("tls", "add", "server", "--dir", str(pki), "--force")[0] == 0


def test_add_without_ca_is_one_line(tmp_path: Path) -> None:
    code, out = spice("tls", "add", "server", "--dir", str(tmp_path))
    assert code == 1
    assert out == f"no CA in {tmp_path}: run `spice tls init --dir {tmp_path}` first\n"


def test_bad_days(tmp_path: Path) -> None:
    code, out = spice("tls", "init", "--dir", str(tmp_path), "--days", "0")
    assert code == 1 and out == "--days must be at least 1 (got 0)\n"


def _handshake(pki: Path, *, client_cert: bool) -> bytes:
    """A real TLS server requiring client certs and a real client, both from python's ssl module."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(pki / "ca.crt")
    client_ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client_cert:
        client_ctx.load_cert_chain(pki / "client.crt", pki / "client.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(b"hello " + tls.recv(16))
        except (ssl.SSLError, OSError) as e:
            seen["error"] = e

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"spice")
            return tls.recv(64)
    finally:
        thread.join(10)
        listener.close()
        if client_cert:
            assert dict(x[0] for x in seen["peer"]["subject"])["commonName"] == "client"  # type: ignore[index]


def test_real_mutual_tls_handshake(pki: Path) -> None:
    assert _handshake(pki, client_cert=True) == b"hello spice"


def test_server_rejects_a_client_without_certificate(pki: Path) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(pki, client_cert=False)

"""The TLS configuration of every listener, scanned by sslyze against Mozilla's "intermediate"
profile (issue 6): TLS 1.2/1.3 only, the profile's cipher suites and curves, no compression, secure
renegotiation only, TLS_FALLBACK_SCSV, extended master secret, no Heartbleed/CCS/ROBOT, and the
certificate chain served in order without the anchor.

Zero violations, with no allowance: the one certificate finding a throwaway CA would cause
("certificate_path_validation": sslyze's bundled trust stores do not know our CA) does not arise,
because the scan is given the run's CA as `custom_ca_file`, which sslyze adds as a trust store.
Everything else the profile checks about certificates holds for the generated ones (ECDSA P-256 or
RSA 2048 leaves, SHA-256 signatures, a 30-day life span, under the profile's 366 days).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sslyze import (
    CertificateInfoExtraArgument,
    ClientAuthenticationCredentials,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanResult,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)

from tests.pki import SERVER_SUBJECT, Pki
from tests.support import Runtime, run_spiced, write_pod
from tests.tlsprobe import LoopThread, serve_echo

INTERMEDIATE = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)

# sslyze's own bundled trust stores hold a root with a negative serial; cryptography warns on load.
pytestmark = pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")


@dataclass
class RsaChain:
    root: Path  # the anchor: given to the scanner, never served
    chain: Path  # leaf then intermediate, as served
    key: Path


def rsa_chain_with_intermediate(directory: Path) -> RsaChain:
    """root CA → intermediate CA → RSA-2048 leaf (localhost, 127.0.0.1), all generated now."""
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: x509.Name, issuer: x509.Name, public: rsa.RSAPublicKey, signer: rsa.RSAPrivateKey,
             *, ca: bool, days: int) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False, data_encipherment=False,
                                              key_agreement=False, encipher_only=False, decipher_only=False),
                                critical=True)
        else:
            b = (b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                 .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False))
        return b.sign(signer, hashes.SHA256())

    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]
    root = cert(name("scan root CA"), name("scan root CA"), keys[0].public_key(), keys[0], ca=True, days=60)
    mid = cert(name("scan intermediate CA"), root.subject, keys[1].public_key(), keys[0], ca=True, days=60)
    leaf = cert(SERVER_SUBJECT, mid.subject, keys[2].public_key(), keys[1], ca=False, days=30)
    def pem(c: x509.Certificate) -> bytes:
        return c.public_bytes(serialization.Encoding.PEM)

    out = RsaChain(directory / "scan-root.pem", directory / "scan-chain.pem", directory / "scan-leaf.key")
    out.root.write_bytes(pem(root))
    out.chain.write_bytes(pem(leaf) + pem(mid))
    out.key.write_bytes(keys[2].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    return out


def scan(rt: Runtime, anchor: Path, client: tuple[Path, Path] | None = None) -> dict[str, ServerScanResult]:
    """Scan the HTTP, Flight and metrics listeners in one sslyze run; results by listener."""
    return scan_ports({"http": rt.http_port, "flight": rt.flight_port,
                       "metrics": int(rt.addresses["metrics"].rsplit(":", 1)[1])}, anchor, client)


def scan_ports(ports: dict[str, int], anchor: Path,
               client: tuple[Path, Path] | None = None) -> dict[str, ServerScanResult]:
    creds = ClientAuthenticationCredentials(certificate_chain_path=client[0], key_path=client[1]) if client else None
    requests = [
        ServerScanRequest(
            server_location=ServerNetworkLocation("localhost", port, ip_address="127.0.0.1"),
            network_configuration=ServerNetworkConfiguration("localhost", tls_client_auth_credentials=creds),
            scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
            scan_commands_extra_arguments=ScanCommandsExtraArguments(
                certificate_info=CertificateInfoExtraArgument(custom_ca_file=anchor)),
        )
        for port in ports.values()
    ]
    by_port = {port: listener for listener, port in ports.items()}
    scanner = Scanner()
    scanner.queue_scans(requests)
    return {by_port[result.server_location.port]: result for result in scanner.get_results()}


def violations(result: ServerScanResult) -> dict[str, str]:
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    try:
        check_server_against_tls_configuration(result, INTERMEDIATE)
    except ServerNotCompliantWithTlsConfiguration as e:
        return e.issues
    return {}


def assert_chain(result: ServerScanResult, served: int) -> None:
    assert result.scan_result is not None and result.scan_result.certificate_info.result is not None
    [deployment] = result.scan_result.certificate_info.result.certificate_deployments
    assert len(deployment.received_certificate_chain) == served
    assert deployment.received_chain_has_valid_order is True
    assert deployment.received_chain_contains_anchor_certificate is False
    assert deployment.verified_certificate_chain is not None
    assert len(deployment.verified_certificate_chain) == served + 1  # … and the anchor the client holds


def assert_protocols(result: ServerScanResult) -> None:
    r = result.scan_result
    assert r is not None
    for old in (r.ssl_2_0_cipher_suites, r.ssl_3_0_cipher_suites, r.tls_1_0_cipher_suites, r.tls_1_1_cipher_suites):
        assert old.result is not None and not old.result.is_tls_version_supported
    assert r.tls_1_2_cipher_suites.result is not None and r.tls_1_2_cipher_suites.result.is_tls_version_supported
    assert r.tls_1_3_cipher_suites.result is not None and r.tls_1_3_cipher_suites.result.is_tls_version_supported
    assert r.elliptic_curves.result is not None
    curves = {c.name for c in r.elliptic_curves.result.supported_curves or []}
    assert curves and curves <= INTERMEDIATE.tls_curves  # no X448 / P-521


@pytest.mark.slow
def test_ecdsa_listeners_meet_mozilla_intermediate(pki: Pki, tmp_path: Path) -> None:
    write_pod(tmp_path)
    with run_spiced(tmp_path, "--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
                    "--tls-key-file", str(pki.server.key), metrics=True) as rt:
        results = scan(rt, pki.ca.cert)
    assert set(results) == {"http", "flight", "metrics"}
    assert {listener: violations(r) for listener, r in results.items()} == {"http": {}, "flight": {}, "metrics": {}}
    for r in results.values():
        assert_protocols(r)
        assert_chain(r, served=1)


@pytest.mark.slow
def test_rsa_chain_with_intermediate_is_served_in_order_and_compliant(tmp_path: Path) -> None:
    chain = rsa_chain_with_intermediate(tmp_path)
    write_pod(tmp_path)
    with run_spiced(tmp_path, "--tls-enabled", "true", "--tls-certificate-file", str(chain.chain),
                    "--tls-key-file", str(chain.key), metrics=True) as rt:
        results = scan(rt, chain.root)
    assert {listener: violations(r) for listener, r in results.items()} == {"http": {}, "flight": {}, "metrics": {}}
    for r in results.values():
        assert_protocols(r)
        assert_chain(r, served=2)


@pytest.mark.slow
def test_client_auth_listeners_meet_mozilla_intermediate(pki: Pki, tmp_path: Path) -> None:
    # mTLS required: the Flight listener demands a certificate at the handshake, so the scanner
    # presents one; the client-auth listener contexts (no resumption) must still meet the profile.
    write_pod(tmp_path)
    with run_spiced(tmp_path, "--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
                    "--tls-key-file", str(pki.server.key), "--tls-client-auth-mode", "required",
                    "--tls-client-auth-ca-file", str(pki.client_ca.cert), metrics=True) as rt:
        results = scan(rt, pki.ca.cert, client=(pki.client.cert, pki.client.key))
    assert {listener: violations(r) for listener, r in results.items()} == {"http": {}, "flight": {}, "metrics": {}}
    for r in results.values():
        assert_protocols(r)


def test_scan_catches_a_server_outside_the_profile(pki: Pki) -> None:
    # Control: Python's default server context (TLS 1.2+, but its curve list includes X448 and
    # P-521) fails the same check, so the zero above is the scanner's verdict, not its silence.
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server.cert, pki.server.key)
    with LoopThread() as lt:
        port = lt.call(serve_echo(ctx))
        result = scan_ports({"default": port}, pki.ca.cert)["default"]
    assert "tls_curves" in violations(result)

"""spiced/tls/manager.py (and policy.py): startup validation, the startup lines, and what every
listener context serves, checked with real handshakes (python ssl and openssl s_client)."""

from __future__ import annotations

import logging
import re
import ssl
import warnings
from pathlib import Path

import pytest

from spiced.config import MaterialSource, TlsSettings
from spiced.errors import TlsConfigError
from spiced.logs import SpiceFormatter
from spiced.metrics import Metrics
from spiced.tls import policy
from spiced.tls.manager import TlsManager
from tests.pki import SERVER_SUBJECT_LINE, Pki
from tests.tlsprobe import (
    LoopThread,
    client_context,
    file_settings,
    handshake,
    key_body_lines,
    refused,
    reload_counts,
    s_client,
    serve_echo,
)


def make(pki: Pki, mode: str = "none") -> TlsManager:
    ca = pki.client_ca.cert if mode != "none" else None
    return TlsManager.create(file_settings(pki, pki.server.cert, pki.server.key, mode, ca), Metrics())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def servers(pki: Pki, loop: LoopThread) -> dict[tuple[str, str], int]:
    """One echo server per (mode, profile), each on its manager's listener context."""
    ports = {}
    for mode in ("none", "request", "required"):
        mgr = make(pki, mode)
        for profile in ("http", "flight", "metrics"):
            ports[(mode, profile)] = loop.call(serve_echo(mgr.listener_context(profile)))
    return ports


# ---------------------------------------------------------------- startup errors


def startup_error(settings: TlsSettings) -> str:
    with pytest.raises(TlsConfigError) as info:
        TlsManager.create(settings, Metrics())
    assert str(info.value) == "Unable to configure TLS: " + info.value.detail
    return info.value.detail


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_every_startup_error_has_upstreams_detail_and_no_key_bytes(pki: Pki, tmp_path: Path) -> None:
    s, c, k = pki.server, pki.server.cert, pki.server.key
    missing = tmp_path / "missing.pem"
    garbage = write(tmp_path / "garbage.pem", b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
    bad_key = write(tmp_path / "bad.key", s.key_pem.replace(s.key_pem.splitlines()[1], b"!" * 20))
    cases = {
        "failed to read TLS file at " + str(missing) + ": No such file or directory (os error 2)":
            [file_settings(pki, missing, k), file_settings(pki, c, missing),
             file_settings(pki, c, k, "request", missing)],
        "failed to read TLS file at " + str(tmp_path) + ": Is a directory (os error 21)":
            [file_settings(pki, tmp_path, k)],
        "TLS PEM contained no certificates": [file_settings(pki, k, k)],
        "TLS PEM contained no private key": [file_settings(pki, c, c)],
        "failed to parse TLS certificate: invalid base64 in CERTIFICATE section": [file_settings(pki, garbage, k)],
        "failed to parse TLS private key: invalid base64 in PRIVATE KEY section": [file_settings(pki, c, bad_key)],
        "TLS certificate and private key do not match": [file_settings(pki, c, pki.client.key)],
        "client CA bundle contained no certificates": [file_settings(pki, c, k, "required", k)],
        "failed to parse client CA bundle: invalid base64 in CERTIFICATE section":
            [file_settings(pki, c, k, "request", garbage)],
    }
    inline = TlsSettings(MaterialSource("cli_inline", pem=s.cert_pem), MaterialSource("cli_inline", pem=s.cert_pem))
    cases["TLS PEM contained no private key"].append(inline)
    body = list(key_body_lines(k, pki.client.key))
    for detail, settings_list in cases.items():
        for settings in settings_list:
            got = startup_error(settings)
            assert got == detail
            assert not any(line in got for line in body)


# ---------------------------------------------------------------- startup lines


def test_subject_line_is_the_reference_text(pki: Pki) -> None:
    assert make(pki).subject_line() == "All endpoints secured with TLS using certificate: " + SERVER_SUBJECT_LINE


@pytest.mark.parametrize(("mode", "inline_ca", "expected"), [
    ("request", False,
     "Public TLS client certificates: requested but optional (client_auth_mode=request); CA from file {ca}"),
    ("required", False, "Public TLS client certificates: required (client_auth_mode=required); CA from file {ca}"),
    ("required", True,
     "Public TLS client certificates: required (client_auth_mode=required); CA from inline PEM (spicepod / CLI)"),
])
def test_log_startup_lines(pki: Pki, caplog: pytest.LogCaptureFixture, mode: str, inline_ca: bool,
                           expected: str) -> None:
    if inline_ca:  # an inline CA goes with inline cert and key (config.py refuses the mix)
        settings = TlsSettings(MaterialSource("cli_inline", pem=pki.server.cert_pem),
                               MaterialSource("cli_inline", pem=pki.server.key_pem), mode,  # type: ignore[arg-type]
                               MaterialSource("cli_inline", pem=pki.client_ca.cert_pem))
    else:
        settings = file_settings(pki, pki.server.cert, pki.server.key, mode, pki.client_ca.cert)  # type: ignore[arg-type]
    mgr = TlsManager.create(settings, Metrics())
    with caplog.at_level(logging.DEBUG, logger="runtime"):
        mgr.log_startup()
    lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("runtime", "INFO", "All endpoints secured with TLS using certificate: " + SERVER_SUBJECT_LINE),
        ("runtime", "INFO", expected.format(ca=pki.client_ca.cert)),
    ]
    formatted = SpiceFormatter().format(caplog.records[0])
    assert re.fullmatch(r"\S+Z  INFO runtime: All endpoints secured with TLS using certificate: "
                        + re.escape(SERVER_SUBJECT_LINE), formatted)


def test_mode_none_logs_client_certificates_at_debug_only(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="runtime"):
        make(pki).log_startup()
    assert [(r.levelname, r.getMessage()) for r in caplog.records][1:] == [
        ("DEBUG", "Public TLS client certificates: not requested (client_auth_mode=none)")]


def test_startup_load_is_not_counted(pki: Pki) -> None:
    metrics = Metrics()
    TlsManager.create(file_settings(pki, pki.server.cert, pki.server.key, "request", pki.client_ca.cert), metrics)
    assert reload_counts(metrics) == {}


# ---------------------------------------------------------------- inline material (memfd)


def test_inline_material_serves_without_any_file(pki: Pki, loop: LoopThread, tmp_path: Path) -> None:
    cert, key = write(tmp_path / "c.pem", pki.server.cert_pem), write(tmp_path / "k.pem", pki.server.key_pem)
    settings = TlsSettings(MaterialSource("spicepod_inline", pem=cert.read_bytes()),
                           MaterialSource("spicepod_inline", pem=key.read_bytes()), "request",
                           MaterialSource("spicepod_inline", pem=pki.client_ca.cert_pem))
    mgr = TlsManager.create(settings, Metrics())
    cert.unlink()
    key.unlink()
    port = loop.call(serve_echo(mgr.listener_context("http")))
    hs = handshake(port, client_context(pki, pki.client))
    assert hs.serial == pki.server.serial and hs.reply.startswith("O=spiced tests,CN=client|")


# ---------------------------------------------------------------- protocol, ciphers, groups, ALPN


def test_listener_context_is_built_once_per_profile(pki: Pki) -> None:
    mgr = make(pki)
    assert mgr.listener_context("http") is mgr.listener_context("http")
    assert mgr.listener_context("http") is not mgr.listener_context("flight")


def test_tls_1_0_and_1_1_are_refused_and_1_2_1_3_accepted(pki: Pki, servers: dict[tuple[str, str], int],
                                                          loop: LoopThread) -> None:
    # Control: the same probe against a server that allows old protocols does connect, so a refusal means something.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
    old.set_ciphers("DEFAULT@SECLEVEL=0")
    old.load_cert_chain(pki.server.cert, pki.server.key)
    control = loop.call(serve_echo(old))
    for flag in ("-tls1", "-tls1_1"):
        probe = (flag, "-cipher", "DEFAULT@SECLEVEL=0")
        assert s_client(control, *probe).returncode == 0
        for profile in ("http", "flight", "metrics"):
            done = s_client(servers[("none", profile)], *probe)
            assert done.returncode != 0, profile
            assert "no peer certificate available" in done.stdout
    for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        done = s_client(servers[("none", "http")], flag)
        assert done.returncode == 0 and f"New, {version}, Cipher is" in done.stdout


INTERMEDIATE = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
                "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"}


def test_only_intermediate_cipher_suites(pki: Pki, servers: dict[tuple[str, str], int], loop: LoopThread) -> None:
    mgr = make(pki)
    for profile in ("http", "flight", "metrics"):
        assert {c["name"] for c in mgr.listener_context(profile).get_ciphers()} == INTERMEDIATE
    default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # control: Python's default offers CBC suites
    default.load_cert_chain(pki.server.cert, pki.server.key)
    control = loop.call(serve_echo(default))
    port = servers[("none", "http")]
    for cbc in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384"):
        assert s_client(control, "-tls1_2", "-cipher", cbc).returncode == 0
        assert s_client(port, "-tls1_2", "-cipher", cbc).returncode != 0
    for good in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        done = s_client(port, "-tls1_2", "-cipher", good)
        assert done.returncode == 0 and f"Cipher is {good}" in done.stdout


def test_only_intermediate_groups(pki: Pki, servers: dict[tuple[str, str], int], loop: LoopThread) -> None:
    assert policy.native_controls()  # CPython + OpenSSL 3: the full group list is set, not the fallback
    default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    default.load_cert_chain(pki.server.cert, pki.server.key)
    control = loop.call(serve_echo(default))
    for profile in ("http", "flight", "metrics"):
        for mode in ("none", "required"):
            port = servers[(mode, profile)]
            for group in ("X448", "P-521"):
                assert s_client(control, "-tls1_3", "-groups", group).returncode == 0
                assert s_client(port, "-tls1_3", "-groups", group).returncode != 0, (profile, group)
    port = servers[("none", "http")]
    for group, shown in (("X25519", "X25519"), ("P-256", "prime256v1"), ("P-384", "secp384r1")):
        done = s_client(port, "-tls1_3", "-groups", group)
        assert done.returncode == 0 and "Server Temp Key: " in done.stdout and shown in done.stdout


def test_no_compression_no_renegotiation(pki: Pki) -> None:
    mgr = make(pki, "request")
    for profile in ("http", "flight", "metrics"):
        ctx = mgr.listener_context(profile)
        assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(("profile", "offer", "expected"), [
    ("http", ["h2", "http/1.1"], "h2"), ("http", ["http/1.1"], "http/1.1"),
    ("flight", ["h2", "http/1.1"], "h2"), ("flight", ["http/1.1"], None),
    ("metrics", ["h2", "http/1.1"], "http/1.1"),
])
def test_alpn_per_profile(pki: Pki, servers: dict[tuple[str, str], int], profile: str, offer: list[str],
                          expected: str | None) -> None:
    hs = handshake(servers[("none", profile)], client_context(pki, alpn=offer))
    assert hs.alpn == expected


def test_served_chain_holds_every_certificate_of_the_file(pki: Pki, loop: LoopThread, tmp_path: Path) -> None:
    chain = write(tmp_path / "chain.pem", pki.server.cert_pem + pki.ca.cert_pem)
    mgr = TlsManager.create(file_settings(pki, chain, pki.server.key), Metrics())
    port = loop.call(serve_echo(mgr.listener_context("http")))
    done = s_client(port, "-showcerts", "-CAfile", str(pki.ca.cert), "-verify_return_error")
    assert done.returncode == 0
    assert done.stdout.count("-----BEGIN CERTIFICATE-----") == 2


# ---------------------------------------------------------------- client authentication per profile

ANON, REFUSED = "-", "refused"


def outcome(pki: Pki, port: int, client: str | None, max_version: ssl.TLSVersion | None = None) -> str:
    issued = {None: None, "valid": pki.client, "foreign": pki.foreign_client, "expired": pki.expired_client,
              "server_usage": pki.server_usage_client}[client]
    ctx = client_context(pki, issued, max_version=max_version)
    if refused(port, ctx) is not None:
        return REFUSED
    return handshake(port, ctx).reply.split("|")[0]


VALID = "O=spiced tests,CN=client"
MATRIX = {
    # (mode, profile): outcomes for no cert, valid, foreign CA, expired, serverAuth-only EKU
    ("none", "http"): (ANON, ANON, ANON, ANON, ANON),  # nothing is requested, so nothing is sent
    ("none", "flight"): (ANON, ANON, ANON, ANON, ANON),
    ("request", "http"): (ANON, VALID, REFUSED, REFUSED, REFUSED),
    ("request", "flight"): (ANON, VALID, REFUSED, REFUSED, REFUSED),
    ("required", "http"): (ANON, VALID, REFUSED, REFUSED, REFUSED),  # the 401 is the HTTP middleware's
    ("required", "flight"): (REFUSED, VALID, REFUSED, REFUSED, REFUSED),
    ("request", "metrics"): (ANON, ANON, ANON, ANON, ANON),  # metrics never asks for a certificate
    ("required", "metrics"): (ANON, ANON, ANON, ANON, ANON),
}


@pytest.mark.parametrize("max_version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
@pytest.mark.parametrize("key", list(MATRIX), ids=[f"{m}-{p}" for m, p in MATRIX])
def test_client_certificate_matrix(pki: Pki, servers: dict[tuple[str, str], int], key: tuple[str, str],
                                   max_version: ssl.TLSVersion | None) -> None:
    port = servers[key]
    got = tuple(outcome(pki, port, c, max_version) for c in (None, "valid", "foreign", "expired", "server_usage"))
    assert got == MATRIX[key]


def test_certificate_request_is_sent_only_where_the_mode_asks(pki: Pki, servers: dict[tuple[str, str], int]) -> None:
    for (mode, profile), port in servers.items():
        done = s_client(port, "-tls1_3", "-msg")
        asked = "CertificateRequest" in done.stdout
        assert asked == (mode != "none" and profile != "metrics"), (mode, profile)


def test_client_auth_listeners_issue_no_session_tickets(pki: Pki) -> None:
    mgr = make(pki, "required")
    assert mgr.listener_context("http").num_tickets == 0
    assert mgr.listener_context("flight").options & ssl.OP_NO_TICKET
    assert make(pki, "none").listener_context("http").num_tickets > 0  # resumption stays on elsewhere


def test_building_contexts_from_memory_leaks_no_descriptors(pki: Pki) -> None:
    mgr = make(pki, "request")
    before = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(20):
        mgr.reload_all("test")
    assert len(list(Path("/proc/self/fd").iterdir())) == before

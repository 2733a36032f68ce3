"""Hot reload: rotations seen by new handshakes, failures keeping the old material,
the counter, the log lines, client-CA rotation and resumption, inline material never reloading.

Servers are real TLS listeners on the manager's listener contexts; the served certificate is read
from fresh handshakes (python ssl, and openssl s_client for the no-SNI case)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from spiced.config import MaterialSource, TlsSettings
from spiced.logs import SpiceFormatter
from spiced.metrics import Metrics
from spiced.tls import policy
from spiced.tls.manager import TlsManager
from tests.pki import Issued, Pki
from tests.tlsprobe import (
    LoopThread,
    client_context,
    file_settings,
    handshake,
    key_body_lines,
    refused,
    reload_counts,
    replace_atomically,
    rotate_pair,
    s_client_serial,
    serve_echo,
    wait_for,
)

POLL = 2.0  # the product's interval: rotations must be seen within it
# The rotation tests change files right after the poller starts, the worst phase: the first tick
# comes a full interval later.


@pytest.fixture(scope="module")
def v2(pki: Pki) -> Issued:
    return pki.issue_server("v2")


@pytest.fixture(scope="module")
def v3(pki: Pki) -> Issued:
    return pki.issue_server("v3")


@dataclass
class Rig:
    mgr: TlsManager
    metrics: Metrics
    port: int
    cert: Path
    key: Path
    ca: Path | None
    pki: Pki

    def serial(self, client: Issued | None = None) -> int:
        return handshake(self.port, client_context(self.pki, client)).serial

    def counts(self) -> dict[str, float]:
        return reload_counts(self.metrics)


def rig(pki: Pki, loop: LoopThread, directory: Path, *, mode: str = "none", profile: str = "http",
        cert: Path | None = None, key: Path | None = None) -> Rig:
    if cert is None or key is None:
        cert, key = directory / "cert.pem", directory / "key.pem"
        shutil.copyfile(pki.server.cert, cert)
        shutil.copyfile(pki.server.key, key)
    ca = None
    if mode != "none":
        ca = directory / "ca.pem"
        shutil.copyfile(pki.client_ca.cert, ca)
    metrics = Metrics()
    mgr = TlsManager.create(file_settings(pki, cert, key, mode, ca), metrics)  # type: ignore[arg-type]
    port = loop.call(serve_echo(mgr.listener_context(profile)))  # type: ignore[arg-type]
    return Rig(mgr, metrics, port, cert, key, ca, pki)


@pytest.fixture
def r(pki: Pki, loop: LoopThread, tmp_path: Path) -> Rig:
    return rig(pki, loop, tmp_path)


def write_in_place(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:  # same inode, truncated and rewritten
        f.truncate(0)
        f.write(data)


NOTIFIED = 0.5  # the bound with filesystem notifications
WATCHES = ["notify", "poll"]


def run_watch(loop: LoopThread, mgr: TlsManager, how: str = "poll") -> tuple[asyncio.Event, object]:
    async def make_event() -> asyncio.Event:
        return asyncio.Event()

    stop = loop.call(make_event())
    future = loop.submit(mgr.watch(stop, notifications=how == "notify"))  # default interval: the product's 2 s
    if how == "notify":
        time.sleep(0.2)  # the watch is set up on the loop thread; changes made before it would go unseen
    return stop, future


def bound(how: str) -> float:
    """How soon a change must be served: within a notification's settle, or the first poll tick
    after the write (a second tick would be at 2 x POLL)."""
    return NOTIFIED if how == "notify" else POLL + 1.0


def stop_watch(loop: LoopThread, handle: tuple[asyncio.Event, object]) -> None:
    stop, future = handle
    loop.loop.call_soon_threadsafe(stop.set)
    future.result(5)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- rotations seen by the poller


@pytest.mark.parametrize("how", WATCHES)
def test_in_place_rewrite_is_served_within_the_poll_interval(r: Rig, loop: LoopThread, v2: Issued, how: str) -> None:
    watch = run_watch(loop, r.mgr, how)
    try:
        write_in_place(r.key, v2.key_pem)
        write_in_place(r.cert, v2.cert_pem)
        took = wait_for(lambda: r.serial() == v2.serial, timeout=2 * POLL + 1.0)
    finally:
        stop_watch(loop, watch)
    assert took < bound(how)
    counts = r.counts()
    # a tick landing between the two writes legitimately sees a mismatch once (split write)
    assert counts.get("ok") == 1 and set(counts) <= {"ok", "parse_error"}


@pytest.mark.parametrize("how", WATCHES)
def test_atomic_rename_is_served_within_the_poll_interval(r: Rig, loop: LoopThread, v2: Issued, how: str) -> None:
    watch = run_watch(loop, r.mgr, how)
    try:
        rotate_pair(r.cert, r.key, v2)
        took = wait_for(lambda: r.serial() == v2.serial, timeout=2 * POLL + 1.0)
    finally:
        stop_watch(loop, watch)
    assert took < bound(how)
    assert r.counts().get("ok") == 1


@pytest.mark.parametrize("how", WATCHES)
def test_kubelet_symlink_swap_is_served_within_the_poll_interval(pki: Pki, loop: LoopThread, tmp_path: Path,
                                                                 v2: Issued, how: str) -> None:
    # Kubernetes secret volume: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>/, swapped atomically.
    first = tmp_path / "..2024_01_01_00_00_00.1"
    first.mkdir()
    shutil.copyfile(pki.server.cert, first / "tls.crt")
    shutil.copyfile(pki.server.key, first / "tls.key")
    (tmp_path / "..data").symlink_to(first.name)
    for name in ("tls.crt", "tls.key"):
        (tmp_path / name).symlink_to(Path("..data") / name)
    r = rig(pki, loop, tmp_path, cert=tmp_path / "tls.crt", key=tmp_path / "tls.key")
    watch = run_watch(loop, r.mgr, how)
    try:
        second = tmp_path / "..2024_01_02_00_00_00.2"
        second.mkdir()
        shutil.copyfile(v2.cert, second / "tls.crt")
        shutil.copyfile(v2.key, second / "tls.key")
        (tmp_path / "..data_tmp").symlink_to(second.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        shutil.rmtree(first)
        took = wait_for(lambda: r.serial() == v2.serial, timeout=2 * POLL + 1.0)
    finally:
        stop_watch(loop, watch)
    assert took < bound(how)
    assert r.counts() == {"ok": 1}  # both files change in one step: never a mismatch


def test_new_material_reaches_clients_that_send_no_sni(r: Rig, v2: Issued) -> None:
    assert s_client_serial(r.port, r.pki.ca.cert) == r.pki.server.serial
    rotate_pair(r.cert, r.key, v2)
    r.mgr.check_for_changes()
    assert s_client_serial(r.port, r.pki.ca.cert) == v2.serial  # s_client to an IP literal sends no SNI


def test_open_connection_keeps_its_certificate_and_keeps_working(r: Rig, v2: Issued) -> None:
    import socket

    ctx = client_context(r.pki)
    with socket.create_connection(("127.0.0.1", r.port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"before\n")
        assert tls.recv(100).endswith(b"|before\n")
        rotate_pair(r.cert, r.key, v2)
        r.mgr.check_for_changes()
        assert r.serial() == v2.serial  # a new handshake gets v2 ...
        tls.sendall(b"after\n")  # ... while this connection carries on
        assert tls.recv(100).endswith(b"|after\n")
        from cryptography import x509

        der = tls.getpeercert(binary_form=True)
        assert der is not None and x509.load_der_x509_certificate(der).serial_number == r.pki.server.serial


def test_alpn_survives_a_swap(r: Rig, v2: Issued) -> None:
    rotate_pair(r.cert, r.key, v2)
    r.mgr.check_for_changes()
    hs = handshake(r.port, client_context(r.pki, alpn=["h2", "http/1.1"]))
    assert (hs.serial, hs.alpn) == (v2.serial, "h2")


# ---------------------------------------------------------------- failures keep the old material


def test_garbage_pem_keeps_the_old_certificate(r: Rig, v2: Issued, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="runtime.tls.reload"):
        write_in_place(r.cert, b"this is not a certificate\n")
        r.mgr.check_for_changes()
    assert r.serial() == r.pki.server.serial
    assert r.counts() == {"parse_error": 1}
    [record] = caplog.records
    assert (record.levelname, record.getMessage()) == (
        "WARNING", "TLS reload: rejected new material, keeping old: TLS PEM contained no certificates")
    assert SpiceFormatter().format(record).endswith(
        f" WARN runtime::tls::reload: TLS reload: rejected new material, keeping old: "
        f"TLS PEM contained no certificates cert_path={r.cert}")
    # unchanged bad file: not retried, not counted again
    r.mgr.check_for_changes()
    assert r.counts() == {"parse_error": 1}
    # and the next good rotation goes through
    rotate_pair(r.cert, r.key, v2)
    r.mgr.check_for_changes()
    assert r.serial() == v2.serial and r.counts() == {"parse_error": 1, "ok": 1}


def test_subscribers_hear_every_publication_and_no_rejected_material(pki: Pki, loop: LoopThread, tmp_path: Path,
                                                                     v2: Issued) -> None:
    """What the Flight front process mirrors: the current pair and CA at once, then each swap."""
    r = rig(pki, loop, tmp_path, mode="request")
    assert r.ca is not None
    heard: list[tuple[int, str | None]] = []
    pair, ca = r.mgr.subscribe(lambda p, c: heard.append((p.leaf.serial_number, c.pem if c else None)))
    assert pair.leaf.serial_number == pki.server.serial and ca is not None and ca.pem == pki.client_ca.cert_pem.decode()
    write_in_place(r.cert, b"this is not a certificate\n")
    r.mgr.check_for_changes()
    assert heard == []
    rotate_pair(r.cert, r.key, v2)
    r.mgr.check_for_changes()
    replace_atomically(r.ca, pki.foreign_ca.cert_pem)
    r.mgr.check_for_changes()
    assert heard == [(v2.serial, pki.client_ca.cert_pem.decode()), (v2.serial, pki.foreign_ca.cert_pem.decode())]


def test_mismatched_key_keeps_the_old_certificate(r: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="runtime.tls.reload"):
        replace_atomically(r.key, r.pki.client.key_pem)
        r.mgr.check_for_changes()
    assert r.serial() == r.pki.server.serial
    assert r.counts() == {"parse_error": 1}
    assert [m.getMessage() for m in caplog.records] == [
        "TLS reload: rejected new material, keeping old: TLS certificate and private key do not match"]


def test_unreadable_file_keeps_the_old_certificate(r: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="runtime.tls.reload"):
        r.cert.unlink()
        r.cert.mkdir()  # reading a directory fails even as root, unlike chmod 000
        r.mgr.check_for_changes()
    assert r.serial() == r.pki.server.serial
    assert r.counts() == {"io_error": 1}
    [record] = caplog.records
    assert record.getMessage() == "TLS reload: failed to read cert file: Is a directory (os error 21)"
    assert record.fields == {"path": r.cert}  # type: ignore[attr-defined]


def test_deleted_file_keeps_the_old_certificate_and_its_return_reloads(r: Rig,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    saved = r.key.read_bytes()
    with caplog.at_level(logging.INFO, logger="runtime.tls.reload"):
        r.key.unlink()
        r.mgr.check_for_changes()
        assert r.serial() == r.pki.server.serial
        assert r.counts() == {"io_error": 1}
        r.mgr.check_for_changes()
        assert r.counts() == {"io_error": 1}  # still missing: no new attempt
        r.key.write_bytes(saved)
        r.mgr.check_for_changes()
    assert r.counts() == {"io_error": 1, "ok": 1}
    assert [m.getMessage() for m in caplog.records] == [
        "TLS reload: failed to read key file: No such file or directory (os error 2)",
        "TLS reload: swapped server certificate",
    ]


def test_split_write_fails_once_then_recovers(r: Rig, v2: Issued) -> None:
    write_in_place(r.cert, v2.cert_pem)  # the cert lands first ...
    r.mgr.check_for_changes()
    assert r.counts() == {"parse_error": 1}
    assert r.serial() == r.pki.server.serial
    write_in_place(r.key, v2.key_pem)  # ... then its key
    r.mgr.check_for_changes()
    assert r.counts() == {"parse_error": 1, "ok": 1}
    assert r.serial() == v2.serial


def test_unchanged_content_is_not_a_reload(r: Rig) -> None:
    replace_atomically(r.cert, r.cert.read_bytes())  # new inode and mtime, same bytes
    r.mgr.check_for_changes()
    assert r.counts() == {}


def test_swap_log_line_names_path_fingerprint_and_scope(r: Rig, v2: Issued, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="runtime.tls.reload"):
        rotate_pair(r.cert, r.key, v2)
        r.mgr.check_for_changes()
    [record] = caplog.records
    from spiced.tls.material import fingerprint

    fp = fingerprint(v2.certificate.public_bytes(
        __import__("cryptography").hazmat.primitives.serialization.Encoding.DER))
    assert SpiceFormatter().format(record).endswith(
        f"  INFO runtime::tls::reload: TLS reload: swapped server certificate cert_path={r.cert} "
        f"fingerprint={fp} scope=public")
    assert r.mgr.fingerprint == fp


# ---------------------------------------------------------------- SIGHUP (forced) reload


def test_forced_reload_counts_ok_even_when_nothing_changed(pki: Pki, loop: LoopThread, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    r = rig(pki, loop, tmp_path, mode="request")
    with caplog.at_level(logging.INFO, logger="runtime.tls.reload"):
        r.mgr.reload_all("sighup")
    assert r.counts() == {"ok": 2}  # the cert/key pair once, the client CA once
    assert [(m.getMessage(), getattr(m, "fields", None)) for m in caplog.records] == [
        ("TLS reload: SIGHUP triggered manual reload of all registered material", {"callbacks": 2}),
        ("TLS reload: swapped server certificate",
         {"cert_path": r.cert, "fingerprint": r.mgr.fingerprint, "scope": "public"}),
        ("TLS reload: swapped client CA bundle", {"ca_path": r.ca, "scope": "public"}),
    ]
    r.mgr.reload_all("sighup")
    assert r.counts() == {"ok": 4}


def test_forced_reload_with_a_missing_file_counts_io_error(r: Rig) -> None:
    r.cert.unlink()
    r.mgr.reload_all()
    assert r.counts() == {"io_error": 1}
    assert r.serial() == r.pki.server.serial


# ---------------------------------------------------------------- inline material never reloads


def test_inline_material_never_reloads(pki: Pki, loop: LoopThread, tmp_path: Path, v2: Issued) -> None:
    ca = tmp_path / "ca.pem"
    shutil.copyfile(pki.client_ca.cert, ca)
    # the CA is a file, but it loads once too: only a file-backed certificate and key make a reload
    settings = TlsSettings(MaterialSource("cli_inline", pem=pki.server.cert_pem),
                           MaterialSource("cli_inline", pem=pki.server.key_pem), "request",
                           MaterialSource("cli_file", path=ca))
    assert not settings.reloadable
    metrics = Metrics()
    mgr = TlsManager.create(settings, metrics)
    port = loop.call(serve_echo(mgr.listener_context("http")))
    replace_atomically(ca, pki.foreign_ca.cert_pem)
    mgr.check_for_changes()
    mgr.reload_all("sighup")
    loop.call(asyncio.wait_for(mgr.watch(asyncio.Event(), interval=0.01), 1))  # returns at once: nothing to watch
    assert reload_counts(metrics) == {}
    hs = handshake(port, client_context(pki, pki.client))
    assert hs.serial == pki.server.serial and hs.reply.startswith("O=spiced tests,CN=client|")


# ---------------------------------------------------------------- client CA rotation (issue 4)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("profile", ["http", "flight"])
def test_removed_ca_client_is_refused_on_its_next_connection_and_cannot_resume(
        pki: Pki, loop: LoopThread, tmp_path: Path, profile: str, version: ssl.TLSVersion) -> None:
    r = rig(pki, loop, tmp_path, mode="required", profile=profile)
    assert r.ca is not None
    ctx = client_context(pki, pki.client, max_version=version)
    first = handshake(r.port, ctx)
    assert first.reply.startswith("O=spiced tests,CN=client|")
    again = handshake(r.port, ctx, session=first.session)
    assert not again.session_reused  # no resumption on client-auth listeners at all
    replace_atomically(r.ca, pki.foreign_ca.cert_pem)  # client-ca removed, foreign-ca added
    r.mgr.check_for_changes()
    assert r.counts() == {"ok": 1}
    assert refused(r.port, ctx) is not None
    assert refused(r.port, ctx, session=again.session) is not None
    newcomer = handshake(r.port, client_context(pki, pki.foreign_client, max_version=version))
    assert newcomer.reply.startswith("O=spiced tests,CN=foreign-client|")


def test_resumption_probe_detects_resumption_on_an_unprotected_listener(pki: Pki, loop: LoopThread) -> None:
    # Control for the test above: the same steps against a client-auth listener built without
    # `forbid_resumption` do resume after the CA swap, so "not resumed" above is a real result.
    current: dict[str, ssl.SSLContext] = {}

    def context(ca: Path) -> ssl.SSLContext:
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        policy.harden(c)
        c.verify_mode = ssl.CERT_REQUIRED
        c.load_cert_chain(pki.server.cert, pki.server.key)
        c.load_verify_locations(ca)
        return c

    listener = context(pki.client_ca.cert)
    current["ctx"] = listener
    listener.sni_callback = lambda conn, _n, _l: setattr(conn, "context", current["ctx"])
    port = loop.call(serve_echo(listener))
    ctx = client_context(pki, pki.client, max_version=ssl.TLSVersion.TLSv1_2)
    first = handshake(port, ctx)
    current["ctx"] = context(pki.foreign_ca.cert)
    assert refused(port, ctx) is not None
    assert handshake(port, ctx, session=first.session).session_reused  # the hole the manager closes


def test_open_connection_survives_a_ca_change(pki: Pki, loop: LoopThread, tmp_path: Path) -> None:
    import socket

    r = rig(pki, loop, tmp_path, mode="required", profile="flight")
    assert r.ca is not None
    ctx = client_context(pki, pki.client)
    with socket.create_connection(("127.0.0.1", r.port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"one\n")
        assert tls.recv(200).endswith(b"|one\n")
        replace_atomically(r.ca, pki.foreign_ca.cert_pem)
        r.mgr.check_for_changes()
        assert refused(r.port, ctx) is not None
        tls.sendall(b"two\n")
        assert tls.recv(200).endswith(b"|two\n")


def test_bad_ca_keeps_old_ca_without_blocking_a_good_certificate(pki: Pki, loop: LoopThread, tmp_path: Path,
                                                                 v2: Issued, caplog: pytest.LogCaptureFixture) -> None:
    r = rig(pki, loop, tmp_path, mode="request")
    assert r.ca is not None
    with caplog.at_level(logging.INFO, logger="runtime.tls.reload"):
        write_in_place(r.ca, b"-----BEGIN CERTIFICATE-----\n@@@\n-----END CERTIFICATE-----\n")
        rotate_pair(r.cert, r.key, v2)
        r.mgr.check_for_changes()
    assert r.counts() == {"ok": 1, "parse_error": 1}
    hs = handshake(r.port, client_context(pki, pki.client))
    assert hs.serial == v2.serial and hs.reply.startswith("O=spiced tests,CN=client|")  # old CA still trusted
    assert [(m.getMessage(), m.fields) for m in caplog.records] == [  # type: ignore[attr-defined]
        (("TLS reload: rejected new client CA bundle, keeping old: failed to parse client CA bundle: "
          "invalid base64 in CERTIFICATE section"), {"ca_path": r.ca}),
        ("TLS reload: swapped server certificate", {"cert_path": r.cert, "fingerprint": r.mgr.fingerprint,
                                                    "scope": "public"}),
    ]


def test_bad_certificate_does_not_block_a_good_ca(pki: Pki, loop: LoopThread, tmp_path: Path) -> None:
    r = rig(pki, loop, tmp_path, mode="request")
    assert r.ca is not None
    replace_atomically(r.ca, pki.client_ca.cert_pem + pki.foreign_ca.cert_pem)  # add a CA
    write_in_place(r.cert, b"garbage")
    r.mgr.check_for_changes()
    assert r.counts() == {"ok": 1, "parse_error": 1}
    hs = handshake(r.port, client_context(pki, pki.foreign_client))
    assert hs.serial == pki.server.serial and hs.reply.startswith("O=spiced tests,CN=foreign-client|")


# ---------------------------------------------------------------- key material never logged


def test_no_key_bytes_in_any_log_output(pki: Pki, loop: LoopThread, tmp_path: Path, v2: Issued,
                                        caplog: pytest.LogCaptureFixture) -> None:
    r = rig(pki, loop, tmp_path, mode="request")
    keys = [r.key, pki.client.key, v2.key]
    body = list(key_body_lines(*keys))
    key_text = v2.key_pem
    lines = key_text.splitlines()
    with caplog.at_level(logging.DEBUG):
        for bad in (
            key_text,  # a key where the certificate belongs
            lines[0] + b"\n" + lines[1][:30] + b"!" + lines[1][31:] + b"\n" + b"\n".join(lines[2:]),
            b"\n".join(lines[:-1]),
        ):
            write_in_place(r.cert, bad)
            r.mgr.check_for_changes()
        write_in_place(r.cert, pki.server.cert_pem)
        for bad in (pki.client.key_pem, lines[0] + b"\n" + lines[1][::-1] + b"\n" + b"\n".join(lines[2:]),
                    b"\n".join(lines[:-1]),
                    pki.server.key_pem.replace(b"KEY-----", b"KEY-----\nProc-Type: 4,ENCRYPTED", 1)):
            write_in_place(r.key, bad)
            r.mgr.check_for_changes()
        assert r.ca is not None
        write_in_place(r.ca, key_text)
        r.mgr.check_for_changes()
        r.mgr.reload_all()
    text = caplog.text + "\n".join(SpiceFormatter().format(rec) for rec in caplog.records)
    assert len(caplog.records) >= 8
    for line in body:
        for i in range(0, len(line) - 12, 4):
            assert line[i:i + 12] not in text

"""Rotation under traffic against the real runtime (issue 6): the fast variant of `make soak`, and
every kind of bad rotation while requests and Flight streams run.

The fast variant runs the soak's own phase runner (tests/soak_rig.py) with a few rotations and its
Python loads (wrk, h2load and httpx are for `make soak`, which installs them). Bad rotations are left to
the runtime's 2 s poller where what matters is that its file stamps notice the change (a deleted
file, a directory in its place, a mode change that touches only ctime) and forced with SIGHUP
otherwise; each is followed by a good rotation forced with SIGHUP so the next case starts from valid
material without another poll interval.

Unreadable file: tests run as root, and root reads a mode-000 file because it holds
CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH. So the runtime here is started through util-linux `setpriv`
with those two capabilities dropped from its bounding set: it is still uid 0, but file modes now
apply to it, and `chmod 000` is a real `Permission denied (os error 13)`. (A directory in place of
the file is its own case; a FIFO is not used because opening one blocks.)

Expired certificate (decision): it is swapped in like any certificate that parses and matches its
key, counted `ok`, and an ERROR line says it has expired. Upstream (rustls) swaps it without a word;
refusing it would second-guess the operator's clock and the issuer's, and would keep serving a
certificate that is usually about to expire as well, while the WARN makes the mistake visible.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tests import support
from tests.pki import SERVER_SUBJECT, Issued, Pki, issue
from tests.soak_rig import CA_INVALID, SERVER_INVALID, PhaseSpec, encrypted, run_phase, write_workdir
from tests.soak_traffic import FlightLoad, FlightTarget, PyHttpLoad, ReloadCounter, client_ctx
from tests.support import run_spiced
from tests.tlsprobe import TimedOut, key_body_lines, replace_atomically, wait_for

POLL = 2.0
ROWS = 20_000


# ------------------------------------------------------------------------ fast variant of the soak


@pytest.mark.slow
@pytest.mark.parametrize("spec", [
    PhaseSpec("server certificate, atomic rename, under load", "server", "plain", 1, (SERVER_INVALID[0],),
              rows=ROWS),
    PhaseSpec("client CA bundle, mTLS required, kubelet swap, under load", "client_ca", "kubelet", 1,
              (CA_INVALID[2],), rows=ROWS),
], ids=["server-cert-rename", "client-ca-kubelet"])
def test_rotation_under_load_loses_nothing(spec: PhaseSpec, pki: Pki, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    write_workdir(tmp_path, rows=ROWS)
    report = run_phase(spec, pki, tmp_path)
    report.print()
    assert report.failures == []
    assert report.failed == 0 and report.sent > 100
    assert report.counts.get("ok") == 2  # a rotation, an invalid file, and the good rotation after it
    assert set(report.delays) >= {"http", "flight"}


# --------------------------------------------------------------------------------- bad rotations


@dataclass
class BadCase:
    name: str
    result: str  # the counter's result
    message: str  # regex for the one WARN line
    served: str = "previous"  # "previous" certificate keeps serving, or "new"
    trigger: str = "sighup"  # "poll": left to the 2 s poller (its stamps must notice the change)


BAD_CASES = [
    BadCase("garbage", "parse_error",
            r"rejected new material, keeping old: TLS PEM contained no certificates cert_path="),
    BadCase("truncated", "parse_error",
            r"rejected new material, keeping old: failed to parse TLS certificate: .*(missing|invalid base64)"),
    BadCase("mismatched_key", "parse_error",
            r"rejected new material, keeping old: TLS certificate and private key do not match cert_path="),
    BadCase("encrypted_key", "parse_error",
            r"rejected new material, keeping old: failed to parse TLS private key: .*encrypted"),
    BadCase("deleted", "io_error", r"failed to read cert file: No such file or directory \(os error 2\)",
            trigger="poll"),
    BadCase("unreadable", "io_error", r"failed to read cert file: Permission denied \(os error 13\)", trigger="poll"),
    BadCase("directory", "io_error", r"failed to read cert file: Is a directory \(os error 21\)", trigger="poll"),
    BadCase("empty", "parse_error",
            r"rejected new material, keeping old: TLS PEM contained no certificates cert_path="),
    BadCase("expired", "ok", r"(?i)expired", served="new"),
]


def _replace(path: Path, data: bytes) -> None:
    if path.is_dir():
        path.rmdir()
    replace_atomically(path, data)


def _apply_bad(case: str, cert: Path, key: Path, current: Issued, pki: Pki, expired: Issued) -> None:
    if case == "garbage":
        _replace(cert, os.urandom(512))
    elif case == "truncated":
        pem = current.cert_pem
        _replace(cert, pem[: len(pem) // 2])
    elif case == "mismatched_key":
        _replace(key, pki.client.key_pem)
    elif case == "encrypted_key":
        _replace(key, encrypted(current))
    elif case == "deleted":
        cert.unlink()
    elif case == "unreadable":
        cert.chmod(0)
    elif case == "directory":
        cert.unlink()
        cert.mkdir()
    elif case == "empty":
        _replace(cert, b"")
    elif case == "expired":
        _replace(key, expired.key_pem)
        _replace(cert, expired.cert_pem)
    else:
        raise AssertionError(case)


def served_serial(port: int, ca: Path, alpn: str, *, verify: bool = True) -> int:
    """The serial a fresh handshake is served (`verify=False` for a certificate clients must refuse)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def _privileged_reads_dropped() -> list[str]:
    """The command prefix that starts spiced without the capabilities that let root ignore file modes."""
    if os.geteuid() != 0:
        return [sys.executable, "-m", "spiced"]
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running as root needs util-linux `setpriv` to make a file unreadable to the runtime")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--", sys.executable, "-m", "spiced"]


@pytest.fixture
def unprivileged_spiced(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(support, "SPICED", _privileged_reads_dropped())
    yield


@pytest.mark.slow
def test_bad_rotations_under_traffic_keep_the_old_certificate(pki: Pki, tmp_path: Path,
                                                              unprivileged_spiced: None) -> None:
    work = write_workdir(tmp_path / "work", rows=ROWS)
    material = tmp_path / "material"
    material.mkdir()
    cert, key = material / "tls.crt", material / "tls.key"
    shutil.copyfile(pki.server.cert, cert)
    shutil.copyfile(pki.server.key, key)
    expired = issue(pki.ca, pki.directory, "bad-rotation-expired", server=True, subject=SERVER_SUBJECT, expired=True)
    keys = [pki.server.key, pki.client.key, expired.key]
    with run_spiced(work, "--tls-enabled", "true", "--tls-certificate-file", str(cert), "--tls-key-file", str(key),
                    metrics=True) as rt:
        # the unreadable case below only means something if the runtime really lacks DAC override
        status = Path(f"/proc/{rt.proc.pid}/status").read_text()
        cap_eff = int(re.search(r"CapEff:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]
        assert os.geteuid() != 0 or not cap_eff & (1 << 1 | 1 << 2), "spiced still has CAP_DAC_OVERRIDE"
        ports = {"http": (rt.http_port, "http/1.1"), "flight": (rt.flight_port, "h2"),
                 "metrics": (int(rt.addresses["metrics"].rsplit(":", 1)[1]), "http/1.1")}
        counter = ReloadCounter(rt.metrics_url.replace("127.0.0.1", "localhost"), pki.ca.cert)
        http_load = PyHttpLoad("http", rt.http_port, client_ctx(pki.ca.cert), keepalive=4, fresh=1)
        flight_load = FlightLoad("flight", FlightTarget(rt.flight_uri.replace("127.0.0.1", "localhost"),
                                                        pki.ca.cert_pem), "SELECT id, v FROM numbers", ROWS,
                                 ROWS * (ROWS - 1) // 2, slow_seconds=2.0)
        http_load.start()
        flight_load.start()
        current = pki.server
        problems: list[str] = []

        def rotate_bad(case: BadCase) -> None:
            before = counter.read()
            log_from = len(rt.logs())
            _apply_bad(case.name, cert, key, current, pki, expired)
            if case.trigger == "sighup":
                rt.send_signal(signal.SIGHUP)
            try:
                wait_for(lambda: counter.read().get(case.result, 0) > before.get(case.result, 0), 2 * POLL + 3)
            except TimedOut:
                problems.append(f"{case.name}: not counted as {case.result} within {2 * POLL + 3:.0f} s")
            after = counter.read()
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
            # One attempt; two when the poller happened to read the files between the write and SIGHUP.
            attempts = delta.get(case.result, 0)
            if set(delta) != {case.result} or attempts > (2 if case.trigger == "sighup" else 1):
                problems.append(f"{case.name}: counter moved by {delta}, expected {{{case.result!r}: 1}}")
            want = expired.serial if case.served == "new" else current.serial
            for listener, (port, alpn) in ports.items():
                got = served_serial(port, pki.ca.cert, alpn, verify=case.served == "previous")
                if got != want:
                    problems.append(f"{case.name}: {listener} served {got:x}, expected {want:x}")
            warns = [ln for ln in rt.logs()[log_from:] if " WARN " in ln or " ERROR " in ln]
            if len(warns) != max(attempts, 1) or not all(re.search(case.message, w) for w in warns):
                problems.append(f"{case.name}: expected one WARN line matching {case.message!r}, got {warns}")

        try:
            for n, case in enumerate(c for c in BAD_CASES if c.served == "previous"):
                rotate_bad(case)
                # recover with a good rotation (forced with SIGHUP: no second poll interval per case)
                current = pki.issue_server(f"bad-rotation-restore-{n}")
                ok_before = counter.read().get("ok", 0)
                _replace(key, current.key_pem)
                _replace(cert, current.cert_pem)
                rt.send_signal(signal.SIGHUP)
                try:
                    wait_for(lambda b=ok_before, c=current: counter.read().get("ok", 0) > b
                             and served_serial(rt.http_port, pki.ca.cert, "http/1.1") == c.serial, 10)
                except TimedOut:
                    problems.append(f"{case.name}: the good rotation after it was not served")
            assert rt.proc.poll() is None
        finally:
            http_result = http_load.stop()
            flight_result = flight_load.stop()
        # Last, without traffic: once an expired certificate is served, verifying clients refuse it.
        try:
            for case in (c for c in BAD_CASES if c.served == "new"):
                rotate_bad(case)
        finally:
            counter.close()
        logs = rt.logs()
    assert problems == []
    assert (http_result.failed, http_result.errors) == (0, [])
    assert (flight_result.failed, flight_result.errors) == (0, [])
    assert http_result.sent > 50 and flight_result.sent > 10
    text = "\n".join(logs)
    assert "Traceback" not in text
    for line in key_body_lines(*keys):
        for i in range(0, len(line) - 16, 4):
            assert line[i:i + 16] not in text, "private key bytes in the runtime log"

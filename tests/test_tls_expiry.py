"""spiced/tls/expiry.py: certificate expiry in metrics, logs, /v1/status and `spice status`, on the
real runtime, across rotations, with certificates made by the tests to expire soon or already."""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spiced.metrics import Metrics
from spiced.tls.expiry import CertificateFacts, ExpiryMonitor
from tests.pki import Issued, Pki
from tests.support import SPICE, Runtime, run_spiced, write_pod
from tests.tlsprobe import rotate_pair

TLS_POD = """\
version: v1
kind: Spicepod
name: expiry
runtime:
  tls:
    enabled: true
    certificate_file: {cert}
    key_file: {key}
    client_auth_mode: request
    client_auth_ca_file: {ca}
{extra}datasets: []
"""


def start(tmp_path: Path, pki: Pki, leaf: Issued, extra: str = "") -> contextlib.AbstractContextManager[Runtime]:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(leaf.cert_pem)
    key.write_bytes(leaf.key_pem)
    write_pod(tmp_path, TLS_POD.format(cert=cert, key=key, ca=pki.client_ca.cert, extra=extra))
    return run_spiced(tmp_path, metrics=True)


def gauges(rt: Runtime, pki: Pki, name: str) -> dict[tuple[str, str], float]:
    text = httpx.get(rt.metrics_url + "/metrics", verify=ssl.create_default_context(cafile=str(pki.ca.cert))).text
    return {(s.labels["kind"], s.labels["serial_number"]): s.value for f in text_string_to_metric_families(text)
            if f.name == name for s in f.samples if s.labels.get("scope") == "public"}


def status(rt: Runtime, pki: Pki, *, verify: bool = True) -> list[dict[str, object]]:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    if not verify:  # the server's certificate has expired: read what it says anyway
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    entries: list[dict[str, object]] = httpx.get(rt.http_url + "/v1/status", verify=ctx).json()
    return entries


def serial(issued: Issued) -> str:
    return format(issued.serial, "X")


def expiry_lines(rt: Runtime, after: int = 0) -> list[str]:
    return [ln for ln in rt.logs()[after:] if "TLS certificate expires in" in ln or "TLS certificate has expired" in ln]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def test_a_soon_expiring_certificate_is_in_metrics_logs_status_and_a_rotation_updates_them(
        tmp_path: Path, pki: Pki) -> None:
    soon = pki.issue_server("soon", days=10)
    with start(tmp_path, pki, soon) as rt:
        # metrics: the served certificate and the trusted client CA, as Unix seconds
        assert gauges(rt, pki, "x509_cert_not_after") == {
            ("server", serial(soon)): soon.certificate.not_valid_after_utc.timestamp(),
            ("client_ca", format(pki.client_ca.certificate.serial_number, "X")):
                pki.client_ca.certificate.not_valid_after_utc.timestamp()}
        assert gauges(rt, pki, "x509_cert_not_before")[("server", serial(soon))] == \
            soon.certificate.not_valid_before_utc.timestamp()
        # logs: one WARN at startup with subject, serial and days left
        [line] = expiry_lines(rt)
        assert re.search(r" WARN runtime::tls: TLS certificate expires in (9\.\d|10\.0) days: scope=public kind=server "
                         r'subject="CN=spiced\.localhost,.*" serial=' + serial(soon) + r" not_after=", line), line
        # status: every TLS listener says what it serves and trusts
        entries = status(rt, pki)
        assert {e["name"] for e in entries if "tls" in e} == {"http", "flight", "metrics"}
        tls = entries[0]["tls"]
        assert isinstance(tls, dict)
        assert tls["certificate"]["serial"] == serial(soon)  # type: ignore[index]
        assert tls["certificate"]["not_after"] == soon.certificate.not_valid_after_utc.isoformat()  # type: ignore[index]
        assert tls["certificate"]["source"] == f"file {tmp_path / 'server.crt'}"  # type: ignore[index]
        assert tls["certificate"]["sha256_fingerprint"] == soon.certificate.fingerprint(  # type: ignore[index]
            __import__("cryptography").hazmat.primitives.hashes.SHA256()).hex()
        assert [c["subject"] for c in tls["client_ca"]] == ["O=spiced tests,CN=client-ca test CA"]  # type: ignore[index]

        # a rotation to a long-lived certificate: the old series is gone, no new warning
        lasting = pki.issue_server("lasting", days=400)
        mark = len(rt.logs())
        rotate_pair(tmp_path / "server.crt", tmp_path / "server.key", lasting)
        rt.wait_for_log("TLS reload: swapped server certificate", after=mark)
        assert set(gauges(rt, pki, "x509_cert_not_after")) == {
            ("server", serial(lasting)), ("client_ca", format(pki.client_ca.certificate.serial_number, "X"))}
        assert status(rt, pki)[0]["tls"]["certificate"]["serial"] == serial(lasting)  # type: ignore[index]
        assert expiry_lines(rt, mark) == []

        # a rotation to an expired certificate: one ERROR line, and it is still served (as upstream)
        expired = pki.issue_server("gone", expired=True)
        mark = len(rt.logs())
        rotate_pair(tmp_path / "server.crt", tmp_path / "server.key", expired)
        rt.wait_for_log("TLS certificate has expired", after=mark)
        [line] = expiry_lines(rt, mark)
        assert re.search(r" ERROR runtime::tls: TLS certificate has expired; it is still served.*serial="
                         + serial(expired), line)
        assert status(rt, pki, verify=False)[0]["tls"]["certificate"]["serial"] == serial(expired)  # type: ignore[index]


def test_the_warning_threshold_is_configurable(tmp_path: Path, pki: Pki) -> None:
    with start(tmp_path, pki, pki.issue_server("soon", days=10), extra="    expiry_warning_days: 5\n") as rt:
        rt.wait_for_log("All endpoints secured with TLS")
        assert expiry_lines(rt) == []
        assert gauges(rt, pki, "x509_cert_not_after")  # still measured


def test_a_negative_threshold_is_refused_with_one_line(tmp_path: Path, pki: Pki) -> None:
    leaf = pki.issue_server("x")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(leaf.cert_pem)
    key.write_bytes(leaf.key_pem)
    write_pod(tmp_path, TLS_POD.format(cert=cert, key=key, ca=pki.client_ca.cert,
                                       extra="    expiry_warning_days: -1\n"))
    done = subprocess.run([sys.executable, "-m", "spiced", "--http", "127.0.0.1:0", "--flight", "127.0.0.1:0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "spicepod.yaml" in line and "expiry_warning_days" in line


def test_warnings_repeat_once_a_day_and_an_expiry_is_logged_once(caplog: pytest.LogCaptureFixture, pki: Pki) -> None:
    soon = pki.issue_server("soon", days=3)
    facts = [CertificateFacts.of(soon.certificate, "public", "server", "inline")]
    monitor = ExpiryMonitor(lambda: facts, Metrics(), warning_days=30)
    day = datetime.now(UTC)
    with caplog.at_level(logging.WARNING, logger="runtime.tls"):
        for hours in (0, 1, 5):  # the hourly checks of one day
            monitor.check(day + timedelta(hours=hours))
        monitor.check(day + timedelta(days=1))
        after = soon.certificate.not_valid_after_utc
        monitor.check(after + timedelta(minutes=1))
        monitor.check(after + timedelta(days=1))
    assert [(r.levelname, r.getMessage()[:27]) for r in caplog.records] == [
        ("WARNING", "TLS certificate expires in "), ("WARNING", "TLS certificate expires in "),
        ("ERROR", "TLS certificate has expired")]


def test_spice_status_prints_the_certificates(tmp_path: Path, pki: Pki) -> None:
    soon = pki.issue_server("soon", days=10)
    with start(tmp_path, pki, soon) as rt:
        done = subprocess.run([*SPICE, "status", "--http-endpoint", rt.http_url,
                               "--tls-root-certificate-file", str(pki.ca.cert)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert ["KIND", "SUBJECT", "ISSUER", "SERIAL", "NOT_AFTER", "SHA256", "SOURCE"] in lines
    rows = {line[0]: line for line in lines if line and line[0] in ("server", "client")}
    assert serial(soon) in rows["server"]
    assert format(pki.client_ca.certificate.serial_number, "X") in rows["client"]

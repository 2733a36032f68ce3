"""`spice cluster tls init` / `spice cluster tls add` (spice_cli/cluster_pki.py): upstream's texts, files
and prompts, certificates checked with `openssl verify` and `openssl x509`."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from spice_cli.app import app
from spice_cli.cluster_pki import CA_CN
from tests.support import SPICE

runner = CliRunner()


def spice(home: Path, *args: str, answer: str = "") -> tuple[int, str]:
    result = runner.invoke(app, list(args), input=answer, env={"HOME": str(home)})
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def openssl(*args: str) -> str:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path


def pki(home: Path) -> Path:
    return home / ".spice" / "pki"


def test_init_and_add_as_upstream_in_a_real_process(home: Path) -> None:
    env = {**os.environ, "HOME": str(home)}
    done = subprocess.run([*SPICE, "cluster", "tls", "init"], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "Test PKI infrastructure initialized successfully!" in lines
    assert f"CA Certificate: {pki(home) / 'ca.crt'}" in lines
    assert f"CA Private Key: {pki(home) / 'ca.key'}" in lines
    assert any(line.startswith("Validity:       10 years (until ") for line in lines)
    assert "WARNING: This CA is for development and testing only." in lines
    assert "  Run spice cluster tls add <client-name> to create a certificate for a cluster member." in lines

    done = subprocess.run([*SPICE, "cluster", "tls", "add", "executor1", "--host", "node1.cluster.local"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "Certificate for 'executor1' created successfully!" in lines
    assert "CN:          executor1" in lines
    assert "DNS SANs:    localhost, node1.cluster.local" in lines
    assert "IP SANs:     127.0.0.1" in lines

    ca, leaf = pki(home) / "ca.crt", pki(home) / "executor1.crt"
    assert openssl("verify", "-CAfile", str(ca), str(leaf)).strip() == f"{leaf}: OK"
    # clientAuth and serverAuth both: each node dials and is dialled with the same certificate.
    assert openssl("verify", "-CAfile", str(ca), "-purpose", "sslclient", str(leaf)).strip() == f"{leaf}: OK"
    assert openssl("verify", "-CAfile", str(ca), "-purpose", "sslserver", str(leaf)).strip() == f"{leaf}: OK"
    ext = openssl("x509", "-in", str(leaf), "-noout", "-ext", "extendedKeyUsage,subjectAltName")
    assert "TLS Web Client Authentication, TLS Web Server Authentication" in ext
    assert "DNS:localhost, DNS:node1.cluster.local, IP Address:127.0.0.1" in ext
    subject = openssl("x509", "-in", str(ca), "-noout", "-subject", "-ext", "basicConstraints")
    assert f"CN = {CA_CN}, OU = " in subject
    assert "CA:TRUE, pathlen:0" in subject


def test_files_are_private_and_keys_are_p256(home: Path) -> None:
    assert spice(home, "cluster", "tls", "init")[0] == 0
    assert spice(home, "cluster", "tls", "add", "node", "--host", "10.1.2.3")[0] == 0
    assert stat.S_IMODE(pki(home).stat().st_mode) == 0o700
    for name in ("ca.crt", "ca.key", "node.crt", "node.key"):
        assert stat.S_IMODE((pki(home) / name).stat().st_mode) == 0o600, name
    leaf = x509.load_pem_x509_certificate((pki(home) / "node.crt").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert leaf.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_init_prompts_before_replacing_the_ca(home: Path) -> None:
    assert spice(home, "cluster", "tls", "init")[0] == 0
    before = (pki(home) / "ca.crt").read_bytes()
    code, out = spice(home, "cluster", "tls", "init", answer="n\n")
    assert code == 0
    assert out == "CA certificate already exists. Overwrite (y/n)? Aborted.\n"
    assert (pki(home) / "ca.crt").read_bytes() == before
    code, out = spice(home, "cluster", "tls", "init", answer="y\n")
    assert code == 0 and out.startswith("CA certificate already exists. Overwrite (y/n)? \n")
    assert (pki(home) / "ca.crt").read_bytes() != before


def test_add_prompts_before_replacing_a_certificate(home: Path) -> None:
    assert spice(home, "cluster", "tls", "init")[0] == 0
    assert spice(home, "cluster", "tls", "add", "scheduler1")[0] == 0
    before = (pki(home) / "scheduler1.crt").read_bytes()
    code, out = spice(home, "cluster", "tls", "add", "scheduler1", answer="\n")
    assert (code, out) == (0, "Certificate for 'scheduler1' already exists. Overwrite (y/n)? Aborted.\n")
    assert (pki(home) / "scheduler1.crt").read_bytes() == before
    code, out = spice(home, "cluster", "tls", "add", "scheduler1", answer="Y\n")
    assert code == 0 and "Certificate for 'scheduler1' created successfully!" in out
    assert (pki(home) / "scheduler1.crt").read_bytes() != before


def test_refusals(home: Path) -> None:
    assert spice(home, "cluster", "tls", "add", "node1") == \
        (1, "CA certificate not found. Run 'spice cluster tls init' first.\n")
    assert spice(home, "cluster", "tls", "init")[0] == 0
    assert spice(home, "cluster", "tls", "add", "node/1") == \
        (1, "client name can only contain letters, numbers, hyphens, and underscores\n")
    assert not list(pki(home).glob("node*"))

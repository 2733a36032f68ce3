"""No part of a private key ever leaves the process (issue 6): every TLS error path — startup
errors from files, inline flags, the spicepod and `${secrets:…}`, the key given where something
else was expected, and bad rotations — is run with one known private key, and no log line (at
TRACE verbosity), error message or HTTP body may contain any 12-character piece of its base64
body, in PKCS#8 or SEC1 form.
"""

from __future__ import annotations

import re
import shutil
import signal
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tests.pki import Issued, Pki
from tests.support import Runtime, run_spiced, spiced_fails, write_pod
from tests.tlsprobe import replace_atomically

WINDOW = 12
BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{12,}")  # to show where a key leaked without repeating it


def _body(pem: bytes) -> str:
    return "".join(ln for ln in pem.decode().splitlines() if ln and not ln.startswith("-----") and ":" not in ln)


def fragments(key: Issued) -> set[str]:
    """Every WINDOW-long piece of the key's base64 body, within a line and across line breaks."""
    private = serialization.load_pem_private_key(key.key_pem, password=None)
    sec1 = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
    out = set()
    for pem in (key.key_pem, sec1):
        body = _body(pem)
        out |= {body[i:i + WINDOW] for i in range(len(body) - WINDOW + 1)}
    return out


def leaks(text: str, pieces: set[str]) -> list[str]:
    flat = text.replace("\\n", "").replace("\n", "")  # a key printed with its line breaks, raw or escaped
    return sorted(p for p in pieces if p in text or p in flat)[:3]


@pytest.fixture(scope="module")
def key(pki: Pki) -> Issued:
    """The known key: the server's own, so the runtime can also run with it."""
    return pki.server


def variants(key: Issued) -> dict[str, bytes]:
    pem = key.key_pem
    lines = pem.splitlines(keepends=True)
    body = lines[1]
    private = serialization.load_pem_private_key(pem, password=None)
    sec1 = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption()).splitlines(keepends=True)
    return {
        "truncated": b"".join(lines[:2]),
        "corrupted": lines[0] + body[:20] + (b"A" if body[20:21] != b"A" else b"B") + body[21:] + b"".join(lines[2:]),
        "legacy-encrypted": lines[0] + b"Proc-Type: 4,ENCRYPTED\n"
                                       b"DEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\n"
                            + b"".join(lines[1:]),
        "sec1-corrupted": sec1[0] + sec1[1][:30] + b"*" + sec1[1][31:] + b"".join(sec1[2:]),
    }


# ------------------------------------------------------------------------------- startup errors


@dataclass
class Case:
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    tls_pod: str | None = None  # the `runtime.tls` block, indented under `runtime:`


def startup_cases(tmp: Path, pki: Pki, key: Issued) -> dict[str, Case]:
    k, other = str(key.key), pki.issue_server("leak-other")
    pem = key.key_pem.decode()
    files = {}
    for name, data in variants(key).items():
        files[name] = tmp / f"{name}.key"
        files[name].write_bytes(data)
    tls = ["--tls-enabled", "true"]
    cert = ["--tls-certificate-file", str(pki.server.cert)]
    indented = "\n".join("        " + ln for ln in pem.splitlines())
    cases = {
        "key file, no certificate": Case([*tls, "--tls-key-file", k]),
        "key in the certificate's place": Case([*tls, "--tls-certificate-file", k, "--tls-key-file", k]),
        "key of another certificate": Case([*tls, "--tls-certificate-file", str(other.cert), "--tls-key-file", k]),
        "inline key, garbage certificate": Case([*tls, "--tls-certificate", "garbage", "--tls-key", pem]),
        "inline key, another certificate": Case([*tls, "--tls-certificate", other.cert_pem.decode(), "--tls-key", pem]),
        "key as client CA file": Case([*tls, *cert, "--tls-key-file", k, "--tls-client-auth-mode", "required",
                                       "--tls-client-auth-ca-file", k]),
        "inline key as client CA": Case([*tls, "--tls-certificate", pki.server.cert_pem.decode(), "--tls-key", pem,
                                         "--tls-client-auth-mode", "request", "--tls-client-auth-ca", pem]),
        "spicepod inline key, another certificate": Case(tls_pod=(
            f"    enabled: true\n    certificate_file: {other.cert}\n    key: |\n{indented}\n")),
        "secret key, another certificate": Case(env={"TLS_KEY": pem}, tls_pod=(
            f"    enabled: true\n    certificate_file: {other.cert}\n    key: ${{secrets:tls_key}}\n")),
        "secret key, no certificate": Case(env={"SPICE_TLS_KEY": pem}, tls_pod=(
            "    enabled: true\n    key: ${secrets:tls_key}\n")),
        # the key's text given where a path or a word was expected
        "PEM given to --tls-key-file": Case([*tls, *cert, "--tls-key-file", pem]),
        "PEM given to --tls-certificate-file": Case([*tls, "--tls-certificate-file", pem, "--tls-key-file", k]),
        "PEM given to --tls-client-auth-ca-file": Case([*tls, *cert, "--tls-key-file", k, "--tls-client-auth-mode",
                                                        "required", "--tls-client-auth-ca-file", pem]),
        "secret holding PEM used as key_file": Case(env={"TLS_KEY": pem}, tls_pod=(
            f"    enabled: true\n    certificate_file: {pki.server.cert}\n    key_file: ${{secrets:tls_key}}\n")),
        "PEM given to --tls-client-auth-mode": Case([*tls, *cert, "--tls-key-file", k, "--tls-client-auth-mode", pem]),
        "PEM given to --tls-enabled": Case(["--tls-enabled", pem]),
    }
    for name, path in files.items():
        cases[f"{name} key file"] = Case([*tls, *cert, "--tls-key-file", str(path)])
    cases["corrupted inline key"] = Case([*tls, "--tls-certificate", pki.server.cert_pem.decode(), "--tls-key",
                                          files["corrupted"].read_text()])
    return cases


def test_startup_errors_never_show_the_key(pki: Pki, key: Issued, tmp_path: Path) -> None:
    pieces = fragments(key)
    cases = startup_cases(tmp_path, pki, key)

    def run(name: str) -> tuple[str, str | None]:
        case = cases[name]
        work = tmp_path / f"case-{abs(hash(name))}"
        pod = "version: v1\nkind: Spicepod\nname: leak\n"
        if case.tls_pod is not None:
            pod += "runtime:\n  tls:\n" + case.tls_pod
        write_pod(work, pod)
        r = spiced_fails(work, "-vv", *case.args, env=case.env, timeout=20)
        if r.returncode == 0:
            return name, "exited 0"
        found = leaks(r.stderr, pieces)
        if not found:
            return name, None
        lines = r.stderr.splitlines()
        line = next((ln for ln in lines if ln.startswith(("Spice Runtime error:", "spiced: error:"))), r.stderr)
        return name, f"exit {r.returncode}, key bytes in: {BASE64_RUN.sub('<key bytes>', line)[:160]!r}"

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(run, cases))
    assert len(results) == len(cases) >= 20
    problems = {name: problem for name, problem in results.items() if problem}
    assert not problems, "\n".join(f"{name}: {problem}" for name, problem in sorted(problems.items()))


# ------------------------------------------------------------------------------- rotations


@pytest.fixture
def running(pki: Pki, key: Issued, tmp_path: Path) -> Iterator[tuple[Runtime, Path, Path, Path]]:
    material = tmp_path / "material"
    material.mkdir()
    cert, key_file, ca = material / "tls.crt", material / "tls.key", material / "ca.crt"
    shutil.copyfile(pki.server.cert, cert)
    shutil.copyfile(key.key, key_file)
    shutil.copyfile(pki.client_ca.cert, ca)
    write_pod(tmp_path)
    with run_spiced(tmp_path, "-vv", "--tls-enabled", "true", "--tls-certificate-file", str(cert), "--tls-key-file",
                    str(key_file), "--tls-client-auth-mode", "request", "--tls-client-auth-ca-file", str(ca),
                    metrics=True) as rt:
        yield rt, cert, key_file, ca


def test_bad_rotations_never_show_the_key(pki: Pki, key: Issued, running: tuple[Runtime, Path, Path, Path]) -> None:
    rt, cert, key_file, ca = running
    pieces = fragments(key)
    other = pki.issue_server("leak-rotation-other")
    bad = {f"key file: {name}": {key_file: data} for name, data in variants(key).items()}
    bad["key in the certificate's place"] = {cert: key.key_pem}
    bad["key as the client CA bundle"] = {ca: key.key_pem}
    bad["key of another certificate"] = {cert: other.cert_pem}
    good = {cert: pki.server.cert_pem, key_file: key.key_pem, ca: pki.client_ca.cert_pem}
    # Files are renamed into place: the 2 s poller runs meanwhile, and must never read a half-written file.
    for files in bad.values():
        start = len(rt.logs())
        for path, data in files.items():
            replace_atomically(path, data)
        rt.send_signal(signal.SIGHUP)
        rt.wait_for_log(r" WARN runtime::tls::reload: TLS reload: (rejected|failed)", after=start)
        for path, data in good.items():  # back to the good material before the next case
            replace_atomically(path, data)
        start = len(rt.logs())
        rt.send_signal(signal.SIGHUP)
        rt.wait_for_log(r"TLS reload: swapped server certificate", after=start)
    assert rt.proc.poll() is None
    bodies = http_bodies(rt, pki)
    found = {name: leaks(text, pieces) for name, text in [("log", "\n".join(rt.logs())), *bodies.items()]}
    assert {name: f for name, f in found.items() if f} == {}
    # One warning per bad case, or two when a poll tick caught the bad file before SIGHUP re-read it.
    # (The failing queries that probe the HTTP bodies above have WARN lines of their own.)
    warnings = [ln for ln in rt.logs() if " WARN " in ln and " runtime::query: Query failed " not in ln]
    assert all(" WARN runtime::tls::reload: TLS reload: " in ln for ln in warnings), warnings
    assert len(bad) <= len(warnings) <= 2 * len(bad), warnings


def http_bodies(rt: Runtime, pki: Pki) -> dict[str, str]:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    out = {}
    with httpx.Client(verify=ctx, timeout=30) as http:
        base = rt.http_url.replace("127.0.0.1", "localhost")
        for path in ("/v1/spicepods", "/v1/spicepods?format=csv", "/v1/status", "/v1/datasets?status=true",
                     "/metrics", "/v1/openapi.json", "/v1/nope"):
            out[path] = http.get(base + path).text
        out["sql error"] = http.post(base + "/v1/sql", content=b"SELECT * FROM tls_key").text
        out["metrics listener"] = http.get(rt.metrics_url.replace("127.0.0.1", "localhost") + "/metrics").text
    return out


def test_inline_key_is_not_served_back(pki: Pki, key: Issued, tmp_path: Path) -> None:
    pem = key.key_pem.decode()
    indented = "\n".join("      " + ln for ln in pem.splitlines())
    cert_indented = "\n".join("      " + ln for ln in pki.server.cert_pem.decode().splitlines())
    write_pod(tmp_path, "version: v1\nkind: Spicepod\nname: leak\nruntime:\n  tls:\n    enabled: true\n"
                        f"    certificate: |\n{cert_indented}\n    key: |\n{indented}\n")
    with run_spiced(tmp_path, "-vv", metrics=True) as rt:
        bodies = http_bodies(rt, pki)
        logs = "\n".join(rt.logs())
    pieces = fragments(key)
    found = {name: leaks(text, pieces) for name, text in [("log", logs), *bodies.items()]}
    assert {name: f for name, f in found.items() if f} == {}
    assert "leak" in bodies["/v1/spicepods"]  # the spicepod itself is served, only redacted

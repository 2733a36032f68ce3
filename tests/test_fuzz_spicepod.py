"""Fuzzed spicepod.yaml (issue 6): random keys, types and nesting always end in a configuration
the runtime can run, or in a `ConfigError` with one line naming the problem; never another
exception (a traceback), never a hang. Most examples go through the in-process loader
(`spiced.config.load_config`, then the TLS material check the runtime does next); a handful of
real processes check the same at the process boundary: exit 1 and one `Spice Runtime error:`
line, or a server that becomes ready.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spiced.config import load_config
from spiced.errors import ConfigError
from spiced.metrics import Metrics
from spiced.tls.manager import TlsManager
from tests import support
from tests.pki import Pki
from tests.support import run_spiced, spiced_fails, write_pod

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z (TRACE|DEBUG| INFO| WARN|ERROR) \S+: ")
LOAD_SECONDS = 10.0  # loading any spicepod, however odd, takes less than this

KEYS = ["version", "kind", "name", "runtime", "tls", "enabled", "certificate_file", "key_file", "certificate", "key",
        "client_auth_mode", "client_auth_ca_file", "client_auth_ca", "auth", "api-key", "keys", "query", "timeout",
        "task_history", "captured_output", "secrets", "from", "params", "datasets", "views", "sql", "sql_ref",
        "acceleration", "engine", "mode", "refresh_mode", "refresh_check_interval", "refresh_sql", "file_format",
        "description", "metadata", "dependsOn", "time_column", "time_format", "catalogs", "models", "extensions",
        "on_zero_results", "indexes", "primary_key", "ref", "dependencies", "csv_has_header", "file_path"]
WORDS = ["${secrets:x}", "${env:HOME}", "${ secrets : tls_key }", "${secrets:}", "${nostore:k}", "${", "file:trips.csv",
         "file:missing.csv", "file:trips", "file:", "file://trips.csv", "s3://bucket/x", "arrow", "duckdb", "1s", "-1s",
         "10x", "500ms", "true", "false", "required", "request", "none", "v1", "v1beta1", "Spicepod", "csv", "parquet",
         "json", "full", "append", "memory", "SELECT 1", "SELECT * FROM trips", "env", "kubernetes:s", "a.b.c", "",
         "ca.pem", "/dev/null", "/", "."]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(), st.text(max_size=30),
                    st.sampled_from(WORDS))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12))
values = st.recursive(scalars,
                      lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
                      max_leaves=20)
tls = st.fixed_dictionaries({}, optional={k: values for k in ["enabled", "certificate_file", "key_file", "certificate",
                                                                "key", "client_auth_mode", "client_auth_ca_file",
                                                                "client_auth_ca"]} | {"extra": values})
runtime = st.one_of(values, st.fixed_dictionaries({}, optional={"tls": st.one_of(tls, values), "auth": values,
                                                                "query": values, "task_history": values}))
dataset = st.one_of(values, st.fixed_dictionaries(
    {"from": st.one_of(st.sampled_from(WORDS), scalars),
     "name": st.one_of(st.sampled_from(["trips", "a.b", "a.b.c", ""]), scalars)},
    optional={"params": values,
              "acceleration": st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values, max_size=4)),
              "description": values, "metadata": values}))
spicepod = st.fixed_dictionaries(
    {"version": st.one_of(st.sampled_from(["v1", "v1beta1", "v2", "v2.0.0-rc.1"]), scalars),
     "kind": st.one_of(st.just("Spicepod"), scalars), "name": st.one_of(st.just("fuzz"), scalars)},
    optional={"runtime": runtime, "datasets": st.one_of(st.lists(dataset, max_size=3), values),
              "views": st.one_of(st.lists(st.dictionaries(st.sampled_from(["name", "sql", "sql_ref", "x"]), scalars),
                                          max_size=2), values),
              "secrets": values, "catalogs": values, "extensions": values, "junk": values})
flags = st.lists(st.sampled_from([["--tls-enabled", "true"], ["--tls-enabled", "false"],
                                  ["--set-runtime", "query.timeout=5s"], ["--set-runtime", "tls=1"],
                                  ["--set-runtime", "x"], ["--tls-client-auth-mode", "request"],
                                  ["--tls-certificate-file", "missing.pem"], ["--tls-key", "not a key"]]), max_size=2)


def outcome(workdir: Path, text: str, argv: list[str]) -> str:
    """Load `text` as the spicepod the way the runtime does: "ok" or the ConfigError's message."""
    (workdir / "spicepod.yaml").write_text(text)
    started = time.monotonic()
    try:
        config = load_config([str(workdir), *argv], workdir=workdir)
        if config.tls is not None:
            TlsManager.create(config.tls, Metrics())
        result = "ok"
    except ConfigError as e:
        result = str(e)
        assert result and "\n" not in result.strip(), f"not one line: {result!r}"
        assert "Traceback" not in result
    assert time.monotonic() - started < LOAD_SECONDS, "loading took too long"
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pod(tmp_path_factory.mktemp("fuzz-spicepod"))


@FUZZ
@given(pod=spicepod, argv=flags)
def test_random_spicepods_load_or_fail_with_one_line(workdir: Path, pod: dict[str, object],
                                                     argv: list[list[str]]) -> None:
    outcome(workdir, yaml.safe_dump(pod, allow_unicode=True), [a for pair in argv for a in pair])


@FUZZ
@given(text=st.text(max_size=400))
@example(text="version: v1\nkind: Spicepod\nname: x\n\t- bad indent")
@example(text="\x00\x01")
@example(text="? [a, b]\n: c\n")
@example(text="version: v1\nkind: Spicepod\nname: !!python/object:os.system x\n")
@example(text="version: v1\nkind: Spicepod\nname: x\nruntime: {1: 2}\n")
def test_random_text_loads_or_fails_with_one_line(workdir: Path, text: str) -> None:
    outcome(workdir, text, [])


@FUZZ
@given(raw=st.binary(max_size=200))
def test_random_bytes_load_or_fail_with_one_line(workdir: Path, raw: bytes) -> None:
    (workdir / "spicepod.yaml").write_bytes(raw)
    try:
        load_config([str(workdir)], workdir=workdir)
    except ConfigError as e:
        assert "\n" not in str(e).strip()


HEADER = "version: v1\nkind: Spicepod\nname: x\n"
DEEP = HEADER + "metadata: " + "[" * 3000 + "]" * 3000 + "\n"


def alias_bomb(where: str) -> str:
    """Nine levels of nine-fold YAML aliases: tiny text, 9**9 nodes if expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    return HEADER + "\n".join(lines) + f"\ndatasets:\n  - from: file:trips.csv\n    name: t\n    {where}: {{m: *a9}}\n"


# (The alias bomb in `params`, which is expanded, is run as a process below: in-process it could
# only be stopped by killing the test run.)
@pytest.mark.parametrize("text", [DEEP, alias_bomb("metadata")], ids=["nested-3000-deep", "alias-bomb-in-metadata"])
def test_hostile_structures(workdir: Path, text: str) -> None:
    outcome(workdir, text, [])


# ------------------------------------------------------------------------------ real processes

PROCESS_CASES = {
    "yaml-syntax": "version: v1\nkind: Spicepod\nname: [unclosed\n",
    "unknown-tls-key": HEADER + "runtime:\n  tls:\n    enabled: true\n    certificate_fil: x.pem\n",
    "wrong-types": HEADER + "datasets:\n  - from: 5\n    name: {a: 1}\n",
    "bad-duration": HEADER + "datasets:\n  - from: file:trips.csv\n    name: t\n    acceleration:\n"
                             "      refresh_check_interval: soon\n",
    "tls-without-material": HEADER + "runtime:\n  tls:\n    enabled: true\n",
    "nested-3000-deep": DEEP,
    "binary-garbage": "\x00\xff\xfe garbage",
}


@pytest.mark.parametrize("name", list(PROCESS_CASES))
def test_process_exits_1_with_one_line(tmp_path: Path, name: str) -> None:
    write_pod(tmp_path, PROCESS_CASES[name])
    r = spiced_fails(tmp_path, timeout=LOAD_SECONDS + 20)
    lines = r.stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("Spice Runtime error: ")]
    others = [ln for ln in lines if not ln.startswith("Spice Runtime error: ") and not LOG_LINE.match(ln)]
    assert (r.returncode, len(errors), others) == (1, 1, []), r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_process_with_an_alias_bomb_does_not_hang(tmp_path: Path) -> None:
    write_pod(tmp_path, alias_bomb("params"))
    started = time.monotonic()
    # exit 1 with one line, or a server that becomes ready: either is fine, but within the bound
    argv = [*support.SPICED, "--http", "127.0.0.1:0", "--flight", "127.0.0.1:0"]
    with subprocess.Popen(argv, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        try:
            outcome_ = wait_for_listening_or_exit(proc, lines, started + LOAD_SECONDS)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reader.join(5)
    assert outcome_ in ("exited 1", "listening"), f"{outcome_} after {LOAD_SECONDS:.0f} s"
    assert not any("Traceback" in ln for ln in lines)


def wait_for_listening_or_exit(proc: subprocess.Popen[str], lines: list[str], deadline: float) -> str:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited {proc.returncode}"
        if any("Spice Runtime HTTP listening" in ln for ln in list(lines)):
            return "listening"
        time.sleep(0.1)
    return "neither exited nor listening"


@pytest.mark.parametrize("extra", [
    "junk: {a: [1, 2, {b: null}]}\nextensions: 5\n",
    ("datasets:\n  - from: file:trips.csv\n    name: trips\n    params: {file_format: csv, unknown_param: 1}\n"
     "    acceleration: {enabled: true, refresh_mode: full}\n"),
], ids=["unknown-top-level-keys", "odd-but-valid-dataset"])
def test_process_with_an_odd_but_valid_spicepod_serves(tmp_path: Path, extra: str) -> None:
    write_pod(tmp_path, HEADER + extra)
    with run_spiced(tmp_path) as rt:
        import httpx

        assert httpx.get(rt.http_url + "/health").text == "ok\n"
    assert "Traceback" not in "\n".join(rt.logs())


def test_process_with_tls_material_missing_names_the_file(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    shutil.copyfile(pki.server.cert, tmp_path / "c.pem")
    write_pod(tmp_path, HEADER + "runtime:\n  tls:\n    enabled: true\n    certificate_file: c.pem\n"
                                 "    key_file: nope.pem\n")
    r = spiced_fails(tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "Spice Runtime error: Unable to configure TLS: failed to read TLS file at nope.pem: "
        "No such file or directory (os error 2)")

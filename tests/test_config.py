"""Configuration: spicepod discovery and validation, secrets, flag precedence (spiced/config.py,
spiced/spicepod.py, spiced/secrets.py). Errors are checked through the real `spiced` process too."""

from __future__ import annotations

from pathlib import Path

import pytest

from spiced.config import load_config
from spiced.connectors.files import FileOptions
from spiced.errors import ConfigError, TlsConfigError
from spiced.secrets import SecretResolver, SecretStoreSpec
from tests.support import spiced_fails, write_pod


def pod(tmp_path: Path, text: str) -> Path:
    (tmp_path / "spicepod.yaml").write_text(text)
    (tmp_path / "trips.csv").write_text("id,city\n1,Seattle\n")
    return tmp_path


HEAD = "version: v1\nkind: Spicepod\nname: t\n"


def config_error(tmp_path: Path, text: str, *argv: str) -> str:
    pod(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(list(argv), workdir=tmp_path, environ={})
    return str(e.value)


def test_defaults_and_dataset(tmp_path: Path) -> None:
    pod(tmp_path, HEAD + "datasets:\n  - from: file:trips.csv\n    name: trips\n    acceleration:\n"
                         "      refresh_check_interval: 10s\n")
    c = load_config([], workdir=tmp_path, environ={})
    assert c.http_addr == ("127.0.0.1", 8090) and c.flight_addr == ("127.0.0.1", 50051) and c.metrics_addr is None
    (ds,) = c.spicepod.datasets
    assert isinstance(ds.options, FileOptions)
    assert ds.connector == "file" and ds.options.file_format == "csv" and ds.options.url == str(tmp_path / "trips.csv")
    assert ds.acceleration is not None and ds.acceleration.refresh_check_interval == 10.0
    assert c.tls is None and c.api_keys == ()


def test_spicepod_yml_fallback_and_positional_path(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "spicepod.yml").write_text(HEAD)
    assert load_config([str(tmp_path / "sub")], workdir=tmp_path, environ={}).spicepod.name == "t"


@pytest.mark.parametrize("text, expected", [
    (HEAD + "datasets:\n  - from: file:trips.csv\n    name: t\n    acceleration:\n      engin: arrow\n",
     "datasets[0].acceleration.engin: unknown field"),
    (HEAD + "datasets:\n  - from: file:trips.csv\n    name: t\n    acceleration:\n      engine: duckdb2\n",
     "The accelerator engine duckdb2 is not available"),
    (HEAD + "runtime:\n  tls:\n    enabled: true\n    certificate_fil: x\n",
     "runtime.tls.certificate_fil: unknown field"),
    (HEAD + "runtime:\n  tls:\n    certificate_file: x\n", "runtime.tls.enabled: missing required field"),
    (HEAD + "runtime:\n  tls:\n    enabled: maybe\n", "runtime.tls.enabled: "),
    (HEAD + "runtime:\n  tls:\n    enabled: true\n    client_auth_mode: sometimes\n", "runtime.tls.client_auth_mode"),
    ("version: v3\nkind: Spicepod\nname: t\n", "version: unsupported spicepod version 'v3'"),
    (HEAD + "datasets:\n  - from: file:missing.parquet\n    name: t\n", "datasets[0].from: file not found"),
    (HEAD + "datasets:\n  - from: file:trips.csv\n", "datasets[0].name: missing required field"),
    (HEAD + "datasets: 5\n", "datasets: "),
    (HEAD + "datasets:\n  - from: file:trips.csv\n    name: a\n  - from: file:trips.csv\n    name: A\n",
     "Unable to load duplicate spicepod dataset component 'A'"),
    (HEAD + "datasets:\n  - from: file:trips.csv\n    name: c.s.t\n", "Dataset names should not include a catalog"),
    (HEAD + "datasets:\n  - from: file:trips.csv\n    name: t\n    acceleration:\n      refresh_check_interval: soon\n",
     "invalid duration"),
    (HEAD + "datasets: [\n", "Unable to parse spicepod.yaml: "),
])
def test_bad_spicepod_names_the_key(tmp_path: Path, text: str, expected: str) -> None:
    message = config_error(tmp_path, text)
    assert expected in message
    assert "\n" not in message and str(tmp_path / "spicepod.yaml") in message


def test_unknown_top_level_keys_are_ignored(tmp_path: Path) -> None:
    pod(tmp_path, HEAD + "models: []\nsomething_new: 1\n")
    assert load_config([], workdir=tmp_path, environ={}).spicepod.name == "t"


def test_missing_spicepod_is_upstreams_message(tmp_path: Path) -> None:
    r = spiced_fails(tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip() == ("Spice Runtime error: Failed to start Spice runtime: "
                                f"Unable to load spicepod {tmp_path}: "
                                f"spicepod.yaml not found in {tmp_path}, "
                                "run `spice init <name>` to initialize spicepod.yaml")


def test_bad_spicepod_exits_1_with_one_line(tmp_path: Path) -> None:
    write_pod(tmp_path, HEAD + "datasets:\n  - from: file:trips.csv\n    name: t\n    acceleration:\n"
                               "      engin: arrow\n")
    r = spiced_fails(tmp_path)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "datasets[0].acceleration.engin: unknown field" in r.stderr


@pytest.mark.parametrize("argv", [["--http", "localhost:8090"], ["--tls-enabled"], ["--tls-enabled", "yes"],
                                  ["--no-such-flag"], ["--tls-client-auth-mode", "sometimes"]])
def test_usage_errors_exit_2(tmp_path: Path, argv: list[str]) -> None:
    write_pod(tmp_path)
    assert spiced_fails(tmp_path, *argv).returncode == 2


def test_version(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "spiced", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().startswith("v0.")


# ------------------------------------------------------------------------------ secrets

def test_env_store_rules(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("A=from_env_file\nB=from_env_file\nC=from_env_file\n")
    (tmp_path / ".env.local").write_text("B=from_local\nC=from_local\n")
    r = SecretResolver([], tmp_path, {"C": "from_process", "SPICE_D": "prefixed", "D": "plain"})
    assert r.resolve("${secrets:a}", "p").value == "from_env_file"
    assert r.resolve("${ env:b }", "p").value == "from_local"
    assert r.resolve("${secrets:c}", "p").value == "from_process"
    assert r.resolve("${secrets:d}", "p").value == "prefixed"
    assert r.resolve("x-${secrets:a}-${secrets:d}", "p").value == "x-from_env_file-prefixed"
    missing = r.resolve("${secrets:nope}", "p")
    assert missing.value == "" and missing.missing == ("nope",)


def test_unknown_store_reference(tmp_path: Path) -> None:
    r = SecretResolver([], tmp_path, {})
    with pytest.raises(ConfigError, match="Secret 'vault' referenced in p not found."):
        r.resolve("${vault:x}", "p")


def test_declared_stores_replace_the_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not available"):
        SecretResolver([SecretStoreSpec("k", "kubernetes")], tmp_path, {})


# ------------------------------------------------------------------------------ TLS sources and precedence

TLS_POD = HEAD + "runtime:\n  tls:\n    enabled: {enabled}\n{extra}"


def tls_config(tmp_path: Path, extra: str = "", *argv: str, enabled: str = "true",
               environ: dict[str, str] | None = None):
    pod(tmp_path, TLS_POD.format(enabled=enabled, extra=extra))
    return load_config(list(argv), workdir=tmp_path, environ=environ or {}).tls


def test_precedence_cli_file_over_everything(tmp_path: Path) -> None:
    extra = "    certificate_file: pod.crt\n    key_file: pod.key\n    certificate: POD-INLINE\n    key: POD-KEY\n"
    t = tls_config(tmp_path, extra, "--tls-certificate-file", "cli.crt", "--tls-key", "CLI-KEY")
    assert t is not None
    assert t.certificate.origin == "cli_file" and t.certificate.path == Path("cli.crt")
    assert t.key.origin == "cli_inline" and t.key.pem == b"CLI-KEY"
    assert not t.reloadable


def test_precedence_spicepod_file_over_inline(tmp_path: Path) -> None:
    t = tls_config(tmp_path, "    certificate_file: pod.crt\n    certificate: X\n    key: ${secrets:tls_key}\n",
                   environ={"SPICE_TLS_KEY": "KEYPEM"})
    assert t is not None and t.certificate.origin == "spicepod_file" and t.key.pem == b"KEYPEM"


def test_cli_enables_tls_with_spicepod_material(tmp_path: Path) -> None:
    t = tls_config(tmp_path, "    certificate_file: a.crt\n    key_file: a.key\n", "--tls-enabled", "true",
                   enabled="false")
    assert t is not None and t.reloadable


def test_tls_watch_and_expiry_settings(tmp_path: Path) -> None:
    files = "    certificate_file: a.crt\n    key_file: a.key\n"
    t = tls_config(tmp_path, files)
    assert t is not None and (t.watch, t.expiry_warning_days) == ("notify", 30)
    t = tls_config(tmp_path, files + "    watch: poll\n    expiry_warning_days: 7\n")
    assert t is not None and (t.watch, t.expiry_warning_days) == ("poll", 7)
    with pytest.raises(ConfigError, match=r"watch"):
        tls_config(tmp_path, files + "    watch: inotify\n")


def test_tls_off_ignores_material(tmp_path: Path) -> None:
    assert tls_config(tmp_path, "    certificate_file: a.crt\n", enabled="false") is None


@pytest.mark.parametrize("extra, argv, expected", [
    ("", [], "TLS certificate is required: provide --tls-certificate-file (recommended for hot-reload)"),
    ("    certificate_file: a.crt\n", [], "TLS key is required: provide --tls-key-file (recommended for hot-reload)"),
    ("    certificate_file: a.crt\n    key_file: a.key\n    client_auth_mode: required\n", [],
     "client_auth_mode=required requires a client CA"),
    ("    certificate_file: a.crt\n    key_file: a.key\n", ["--tls-client-auth-mode", "request"],
     "client_auth_mode=request requires a client CA so presented certs can be verified"),
    ("    certificate_file: a.crt\n    key_file: a.key\n    client_auth_ca_file: ca.pem\n", [],
     "client_auth_mode=none must not have a client CA configured"),
    ("    certificate_file: a.crt\n    key_file: a.key\n    client_auth_mode: required\n    client_auth_ca: PEM\n", [],
     "client_auth_ca configured inline but tls.certificate_file/key_file are file-backed"),
    ("    certificate: ${secrets:missing_cert}\n    key_file: a.key\n", [],
     "runtime.tls.certificate references secret 'missing_cert', which resolved to nothing"),
])
def test_tls_config_errors(tmp_path: Path, extra: str, argv: list[str], expected: str) -> None:
    pod(tmp_path, TLS_POD.format(enabled="true", extra=extra))
    with pytest.raises(TlsConfigError) as e:
        load_config(argv, workdir=tmp_path, environ={})
    assert str(e.value).startswith("Unable to configure TLS: ") and expected in str(e.value)


def test_cli_mode_overrides_spicepod(tmp_path: Path) -> None:
    t = tls_config(tmp_path, "    certificate_file: a.crt\n    key_file: a.key\n    client_auth_mode: required\n"
                   "    client_auth_ca_file: ca.pem\n", "--tls-client-auth-mode", "request")
    assert t is not None and t.client_auth_mode == "request" and t.client_ca is not None


def test_api_keys_from_secrets(tmp_path: Path) -> None:
    pod(tmp_path, HEAD + "runtime:\n  auth:\n    api-key:\n      keys: ['${secrets:api_key}', '1234567890']\n")
    c = load_config([], workdir=tmp_path, environ={"API_KEY": "s3cret"})
    assert c.api_keys == ("s3cret", "1234567890")
    assert "s3cret" not in repr(c)


def test_set_runtime_override(tmp_path: Path) -> None:
    pod(tmp_path, HEAD)
    c = load_config(["--set-runtime", "query.timeout=2s"], workdir=tmp_path, environ={})
    assert c.query_timeout == 2.0
    with pytest.raises(ConfigError, match="Invalid set format. Use key=value"):
        load_config(["--set-runtime", "nonsense"], workdir=tmp_path, environ={})


def test_async_query_retention_from_the_environment(tmp_path: Path) -> None:
    write_pod(tmp_path)
    assert load_config([], workdir=tmp_path, environ={}).async_query_ttl == 12 * 3600
    assert load_config([], workdir=tmp_path, environ={"SPICED_ASYNC_QUERY_RESULT_TTL": "30m"}).async_query_ttl == 1800
    with pytest.raises(ConfigError, match="SPICED_ASYNC_QUERY_RESULT_TTL: invalid duration 'soon'"):
        load_config([], workdir=tmp_path, environ={"SPICED_ASYNC_QUERY_RESULT_TTL": "soon"})
    failed = spiced_fails(tmp_path, env={"SPICED_ASYNC_QUERY_RESULT_TTL": "0s"})
    assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1
    assert "SPICED_ASYNC_QUERY_RESULT_TTL: invalid duration '0s' (expected e.g. 30m, 12h)" in failed.stderr

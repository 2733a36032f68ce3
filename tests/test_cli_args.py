"""Argument hand-offs through Typer's CliRunner: flag validation, defaults, one-line errors, `init`, `version`."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from spice_cli import __version__, flight_client, run
from spice_cli.app import app
from spice_cli.status import HttpSettings

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- spice sql ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "missing"), [
    ("--client-tls-certificate-file", "--client-tls-key-file"),
    ("--client-tls-key-file", "--client-tls-certificate-file"),
])
@pytest.mark.parametrize("command", ["sql", "status", "datasets"])
def test_client_certificate_flags_require_each_other(command: str, given: str, missing: str) -> None:
    code, out = invoke(command, given, "x.pem")
    assert code == 2
    assert f"{missing} is required with {given}" in out


def test_bad_header_is_a_usage_error() -> None:
    code, out = invoke("sql", "--headers", "no-colon")
    assert code == 2 and "expected KEY:VALUE" in out


def test_bad_cache_control_is_a_usage_error() -> None:
    assert invoke("sql", "--cache-control", "sometimes")[0] == 2


def test_bad_endpoint_scheme_is_one_line() -> None:
    code, out = invoke("sql", "--endpoint", "localhost:50051")
    assert code == 1
    assert out == ("Invalid endpoint 'localhost:50051': expected grpc://, grpc+tls://, http:// or https:// "
                   "followed by host:port\n")


def test_unreadable_root_certificate(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    code, out = invoke("sql", "--tls-root-certificate-file", str(missing))
    assert code == 1
    assert out == (f"Failed to read TLS root certificate from '{missing}': No such file or directory. "
                   "Verify the file path and permissions.\n")


def test_root_certificate_switches_the_default_endpoint_to_tls(tmp_path: Path) -> None:
    assert flight_client.default_endpoint(None) == "http://localhost:50051"
    assert flight_client.default_endpoint(tmp_path / "ca.pem") == "https://localhost:50051"
    assert HttpSettings().base_url == "http://127.0.0.1:8090"
    assert HttpSettings(tls_root_certificate_file=tmp_path / "ca.pem").base_url == "https://127.0.0.1:8090"
    assert HttpSettings(endpoint="https://h:1/").base_url == "https://h:1"


def test_connection_failure_names_the_endpoint_given() -> None:
    port = _closed_port()
    code, out = invoke("sql", "--flight-endpoint", f"http://127.0.0.1:{port}")
    assert code == 1
    assert out.startswith(f"SQL REPL Error: Connection failed to spiced at 'http://127.0.0.1:{port}': ")
    assert out.count("\n") == 1


# --- spice run ------------------------------------------------------------------------------------

def test_runtime_argv_keeps_user_args_unchanged_after_the_defaults() -> None:
    user = ["--tls-enabled", "true", "--tls-certificate-file", "a b.pem", "--", "-v"]
    assert run.runtime_argv(user) == [sys.executable, "-m", "spiced", "--metrics", "127.0.0.1:9090",
                                      "--pods-watcher-enabled", *user]
    assert run.runtime_argv([], 1)[-1] == "-v"
    assert run.runtime_argv([], 2)[-1] == "-vv"


def test_exit_code_of_a_signalled_child() -> None:
    assert run.exit_code(-15) == 143 and run.exit_code(2) == 2 and run.exit_code(0) == 0


def test_run_rejects_runtime_flags_before_the_separator() -> None:
    code, out = invoke("run", "--tls-enabled", "true")
    assert code == 2 and "No such option" in out


# --- spice init / version / status ---------------------------------------------------------------

def test_init_with_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = invoke("init", "my_app")
    assert (code, out) == (0, f"{tmp_path / 'my_app' / 'spicepod.yaml'} initialized!\n")
    text = (tmp_path / "my_app" / "spicepod.yaml").read_text()
    assert text == "version: v2\nkind: Spicepod\nname: my_app\n"
    code, out = invoke("init", "my_app")
    assert (code, out) == (1, f"spicepod.yaml already exists in {tmp_path / 'my_app'}\n")


def test_init_without_name_uses_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    assert invoke("init")[0] == 0
    assert yaml.safe_load((tmp_path / "proj" / "spicepod.yaml").read_text()) == \
        {"version": "v2", "kind": "Spicepod", "name": "proj"}


def test_version() -> None:
    from spiced import __version__ as runtime_version

    assert invoke("version") == (0, f"CLI version:     v{__version__}\nRuntime version: v{runtime_version}\n")


@pytest.mark.parametrize("command", ["status", "datasets"])
def test_status_when_nothing_listens(command: str) -> None:
    port = _closed_port()
    code, out = invoke(command, "--http-endpoint", f"http://127.0.0.1:{port}")
    assert (code, out) == (1, f"the Spice runtime is unavailable at http://127.0.0.1:{port}. Is it running?\n")

"""`spice sql`, `spice status` and `spice datasets` against a real runtime over plain gRPC, TLS and mTLS.

The TLS material comes from `spice tls` itself, so these tests also walk the README: `spice tls init`,
`spice tls add server`, `spice tls add client --client`, the runtime with `client_auth_mode required`,
then `spice sql --tls-root-certificate-file … --client-tls-certificate-file … --client-tls-key-file …`.
The interactive REPL is driven through a pseudo-terminal (`pty`), scripts through piped stdin.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spice_cli.app import app
from tests.support import SPICE, TRIPS_TABLE, Runtime, run_spiced, write_pod

BANNER = "Welcome to the Spice.ai SQL REPL! Type 'help' for help.\n\nshow tables; -- list available tables\n"
TIME = r"Time: \d+(\.\d{1,9})? seconds\."  # integer nanoseconds: at most 9 decimals
HINT = ("Check if the Spice runtime is running, endpoint including port is correct, and TLS config (if used) "
        "is valid.")


def spice(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPICE, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd)


@dataclass
class Tls:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    @property
    def server_flags(self) -> list[str]:
        return ["--tls-enabled", "true", "--tls-certificate-file", self.path("server.crt"),
                "--tls-key-file", self.path("server.key")]

    @property
    def root(self) -> list[str]:
        return ["--tls-root-certificate-file", self.path("ca.crt")]

    @property
    def client(self) -> list[str]:
        return ["--client-tls-certificate-file", self.path("client.crt"), "--client-tls-key-file",
                self.path("client.key")]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    directory = tmp_path_factory.mktemp("spice-tls")
    for step in (["init"], ["add", "server"], ["add", "client", "--client"]):
        result = CliRunner().invoke(app, ["tls", *step, "--dir", str(directory)])  # in-process: saves start-ups
        assert result.exit_code == 0, result.output
    return Tls(directory)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    with run_spiced(write_pod(tmp_path_factory.mktemp("plain"))) as rt:
        yield rt


@pytest.fixture(scope="module")
def tls_only(tmp_path_factory: pytest.TempPathFactory, tls: Tls) -> Iterator[Runtime]:
    with run_spiced(write_pod(tmp_path_factory.mktemp("tls")), *tls.server_flags) as rt:
        yield rt


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, tls: Tls) -> Iterator[Runtime]:
    with run_spiced(write_pod(tmp_path_factory.mktemp("mtls")), *tls.server_flags,
                    "--tls-client-auth-mode", "required", "--tls-client-auth-ca-file", tls.path("ca.crt")) as rt:
        yield rt


# --- piped stdin ----------------------------------------------------------------------------------

SCRIPT = """\
SELECT * FROM trips ORDER BY id;

SELECT city,
       count(*) AS n
  FROM trips
 GROUP BY city
 ORDER BY city;
SELECT * FROM nope;
.error
show tables
SELECT * FROM trips WHERE id > 100;
SELECT 'unfinished'
"""


def test_piped_script_over_plain_grpc(plain: Runtime) -> None:
    done = spice("sql", "--endpoint", plain.flight_uri, stdin=SCRIPT)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith(BANNER + TRIPS_TABLE + "\n")
    blocks = out[len(BANNER):].split("\n\n")
    assert re.fullmatch(TIME + " 3 rows.", blocks[1].splitlines()[0])
    assert blocks[1].splitlines()[1:] == ["+----------+---+", "| city     | n |", "+----------+---+",
                                          "| Portland | 1 |", "| Seattle  | 2 |", "+----------+---+"]
    assert re.fullmatch(TIME + " 2 rows.", blocks[2].splitlines()[0])
    error = blocks[2].splitlines()[1]
    assert error.startswith("Query Error: ") and "nope" in error and "not found" in error
    details = blocks[2].splitlines()[2]
    assert details.startswith("INVALID_ARGUMENT: ") and "nope" in details
    assert re.search(r"\| spice +\| public +\| trips +\| BASE TABLE \|", out)
    assert re.search(r"No results\.\n\n" + TIME + r"\n$", out)
    assert "unfinished" not in out and done.stderr == ""


def test_query_flag_runs_one_statement(plain: Runtime) -> None:
    done = spice("sql", "--endpoint", plain.flight_uri, "--query", "SELECT 1;")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"\+----------\+\n\| Int64\(1\) \|\n\+----------\+\n\| 1        \|\n\+----------\+\n\n"
                        + TIME + r" 1 rows\.\n", done.stdout)
    failed = spice("sql", "--endpoint", plain.flight_uri, "--query", "SELECT * FROM nope")
    assert failed.returncode == 1 and failed.stdout.startswith("Query Error: ")


def test_piped_over_tls(tls_only: Runtime, tls: Tls) -> None:
    done = spice("sql", "--endpoint", tls_only.flight_uri, *tls.root, stdin="SELECT * FROM trips ORDER BY id;\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(BANNER + TRIPS_TABLE + "\n")


def test_tls_endpoint_without_trusting_the_ca_fails_to_connect(tls_only: Runtime) -> None:
    done = spice("sql", "--endpoint", tls_only.flight_uri, stdin="SELECT 1;\n")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"SQL REPL Error: Connection failed to spiced at '{tls_only.flight_uri}': ")
    assert done.stderr.endswith(HINT + "\n") and done.stderr.count("\n") == 1


def test_readme_walkthrough_with_mtls_required(mtls: Runtime, tls: Tls) -> None:
    done = spice("sql", "--endpoint", mtls.flight_uri, *tls.root, *tls.client, stdin="SELECT 1;\n")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(re.escape(BANNER) + r"\+----------\+\n\| Int64\(1\) \|\n\+----------\+\n\| 1        \|\n"
                        r"\+----------\+\n\n" + TIME + r" 1 rows\.\n", done.stdout)


def test_mtls_required_without_client_certificate_fails_to_connect(mtls: Runtime, tls: Tls) -> None:
    done = spice("sql", "--endpoint", mtls.flight_uri, *tls.root, stdin="SELECT 1;\n")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"SQL REPL Error: Connection failed to spiced at '{mtls.flight_uri}': ")
    assert done.stderr.endswith(HINT + "\n") and done.stderr.count("\n") == 1


# --- status and datasets --------------------------------------------------------------------------

def test_status_and_datasets_over_plain_http(plain: Runtime) -> None:
    status = spice("status", "--http-endpoint", plain.http_url)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ENDPOINT", "STATUS"]
    assert f"http {plain.http_address} Ready".split() in [line.split() for line in lines]
    assert "metrics N/A Disabled".split() in [line.split() for line in lines]
    datasets = spice("datasets", "--http-endpoint", plain.http_url)
    assert datasets.returncode == 0, datasets.stderr
    assert [line.split() for line in datasets.stdout.splitlines()] == [
        ["NAME", "FROM", "REPLICATION", "ACCELERATION", "STATUS", "ERROR"],
        ["trips", "file:trips.csv", "false", "true", "Ready"]]


def test_status_under_mtls(mtls: Runtime, tls: Tls) -> None:
    done = spice("status", "--http-endpoint", mtls.http_url, *tls.root, *tls.client)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split() == ["NAME", "ENDPOINT", "STATUS"]
    refused = spice("datasets", "--http-endpoint", mtls.http_url, *tls.root)
    assert refused.returncode == 1
    assert refused.stderr == ("ERROR GET /v1/datasets?status=true returned 401 Unauthorized: "
                              "Valid client TLS certificate required\n")


# --- the interactive REPL through a pseudo-terminal -----------------------------------------------

_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


class Terminal:
    """`spice sql` on a pseudo-terminal; `expect` waits on the screen text with escape codes removed."""

    def __init__(self, *args: str) -> None:
        master, slave = pty.openpty()
        env = dict(os.environ, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1", COLUMNS="120", LINES="40")
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen([*SPICE, "sql", *args], stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.fd = master
        self.raw = b""
        self.seen = 0

    @property
    def text(self) -> str:
        return _ESCAPES.sub("", self.raw.decode(errors="replace"))

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.raw += data
        return bool(data)

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait for `pattern` in the text after the previous match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text, self.seen)
            if m:
                self.seen = m.end()
                return m
            if time.monotonic() > deadline or not self._read(min(0.2, deadline - time.monotonic())):
                raise AssertionError(f"no {pattern!r} in:\n{self.text[self.seen:]}")

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        return self.proc.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


@pytest.fixture()
def terminal() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for t in opened:
        t.close()


def test_interactive_session(plain: Runtime, terminal: list[Terminal]) -> None:
    t = Terminal("--endpoint", plain.flight_uri)
    terminal.append(t)
    t.expect(re.escape(BANNER))
    t.expect("sql> ")
    assert re.search(rb"\x1b\[[0-9;]*38;5;(8|244)msql> ", t.raw)  # the grey prompt
    t.send("SELECT * FROM trips\r")
    t.expect(r"\n  ->")  # continuation prompt: the statement has no `;` yet
    t.send("ORDER BY id;\r")
    t.expect(re.escape(TRIPS_TABLE) + r"\n" + TIME + r" 3 rows\.\n")
    t.send("SELECT * FROM nope;\r")
    t.expect(r"Query Error: [^\n]*nope[^\n]*\n")
    assert b"\x1b[31mQuery Error:\x1b[0m" in t.raw  # red label on a terminal
    # Control keys are sent only once the prompt is up: between prompts the terminal is in cooked mode.
    t.expect("sql> ")
    t.send("SELECT 'discarded'\x03")  # Ctrl-C on a non-empty line drops it ...
    t.send("help\r")
    t.expect(r"Available commands:\n\n\.exit, exit, quit, q: Exit the REPL\n")
    assert "discarded" not in t.text[t.text.index("Available commands:"):]
    t.expect("sql> ")
    t.send("\x03")  # ... and on an empty line leaves.
    assert t.wait() == 0


def test_ctrl_d_leaves(plain: Runtime, terminal: list[Terminal]) -> None:
    t = Terminal("--endpoint", plain.flight_uri)
    terminal.append(t)
    t.expect("sql> ")
    t.send("SELECT 41 + 1 AS answer;\r")
    t.expect(r"\| answer \|\n\+--------\+\n\| 42     \|")
    t.expect("sql> ")
    t.send("\x04")
    assert t.wait() == 0


def test_interactive_mtls(mtls: Runtime, tls: Tls, terminal: list[Terminal]) -> None:
    t = Terminal("--endpoint", mtls.flight_uri, *tls.root, *tls.client)
    terminal.append(t)
    t.expect("sql> ")
    t.send("show tables\r")
    t.expect(r"\| spice +\| public +\| trips +\| BASE TABLE \|")
    t.send("quit\r")
    assert t.wait() == 0

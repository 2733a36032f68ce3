"""`spice run -- …` against the real runtime: passthrough, the runtime's own errors and exit codes, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pki import Pki
from tests.support import ANSI, SPICE, Runtime, write_pod

EPHEMERAL = ["--http", "127.0.0.1:0", "--flight", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]


def spice_run(workdir: Path, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("SPICED_LOG", None)
    done = subprocess.run([*SPICE, "run", *args], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    done.stderr = ANSI.sub("", done.stderr)
    return done


def start_spice_run(workdir: Path, *args: str) -> Runtime:
    """`spice run -- <args>` in the background, with support.Runtime reading the runtime's log lines."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("SPICED_LOG", None)
    proc = subprocess.Popen([*SPICE, "run", "--", *args], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rt = Runtime(proc, tls="true" in args)
    threading.Thread(target=rt._pump, name=f"spiced-log-{proc.pid}", daemon=True).start()
    return rt


@pytest.fixture()
def running(tmp_path: Path) -> Iterator[tuple[Path, list[Runtime]]]:
    started: list[Runtime] = []
    yield write_pod(tmp_path), started
    for rt in started:
        if rt.proc.poll() is None:
            rt.stop()


def test_version_passes_through(tmp_path: Path) -> None:
    done = spice_run(tmp_path, "--", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("v")
    assert done.stderr.splitlines()[0] == "Spice.ai runtime starting..."


def test_bad_runtime_flag_gives_the_runtimes_usage_error(tmp_path: Path) -> None:
    done = spice_run(tmp_path, "--", "--no-such-flag")
    assert done.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in done.stderr
    assert done.stderr.rstrip().endswith("error running Spice.ai")
    assert "Traceback" not in done.stderr


def test_bad_tls_config_gives_the_runtimes_error_and_exit_code(tmp_path: Path) -> None:
    done = spice_run(write_pod(tmp_path), "--", *EPHEMERAL, "--tls-enabled", "true")
    assert done.returncode == 1
    assert "Spice Runtime error: Unable to configure TLS: TLS certificate is required: provide " \
           "--tls-certificate-file" in done.stderr
    assert "Traceback" not in done.stderr


def test_defaults_then_user_flags_and_sigterm_is_forwarded(running: tuple[Path, list[Runtime]]) -> None:
    pod, started = running
    rt = start_spice_run(pod, *EPHEMERAL)
    started.append(rt)
    rt.wait_for_log(r"Spice Runtime Metrics listening on 127\.0\.0\.1:(?!9090)\d+")  # user's --metrics won
    rt.wait_for_log("Spice Runtime Flight listening on")
    assert rt.logs()[0] == "Spice.ai runtime starting..."
    assert rt.stop(signal.SIGTERM) == 0
    rt.wait_for_log("Goodbye!")
    assert not any("error running Spice.ai" in line for line in rt.logs())


def test_sighup_reaches_the_runtime_and_sigint_stops_it(running: tuple[Path, list[Runtime]]) -> None:
    pod, started = running
    pki = Pki.create(pod / "pki")
    rt = start_spice_run(pod, *EPHEMERAL, "--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
                         "--tls-key-file", str(pki.server.key))
    started.append(rt)
    rt.wait_for_log("All endpoints secured with TLS")
    mark = len(rt.logs())
    rt.proc.send_signal(signal.SIGHUP)
    rt.wait_for_log("TLS reload: SIGHUP", after=mark)
    assert rt.proc.poll() is None
    assert rt.stop(signal.SIGINT) == 0
    assert sum("Goodbye!" in line for line in rt.logs()) == 1

"""The process lifecycle through the real `spiced` (spiced/runtime.py, spiced/__main__.py, spiced/logs.py):
start-up lines, port 0, bind failures, log filters, signals and exit codes."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import httpx

from spiced.datasets.lifecycle import format_duration, format_size
from spiced.logs import parse_filter
from tests.support import run_spiced, spiced_fails, write_pod

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z (TRACE|DEBUG| INFO| WARN|ERROR) [a-z_:]+: ")


def test_startup_lines_and_clean_exit(tmp_path: Path) -> None:
    write_pod(tmp_path)
    with run_spiced(tmp_path, metrics=True) as rt:
        logs = rt.logs()
        assert all(LINE.match(line) for line in logs), logs
        joined = "\n".join(logs)
        assert re.search(r" INFO runtime::http: Spice Runtime HTTP listening on 127\.0\.0\.1:[1-9]\d*$", joined, re.M)
        assert re.search(r" INFO runtime::flight: Spice Runtime Flight listening on 127\.0\.0\.1:[1-9]\d*$", joined,
                         re.M)
        assert re.search(r" INFO runtime::metrics_server: Spice Runtime Metrics listening on 127\.0\.0\.1:[1-9]\d*$",
                         joined, re.M)
        assert " INFO runtime: Dataset trips registered (file:trips.csv), acceleration (arrow)." in joined
        assert re.search(r"Loaded 3 rows \(\d+ B\) for dataset trips in \d+ms\.", joined)
        assert httpx.get(rt.http_url + "/health").text == "ok\n"
        assert rt.stop(signal.SIGTERM) == 0
        assert rt.logs()[-1].endswith(" INFO runtime: Goodbye!")


def test_sigint_also_exits_0(tmp_path: Path) -> None:
    write_pod(tmp_path)
    with run_spiced(tmp_path) as rt:
        assert rt.stop(signal.SIGINT) == 0


def test_sighup_without_tls_keeps_running(tmp_path: Path) -> None:
    write_pod(tmp_path)
    with run_spiced(tmp_path) as rt:
        rt.send_signal(signal.SIGHUP)
        assert httpx.get(rt.http_url + "/health").status_code == 200
        assert rt.proc.poll() is None


def test_bind_failure_is_one_line_exit_1(tmp_path: Path) -> None:
    write_pod(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = spiced_fails(tmp_path, "--http", f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "Spice Runtime error: Unable to start Spice Runtime servers: Unable to start HTTP server: "
        "Unable to bind to address: Address already in use (os error 98)")


def test_not_ready_until_datasets_load_and_failed_dataset_never_ready(tmp_path: Path) -> None:
    write_pod(tmp_path, "version: v1\nkind: Spicepod\nname: t\ndatasets:\n  - from: file:trips.csv\n    name: broken\n"
                        "    params:\n      file_format: parquet\n    acceleration:\n      enabled: true\n")
    with run_spiced(tmp_path, ready=False) as rt:
        rt.wait_for_log("Failed to load data for dataset broken")
        r = httpx.get(rt.http_url + "/v1/ready")
        assert (r.status_code, r.text) == (503, "not ready")
        assert httpx.get(rt.http_url + "/health").status_code == 200


def test_spiced_log_and_verbosity(tmp_path: Path) -> None:
    write_pod(tmp_path)
    only_listeners = {"SPICED_LOG": "WARN,runtime::http=INFO,runtime::flight=INFO"}
    with run_spiced(tmp_path, env=only_listeners) as rt:
        assert not any("Dataset trips registered" in line for line in rt.logs())
        assert not any(" DEBUG " in line for line in rt.logs())
    with run_spiced(tmp_path, "-v", env={"SPICED_LOG": "WARN"}) as rt:  # -v wins over SPICED_LOG
        httpx.get(rt.http_url + "/health")
        rt.wait_for_log(r" DEBUG runtime")


def test_open_telemetry_flag_is_accepted_with_a_warning(tmp_path: Path) -> None:
    write_pod(tmp_path)
    with run_spiced(tmp_path, "--open_telemetry", "127.0.0.1:50052") as rt:
        assert any("`--open_telemetry` is deprecated and has no effect" in line and " WARN " in line
                   for line in rt.logs())


def test_log_filter_parsing() -> None:
    default, targets = parse_filter("runtime=TRACE,WARN")
    assert default == 30 and targets["runtime"] == 5
    default, targets = parse_filter("DEBUG")
    assert default == 10 and targets["runtime"] == 10


def test_human_formats() -> None:
    assert format_duration(6.812) == "6s 812ms"
    assert format_duration(0.045) == "45ms"
    assert format_duration(63.0) == "1m 3s"
    assert format_size(442_196_541) == "421.71 MiB"
    assert format_size(82) == "82 B"

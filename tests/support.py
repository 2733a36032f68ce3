"""Start the real `spiced` process on ephemeral ports and talk to it.

    with run_spiced(workdir, "--tls-enabled", "true", ...) as rt:
        rt.http_url        # "http://127.0.0.1:PORT" (https when TLS is on)
        rt.flight_uri      # "grpc://127.0.0.1:PORT" (grpc+tls when TLS is on)
        rt.metrics_url     # only with metrics=True
        rt.wait_for_log("TLS reload: swapped")   # waits on a log line, never a fixed sleep
        rt.logs()          # every stderr line so far (ANSI-free)
    # leaving the block sends SIGTERM and waits for exit

    r = spiced_fails(workdir, "--tls-enabled", "true")   # expects exit != 0; r.returncode, r.stderr
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LISTEN = re.compile(r"Spice Runtime (HTTP|Flight|Metrics) listening on (\S+)")
SPICED = [sys.executable, "-m", "spiced"]
_SPICE_SCRIPT = Path(sys.executable).with_name("spice")
SPICE = [str(_SPICE_SCRIPT)] if _SPICE_SCRIPT.exists() else \
    [sys.executable, "-c", "import sys; from spice_cli.app import main; sys.exit(main())"]

BASIC_SPICEPOD = """\
version: v1
kind: Spicepod
name: test
datasets:
  - from: file:trips.csv
    name: trips
    acceleration:
      enabled: true
"""
TRIPS_CSV = "id,city,fare\n1,Seattle,12.5\n2,Portland,8.25\n3,Seattle,30.0\n"
TRIPS_TABLE = ("+----+----------+------+\n"  # `SELECT * FROM trips` as the bordered text table
               "| id | city     | fare |\n"
               "+----+----------+------+\n"
               "| 1  | Seattle  | 12.5 |\n"
               "| 2  | Portland | 8.25 |\n"
               "| 3  | Seattle  | 30.0 |\n"
               "+----+----------+------+\n")


def write_pod(workdir: Path, spicepod: str = BASIC_SPICEPOD, *, csv: str = TRIPS_CSV) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spicepod.yaml").write_text(spicepod)
    (workdir / "trips.csv").write_text(csv)
    return workdir


@dataclass
class Runtime:
    proc: subprocess.Popen[str]
    tls: bool
    addresses: dict[str, str] = field(default_factory=dict)
    _lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = ANSI.sub("", raw.rstrip("\n"))
            with self._cond:
                self._lines.append(line)
                m = LISTEN.search(line)
                if m:
                    self.addresses[m.group(1).lower()] = m.group(2)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def logs(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def wait_for_log(self, pattern: str, *, timeout: float = 15.0, after: int = 0) -> str:
        """Wait for a stderr line matching `pattern` (regex) among lines[after:]; returns the line."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._lines[after:]:
                    if rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._pump_alive()):
                    raise AssertionError(f"no log line matching {pattern!r}; got:\n" + "\n".join(self._lines[-40:]))
                self._cond.wait(min(left, 0.2))

    def _pump_alive(self) -> bool:
        return any(t.name == f"spiced-log-{self.proc.pid}" and t.is_alive() for t in threading.enumerate())

    @property
    def http_address(self) -> str:
        return self.addresses["http"]

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.addresses['http']}"

    @property
    def flight_uri(self) -> str:
        return f"{'grpc+tls' if self.tls else 'grpc'}://{self.addresses['flight']}"

    @property
    def flight_port(self) -> int:
        return int(self.addresses["flight"].rsplit(":", 1)[1])

    @property
    def http_port(self) -> int:
        return int(self.addresses["http"].rsplit(":", 1)[1])

    @property
    def metrics_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.addresses['metrics']}"

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("spiced did not exit after " + signal.Signals(sig).name) from None


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SPICED_LOG", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@contextmanager
def run_spiced(workdir: Path, *args: str, metrics: bool = False, env: dict[str, str] | None = None,
               ready: bool = True, timeout: float = 30.0) -> Iterator[Runtime]:
    """Run spiced in `workdir` on ephemeral ports; waits for every listener (and /v1/ready when `ready`)."""
    argv = [*SPICED, "--http", "127.0.0.1:0", "--flight", "127.0.0.1:0", *args]
    if metrics:
        argv += ["--metrics", "127.0.0.1:0"]
    tls = _tls_on(args, workdir)
    proc = subprocess.Popen(argv, cwd=workdir, env=_env(env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rt = Runtime(proc, tls)
    threading.Thread(target=rt._pump, name=f"spiced-log-{proc.pid}", daemon=True).start()
    try:
        needed = {"http", "flight"} | ({"metrics"} if metrics else set())
        deadline = time.monotonic() + timeout
        with rt._cond:
            while not needed <= rt.addresses.keys():
                if proc.poll() is not None:
                    raise AssertionError(f"spiced exited with {proc.returncode}:\n" + "\n".join(rt._lines[-40:]))
                if time.monotonic() > deadline:
                    raise AssertionError("spiced did not start listening:\n" + "\n".join(rt._lines[-40:]))
                rt._cond.wait(0.2)
        if ready:
            _wait_ready(rt, deadline)
        yield rt
    finally:
        if proc.poll() is None:
            rt.stop()


def _tls_on(args: Sequence[str], workdir: Path) -> bool:
    for i, a in enumerate(args):
        if a == "--tls-enabled" and i + 1 < len(args):
            return args[i + 1] == "true"
        if a == "--tls-enabled=true":
            return True
    pod = workdir / "spicepod.yaml"
    return pod.exists() and re.search(r"^\s+tls:\s*\n(\s+.*\n)*?\s+enabled:\s*true", pod.read_text(), re.M) is not None


def _wait_ready(rt: Runtime, deadline: float) -> None:
    """Poll /v1/ready over the real listener (TLS verification off: this only probes readiness)."""
    import httpx

    with httpx.Client(verify=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            try:
                if client.get(rt.http_url + "/v1/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if rt.proc.poll() is not None:
                break
            time.sleep(0.05)
    raise AssertionError("spiced never became ready:\n" + "\n".join(rt.logs()[-40:]))


@dataclass
class Failed:
    returncode: int
    stderr: str


def spiced_fails(workdir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> Failed:
    """Run spiced expecting it to exit on its own (bad config); returns its exit code and ANSI-free stderr."""
    argv = [*SPICED, "--http", "127.0.0.1:0", "--flight", "127.0.0.1:0", *args]
    try:
        done = subprocess.run(argv, cwd=workdir, env=_env(env), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"spiced kept running: {e.stderr!r}") from None
    return Failed(done.returncode, ANSI.sub("", done.stderr))


def rss_bytes(rt: Runtime) -> int:
    """The runtime process's resident memory."""
    for line in Path(f"/proc/{rt.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def server_peers(rt: Runtime) -> dict[int, int]:
    """The TCP connections the server process still holds open on its HTTP port: the client's port
    and the bytes the server has written that the client has not taken (the socket's send queue)."""
    sockets: dict[str, tuple[int, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == rt.http_port and state != "0A":  # 0A: LISTEN
                sockets[inode] = (int(remote.rsplit(":", 1)[1], 16), int(fields[4].split(":")[0], 16))
    peers: dict[int, int] = {}
    fd_dir = Path(f"/proc/{rt.proc.pid}/fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:  # the process has exited
        return {}
    for fd in fds:
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in sockets:
            port, unsent = sockets[target[8:-1]]
            peers[port] = unsent
    return peers


@contextmanager
def run_tls_target(workdir: Path) -> Iterator[Runtime]:
    """A TLS runtime to throw bad input at (its PKI as `rt.pki`); afterwards it must still be running
    and must never have logged a traceback."""
    from tests.pki import Pki

    pki = Pki.create(workdir / "pki")
    with run_spiced(workdir, "--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
                    "--tls-key-file", str(pki.server.key)) as runtime:
        runtime.pki = pki  # type: ignore[attr-defined]
        yield runtime
        assert runtime.proc.poll() is None, "the runtime died under bad input"
    text = "\n".join(runtime.logs())
    assert "Traceback" not in text, text[-3000:]


def sql_json(rt: Runtime, query: str, *, cached: bool = True) -> list[dict[str, object]]:
    """`POST /v1/sql` with `Accept: application/json`; the rows (nulls left out, as upstream).
    `cached=False` sends `Cache-Control: no-cache`: the query runs even if a result is cached."""
    headers = {"Accept": "application/json"} | ({} if cached else {"Cache-Control": "no-cache"})
    r = httpx.post(rt.http_url + "/v1/sql", content=query, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    rows: list[dict[str, object]] = r.json()
    return rows


def dataset_yaml(from_: str, name: str, params: str = "", accelerated: bool = False) -> str:
    """One `datasets:` entry; `params` is already indented YAML (`      key: value\n` lines)."""
    accel = "    acceleration:\n      enabled: true\n" if accelerated else ""
    return f"  - from: {from_}\n    name: {name}\n" + (f"    params:\n{params}" if params else "") + accel


def spicepod_yaml(*datasets: str) -> str:
    return "version: v1\nkind: Spicepod\nname: sources\ndatasets:\n" + "".join(datasets)

"""A real cluster on 127.0.0.1 for the tests: a PKI made by `spice cluster tls` (spice_cli/cluster_pki.py),
a scheduler started by `run_spiced`, and executors as `spiced` processes of their own, every port
ephemeral. Used by tests/test_cluster_nodes.py and tests/test_cluster_queries.py.

    pki = make_pki(root / "pki", "scheduler1", "executor1", "executor2", "client1")
    with run_cluster(root, pod_dir, pki, ("executor1", "executor2")) as cluster:
        cluster.scheduler.http_url     # the runtime: HTTP, Flight, `-v` logs
        cluster.node                   # the scheduler's node port, host:port
        cluster.executors[0].node      # an executor's worker, host:port
        cluster.add_executor("executor3")   # another one (stopped with the cluster)
        node_serial(cluster, port)     # the certificate a fresh mTLS handshake on a node port is served
    # leaving stops the executors, then the scheduler; none of them may have logged an ERROR or a traceback
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from spice_cli import cluster_pki
from tests.support import SPICED, Runtime, run_spiced

CLIENT = "client1"  # the leaf the tests' own clients (Dask, TLS probes) use; make_pki issues it


def yes(_what: str) -> bool:
    return True


def files_spicepod(name: str) -> str:
    """A spicepod of one dataset `t`, the Parquet files of folder `t/`, with no results cache (every
    query, Flight ones included, runs on the cluster again)."""
    return f"""\
version: v1
kind: Spicepod
name: {name}
runtime:
  caching:
    sql_results:
      enabled: false
datasets:
  - from: file:t/
    name: t
    params:
      file_format: parquet
"""


def make_pki(directory: Path, *names: str) -> Path:
    """`spice cluster tls init` and one `spice cluster tls add` per name (SANs localhost, 127.0.0.1)."""
    cluster_pki.init(yes, directory)
    for name in (*names, CLIENT):
        cluster_pki.add(name, None, yes, directory)
    return directory


def issue(pki: Path, name: str) -> tuple[Path, Path]:
    """A new leaf from the same cluster CA, as `<name>.crt` / `<name>.key` (to rotate into place)."""
    cluster_pki.add(name, None, yes, pki)
    return pki / f"{name}.crt", pki / f"{name}.key"


def mtls(pki: Path, name: str) -> list[str]:
    return ["--node-mtls-ca-certificate-file", str(pki / "ca.crt"), "--node-mtls-certificate-file",
            str(pki / f"{name}.crt"), "--node-mtls-key-file", str(pki / f"{name}.key")]


@dataclass
class Executor:
    name: str
    runtime: Runtime
    http: str  # host:port of its health listener
    node: str  # host:port of its worker

    @property
    def node_port(self) -> int:
        return int(self.node.rsplit(":", 1)[1])


@dataclass
class Cluster:
    root: Path
    pki: Path
    scheduler: Runtime
    node: str  # the scheduler's node port, host:port
    executors: list[Executor]
    metrics: bool = False  # executors started with --metrics too
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    @property
    def node_port(self) -> int:
        return int(self.node.rsplit(":", 1)[1])

    def add_executor(self, name: str) -> Executor:
        """Start an executor with the leaf `name` (issued by make_pki or issue) and wait until it listens."""
        rt = self.start_executor(name)
        return self.listening(name, rt)

    def start_executor(self, name: str) -> Runtime:
        """Start an executor in its own empty folder, `root/<name>`; it is stopped with the cluster."""
        args = ["--scheduler-address", f"https://{self.node}", "--http", "127.0.0.1:0", "--node-bind-address",
                "127.0.0.1:0", "--node-advertise-address", "127.0.0.1", *mtls(self.pki, name)]
        rt = start_executor(self.root / name, *args, *(["--metrics", "127.0.0.1:0"] if self.metrics else []))
        self._stack.callback(rt.stop)
        return rt

    def listening(self, name: str, rt: Runtime) -> Executor:
        executor = Executor(name, rt, captured(rt, r"HTTP health endpoint listening on (\S+)"),
                            captured(rt, r"Spice Runtime executor listening on (\S+)"))
        self.executors.append(executor)
        return executor


def start_executor(cwd: Path, *args: str) -> Runtime:
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SPICED_LOG"} | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*SPICED, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rt = Runtime(proc, tls=False)
    threading.Thread(target=rt._pump, name=f"spiced-log-{proc.pid}", daemon=True).start()
    return rt


def captured(rt: Runtime, pattern: str) -> str:
    """The first group of `pattern` in the first log line that matches it (waiting for one)."""
    m = re.search(pattern, rt.wait_for_log(pattern, timeout=45))
    assert m is not None
    return m.group(1)


@contextmanager
def run_cluster(root: Path, pod: Path, pki: Path, executors: tuple[str, ...], *, scheduler: str = "scheduler1",
                env: dict[str, str] | None = None, metrics: bool = False,
                args: tuple[str, ...] = ()) -> Iterator[Cluster]:
    """A scheduler (`-v`) over the spicepod in `pod` and one executor per name, started together.

    On a clean exit, no process may have logged an ERROR or a traceback; a process the test killed
    (SIGKILL) is not asked."""
    with ExitStack() as stack:
        rt = stack.enter_context(run_spiced(
            pod, "--role", "scheduler", "--node-bind-address", "127.0.0.1:0", "--node-advertise-address",
            "127.0.0.1", *mtls(pki, scheduler), "-v", *args, env=env, metrics=metrics, ready=False, timeout=60))
        cluster = Cluster(root, pki, rt, captured(rt, r"internal cluster server listening on (\S+)"), [], metrics)
        stack.enter_context(cluster._stack)
        started = [(name, cluster.start_executor(name)) for name in executors]  # they start side by side
        for name, executor in started:
            cluster.listening(name, executor)
        yield cluster
        cluster._stack.close()
        for process in (rt, *(e.runtime for e in cluster.executors)):
            if process.proc.poll() == -signal.SIGKILL:
                continue
            text = "\n".join(process.logs())
            assert "Traceback" not in text and "ERROR" not in text, text[-3000:]


def dask_security(pki: Path) -> Any:
    from distributed import Security

    return Security(tls_ca_file=str(pki / "ca.crt"), tls_client_cert=str(pki / f"{CLIENT}.crt"),
                    tls_client_key=str(pki / f"{CLIENT}.key"), require_encryption=True)


def cluster_samples(rt: Runtime, name: str) -> list[Any]:
    """The samples of metric `name` with `scope="cluster"`, from the --metrics listener when there is one."""
    base = rt.metrics_url if "metrics" in rt.addresses else rt.http_url
    body = httpx.get(base + "/metrics", timeout=10).text
    return [s for f in text_string_to_metric_families(body) for s in f.samples
            if s.name == name and s.labels.get("scope") == "cluster"]


def cluster_reloads(rt: Runtime) -> dict[str, float]:
    """`runtime_tls_reload_total{scope="cluster"}` by result."""
    return {s.labels["result"]: s.value for s in cluster_samples(rt, "runtime_tls_reload_total")}


def node_serial(cluster: Cluster, port: int | None = None) -> int:
    """The serial of the certificate a fresh mTLS handshake on a node port (the scheduler's by default)
    is served; the client presents the cluster CA's `client1` leaf."""
    ctx = ssl.create_default_context(cafile=str(cluster.pki / "ca.crt"))
    ctx.load_cert_chain(cluster.pki / f"{CLIENT}.crt", cluster.pki / f"{CLIENT}.key")
    with socket.create_connection(("127.0.0.1", port or cluster.node_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def stop_dask(procs: list[subprocess.Popen[bytes]]) -> None:
    """A `dask scheduler` (first) and its `dask worker`s: the workers, then the scheduler; a worker
    stopped while its scheduler goes away can hang in its shutdown."""
    for group in (procs[1:], procs[:1]):
        for proc in group:
            proc.terminate()
        for proc in group:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

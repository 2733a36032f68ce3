"""`ClusterNode` (spiced/cluster/node.py), the API query execution uses, in-process: the scheduler the
runtime starts (spiced/cluster/scheduler.py) on a loop thread, a Dask worker joining it over mTLS, and
the node's synchronous client used from another thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from spice_cli import cluster_pki
from spiced.config import cluster_settings, load_config, parse_args
from spiced.errors import ConfigError
from spiced.metrics import Metrics
from spiced.tls.cluster import ClusterTls
from tests.support import write_pod
from tests.tlsprobe import LoopThread


def yes(_what: str) -> bool:
    return True


def mtls(pki: Path, name: str) -> list[str]:
    return ["--node-mtls-ca-certificate-file", str(pki / "ca.crt"), "--node-mtls-certificate-file",
            str(pki / f"{name}.crt"), "--node-mtls-key-file", str(pki / f"{name}.key")]


def test_client_and_executors(loop: LoopThread, tmp_path: Path) -> None:
    from distributed import Worker

    from spiced.cluster.scheduler import start_scheduler
    from spiced.cluster.security import ClusterSecurity

    pki = tmp_path / "pki"
    cluster_pki.init(yes, pki)
    for name in ("scheduler1", "executor1"):
        cluster_pki.add(name, None, yes, pki)
    settings = cluster_settings(parse_args(["--role", "scheduler", "--node-bind-address", "127.0.0.1:0",
                                            "--node-advertise-address", "127.0.0.1", *mtls(pki, "scheduler1")]))
    executor = cluster_settings(parse_args(["--scheduler-address", "127.0.0.1", "--node-advertise-address",
                                            "127.0.0.1", *mtls(pki, "executor1")]))
    assert settings is not None and settings.mtls is not None and executor is not None and executor.mtls is not None
    pod = write_pod(tmp_path / "pod")
    spicepod = load_config([], workdir=pod, environ={}).spicepod
    node = loop.call(start_scheduler(settings, ClusterTls.create(settings.mtls, Metrics()), lambda: spicepod, pod),
                     timeout=30)
    security = ClusterSecurity(ClusterTls.create(executor.mtls, Metrics()))

    async def join() -> Any:
        return await Worker(f"tls://{node.endpoint}", security=security, host="127.0.0.1", nthreads=1,
                            dashboard=False, dashboard_address="127.0.0.1:0")

    worker = loop.call(join(), timeout=30)
    try:
        loop.call(node.wait_for_executors(1, timeout=10))
        (info,) = node.executors()
        assert (info.address, info.endpoint, info.nthreads, info.status) == \
            (worker.address, worker.address.removeprefix("tls://"), 1, "Ready")
        assert node.client.submit(lambda x: x * 2, 21).result(timeout=30) == 42  # synchronous, from this thread
        assert node.client.nthreads() == {worker.address: 1}
        with pytest.raises(TimeoutError):
            loop.call(node.wait_for_executors(2, timeout=0.2))
    finally:
        loop.call(worker.close(), timeout=30)
        loop.call(node.close(timeout=10), timeout=30)


def test_a_taken_node_port_is_refused(loop: LoopThread, tmp_path: Path) -> None:
    import socket

    from spiced.cluster.scheduler import start_scheduler

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = cluster_settings(parse_args(["--role", "scheduler", "--allow-insecure-connections",
                                                "--node-bind-address", f"127.0.0.1:{port}",
                                                "--node-advertise-address", "127.0.0.1"]))
        assert settings is not None
        spicepod = load_config([], workdir=write_pod(tmp_path), environ={}).spicepod
        with pytest.raises(ConfigError) as e:
            loop.call(start_scheduler(settings, None, lambda: spicepod, tmp_path), timeout=30)
    assert str(e.value) == ("Unable to start Spice Runtime servers: Unable to start cluster server: Unable to bind "
                            "to address: Address already in use (os error 98)")


def test_an_executor_shutting_down_drops_only_dasks_heartbeat_failure() -> None:
    """The filter an executor puts on `distributed.worker` when it closes matches what this Dask logs
    for a heartbeat cut by the close, and nothing else."""
    import inspect
    import logging

    from distributed.worker import Worker

    from spiced.cluster.executor import _not_heartbeat_failure

    logged = [line.strip() for line in inspect.getsource(Worker.heartbeat).splitlines() if "logger.exception(" in line]
    heartbeat = next(line for line in logged if "during heartbeat" in line)
    message = heartbeat.split('"')[1]

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 0, msg, None, None)

    assert not _not_heartbeat_failure(record(message))
    assert _not_heartbeat_failure(record("Unexpected exception during heartbeat. Closing worker."))

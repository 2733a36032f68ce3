"""Cluster mode end to end: a real scheduler and two real executors on 127.0.0.1 over mTLS, with a PKI
made by `spice cluster tls` (spice_cli/cluster_pki.py). Started once for the module.

Covers: executors listed by the scheduler's /v1/status; the spicepod and its secrets taken from the
scheduler (the executors have neither); executors serve health, not SQL; Dask's HTTP servers answer
nothing; refused handshakes (no certificate, another CA, the public client CA, plaintext) each logged
once with the peer; a node-certificate rotation under a working Dask client, counted on /metrics, and
a garbage PEM that keeps the rotated bundle and is counted once.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from spice_cli import cluster_pki
from spice_cli.app import app
from tests.cluster_rig import (
    Cluster,
    cluster_reloads,
    dask_security,
    make_pki,
    node_serial,
    run_cluster,
    serial_of,
    yes,
)
from tests.pki import Pki
from tests.tlsprobe import replace_atomically, s_client, wait_for

SEATTLE_SQL = "SELECT * FROM trips WHERE city = 'Seattle'"
SPICEPOD = """\
version: v1
kind: Spicepod
name: cluster
datasets:
  - from: file:trips.csv
    name: trips
  - from: postgres:public.orders
    name: orders
    params:
      pg_host: 127.0.0.1
      pg_port: "1"
      pg_db: shop
      pg_user: ${secrets:cluster_pg_user}
      pg_sslmode: disable
views:
  - name: seattle
    sql_ref: seattle.sql
"""
SCHEDULER_SECRETS = {"SPICE_CLUSTER_PG_USER": "reader", "SPICE_PG_PASS": "pw-only-the-scheduler-has"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    pki = make_pki(root / "pki", "scheduler1", "executor1", "executor2")
    pod = root / "pod"
    pod.mkdir()
    (pod / "spicepod.yaml").write_text(SPICEPOD)
    (pod / "seattle.sql").write_text(SEATTLE_SQL)
    (pod / "trips.csv").write_text("id,city\n1,Seattle\n2,Portland\n")
    with run_cluster(root, pod, pki, ("executor1", "executor2"), env=SCHEDULER_SECRETS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def dask_client(cluster: Cluster) -> Iterator[Any]:
    from distributed import Client

    with Client(f"tls://{cluster.node}", security=dask_security(cluster.pki), timeout="20s") as client:
        yield client


# ---------------------------------------------------------------- membership and the spicepod


def test_scheduler_status_lists_the_executors(cluster: Cluster) -> None:
    url = cluster.scheduler.http_url + "/v1/status"
    wait_for(lambda: sum(r["name"] == "executor" for r in httpx.get(url).json()) == 2, timeout=20)
    rows = httpx.get(url).json()
    node = next(r for r in rows if r["name"] == "cluster")
    assert (node["endpoint"], node["status"], node["tls"]["scope"]) == (cluster.node, "Ready", "cluster")
    assert node["tls"]["certificate"]["subject"] == "CN=scheduler1"
    assert sorted(r["endpoint"] for r in rows if r["name"] == "executor") == sorted(e.node for e in cluster.executors)
    assert all(r["status"] == "Ready" for r in rows if r["name"] == "executor")
    csv_rows = httpx.get(url + "?format=csv").text.splitlines()
    assert {f"executor,{e.node},Ready" for e in cluster.executors} <= set(csv_rows)
    shown = CliRunner().invoke(app, ["status", "--http-endpoint", cluster.scheduler.http_url]).output.splitlines()
    assert [line.split()[:2] for line in shown if line.startswith("executor")] == \
        [["executor", e.node] for e in sorted(cluster.executors, key=lambda e: e.node)]
    assert any(line.split()[:2] == ["node", "CN=scheduler1"] for line in shown)


def test_executors_take_the_spicepod_and_its_secrets_from_the_scheduler(cluster: Cluster, dask_client: Any) -> None:
    assert not set(SCHEDULER_SECRETS) & set(os.environ)  # the executors' environment has none of them
    assert not list((cluster.root / "executor1").iterdir()) and not list((cluster.root / "executor2").iterdir())
    for e in cluster.executors:
        e.runtime.wait_for_log("Received spicepod cluster from the scheduler: 2 datasets, 1 views")

    def summary(dask_worker: Any = None) -> tuple[object, ...]:
        from spiced.cluster.plugin import worker_spicepod

        pod = worker_spicepod(dask_worker)  # in a task (no argument) it finds its worker itself
        datasets = {d.name: d for d in pod.datasets}
        orders, trips = datasets["orders"].options, datasets["trips"].options
        return (pod.name, sorted(datasets), [(v.name, v.sql) for v in pod.views], orders.user,  # type: ignore[attr-defined]
                orders.password, trips.url)  # type: ignore[attr-defined]

    got = dask_client.run(summary)
    assert sorted(got) == sorted(f"tls://{e.node}" for e in cluster.executors)
    expected = ("cluster", ["orders", "trips"], [("seattle", SEATTLE_SQL)], "reader", "pw-only-the-scheduler-has",
                str(cluster.root / "pod" / "trips.csv"))
    assert all(value == expected for value in got.values()), got
    assert dask_client.submit(summary, pure=False).result(timeout=30) == expected


def test_executors_serve_health_and_readiness_but_no_sql(cluster: Cluster) -> None:
    for e in cluster.executors:
        base = f"http://{e.http}"
        assert httpx.get(base + "/health").text == "ok\n"
        ready = httpx.get(base + "/v1/ready")
        assert (ready.status_code, ready.text) == (200, "ready")
        assert httpx.post(base + "/v1/sql", content="SELECT 1").status_code == 404


def listening(pid: int) -> set[tuple[str, int]]:
    """The TCP sockets process `pid` listens on (IPv4)."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:
            host_hex, port_hex = fields[1].split(":")
            host = socket.inet_ntoa(bytes.fromhex(host_hex)[::-1])
            found.add((host, int(port_hex, 16)))
    return found


def test_dask_http_servers_are_on_loopback_and_serve_nothing(cluster: Cluster) -> None:
    def port(hostport: str) -> int:
        return int(hostport.rsplit(":", 1)[1])

    processes = [(cluster.scheduler, {cluster.scheduler.http_port, cluster.scheduler.flight_port, cluster.node_port})]
    processes += [(e.runtime, {port(e.http), port(e.node)}) for e in cluster.executors]
    for rt, own in processes:
        extra = {(h, p) for h, p in listening(rt.proc.pid) if p not in own}
        assert extra, "Dask's HTTP server was expected"
        for host, p in extra:
            assert host == "127.0.0.1"
            for path in ("/", "/health", "/metrics", "/info/main/workers.html"):
                assert httpx.get(f"http://127.0.0.1:{p}{path}").status_code == 404


# ---------------------------------------------------------------- refusals


def attempt(port: int, ctx: ssl.SSLContext | None) -> int:
    """One connection to the node port (TLS with `ctx`, else plaintext bytes); returns the client's port."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        local = int(raw.getsockname()[1])
        try:
            if ctx is None:
                raw.sendall(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n")
                raw.recv(100)
            else:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"\0" * 8)
                    tls.recv(100)  # TLS 1.3: a refused client certificate shows on the first read
        except (ssl.SSLError, OSError):
            pass
    return local


def test_refused_handshakes_are_logged_once_with_the_peer(cluster: Cluster, tmp_path: Path) -> None:
    pki = cluster.pki
    trusting = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    rogue_pki = tmp_path / "rogue"
    cluster_pki.init(yes, rogue_pki)  # another `spice cluster tls init`: same CA name, other key
    cluster_pki.add("rogue", None, yes, rogue_pki)
    rogue = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    rogue.load_cert_chain(rogue_pki / "rogue.crt", rogue_pki / "rogue.key")
    public_pki = Pki.create(tmp_path / "public")
    public = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    public.load_cert_chain(public_pki.client.cert, public_pki.client.key)
    cases = {"no certificate": (trusting, "peer did not return a certificate"),
             "another cluster CA": (rogue, "certificate verify failed"),
             "the public client CA": (public, "certificate verify failed"),
             "plaintext": (None, "http request")}
    rt = cluster.scheduler
    for case, (ctx, reason) in cases.items():
        local = attempt(cluster.node_port, ctx)
        line = rt.wait_for_log(rf"Cluster mTLS: refused a connection from 127\.0\.0\.1:{local}: ")
        assert reason in line, (case, line)
        assert " WARN runtime::cluster::tls: " in line
        time.sleep(0.2)  # anything else about this peer would have been logged by now
        assert sum(f"127.0.0.1:{local}" in line for line in rt.logs()) == 1, case
    before = sum("refused a connection" in line for line in rt.logs())
    done = s_client(cluster.node_port, "-CAfile", str(pki / "ca.crt"))
    assert "Verification: OK" in done.stdout  # the node's certificate itself is fine
    wait_for(lambda: sum("refused a connection" in line for line in rt.logs()) == before + 1, timeout=10)
    assert "peer did not return a certificate" in [line for line in rt.logs() if "refused a connection" in line][-1]
    assert not [line for line in rt.logs() if "TLS handshake failed" in line or "SSL Error" in line]


# ---------------------------------------------------------------- rotation


def test_node_certificate_rotation_under_a_working_client(cluster: Cluster, dask_client: Any) -> None:
    from distributed import Client

    rt, pki = cluster.scheduler, cluster.pki
    assert node_serial(cluster) == serial_of(pki / "scheduler1.crt")
    assert dask_client.submit(lambda: "before").result(timeout=30) == "before"
    comm = dask_client.scheduler_comm.comm
    counts = cluster_reloads(rt)

    cluster_pki.add("scheduler1-v2", None, yes, pki)
    new_serial = serial_of(pki / "scheduler1-v2.crt")
    mark = len(rt.logs())
    os.replace(pki / "scheduler1-v2.key", pki / "scheduler1.key")
    os.replace(pki / "scheduler1-v2.crt", pki / "scheduler1.crt")
    line = rt.wait_for_log(r"Cluster mTLS: rotated PKI bundle \(server cert \+ verifier \+ outbound\) atomically",
                           after=mark)
    assert line.endswith(f"ca={pki / 'ca.crt'} cert={pki / 'scheduler1.crt'}")
    assert node_serial(cluster) == new_serial
    wait_for(lambda: cluster_reloads(rt).get("ok", 0) == counts.get("ok", 0) + 1, timeout=10)

    assert dask_client.scheduler_comm.comm is comm and not comm.closed()  # the open connection kept going
    assert dask_client.submit(lambda x: x * 2, 21).result(timeout=30) == 42
    assert len(dask_client.run(lambda: 1)) == 2
    with Client(f"tls://{cluster.node}", security=dask_security(pki), timeout="20s") as fresh:
        assert fresh.submit(lambda: "after").result(timeout=30) == "after"

    mark = len(rt.logs())
    replace_atomically(pki / "scheduler1.crt", b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
    rt.wait_for_log(r"WARN runtime::cluster::pki: Cluster mTLS reload: rotated material failed validation, "
                    r"keeping previous: ", after=mark)
    parse_errors = counts.get("parse_error", 0) + 1
    wait_for(lambda: cluster_reloads(rt).get("parse_error", 0) == parse_errors, timeout=10)
    time.sleep(2.5)  # past the next 2 s poll: the same bad file is not counted again
    assert cluster_reloads(rt).get("parse_error", 0) == parse_errors
    assert node_serial(cluster) == new_serial
    assert dask_client.submit(lambda: "still").result(timeout=30) == "still"


def test_a_query_through_the_scheduler_runs_its_scan_on_both_executors(cluster: Cluster) -> None:
    query = "SELECT city, count(*) AS n, min(id) AS first FROM trips GROUP BY city ORDER BY city"
    on_both = r"DEBUG runtime::cluster: Query ran \d+ stage\(s\) as \d+ task\(s\) on 2 executor\(s\)"

    def ran_on_both() -> bool:
        response = httpx.post(cluster.scheduler.http_url + "/v1/sql", content=query,
                              headers={"cache-control": "no-cache"}, timeout=30)
        assert response.json() == [{"city": "Portland", "n": 1, "first": 2}, {"city": "Seattle", "n": 1, "first": 1}]
        return any(re.search(on_both, line) for line in cluster.scheduler.logs())

    wait_for(ran_on_both, timeout=30, interval=0.5)

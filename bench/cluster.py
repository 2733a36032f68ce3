"""`python -m bench.cluster`: queries over a partitioned Parquet dataset (20M generated rows in 8
files) in DataFusion alone, next to the same queries on a cluster of a scheduler and 2 executors
joined over mutual TLS (a throwaway PKI), run by spiced/cluster/execution.py: the file-reading
stages (scans, filters, partial aggregates) on the executors, the rest on the scheduler.

Both run on this machine, the executors with one task thread each, so both sides have its cores;
the two take turns within each round. Then the same queries go over HTTP through the real runtimes:
`spiced` alone against `spiced --role scheduler` with two `spiced` executors. On one 2-core box a
cluster cannot win: the figure is its overhead (scheduling, the Arrow results coming back over TLS,
the final step). Printed: medians, the overhead, and the Arrow bytes the executors sent back per
query.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.x509.oid import ExtendedKeyUsageOID
from datafusion import SessionContext
from distributed import Client, Security
from pyarrow import ipc

from bench.common import OUT, Row, big_table, report
from spiced.cluster.execution import ClusterExecutor, ClusterStats
from spiced.engine import session_config
from tests.cluster_rig import make_pki, run_cluster, stop_dask
from tests.pki import issue, make_ca
from tests.support import run_spiced

ROWS, FILES, ROUNDS = 20_000_000, 8, 7
QUERIES = {
    "GROUP BY 1,024 groups": "SELECT grp, count(*) AS n, sum(amount) AS total, avg(id) AS mean FROM big GROUP BY grp",
    "GROUP BY 100,000 groups": "SELECT id % 100000 AS k, count(*) AS n, sum(amount) AS total FROM big GROUP BY 1",
    "20,000 filtered rows": "SELECT id, amount, label FROM big WHERE id % 1000 = 0",
}
DASK = str(Path(sys.executable).with_name("dask"))


def dataset() -> Path:
    """The generated rows as FILES Parquet files (cached in bench/out)."""
    folder = OUT / f"cluster_{ROWS}"
    if len(list(folder.glob("*.parquet"))) == FILES:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    per_file = ROWS // FILES
    for f in range(FILES):
        pq.write_table(big_table(per_file, f * per_file), folder / f"part-{f}.parquet", row_group_size=256 * 1024)
    return folder


@contextmanager
def tls_cluster(work: Path) -> Iterator[Client]:
    """A Dask scheduler and 2 executors (processes without a Nanny) on 127.0.0.1, mutual TLS with
    one leaf from a throwaway CA, and a client holding the same leaf."""
    ca = make_ca(work, "cluster-ca")
    leaf = issue(ca, work, "node", server=True,
                 usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    tls = ["--tls-ca-file", str(ca.cert), "--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key)]
    scheduler_file = work / "scheduler.json"
    logs = (work / "cluster.log").open("wb")
    # --preload: the runtime's scheduler lives in the spiced process, where this is already imported.
    procs = [subprocess.Popen([DASK, "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file),
                               "--preload", "spiced.cluster.partitions", *tls], stdout=logs, stderr=subprocess.STDOUT)]
    try:
        while not scheduler_file.exists():
            if procs[0].poll() is not None:
                sys.exit(f"the scheduler ended: {(work / 'cluster.log').read_text()}")
            time.sleep(0.05)
        for n in range(2):
            procs.append(subprocess.Popen([DASK, "worker", "--scheduler-file", str(scheduler_file), "--no-nanny",
                                           "--nthreads", "1", "--host", "127.0.0.1", "--dashboard-address",
                                           "127.0.0.1:0", "--name", f"executor-{n}", "--local-directory", str(work),
                                           *tls], stdout=logs, stderr=subprocess.STDOUT))
        security = Security(tls_ca_file=str(ca.cert), tls_client_cert=str(leaf.cert), tls_client_key=str(leaf.key),
                            require_encryption=True)
        with Client(scheduler_file=str(scheduler_file), security=security, timeout=30) as client:
            client.wait_for_workers(2, timeout=120)
            yield client
    finally:
        stop_dask(procs)
        logs.close()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sorted_rows(t: pa.Table) -> pa.Table:
    return t.sort_by([(name, "ascending") for name in t.column_names])


def distributed(executor: ClusterExecutor, ctx: SessionContext, sql: str) -> tuple[pa.Table, ClusterStats]:
    query = executor.execute(ctx, sql)
    if query is None:
        sys.exit(f"not distributed: {sql}")
    return pa.Table.from_batches(list(query), schema=query.schema), query.stats


POD = """version: v1
kind: Spicepod
name: bench-cluster
runtime:
  caching:
    sql_results:
      enabled: false
datasets:
  - from: file:{folder}/
    name: big
    params:
      file_format: parquet
"""


def http_arrow(http: httpx.Client, url: str, sql: str) -> pa.Table:
    r = http.post(url + "/v1/sql", content=sql, headers={"Accept": "application/vnd.apache.arrow.stream"})
    r.raise_for_status()
    return ipc.open_stream(r.content).read_all()


def through_runtimes(folder: Path, work: Path) -> list[Row]:
    """The same queries over HTTP (`/v1/sql`, Arrow stream): `spiced` alone against `spiced --role
    scheduler` with 2 executors (`spiced --scheduler-address`, a `spice cluster tls` PKI), the whole
    path of a user's query; the two take turns in each round."""
    pod = work / "pod"
    pod.mkdir()
    (pod / "spicepod.yaml").write_text(POD.format(folder=folder))
    pki = make_pki(work / "pki", "scheduler1", "executor1", "executor2")
    rows: list[Row] = []
    t0 = time.perf_counter()
    with run_spiced(pod, timeout=120) as single, run_cluster(work, pod, pki, ("executor1", "executor2")) as cluster, \
            httpx.Client(timeout=300) as http:
        print(f"runtimes (spiced alone; a scheduler and 2 executors) ready in {time.perf_counter() - t0:.1f} s")
        for name, sql in QUERIES.items():
            expected = sorted_rows(http_arrow(http, single.http_url, sql))
            if not sorted_rows(http_arrow(http, cluster.scheduler.http_url, sql)).equals(expected):
                print(f"  !! {name}: the scheduler's result differs from spiced alone")
            alone, clustered = [], []
            for _ in range(ROUNDS):
                alone.append(timed(lambda sql=sql: http_arrow(http, single.http_url, sql)))
                clustered.append(timed(lambda sql=sql: http_arrow(http, cluster.scheduler.http_url, sql)))
            t_alone, t_cluster = statistics.median(alone), statistics.median(clustered)
            rows.append(Row(f"{name} over HTTP: scheduler + 2 executors vs spiced alone (s)", t_cluster, t_alone,
                            "s", f"report; overhead {1000 * (t_cluster - t_alone):+.0f} ms"))
        ran = [line for line in cluster.scheduler.logs() if "Query ran" in line]
        if not ran or "on 2 executor(s)" not in ran[-1]:
            print(f"  !! the scheduler did not distribute the queries: {ran[-1:] or 'no Query ran line'}")
    return rows


def main() -> None:
    t0 = time.perf_counter()
    folder = dataset()
    size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    print(f"data: {folder} ({ROWS:,} rows in {FILES} files, {size:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    ctx = SessionContext(session_config())
    ctx.register_parquet("big", str(folder))
    work = Path(tempfile.mkdtemp(prefix="spiced-bench-cluster-"))
    rows: list[Row] = []
    moved: dict[str, ClusterStats] = {}
    try:
        t0 = time.perf_counter()
        with tls_cluster(work) as client:
            executor = ClusterExecutor(client)
            executor.prepare()
            print(f"cluster (scheduler + 2 executors, mTLS) ready in {time.perf_counter() - t0:.1f} s")
            for name, sql in QUERIES.items():
                expected = sorted_rows(ctx.sql(sql).to_arrow_table())  # the files in the page cache, too
                first = timed(lambda sql=sql: distributed(executor, ctx, sql))
                result, moved[name] = distributed(executor, ctx, sql)
                if not sorted_rows(result).equals(expected):
                    print(f"  !! {name}: the cluster's result differs from DataFusion's")
                local, cluster = [], []
                for _ in range(ROUNDS):
                    local.append(timed(lambda sql=sql: ctx.sql(sql).collect()))
                    cluster.append(timed(lambda sql=sql: distributed(executor, ctx, sql)))
                t_local, t_cluster = statistics.median(local), statistics.median(cluster)
                rows.append(Row(f"{name}: cluster vs DataFusion alone (s)", t_cluster, t_local, "s",
                                f"report; overhead {1000 * (t_cluster - t_local):+.0f} ms, first run {first:.3f} s"))
        rows += through_runtimes(folder, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(f"Cluster: {ROWS:,} Parquet rows, 1 scheduler + 2 executors over mTLS vs one DataFusion process", rows)
    print("\nArrow bytes sent back by the executors, per query:")
    for name, stats in moved.items():
        print(f"  {name:28} {stats.bytes_received / 1e6:9.3f} MB from {stats.tasks} partitions")


if __name__ == "__main__":
    main()

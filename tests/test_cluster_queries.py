"""Distributed queries end to end (#17), through the real scheduler process: a `spiced --role scheduler -v`
and two `spiced` executors on 127.0.0.1 over mTLS (tests/cluster_rig.py), a dataset of 8 Parquet files
(3.2M rows, `from: file:t/`, not accelerated, so its queries run on the executors), queried over HTTP
and Flight, every result checked against pyarrow's over the same rows.

Covers: the node certificates of the scheduler and both executors rotated twice while queries run back
to back, none lost or wrong, each new handshake on a node port served the new leaf, and each rotation
counted on every node's /metrics; an executor SIGKILLed while it holds partitions of two queries in flight,
which end with the right result (its partitions run again on the other executor), then a cluster of one
that keeps serving, and a replacement executor that joins and takes partitions again.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as fl
import pyarrow.parquet as pq
import pytest
from cryptography import x509
from distributed import Client, get_task_stream

from tests.cluster_rig import (
    Cluster,
    Executor,
    cluster_reloads,
    cluster_samples,
    dask_security,
    files_spicepod,
    issue,
    make_pki,
    node_serial,
    run_cluster,
    serial_of,
)
from tests.support import Runtime
from tests.tlsprobe import TimedOut, wait_for

FILES, ROWS_PER_FILE, GROUPS, MANY = 8, 400_000, 1_000, 800_000
GROUP_BY = "SELECT grp, count(*) AS n, sum(amount) AS total FROM t GROUP BY grp"
FILTERED = "SELECT id, amount FROM t WHERE id % 7 = 0"  # one stage as a whole: the executors' batches are the rows
MANY_GROUPS = f"SELECT id % {MANY} AS k, count(*) AS n, sum(amount) AS total FROM t GROUP BY k"  # 1-3 s on 2 cores
KEYS = {GROUP_BY: "grp", FILTERED: "id", MANY_GROUPS: "k"}
SPICEPOD = files_spicepod("queries")
FAILED = "Failed to execute query: Cluster execution failed"


def ran_on(executors: int) -> str:
    return rf"DEBUG runtime::cluster: Query ran \d+ stage\(s\) as \d+ task\(s\) on {executors} executor\(s\)"


def rows(first: int, count: int) -> pa.Table:
    """Amounts in quarters: their sums are exact, whatever order the partitions are added in."""
    ids = pa.array(range(first, first + count), pa.int64())
    return pa.table({"id": ids, "grp": pc.cast(pc.remainder(ids, GROUPS), pa.int32()),
                     "amount": pc.multiply(pc.cast(ids, pa.float64()), 0.25)})


def aggregated(data: pa.Table, key: str) -> pa.Table:
    found = data.group_by(key).aggregate([("id", "count"), ("amount", "sum")])
    return found.rename_columns([key, "n", "total"]).sort_by(key)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster-queries")


@pytest.fixture(scope="module")
def expected(root: Path) -> dict[str, pa.Table]:
    """Writes the dataset's files, `<root>/pod/t/*.parquet`; the results each query must give, sorted by its key."""
    folder = root / "pod" / "t"
    folder.mkdir(parents=True)
    parts = [rows(f * ROWS_PER_FILE, ROWS_PER_FILE) for f in range(FILES)]
    for f, part in enumerate(parts):
        pq.write_table(part, folder / f"part-{f}.parquet")
    data = pa.concat_tables(parts)
    return {GROUP_BY: aggregated(data, "grp"),
            FILTERED: data.filter(pc.equal(pc.remainder(data["id"], 7), 0)).select(["id", "amount"]),
            MANY_GROUPS: aggregated(data.append_column("k", pc.remainder(data["id"], MANY)), "k")}


@pytest.fixture(scope="module")
def cluster(root: Path, expected: dict[str, pa.Table]) -> Iterator[Cluster]:
    (root / "pod" / "spicepod.yaml").write_text(SPICEPOD)
    pki = make_pki(root / "pki", "scheduler1", "executor1", "executor2", "executor3")
    with run_cluster(root, root / "pod", pki, ("executor1", "executor2"), metrics=True) as cluster:
        wait_for(lambda: len(executors_listed(cluster)) == 2, timeout=30)
        yield cluster


@pytest.fixture(scope="module")
def dask_client(cluster: Cluster) -> Iterator[Any]:
    """A Dask client of the scheduler's, to watch where partitions run (a leaf of the cluster CA)."""
    with Client(f"tls://{cluster.node}", security=dask_security(cluster.pki), timeout="20s") as client:
        yield client


def executors_listed(cluster: Cluster) -> list[str]:
    response = httpx.get(cluster.scheduler.http_url + "/v1/status", params={"format": "json"}, timeout=10)
    return sorted(row["endpoint"] for row in response.json() if row["name"] == "executor")


# ---------------------------------------------------------------- one query, checked


class Refused(Exception):
    """A query answered with an error: its HTTP status and body, or (status None) the Flight error's text
    (a FlightError, or the ArrowInvalid an INVALID_ARGUMENT sent in the stream reads as)."""

    def __init__(self, status: int | None, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.status, self.text = status, text


def query(cluster: Cluster, sql: str, protocol: str) -> pa.Table:
    """`sql` over HTTP (JSON for small results, else Arrow IPC) or Flight DoGet; Refused on an error."""
    if protocol == "flight":
        with fl.connect(cluster.scheduler.flight_uri) as client:
            try:
                return client.do_get(fl.Ticket(sql.encode()), fl.FlightCallOptions(timeout=60)).read_all()
            except pa.ArrowException as e:
                raise Refused(None, str(e)) from None
    arrow = sql != GROUP_BY
    headers = {"cache-control": "no-cache", "accept": "application/vnd.apache.arrow.stream" if arrow else
               "application/json"}
    response = httpx.post(cluster.scheduler.http_url + "/v1/sql", content=sql, headers=headers, timeout=60)
    if response.status_code != 200:
        raise Refused(response.status_code, response.text)
    return pa.ipc.open_stream(response.content).read_all() if arrow else pa.Table.from_pylist(response.json())


def check(sql: str, got: pa.Table, expected: dict[str, pa.Table]) -> None:
    want = expected[sql]
    got = got.sort_by(KEYS[sql])
    assert (got.column_names, got.num_rows) == (want.column_names, want.num_rows), sql
    for name, column in zip(want.column_names, want.columns, strict=True):
        assert got[name].cast(column.type).equals(column), (sql, name)


def lines(rt: Runtime, pattern: str, after: int = 0) -> int:
    return sum(re.search(pattern, line) is not None for line in rt.logs()[after:])


def test_a_query_has_a_task_for_each_executor_thread(cluster: Cluster, expected: dict[str, pa.Table],
                                                     dask_client: Any) -> None:
    threads = sum(dask_client.nthreads().values())
    mark = len(cluster.scheduler.logs())
    check(GROUP_BY, query(cluster, GROUP_BY, "http"), expected)
    ran = [line for line in cluster.scheduler.logs()[mark:] if "Query ran" in line]
    assert len(ran) == 1 and f"Query ran 1 stage(s) as {threads} task(s) on 2 executor(s)" in ran[0], ran


def test_node_certificates_are_in_the_expiry_gauges(cluster: Cluster) -> None:
    for name, rt in (("scheduler1", cluster.scheduler), *((e.name, e.runtime) for e in cluster.executors)):
        seen = {(s.labels["kind"], s.labels["subject_CN"], s.labels["serial_number"], s.value)
                for s in cluster_samples(rt, "x509_cert_not_after")}
        leaf = x509.load_pem_x509_certificate((cluster.pki / f"{name}.crt").read_bytes())
        ca = x509.load_pem_x509_certificate((cluster.pki / "ca.crt").read_bytes())
        assert seen == {("server", name, format(leaf.serial_number, "X"), leaf.not_valid_after_utc.timestamp()),
                        ("client_ca", "Spice.ai CLI Root CA - DO NOT USE IN PRODUCTION",
                         format(ca.serial_number, "X"), ca.not_valid_after_utc.timestamp())}, (name, seen)


# ---------------------------------------------------------------- rotation under a stream of queries


@dataclass
class Done:
    sql: str
    protocol: str
    started: float
    ended: float
    error: str | None


@dataclass
class Traffic:
    """Queries back to back on a thread (GROUP BY and the filtered projection, over HTTP and Flight),
    each result checked, until the block ends."""

    cluster: Cluster
    expected: dict[str, pa.Table]
    done: list[Done] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, name="cluster-traffic", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)
        assert not self._thread.is_alive(), "a query hung"

    def _run(self) -> None:
        kinds = itertools.cycle([(GROUP_BY, "http"), (FILTERED, "flight"), (GROUP_BY, "flight"), (FILTERED, "http")])
        while not self._stop.is_set():
            sql, protocol = next(kinds)
            started, error = time.monotonic(), None
            try:
                check(sql, query(self.cluster, sql, protocol), self.expected)
            except Exception as e:  # AssertionError included: recorded, and the stream goes on
                error = f"{type(e).__name__}: {e}"
            self.done.append(Done(sql, protocol, started, time.monotonic(), error))

    def wait(self, more: int) -> None:
        """Until `more` queries have completed from now."""
        target = len(self.done) + more
        wait_for(lambda: len(self.done) >= target or not self._thread.is_alive(), timeout=60)


def rotate(pki: Path, name: str, leaf: str) -> int:
    """A new leaf from the cluster CA renamed over `name`'s key, then its certificate; its serial."""
    crt, key = issue(pki, leaf)
    serial = serial_of(crt)
    os.replace(key, pki / f"{name}.key")
    os.replace(crt, pki / f"{name}.crt")
    return serial


def test_node_certificates_rotate_under_a_stream_of_distributed_queries(cluster: Cluster,
                                                                        expected: dict[str, pa.Table]) -> None:
    nodes = [("scheduler1", cluster.scheduler, cluster.node_port),
             *((e.name, e.runtime, e.node_port) for e in cluster.executors)]
    assert [node_serial(cluster, port) for name, _, port in nodes] == \
        [serial_of(cluster.pki / f"{name}.crt") for name, _, _ in nodes]
    oks = {name: cluster_reloads(rt).get("ok", 0) for name, rt, _ in nodes}
    mark = len(cluster.scheduler.logs())
    rounds = 2
    with Traffic(cluster, expected) as traffic:
        traffic.wait(4)
        rotating = time.monotonic()
        for r in range(1, rounds + 1):
            marks = {name: len(rt.logs()) for name, rt, _ in nodes}
            serials = {name: rotate(cluster.pki, name, f"{name}-r{r}") for name, _, _ in nodes}
            for name, rt, port in nodes:
                rt.wait_for_log(r"Cluster mTLS: rotated PKI bundle \(server cert \+ verifier \+ outbound\) "
                                "atomically", after=marks[name])
                assert node_serial(cluster, port) == serials[name], name
            traffic.wait(2)  # between the rounds, and after the last one
        rotated = time.monotonic()
        traffic.wait(4)
    done = traffic.done
    assert [d for d in done if d.error is not None] == []
    during = [d for d in done if d.ended > rotating and d.started < rotated]
    after = [d for d in done if d.started > rotated]
    assert len(during) >= 2 * rounds and len(after) >= 4, (len(during), len(after))
    assert {(d.sql, d.protocol) for d in done} == {(GROUP_BY, "http"), (FILTERED, "flight"), (GROUP_BY, "flight"),
                                                   (FILTERED, "http")}
    # Every query ran on both executors; every node counted each rotation once.
    wait_for(lambda: lines(cluster.scheduler, ran_on(2), mark) == len(done), timeout=10)
    assert lines(cluster.scheduler, r"runtime::cluster: Query ran", mark) == len(done)
    wait_for(lambda: all(cluster_reloads(rt).get("ok", 0) == oks[name] + rounds for name, rt, _ in nodes), timeout=10)
    assert executors_listed(cluster) == sorted(e.node for e in cluster.executors)


# ---------------------------------------------------------------- an executor killed mid-query


def outcome(cluster: Cluster, sql: str, protocol: str, expected: dict[str, pa.Table]) -> str:
    """How a query that lost an executor ended: "rerun" (the right result) or "failed" (the clear error:
    a 4xx/5xx `Failed to execute query: Cluster execution failed: …`, over Flight the message without
    the prefix, spiced/flight/results.py); anything else fails the test."""
    try:
        got = query(cluster, sql, protocol)
    except Refused as e:
        if e.status is not None:
            assert 400 <= e.status < 600 and e.text.startswith(f"{FAILED}: "), str(e)
        else:
            assert re.match(rf"(.*message: )?({FAILED}|Cluster execution failed): ", e.text), e.text
        assert "Traceback" not in e.text
        return "failed"
    check(sql, got, expected)
    return "rerun"


def stage_tasks(dask_client: Any, executor: Executor) -> int:
    """The query partitions the scheduler has given `executor` and not yet seen finished."""
    address = f"tls://{executor.node}"
    return sum(str(key).startswith("spiced-stage-") for key in dask_client.processing([address]).get(address, ()))


def test_an_executor_killed_mid_query(cluster: Cluster, expected: dict[str, pa.Table], dask_client: Any) -> None:
    doomed, survivor = cluster.executors[-1], cluster.executors[0]
    total = 2 * sum(dask_client.nthreads().values())  # two queries, a partition per executor thread each
    mark = len(cluster.scheduler.logs())
    with ThreadPoolExecutor(2) as pool, get_task_stream(dask_client) as stream:
        running = [pool.submit(outcome, cluster, MANY_GROUPS, protocol, expected) for protocol in ("http", "flight")]
        # Each query gives each executor half of its partitions. The doomed one is frozen as soon as it
        # runs one, so that the kill lands while it holds partitions (of both queries, as a rule).
        wait_for(lambda: stage_tasks(dask_client, doomed) >= 1, timeout=30)
        doomed.runtime.send_signal(signal.SIGSTOP)
        with suppress(TimedOut):
            wait_for(lambda: stage_tasks(dask_client, doomed) == total // 2, timeout=5)
        time.sleep(0.2)  # a partition it finished just before the freeze would have been reported by now
        held = stage_tasks(dask_client, doomed)
        assert held >= 1
        doomed.runtime.send_signal(signal.SIGKILL)
        assert doomed.runtime.proc.wait(10) == -signal.SIGKILL
        outcomes = [f.result(timeout=90) for f in running]  # never a hang
    cluster.executors.remove(doomed)
    # What happens: Dask runs the lost partitions again on the other executor, and both queries give
    # the right rows.
    assert outcomes == ["rerun", "rerun"], outcomes
    finished = [task["worker"] for task in stream.data if str(task["key"]).startswith("spiced-stage-")]
    assert len(finished) == total and finished.count(f"tls://{survivor.node}") == total // 2 + held, (held, finished)
    wait_for(lambda: lines(cluster.scheduler, ran_on(2), mark) == 2, timeout=10)  # they had started on both

    wait_for(lambda: executors_listed(cluster) == [survivor.node], timeout=30)
    mark = len(cluster.scheduler.logs())
    for sql, protocol in ((GROUP_BY, "http"), (FILTERED, "flight")):
        check(sql, query(cluster, sql, protocol), expected)
    wait_for(lambda: lines(cluster.scheduler, ran_on(1), mark) == 2, timeout=10)

    replacement = cluster.add_executor("executor3")
    replacement.runtime.wait_for_log("Received spicepod queries from the scheduler: 1 datasets, 0 views")
    wait_for(lambda: executors_listed(cluster) == sorted([survivor.node, replacement.node]), timeout=30)
    mark = len(cluster.scheduler.logs())
    with get_task_stream(dask_client) as stream:
        for sql, protocol in ((GROUP_BY, "flight"), (FILTERED, "http")):
            check(sql, query(cluster, sql, protocol), expected)
    wait_for(lambda: lines(cluster.scheduler, ran_on(2), mark) == 2, timeout=10)
    used = {task["worker"] for task in stream.data if str(task["key"]).startswith("spiced-stage-")}
    assert used == {f"tls://{survivor.node}", f"tls://{replacement.node}"}
    assert not [line for line in cluster.scheduler.logs() if "Traceback" in line or " ERROR " in line]

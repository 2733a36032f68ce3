"""spiced/cluster/execution.py: queries run on a real Dask cluster (a scheduler and two executors,
separate processes on 127.0.0.1) give the single-node results; shapes that are not distributed are
refused; a killed executor's partitions run again elsewhere, or the query fails with a QueryError,
and the cluster serves the next query."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from datafusion import ExecutionPlan, SessionContext
from distributed import Client, Worker, get_task_stream

from spiced.cluster.execution import ClusterExecutor, DistributedQuery
from spiced.cluster.partitions import PLUGIN_NAME, DataFusionExecutor
from spiced.cluster.stages import split_plan
from spiced.config import load_config
from spiced.engine import Engine
from spiced.errors import QueryError
from spiced.interrupt import Stopped, Stopper
from spiced.metrics import Metrics
from tests.cluster_rig import stop_dask
from tests.support import dataset_yaml, spicepod_yaml

DASK = str(Path(sys.executable).with_name("dask"))
FILES, ROWS_PER_FILE = 6, 10_000
GROUP_BY = "SELECT grp, count(*) AS n, sum(amount) AS total, avg(amount) AS mean FROM t GROUP BY grp"

# Functions of this module sent to the executors travel whole: they cannot import the tests.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# (SQL, whether its row order is defined)
QUERIES = [
    ("SELECT count(*) AS n FROM t WHERE amount > 100", False),
    ("SELECT count(*), count(maybe), count(label), sum(amount), avg(amount), min(amount), max(amount), "
     "min(label), max(label), min(ts), max(ts), sum(maybe), avg(maybe) FROM t", False),
    (GROUP_BY, False),
    ("SELECT grp, label, count(*) AS n, min(id), max(id) FROM t GROUP BY grp, label", False),
    ("SELECT count(DISTINCT label) AS labels, count(DISTINCT grp) AS groups FROM t", False),
    ("SELECT grp % 10 AS g, count(DISTINCT label) AS labels, sum(DISTINCT maybe) AS s FROM t GROUP BY 1", False),
    ("SELECT label, count(*) AS n FROM t GROUP BY label HAVING count(*) > 1500", False),
    ("SELECT id, upper(label) AS l, amount * 2 AS twice FROM t WHERE label LIKE 'item-1%' AND maybe IS NULL", False),
    ("SELECT id, label FROM t WHERE id % 997 = 0", False),
    ("SELECT id, amount, label FROM t WHERE maybe IS NOT NULL ORDER BY amount DESC, id LIMIT 17", True),
    ("SELECT id FROM t ORDER BY id LIMIT 5 OFFSET 30000", True),
    ("SELECT label, count(*) AS n FROM t GROUP BY label ORDER BY n DESC, label NULLS FIRST LIMIT 5", True),
    ("SELECT grp, sum(amount) AS total FROM t WHERE flag GROUP BY grp ORDER BY total DESC, grp LIMIT 10", True),
    ("SELECT concat(label, '/', CAST(grp AS VARCHAR)) AS key, length(label) AS len FROM t "
     "WHERE id BETWEEN 100 AND 140 ORDER BY id", True),
    ("SELECT maybe IS NULL AS missing, label IS NULL AS unlabelled, count(*) AS n FROM t GROUP BY 1, 2", False),
    ("SELECT coalesce(label, '(none)') AS l, sum(maybe) AS s, avg(maybe) AS a FROM t GROUP BY 1", False),
    ("SELECT d.name, count(*) AS n, sum(t.amount) AS total FROM t JOIN dim d ON t.grp % 50 = d.k GROUP BY d.name",
     False),
    ("SELECT a.id, b.label FROM t a JOIN t b ON a.id = b.id + 1 WHERE a.grp = 7", False),
    ("SELECT d.k, count(t.id) AS n FROM dim d LEFT JOIN t ON t.grp = d.k AND t.id < 300 GROUP BY d.k", False),
    ("SELECT count(*) AS n FROM t WHERE grp IN (SELECT k FROM dim WHERE name LIKE 'name-1%')", False),
    ("SELECT id FROM t WHERE id < 5 UNION ALL SELECT k FROM dim WHERE k < 3", False),
    ("SELECT grp, id, sum(amount) OVER (PARTITION BY grp ORDER BY id) AS running FROM t WHERE grp < 3", False),
    ("SELECT median(amount) AS m, approx_distinct(label) AS d, stddev(amount) AS s FROM t", False),
    ("SELECT part, count(*) AS n, sum(v) AS s FROM hive GROUP BY part", False),
    ("SELECT part, v FROM hive WHERE v % 100 = 1", False),
    # empty results: a stage with no rows at all, a filtered scan, an aggregate without groups
    ("SELECT grp, count(*) AS n FROM t WHERE label = 'nothing' GROUP BY grp", False),
    ("SELECT * FROM t WHERE label = 'nothing'", False),
    ("SELECT count(*) AS n, sum(amount) AS s, max(label) AS m FROM t WHERE label = 'nothing'", False),
]

# Not distributed: statistics answer it, in-memory (accelerated) tables, catalog, table functions,
# no table at all, a file table joined with an accelerated one.
LOCAL_ONLY = [
    "SELECT count(*) FROM t",
    "SELECT count(*) FROM mem",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM generate_series(1, 10)",
    "SELECT 1 AS one",
    "SELECT t.id FROM t JOIN mem ON t.grp = mem.grp WHERE t.id < 10",
]


def table(rows: int, start: int) -> pa.Table:
    """Many groups, strings with NULLs, a nullable integer, amounts in quarters (so that any order
    of summing gives the same float), timestamps, booleans."""
    ids = pa.array(range(start, start + rows), pa.int64())
    every = lambda n: pc.equal(pc.bit_wise_and(ids, n - 1), 0)  # noqa: E731
    return pa.table({
        "id": ids,
        "grp": pc.cast(pc.divide(ids, 30), pa.int32()),  # 2,000 groups
        "amount": pc.multiply(pc.cast(ids, pa.float64()), 0.25),
        "label": pc.if_else(every(16), pa.scalar(None, pa.string()),
                            pc.binary_join_element_wise("item-", pc.cast(pc.remainder(ids, 37), pa.string()), "")),
        "maybe": pc.if_else(every(8), pa.scalar(None, pa.int64()), ids),
        "ts": pc.cast(pc.add(pc.multiply(ids, 1_000_000), 1_700_000_000_000_000), pa.timestamp("us")),
        "flag": every(2),
    })


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The runtime's engine over a partitioned Parquet folder and friends, with 4 target partitions."""
    work = tmp_path_factory.mktemp("data")
    (work / "t").mkdir()
    for f in range(FILES):
        pq.write_table(table(ROWS_PER_FILE, f * ROWS_PER_FILE), work / "t" / f"part-{f}.parquet", row_group_size=4096)
    pq.write_table(pa.table({"k": pa.array(range(50), pa.int32()), "name": [f"name-{k}" for k in range(50)]}),
                   work / "dim.parquet")
    for part in ("a", "b", "c"):
        (work / "hive" / f"part={part}").mkdir(parents=True)
        pq.write_table(pa.table({"v": range(ord(part) * 1000, ord(part) * 1000 + 500)}),
                       work / "hive" / f"part={part}" / "data.parquet")
    # A CSV whose schema is inferred from its first 1,000 rows; row 1,500 does not parse.
    (work / "bad.csv").write_text("n\n" + "".join(f"{i if i != 1500 else 'x'}\n" for i in range(2000)))
    (work / "spicepod.yaml").write_text(spicepod_yaml(
        dataset_yaml("file:t/", "t", "      file_format: parquet\n"),
        dataset_yaml("file:dim.parquet", "dim"),
        dataset_yaml("file:hive/", "hive", "      file_format: parquet\n      hive_partitioning_enabled: true\n"),
        dataset_yaml("file:bad.csv", "bad"),
        dataset_yaml("file:t/", "mem", "      file_format: parquet\n", accelerated=True),
    ))
    eng = Engine(load_config([], workdir=work, environ={}).spicepod, Metrics())
    eng.datasets.register_all()
    asyncio.run(eng.datasets.load_all())
    eng.ctx.sql("SET datafusion.execution.target_partitions = 4").collect()
    yield eng
    eng.close()


@dataclass
class Cluster:
    client: Client
    executor: ClusterExecutor
    scheduler_file: Path
    work: Path
    procs: list[subprocess.Popen[bytes]]

    def worker(self, name: str, threads: int = 1) -> subprocess.Popen[bytes]:
        proc = _start([DASK, "worker", "--scheduler-file", str(self.scheduler_file), "--no-nanny", "--nthreads",
                       str(threads), "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0", "--name", name,
                       "--local-directory", str(self.work)], self.work / f"{name}.log")
        self.procs.append(proc)
        return proc

    def address(self, name: str) -> str:
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        return next(addr for addr, info in workers.items() if info["name"] == name)


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("cluster")
    scheduler_file = work / "scheduler.json"
    # The runtime's scheduler runs in the spiced process, where this module is already imported;
    # a bare `dask scheduler` would import it (about 0.1 s) when the first stage arrives.
    procs = [_start([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                     "--scheduler-file", str(scheduler_file), "--preload", "spiced.cluster.partitions"],
                    work / "scheduler.log")]
    cluster = None
    try:
        deadline = time.monotonic() + 30
        while not scheduler_file.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, (work / "scheduler.log").read_text()
            time.sleep(0.05)
        client = Client(scheduler_file=str(scheduler_file), timeout=30)
        cluster = Cluster(client, ClusterExecutor(client), scheduler_file, work, procs)
        for name in ("executor-0", "executor-1"):
            cluster.worker(name, threads=2)
        client.wait_for_workers(2, timeout=60)
        cluster.executor.prepare()
        yield cluster
    finally:
        if cluster is not None:
            cluster.client.close()
        stop_dask(procs)


def collect(query: DistributedQuery) -> pa.Table:
    return pa.Table.from_batches(list(query), schema=query.schema)


def rows(t: pa.Table, ordered: bool) -> list[object]:
    """The rows, floats rounded to 12 significant digits: a variance's partial states merge in
    arrival order, on one node as on a cluster (sums of quarters are exact whatever the order)."""
    found = [{k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in row.items()} for row in t.to_pylist()]
    return found if ordered else sorted(found, key=repr)


@pytest.mark.parametrize(("sql", "ordered"), QUERIES, ids=[q[:60] for q, _ in QUERIES])
def test_distributed_results_are_the_single_node_results(cluster: Cluster, engine: Engine, sql: str,
                                                         ordered: bool) -> None:
    query = cluster.executor.execute(engine.ctx, engine.plan(sql))
    assert query is not None, "not distributed"
    got = collect(query)
    local = engine.plan(sql).to_arrow_table()
    assert got.schema == local.schema
    assert rows(got, ordered) == rows(local, ordered)
    assert query.stats.executors == 2 and query.stats.tasks >= 3


@pytest.mark.parametrize("sql", LOCAL_ONLY)
def test_shapes_that_are_not_distributed_are_left_to_the_caller(cluster: Cluster, engine: Engine, sql: str) -> None:
    assert cluster.executor.execute(engine.ctx, sql) is None


def test_stages_are_what_files_feed_below_the_exchanges(engine: Engine) -> None:
    def stage_roots(sql: str) -> list[str]:
        split = split_plan(engine.plan(sql).execution_plan(), engine.ctx)
        assert split is not None
        return [ExecutionPlan.from_bytes(SessionContext(), s.plan).display().split(",")[0] for s in split.stages]

    assert stage_roots(GROUP_BY) == ["AggregateExec: mode=Partial"]
    assert stage_roots("SELECT id FROM t ORDER BY id LIMIT 3") == ["SortExec: TopK(fetch=3)"]
    assert stage_roots("SELECT t.id FROM t JOIN dim ON t.grp = dim.k")[0].startswith("DataSourceExec")
    assert len(stage_roots("SELECT t.id FROM t JOIN dim ON t.grp = dim.k")) == 2
    split = split_plan(engine.plan("SELECT id FROM t WHERE grp = 3").execution_plan(), engine.ctx)
    assert split is not None and split.whole


def test_partitions_go_round_robin_to_the_executors(cluster: Cluster, engine: Engine) -> None:
    with get_task_stream(cluster.client) as stream:
        query = cluster.executor.execute(engine.ctx, GROUP_BY)
        assert query is not None
        collect(query)
    ran_on = [task["worker"] for task in stream.data if str(task["key"]).startswith("spiced-stage-")]
    assert len(ran_on) == 4
    assert sorted(set(ran_on)) == sorted(cluster.client.nthreads())


def test_a_stage_without_rows_anywhere_is_stood_in_for_by_itself_reading_no_file(cluster: Cluster,
                                                                                  engine: Engine) -> None:
    sql = "SELECT grp, count(*) AS n FROM t WHERE label = 'nothing' GROUP BY grp"
    query = cluster.executor.execute(engine.ctx, sql)
    assert query is not None and not query.split.whole
    got = collect(query)
    assert (got.num_rows, query.stats.bytes_received) == (0, 0)
    assert got.schema == engine.plan(sql).to_arrow_table().schema


def executor_is_warm(dask_worker: Worker) -> bool:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    return isinstance(plugin, DataFusionExecutor) and plugin.session is not None


def test_executors_are_warm_once_prepared(cluster: Cluster) -> None:
    assert set(cluster.client.run(executor_is_warm).values()) == {True}


def test_an_executor_error_is_the_query_error_datafusion_gives_locally(cluster: Cluster, engine: Engine) -> None:
    sql = "SELECT sum(n) AS s FROM bad"
    query = cluster.executor.execute(engine.ctx, sql)
    assert query is not None
    with pytest.raises(QueryError) as remote:
        collect(query)
    with pytest.raises(QueryError) as local:
        engine.execute(sql).reader().read_all()
    assert (remote.value.kind, str(remote.value)) == (local.value.kind, str(local.value))
    assert "x" in str(remote.value)
    check_serving(cluster, engine)


def test_an_asynchronous_client_works_from_a_query_thread(cluster: Cluster, engine: Engine) -> None:
    """As in the runtime: the client lives on an event loop, queries run in other threads."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def connect() -> Client:
        return await Client(json.loads(cluster.scheduler_file.read_text())["address"], asynchronous=True)

    async def close(client: Client) -> None:
        await client.close()

    client = asyncio.run_coroutine_threadsafe(connect(), loop).result(30)
    try:
        query = ClusterExecutor(client).execute(engine.ctx, GROUP_BY)
        assert query is not None
        assert rows(collect(query), False) == rows(engine.plan(GROUP_BY).to_arrow_table(), False)
    finally:
        asyncio.run_coroutine_threadsafe(close(client), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@contextmanager
def stalled_executor(cluster: Cluster, name: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A third executor, frozen (SIGSTOP): the scheduler still gives it partitions, which wait."""
    proc = cluster.worker(name)
    try:
        cluster.client.wait_for_workers(3, timeout=60)
        address = cluster.address(name)
        deadline = time.monotonic() + 30  # its session is made before it takes tasks
        while not cluster.client.run(executor_is_warm, workers=[address])[address]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGSTOP)
        yield proc, address
    finally:
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30
        while len(cluster.client.nthreads()) > 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def started_on(cluster: Cluster, engine: Engine, address: str, sql: str = GROUP_BY) -> DistributedQuery:
    """`sql`, started once some of its partitions are assigned to the executor at `address`."""
    query = cluster.executor.execute(engine.ctx, sql)
    assert query is not None
    deadline = time.monotonic() + 10
    while not cluster.client.processing([address])[address]:
        assert time.monotonic() < deadline, "no partition went to the stalled executor"
        time.sleep(0.02)
    return query


def check_serving(cluster: Cluster, engine: Engine) -> None:
    query = cluster.executor.execute(engine.ctx, GROUP_BY)
    assert query is not None
    assert rows(collect(query), False) == rows(engine.plan(GROUP_BY).to_arrow_table(), False)
    assert query.stats.executors == 2


def test_a_killed_executors_partitions_run_again_on_the_others(cluster: Cluster, engine: Engine) -> None:
    with stalled_executor(cluster, "doomed") as (proc, address):
        query = started_on(cluster, engine, address)
        proc.kill()  # mid-query: it holds partitions of the query
        assert rows(collect(query), False) == rows(engine.plan(GROUP_BY).to_arrow_table(), False)
    check_serving(cluster, engine)


def test_a_one_stage_query_streams_partitions_as_they_are_done(cluster: Cluster, engine: Engine) -> None:
    """A filtered projection is one stage: its first rows go out while a frozen executor still holds
    some of its partitions; those run again elsewhere once it dies, and the rows add up."""
    sql = "SELECT id, label FROM t WHERE id % 7 = 0"
    assert (query := cluster.executor.execute(engine.ctx, sql)) is not None and query.split.whole
    query.close()
    with stalled_executor(cluster, "frozen") as (proc, address):
        query = started_on(cluster, engine, address, sql)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            batch = pool.submit(next, query).result(timeout=20)  # the other executors' partitions
        assert batch.num_rows > 0 and query.futures[0], "every partition was done before the first rows"
        proc.kill()
        got = pa.Table.from_batches([batch, *query], schema=query.schema)
    assert rows(got, False) == rows(engine.plan(sql).to_arrow_table(), False)
    assert query.stats.bytes_received > 0


def test_past_the_allowed_failures_the_query_fails_with_a_query_error(cluster: Cluster, engine: Engine) -> None:
    def allowed_failures(dask_scheduler: object, n: int) -> int:
        before = dask_scheduler.allowed_failures  # type: ignore[attr-defined]
        dask_scheduler.allowed_failures = n  # type: ignore[attr-defined]
        return int(before)

    before = cluster.client.run_on_scheduler(allowed_failures, n=0)
    try:
        with stalled_executor(cluster, "fatal") as (proc, address):
            query = started_on(cluster, engine, address)
            proc.kill()
            with pytest.raises(QueryError, match="executors died running this query") as failed:
                collect(query)
            assert failed.value.kind == "unavailable"  # HTTP 503, Flight UNAVAILABLE: a client may retry
    finally:
        cluster.client.run_on_scheduler(allowed_failures, n=before)
    check_serving(cluster, engine)


def test_closing_a_waiting_query_cancels_it(cluster: Cluster, engine: Engine) -> None:
    with stalled_executor(cluster, "slow") as (_, address):
        query = started_on(cluster, engine, address)
        threading.Timer(0.2, query.close).start()
        t0 = time.monotonic()
        with pytest.raises(QueryError) as cancelled:
            collect(query)
        assert time.monotonic() - t0 < 5
        assert cancelled.value.kind == "cancelled"

        # As the engine cancels a query: an interrupt lands in the wait, the stop hook cancels the stages.
        query = started_on(cluster, engine, address)
        stopper = Stopper()
        stopper.on_stop(query.close)
        threading.Timer(0.2, stopper.stop, (QueryError("stopped", kind="cancelled"),)).start()
        t0 = time.monotonic()
        with pytest.raises(Stopped):
            stopper.call(next, query)
        assert time.monotonic() - t0 < 5
        assert query.futures == []
    check_serving(cluster, engine)

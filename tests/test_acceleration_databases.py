"""Acceleration options against the federation's databases (PostgreSQL and MariaDB from Debian,
TLS on): an append reads only rows newer than the accelerator's newest, `refresh_data_window` and
`refresh_sql` are run by the database itself (its statement log shows the WHERE), and the data
queried afterwards is what each option says."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests.dbservers import MariaDbServer, PgServer
from tests.support import Runtime, dataset_yaml, run_spiced, spicepod_yaml, sql_json, write_pod
from tests.test_connectors_databases import my_params, pg_params

SEED_PG = """
CREATE TABLE public.events (id bigint PRIMARY KEY, ts timestamptz NOT NULL, kind text);
INSERT INTO public.events SELECT i, now() - i * interval '1 hour', CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END
  FROM generate_series(0, 47) AS i;
"""
SEED_MY = """
CREATE TABLE ticks (id INT PRIMARY KEY, at DATETIME(6) NOT NULL);
INSERT INTO ticks SELECT seq, UTC_TIMESTAMP(6) - INTERVAL seq HOUR FROM seq_0_to_47;
"""
NO_CACHE = "runtime:\n  caching:\n    sql_results:\n      enabled: false\n"


def accelerated(from_: str, name: str, params: str, acceleration: str, time_column: str | None = None) -> str:
    entry = dataset_yaml(from_, name, params)
    if time_column:
        entry += f"    time_column: {time_column}\n"
    return entry + "    acceleration:\n      enabled: true\n" + acceleration


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory, pg: PgServer, my: MariaDbServer) -> Iterator[Runtime]:
    pod = spicepod_yaml(
        accelerated("postgres:events", "pg_append", pg_params(pg),
                    "      engine: duckdb\n      refresh_mode: append\n      refresh_check_interval: 1s\n", "ts"),
        accelerated("postgres:events", "pg_window", pg_params(pg), "      refresh_data_window: 1470m\n", "ts"),
        accelerated("postgres:events", "pg_sql", pg_params(pg),
                    "      engine: sqlite\n      refresh_sql: SELECT id, kind FROM pg_sql WHERE kind = 'a'\n"),
        accelerated("mysql:ticks", "my_append", my_params(my),
                    "      engine: duckdb\n      mode: file\n      refresh_mode: append\n"
                    "      refresh_check_interval: 1s\n", "at"),
        accelerated("mysql:ticks", "my_window", my_params(my),
                    "      engine: sqlite\n      refresh_data_window: 1470m\n", "at"),
    ) + NO_CACHE
    workdir = write_pod(tmp_path_factory.mktemp("accel-dbs"), pod)
    with run_spiced(workdir, env={"PG_PASS": pg.password, "MY_PASS": my.password}, timeout=60) as runtime:
        yield runtime


def count(rt: Runtime, name: str) -> tuple[int, int]:
    [row] = sql_json(rt, f"SELECT count(*) AS n, count(DISTINCT id) AS d FROM {name}", cached=False)
    return int(row["n"]), int(row["d"])  # type: ignore[call-overload]


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("not true in time")
        time.sleep(0.2)


def test_append_reads_only_newer_rows_from_postgres(rt: Runtime, pg: PgServer) -> None:
    assert count(rt, "pg_append") == (48, 48)
    mark = pg.mark()
    pg.run_sql("INSERT INTO public.events SELECT i, now() + interval '1 minute', 'c' "
               "FROM generate_series(100, 104) AS i")
    eventually(lambda: count(rt, "pg_append") == (53, 53))
    time.sleep(2.5)  # two more refreshes find nothing newer: no row twice
    assert count(rt, "pg_append") == (53, 53)
    sent = [s for s in pg.statements(since=mark, user="spice") if "events" in s and '"ts" >' in s]
    assert sent, pg.statements(since=mark, user="spice")


def test_the_data_window_is_applied_by_postgres(rt: Runtime, pg: PgServer) -> None:
    # Rows 0..24 hours old are inside 24.5 hours (rows added by the append test are newer still).
    rows = sql_json(rt, "SELECT id FROM pg_window WHERE id < 100 ORDER BY id", cached=False)
    ids = [int(r["id"]) for r in rows]  # type: ignore[call-overload]
    assert ids == list(range(25))
    assert any("WHERE" in s and '"ts" >' in s for s in pg.statements(user="spice") if "events" in s)


def test_refresh_sql_is_run_by_postgres(rt: Runtime, pg: PgServer) -> None:
    rows = sql_json(rt, "SELECT * FROM pg_sql ORDER BY id LIMIT 3", cached=False)
    assert rows == [{"id": 0, "kind": "a"}, {"id": 2, "kind": "a"}, {"id": 4, "kind": "a"}]
    assert any("kind = 'a'" in s for s in pg.statements(user="spice") if "events" in s)


def test_append_and_window_on_mariadb(rt: Runtime, my: MariaDbServer) -> None:
    assert count(rt, "my_append") == (48, 48)
    assert count(rt, "my_window") == (25, 25)
    my.run_sql("INSERT INTO ticks SELECT 100 + seq, UTC_TIMESTAMP(6) + INTERVAL 1 MINUTE FROM seq_0_to_3")
    eventually(lambda: count(rt, "my_append") == (52, 52))
    time.sleep(2.5)
    assert count(rt, "my_append") == (52, 52)

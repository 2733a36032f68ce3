"""SQLite and DuckDB files as datasets, in place (federated) and accelerated, through the real
runtime: results, what was sent to each source, joins across sources, failures and parameters."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pyarrow as pa
import pyarrow.flight as fl
import pytest

from tests.support import Runtime, run_spiced, spiced_fails, sql_json, write_pod
from tests.tlsprobe import wait_for

ROWS = 1000
FEDERATION_LOG = {"SPICED_LOG": "INFO,runtime::federation=DEBUG"}


def make_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, amount REAL)")
        c.executemany("INSERT INTO orders VALUES (?, ?, ?)",
                      [(i, f"c{i % 10}", i * 1.5) for i in range(ROWS)])


def make_duckdb(path: Path) -> None:
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE customers AS SELECT 'c' || range AS customer, 'name ' || range AS name, "
                "range % 2 = 0 AS vip FROM range(10)")
    con.close()


POD = """version: v1
kind: Spicepod
name: embedded
datasets:
  - from: sqlite:orders
    name: orders
    params:
      sqlite_file: shop.sqlite
  - from: sqlite:orders
    name: orders_accel
    params:
      sqlite_file: shop.sqlite
    acceleration:
      enabled: true
  - from: duckdb:customers
    name: customers
    params:
      duckdb_open: crm.duckdb
  - from: duckdb:main.customers
    name: customers_accel
    params:
      duckdb_open: crm.duckdb
    acceleration:
      enabled: true
  - from: file:trips.csv
    name: trips
views:
  - name: big_orders
    sql: SELECT id, customer FROM orders WHERE amount > 1000
"""


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    workdir = write_pod(tmp_path_factory.mktemp("embedded"), POD)
    make_sqlite(workdir / "shop.sqlite")
    make_duckdb(workdir / "crm.duckdb")
    with run_spiced(workdir, env=FEDERATION_LOG) as runtime:
        yield runtime




def test_a_query_on_one_database_is_sent_to_it_whole(rt: Runtime) -> None:
    mark = len(rt.logs())
    assert sql_json(rt, "SELECT count(*) AS n FROM orders WHERE amount > 1000") == [{"n": ROWS - 667}]
    line = rt.wait_for_log(r"Query sent whole to sqlite:", after=mark)
    assert 'WHERE ("orders"."amount" > 1000)' in line.replace("`", '"') or "> 1000" in line
    assert "count(" in line.lower()


def test_in_place_and_accelerated_agree(rt: Runtime) -> None:
    for query in ("SELECT customer, count(*) AS n, sum(amount) AS total FROM {t} GROUP BY customer ORDER BY customer",
                  "SELECT id, amount FROM {t} WHERE id BETWEEN 10 AND 20 ORDER BY id LIMIT 5"):
        assert sql_json(rt, query.format(t="orders")) == sql_json(rt, query.format(t="orders_accel"))
    assert sql_json(rt, "SELECT * FROM customers ORDER BY customer") == \
        sql_json(rt, "SELECT * FROM customers_accel ORDER BY customer")


def test_a_join_across_sources_is_correct_and_each_side_gets_its_filter(rt: Runtime) -> None:
    mark = len(rt.logs())
    rows = sql_json(rt, "SELECT c.name, count(*) AS n FROM orders o JOIN customers c ON o.customer = c.customer "
                   "WHERE o.id < 100 AND c.vip GROUP BY c.name ORDER BY c.name")
    assert rows == [{"name": f"name {i}", "n": 10} for i in (0, 2, 4, 6, 8)]
    scans = "\n".join(rt.logs()[mark:])
    assert "Scan of orders sent to sqlite:" in scans and "< 100" in scans
    assert "Scan of customers sent to duckdb:" in scans and "vip" in scans
    # with a CSV file and an accelerated table in the same query
    rows = sql_json(rt, "SELECT count(*) AS n FROM orders o JOIN orders_accel a ON o.id = a.id JOIN customers c "
                   "ON c.customer = o.customer WHERE o.amount < 15")
    assert rows == [{"n": 10}]
    # a filter whose subquery reads another table stays here; the source gets no filter it cannot run
    rows = sql_json(rt, "SELECT id FROM orders WHERE amount > (SELECT avg(amount) FROM orders_accel) "
                        "ORDER BY id LIMIT 2")
    assert rows == [{"id": 500}, {"id": 501}]


def test_a_view_over_a_federated_table_reads_the_source(rt: Runtime) -> None:
    assert sql_json(rt, "SELECT count(*) AS n FROM big_orders") == [{"n": ROWS - 667}]
    assert sql_json(rt, "SELECT count(*) AS n FROM big_orders b JOIN customers c ON b.customer = c.customer "
                        "WHERE c.vip") == [{"n": len([i for i in range(667, ROWS) if i % 10 % 2 == 0])}]


def test_types_over_flight_match_the_planned_schema(rt: Runtime) -> None:
    client = fl.FlightClient(rt.flight_uri)
    table = client.do_get(fl.Ticket(b"SELECT id, customer, amount FROM orders ORDER BY id LIMIT 3")).read_all()
    assert table.schema.types == [pa.int64(), pa.string(), pa.float64()]
    assert table.column("id").to_pylist() == [0, 1, 2]
    table = client.do_get(fl.Ticket(b"SELECT vip, count(*) FROM customers GROUP BY vip ORDER BY vip")).read_all()
    assert table.to_pylist() == [{"vip": False, "count(*)": 5}, {"vip": True, "count(*)": 5}]
    client.close()


def test_a_missing_table_leaves_the_runtime_up_and_loads_once_it_appears(tmp_path: Path) -> None:
    write_pod(tmp_path, POD.split("  - from: sqlite:orders\n    name: orders_accel")[0].replace(
        "datasets:\n", "datasets:\n"))
    (tmp_path / "shop.sqlite").touch()
    with run_spiced(tmp_path, ready=False) as rt:
        line = rt.wait_for_log("Failed to load data for dataset orders")
        assert " WARN " in line and "was not found" in line
        assert httpx.get(rt.http_url + "/v1/ready").text == "not ready"
        status = httpx.get(rt.http_url + "/v1/datasets?status=true").json()
        assert status[0]["status"] == "Error"
        make_sqlite(tmp_path / "shop.sqlite.new")
        (tmp_path / "shop.sqlite.new").replace(tmp_path / "shop.sqlite")
        wait_for(lambda: httpx.get(rt.http_url + "/v1/ready").text == "ready", timeout=15)
        assert sql_json(rt, "SELECT count(*) AS n FROM orders") == [{"n": ROWS}]


def test_parameters_are_checked_as_upstream(tmp_path: Path) -> None:
    make_sqlite(tmp_path / "shop.sqlite")
    missing = "version: v1\nkind: Spicepod\nname: p\ndatasets:\n  - from: sqlite:orders\n    name: orders\n"
    r = spiced_fails(write_pod(tmp_path, missing))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].endswith(
        "datasets[0].params: Invalid configuration for connector sqlite. Missing required parameter: sqlite_file")
    duck = "version: v1\nkind: Spicepod\nname: p\ndatasets:\n  - from: duckdb:t\n    name: t\n"
    r = spiced_fails(write_pod(tmp_path, duck))
    assert "Missing required parameter: open. Specify a DuckDB file with the `open` parameter" in r.stderr
    extra = missing + "    params:\n      sqlite_file: shop.sqlite\n      file: x\n      colour: red\n"
    with run_spiced(write_pod(tmp_path, extra)) as rt:
        assert any("Ignoring parameter colour: not supported for connector sqlite." in line and " WARN " in line
                   for line in rt.logs())
        assert any("Ignoring parameter file: must be prefixed with `sqlite_` for connector sqlite." in line
                   for line in rt.logs())


def test_a_failed_refresh_keeps_the_last_data_and_says_so(tmp_path: Path) -> None:
    make_sqlite(tmp_path / "shop.sqlite")
    spicepod = ("version: v1\nkind: Spicepod\nname: r\ndatasets:\n  - from: sqlite:orders\n    name: orders\n"
                "    params:\n      sqlite_file: shop.sqlite\n    acceleration:\n      enabled: true\n"
                "      refresh_check_interval: 300ms\n")
    with run_spiced(write_pod(tmp_path, spicepod)) as rt:
        assert sql_json(rt, "SELECT count(*) AS n FROM orders") == [{"n": ROWS}]
        with sqlite3.connect(tmp_path / "shop.sqlite") as c:
            c.execute("ALTER TABLE orders RENAME TO gone")
        line = rt.wait_for_log("Failed to load data for dataset orders")
        assert " WARN " in line and line.endswith("(the last loaded data is kept)")
        assert sql_json(rt, "SELECT count(*) AS n FROM orders") == [{"n": ROWS}]
        [status] = httpx.get(rt.http_url + "/v1/datasets?status=true").json()
        assert status["status"] == "Error" and "was not found" in status["error"]
        assert httpx.get(rt.http_url + "/v1/ready").text == "ready"  # loaded once: still serving
        with sqlite3.connect(tmp_path / "shop.sqlite") as c:
            c.execute("ALTER TABLE gone RENAME TO orders")
            c.execute("DELETE FROM orders WHERE id >= 10")
        wait_for(lambda: sql_json(rt, "SELECT count(*) AS n FROM orders") == [{"n": 10}], timeout=10)
        [status] = httpx.get(rt.http_url + "/v1/datasets?status=true").json()
        assert status["status"] == "Ready"
        warnings = [x for x in rt.logs() if "Failed to load data for dataset orders" in x and " WARN " in x]
        assert len(warnings) == 1  # the same cause again is not repeated at WARN

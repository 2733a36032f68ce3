"""PostgreSQL and MariaDB as datasets through the real runtime, against real servers with TLS on:
verified connections, what each server was sent (its own statement log), accelerated and in place,
joins across sources, failures and credentials."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.flight as fl
import pytest

from tests.dbservers import MariaDbServer, PgServer, issue_named, postgres_server
from tests.pki import Pki
from tests.query_rig import cancel, wait_listed
from tests.support import Runtime, dataset_yaml, run_spiced, spiced_fails, spicepod_yaml, sql_json, write_pod
from tests.tlsprobe import wait_for

ROWS = 20_000
SEED_PG = f"""
CREATE TABLE public.orders (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(12, 2),
                            placed timestamptz, note varchar(40), flag boolean);
INSERT INTO public.orders SELECT i, 'c' || (i % 10), i * 1.25,
                                 timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute',
                                 CASE WHEN i % 3 = 0 THEN NULL ELSE 'note ' || i END, i % 2 = 0
  FROM generate_series(1, {ROWS}) AS i;
CREATE SCHEMA crm;
CREATE TABLE crm."Customers" (customer text PRIMARY KEY, name text);
INSERT INTO crm."Customers" SELECT 'c' || i, 'name ' || i FROM generate_series(0, 9) AS i;
"""
SEED_MY = """
CREATE TABLE regions (customer VARCHAR(10) PRIMARY KEY, region VARCHAR(20), weight DECIMAL(20, 12),
                      since DATETIME, doc TEXT);
INSERT INTO regions VALUES ('c0', 'north', 1.123456789012, '2024-01-02 03:04:05', 'x'),
  ('c1', 'south', 2.5, '2024-02-02 00:00:00', NULL), ('c2', 'north', 0, NULL, 'long text');
"""


def pg_params(pg: PgServer, **extra: str) -> str:
    params = {"pg_host": "localhost", "pg_port": str(pg.port), "pg_db": pg.database, "pg_user": pg.user,
              "pg_pass": "${env:PG_PASS}", "pg_sslrootcert": str(pg.ca_cert), **extra}
    return "".join(f"      {k}: {v}\n" for k, v in params.items())


def my_params(my: MariaDbServer, **extra: str) -> str:
    params = {"mysql_host": "localhost", "mysql_tcp_port": str(my.port), "mysql_db": my.database,
              "mysql_user": my.user, "mysql_pass": "${env:MY_PASS}", "mysql_sslrootcert": str(my.ca_cert), **extra}
    return "".join(f"      {k}: {v}\n" for k, v in params.items())




def secrets(pg: PgServer, my: MariaDbServer) -> dict[str, str]:
    return {"PG_PASS": pg.password, "MY_PASS": my.password}


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory, pg: PgServer, my: MariaDbServer) -> Iterator[Runtime]:
    spicepod = spicepod_yaml(dataset_yaml("postgres:orders", "orders", pg_params(pg)),
                   dataset_yaml("postgres:public.orders", "orders_accel", pg_params(pg), accelerated=True),
                   dataset_yaml('postgres:crm."Customers"', "customers", pg_params(pg)),
                   dataset_yaml("mysql:regions", "regions", my_params(my)),
                   dataset_yaml("mysql:regions", "regions_accel", my_params(my), accelerated=True))
    workdir = write_pod(tmp_path_factory.mktemp("dbs"), spicepod)
    with run_spiced(workdir, env=secrets(pg, my), timeout=60) as runtime:
        yield runtime



def flight(rt: Runtime, query: str) -> pa.Table:
    with fl.FlightClient(rt.flight_uri) as client:
        return client.do_get(fl.Ticket(query.encode())).read_all()


def test_connections_are_tls_verified_and_named_as_upstream(rt: Runtime, pg: PgServer, my: MariaDbServer) -> None:
    ssl = pg.run_sql("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                     "WHERE a.usename = 'spice' AND s.ssl AND a.application_name LIKE 'Spice.ai %'")
    assert int(ssl.strip()) >= 1, pg.run_sql("SELECT a.usename, a.application_name, s.ssl FROM pg_stat_activity a "
                                             "LEFT JOIN pg_stat_ssl s USING (pid)")
    connects = [line for line in my.statement_log.read_text().splitlines() if "Connect\tspice@" in line]
    assert connects and all(line.endswith("using SSL/TLS") for line in connects), connects


def test_a_filtered_count_is_run_by_postgres_not_moved(rt: Runtime, pg: PgServer) -> None:
    mark = pg.mark()
    assert sql_json(rt, "SELECT count(*) AS n FROM orders WHERE amount > 1000 AND customer = 'c3'") == \
        [{"n": len([i for i in range(1, ROWS + 1) if i * 1.25 > 1000 and i % 10 == 3])}]
    sent = [s for s in pg.statements(since=mark, user="spice") if "orders" in s]
    assert len(sent) == 1, sent
    assert "count(" in sent[0].lower() and "WHERE" in sent[0] and "1000" in sent[0] and "'c3'" in sent[0]


def test_a_limit_and_projection_reach_postgres(rt: Runtime, pg: PgServer) -> None:
    mark = pg.mark()
    rows = sql_json(rt, "SELECT id, note FROM orders WHERE flag ORDER BY id LIMIT 3")
    assert rows == [{"id": 2, "note": "note 2"}, {"id": 4, "note": "note 4"}, {"id": 6}]  # JSON leaves out nulls
    [sent] = [s for s in pg.statements(since=mark, user="spice") if "orders" in s]
    assert "LIMIT 3" in sent and '"amount"' not in sent and "ORDER BY" in sent


def test_in_place_and_accelerated_agree_with_upstream_types(rt: Runtime) -> None:
    query = "SELECT id, customer, amount, placed, note, flag FROM {t} WHERE id IN (1, 2, 3, 20000) ORDER BY id"
    in_place, accelerated = flight(rt, query.format(t="orders")), flight(rt, query.format(t="orders_accel"))
    assert in_place.equals(accelerated)
    assert in_place.schema.field("id").type == pa.int64()
    assert in_place.schema.field("customer").type == pa.string()
    assert pa.types.is_timestamp(in_place.schema.field("placed").type)
    assert in_place.column("flag").to_pylist() == [False, True, False, True]
    assert float(in_place.column("amount")[0].as_py()) == 1.25
    regions = "SELECT customer, region, weight, since, doc FROM {t} ORDER BY customer"
    assert flight(rt, regions.format(t="regions")).equals(flight(rt, regions.format(t="regions_accel")))
    weight = flight(rt, regions.format(t="regions")).schema.field("weight").type
    assert weight == pa.decimal128(20, 12)  # MariaDB's DECIMAL keeps its precision and scale


def test_a_quoted_schema_and_table_name_keep_their_case(rt: Runtime) -> None:
    assert sql_json(rt, "SELECT count(*) AS n FROM customers") == [{"n": 10}]


def test_a_join_across_postgres_and_mariadb_pushes_each_side_its_filter(rt: Runtime, pg: PgServer,
                                                                        my: MariaDbServer) -> None:
    pg_mark, my_mark = pg.mark(), my.mark()
    rows = sql_json(rt, "SELECT r.region, count(*) AS n, sum(o.amount) AS total FROM orders o "
                   "JOIN regions r ON o.customer = r.customer JOIN customers c ON c.customer = o.customer "
                   "WHERE o.id <= 100 AND r.region = 'north' GROUP BY r.region")
    assert rows == [{"region": "north", "n": 20, "total": pytest.approx(sum(i * 1.25 for i in range(1, 101)
                                                                             if i % 10 in (0, 2)))}]
    pg_sent = " ".join(pg.statements(since=pg_mark, user="spice"))
    my_sent = " ".join(my.statements(since=my_mark, user="spice"))
    assert "100" in pg_sent and '"amount"' in pg_sent and '"note"' not in pg_sent
    assert "'north'" in my_sent and "`doc`" not in my_sent


def test_credentials_never_leave(rt: Runtime, pg: PgServer, my: MariaDbServer) -> None:
    spicepods = httpx.get(rt.http_url + "/v1/spicepods").text + httpx.get(rt.http_url + "/v1/datasets").text
    metrics = "\n".join(rt.logs())
    for secret in (pg.password, my.password):
        assert secret not in spicepods and secret not in metrics


def test_postgres_verify_full_refuses_a_hostname_mismatch_and_names_it(tmp_path: Path, pki: Pki) -> None:
    other = issue_named(pki, "db.example.test")
    with postgres_server(tmp_path / "pg", pki, server_cert=other) as pg:
        pg.run_sql("CREATE TABLE t (id int)")
        workdir = write_pod(tmp_path / "pod", spicepod_yaml(dataset_yaml("postgres:t", "t", pg_params(pg))))
        with run_spiced(workdir, env={"PG_PASS": pg.password}, ready=False) as rt:
            line = rt.wait_for_log("Failed to load data for dataset t")
            assert " WARN " in line and "postgres" in line
            assert 'server certificate for "db.example.test" does not match host name "localhost"' in line
            assert pg.password not in "\n".join(rt.logs())
            assert httpx.get(rt.http_url + "/v1/ready").text == "not ready"


def test_mariadb_required_refuses_an_unknown_ca(tmp_path: Path, pki: Pki, my: MariaDbServer) -> None:
    foreign = Pki.create(tmp_path / "foreign")
    workdir = write_pod(tmp_path / "pod", spicepod_yaml(dataset_yaml("mysql:regions", "regions",
                                                      my_params(my, mysql_sslrootcert=str(foreign.ca.cert)))))
    with run_spiced(workdir, env={"MY_PASS": my.password}, ready=False) as rt:
        line = rt.wait_for_log("Failed to load data for dataset regions")
        assert "mysql" in line and ("certificate" in line or "TLS" in line)


def test_a_database_down_at_startup_loads_when_it_comes_up(tmp_path: Path, pki: Pki) -> None:
    with postgres_server(tmp_path / "pg", pki) as pg:
        pg.run_sql("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2)")
        port, password = pg.port, pg.password
        spicepod = spicepod_yaml(dataset_yaml("postgres:t", "t", pg_params(pg), accelerated=True))
    workdir = write_pod(tmp_path / "pod", spicepod)
    with run_spiced(workdir, env={"PG_PASS": password}, ready=False) as rt:
        line = rt.wait_for_log("Failed to load data for dataset t")
        assert f"on localhost:{port}" in line and "Cannot connect" in line
        assert httpx.get(rt.http_url + "/v1/ready").text == "not ready"
        assert rt.proc.poll() is None
        statuses = httpx.get(rt.http_url + "/v1/datasets?status=true").json()
        assert statuses[0]["status"] == "Error"


def test_wrong_parameters_give_upstream_texts(tmp_path: Path) -> None:
    workdir = write_pod(tmp_path, spicepod_yaml("  - from: postgres:t\n    name: t\n    params:\n      host: x\n"
                                      "      pg_db: d\n"))
    r = spiced_fails(workdir)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].endswith(
        "Invalid configuration for connector postgres. Missing required parameter: pg_host")
    workdir = write_pod(tmp_path, spicepod_yaml("  - from: postgres:t\n    name: t\n    params:\n      pg_host: x\n"
                                      "      pg_sslmode: sometimes\n"))
    r = spiced_fails(workdir)
    assert "'pg_sslmode' parameter must be one of: disable, require, prefer, verify-ca, verify-full. " \
           "Found sometimes." in r.stderr


def test_the_password_can_come_from_the_secret_store_by_its_prefixed_name(tmp_path: Path, pg: PgServer) -> None:
    params = pg_params(pg).replace("      pg_pass: ${env:PG_PASS}\n", "")
    workdir = write_pod(tmp_path, spicepod_yaml(dataset_yaml("postgres:orders", "orders", params)))
    env = {"SPICE_PG_PASS": pg.password}
    with run_spiced(workdir, env=env) as rt:
        assert sql_json(rt, "SELECT count(*) AS n FROM orders") == [{"n": ROWS}]


def test_a_literal_password_is_redacted_in_the_spicepod_api(tmp_path: Path, pg: PgServer) -> None:
    params = pg_params(pg).replace("${env:PG_PASS}", pg.password)
    with run_spiced(write_pod(tmp_path, spicepod_yaml(dataset_yaml("postgres:orders", "orders", params)))) as rt:
        [served] = httpx.get(rt.http_url + "/v1/spicepods").json()
        assert served["datasets"][0]["params"]["pg_pass"] != pg.password
        assert served["datasets"][0]["params"]["pg_host"] == "localhost"
        assert pg.password not in httpx.get(rt.http_url + "/v1/spicepods").text
        assert pg.password not in "\n".join(rt.logs())


def test_adbc_and_the_official_sdk_query_a_federated_table(rt: Runtime, pg: PgServer) -> None:
    import adbc_driver_flightsql.dbapi as flightsql

    from tests.jsclient import run_sdk

    mark = pg.mark()
    with flightsql.connect(rt.flight_uri, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) AS n FROM orders WHERE customer = ? AND amount < ?", ("c1", 100))
        assert cur.fetch_arrow_table().to_pylist() == [{"n": len([i for i in range(1, 80) if i % 10 == 1])}]
    sent = [s for s in pg.statements(since=mark, user="spice") if "orders" in s]
    assert sent and "'c1'" in sent[-1] and "count(" in sent[-1].lower()
    out = run_sdk({"flightUrl": rt.addresses["flight"], "httpUrl": rt.http_url, "maxRetries": 0,
                   "steps": [{"call": "sql", "query": "SELECT customer, name FROM customers ORDER BY customer LIMIT 2"},
                             {"call": "sqlHttp", "query": "SELECT region FROM regions WHERE customer = 'c1'"}]})
    flight_rows, http_rows = (r["rows"] for r in out["results"])
    assert flight_rows == [{"customer": "c0", "name": "name 0"}, {"customer": "c1", "name": "name 1"}]
    assert http_rows == [{"region": "south"}]


def test_connections_the_server_dropped_are_replaced_without_a_failed_query(rt: Runtime, pg: PgServer,
                                                                            my: MariaDbServer) -> None:
    assert sql_json(rt, "SELECT count(*) AS n FROM orders WHERE id < 10") == [{"n": 9}]
    assert sql_json(rt, "SELECT count(*) AS n FROM regions") == [{"n": 3}]
    pg.run_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'spice'")
    for row in my.run_sql("SELECT id FROM information_schema.processlist WHERE user = 'spice'").split():
        my.run_sql(f"KILL {row}")
    pg_mark, my_mark = pg.mark(), my.mark()
    assert sql_json(rt, "SELECT count(*) AS n FROM orders WHERE id < 10", cached=False) == [{"n": 9}]
    assert sql_json(rt, "SELECT count(*) AS n FROM regions", cached=False) == [{"n": 3}]
    # each still went to its database whole, on a new connection (not run here after a failure)
    assert any("count(" in s.lower() for s in pg.statements(since=pg_mark, user="spice"))
    assert any("count(" in s.lower() for s in my.statements(since=my_mark, user="spice"))
    assert not [line for line in rt.logs() if "Query failed" in line and ("orders" in line or "regions" in line)]


def test_the_query_time_limit_cancels_the_statement_at_the_database(tmp_path: Path, pg: PgServer) -> None:
    spicepod = spicepod_yaml(dataset_yaml("postgres:orders", "orders", pg_params(pg))) + \
        "runtime:\n  query:\n    timeout: 1s\n"
    with run_spiced(write_pod(tmp_path, spicepod), env={"PG_PASS": pg.password}) as rt:
        started = time.monotonic()
        r = httpx.post(rt.http_url + "/v1/sql", timeout=60,
                       content="SELECT count(*) FROM orders a JOIN orders b ON a.amount < b.amount")
        took = time.monotonic() - started
        assert r.status_code == 504, r.text
        assert took < 5, took  # not the many seconds PostgreSQL needs for 400M pairs
        wait_for(lambda: "canceling statement due to user request" in pg.log_text(), timeout=5)
        assert sql_json(rt, "SELECT count(*) AS n FROM orders WHERE id <= 3") == [{"n": 3}]


def test_a_cancel_stops_the_statement_at_the_database(rt: Runtime, pg: PgServer) -> None:
    slow = "SELECT count(*) FROM orders a JOIN orders b ON a.amount < b.amount"
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, rt.http_url + "/v1/sql", content=slow, timeout=60)
        listed = wait_listed(rt, slow)
        started = time.monotonic()
        assert cancel(rt, listed["query_id"]).status_code == 200
        assert answer.result().status_code == 499
        assert time.monotonic() - started < 5
    wait_for(lambda: pg.log_text().count("canceling statement due to user request") >= 1, timeout=5)

"""Clients nobody on this team wrote, querying a real cluster through the scheduler's public endpoints:
a `spiced --role scheduler -v` and two `spiced` executors on 127.0.0.1 (tests/cluster_rig.py, node
PKI by `spice cluster tls`), the scheduler's HTTP and Flight listeners on TLS with a public PKI of
tests/pki.py in `--tls-client-auth-mode required`. Started once for the module.

The dataset is 8 Parquet files (`from: file:t/`, not accelerated, no results cache), so every query
here runs its file-reading stage on the executors. Each query is checked for both things:
  - the answer is the one computed with pyarrow from the rows the module wrote (amounts in quarters,
    so every sum is exact whatever order the executors' partials are added in);
  - the query was distributed: the scheduler logged `Query ran N stage(s) as T task(s) on 2
    executor(s)` for it (as tests/test_cluster_queries.py checks).

Clients: curl (HTTP/1.1 and HTTP/2, JSON) on POST /v1/sql; the ADBC Flight SQL driver (Go) over
grpc+tls with a plain aggregate, a prepared statement executed with two parameter values, and a
close after which the Flight TLS front is the same process, holds no more connections or
descriptors, and the scheduler logged no WARN/ERROR/traceback; the official Spice.ai JavaScript SDK
(`sql()` over Flight, plain and parameterized); pyarrow Flight with a client certificate (served)
and without one (refused at the handshake, as `required` says).
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import adbc_driver_flightsql
import adbc_driver_flightsql.dbapi as flightsql
import httpx
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as fl
import pyarrow.parquet as pq
import pytest

from tests.cluster_rig import Cluster, files_spicepod, make_pki, run_cluster
from tests.front_health import FrontHealth, front_process
from tests.jsclient import run_sdk
from tests.pki import Pki
from tests.support import Runtime
from tests.tlsprobe import wait_for

FILES, ROWS_PER_FILE, GROUPS = 8, 25_000, 16
CALL_TIMEOUT = 20.0  # seconds any one client call may take
SPICEPOD = files_spicepod("cluster-clients")
GROUP_BY = "SELECT grp, count(*) AS n, sum(amount) AS total FROM t GROUP BY grp ORDER BY grp"
# DataFusion answers a bare count(*) from the files' statistics, on the scheduler: these read rows.
AGGREGATE = "SELECT count(*) AS n, count(DISTINCT grp) AS groups, sum(amount) AS total, max(id) AS top FROM t " \
            "WHERE id % 3 = 0"
FROM_ID = "SELECT grp, count(*) AS n, sum(amount) AS total FROM t WHERE id >= {} GROUP BY grp ORDER BY grp"
MANY = "SELECT id % 1000 AS k, count(*) AS n, sum(amount) AS total FROM t GROUP BY k ORDER BY k"
RAN = re.compile(r"DEBUG runtime::cluster: Query ran \d+ stage\(s\) as \d+ task\(s\) on (\d+) executor\(s\)")


# ---------------------------------------------------------------- the data and what each query gives


def rows(first: int, count: int) -> pa.Table:
    ids = pa.array(range(first, first + count), pa.int64())
    return pa.table({"id": ids, "grp": pc.cast(pc.remainder(ids, GROUPS), pa.int32()),
                     "amount": pc.multiply(pc.cast(ids, pa.float64()), 0.25)})


def grouped(data: pa.Table, key: str) -> list[dict[str, Any]]:
    found = data.group_by(key).aggregate([("id", "count"), ("amount", "sum")])
    return found.rename_columns([key, "n", "total"]).sort_by(key).to_pylist()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster-clients")


@pytest.fixture(scope="module")
def data(root: Path) -> pa.Table:
    """Writes `<root>/pod/t/part-*.parquet` (200k rows) and the spicepod; all the rows, for the answers."""
    folder = root / "pod" / "t"
    folder.mkdir(parents=True)
    parts = [rows(f * ROWS_PER_FILE, ROWS_PER_FILE) for f in range(FILES)]
    for f, part in enumerate(parts):
        pq.write_table(part, folder / f"part-{f}.parquet")
    (root / "pod" / "spicepod.yaml").write_text(SPICEPOD)
    return pa.concat_tables(parts)


def group_by(data: pa.Table, from_id: int = 0) -> list[dict[str, Any]]:
    return grouped(data.filter(pc.greater_equal(data["id"], from_id)), "grp")


def aggregate(data: pa.Table) -> dict[str, Any]:
    kept = data.filter(pc.equal(pc.remainder(data["id"], 3), 0))
    return {"n": kept.num_rows, "groups": len(pc.unique(kept["grp"])), "total": pc.sum(kept["amount"]).as_py(),
            "top": pc.max(kept["id"]).as_py()}


def many(data: pa.Table) -> list[dict[str, Any]]:
    return grouped(data.append_column("k", pc.remainder(data["id"], 1000)), "k")


# ---------------------------------------------------------------- the cluster


def public_tls(pki: Pki) -> tuple[str, ...]:
    """The scheduler's HTTP and Flight listeners: TLS with the public PKI, a client certificate required."""
    return ("--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert), "--tls-key-file",
            str(pki.server.key), "--tls-client-auth-mode", "required", "--tls-client-auth-ca-file",
            str(pki.client_ca.cert))


@pytest.fixture(scope="module")
def cluster(root: Path, data: pa.Table, pki: Pki) -> Iterator[Cluster]:
    """`pki` (tests/conftest.py) is the public PKI; the node PKI is the cluster's own (cluster.pki)."""
    nodes = make_pki(root / "nodes", "scheduler1", "executor1", "executor2")
    with run_cluster(root, root / "pod", nodes, ("executor1", "executor2"), args=public_tls(pki)) as cluster:
        assert cluster.scheduler.tls
        with https(pki) as client:
            def both_listed() -> bool:
                answer = client.get(cluster.scheduler.http_url + "/v1/status", params={"format": "json"})
                assert answer.status_code == 200, answer.text
                status = answer.json()
                return sum(row["name"] == "executor" for row in status) == 2

            wait_for(both_listed, timeout=30)
        yield cluster


def https(pki: Pki) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    return httpx.Client(verify=ctx, timeout=CALL_TIMEOUT)


def distributed(rt: Runtime, mark: int, queries: int, what: str) -> list[str]:
    """The scheduler's `Query ran …` lines since log line `mark`: `queries` of them (waiting for the
    last to be read from its stderr), every one on both executors."""
    def enough() -> bool:
        return len(ran(rt, mark)) >= queries

    wait_for(enough, timeout=10)
    lines = ran(rt, mark)
    assert len(lines) == queries, f"{what}: {queries} distributed run(s) expected, got {lines}"
    for line in lines:
        m = RAN.search(line)
        assert m is not None and m.group(1) == "2", f"{what} did not run on both executors: {line}"
    return lines


def ran(rt: Runtime, mark: int) -> list[str]:
    return [line for line in rt.logs()[mark:] if "Query ran" in line]


def quiet(rt: Runtime, mark: int, what: str) -> None:
    """No WARN, ERROR or traceback in the scheduler's log since line `mark` (its Flight TLS front logs there too)."""
    bad = [line for line in rt.logs()[mark:] if re.search(r"\b(WARN|ERROR)\b|Traceback", line)]
    assert not bad, f"the scheduler logged after {what}:\n" + "\n".join(bad[-20:])


# ---------------------------------------------------------------- curl


def curl(rt: Runtime, pki: Pki, sql: str, *, http2: bool, with_cert: bool = True) -> tuple[int, str, str]:
    """POST /v1/sql on a new connection, verifying the server with the public CA: (status, version, body)."""
    cmd = ["curl", "-sS", "--max-time", str(CALL_TIMEOUT), "--cacert", str(pki.ca.cert),
           "--http2" if http2 else "--http1.1", "-H", "Accept: application/json", "--data-binary", sql,
           "-w", "\n%{http_code} %{http_version}"]
    if with_cert:
        cmd += ["--cert", str(pki.client.cert), "--key", str(pki.client.key)]
    done = subprocess.run([*cmd, f"{rt.http_url}/v1/sql"], capture_output=True, text=True, timeout=CALL_TIMEOUT + 5,
                          check=False)
    assert done.returncode == 0, f"curl exited {done.returncode}: {done.stderr}"
    body, _, tail = done.stdout.rpartition("\n")
    status, _, version = tail.partition(" ")
    return int(status), version, body


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
def test_curl_posts_a_distributed_group_by_over_https(cluster: Cluster, pki: Pki, data: pa.Table,
                                                      http2: bool) -> None:
    rt = cluster.scheduler
    mark = len(rt.logs())
    status, version, body = curl(rt, pki, GROUP_BY, http2=http2)
    assert (status, version) == (200, "2" if http2 else "1.1"), body[:500]
    assert json.loads(body) == group_by(data)
    distributed(rt, mark, 1, f"curl's GROUP BY over HTTP/{version}")
    # required: the same request without a client certificate is refused, and runs nothing (a run
    # would be logged before the request's own line)
    mark = len(rt.logs())
    status, _, body = curl(rt, pki, GROUP_BY, http2=http2, with_cert=False)
    assert (status, body) == (401, '{"message":"Valid client TLS certificate required"}')
    rt.wait_for_log(r"POST /v1/sql 401 .* client=anonymous", after=mark)
    assert ran(rt, mark) == []


# ---------------------------------------------------------------- ADBC Flight SQL driver (Go)


def adbc_kwargs(pki: Pki) -> dict[str, str]:
    opts = adbc_driver_flightsql.DatabaseOptions
    return {opts.TLS_ROOT_CERTS.value: pki.ca.cert.read_text(), opts.MTLS_CERT_CHAIN.value: pki.client.cert.read_text(),
            opts.MTLS_PRIVATE_KEY.value: pki.client.key.read_text(), opts.TIMEOUT_QUERY.value: str(CALL_TIMEOUT),
            opts.TIMEOUT_FETCH.value: str(CALL_TIMEOUT), opts.TIMEOUT_UPDATE.value: str(CALL_TIMEOUT)}


def established(rt: Runtime) -> int:
    """TCP connections the Flight TLS front holds on the Flight port."""
    return sum(c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == rt.flight_port
               for c in front_process(rt).net_connections("tcp"))


def test_adbc_flight_sql_aggregate_prepared_statement_and_clean_close(cluster: Cluster, pki: Pki,
                                                                      data: pa.Table) -> None:
    rt = cluster.scheduler
    health = FrontHealth.of(rt, pki, client_cert=True)  # the front's baseline, after a served call
    idle = established(rt)
    session = mark = len(rt.logs())
    with flightsql.connect(rt.flight_uri, db_kwargs=adbc_kwargs(pki), autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.execute(AGGREGATE)
            assert cur.fetch_arrow_table().to_pylist() == [aggregate(data)]
        distributed(rt, mark, 1, "ADBC's aggregate")
        with conn.cursor() as cur:
            sql = FROM_ID.format("?")
            cur.adbc_prepare(sql)
            for from_id in (120_000, 7):  # the prepared statement, bound and run with two values
                mark = len(rt.logs())
                cur.execute(sql, (from_id,))
                assert cur.fetch_arrow_table().to_pylist() == group_by(data, from_id), from_id
                distributed(rt, mark, 1, f"ADBC's prepared statement with {from_id}")
        assert established(rt) > idle, "the driver's connection is not on the front"
    # closed by the driver: the front lets go of the connection, keeps serving, and nothing was logged
    wait_for(lambda: established(rt) <= idle, timeout=10)
    health.check("an ADBC connection closed by the Go driver")
    quiet(rt, session, "an ADBC session and its close")


def test_adbc_prepared_statement_types_its_parameter(cluster: Cluster, pki: Pki) -> None:
    """The parameter schema CreatePreparedStatement answers (ADBC's get_parameter_schema) gives `$1`
    the type DataFusion inferred, Int64 from `id >= $1`, through the `count(*)` (`count(Int64(1))`)
    above the Filter. (This test found spiced/flight/prepared.py's plan walk recursing on Literals
    and answering Null; tests/test_flight_sql_params.py covers it on a single node.)"""
    with flightsql.connect(cluster.scheduler.flight_uri, db_kwargs=adbc_kwargs(pki), autocommit=True) as conn, \
            conn.cursor() as cur:
        cur.adbc_prepare(FROM_ID.format("?"))
        assert pa.schema(cur.adbc_statement.get_parameter_schema()) == pa.schema([("$1", pa.int64())])


# ---------------------------------------------------------------- the Spice.ai JavaScript SDK


def test_js_sdk_sql_of_a_distributed_query_over_flight_tls(cluster: Cluster, pki: Pki, data: pa.Table) -> None:
    """`sql()` over Flight (grpc+tls, the public CA, the client certificate): a plain query and one
    with a parameter (a Flight SQL prepared statement)."""
    rt = cluster.scheduler
    mark = len(rt.logs())
    job = {"flightUrl": rt.addresses["flight"], "flightTlsEnabled": True, "tlsRootCertFile": str(pki.ca.cert),
           "tlsClientCertFile": str(pki.client.cert), "tlsClientKeyFile": str(pki.client.key), "maxRetries": 0,
           "steps": [{"call": "sql", "query": GROUP_BY},
                     {"call": "sql", "query": FROM_ID.format("$1"), "parameters": [50_000]}]}
    out = run_sdk(job, timeout=40)
    plain, parameterized = out["results"]
    assert plain["rows"] == group_by(data)
    assert parameterized["rows"] == group_by(data, 50_000)
    distributed(rt, mark, 2, "the JavaScript SDK's sql()")


# ---------------------------------------------------------------- pyarrow Flight, mTLS


def test_pyarrow_flight_with_a_client_certificate_and_without(cluster: Cluster, pki: Pki, data: pa.Table) -> None:
    rt = cluster.scheduler
    mark = len(rt.logs())
    with fl.FlightClient(rt.flight_uri, tls_root_certs=pki.ca.cert_pem, cert_chain=pki.client.cert_pem,
                         private_key=pki.client.key_pem) as client:
        table = client.do_get(fl.Ticket(MANY.encode()), fl.FlightCallOptions(timeout=CALL_TIMEOUT)).read_all()
    assert table.to_pylist() == many(data)
    distributed(rt, mark, 1, "pyarrow's DoGet")
    mark = len(rt.logs())
    with fl.FlightClient(rt.flight_uri, tls_root_certs=pki.ca.cert_pem) as client, \
            pytest.raises(fl.FlightUnavailableError):
        client.do_get(fl.Ticket(MANY.encode()), fl.FlightCallOptions(timeout=CALL_TIMEOUT)).read_all()
    rt.wait_for_log(r"Flight TLS handshake with \S+ failed: .*PEER_DID_NOT_RETURN_A_CERTIFICATE", after=mark)
    assert ran(rt, mark) == []

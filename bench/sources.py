"""`python -m bench sources`: data sources against the same work done without the runtime.

- loading a 1M-row PostgreSQL table into the Arrow accelerator (the runtime's own `Loaded ...` line)
  next to reading the same table with the ADBC driver in this process;
- a filtered count on that table read in place (sent to PostgreSQL whole) next to the same count
  sent by the ADBC driver in this process;
- a GROUP BY over 5M Parquet rows in the local S3 server next to the same query on the local file,
  both in place in one runtime.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import adbc_driver_postgresql.dbapi as pg
import httpx
import pyarrow.flight as flight
from datafusion import SessionContext
from datafusion.object_store import AmazonS3

from bench.common import Row, median_time
from tests.dbservers import PgServer, postgres_server
from tests.pki import Pki
from tests.support import run_spiced, write_pod

PG_ROWS = 1_000_000
COUNT = "SELECT count(*) AS n FROM {t} WHERE amount > 500 AND customer = 'c7'"
LOADED = re.compile(r"Loaded ([\d,]+) rows \(.*\) for dataset pg_big in (.*)\.$")


def _seconds(humantime: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|h|m|s)", humantime))


def _pod(server: PgServer) -> str:
    params = (f"      pg_host: localhost\n      pg_port: {server.port}\n      pg_db: {server.database}\n"
              f"      pg_user: {server.user}\n      pg_pass: ${{env:PG_PASS}}\n"
              f"      pg_sslrootcert: {server.ca_cert}\n")
    return ("version: v1\nkind: Spicepod\nname: sources\ndatasets:\n"
            f"  - from: postgres:big\n    name: pg_big\n    params:\n{params}"
            "    acceleration:\n      enabled: true\n"
            f"  - from: postgres:big\n    name: pg_place\n    params:\n{params}")


def postgres_rows() -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="spiced-bench-pg-"))
    pki = Pki.create(work / "pki")
    with postgres_server(work / "pg", pki) as server:
        server.run_sql("CREATE TABLE big (id bigint PRIMARY KEY, customer text, amount double precision, "
                       "note text); INSERT INTO big SELECT i, 'c' || (i % 10), (i % 1000) * 1.0, 'note ' || i "
                       f"FROM generate_series(1, {PG_ROWS}) AS i; ANALYZE big;")
        with pg.connect(server.uri(), autocommit=True) as conn:
            def adbc(sql: str) -> object:
                with conn.cursor() as cur:
                    cur.execute(sql)
                    return cur.fetch_arrow_table()

            t_read = median_time(lambda: adbc("SELECT * FROM big"), repeat=3)
            t_count_direct = median_time(lambda: adbc(COUNT.format(t="big")))
        loads = []
        for _ in range(3):
            with run_spiced(write_pod(work / "pod", _pod(server)), env={"PG_PASS": server.password},
                            timeout=300) as rt:
                line = rt.wait_for_log(LOADED.pattern, timeout=300)
                match = LOADED.search(line)
                assert match is not None
                loads.append(_seconds(match.group(2)))
                with httpx.Client(timeout=60) as http:
                    t_count = median_time(lambda: http.post(rt.http_url + "/v1/sql", content=COUNT.format(
                        t="pg_place")).raise_for_status())
        loads.sort()
    return [Row("1M-row PostgreSQL table into the accelerator vs ADBC read (s)", loads[1], t_read, "s", "<= 1.5x"),
            Row("filtered count in place over HTTP vs ADBC count (s)", t_count, t_count_direct, "s", "<= 3x")]


def s3_rows(parquet: Path) -> list[Row]:
    from tests.objectstores import s3_server

    work = Path(tempfile.mkdtemp(prefix="spiced-bench-s3-"))
    group_by = "SELECT grp, count(*) AS n, sum(amount) AS total, avg(id) AS mean FROM {t} GROUP BY grp"
    with s3_server(work / "s3") as s3:
        s3.create_bucket("bench")
        s3.put("bench", "big/big.parquet", parquet)
        pod = ("version: v1\nkind: Spicepod\nname: s3\ndatasets:\n"
               f"  - from: file:{parquet}\n    name: local_big\n"
               "  - from: s3://bench/big/big.parquet\n    name: s3_big\n    params:\n"
               f"      s3_endpoint: {s3.endpoint}\n      s3_region: {s3.region}\n      s3_auth: key\n"
               f"      s3_key: {s3.key}\n      s3_secret: ${{env:S3_SECRET}}\n      allow_http: true\n")
        with run_spiced(write_pod(work / "pod", pod), env={"S3_SECRET": s3.secret}, timeout=300) as rt:
            client = flight.FlightClient(rt.flight_uri)
            t_local = median_time(lambda: client.do_get(flight.Ticket(group_by.format(t="local_big").encode()))
                                  .read_all())
            t_s3 = median_time(lambda: client.do_get(flight.Ticket(group_by.format(t="s3_big").encode())).read_all())
            client.close()
        ctx = SessionContext()  # the same S3 read in this process: what the local S3 server itself costs
        ctx.register_object_store("s3://", AmazonS3(bucket_name="bench", region=s3.region, access_key_id=s3.key,
                                                    secret_access_key=s3.secret, endpoint=s3.endpoint,
                                                    allow_http=True), None)
        ctx.register_parquet("s3_big", "s3://bench/big/big.parquet")
        t_direct = median_time(lambda: ctx.sql(group_by.format(t="s3_big")).collect())
    return [Row("GROUP BY 5M Parquet rows in S3 vs the local file, Flight (s)", t_s3, t_local, "s", "report"),
            Row("the same from S3 vs in-process DataFusion on the same S3 (s)", t_s3, t_direct, "s", "<= 1.2x")]

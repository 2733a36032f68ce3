"""`make bench`: the runtime against references measured in the same run. Prints medians and ratios.

`python -m bench [http] [queries] [flight] [sources] [accelerators] [peers] [cluster]` runs only those sections.

Sections: HTTP `/v1/sql SELECT 1` under wrk; a GROUP BY over 5M parquet rows via HTTP and Flight next to
in-process DataFusion; a 1M-row result as JSON over HTTP next to DataFusion's own JSON writer, and as
Arrow over HTTP and Flight; Flight DoGet over our TLS front next to a bare pyarrow server with native
gRPC TLS (throughput, free and with client and servers on separate cores, and small-call latency);
data sources (bench/sources.py): PostgreSQL loads and pushed-down counts next to the ADBC driver
in-process, a GROUP BY on Parquet in S3 next to the local file; accelerators (bench/accelerators.py):
the 5M-row GROUP BY and a point lookup in DuckDB and SQLite next to Arrow, and an append refresh of
1 % new rows next to a full refresh; peers (bench/peers.py): small queries, a point lookup, the GROUP BY
and 1M rows as JSON against roapi behind nginx's TLS and roapi in plaintext, with issue #16's goals;
cluster (bench/cluster.py): GROUP BYs over 20M rows in 8 Parquet files in DataFusion alone and on a
scheduler and 2 executors over mTLS, the cluster's overhead and the bytes sent back.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pyarrow.flight as flight
import pyarrow.ipc as ipc
from datafusion import SessionConfig, SessionContext

from bench import accelerators, cluster, peers, sources
from bench.common import Row, big_parquet, median_time, report, split_cores
from spiced.batches import PLAIN_ARROW_TYPES, plain_schema
from tests.pki import Pki
from tests.support import run_spiced

ROWS = 5_000_000
GROUP_BY = "SELECT grp, count(*) AS n, sum(amount) AS total, avg(id) AS mean FROM big GROUP BY grp"
MILLION = "SELECT id, grp, amount, label, ts, maybe FROM big LIMIT 1000000"
WIDE = "SELECT id, amount, grp FROM big_mem"
ROUNDS, WINDOW_SECONDS = 5, 1.5  # Flight throughput: per server, the median of interleaved windows


def spicepod(parquet: Path, cache: bool = False) -> str:
    """The measured runtime; without `cache` its results cache is off, so repeats run again."""
    return f"""version: v1
kind: Spicepod
name: bench
runtime:
  caching:
    sql_results:
      enabled: {str(cache).lower()}
      item_ttl: 1h
datasets:
  - from: file:{parquet}
    name: big
  - from: file:{parquet}
    name: big_mem
    acceleration:
      enabled: true
"""


def wrk(url: str, script: Path | None = None, seconds: int = 5) -> float:
    cmd = ["wrk", "-t1", "-c16", f"-d{seconds}s", url]
    if script:
        cmd[1:1] = ["-s", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"  wrk: {errors.group(1)} non-2xx responses for {url}")
    return float(m.group(1)) if m else float("nan")


def http_rows(base: str) -> list[Row]:
    wrk(base + "/health", seconds=2)  # warm-up
    sql = wrk(base + "/v1/sql", Path(__file__).with_name("post_select1.lua"))
    health = wrk(base + "/health")
    return [Row("/v1/sql SELECT 1 req/s (16 keep-alive conns) vs /health", sql, health, "req/s", "report",
                higher_is_better=True)]


def query_rows(rt_http: str, rt_flight: str, parquet: Path, ctx: SessionContext) -> list[Row]:
    rows = []
    client = flight.FlightClient(rt_flight)
    with httpx.Client(timeout=120) as http:
        t_df = median_time(lambda: ctx.sql(GROUP_BY).collect())
        t_http = median_time(lambda: http.post(rt_http + "/v1/sql", content=GROUP_BY).raise_for_status())
        t_fl = median_time(lambda: client.do_get(flight.Ticket(GROUP_BY.encode())).read_all())
        rows += [Row("GROUP BY 5M rows: HTTP JSON vs in-process DataFusion (s)", t_http, t_df, "s", "<= 1.1x"),
                 Row("GROUP BY 5M rows: Flight vs in-process DataFusion (s)", t_fl, t_df, "s", "<= 1.1x")]

        out = Path(tempfile.mkdtemp())
        t_writer = median_time(lambda: ctx.sql(MILLION).write_json(str(out / "r.json")), repeat=3)
        shutil.rmtree(out, ignore_errors=True)

        def http_json() -> float:
            t0 = time.perf_counter()
            first = None
            with http.stream("POST", rt_http + "/v1/sql", content=MILLION) as r:
                r.raise_for_status()
                for chunk in r.iter_raw():
                    if first is None and chunk:
                        first = time.perf_counter() - t0
            return first or 0.0

        firsts = [http_json() for _ in range(3)]
        t_json = median_time(http_json, repeat=3)
        rows += [Row("1M rows as JSON over HTTP vs DataFusion write_json (s)", t_json, t_writer, "s", "<= 2x"),
                 Row("1M rows JSON: first byte (s) vs 0.1 s", statistics.median(firsts), 0.1, "s", "<= 1x")]

        t_table = median_time(lambda: ctx.sql(MILLION).to_arrow_table(), repeat=3)

        def http_arrow() -> None:
            r = http.post(rt_http + "/v1/sql", content=MILLION,
                          headers={"Accept": "application/vnd.apache.arrow.stream"})
            r.raise_for_status()
            ipc.open_stream(r.content).read_all()

        t_arrow_http = median_time(http_arrow, repeat=3)
        t_arrow_flight = median_time(lambda: client.do_get(flight.Ticket(MILLION.encode())).read_all(), repeat=3)
        rows += [Row("1M rows as Arrow over HTTP vs in-process to_arrow_table (s)", t_arrow_http, t_table, "s",
                     "report"),
                 Row("1M rows as Arrow over Flight vs in-process to_arrow_table (s)", t_arrow_flight, t_table, "s",
                     "report")]
    client.close()
    return rows


STRINGS_GROUP_BY = "SELECT label, count(*) AS n FROM big GROUP BY label"
STRINGS_MILLION = "SELECT label, grp FROM big LIMIT 1000000"


def cache_rows(work: Path, parquet: Path) -> list[Row]:
    """A repeat answered by the results cache against the same query run again (cache off)."""
    (work / "cached").mkdir(exist_ok=True)
    (work / "cached" / "spicepod.yaml").write_text(spicepod(parquet, cache=True))
    with run_spiced(work / "cached", timeout=180) as cached, run_spiced(work, timeout=180) as uncached, \
            httpx.Client(timeout=120) as http:
        def query(rt_url: str) -> None:
            http.post(rt_url + "/v1/sql", content=GROUP_BY).raise_for_status()

        query(cached.http_url)  # fills the cache
        t_hit = median_time(lambda: query(cached.http_url), repeat=9)
        t_run = median_time(lambda: query(uncached.http_url))
    return [Row("GROUP BY 5M rows over HTTP: cached repeat vs run again (s)", t_hit, t_run, "s", "<= 0.1x")]


def plain_types_rows(parquet: Path, default_ctx: SessionContext) -> list[Row]:
    """What sending plain Utf8 instead of DataFusion's default Utf8View costs (spiced.engine
    PLAIN_ARROW_TYPES: Parquet strings read as Utf8, no conversion at the output), in-process."""
    config = SessionConfig()
    for key, value in PLAIN_ARROW_TYPES.items():
        config = config.set(key, value)
    plain = SessionContext(config)
    plain.register_parquet("big", str(parquet))
    group_plain = median_time(lambda: plain.sql(STRINGS_GROUP_BY).collect())
    group_view = median_time(lambda: default_ctx.sql(STRINGS_GROUP_BY).collect())
    # What a client gets from the default engine: views, cast to Utf8 for it (the alternative design).
    rows_plain = median_time(lambda: plain.sql(STRINGS_MILLION).to_arrow_table(), repeat=3)
    rows_cast = median_time(lambda: default_ctx.sql(STRINGS_MILLION).to_arrow_table().cast(
        plain_schema(default_ctx.sql(STRINGS_MILLION).schema())), repeat=3)
    return [Row("GROUP BY a string over 5M rows: Utf8 (ours) vs Utf8View (DataFusion default) (s)",
                group_plain, group_view, "s", "report"),
            Row("1M rows with strings out as Utf8: read as Utf8 (ours) vs Utf8View cast at the end (s)",
                rows_plain, rows_cast, "s", "report")]


def _doget_rate(client: flight.FlightClient, seconds: float = WINDOW_SECONDS) -> float:
    """MB/s of back-to-back DoGets of the wide result for about `seconds`."""
    received, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        received += client.do_get(flight.Ticket(WIDE.encode())).read_all().nbytes
    return received / (time.perf_counter() - t0) / 1e6


def _small_calls_ms(tls: flight.FlightClient, plain: flight.FlightClient,
                    calls: int = 400) -> tuple[float, float, float]:
    """Medians of a 1-row DoGet over TLS and in plaintext, and the median of their paired
    differences: the calls alternate, so both see the same moment of a noisy machine."""
    def one(client: flight.FlightClient) -> float:
        t0 = time.perf_counter()
        client.do_get(flight.Ticket(b"SELECT 1")).read_all()
        return (time.perf_counter() - t0) * 1000

    for _ in range(50):
        one(tls), one(plain)
    pairs = [(one(tls), one(plain)) for _ in range(calls)]
    return (statistics.median(t for t, _ in pairs), statistics.median(p for _, p in pairs),
            statistics.median(t - p for t, p in pairs))


def _windows(clients: dict[str, flight.FlightClient], names: tuple[str, ...]) -> dict[str, list[float]]:
    """MB/s of ROUNDS interleaved windows per client: the machine is shared and noisy."""
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(ROUNDS):
        for name in names:
            rates[name].append(_doget_rate(clients[name]))
    return rates


def _throughput_row(label: str, ours: list[float], native: list[float]) -> Row:
    spread = sorted(o / b for o, b in zip(ours, native, strict=True))
    return Row(label, statistics.median(ours), statistics.median(native), "MB/s",
               f">= 0.9x; per-window ratios {spread[0]:.2f}-{spread[-1]:.2f}", higher_is_better=True)


def flight_tls_rows(ours_tls: str, ours_plain: str, ours_pid: int, pki: Pki, parquet: Path) -> list[Row]:
    """Our TLS front against pyarrow's native gRPC TLS. Throughput is compared directly; for small
    calls, each side's TLS cost is the median difference of alternating TLS and plaintext calls, so
    the SQL work our runtime does and the bare server does not cancels out.

    Throughput is measured twice. First with every process free to run anywhere, as the scheduler
    places them. Then with the client on one half of the cores and the servers on the other: our
    server side is two processes (runtime and TLS front) where the native one is one, and on two
    cores shared with the client the placement of that third process alone moved our rate by 15-20%
    (measured); with a core of its own for each side, the comparison is of the TLS paths."""
    roots = pki.ca.cert_pem
    bare = subprocess.Popen([sys.executable, "-m", "bench.bare_flight", str(parquet), str(pki.server.cert),
                             str(pki.server.key)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert bare.stdout is not None
        tls_port, plain_port, df_tls_port = bare.stdout.readline().split()
        clients = {
            "ours_tls": flight.FlightClient(ours_tls, tls_root_certs=roots),
            "ours_plain": flight.FlightClient(ours_plain),
            "bare_tls": flight.FlightClient(f"grpc+tls://localhost:{tls_port}", tls_root_certs=roots),
            "bare_plain": flight.FlightClient(f"grpc://127.0.0.1:{plain_port}"),
            "datafusion_tls": flight.FlightClient(f"grpc+tls://localhost:{df_tls_port}", tls_root_certs=roots),
        }
        nbytes = clients["ours_tls"].do_get(flight.Ticket(WIDE.encode())).read_all().nbytes
        rates = _windows(clients, tuple(clients))
        mbs = {name: statistics.median(r) for name, r in rates.items()}
        with split_cores([ours_pid, bare.pid]) as split:
            pinned = _windows(clients, ("ours_tls", "bare_tls")) if split else None
        ours_small = _small_calls_ms(clients["ours_tls"], clients["ours_plain"])
        bare_small = _small_calls_ms(clients["bare_tls"], clients["bare_plain"])
        for c in clients.values():
            c.close()
    finally:
        if bare.stdin:
            bare.stdin.close()
        bare.wait(10)
    ours_cost, native_cost = ours_small[2], bare_small[2]
    size = f"Flight DoGet {nbytes / 1e6:.0f} MB over TLS"
    throughput = [_throughput_row(f"{size}: our front vs native grpc+tls (MB/s)", rates["ours_tls"], rates["bare_tls"])]
    if pinned:
        throughput.append(_throughput_row(f"{size}, client and servers on separate cores: ours vs native (MB/s)",
                                          pinned["ours_tls"], pinned["bare_tls"]))
    return [
        *throughput,
        Row(f"{size}: ours vs native grpc+tls running the same DataFusion query",
            mbs["ours_tls"], mbs["datafusion_tls"], "MB/s", "report", higher_is_better=True),
        Row(f"Flight DoGet {nbytes / 1e6:.0f} MB plaintext: ours vs bare pyarrow (MB/s)", mbs["ours_plain"],
            mbs["bare_plain"], "MB/s", "report", higher_is_better=True),
        Row("TLS share of throughput: ours (TLS/plain) vs bare (TLS/plain)", mbs["ours_tls"] / mbs["ours_plain"],
            mbs["bare_tls"] / mbs["bare_plain"], "ratio", "report", higher_is_better=True),
        Row("1-row DoGet median, ours: TLS vs plaintext (ms)", ours_small[0], ours_small[1], "ms", "report"),
        Row("1-row DoGet median, bare pyarrow: TLS vs plaintext (ms)", bare_small[0], bare_small[1], "ms", "report"),
        Row("TLS cost per small call (median paired difference): ours vs native (ms)", ours_cost, native_cost, "ms",
            f"added {ours_cost - native_cost:+.3f} ms, target <= +0.2 ms"),
    ]


SECTIONS = ("http", "queries", "flight", "sources", "accelerators", "peers", "cluster")


def main() -> None:
    chosen = sys.argv[1:] or list(SECTIONS)
    if unknown := set(chosen) - set(SECTIONS):
        sys.exit(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    parquet = big_parquet(ROWS)
    print(f"data: {parquet} ({ROWS:,} rows); cores: {os.cpu_count()}")
    ctx = SessionContext()
    ctx.register_parquet("big", str(parquet))
    work = Path(tempfile.mkdtemp(prefix="spiced-bench-"))
    try:
        (work / "spicepod.yaml").write_text(spicepod(parquet))
        if "http" in chosen or "queries" in chosen:
            with run_spiced(work, timeout=180) as rt:
                if "http" in chosen:
                    report("HTTP", http_rows(rt.http_url))
                if "queries" in chosen:
                    report("Queries (plaintext)", query_rows(rt.http_url, rt.flight_uri, parquet, ctx))
                    report("Arrow types on the wire", plain_types_rows(parquet, ctx))
        if "queries" in chosen:
            report("Results cache", cache_rows(work, parquet))
        if "accelerators" in chosen:
            report("Accelerators (HTTP, results cache off)", accelerators.query_rows(parquet, ROWS))
            report("Append refresh", accelerators.refresh_rows(parquet, ROWS))
        if "sources" in chosen:
            report("Data sources", sources.postgres_rows() + sources.s3_rows(parquet))
        if "peers" in chosen:
            peers.run(parquet, ROWS)
        if "cluster" in chosen:
            cluster.main()
        if "flight" not in chosen:
            return
        pki = Pki.create(work / "pki")
        with run_spiced(work, "--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
                        "--tls-key-file", str(pki.server.key), timeout=180) as tls_rt, \
                run_spiced(work, timeout=180) as plain_rt:
            report("Flight over TLS", flight_tls_rows(tls_rt.flight_uri.replace("127.0.0.1", "localhost"),
                                                      plain_rt.flight_uri, tls_rt.proc.pid, pki, parquet))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

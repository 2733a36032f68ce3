"""`python -m bench accelerators`: the DuckDB and SQLite accelerators against the Arrow one, and an
append refresh against a full one, each pair measured in the same runtime.

- Queries: one runtime (results cache off) holds the 5M generated rows three times, accelerated by
  arrow, duckdb and sqlite (the two embedded engines in memory, `id` indexed); the GROUP BY of the
  `queries` section and a point lookup (`WHERE id = k`, a different k each time) go over HTTP
  /v1/sql to each. The engines take turns within each round, so every round's ratio to arrow is
  taken at one moment of a shared machine; the spread of those ratios is printed with the medians.
- Refresh: a Parquet file (the 5M rows) is each engine's source, with `time_column: ts` and
  `refresh_mode: append`. Each round rewrites it with 1 % more rows, with later timestamps (written
  beside it, then renamed over it), then `POST /v1/datasets/{name}/acceleration/refresh` asks each
  dataset for an append (its mode) and then a full refresh (the request's `{"refresh_mode":
  "full"}`); each is timed by the runtime's `Loaded … in T.` line. At the end every dataset must
  hold every row exactly once. The full refreshes also compare the
  engines' load times (no index there), one engine at a time: the startup loads run together.

The runtime's WARN and ERROR lines are printed under each part.
"""

from __future__ import annotations

import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pyarrow.parquet as pq

from bench.common import Row, big_table
from tests.support import Runtime, run_spiced, write_pod

ENGINES = ("arrow", "duckdb", "sqlite")
GROUP_BY = "SELECT grp, count(*) AS n, sum(amount) AS total, avg(id) AS mean FROM {t} GROUP BY grp"
LOOKUP = "SELECT * FROM {t} WHERE id = {k}"
QUERY_ROUNDS, LOOKUP_ROUNDS, REFRESH_ROUNDS = 7, 21, 3
LOADED = re.compile(r"Loaded ([\d,]+) rows \(.*\) for dataset (\S+) in (.*)\.$")


def _seconds(humantime: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|h|m|s)", humantime))


def _n(rows: int) -> str:
    return f"{rows / 1e6:g}M" if rows >= 1_000_000 else f"{rows / 1e3:g}K"


def _accelerated(name: str, source: Path, engine: str, dataset: str = "", acceleration: str = "") -> str:
    """A dataset of `source` accelerated by `engine`, with more lines for the dataset and its acceleration."""
    return (f"  - from: file:{source}\n    name: {name}\n{dataset}"
            f"    acceleration:\n      enabled: true\n      engine: {engine}\n{acceleration}")


def _pod(datasets: str) -> str:
    return ("version: v1\nkind: Spicepod\nname: accelerators\nruntime:\n  caching:\n    sql_results:\n"
            f"      enabled: false\ndatasets:\n{datasets}")


def _warnings(rt: Runtime) -> None:
    """The runtime's WARN and ERROR lines, shown with the figures they may explain."""
    for line in [line for line in rt.logs() if re.search(r"\b(WARN|ERROR)\b", line)][:10]:
        print(f"  runtime: {line}")


def _rounds(http: httpx.Client, url: str, sql: Callable[[str, int], str], rounds: int) -> dict[str, list[float]]:
    """Seconds per engine, the engines taking turns within each round (after one warm-up each)."""
    times: dict[str, list[float]] = {e: [] for e in ENGINES}
    for r in range(-1, rounds):
        for engine in ENGINES:
            t0 = time.perf_counter()
            http.post(url, content=sql(f"big_{engine}", r)).raise_for_status()
            if r >= 0:
                times[engine].append(time.perf_counter() - t0)
    return times


def _paired(label: str, ours: list[float], reference: list[float], unit: str = "s") -> Row:
    """Medians, and the spread of the per-round ratios in the target column."""
    ratios = sorted(o / b for o, b in zip(ours, reference, strict=True))
    spread = f"report; per-round ratios {ratios[0]:.2f}-{ratios[-1]:.2f}, n={len(ratios)}"
    return Row(label, statistics.median(ours), statistics.median(reference), unit, spread)


def query_rows(parquet: Path, rows: int) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="spiced-bench-accel-"))
    try:
        indexed = {e: "      indexes:\n        id: enabled\n" if e != "arrow" else "" for e in ENGINES}
        pod = _pod("".join(_accelerated(f"big_{e}", parquet, e, acceleration=indexed[e]) for e in ENGINES))
        with run_spiced(write_pod(work, pod), timeout=600) as rt, httpx.Client(timeout=300) as http:
            url = rt.http_url + "/v1/sql"
            group = _rounds(http, url, lambda t, _: GROUP_BY.format(t=t), QUERY_ROUNDS)
            step = rows // (LOOKUP_ROUNDS + 2)
            lookup = _rounds(http, url, lambda t, r: LOOKUP.format(t=t, k=(r + 1) * step + 7), LOOKUP_ROUNDS)
            _warnings(rt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = []
    for engine in ENGINES[1:]:
        out.append(_paired(f"GROUP BY {_n(rows)} rows, HTTP: {engine} vs arrow (s)",
                           group[engine], group["arrow"]))
    for engine in ENGINES[1:]:
        out.append(_paired(f"lookup id = k, HTTP: {engine} (id indexed) vs arrow (s)",
                           lookup[engine], lookup["arrow"]))
    return out


def _grow(source: Path, rows: int) -> None:
    """The source rewritten with `rows` rows (the new ones with later timestamps), renamed in whole."""
    pending = source.with_suffix(".pending")
    pq.write_table(big_table(rows), pending, row_group_size=256 * 1024)
    pending.rename(source)


def _refresh(http: httpx.Client, rt: Runtime, name: str, mode: str | None) -> tuple[int, float]:
    """Rows and seconds of one refresh of `name`, from the runtime's `Loaded` line."""
    seen = len(rt.logs())
    r = http.post(f"{rt.http_url}/v1/datasets/{name}/acceleration/refresh",
                  json={"refresh_mode": mode} if mode else None)
    r.raise_for_status()
    line = rt.wait_for_log(rf"Loaded [\d,]+ rows \(.*\) for dataset {name} in |"
                           rf"Failed to load data for dataset {name}:", timeout=300, after=seen)
    m = LOADED.search(line)
    if m is None:
        raise AssertionError(f"refresh of {name} failed: {line}")
    return int(m.group(1).replace(",", "")), _seconds(m.group(3))


def refresh_rows(parquet: Path, rows: int) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="spiced-bench-refresh-"))
    try:
        source = work / "source.parquet"
        shutil.copyfile(parquet, source)
        pod = _pod("".join(_accelerated(f"t_{e}", source, e, dataset="    time_column: ts\n",
                                        acceleration="      refresh_mode: append\n") for e in ENGINES))
        added, total = rows // 100, rows
        appends: dict[str, list[float]] = {e: [] for e in ENGINES}
        fulls: dict[str, list[float]] = {e: [] for e in ENGINES}
        problems = []
        with run_spiced(write_pod(work / "pod", pod), timeout=600) as rt, httpx.Client(timeout=300) as http:
            for _ in range(REFRESH_ROUNDS):
                total += added
                _grow(source, total)
                for e in ENGINES:
                    n, t = _refresh(http, rt, f"t_{e}", None)
                    if n != added:
                        problems.append(f"append into t_{e} loaded {n:,} rows, expected {added:,}")
                    appends[e].append(t)
                    n, t = _refresh(http, rt, f"t_{e}", "full")
                    if n != total:
                        problems.append(f"full refresh of t_{e} loaded {n:,} rows, expected {total:,}")
                    fulls[e].append(t)
            for e in ENGINES:  # every row once: appends must neither lose nor repeat any
                sql = f"SELECT count(*) AS n, count(DISTINCT id) AS ids FROM t_{e}"
                got = http.post(rt.http_url + "/v1/sql", content=sql).raise_for_status().json()[0]
                if got != {"n": total, "ids": total}:
                    problems.append(f"t_{e} holds {got}, expected {total:,} distinct rows")
            _warnings(rt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for problem in problems:
        print(f"  refresh: {problem}")
    out = [_paired(f"refresh +{_n(added)} rows to {_n(rows)}: append vs full, {e} (s)", appends[e], fulls[e])
           for e in ENGINES]
    return out + [_paired(f"full refresh of {_n(rows)}+ rows: {e} vs arrow (s)", fulls[e], fulls["arrow"])
                  for e in ENGINES if e != "arrow"]

"""Every `acceleration:` option on the real runtime, proven by the data queried afterwards: the
engines (arrow, duckdb, sqlite; memory and file) against the unaccelerated file, restarts in file
mode, append refreshes, refresh_sql, the data window, on_zero_results, retention, ready_state,
retries, jitter, primary keys and indexes.

The results cache is off in every spicepod here and queries send `Cache-Control: no-cache`, so a
cached answer never hides what a refresh or a retention check did.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
import yaml

from tests.support import Runtime, run_spiced, spiced_fails, sql_json

T = TypeVar("T")
T0 = dt.datetime(2024, 1, 1)
NOW = dt.datetime.now(dt.UTC).replace(tzinfo=None)  # naive UTC, as the Parquet columns hold time


# ---------------------------------------------------------------- helpers


def write_pod(workdir: Path, datasets: list[dict[str, Any]]) -> Path:
    """spicepod.yaml with these datasets and the results cache off."""
    workdir.mkdir(parents=True, exist_ok=True)
    pod = {"version": "v1", "kind": "Spicepod", "name": "accel",
           "runtime": {"caching": {"sql_results": {"enabled": False}}}, "datasets": datasets}
    (workdir / "spicepod.yaml").write_text(yaml.safe_dump(pod, sort_keys=False))
    return workdir


def dataset(name: str, source: str, **acceleration: Any) -> dict[str, Any]:
    """A dataset accelerated with these keys; `time_column`, `time_format` and `ready_state`
    given here go to the dataset itself."""
    ds: dict[str, Any] = {"from": f"file:{source}", "name": name}
    for key in ("time_column", "time_format", "ready_state"):
        if key in acceleration:
            ds[key] = acceleration.pop(key)
    ds["acceleration"] = {"enabled": True, **acceleration}
    return ds


def write_parquet(path: Path, table: pa.Table) -> None:
    """Replaced atomically: a refresh reads the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def events(ids: list[int]) -> pa.Table:
    """`id` and `ts` (naive UTC, µs: `id` hours after T0) for each id."""
    return pa.table({"id": pa.array(ids, pa.int64()),
                     "ts": pa.array([T0 + dt.timedelta(hours=i) for i in ids], pa.timestamp("us"))})


def q(rt: Runtime, sql: str) -> list[dict[str, object]]:
    return sql_json(rt, sql, cached=False)


def ids(rt: Runtime, table: str, where: str = "") -> list[object]:
    return [r["id"] for r in q(rt, f"SELECT id FROM {table} {where} ORDER BY id")]


def eventually(fn: Callable[[], T], check: Callable[[T], bool], *, timeout: float = 15.0, what: str = "") -> T:
    """Call `fn` until `check` accepts its answer; fails with the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} not met in {timeout}s; last: {value!r}")
        time.sleep(0.1)


def lines(rt: Runtime, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [line for line in rt.logs() if rx.search(line)]


def at(line: str) -> dt.datetime:
    """A log line's timestamp."""
    return dt.datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ")


def loading(rt: Runtime, name: str) -> list[str]:
    """The `Loading data for dataset <name>` lines: one per load or refresh attempt."""
    return lines(rt, rf"Loading data for dataset {name}$")


def wait_for_count(rt: Runtime, pattern: str, count: int, timeout: float = 15.0) -> list[str]:
    return eventually(lambda: lines(rt, pattern), lambda found: len(found) >= count, timeout=timeout,
                      what=f"{count} lines matching {pattern!r}")


def ready_status(rt: Runtime) -> int:
    return httpx.get(rt.http_url + "/v1/ready", timeout=5).status_code


def post_refresh(rt: Runtime, name: str) -> None:
    r = httpx.post(f"{rt.http_url}/v1/datasets/{name}/acceleration/refresh", timeout=10)
    assert r.status_code == 201, r.text


# ---------------------------------------------------------------- 1. engines answer as the source does

TRIP_IDS = list(range(1, 21))
CITIES = ["Seattle", "Zürich", "O'Hare", "São Paulo", "Portland"]


def trips() -> pa.Table:
    """20 trips over two days; NULLs in every column but id; non-ASCII and quoted strings; fares
    exact in binary so sums do not depend on the order they are added in."""
    return pa.table({
        "id": pa.array(TRIP_IDS, pa.int64()),
        "city": pa.array([None if i % 7 == 0 else CITIES[i % 5] for i in TRIP_IDS]),
        "fare": pa.array([None if i % 9 == 0 else i * 1.25 for i in TRIP_IDS], pa.float64()),
        "ts": pa.array([None if i == 13 else T0 + dt.timedelta(hours=2 * i) for i in TRIP_IDS], pa.timestamp("us")),
        "paid": pa.array([i % 3 != 0 for i in TRIP_IDS]),
        "ts_ny": pa.array([T0.replace(tzinfo=dt.UTC) + dt.timedelta(minutes=37 * i) for i in TRIP_IDS],
                          pa.timestamp("us", tz="America/New_York")),
        "ts_ns": pa.array([1_704_067_200_000_000_000 + i * 3_600_000_000_123 for i in TRIP_IDS], pa.timestamp("ns")),
        "day": pa.array([(T0 + dt.timedelta(days=i % 4)).date() for i in TRIP_IDS], pa.date32()),
    })


ENGINES: dict[str, dict[str, Any]] = {  # dataset name → acceleration keys
    "t_arrow": {"engine": "arrow"},
    "t_duck_mem": {"engine": "duckdb"},
    "t_duck_file": {"engine": "duckdb", "mode": "file"},
    "t_duck_own": {"engine": "duckdb", "mode": "file", "params": {"duckdb_file": "custom/trips.ddb"}},
    "t_lite_mem": {"engine": "sqlite"},
    "t_lite_file": {"engine": "sqlite", "mode": "file"},
    "t_lite_own": {"engine": "sqlite", "mode": "file", "params": {"sqlite_file": "custom/trips.sqlite"}},
}
QUERIES = {
    "count": "SELECT count(*) AS n, count(city) AS cities, count(fare) AS fares, count(ts) AS times FROM {t}",
    "group_by": "SELECT city, count(*) AS n, sum(fare) AS total, min(ts) AS first FROM {t} "
                "GROUP BY city ORDER BY city NULLS FIRST",
    "filter": "SELECT id, city FROM {t} WHERE fare > 10 AND city <> 'Seattle' AND paid ORDER BY id",
    "order_limit": "SELECT id, fare FROM {t} ORDER BY fare DESC, id LIMIT 5",
    "order_limit_nulls_last": "SELECT id, ts FROM {t} ORDER BY ts DESC NULLS LAST LIMIT 3",
    "timestamps": "SELECT id, ts FROM {t} WHERE ts >= TIMESTAMP '2024-01-01 10:00:00' "
                  "AND ts < TIMESTAMP '2024-01-02 02:00:00' ORDER BY ts",
    "date_trunc": "SELECT date_trunc('day', ts) AS day, count(*) AS n FROM {t} GROUP BY 1 ORDER BY 1 NULLS FIRST",
    "nulls": "SELECT id, coalesce(city, '-') AS city, fare IS NULL AS no_fare FROM {t} "
             "WHERE city IS NULL OR fare IS NULL OR ts IS NULL ORDER BY id",
    "strings": "SELECT id, city, upper(city) AS up, length(city) AS len FROM {t} "
               "WHERE city LIKE '%o%' OR city = 'O''Hare' ORDER BY id",
    "like_is_case_sensitive": "SELECT id, city FROM {t} WHERE city LIKE 'S%' OR city LIKE 'o%' ORDER BY id",
    "booleans": "SELECT id, paid, NOT paid AS unpaid, CAST(paid AS VARCHAR) AS text FROM {t} "
                "WHERE paid OR fare IS NULL ORDER BY id",
    "casts": "SELECT id, CAST(fare AS BIGINT) AS whole, CAST(id AS VARCHAR) AS text, id / 3 AS third "
             "FROM {t} ORDER BY id",
    "timestamp_text": "SELECT id, to_char(ts, '%Y-%m-%d') AS day, extract(hour FROM ts) AS hour FROM {t} ORDER BY id",
    "zoned_and_nanos": "SELECT id, ts_ny, ts_ns, day, extract(hour FROM ts_ny) AS ny_hour, "
                       "date_trunc('day', ts_ny) AS ny_day FROM {t} WHERE ts_ny > TIMESTAMP '2024-01-01 05:00:00' "
                       "OR ts_ns < TIMESTAMP '2024-01-01 03:00:00' OR day > DATE '2024-01-03' ORDER BY ts_ns DESC",
    "everything": "SELECT * FROM {t} ORDER BY id",
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """Every engine and mode over the same Parquet file, beside the file itself (`t_plain`)."""
    workdir = tmp_path_factory.mktemp("engines")
    write_parquet(workdir / "trips.parquet", trips())
    datasets = [{"from": "file:trips.parquet", "name": "t_plain"}]
    datasets += [dataset(name, "trips.parquet", **keys) for name, keys in ENGINES.items()]
    with run_spiced(write_pod(workdir, datasets)) as rt:
        rt.workdir = workdir  # type: ignore[attr-defined]
        yield rt


@pytest.mark.parametrize("query", QUERIES.values(), ids=QUERIES.keys())
@pytest.mark.parametrize("name", ENGINES)
def test_each_engine_answers_as_the_file_does(engines: Runtime, name: str, query: str) -> None:
    expected = q(engines, query.format(t="t_plain"))
    assert expected, "the query must return rows to compare"
    assert q(engines, query.format(t=name)) == expected


@pytest.mark.parametrize("name", ENGINES)
def test_each_engine_gives_the_files_arrow_schema(engines: Runtime, name: str) -> None:
    client = flight.FlightClient(engines.flight_uri)
    try:
        plain = client.do_get(flight.Ticket(b"SELECT * FROM t_plain ORDER BY id")).read_all()
        accelerated = client.do_get(flight.Ticket(f"SELECT * FROM {name} ORDER BY id".encode())).read_all()
    finally:
        client.close()
    assert accelerated.schema.remove_metadata() == plain.schema.remove_metadata()
    assert accelerated.equals(plain)


@pytest.mark.parametrize(("left", "right"), [("t_duck_mem", "t_arrow"), ("t_duck_file", "t_lite_mem"),
                                             ("t_lite_file", "t_arrow")])
def test_a_join_across_accelerators(engines: Runtime, left: str, right: str) -> None:
    join = ("SELECT l.id, l.city, r.fare, r.ts FROM {l} l JOIN {r} r ON l.id = r.id "
            "WHERE l.fare > 5 AND r.city IS NOT NULL ORDER BY l.id")
    expected = q(engines, join.format(l="t_plain", r="t_plain"))
    assert len(expected) > 5
    assert q(engines, join.format(l=left, r=right)) == expected


def test_file_mode_writes_the_default_and_the_given_files(engines: Runtime) -> None:
    workdir: Path = engines.workdir  # type: ignore[attr-defined]
    assert (workdir / ".spice/data/accelerated_duckdb.db").is_file()
    assert (workdir / "custom/trips.ddb").is_file()
    # SQLite files can be read beside the runtime (WAL): each holds its dataset's table only.
    for file, held in ((".spice/data/accelerated_sqlite.db", "t_lite_file"), ("custom/trips.sqlite", "t_lite_own")):
        with sqlite3.connect(f"file:{workdir / file}?mode=ro", uri=True) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert tables & {"t_lite_mem", "t_lite_file", "t_lite_own"} == {held}
            assert db.execute(f"SELECT count(*) FROM {held}").fetchone() == (20,)


@pytest.mark.parametrize(("engine", "file", "expected"), [
    ("duckdb", "acc.txt", 'Expected one of "db, ddb, duckdb" but got "txt".'),
    ("sqlite", "acc.duckdb", 'Expected one of "sqlite, db" but got "duckdb".'),
])
def test_a_bad_file_extension_is_a_config_error_naming_the_key(tmp_path: Path, engine: str, file: str,
                                                               expected: str) -> None:
    write_parquet(tmp_path / "trips.parquet", trips())
    write_pod(tmp_path, [dataset("trips", "trips.parquet", engine=engine, mode="file",
                                 params={f"{engine}_file": file})])
    failed = spiced_fails(tmp_path)
    assert failed.returncode == 1
    assert f"datasets[0].acceleration.params.{engine}_file: The \"{engine}_file\" acceleration parameter has an " \
           f"invalid extension. {expected}" in failed.stderr
    assert not (tmp_path / file).exists()


# ---------------------------------------------------------------- 2. file mode across restarts


def test_file_mode_across_restarts(tmp_path: Path) -> None:
    """The data a run leaves in the accelerator file answers at the next start, before any
    refresh; `auto` resumes the schedule from the last refresh, `always` refreshes at start,
    `file_create` starts over from the source."""
    source = tmp_path / "events.parquet"

    def run(**keys: Any) -> Any:
        write_pod(tmp_path, [
            dataset("keep_duck", "events.parquet", engine="duckdb", **keys,
                    params={"duckdb_file": "store/keep.duckdb"}),
            dataset("keep_lite", "events.parquet", engine="sqlite", **keys),
        ])
        return run_spiced(tmp_path)

    def both(rt: Runtime) -> tuple[list[object], list[object]]:
        return ids(rt, "keep_duck"), ids(rt, "keep_lite")

    # A: the first run loads from the source.
    write_parquet(source, events([1, 2, 3]))
    with run(mode="file") as rt:
        assert both(rt) == ([1, 2, 3], [1, 2, 3])
        first_loaded = at(rt.wait_for_log(r"Loaded 3 rows .* for dataset keep_duck in"))

    # B: auto with a 5 s interval: the old rows at once, from the file; the first refresh comes
    # 5 s after the last one of run A, not 5 s after this start.
    write_parquet(source, events([10, 11]))
    with run(mode="file", refresh_check_interval="5s") as rt:
        assert both(rt) == ([1, 2, 3], [1, 2, 3])
        for name in ("keep_duck", "keep_lite"):
            rt.wait_for_log(rf"Dataset {name} is ready from its accelerator file \(last refreshed ")
        started = at(rt.wait_for_log(r"Dataset keep_duck is ready from its accelerator file"))
        assert not loading(rt, "keep_duck")
        refreshed = at(rt.wait_for_log(r"Loaded 2 rows .* for dataset keep_duck in", timeout=10))
        rt.wait_for_log(r"Loaded 2 rows .* for dataset keep_lite in", timeout=10)
        assert both(rt) == ([10, 11], [10, 11])
        assert (refreshed - first_loaded).total_seconds() >= 4.5
        assert (refreshed - started).total_seconds() < 4.8, "the schedule restarted instead of resuming"

    # C: auto without an interval never reads the source, which is now unreadable.
    source.write_bytes(b"not parquet")
    with run(mode="file") as rt:
        assert both(rt) == ([10, 11], [10, 11])
        time.sleep(0.5)
        assert not loading(rt, "keep_duck") and not loading(rt, "keep_lite")
        assert not lines(rt, "Failed to load")

    # D: always refreshes at start.
    write_parquet(source, events([20, 21, 22]))
    with run(mode="file", refresh_on_startup="always") as rt:
        rt.wait_for_log(r"Loaded 3 rows .* for dataset keep_duck in")
        rt.wait_for_log(r"Loaded 3 rows .* for dataset keep_lite in")
        assert both(rt) == ([20, 21, 22], [20, 21, 22])
        assert len(lines(rt, "is ready from its accelerator file")) == 2

    # E: file_create removes the file and loads from the source.
    write_parquet(source, events([30]))
    with run(mode="file_create") as rt:
        rt.wait_for_log(r"WARN .*DuckDB acceleration mode is 'file_create', removing existing file: .*keep\.duckdb")
        rt.wait_for_log(r"WARN .*SQLite acceleration mode is 'file_create', removing existing file: "
                        r".*accelerated_sqlite\.db")
        assert not lines(rt, "is ready from its accelerator file")
        assert both(rt) == ([30], [30])

    import duckdb

    with duckdb.connect(str(tmp_path / "store/keep.duckdb"), read_only=True) as db:
        assert db.sql("SELECT id FROM keep_duck").fetchall() == [(30,)]
    with sqlite3.connect(tmp_path / ".spice/data/accelerated_sqlite.db") as lite:
        assert lite.execute("SELECT id FROM keep_lite").fetchall() == [(30,)]


# ---------------------------------------------------------------- time columns

TIME_COLUMNS = {  # column of `timed()` → its time_format
    "ts": "timestamp",  # µs, naive UTC
    "ts_ns": "timestamp",  # ns with digits below the µs
    "ts_ny": "timestamptz",  # µs in America/New_York
    "iso": "ISO8601",  # text with a -05:00 offset
    "t": "unix_seconds",
    "ms": "unix_millis",
}
ACCELERATORS = {"arrow": "arrow", "duck": "duckdb", "lite": "sqlite"}


def timed(ids: list[int], at: Callable[[int], dt.datetime]) -> pa.Table:
    """For each id, its time `at(id)` (naive UTC) in every form of TIME_COLUMNS, and as a date."""
    times = [at(i).replace(tzinfo=dt.UTC) for i in ids]
    epoch_us = [(t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1) for t in times]
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "ts": pa.array([t.replace(tzinfo=None) for t in times], pa.timestamp("us")),
        "ts_ns": pa.array([us * 1000 + 1 + i % 998 for us, i in zip(epoch_us, ids, strict=True)], pa.timestamp("ns")),
        "ts_ny": pa.array(times, pa.timestamp("us", tz="America/New_York")),
        "iso": pa.array([t.astimezone(dt.timezone(dt.timedelta(hours=-5))).isoformat() for t in times]),
        "t": pa.array([int(t.timestamp()) for t in times], pa.int64()),
        "ms": pa.array([us // 1000 for us in epoch_us], pa.int64()),
        "d": pa.array([t.date() for t in times], pa.date32()),
    })


# ---------------------------------------------------------------- 3. append


def test_append_adds_only_rows_newer_than_those_held(tmp_path: Path) -> None:
    """Each time column (every format) on each accelerator: the new rows come in, a row older
    than those held does not, and refreshes that find nothing newer add nothing."""
    def hours(i: int) -> dt.datetime:
        return T0 + dt.timedelta(hours=i)

    write_parquet(tmp_path / "events.parquet", timed([1, 2, 3, 4], hours))
    appending = {"refresh_mode": "append", "refresh_check_interval": "1s"}
    datasets = {f"{column}_{short}": dataset(f"{column}_{short}", "events.parquet", engine=engine,
                                             time_column=column, time_format=fmt, **appending)
                for column, fmt in TIME_COLUMNS.items() for short, engine in ACCELERATORS.items()}
    write_pod(tmp_path, [*datasets.values(), dataset("all_arrow", "events.parquet", **appending),
                         dataset("all_duck", "events.parquet", engine="duckdb", **appending)])
    with run_spiced(tmp_path) as rt:
        for name in datasets:
            assert ids(rt, name) == [1, 2, 3, 4], name
        # New rows, and one (id 0) older than every row held: an append takes only what is newer.
        write_parquet(tmp_path / "events.parquet", timed([0, 1, 2, 3, 4, 5, 6, 7], hours))
        for name in datasets:
            eventually(partial(ids, rt, name), lambda got: got == [1, 2, 3, 4, 5, 6, 7], what=name)
        # Two more refreshes of each find nothing newer.
        done = {name: len(lines(rt, rf"Loaded \d+ rows .* for dataset {name} in")) for name in datasets}
        for name in datasets:
            wait_for_count(rt, rf"Loaded \d+ rows .* for dataset {name} in", done[name] + 2)
        for name in datasets:
            counted = q(rt, f"SELECT count(*) AS n, count(DISTINCT id) AS ids FROM {name}")
            assert counted == [{"n": 7, "ids": 7}], name
        # A refresh that sized the file just before it was replaced reads the new one at the old size
        # ("Corrupt footer"): it keeps the data held, and the next refresh loads (checked above).
        assert not [line for line in lines(rt, "Failed to load") if "Corrupt footer" not in line]
        # Without a time column every refresh appends all the source gives: duplicates, as upstream.
        for name in ("all_arrow", "all_duck"):
            counted = q(rt, f"SELECT count(*) AS n, count(DISTINCT id) AS ids FROM {name}")
            assert counted[0]["ids"] == 8 and int(str(counted[0]["n"])) > 8 + 4, (name, counted)


# ---------------------------------------------------------------- 4. refresh_sql, data window, zero results


def test_refresh_sql_data_window_and_zero_results(tmp_path: Path) -> None:
    write_parquet(tmp_path / "trips.parquet", trips())
    write_parquet(tmp_path / "recent.parquet", timed([1, 2, 3, 4, 5], lambda i: NOW - dt.timedelta(minutes=25 * i)))
    datasets = []
    for short, engine in ACCELERATORS.items():
        datasets.append(dataset(f"rs_{short}", "trips.parquet", engine=engine, on_zero_results="use_source",
                                refresh_sql=f"SELECT id, city FROM rs_{short} WHERE id < 10"))
    datasets.append(dataset("rs_empty", "trips.parquet", engine="duckdb", on_zero_results="return_empty",
                            refresh_sql="SELECT id, city FROM rs_empty WHERE id < 10"))
    windowed = [f"win_{column}_{short}" for column in TIME_COLUMNS for short in ACCELERATORS]
    for column, fmt in TIME_COLUMNS.items():
        for short, engine in ACCELERATORS.items():
            datasets.append(dataset(f"win_{column}_{short}", "recent.parquet", engine=engine, time_column=column,
                                    time_format=fmt, refresh_data_window="1h"))
    write_pod(tmp_path, datasets)
    source = {r["id"]: r for r in trips().select(["id", "city"]).to_pylist()}
    with run_spiced(tmp_path) as rt:
        for name in ("rs_arrow", "rs_duck", "rs_lite", "rs_empty"):
            columns = q(rt, "SELECT column_name FROM information_schema.columns "
                            f"WHERE table_name = '{name}' ORDER BY ordinal_position")
            assert [c["column_name"] for c in columns] == ["id", "city"], name
            assert ids(rt, name) == list(range(1, 10)), name
            held = q(rt, f"SELECT id, city FROM {name} WHERE id = 5")
            assert held == [{"id": 5, "city": source[5]["city"]}], name
        for name in ("rs_arrow", "rs_duck", "rs_lite"):
            # Not in the accelerator: the source answers (without refresh_sql's filter).
            assert q(rt, f"SELECT id, city FROM {name} WHERE id = 15") == [{"id": 15, "city": source[15]["city"]}]
            assert q(rt, f"SELECT count(*) AS n FROM {name} WHERE id > 100") == [{"n": 0}]
            assert q(rt, f"SELECT id FROM {name} WHERE id > 100") == []
        assert q(rt, "SELECT id, city FROM rs_empty WHERE id = 15") == []
        for name in windowed:
            assert ids(rt, name) == [1, 2], name  # 25 and 50 minutes old; 75 and more are outside the hour


# ---------------------------------------------------------------- 5. retention


def test_retention_drops_rows_by_period_and_by_sql(tmp_path: Path) -> None:
    """retention_period on each time column (every format) and retention_sql, on each accelerator."""
    write_parquet(tmp_path / "old.parquet", timed(list(range(1, 9)), lambda i: NOW - dt.timedelta(minutes=10 * i)))
    write_parquet(tmp_path / "days.parquet", timed(list(range(1, 9)), lambda i: NOW - dt.timedelta(days=i)))
    check = {"retention_check_enabled": True, "retention_check_interval": "1s"}
    kept: dict[str, list[int]] = {}
    datasets = []
    for short, engine in ACCELERATORS.items():
        for column, fmt in TIME_COLUMNS.items():
            name = f"{column}_{short}"
            datasets.append(dataset(name, "old.parquet", engine=engine, time_column=column, time_format=fmt,
                                    retention_period="35m", **check))
            kept[name] = [1, 2, 3]  # 10, 20 and 30 minutes old
        datasets.append(dataset(f"d_{short}", "days.parquet", engine=engine, time_column="d", time_format="date",
                                retention_period="84h", **check))
        kept[f"d_{short}"] = [1, 2, 3]  # 1, 2 and 3 days old
        datasets.append(dataset(f"sql_{short}", "old.parquet", engine=engine,
                                retention_sql=f"DELETE FROM sql_{short} WHERE id < 5", **check))
        kept[f"sql_{short}"] = [5, 6, 7, 8]
    write_pod(tmp_path, datasets)
    with run_spiced(tmp_path) as rt:
        for name, rows in kept.items():
            rt.wait_for_log(rf"Loaded 8 rows .* for dataset {name} in")
            rt.wait_for_log(rf"Evicted {8 - len(rows)} rows from dataset {name} \(retention\)\.")
            assert ids(rt, name) == rows, name
        time.sleep(1.5)  # later checks find nothing more to drop
        assert not lines(rt, "Failed to apply retention")
        assert len(lines(rt, r"Evicted \d+ rows")) == len(kept)


# ---------------------------------------------------------------- 6. ready_state


def _blocked(workdir: Path, **keys: Any) -> Path:
    """A dataset whose accelerator cannot open its file until `workdir/blocker` (a plain file
    where its directory should be) is removed; its source is fine. The accelerator keeps only
    ids below 3 (refresh_sql): 20 rows answer from the source, 2 from the accelerator."""
    write_parquet(workdir / "trips.parquet", trips())
    (workdir / "blocker").write_text("a file, not a directory\n")
    return write_pod(workdir, [dataset("late", "trips.parquet", engine="duckdb", mode="file",
                                       refresh_sql="SELECT id, city, fare FROM late WHERE id < 3",
                                       params={"duckdb_file": "blocker/late.duckdb"}, **keys)])


def test_ready_on_registration_answers_from_the_source_until_loaded(tmp_path: Path) -> None:
    # No retries: the accelerator loads only when asked, so every query before that reads the source.
    with run_spiced(_blocked(tmp_path, ready_state="on_registration", refresh_retry_enabled=False)) as rt:
        rt.wait_for_log(r"WARN .*Failed to load data for dataset late: ")
        assert ready_status(rt) == 200
        assert q(rt, "SELECT count(*) AS n FROM late") == [{"n": 20}]
        assert q(rt, "SELECT id, fare FROM late WHERE id = 8") == [{"id": 8, "fare": 10.0}]
        (tmp_path / "blocker").unlink()
        post_refresh(rt, "late")
        rt.wait_for_log(r"Loaded 2 rows .* for dataset late in")
        assert q(rt, "SELECT count(*) AS n FROM late") == [{"n": 2}]


def test_ready_on_registration_with_a_broken_source_fails_queries_then_loads(tmp_path: Path) -> None:
    (tmp_path / "trips.parquet").write_bytes(b"not parquet yet")
    write_pod(tmp_path, [dataset("broken", "trips.parquet", ready_state="on_registration")])
    with run_spiced(tmp_path) as rt:
        rt.wait_for_log(r"WARN .*Failed to load data for dataset broken: .*Parquet")
        assert ready_status(rt) == 200
        r = httpx.post(rt.http_url + "/v1/sql", content="SELECT count(*) FROM broken", timeout=10)
        assert r.status_code >= 400 and "broken" in r.text, r.text
        write_parquet(tmp_path / "trips.parquet", trips())
        eventually(lambda: httpx.post(rt.http_url + "/v1/sql", content="SELECT count(*) AS n FROM broken",
                                      headers={"Accept": "application/json"}, timeout=10),
                   lambda r: r.status_code == 200 and r.json() == [{"n": 20}], timeout=10)


def test_ready_on_load_is_503_until_loaded(tmp_path: Path) -> None:
    with run_spiced(_blocked(tmp_path), ready=False) as rt:
        rt.wait_for_log(r"WARN .*Failed to load data for dataset late: ")
        assert ready_status(rt) == 503
        time.sleep(1.2)  # a retry has failed too
        assert ready_status(rt) == 503
        (tmp_path / "blocker").unlink()
        eventually(lambda: ready_status(rt), lambda status: status == 200, timeout=10)
        assert lines(rt, r"Loaded 2 rows .* for dataset late in")
        assert q(rt, "SELECT count(*) AS n FROM late") == [{"n": 2}]


# ---------------------------------------------------------------- 7. retries


def test_retries_stop_as_refresh_retry_says(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    write_pod(tmp_path, [
        dataset("no_retry", "bad.parquet", refresh_retry_enabled=False),
        dataset("two_retries", "bad.parquet", engine="duckdb", refresh_retry_max_attempts=2),
        dataset("retries", "bad.parquet", engine="sqlite"),
    ])
    with run_spiced(tmp_path, metrics=True, ready=False) as rt:
        # Unlimited retries back off 1, 1, 2 s: the 4th attempt comes about 4 s after the first.
        fourth = wait_for_count(rt, r"Loading data for dataset retries$", 4, timeout=10)[3]
        time.sleep(0.7)
        assert len(loading(rt, "no_retry")) == 1
        two = loading(rt, "two_retries")
        assert len(two) == 3, two
        assert at(two[2]) < at(fourth)
        for name in ("no_retry", "two_retries", "retries"):  # repeats of one cause are DEBUG
            assert len(lines(rt, rf"WARN .*Failed to load data for dataset {name}: .*Parquet")) == 1, name
        metrics = httpx.get(rt.metrics_url + "/metrics", timeout=5).text
        assert 'dataset_load_errors_total{dataset="no_retry"} 1.0' in metrics
        assert 'dataset_load_errors_total{dataset="two_retries"} 3.0' in metrics
        assert ready_status(rt) == 503


# ---------------------------------------------------------------- 8. jitter


def test_jitter_spreads_the_refreshes(tmp_path: Path) -> None:
    write_parquet(tmp_path / "events.parquet", events([1, 2, 3]))
    write_pod(tmp_path, [
        dataset("jittered", "events.parquet", refresh_check_interval="1s", refresh_jitter_enabled=True,
                refresh_jitter_max="2s"),
        dataset("steady", "events.parquet", refresh_check_interval="1s"),
    ])
    with run_spiced(tmp_path) as rt:
        starts = [at(line) for line in wait_for_count(rt, r"Loading data for dataset jittered$", 5, timeout=20)]
        steady = [at(line) for line in loading(rt, "steady")]
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]
    assert all(1.0 <= g <= 3.5 for g in gaps), gaps
    assert max(gaps) - min(gaps) > 0.1, gaps
    steady_gaps = [(b - a).total_seconds() for a, b in zip(steady, steady[1:], strict=False)]
    assert len(steady_gaps) >= 4 and all(0.95 <= g <= 1.8 for g in steady_gaps), steady_gaps


# ---------------------------------------------------------------- 9. primary keys and indexes


def test_primary_key_refuses_duplicates_and_indexes_are_made(tmp_path: Path) -> None:
    write_parquet(tmp_path / "trips.parquet", trips())
    appending = {"refresh_mode": "append", "refresh_check_interval": "1s", "primary_key": "id"}
    indexed = {"indexes": {"city": "enabled", "(id, city)": "unique"}}
    write_pod(tmp_path, [
        dataset("pk_duck", "trips.parquet", engine="duckdb", **appending),
        dataset("pk_lite", "trips.parquet", engine="sqlite", mode="file", **appending),
        dataset("idx_duck", "trips.parquet", engine="duckdb", mode="file", **indexed),
        dataset("idx_lite", "trips.parquet", engine="sqlite", mode="file", **indexed),
    ])
    with run_spiced(tmp_path) as rt:
        for name in ("pk_duck", "pk_lite"):
            rt.wait_for_log(rf"WARN .*Failed to load data for dataset {name}: .*\(the last loaded data is kept\)")
            assert q(rt, f"SELECT count(*) AS n, count(DISTINCT id) AS ids FROM {name}") == [{"n": 20, "ids": 20}]
        expected = q(rt, "SELECT city, count(*) AS n FROM pk_duck WHERE city IN ('Seattle', 'Zürich') "
                         "GROUP BY city ORDER BY city")
        assert expected and int(str(expected[0]["n"])) >= 2
        for name in ("idx_duck", "idx_lite"):
            assert q(rt, f"SELECT city, count(*) AS n FROM {name} WHERE city IN ('Seattle', 'Zürich') "
                         "GROUP BY city ORDER BY city") == expected
        with sqlite3.connect(f"file:{tmp_path / '.spice/data/accelerated_sqlite.db'}?mode=ro", uri=True) as db:
            made = {(table, bool(unique)) for table, unique in db.execute(
                "SELECT m.tbl_name, i.\"unique\" FROM sqlite_master m JOIN pragma_index_list(m.tbl_name) i "
                "ON i.name = m.name WHERE m.type = 'index'")}
        assert {("idx_lite", False), ("idx_lite", True), ("pk_lite", True)} <= made
    import duckdb

    with duckdb.connect(str(tmp_path / ".spice/data/accelerated_duckdb.db"), read_only=True) as duck:
        made = set(duck.sql("SELECT table_name, is_unique FROM duckdb_indexes()").fetchall())
    assert {("idx_duck", False), ("idx_duck", True)} <= made

"""The engine (spiced/engine.py) in-process: dataset loading, readiness, read-only SQL."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from spiced.config import load_config
from spiced.engine import Engine
from spiced.errors import QueryError
from spiced.metrics import Metrics
from tests.support import write_pod


def engine_for(workdir: Path) -> Engine:
    engine = Engine(load_config([], workdir=workdir, environ={}).spicepod, Metrics())
    engine.datasets.register_all()
    asyncio.run(engine.datasets.load_all())
    return engine


def test_an_empty_accelerated_file_loads_and_is_ready(tmp_path: Path) -> None:
    engine = engine_for(write_pod(tmp_path, csv="id,city,fare\n"))
    assert engine.datasets.ready()
    assert engine.execute("SELECT count(*) AS n FROM trips").reader().read_all().to_pylist() == [{"n": 0}]


def test_queries_are_read_only(tmp_path: Path) -> None:
    engine = engine_for(write_pod(tmp_path))
    assert engine.execute("SELECT sum(fare) AS s FROM trips").reader().read_all().to_pylist() == [{"s": 50.75}]
    for sql in ("CREATE TABLE x AS SELECT 1", "INSERT INTO trips VALUES (4, 'Boise', 1.0)", "SET x = 1"):
        with pytest.raises(QueryError):
            engine.execute(sql)


# ------------------------------------------------------------------ plain scans of accelerated data

BIG_POD = """\
version: v1
kind: Spicepod
name: test
datasets:
  - from: file:numbers.parquet
    name: numbers
    acceleration:
      enabled: true
  - from: file:numbers.parquet
    name: numbers_file
"""


def numbers_engine(tmp_path: Path, rows: int = 200_000) -> Engine:
    ids = pa.array(range(rows), pa.int64())
    pq.write_table(pa.table({"id": ids, "half": pc.multiply(pc.cast(ids, pa.float64()), 0.5),
                             "tag": pc.cast(pc.bit_wise_and(ids, 7), pa.string())}), tmp_path / "numbers.parquet")
    return engine_for(write_pod(tmp_path, BIG_POD))


def run(engine: Engine, sql: str, timeout: float | None = None) -> pa.Table:
    stream = engine.execute(sql, timeout)
    return pa.Table.from_batches(list(stream), stream.schema)


def in_datafusion(engine: Engine, sql: str) -> pa.Table:
    return engine.ctx.sql(sql).to_arrow_table()


@pytest.mark.parametrize("sql", [
    "SELECT * FROM numbers",
    "SELECT tag, id FROM numbers",  # reordered: a projection over the scan
    "SELECT numbers.half FROM spice.public.numbers",
    "SELECT id AS half, half AS id FROM numbers",  # aliases swap names: DataFusion runs it
    "SELECT id FROM numbers WHERE id % 3 = 0",
    "SELECT id + 1 AS next FROM numbers",
    "SELECT * FROM numbers_file",  # not accelerated
])
def test_scans_answer_what_datafusion_answers(tmp_path: Path, sql: str) -> None:
    engine = numbers_engine(tmp_path)
    ours, reference = run(engine, sql), in_datafusion(engine, sql)
    assert ours.schema == reference.schema
    assert sorted_rows(ours) == sorted_rows(reference)


def sorted_rows(table: pa.Table) -> list[tuple[object, ...]]:
    # Partitions may interleave in either order; pyarrow cannot sort string_view columns.
    return sorted(zip(*(column.to_pylist() for column in table.columns), strict=True))


def test_a_plain_scan_is_served_from_the_stored_batches(tmp_path: Path) -> None:
    """No DataFusion re-slicing: the batches are the stored ones (64K rows), column-selected."""
    engine = numbers_engine(tmp_path)
    sizes = [b.num_rows for b in engine.execute("SELECT tag, id FROM numbers")]
    assert sum(sizes) == 200_000 and max(sizes) > 8192, sizes
    assert max(b.num_rows for b in engine.execute("SELECT tag, id FROM numbers_file")) <= 8192


def test_limits_are_left_to_datafusion(tmp_path: Path) -> None:
    engine = numbers_engine(tmp_path)
    assert run(engine, "SELECT id FROM numbers LIMIT 5").num_rows == 5
    assert run(engine, "SELECT id FROM numbers ORDER BY id DESC LIMIT 2").column("id").to_pylist() == [199_999, 199_998]


def test_a_refresh_is_seen_by_plain_scans(tmp_path: Path) -> None:
    engine = numbers_engine(tmp_path)
    pq.write_table(pa.table({"id": pa.array([7], pa.int64()), "extra": pa.array(["x"])}), tmp_path / "numbers.parquet")
    engine.datasets.load_one(engine.spicepod.datasets[0], refresh=True)
    assert run(engine, "SELECT * FROM numbers").to_pylist() == [{"id": 7, "extra": "x"}]


def test_queries_during_refreshes_always_find_the_table(tmp_path: Path) -> None:
    # A refresh deregisters and registers the table (DataFusion has no swap); queries planned
    # meanwhile wait for it and plan again instead of failing with "table not found".
    engine = engine_for(write_pod(tmp_path))
    ds = engine.spicepod.datasets[0]
    stop = threading.Event()
    errors: list[str] = []

    def refresh() -> None:
        while not stop.is_set():
            engine.datasets.load_one(ds, refresh=True)

    refresher = threading.Thread(target=refresh)
    refresher.start()
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                run(engine, "SELECT count(*) AS n FROM trips WHERE fare > 0")
            except QueryError as e:
                errors.append(str(e))
    finally:
        stop.set()
        refresher.join(10)
    assert errors == []


# ------------------------------------------------------------------ time limit

def test_a_query_past_its_time_limit_is_a_timeout_error(tmp_path: Path) -> None:
    engine = numbers_engine(tmp_path)
    slow = "SELECT count(*) AS n FROM generate_series(1, 100000000) g JOIN numbers n ON g.value % 1000 = n.id % 1000"
    started = time.monotonic()
    with pytest.raises(QueryError) as raised:
        run(engine, slow, timeout=0.5)
    assert raised.value.kind == "timeout" and str(raised.value) == "Query timed out after 0.5s"
    assert time.monotonic() - started < 2.0


def test_the_time_limit_is_checked_between_batches(tmp_path: Path) -> None:
    engine = numbers_engine(tmp_path)
    for sql in ("SELECT * FROM numbers", "SELECT id FROM numbers WHERE id % 2 = 0"):  # stored, DataFusion
        batches = iter(engine.execute(sql, timeout=0.2))
        next(batches)
        time.sleep(0.3)
        with pytest.raises(QueryError, match="Query timed out after 0.2s"):
            list(batches)


def test_a_query_within_its_time_limit_is_untouched(tmp_path: Path) -> None:
    engine = numbers_engine(tmp_path)
    assert run(engine, "SELECT count(*) AS n FROM numbers", timeout=30).to_pylist() == [{"n": 200_000}]
    assert run(engine, "SELECT id FROM numbers WHERE id < 3", timeout=30).num_rows == 3

"""The engine (spiced/engine.py) in-process: dataset loading, readiness, read-only SQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from spiced.config import load_config
from spiced.engine import Engine
from spiced.errors import QueryError
from spiced.metrics import Metrics
from tests.support import write_pod


def engine_for(workdir: Path) -> Engine:
    engine = Engine(load_config([], workdir=workdir, environ={}).spicepod, Metrics())
    engine.register_all()
    asyncio.run(engine.load_all())
    return engine


def test_an_empty_accelerated_file_loads_and_is_ready(tmp_path: Path) -> None:
    engine = engine_for(write_pod(tmp_path, csv="id,city,fare\n"))
    assert engine.ready()
    assert engine.execute("SELECT count(*) AS n FROM trips").reader().read_all().to_pylist() == [{"n": 0}]


def test_queries_are_read_only(tmp_path: Path) -> None:
    engine = engine_for(write_pod(tmp_path))
    assert engine.execute("SELECT sum(fare) AS s FROM trips").reader().read_all().to_pylist() == [{"s": 50.75}]
    for sql in ("CREATE TABLE x AS SELECT 1", "INSERT INTO trips VALUES (4, 'Boise', 1.0)", "SET x = 1"):
        with pytest.raises(QueryError):
            engine.execute(sql)

"""Quick queries start on the event loop (spiced/quick.py): what is learnt, and the bound on an inline
start that turns out heavy, against a real engine and the real runtime."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from spiced.config import load_config
from spiced.engine import Engine
from spiced.errors import QueryError
from spiced.interrupt import Stopper
from spiced.metrics import Metrics
from spiced.quick import QuickQueries, attempt_inline
from tests.query_rig import cancel, http_query, in_thread, wait_listed
from tests.support import Runtime, run_spiced, write_pod

SMALL = "SELECT count(*) AS n FROM generate_series(1, 1000)"
ENDLESS = "SELECT count(*) AS n FROM generate_series(1, 10000000000)"  # the same query, other literals


def test_literals_are_blanked_and_placeholders_and_names_kept() -> None:
    key = QuickQueries.key("SELECT * FROM t1 WHERE id = 4242 AND s = 'it''s' AND x > 1.5e3 AND y = $1", 7)
    assert key == (7, "SELECT * FROM t1 WHERE id = ? AND s = ? AND x > ? AND y = $1")
    assert QuickQueries.key(SMALL, 0) == QuickQueries.key(ENDLESS, 0) != QuickQueries.key(SMALL, 1)


def test_quick_runs_make_a_query_inline_and_a_slow_inline_run_ends_it() -> None:
    quick = QuickQueries(quick=0.001, slow=0.05, proven=3)
    key = quick.key("SELECT 1", 0)
    for seconds in (0.0005, 0.004, 0.0005):  # a slower run between quick ones does not count against it
        quick.record(key, seconds, inline=False)
    assert not quick.is_quick(key)
    quick.record(key, 0.0005, inline=False)
    assert quick.is_quick(key)
    quick.record(key, 0.2, inline=True)
    assert not quick.is_quick(key)
    for _ in range(10):
        quick.record(key, 0.0001, inline=False)
    assert not quick.is_quick(key)  # never again for this catalog version


def test_a_slow_run_in_a_worker_starts_the_count_again_and_old_keys_are_forgotten() -> None:
    quick = QuickQueries(quick=0.001, slow=0.05, proven=2, kept=2)
    a, b, c = (quick.key(f"SELECT {name} FROM t", 0) for name in ("a", "b", "c"))
    quick.record(a, 0.0005, inline=False)
    quick.record(a, 0.3, inline=False)
    quick.record(a, 0.0005, inline=False)
    assert not quick.is_quick(a)
    quick.record(a, 0.0005, inline=False)
    assert quick.is_quick(a)
    quick.record(b, 0.0005, inline=False)
    quick.record(c, 0.0005, inline=False)  # a is the least recently seen of three: dropped
    assert not quick.is_quick(a)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    workdir = write_pod(tmp_path_factory.mktemp("engine"))
    engine = Engine(load_config([], workdir=workdir).spicepod, Metrics())
    engine.datasets.register_all()
    asyncio.run(engine.datasets.load_all())
    yield engine
    engine.close()


def test_an_inline_attempt_returns_its_result_or_gives_up_at_its_limit(engine: Engine) -> None:
    rows = attempt_inline(lambda stopper: [b.to_pylist() for b in engine.execute(SMALL, stopper=stopper)],
                          Stopper(), 0.05)
    assert rows == [[{"n": 1000}]]
    started = time.monotonic()
    assert attempt_inline(lambda stopper: list(engine.execute(ENDLESS, stopper=stopper)), Stopper(), 0.05) is None
    assert time.monotonic() - started < 3  # DataFusion notices a stop within about a second


def test_inline_attempts_share_one_watchdog_thread(engine: Engine) -> None:
    attempt_inline(lambda stopper: list(engine.execute(SMALL, stopper=stopper)), Stopper(), 0.05)
    threads = threading.active_count()
    for _ in range(200):  # a thread per attempt (threading.Timer) would cost more than the hop it saves
        attempt_inline(lambda stopper: list(engine.execute(SMALL, stopper=stopper)), Stopper(), 0.05)
        assert threading.active_count() == threads
    assert [t.name for t in threading.enumerate()].count("query-watchdog") == 1


def test_an_attempt_that_returns_is_never_stopped_after(engine: Engine) -> None:
    """Limits about as long as the query: the alarm and the return race, and whichever wins, a
    result handed back runs on (its stopper is never stopped later)."""
    handed: list[Stopper] = []
    outcomes = {"returned": 0, "gave up": 0}

    def run(stopper: Stopper) -> list[object]:
        handed.append(stopper)
        return list(engine.execute(SMALL, stopper=stopper))

    for i in range(300):
        result = attempt_inline(run, Stopper(), random.uniform(0.0001, 0.002))
        outcomes["returned" if result is not None else "gave up"] += 1
        if result is not None:
            time.sleep(0.003)  # past the limit: a late alarm would have gone off by now
            assert handed[-1].error is None, (i, outcomes)
    assert outcomes["returned"] and outcomes["gave up"], outcomes  # the race was exercised


def test_a_cancel_during_an_inline_attempt_ends_the_query(engine: Engine) -> None:
    query = Stopper()
    cancelled = QueryError("Query 1 was cancelled", kind="cancelled")

    def stop_soon() -> None:
        time.sleep(0.2)
        query.stop(cancelled)

    canceller = in_thread(stop_soon)
    with pytest.raises(QueryError) as raised:
        attempt_inline(lambda stopper: list(engine.execute(ENDLESS, stopper=stopper)), query, 30.0)
    assert raised.value is cancelled
    canceller.wait()


def test_a_learnt_query_that_turns_heavy_holds_the_server_briefly_then_runs_off_the_loop(tmp_path: Path) -> None:
    with run_spiced(write_pod(tmp_path), "-v") as rt, httpx.Client(base_url=rt.http_url, timeout=30) as http:
        learnt = re.escape(f"Quick query, started on the event loop from now on: {QuickQueries.key(SMALL, 0)[1]}")
        deadline = time.monotonic() + 60
        while not re.search(learnt, "\n".join(rt.logs())):  # a busy machine may need more than PROVEN runs
            assert http.post("/v1/sql", content=SMALL).json() == [{"n": 1000}]
            assert time.monotonic() < deadline, "the quick query was never learnt"
        heavy = http_query(rt, ENDLESS)
        time.sleep(0.2)
        started = time.monotonic()
        assert http.get("/health").status_code == 200
        assert time.monotonic() - started < 3, "the heavy query held the event loop"
        listed = wait_listed(rt, ENDLESS)
        rt.wait_for_log(rf"Query {listed['query_id']} took over 0.05s on the event loop; started again in a worker")
        assert cancel(rt, listed["query_id"]).status_code == 200
        response = heavy.wait(15).value
        assert (response.status_code, response.text) == (499, f"Query {listed['query_id']} was cancelled")
        assert http.post("/v1/sql", content=SMALL).json() == [{"n": 1000}]
        assert _still_serves(rt)


def _still_serves(rt: Runtime) -> bool:
    return httpx.get(rt.http_url + "/v1/ready", timeout=10).status_code == 200

"""spiced/interrupt.py and its use by spiced/engine.py's QueryStream: a stop ends a query whether its
thread is blocked in DataFusion (untimed: the interrupt), waiting on the wait loop (timed), or
between batches; and an interrupt never goes off outside `Stopper.call`."""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time

import psutil
import pytest

from spiced.config import load_config
from spiced.engine import Engine
from spiced.errors import QueryError
from spiced.interrupt import Interrupted, Stopped, Stopper, Watchdog, bounded_call
from spiced.metrics import Metrics
from tests.support import write_pod

LONG = "SELECT count(*) AS n FROM generate_series(1, 10000000000)"


def cancelled() -> QueryError:
    return QueryError("Query x was cancelled", kind="cancelled")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    e = Engine(load_config([], workdir=write_pod(tmp_path_factory.mktemp("interrupt"))).spicepod, Metrics())
    e.datasets.register_all()
    asyncio.run(e.datasets.load_all())
    return e


def process_cpu() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def run_until_stopped(engine: Engine, timeout: float | None) -> tuple[QueryError, float]:
    """Start LONG in a thread, stop it once it is busy; the error it ended with and how long that took."""
    stopper, ended = Stopper(), queue.Queue[QueryError]()

    def run() -> None:
        try:
            list(engine.execute(LONG, timeout, stopper=stopper))
        except QueryError as e:
            ended.put(e)

    threading.Thread(target=run, daemon=True).start()
    time.sleep(0.5)
    before = process_cpu()
    time.sleep(0.5)
    assert process_cpu() - before > 0.3, "the query is not running"
    stopped_at = time.monotonic()
    assert stopper.stop(cancelled())
    assert not stopper.stop(cancelled())  # the first stop wins
    error = ended.get(timeout=5)
    return error, time.monotonic() - stopped_at


@pytest.mark.parametrize("timeout", [None, 600.0], ids=["untimed", "timed"])
def test_a_stop_ends_a_query_still_computing_its_first_batch(engine: Engine, timeout: float | None) -> None:
    error, took = run_until_stopped(engine, timeout)
    assert (error.kind, str(error)) == ("cancelled", "Query x was cancelled")
    # Untimed: within the binding's one-second wake-up; timed: the wait is cancelled at once.
    assert took < (1.5 if timeout is None else 0.3), took
    before = process_cpu()
    time.sleep(1.0)
    assert process_cpu() - before < 0.2, "DataFusion kept computing after the stop"


def test_a_query_past_its_time_limit_stops_computing(engine: Engine) -> None:
    """The timed-out wait leaves nothing that keeps the stream alive (no cycle through the waited
    future and its exception's traceback, which only the garbage collector would free)."""
    with pytest.raises(QueryError, match="^Query timed out after 0.5s$"):
        list(engine.execute(LONG, 0.5))
    time.sleep(0.2)
    before = process_cpu()
    time.sleep(1.0)
    assert process_cpu() - before < 0.2, "DataFusion kept computing after the timeout"


def test_a_stop_between_batches_ends_the_stream(engine: Engine) -> None:
    for sql in ("SELECT * FROM trips", "SELECT value FROM generate_series(1, 100000)"):  # stored, DataFusion
        stopper = Stopper()
        batches = iter(engine.execute(sql, stopper=stopper))
        next(batches)
        stopper.stop(cancelled())
        with pytest.raises(QueryError, match="^Query x was cancelled$"):
            list(batches)


def test_a_query_stopped_before_it_starts_never_runs(engine: Engine) -> None:
    stopper = Stopper()
    stopper.stop(cancelled())
    with pytest.raises(QueryError, match="^Query x was cancelled$"):
        list(engine.execute(LONG, stopper=stopper))


def test_python_code_in_a_call_is_interrupted_at_once() -> None:
    stopper, entered = Stopper(), threading.Event()
    result: queue.Queue[object] = queue.Queue()

    def spin() -> None:
        entered.set()
        while True:
            pass

    def run() -> None:
        try:
            stopper.call(spin)
        except Stopped as e:
            result.put(e.error)

    threading.Thread(target=run, daemon=True).start()
    assert entered.wait(5)
    stopper.stop(cancelled())
    assert str(result.get(timeout=2)) == "Query x was cancelled"


def test_an_interrupt_never_goes_off_outside_the_call(engine: Engine) -> None:
    """Stops land at random moments around short queries: each query either completes or ends
    cancelled, and no interrupt escapes into the code that runs after it."""
    stoppers: queue.Queue[Stopper | None] = queue.Queue()

    def stop_soon() -> None:
        while (stopper := stoppers.get()) is not None:
            time.sleep(random.random() * 0.0005)
            stopper.stop(cancelled())

    threading.Thread(target=stop_soon, daemon=True).start()
    ended = {"done": 0, "cancelled": 0, "interrupted mid-call": 0}
    try:
        for _ in range(1500):
            stopper = Stopper()
            stoppers.put(stopper)
            try:
                list(engine.execute("SELECT 1", stopper=stopper))
                ended["done"] += 1
            except QueryError as e:
                assert e.kind == "cancelled"
                ended["cancelled"] += 1
            ended["interrupted mid-call"] += stopper._interrupt_sent
            for _ in range(100):  # Python code where an escaped interrupt would go off
                sum(range(10))
    except Interrupted:
        pytest.fail(f"an interrupt escaped its call after {ended}")
    finally:
        stoppers.put(None)
    assert ended["interrupted mid-call"] > 0, ended  # the race was exercised


def test_the_watchdog_stops_each_query_at_its_own_time() -> None:
    watchdog, start = Watchdog("test-watchdog"), time.monotonic()
    stopped: list[tuple[str, float]] = []
    for name, after in (("c", 0.3), ("a", 0.1), ("b", 0.2), ("never", 0.15)):
        stopper = Stopper()
        stopper.on_stop(lambda name=name: stopped.append((name, time.monotonic() - start)))
        alarm = watchdog.arm(start + after, stopper, cancelled())
        if name == "never":
            assert watchdog.disarm(alarm)
    time.sleep(0.6)
    assert [name for name, _ in stopped] == ["a", "b", "c"]
    assert all(at >= after for (_, at), after in zip(stopped, (0.1, 0.2, 0.3), strict=True))
    assert not watchdog.disarm(alarm)  # an alarm already disarmed stays so
    assert [t.name for t in threading.enumerate()].count("test-watchdog") >= 1


def test_disarmed_alarms_do_not_pile_up() -> None:
    """Time limits are long and almost every query ends first: their alarms must not be kept until due."""
    watchdog = Watchdog("test-watchdog")
    for _ in range(10_000):
        watchdog.disarm(watchdog.arm(time.monotonic() + 3600, Stopper(), cancelled()))
    assert watchdog.pending() <= 200


def test_a_bounded_call_is_stopped_at_its_deadline() -> None:
    def spin() -> None:
        while True:
            time.sleep(0.001)

    stopper, began = Stopper(), time.monotonic()
    with pytest.raises(Stopped):
        bounded_call(stopper, began + 0.2, QueryError("timed out", kind="timeout"), spin)
    assert 0.2 <= time.monotonic() - began < 2
    assert stopper.error is not None and stopper.error.kind == "timeout"
    assert bounded_call(Stopper(), time.monotonic() + 5, cancelled(), lambda: 7) == 7

"""What making a query stoppable costs: `SELECT 1` through `Engine.execute` and iteration, per query.

    python -m bench.first_batch [RUNS]     (default 2000 runs of each variant, interleaved; medians)

Variants: `direct` is `Engine.execute` without a time limit with `Stopper.call` patched to call
straight through (the fetch path before cancels existed); `stoppable` is the same unpatched (every
blocking fetch runs through `Stopper.call`: what an untimed query pays for `POST /v1/sql/{id}/cancel`);
`wait loop` adds a time limit, so the first batch is awaited on the engine's wait loop (what every
query would pay if cancels were routed through the wait loop). Deltas are against `direct`.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from spiced.config import load_config
from spiced.engine import Engine
from spiced.interrupt import Stopper
from spiced.metrics import Metrics
from tests.support import write_pod


def _medians_ms(variants: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Each variant once per round, in turn (so load changes hit them alike); median per variant."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(runs + runs // 10):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if round_ >= runs // 10:  # the first tenth warms up
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(times) * 1000 for name, times in samples.items()}


def main(runs: int = 2000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(load_config([], workdir=write_pod(Path(tmp))).spicepod, Metrics())
        engine.datasets.register_all()
        asyncio.run(engine.datasets.load_all())
        stoppable = Stopper.call

        def direct() -> object:
            Stopper.call = lambda self, fn, *args: fn(*args)  # type: ignore[method-assign]
            try:
                return list(engine.execute("SELECT 1"))
            finally:
                Stopper.call = stoppable  # type: ignore[method-assign]

        variants: dict[str, Callable[[], object]] = {
            "direct": direct,
            "stoppable": lambda: list(engine.execute("SELECT 1")),
            "wait loop": lambda: list(engine.execute("SELECT 1", timeout=3600.0)),
        }
        medians = _medians_ms(variants, runs)
        engine.close()
    for name, ms in medians.items():
        print(f"{name:>10}: {ms:.4f} ms per query, median ({ms - medians['direct']:+.4f} ms against direct)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)

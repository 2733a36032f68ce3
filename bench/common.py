"""Shared pieces of the benchmarks: generated data, a spiced launcher, medians and the report table."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent / "out"


def big_table(rows: int, start: int = 0) -> pa.Table:
    """`rows` rows of the generated data from id `start` on: int64 id, 1000 groups, float64, string,
    a timestamp that grows with the id (one second a row), nulls."""
    ids = pa.array(range(start, start + rows), pa.int64())
    return pa.table({
        "id": ids,
        "grp": pc.cast(pc.bit_wise_and(ids, 1023), pa.int32()),
        "amount": pc.multiply(pc.cast(ids, pa.float64()), 0.25),
        "label": pc.binary_join_element_wise(pa.scalar("item-"), pc.cast(pc.bit_wise_and(ids, 1023), pa.string()), ""),
        "ts": pc.cast(pc.add(pc.multiply(ids, 1_000_000), 1_700_000_000_000_000), pa.timestamp("us")),
        "maybe": pc.if_else(pc.equal(pc.bit_wise_and(ids, 7), 0), pa.scalar(None, pa.int64()), ids),
    })


def big_parquet(rows: int) -> Path:
    """The generated data as a parquet file (cached in bench/out)."""
    OUT.mkdir(exist_ok=True)
    path = OUT / f"big_{rows}.parquet"
    if path.exists():
        return path
    pq.write_table(big_table(rows), path, row_group_size=256 * 1024)
    return path


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _pin(pid: int, cpus: set[int], *, descendants: bool) -> None:
    """Every thread of `pid`, and of its descendants if asked: setting a process's affinity moves
    only its main thread, and threads that already exist keep their own mask."""
    root = psutil.Process(pid)
    for proc in (root, *(root.children(recursive=True) if descendants else ())):
        for thread in proc.threads():
            try:
                os.sched_setaffinity(thread.id, cpus)
            except ProcessLookupError:
                pass  # a thread that ended meanwhile


@contextmanager
def split_cores(servers: Sequence[int]) -> Iterator[bool]:
    """The server processes on one half of this process's CPUs, this process (the client) on the
    other half, until the block ends. Yields False, changing nothing, where that is not possible."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        yield False
        return
    half = len(cpus) // 2
    client, server = set(cpus[:half]), set(cpus[half:])
    try:
        for pid in servers:
            _pin(pid, server, descendants=True)
        _pin(os.getpid(), client, descendants=False)  # the servers are this process's children
        yield True
    finally:
        for pid in (*servers, os.getpid()):
            try:
                _pin(pid, set(cpus), descendants=pid != os.getpid())
            except psutil.NoSuchProcess:
                pass


@dataclass
class Row:
    name: str
    ours: float
    reference: float
    unit: str
    target: str
    higher_is_better: bool = False

    @property
    def ratio(self) -> float:
        return self.ours / self.reference if self.reference else float("nan")


def report(title: str, rows: list[Row]) -> None:
    print(f"\n== {title}")
    print(f"{'measure':58} {'ours':>12} {'reference':>12} {'ratio':>7}  target")
    for r in rows:
        print(f"{r.name:58} {r.ours:>12.4g} {r.reference:>12.4g} {r.ratio:>7.2f}  {r.target} ({r.unit})")

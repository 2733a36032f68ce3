"""Shared pieces of the benchmarks: generated data, a spiced launcher, medians and the report table."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent / "out"


def big_parquet(rows: int) -> Path:
    """A generated parquet file (cached in bench/out): int64 id, 1000 groups, float64, string, timestamp, nulls."""
    OUT.mkdir(exist_ok=True)
    path = OUT / f"big_{rows}.parquet"
    if path.exists():
        return path
    ids = pa.array(range(rows), pa.int64())
    table = pa.table({
        "id": ids,
        "grp": pc.cast(pc.bit_wise_and(ids, 1023), pa.int32()),
        "amount": pc.multiply(pc.cast(ids, pa.float64()), 0.25),
        "label": pc.binary_join_element_wise(pa.scalar("item-"), pc.cast(pc.bit_wise_and(ids, 1023), pa.string()), ""),
        "ts": pc.cast(pc.add(pc.multiply(ids, 1_000_000), 1_700_000_000_000_000), pa.timestamp("us")),
        "maybe": pc.if_else(pc.equal(pc.bit_wise_and(ids, 7), 0), pa.scalar(None, pa.int64()), ids),
    })
    pq.write_table(table, path, row_group_size=256 * 1024)
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

"""Benchmark: our Arrow-native JSON encoder against DataFusion's own JSON writer and row-by-row Python.

    .venv/bin/python -m bench.http_json [--rows 1000000] [--runs 5]

All three encode the same 1M-row result (int, float, string with some quotes, timestamp, and a
column that is null in a fifth of the rows), each including the query execution that produces
it, and ours batched as `/v1/sql` batches it. Medians of wall and CPU time (all threads) are
printed with their ratios to DataFusion; the target (issue 2) is within 2x of
`DataFrame.write_json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from datafusion import SessionContext

from spiced.batches import coalesce
from spiced.http.encode_json import JsonEncoder

QUERY = """
SELECT value AS id,
       random() * 1000 AS amount,
       CASE WHEN value % 100 = 0 THEN concat('say "hi" ', value) ELSE concat('name-', value % 977) END AS label,
       to_timestamp_seconds(1700000000 + value) AS created,
       CASE WHEN value % 5 = 0 THEN NULL ELSE value * 1.5 END AS maybe
FROM generate_series(1, {rows})
"""


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads of the process: DataFusion runs on its own)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    ctx = SessionContext()
    table = ctx.sql(QUERY.format(rows=args.rows)).to_arrow_table()
    ctx.register_record_batches("t", [table.to_batches()])
    sql = "SELECT * FROM t"

    def ours() -> int:
        df = ctx.sql(sql)
        encoder = JsonEncoder(df.schema())
        size = 0
        for batch in coalesce(b.to_pyarrow() for b in df.execute_stream()):  # as /v1/sql does
            size += sum(len(chunk) for chunk in encoder.batch(batch))  # views of Arrow buffers, as sent
        return size + 2

    out_dir = Path(tempfile.mkdtemp(prefix="bench-json-"))

    def datafusion_writer() -> None:
        ctx.sql(sql).write_json(str(out_dir / f"out-{time.perf_counter_ns()}.json"))

    def python_rows() -> int:
        rows = ctx.sql(sql).to_arrow_table().to_pylist()
        text = json.dumps([{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items() if v is not None}
                           for r in rows], separators=(",", ":"))
        return len(text)

    size = ours()
    # Interleaved rounds, so a busy machine slows all of them alike; CPU time is reported too
    # because it hardly depends on what else the machine is doing.
    rounds: dict[str, list[tuple[float, float]]] = {"ours": [], "datafusion": [], "python": []}
    for i in range(args.runs):
        rounds["ours"].append(_timed(ours))
        rounds["datafusion"].append(_timed(datafusion_writer))
        if i < max(1, args.runs // 3):
            rounds["python"].append(_timed(python_rows))
    wall = {k: statistics.median(t[0] for t in v) for k, v in rounds.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in rounds.items()}
    print(f"rows: {args.rows:,}  JSON bytes: {size:,}  runs: {args.runs}")
    print(f"{'encoder':<36}{'wall s':>8}{'ratio':>8}{'cpu s':>8}{'ratio':>8}")
    for key, name in (("ours", "spiced JsonEncoder (Arrow-native)"), ("datafusion", "DataFusion write_json"),
                      ("python", "to_pylist + json.dumps")):
        print(f"{name:<36}{wall[key]:>8.3f}{wall[key] / wall['datafusion']:>7.2f}x"
              f"{cpu[key]:>8.3f}{cpu[key] / cpu['datafusion']:>7.2f}x")
    print(f"to_pylist + json.dumps is {wall['python'] / wall['ours']:.1f}x slower than ours (wall)")


if __name__ == "__main__":
    main()

"""Regenerate data/taxi_trips.parquet, the small deterministic sample served by `make run`."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = 5000


def main() -> None:
    rng = random.Random(42)
    start = datetime(2024, 1, 1)
    pickup = [start + timedelta(minutes=rng.randint(0, 60 * 24 * 30)) for _ in range(ROWS)]
    minutes = [rng.randint(3, 55) for _ in range(ROWS)]
    distance = [round(m * rng.uniform(0.15, 0.45), 2) for m in minutes]
    table = pa.table({
        "trip_id": pa.array(range(1, ROWS + 1), pa.int64()),
        "pickup_datetime": pa.array(pickup, pa.timestamp("us")),
        "dropoff_datetime": pa.array([p + timedelta(minutes=m) for p, m in zip(pickup, minutes, strict=True)],
                                     pa.timestamp("us")),
        "passenger_count": pa.array([rng.choice([1, 1, 1, 2, 2, 3, 4, None]) for _ in range(ROWS)], pa.int32()),
        "trip_distance": pa.array(distance, pa.float64()),
        "payment_type": pa.array([rng.choice(["card", "card", "cash", "app"]) for _ in range(ROWS)]),
        "fare_amount": pa.array([round(3.0 + d * 2.5 + m * 0.35, 2) for d, m in zip(distance, minutes, strict=True)],
                                pa.float64()),
        "tip_amount": pa.array([round(rng.uniform(0, 6), 2) for _ in range(ROWS)], pa.float64()),
        "borough": pa.array([rng.choice(["Manhattan", "Brooklyn", "Queens", "Bronx", "Staten Island"])
                             for _ in range(ROWS)]),
    })
    out = Path(__file__).resolve().parent.parent / "data" / "taxi_trips.parquet"
    pq.write_table(table, out, compression="zstd")
    print(f"wrote {out} ({table.num_rows} rows)")


if __name__ == "__main__":
    main()

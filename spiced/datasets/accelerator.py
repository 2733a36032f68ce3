"""What every accelerator (arrow, duckdb, sqlite) does for the dataset lifecycle: hold what a
refresh read, in place of or after what it held, and say what it holds."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa
from sqlglot import exp

from .time_filter import Value


@dataclass(frozen=True, slots=True)
class Written:
    rows: int  # rows written by this refresh
    nbytes: int  # their size as Arrow


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A dataset's data left in an accelerator file by an earlier run."""

    updated_at: dt.datetime  # UTC: when its last refresh finished


class Accelerator(Protocol):
    @property
    def dialect(self) -> str | None:
        """The SQL its conditions are written in (None: DataFusion's)."""

    def replace(self, name: str, reader: pa.RecordBatchReader) -> Written:
        """Hold what `reader` gives as `name`, in place of what was held, in one step for queries."""

    def append(self, name: str, reader: pa.RecordBatchReader) -> Written:
        """Add what `reader` gives to `name` (which is held)."""

    def holds(self, name: str) -> bool:
        """Whether `name` has been written (by this run, or by an earlier one in file mode)."""

    def newest(self, name: str, column: str) -> Value | None:
        """The largest value of `column` held for `name`."""

    def time_unit(self, name: str, column: str) -> str:
        """The unit (`s`, `ms`, `us`, `ns`) of a timestamp column held for `name`; `us` otherwise."""

    def delete(self, name: str, condition: exp.Expression) -> int:
        """Drop the rows of `name` for which `condition` (SQL over its columns) is true; how many."""

    def checkpoint(self, name: str) -> Checkpoint | None:
        """The earlier run's data for `name`, registered for queries; None when there is none."""

    def forget(self, name: str) -> None:
        """`name` left the spicepod: no longer served (a file keeps its table)."""

    def close(self) -> None:
        """The runtime is stopping: release files and connections."""

"""What every data connector gives the runtime, and what a connector that speaks SQL adds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import pyarrow as pa
from datafusion import SessionContext

from .params import Checked, Spec


class Source(Protocol):
    """Where a dataset's rows come from."""

    def register(self, ctx: SessionContext, name: str) -> None:
        """Make `name` read the source at query time (a dataset without acceleration)."""

    def read(self, ctx: SessionContext) -> pa.RecordBatchReader:
        """Every row, for an accelerator to hold."""

    def close(self) -> None:
        """Release connections; the runtime is stopping."""


@runtime_checkable
class SqlSource(Source, Protocol):
    """A source that runs SQL itself (a database): queries on it are federated, with as much of
    each query as it can take sent to it (spiced/federation.py)."""

    dialect: str  # datafusion.unparser.Dialect and sqlglot dialect name
    key: str  # the database it reaches: queries touching only sources with one key go to it whole
    table: tuple[str, ...]  # the table's name at the source, part by part
    # Columns the source cannot compare or compute on as DataFusion does (SQLite holds timestamps
    # as text): nothing that reads them is sent to the source, DataFusion does it on fetched rows.
    opaque_columns: frozenset[str]

    def schema(self) -> pa.Schema:
        """The table's Arrow schema as this source reads it."""

    def query(self, sql: str) -> pa.RecordBatchReader:
        """Run `sql` (in `dialect`) at the source."""


@dataclass(frozen=True, slots=True)
class Connector:
    """One `from:` scheme: its parameters, how a dataset's options are parsed (once, at startup)
    and how a source is opened from them (at load, and again on a retry)."""

    spec: Spec
    options: Callable[[str, Checked, Path], object]  # (text after `<scheme>:`, params, workdir) -> options
    open: Callable[[object], Source]


class SourceError(Exception):
    """A source that cannot be reached or read; the message names the dataset's source and why."""

"""The SQL engine: one DataFusion session holding the spicepod's datasets and views.

Read-only by construction (DDL, DML and statements are refused by DataFusion's SQLOptions);
results leave as Arrow record-batch streams, never as one collected Python object. Datasets are
loaded and kept by `spiced.datasets`; queries that read a database in place go through
`spiced.federation`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pyarrow as pa
from datafusion import DataFrame, SessionConfig, SessionContext, SQLOptions

from .batches import PLAIN_ARROW_TYPES, plain_schema
from .config import Spicepod
from .datasets.arrow_store import ArrowStore
from .datasets.lifecycle import Datasets
from .errors import QueryError, engine_error
from .federation import Federation
from .interrupt import Stopped, Stopper
from .metrics import Metrics
from .stream import Deadline, QueryStream, WaitLoop

READ_ONLY = SQLOptions().with_allow_ddl(False).with_allow_dml(False).with_allow_statements(False)

T = TypeVar("T")
Params = Mapping[str, Any]  # placeholder name ("1", "name") → Python value or pyarrow scalar


def session_config() -> SessionConfig:
    config = (SessionConfig()
              .with_default_catalog_and_schema("spice", "public")
              .with_create_default_catalog_and_schema(True)
              .with_information_schema(True))
    for key, value in PLAIN_ARROW_TYPES.items():
        config = config.set(key, value)
    return config


class Engine:
    def __init__(self, spicepod: Spicepod, metrics: Metrics) -> None:
        self.ctx = SessionContext(session_config())
        self.spicepod = spicepod
        self.metrics = metrics
        self.store = ArrowStore(self.ctx)
        self.federation = Federation(self.ctx, spicepod, session_config)
        self.datasets = Datasets(spicepod, self.ctx, self.store, self.federation, metrics)
        self._loop = WaitLoop()

    def close(self) -> None:
        """After the drain: queries are over."""
        self._loop.stop()
        self.datasets.close()

    def plan(self, sql: str, params: Params | None = None) -> DataFrame:
        """Plan one read-only statement; planning errors become QueryError with DataFusion's text.

        `params` binds placeholders: `$1`, `$2` by the keys "1", "2"; `$name` and `:name` by "name".
        Values are Python values or pyarrow scalars (which keep their Arrow type)."""
        swaps = self.store.swaps
        try:
            return self._plan(sql, params)
        except QueryError:
            if swaps % 2 == 0 and swaps == self.store.swaps:
                raise
        self.store.wait_for_swap()  # a table was being replaced meanwhile: plan again once it is back
        return self._plan(sql, params)

    def _plan(self, sql: str, params: Params | None) -> DataFrame:
        try:
            return self.ctx.sql_with_options(sql, READ_ONLY, param_values=dict(params) if params else None)
        except Exception as e:
            raise engine_error(e) from None

    def schema(self, sql: str, params: Params | None = None) -> pa.Schema:
        return plain_schema(self.plan(sql, params).schema())

    def execute(self, sql: str, timeout: float | None = None, params: Params | None = None,
                stopper: Stopper | None = None) -> QueryStream:
        """Plan and start executing; errors raised before the first batch are QueryErrors.

        With a `timeout` (seconds from now), a batch not ready by then ends the query with a
        QueryError of kind `timeout`; `stopper.stop(error)` ends it with `error` (a cancel). Either
        way the query stops running (see `QueryStream`)."""
        stopper = stopper or Stopper()
        df = self.plan(sql, params)
        deadline = Deadline(timeout, self._loop.get()) if timeout is not None else None
        stored = self.store.stored_scan(df)
        if stored is not None:
            return QueryStream(df.schema(), stored, deadline, stopper)
        try:
            federated = _bounded(stopper, deadline, self.federation.run, df, sql, params)
            if federated is not None:
                return QueryStream(df.schema(), federated, deadline, stopper)
            stream = stopper.call(df.execute_stream)
        except Stopped as e:
            raise e.error from None
        except QueryError:
            raise
        except Exception as e:
            raise engine_error(e) from None
        return QueryStream(df.schema(), stream, deadline, stopper)

    def table_schema(self, name: str) -> pa.Schema | None:
        try:
            return plain_schema(self.ctx.table(name).schema())
        except Exception:
            return None


def _bounded(stopper: Stopper, deadline: Deadline | None, fn: Callable[..., T], *args: object) -> T:
    """`stopper.call(fn, *args)`, stopped with the time-limit error if the deadline passes first
    (a database's first batch: its driver is asked to cancel, spiced.connectors.sql_source)."""
    if deadline is None:
        return stopper.call(fn, *args)
    timer = threading.Timer(max(0.0, deadline.at - time.monotonic()), stopper.stop, (deadline.error(),))
    timer.daemon = True
    timer.start()
    try:
        return stopper.call(fn, *args)
    finally:
        timer.cancel()

"""One query's bookkeeping, the same on every protocol (HTTP, Flight raw SQL, Flight SQL): listed as
active while it runs (spiced.queries), counted in the query_* metrics, and, if it fails, one WARN
line for operators.

`err_code` (the `query_failures` label) is upstream's vocabulary for engine failures, from the
QueryError kind the engine assigned (spiced.errors):

    syntax → SyntaxError                 planning → QueryPlanningError
    execution → QueryExecutionError      resources_exhausted → ResourcesExhausted
    unsupported, internal → InternalError

plus codes of our own where upstream's are unknown: `QueryTimeout` (runtime.query.timeout),
`QueryCancelled` (POST /v1/sql/{id}/cancel) and `Cancelled` (the client went away or cancelled
the call before the last batch).

The failure line, on the `runtime::query` target (one line; the error text JSON-quoted, so a
multi-line DataFusion error stays on it):

    WARN runtime::query: Query failed query_id=0198… protocol=http err_code=QueryPlanningError
         client_subject="CN=client" client_fingerprint=1f2e… error="table 'spice.public.nope' not found"

`client_subject`/`client_fingerprint` appear when the client presented a verified certificate.
"""

from __future__ import annotations

import json
import logging
import time

from .errors import QueryError, QueryErrorKind
from .identity import ClientIdentity
from .interrupt import Stopper
from .queries import ActiveQuery, Protocol
from .state import RuntimeState

log = logging.getLogger("runtime.query")

ERR_CODES: dict[QueryErrorKind, str] = {
    "syntax": "SyntaxError",
    "planning": "QueryPlanningError",
    "execution": "QueryExecutionError",
    "resources_exhausted": "ResourcesExhausted",
    "unsupported": "InternalError",
    "internal": "InternalError",
    "timeout": "QueryTimeout",
    "cancelled": "QueryCancelled",
    "disconnected": "Cancelled",
    "not_cached": "NotCached",
    "unavailable": "ClusterUnavailable",
}
DISCONNECTED = "The client went away before the last batch"


def disconnected() -> QueryError:
    return QueryError(DISCONNECTED, kind="disconnected")


class QueryTracker:
    """From the moment a query is accepted until `finish` (which counts once, whichever way and
    however often it is called). Planning is part of `query_duration_ms`; `query_execution_duration_ms`
    runs from `executing()` (the engine has planned and started it) to the end."""

    def __init__(self, state: RuntimeState, protocol: Protocol, sql: str,
                 identity: ClientIdentity | None = None) -> None:
        self._state = state
        self._labels = {"protocol": protocol}
        self._identity = identity
        self.query: ActiveQuery = state.queries.start(protocol, sql)
        self._started = time.perf_counter()
        self._executing: float | None = None
        self._finished = False
        state.metrics.query_executions.add(1, self._labels)
        state.metrics.query_active.add(1, self._labels)

    @property
    def stopper(self) -> Stopper:
        return self.query.stopper

    @property
    def finished(self) -> bool:
        return self._finished

    def executing(self) -> None:
        self._executing = time.perf_counter()

    def finish(self, rows: int = 0, error: QueryError | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        self._state.queries.end(self.query)
        now = time.perf_counter()
        m = self._state.metrics
        m.query_active.add(-1, self._labels)
        m.query_duration.record((now - self._started) * 1000, self._labels)
        if self._executing is not None:
            m.query_execution_duration.record((now - self._executing) * 1000, self._labels)
        if rows:
            m.query_returned_rows.add(rows)
        if error is not None:
            code = ERR_CODES[error.kind]
            m.query_failures.add(1, {**self._labels, "err_code": code})
            log.warning("Query failed query_id=%s protocol=%s err_code=%s%s error=%s", self.query.id,
                        self._labels["protocol"], code,
                        f" {self._identity.log_fields()}" if self._identity is not None else "",
                        json.dumps(str(error), ensure_ascii=False))

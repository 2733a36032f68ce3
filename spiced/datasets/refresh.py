"""What one refresh reads from a dataset's source: every row, or what `refresh_sql`, the
`refresh_data_window` and an append's "newer than what is held" leave of them.

The filters run at the source: a database gets them in its own SQL (as federated queries do);
files, object stores and HTTP are read through DataFusion, which pushes them into its scan.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
from datafusion import SessionConfig, SessionContext
from sqlglot import exp

from ..acceleration import check_refresh_sql
from ..batches import conformed
from ..connectors.base import Source, SqlSource
from ..federation import rename_tables
from ..plans import READ_ONLY


def refresh_query(dataset: str, refresh_sql: str | None, conditions: list[exp.Expression]) -> exp.Select | None:
    """The statement a refresh runs against the source (None: read every row)."""
    if refresh_sql is None and not conditions:
        return None
    select = check_refresh_sql(refresh_sql, dataset) if refresh_sql else \
        exp.select("*").from_(exp.to_table(dataset, quoted=True))
    for condition in conditions:
        select = select.where(condition, append=True)  # ANDed with refresh_sql's own WHERE
    return select


def read_source(dataset: str, source: Source, query: exp.Select | None, ctx: SessionContext,
                config: Callable[[], SessionConfig]) -> pa.RecordBatchReader:
    """The rows `query` selects from `source` (all of them when it is None)."""
    if query is None:
        return source.read(ctx)
    if isinstance(source, SqlSource):
        text = rename_tables(query, source.dialect, {dataset: source.table})
        schema = source.schema()
        reader = source.query(text)
        selected = pa.schema([schema.field(name) for name in reader.schema.names if name in schema.names])
        return pa.RecordBatchReader.from_batches(selected, conformed(iter(reader), selected))
    qctx = SessionContext(config())
    source.register(qctx, dataset)
    df = qctx.sql_with_options(query.sql(), READ_ONLY)
    return pa.RecordBatchReader.from_stream(df)

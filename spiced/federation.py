"""Queries over databases read in place (federation): as much of each query as a source can run
is sent to it, in its own SQL dialect.

- A query whose tables all live in one database is sent to it whole: DataFusion's unparser
  writes the planned query in the source's dialect, and sqlglot puts the source's table names in
  place of the dataset names. Its result is cast to the schema DataFusion planned, so clients see
  the same types whichever way a query ran.
- Any other query (tables from several places, or SQL the source refuses) runs in DataFusion.
  Each database table it reads is fetched once, with only the columns the query needs and the
  filters (and limit) DataFusion pushed down to it, into a per-query session where the query is
  planned again.

Planning needs each table's schema: `spiced.datasets` registers an empty table with the source's
schema under the dataset's name and tells the federation which source stands behind it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import sqlglot
from datafusion import DataFrame, LogicalPlan, SessionConfig, SessionContext
from datafusion.expr import Filter, TableScan
from datafusion.unparser import Dialect, Unparser
from sqlglot import exp
from sqlglot.errors import ErrorLevel

from .batches import conformed
from .config import Spicepod
from .connectors.base import Source, SqlSource
from .plans import READ_ONLY, dataset_name, scanned

log = logging.getLogger("runtime.federation")


@dataclass
class _Reads:
    """What one query reads of one federated table, over all the places it appears."""

    columns: set[str] = field(default_factory=set)
    predicates: list[exp.Expression | None] = field(default_factory=list)
    fetch: int | None = None


class Federation:
    def __init__(self, ctx: SessionContext, spicepod: Spicepod, config: Callable[[], SessionConfig]) -> None:
        self.ctx = ctx
        self.spicepod = spicepod
        self._config = config
        self._sources: dict[str, SqlSource] = {}
        self._lock = threading.Lock()

    def add(self, name: str, source: SqlSource) -> None:
        with self._lock:
            self._sources[name] = source

    def remove(self, name: str) -> None:
        with self._lock:
            self._sources.pop(name, None)

    def run(self, df: DataFrame, sql: str, params: Mapping[str, Any] | None) -> Iterator[pa.RecordBatch] | None:
        """The query's batches when it reads a federated table, None when it reads none."""
        with self._lock:
            sources = dict(self._sources)
        if not sources:
            return None
        optimized = df.optimized_logical_plan()
        reading = _scanned_names(optimized, sources) | _scanned_names(df.logical_plan(), sources)
        if not reading:
            return None
        target = df.schema()
        keys = {sources[name].key for name in reading}
        if len(keys) == 1 and _only_federated_scans(df.logical_plan(), sources):
            whole = self._whole(df.logical_plan(), sources, reading, target)
            if whole is not None:
                return whole
        return self._per_table(optimized, sql, params, sources, reading, target)

    def from_sources(self, sql: str, params: Mapping[str, Any] | None, replaced: Mapping[str, Source],
                     target: pa.Schema) -> Iterator[pa.RecordBatch]:
        """`sql` run with the datasets of `replaced` read from their sources instead of their
        accelerators (`ready_state: on_registration`, `on_zero_results: use_source`)."""
        qctx = SessionContext(self._config())
        inner = Federation(qctx, self.spicepod, self._config)
        with self._lock:
            federated = dict(self._sources)
        for name in self._mirror(qctx, set(replaced)):
            if name in federated:
                inner.add(name, federated[name])
        for name, source in replaced.items():
            if isinstance(source, SqlSource):
                qctx.register_record_batches(name, [[pa.RecordBatch.from_pylist([], schema=source.schema())]])
                inner.add(name, source)
            else:
                source.register(qctx, name)
        self._views(qctx)
        df = qctx.sql_with_options(sql, READ_ONLY, param_values=dict(params) if params else None)
        batches = inner.run(df, sql, params)
        if batches is None:
            batches = (b.to_pyarrow() for b in df.execute_stream())
        return conformed(batches, target)

    # -------------------------------------------------------------- the whole query at its source

    def _whole(self, plan: LogicalPlan, sources: Mapping[str, SqlSource], reading: set[str],
               target: pa.Schema) -> Iterator[pa.RecordBatch] | None:
        source = sources[next(iter(reading))]
        try:
            text = Unparser(getattr(Dialect, source.dialect)()).plan_to_sql(plan)
            tree = sqlglot.parse_one(text, read=source.dialect)
            opaque = frozenset().union(*(sources[n].opaque_columns for n in reading))
            if not _faithful(tree, source.dialect, opaque):
                log.debug("Federated query not sent whole to %s: it would answer differently; running it here",
                          source.key)
                return None
            text = rename_tables(tree, source.dialect, {n: sources[n].table for n in reading})
            log.debug("Query sent whole to %s: %s", source.key, text)
            batches = conformed(iter(source.query(text)), target)
            first_batch = next(batches, None)
        except Exception as e:  # SQL the source does not take: DataFusion runs it instead
            log.debug("Federated query not taken whole by its source (%s); running it here", e)
            return None
        return _prepend(first_batch, batches)

    # -------------------------------------------------------------- table by table

    def _per_table(self, plan: LogicalPlan, sql: str, params: Mapping[str, Any] | None,
                   sources: Mapping[str, SqlSource], reading: set[str], target: pa.Schema) -> Iterator[pa.RecordBatch]:
        reads = {name: _Reads() for name in reading}
        _collect_reads(plan, sources, reads)
        qctx = SessionContext(self._config())
        self._mirror(qctx, reading)
        for name in reading:
            placeholder = self.ctx.table(name).schema()
            table = self._fetch(sources[name], name, reads[name], placeholder)
            qctx.register_record_batches(name, [table.to_batches() or [pa.RecordBatch.from_pylist([],
                                                                                              schema=table.schema)]])
        self._views(qctx)
        df = qctx.sql_with_options(sql, READ_ONLY, param_values=dict(params) if params else None)
        return conformed((b.to_pyarrow() for b in df.execute_stream()), target)

    def _mirror(self, qctx: SessionContext, skip: set[str]) -> list[str]:
        """Every table of the session but the views and `skip`, shared into `qctx`; their names."""
        views = {v.name for v in self.spicepod.views}
        names = [n for n in self.ctx.catalog("spice").schema("public").names() if n not in views and n not in skip]
        for name in names:
            qctx.register_table(name, self.ctx.table_provider(name))
        return names

    def _views(self, qctx: SessionContext) -> None:
        for v in self.spicepod.views:
            try:
                qctx.register_view(v.name, qctx.sql_with_options(v.sql, READ_ONLY))
            except Exception as e:  # as at startup: a view that does not plan is left out
                log.debug("View %s left out of a query planned again: %s", v.name, e)

    def _fetch(self, source: SqlSource, name: str, reads: _Reads, placeholder: pa.Schema) -> pa.Table:
        wanted = reads.columns
        columns = [f.name for f in placeholder if "*" in wanted or f.name in wanted] or [placeholder[0].name]
        text = pushed_query(source, name, columns, reads)
        log.debug("Scan of %s sent to %s: %s", name, source.key, text)
        fetched = source.query(text).read_all()
        by_name = dict(zip(columns, fetched.columns, strict=True))
        # Columns the query does not read stay in the table, as nulls: the query (and any view it
        # reads through) is planned again over this table and must find every column it names.
        arrays = [by_name[f.name].cast(f.type) if f.name in by_name else pa.nulls(fetched.num_rows, f.type)
                  for f in placeholder]
        fields = [f if f.name in by_name else f.with_nullable(True) for f in placeholder]
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def pushed_query(source: SqlSource, name: str, columns: list[str], reads: _Reads) -> str:
    """`SELECT <columns> FROM <source table> AS <name> [WHERE <any of the predicates>] [LIMIT n]`."""
    query = exp.select(*(exp.column(c, table=name, quoted=True) for c in columns)).from_(
        _source_table(source.table, name))
    if reads.predicates and all(p is not None for p in reads.predicates):
        query = query.where(exp.or_(*(p for p in reads.predicates if p is not None)))
    if reads.fetch is not None and len(reads.predicates) == 1:
        query = query.limit(reads.fetch)
    return query.sql(dialect=source.dialect)


def rename_tables(sql: str | exp.Expr, dialect: str, tables: Mapping[str, tuple[str, ...]]) -> str:
    """`sql` (text, or parsed: it is changed in place) with each dataset table replaced by its
    source table, aliased to the name the rest of the query uses for it."""
    tree = sqlglot.parse_one(sql, read=dialect) if isinstance(sql, str) else sql
    for node in list(tree.find_all(exp.Table)):
        name = dataset_name(node.catalog or None, node.db or None, node.name)
        if name is not None and name in tables:
            node.replace(_source_table(tables[name], node.alias or node.name))
    # sqlglot rewrites what it cannot say in the dialect (to_char's format dropped): refuse instead.
    return tree.sql(dialect=dialect, unsupported_level=ErrorLevel.RAISE)


def _source_table(parts: tuple[str, ...], alias: str) -> exp.Table:
    *qualifiers, table = parts
    db = qualifiers[-1] if qualifiers else None
    catalog = qualifiers[-2] if len(qualifiers) > 1 else None
    return exp.table_(table, db=db, catalog=catalog, quoted=True, alias=exp.to_identifier(alias, quoted=True))


def _walk(plan: LogicalPlan, parent: LogicalPlan | None = None) -> Iterator[tuple[LogicalPlan, LogicalPlan | None]]:
    yield plan, parent
    for child in plan.inputs():
        yield from _walk(child, plan)


def _scanned_names(plan: LogicalPlan, sources: Mapping[str, SqlSource]) -> set[str]:
    return {n for ref in scanned(plan) if (n := dataset_name(*ref)) is not None and n in sources}


def _only_federated_scans(plan: LogicalPlan, sources: Mapping[str, SqlSource]) -> bool:
    refs = scanned(plan)
    return bool(refs) and all(dataset_name(*ref) in sources for ref in refs) \
        and "Subquery:" not in plan.display_indent()


def _collect_reads(plan: LogicalPlan, sources: Mapping[str, SqlSource], reads: dict[str, _Reads]) -> None:
    seen: set[str] = set()
    for node, parent in _walk(plan):
        scan = node.to_variant()
        if not isinstance(scan, TableScan) or (name := dataset_name(*scan.fqn())) not in reads:
            continue
        seen.add(name)
        r = reads[name]
        r.columns.update(column for _, column in scan.projection())
        r.fetch = scan.fetch()
        predicate = None
        if parent is not None and isinstance(parent.to_variant(), Filter):
            try:
                dialect = sources[name].dialect
                unparsed = Unparser(getattr(Dialect, dialect)()).plan_to_sql(parent)
                where = sqlglot.parse_one(unparsed, read=dialect).args.get("where")
                # A subquery in the filter reads other tables, which the source does not have.
                if where is not None and not where.find(exp.Select) \
                        and _faithful(where, dialect, sources[name].opaque_columns):
                    predicate = where.this
            except Exception as e:  # a filter the source's dialect cannot say: DataFusion applies it
                log.debug("Filter on %s not pushed down: %s", name, e)
        r.predicates.append(predicate)
    for name in reads.keys() - seen:  # read only inside a subquery expression: every column, every row
        reads[name].predicates.append(None)
        reads[name].columns.update({"*"})
    for r in reads.values():
        if "*" in r.columns:
            r.columns = {"*"}


# What a database computes differently from DataFusion, so a query using it is not sent there:
# integer casts round there (DataFusion truncates), to_char's formats differ, and SQLite's
# upper/lower change ASCII letters only.
_NOT_SENT: tuple[type[exp.Expression], ...] = (exp.TimeToStr, exp.ToChar)
_NOT_SENT_TO: dict[str, tuple[type[exp.Expression], ...]] = {"sqlite": (exp.Upper, exp.Lower, exp.Initcap)}


def _faithful(tree: exp.Expr, dialect: str, opaque: frozenset[str]) -> bool:
    """Whether `dialect`'s database answers `tree` as DataFusion would; `opaque` are columns it
    cannot compute on at all (spiced.connectors.base.SqlSource)."""
    refused = _NOT_SENT + _NOT_SENT_TO.get(dialect, ())
    for node in tree.walk():
        if isinstance(node, refused):
            return False
        if isinstance(node, (exp.Cast, exp.TryCast)) and node.to.is_type(*exp.DataType.INTEGER_TYPES) \
                and not _integer_literal(node.this):
            return False
        if opaque and isinstance(node, exp.Column) and node.name in opaque:
            return False
    return True


def _integer_literal(node: exp.Expr) -> bool:
    """`5`, `-5`: a cast of it to an integer type gives the same everywhere."""
    inner = node.this if isinstance(node, exp.Neg) else node
    return isinstance(inner, exp.Literal) and inner.is_int


def _prepend(first: pa.RecordBatch | None, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    if first is not None:
        yield first
    yield from rest

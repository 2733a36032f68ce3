"""Database files the runtime opens itself, read-only: `duckdb:[schema.]table` with `duckdb_open`
(the `duckdb` package) and `sqlite:table` with `sqlite_file` (the ADBC SQLite driver; beyond
upstream, where SQLite is only an accelerator)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from .params import Checked, Param, ParamError, Spec
from .sql_source import ConnectionPool, PooledSqlSource, table_parts

DUCKDB_SPEC = Spec("duckdb", "duckdb", component=(Param("open"),))
SQLITE_SPEC = Spec("sqlite", "sqlite", component=(Param("file"),))
POOL_SIZE = 4


@dataclass(frozen=True, slots=True)
class EmbeddedOptions:
    engine: str  # "duckdb" or "sqlite"
    table: tuple[str, ...]
    path: Path


def _file(checked: Checked, workdir: Path, key: str, missing: str) -> Path:
    text = checked.get(key.split("_", 1)[1])
    if text is None:
        raise ParamError(missing)
    path = Path(text) if Path(text).is_absolute() else workdir / text
    if not path.is_file():
        raise ValueError(f"params.{key}: file not found: {path}")
    return path


def duckdb_options(target: str, checked: Checked, workdir: Path) -> EmbeddedOptions:
    if "(" in target:
        raise ValueError("from: DuckDB table functions are not supported by this runtime; name a table")
    path = _file(checked, workdir, "duckdb_open",
                 "Missing required parameter: open. Specify a DuckDB file with the `open` parameter")
    return EmbeddedOptions("duckdb", table_parts(target), path)


def sqlite_options(target: str, checked: Checked, workdir: Path) -> EmbeddedOptions:
    path = _file(checked, workdir, "sqlite_file", "Missing required parameter: sqlite_file")
    return EmbeddedOptions("sqlite", table_parts(target, fold=None), path)


class EmbeddedSource(PooledSqlSource):
    def __init__(self, options: EmbeddedOptions, pool_size: int = POOL_SIZE) -> None:
        self.options = options
        self.dialect = options.engine
        self.table = options.table
        self.key = f"{options.engine}:{options.path}"
        super().__init__(ConnectionPool(self._connect, pool_size))

    def _connect(self) -> Any:
        if self.options.engine == "duckdb":
            import duckdb

            con = duckdb.connect(str(self.options.path), read_only=True)
            con.execute("SET TimeZone = 'UTC'")
            return con
        import adbc_driver_sqlite.dbapi as sqlite

        conn = sqlite.connect(f"file:{self.options.path}?mode=ro", autocommit=True)  # no read transaction held open
        cursor = conn.cursor()
        cursor.execute("PRAGMA case_sensitive_like = ON")  # LIKE as DataFusion's: SQLite's ignores ASCII case
        cursor.close()
        return conn

    def _run(self, conn: Any, sql: str) -> tuple[Any, pa.RecordBatchReader]:
        if self.options.engine == "duckdb":  # each pooled connection serves one query at a time
            return None, conn.sql(sql).to_arrow_reader(65_536)
        return super()._run(conn, sql)

    def _cancel(self, conn: Any) -> None:
        if self.options.engine == "duckdb":
            conn.interrupt()
        else:
            super()._cancel(conn)

    def schema(self) -> pa.Schema:
        if self.options.engine == "duckdb":
            return super().schema()
        # SQLite's columns have no types of their own: the driver guesses from the rows it reads,
        # so the declared types (the driver's table schema) decide.
        conn, _ = self._pool.take()
        try:
            schema: pa.Schema = conn.adbc_get_table_schema(self.table[-1])
        except BaseException as e:
            self._pool.give(conn, broken=True)
            raise self.explain(e) from None
        self._pool.give(conn)
        return schema

    def explain(self, e: BaseException) -> Exception:
        where = f"the {self.options.engine} source {'.'.join(self.table)} ({self.options.path.name})"
        text = str(e)
        if "no such table" in text or "does not exist" in text:
            return RuntimeError(f"Failed to load {where}. The table, '{'.'.join(self.table)}', was not found. "
                                "Verify the source table name in the Spicepod configuration.")
        return RuntimeError(f"{where}: {text.splitlines()[0] if text else type(e).__name__}")


def open_source(options: object) -> EmbeddedSource:
    assert isinstance(options, EmbeddedOptions)
    return EmbeddedSource(options)

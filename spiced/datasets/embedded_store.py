"""The DuckDB and SQLite accelerators: datasets held as tables of one embedded database, in
memory or in a file that outlives the process, and queried there.

- **Writes** go in as Arrow: DuckDB scans the refresh's record-batch reader itself; SQLite takes
  it through the ADBC driver's bulk ingest. A full refresh builds the new table and swaps it in
  one transaction, so a query sees the old rows or the new ones, never a mix.
- **Queries** run in the database: each dataset is a federated table (spiced/federation.py)
  whose source is the accelerator, so a query over datasets of one accelerator database is sent
  to it whole, and any other reads only the rows and columns it needs from it.
- **Restart** (file modes): each table's Arrow schema and last refresh are kept beside it
  (`spice_sys_dataset_schema`, upstream's `spice_sys_dataset_checkpoint`), so the dataset is
  queryable from the file at startup, before its first refresh.
- **SQLite in memory** is a file under /dev/shm, removed at shutdown: SQLite's own in-memory
  databases lock readers out while a refresh writes, its WAL files do not.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from ..acceleration import EngineSettings
from ..connectors.embedded import EmbeddedOptions, EmbeddedSource
from ..federation import Federation
from .accelerator import Checkpoint, Written
from .arrow_store import ArrowStore
from .time_filter import Value, newest_value

log = logging.getLogger("runtime.accelerated_table")

_CHECKPOINTS = "spice_sys_dataset_checkpoint"
_SCHEMAS = "spice_sys_dataset_schema"
_INCOMING = "__spice_incoming"


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class EmbeddedAccelerator:
    """One DuckDB or SQLite database (a file, or memory) and the datasets it holds."""

    def __init__(self, engine: str, file: Path | None, settings: EngineSettings, *, recreate: bool,
                 store: ArrowStore, federation: Federation) -> None:
        self.engine = engine
        self.dialect = engine
        self.settings = settings
        self._store = store
        self._federation = federation
        self._write_lock = threading.Lock()
        self._schemas: dict[str, pa.Schema] = {}
        self._index_specs: dict[str, tuple[tuple[tuple[str, ...], bool], ...]] = {}
        self._tables: dict[str, AcceleratedTable] = {}
        self._scratch: Path | None = None
        if file is None and engine == "sqlite":
            shm = Path("/dev/shm")
            self._scratch = Path(tempfile.mkdtemp(prefix="spiced-sqlite-", dir=shm if shm.is_dir() else None))
            file = self._scratch / "accelerated_sqlite.db"
        self.file = file
        if file is not None:
            if recreate and file.exists():
                log.warning("%s acceleration mode is 'file_create', removing existing file: %s",
                            "SQLite" if engine == "sqlite" else "DuckDB", file)
                for extra in ("", "-wal", "-shm", ".wal"):
                    Path(f"{file}{extra}").unlink(missing_ok=True)
            file.parent.mkdir(parents=True, exist_ok=True)
        self.key = f"accelerator:{engine}:{file if self._scratch is None else 'memory'}:{id(self)}"
        self._db: Any = None
        self._writer: Any = self._open_writer()
        self._meta()

    # -------------------------------------------------------------- connections

    def _open_writer(self) -> Any:
        if self.engine == "duckdb":
            import duckdb

            self._db = duckdb.connect(str(self.file) if self.file is not None else ":memory:")
            if self.settings.memory_limit:
                self._db.execute(f"SET memory_limit = '{self.settings.memory_limit}'")
            self._db.execute(f"SET preserve_insertion_order = {str(self.settings.preserve_insertion_order).lower()}")
            writer = self._db.cursor()
            writer.execute("SET TimeZone = 'UTC'")
            return writer
        import adbc_driver_sqlite.dbapi as sqlite

        setup = sqlite.connect(str(self.file), autocommit=True)
        try:
            cursor = setup.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers keep reading while a refresh writes
            cursor.fetchall()
            cursor.close()
        finally:
            setup.close()
        writer = sqlite.connect(str(self.file), autocommit=False)
        self._pragma(writer)
        return writer

    def _pragma(self, conn: Any) -> None:
        cursor = conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(self.settings.busy_timeout * 1000)}")
        cursor.fetchall()
        cursor.close()

    def reader(self) -> Any:
        """A connection for queries (pooled by each dataset's table)."""
        if self.engine == "duckdb":
            conn = self._db.cursor()
            conn.execute("SET TimeZone = 'UTC'")
            return conn
        import adbc_driver_sqlite.dbapi as sqlite

        conn = sqlite.connect(f"file:{self.file}?mode=ro", autocommit=True)
        self._pragma(conn)
        cursor = conn.cursor()
        cursor.execute("PRAGMA case_sensitive_like = ON")  # LIKE as DataFusion's: SQLite's ignores ASCII case
        cursor.fetchall()
        cursor.close()
        return conn

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        cursor = self._writer.cursor() if self.engine == "sqlite" else self._writer
        cursor.execute(sql, params) if params else cursor.execute(sql)
        return cursor

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> pa.Table:
        if self.engine == "duckdb":
            return self._writer.sql(sql, params=list(params) or None).to_arrow_table()
        cursor = self._execute(sql, params)
        table = cursor.fetch_arrow_table()
        cursor.close()
        return table

    def _commit(self) -> None:
        if self.engine == "duckdb":
            self._writer.execute("COMMIT")
        else:
            self._writer.commit()

    def _begin(self) -> None:
        if self.engine == "duckdb":
            self._writer.execute("BEGIN TRANSACTION")

    def _rollback(self) -> None:
        try:
            if self.engine == "duckdb":
                self._writer.execute("ROLLBACK")
            else:
                self._writer.rollback()
        except Exception as e:  # nothing was begun
            log.debug("Rollback: %s", e)

    def _meta(self) -> None:
        with self._write_lock:
            self._execute(f"CREATE TABLE IF NOT EXISTS {_CHECKPOINTS} (dataset_name TEXT PRIMARY KEY, "
                          "created_at TEXT, updated_at TEXT)")
            self._execute(f"CREATE TABLE IF NOT EXISTS {_SCHEMAS} (dataset_name TEXT PRIMARY KEY, arrow_schema BLOB)")
            self._commit() if self.engine == "sqlite" else None

    # -------------------------------------------------------------- writes

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write, alone (the write lock) and whole (committed, or rolled back on any failure)."""
        with self._write_lock:
            try:
                self._begin()
                yield
                self._commit()
            except BaseException:
                self._rollback()
                raise

    def replace(self, name: str, reader: pa.RecordBatchReader) -> Written:
        counted = _Counted(reader)
        with self._transaction():
            if self.engine == "duckdb":
                order = ", ".join(quoted(c) for c in self.settings.sort_columns)
                self._writer.register(_INCOMING, counted.reader)
                try:
                    self._execute(f"CREATE OR REPLACE TABLE {quoted(name)} AS SELECT * FROM {_INCOMING}"
                                  + (f" ORDER BY {order}" if order else ""))
                finally:
                    self._writer.unregister(_INCOMING)
            else:
                staging = f"{name}__spice_new"
                cursor = self._writer.cursor()
                cursor.adbc_ingest(staging, counted.reader, mode="replace")
                cursor.close()
                self._execute(f"DROP TABLE IF EXISTS {quoted(name)}")
                self._execute(f"ALTER TABLE {quoted(staging)} RENAME TO {quoted(name)}")
            self._indexes(name)
            self._record(name, reader.schema)
        if self.engine == "duckdb" and self.settings.recompute_statistics:
            with self._write_lock:
                self._execute(f"ANALYZE {quoted(name)}")
        self._attach(name, reader.schema)
        return Written(counted.rows, counted.nbytes)

    def append(self, name: str, reader: pa.RecordBatchReader) -> Written:
        schema = self._schemas[name]
        counted = _Counted(_in_order(reader, schema))
        with self._transaction():
            if self.engine == "duckdb":
                self._writer.register(_INCOMING, counted.reader)
                try:
                    self._execute(f"INSERT INTO {quoted(name)} BY NAME SELECT * FROM {_INCOMING}")
                finally:
                    self._writer.unregister(_INCOMING)
            else:
                cursor = self._writer.cursor()
                cursor.adbc_ingest(name, counted.reader, mode="append")
                cursor.close()
            self._touch(name)
        return Written(counted.rows, counted.nbytes)

    def delete(self, name: str, condition: exp.Expression) -> int:
        with self._transaction():
            cursor = self._execute(f"DELETE FROM {quoted(name)} WHERE {condition.sql(dialect=self.dialect)}")
            if self.engine == "sqlite":
                cursor.close()  # the ADBC driver's rowcount is -1 for a DELETE: SQLite counts them
                cursor = self._execute("SELECT changes()")
            row = cursor.fetchone()
            deleted = int(row[0]) if row else 0
            if self.engine == "sqlite":
                cursor.close()
            self._touch(name)
        return deleted

    def _indexes(self, name: str) -> None:
        """upstream's `indexes` and `primary_key` (as a unique index: an append that repeats a key fails)."""
        for columns, unique in self._index_specs.get(name, ()):
            index = quoted(f"i_{name}_{'_'.join(columns)}")
            self._execute(f"CREATE {'UNIQUE ' if unique else ''}INDEX IF NOT EXISTS {index} ON {quoted(name)} "
                          f"({', '.join(quoted(c) for c in columns)})")

    def set_indexes(self, name: str, indexes: tuple[tuple[tuple[str, ...], bool], ...],
                    primary_key: tuple[str, ...]) -> None:
        self._index_specs[name] = indexes + (((primary_key, True),) if primary_key else ())

    def _record(self, name: str, schema: pa.Schema) -> None:
        now = dt.datetime.now(dt.UTC).isoformat()
        self._execute(f"DELETE FROM {_SCHEMAS} WHERE dataset_name = ?", (name,))
        self._execute(f"INSERT INTO {_SCHEMAS} VALUES (?, ?)", (name, schema.serialize().to_pybytes()))
        self._execute(f"INSERT INTO {_CHECKPOINTS} VALUES (?, ?, ?) ON CONFLICT (dataset_name) "
                      "DO UPDATE SET updated_at = excluded.updated_at", (name, now, now))

    def _touch(self, name: str) -> None:
        now = dt.datetime.now(dt.UTC).isoformat()
        self._execute(f"UPDATE {_CHECKPOINTS} SET updated_at = ? WHERE dataset_name = ?", (now, name))

    # -------------------------------------------------------------- reads

    def holds(self, name: str) -> bool:
        return name in self._schemas

    def newest(self, name: str, column: str) -> Value | None:
        schema = self._schemas[name]
        with self._write_lock:
            table = self._query(f"SELECT max({quoted(column)}) FROM {quoted(name)}")
        values = table.column(0)
        wanted = schema.field(column).type
        return newest_value(values if values.type == wanted else _typed(values, wanted))

    def time_unit(self, name: str, column: str) -> str:
        kind = self._schemas[name].field(column).type
        return str(kind.unit) if pa.types.is_timestamp(kind) else "us"

    def checkpoint(self, name: str) -> Checkpoint | None:
        with self._write_lock:
            found = self._query(f"SELECT c.updated_at, s.arrow_schema FROM {_CHECKPOINTS} c JOIN {_SCHEMAS} s "
                                "ON c.dataset_name = s.dataset_name WHERE c.dataset_name = ?", (name,))
            if found.num_rows == 0:
                return None
            tables = self._query("SELECT name FROM sqlite_master WHERE type = 'table'" if self.engine == "sqlite"
                                 else "SELECT table_name FROM information_schema.tables")
        if name not in tables.column(0).to_pylist():
            return None
        updated, blob = found.column(0)[0].as_py(), found.column(1)[0].as_py()
        self._attach(name, pa.ipc.read_schema(pa.py_buffer(blob)))
        return Checkpoint(dt.datetime.fromisoformat(updated))

    def _attach(self, name: str, schema: pa.Schema) -> None:
        """Queries on `name` read this table; planning knows its schema from an empty stand-in."""
        if self._schemas.get(name) == schema:
            return
        self._schemas[name] = schema
        self._store.register(name, [pa.RecordBatch.from_pylist([], schema=schema)], held=False)
        table = AcceleratedTable(self, name, schema)
        self._federation.add(name, table)
        replaced, self._tables[name] = self._tables.get(name), table
        if replaced is not None:
            replaced.close()

    def forget(self, name: str) -> None:
        """`name` left the spicepod: no longer served from here (its table stays in the file)."""
        self._schemas.pop(name, None)
        table = self._tables.pop(name, None)
        if table is not None:
            table.close()

    def close(self) -> None:
        for table in self._tables.values():
            table.close()
        with self._write_lock:
            try:
                self._writer.close()
                if self._db is not None:
                    self._db.close()
            except Exception as e:  # closing must not stop the shutdown
                log.debug("Closing the %s accelerator: %s", self.engine, e)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


class AcceleratedTable(EmbeddedSource):
    """One dataset's table in an accelerator database, as a federated source."""

    def __init__(self, accelerator: EmbeddedAccelerator, name: str, schema: pa.Schema) -> None:
        self.accelerator = accelerator
        self._schema = schema
        super().__init__(EmbeddedOptions(accelerator.engine, (name,), accelerator.file or Path("memory")),
                         pool_size=accelerator.settings.pool_size)
        self.key = accelerator.key
        self._zoned = {f.name: f.type for f in schema if pa.types.is_timestamp(f.type) and f.type.tz is not None}
        # Columns the database computes on otherwise than DataFusion; DataFusion does it on fetched rows.
        if accelerator.engine == "sqlite":  # the ADBC driver stores times as ISO text (compared as text
            # there) and booleans as 0/1 (cast to text as '1')
            self.opaque_columns = frozenset(f.name for f in schema if _temporal(f.type) or pa.types.is_boolean(f.type))
        else:  # DuckDB keeps a zoned timestamp as an instant and reads it in UTC, not in its zone
            self.opaque_columns = frozenset(f.name for f in schema if _zoned(f.type))

    def _connect(self) -> Any:
        return self.accelerator.reader()

    def schema(self) -> pa.Schema:
        return self._schema

    def query(self, sql: str) -> pa.RecordBatchReader:
        reader = super().query(sql)
        zoned = self._zoned
        if self.accelerator.engine != "sqlite" or not any(
                f.name in zoned and pa.types.is_string(f.type) for f in reader.schema):
            return reader
        schema = pa.schema([f.with_type(zoned[f.name]) if f.name in zoned and pa.types.is_string(f.type) else f
                            for f in reader.schema])
        return pa.RecordBatchReader.from_batches(schema, (pa.RecordBatch.from_arrays(
            [c if c.type == f.type else _typed(c, f.type) for c, f in zip(b.columns, schema, strict=True)],
            schema=schema) for b in reader))

    def explain(self, e: BaseException) -> Exception:
        text = str(e)
        return RuntimeError(f"the {self.accelerator.engine} accelerator: "
                            f"{text.splitlines()[0] if text else type(e).__name__}")


def _typed(values: pa.Array | pa.ChunkedArray, kind: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """`values` as SQLite gave them back, in the Arrow type they were written with. A timestamp
    comes back as UTC text without an offset, which Arrow will not cast to a zoned type: it is
    read as naive (UTC) first."""
    if pa.types.is_timestamp(kind):
        return pc.cast(pc.cast(values, pa.timestamp(kind.unit)), kind)
    return pc.cast(values, kind)


def _temporal(kind: pa.DataType) -> bool:
    return bool(pa.types.is_temporal(kind))


def _zoned(kind: pa.DataType) -> bool:
    """A timestamp in a zone other than UTC."""
    return bool(pa.types.is_timestamp(kind)) and kind.tz not in (None, "UTC", "+00:00", "Z")


class _Counted:
    """A reader passed through as it is read, counting rows and bytes."""

    def __init__(self, reader: pa.RecordBatchReader) -> None:
        self.rows = 0
        self.nbytes = 0
        self.reader = pa.RecordBatchReader.from_batches(reader.schema, self._count(reader))

    def _count(self, reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
        for batch in reader:
            self.rows += batch.num_rows
            self.nbytes += batch.nbytes
            yield batch


def _in_order(reader: pa.RecordBatchReader, schema: pa.Schema) -> pa.RecordBatchReader:
    """`reader`'s batches with the columns and types of the table they go into."""
    if reader.schema == schema:
        return reader
    return pa.RecordBatchReader.from_batches(
        schema, (pa.RecordBatch.from_arrays([b.column(f.name).cast(f.type) for f in schema], schema=schema)
                 for b in reader))


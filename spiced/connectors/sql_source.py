"""What the database connectors share: table names as upstream reads them from `from:`, a small
pool of connections, and results streamed as Arrow record batches while their connection is held."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pyarrow as pa
from datafusion import SessionContext

from ..batches import conformed
from ..interrupt import CURRENT


def table_parts(text: str, *, fold: Callable[[str], str] | None = str.lower, quote: str = '"') -> tuple[str, ...]:
    """`schema.table` split on dots outside quotes; unquoted parts folded (PostgreSQL lower-cases
    them), quoted ones kept as written (`my_schema."MixedCase"`)."""
    parts: list[str] = []
    current, quoted, inside = "", False, False
    for ch in text:
        if ch == quote:
            inside, quoted = not inside, True
        elif ch == "." and not inside:
            parts.append(current if quoted or fold is None else fold(current))
            current, quoted = "", False
        else:
            current += ch
    if inside or not current:
        raise ValueError(f"from: expected [schema.]table (got {text!r})")
    parts.append(current if quoted or fold is None else fold(current))
    if any(not p for p in parts):
        raise ValueError(f"from: expected [schema.]table (got {text!r})")
    return tuple(parts)


class ConnectionPool:
    """At most `size` connections, opened on demand and reused; a broken one is dropped."""

    def __init__(self, connect: Callable[[], Any], size: int) -> None:
        self._connect = connect
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    def take(self) -> tuple[Any, bool]:
        """A connection, and whether it was used before (and so may have been dropped by the server)."""
        self._slots.acquire()
        try:
            return self._idle.get_nowait(), True
        except queue.Empty:
            pass
        try:
            return self._connect(), False
        except BaseException:
            self._slots.release()
            raise

    def give(self, conn: Any, *, broken: bool = False) -> None:
        if broken or self._closed:
            _close_quietly(conn)
        else:
            self._idle.put(conn)
        self._slots.release()

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                _close_quietly(self._idle.get_nowait())
            except queue.Empty:
                return


def _nothing() -> None:
    pass


def _close_quietly(conn: Any) -> None:
    try:
        if conn is not None:
            conn.close()
    except Exception:  # a connection the server already dropped
        pass


class PooledSqlSource:
    """A database table read through a pool of DB-API connections whose cursors give Arrow
    (ADBC's `fetch_record_batch`, DuckDB's likewise). Subclasses say how to connect and how a
    driver's errors read."""

    dialect: str
    key: str
    table: tuple[str, ...]
    opaque_columns: frozenset[str] = frozenset()

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def _quoted_table(self) -> str:
        import sqlglot.expressions as exp

        *qualifiers, name = self.table
        table = exp.table_(name, db=qualifiers[-1] if qualifiers else None,
                           catalog=qualifiers[-2] if len(qualifiers) > 1 else None, quoted=True)
        return table.sql(dialect=self.dialect)

    def explain(self, e: BaseException) -> Exception:
        """The driver's error as the message a user reads (subclasses name the source)."""
        return RuntimeError(str(e))

    def _run(self, conn: Any, sql: str) -> tuple[Any, pa.RecordBatchReader]:
        """A cursor on `conn` running `sql`, and its rows as Arrow."""
        cursor = conn.cursor()
        cursor.execute(sql)
        return cursor, cursor.fetch_record_batch()

    def query(self, sql: str) -> pa.RecordBatchReader:
        """Run `sql`. A pooled connection that fails (the server dropped it: a restart, an idle
        timeout) is thrown away and the query sent again on the next one; a new connection's
        failure is the answer."""
        while True:
            try:
                conn, reused = self._pool.take()
            except Exception as e:
                raise self.explain(e) from None
            stopper = CURRENT.get()
            forget = stopper.on_stop(partial(self._cancel, conn)) if stopper is not None else _nothing
            try:
                cursor, reader = self._run(conn, sql)
            except Exception as e:
                forget()
                self._pool.give(conn, broken=True)
                if reused and (stopper is None or stopper.error is None):
                    continue
                raise self.explain(e) from None
            except BaseException:
                forget()
                self._pool.give(conn, broken=True)
                raise
            return pa.RecordBatchReader.from_batches(reader.schema, self._drain(conn, cursor, reader, forget))

    def _drain(self, conn: Any, cursor: Any, reader: pa.RecordBatchReader,
               forget: Callable[[], None]) -> Iterator[pa.RecordBatch]:
        broken = True
        try:
            yield from reader
            broken = False
        except Exception as e:
            raise self.explain(e) from None
        finally:
            forget()
            _close_quietly(cursor)
            self._pool.give(conn, broken=broken)

    def _cancel(self, conn: Any) -> None:
        """Ask the driver to stop the statement running on `conn` (called from another thread)."""
        conn.adbc_cancel()

    def schema(self) -> pa.Schema:
        with self.query(f"SELECT * FROM {self._quoted_table()} WHERE 1 = 0") as reader:
            schema: pa.Schema = reader.schema
            reader.read_all()
        return schema

    def read(self, ctx: SessionContext) -> pa.RecordBatchReader:
        schema = self.schema()
        return pa.RecordBatchReader.from_batches(
            schema, conformed(iter(self.query(f"SELECT * FROM {self._quoted_table()}")), schema))

    def register(self, ctx: SessionContext, name: str) -> None:
        raise NotImplementedError("a database table is registered through the federation")

    def close(self) -> None:
        self._pool.close()

"""`postgres:[schema.]table` through the ADBC PostgreSQL driver (libpq underneath, rows arrive
as Arrow): TLS with upstream's default `verify-full`, a root certificate from a path or inline PEM."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pyarrow as pa

from .. import __version__
from .params import Checked, Param, ParamError, Spec
from .sql_source import ConnectionPool, PooledSqlSource, table_parts

SSL_MODES = ("disable", "require", "prefer", "verify-ca", "verify-full")

SPEC = Spec("postgres", "pg", component=(
    Param("connection_string", secret=True), Param("host"), Param("port", default="5432"), Param("db"),
    Param("user", secret=True), Param("pass", secret=True),
    Param("sslmode", default="verify-full", one_of=SSL_MODES, ignore_case=True), Param("sslrootcert"),
), runtime=(Param("connection_pool_size", default="5"),))


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    table: tuple[str, ...]
    host: str | None
    port: int
    db: str | None
    user: str | None
    sslmode: str
    pool_size: int
    password: str | None = field(default=None, repr=False)
    connection_string: str | None = field(default=None, repr=False)
    sslrootcert: str | None = None  # a path, or inline PEM


def options(target: str, checked: Checked, workdir: Path) -> PostgresOptions:
    table = table_parts(target)
    pool = checked.get("connection_pool_size") or "5"
    if not pool.isdigit() or int(pool) < 1:
        raise ValueError("params.connection_pool_size: Could not parse connection_pool_size into a valid integer. "
                         "Ensure it is configured with a valid value.")
    port = checked.get("port") or "5432"
    if not port.isdigit():
        raise ValueError(f"params.pg_port: expected a port number (got {port!r})")
    conn_string = checked.get("connection_string")
    if conn_string is None and checked.get("host") is None:
        raise ParamError("Missing required parameter: pg_host")
    root = checked.get("sslrootcert")
    if root is not None and "-----BEGIN" not in root:
        path = Path(root) if Path(root).is_absolute() else workdir / root
        if not path.is_file():
            raise ValueError(f"params.pg_sslrootcert: Invalid root certificate path: {root}. Ensure it points to a "
                             "valid root certificate, or provide inline PEM content.")
        root = str(path)
    return PostgresOptions(table=table, host=checked.get("host"), port=int(port), db=checked.get("db"),
                           user=checked.get("user"), sslmode=(checked.get("sslmode") or "verify-full").lower(),
                           pool_size=int(pool), password=checked.get("pass"), connection_string=conn_string,
                           sslrootcert=root)


class PostgresSource(PooledSqlSource):
    dialect = "postgres"

    def __init__(self, options: PostgresOptions) -> None:
        self.options = options
        self.table = options.table
        self.key = f"postgres://{options.host}:{options.port}/{options.db}"
        self._root_file: str | None = None
        super().__init__(ConnectionPool(self._connect, options.pool_size))

    def _root_path(self) -> str | None:
        root = self.options.sslrootcert
        if root is None or "-----BEGIN" not in root:
            return root
        if self._root_file is None:  # libpq reads the root certificate from a file
            fd, path = tempfile.mkstemp(prefix="spiced-pg-root-", suffix=".pem")
            with os.fdopen(fd, "w") as f:
                f.write(root)
            self._root_file = path
        return self._root_file

    def uri(self) -> str:
        o = self.options
        if o.connection_string is not None:
            return o.connection_string
        auth = quote(o.user or "", safe="") + (":" + quote(o.password, safe="") if o.password else "")
        query: dict[str, str] = {"sslmode": o.sslmode, "application_name": f"Spice.ai {__version__}"}
        root = self._root_path()
        if root is not None:
            query["sslrootcert"] = root
        return f"postgresql://{auth}@{o.host}:{o.port}/{quote(o.db or '', safe='')}?{urlencode(query, quote_via=quote)}"

    def _connect(self) -> Any:
        import adbc_driver_postgresql.dbapi as pg

        return pg.connect(self.uri(), autocommit=True)  # no transaction left open between queries

    def schema(self) -> pa.Schema:
        """The driver reads NUMERIC as text; the catalog's precision and scale make it a decimal, as
        upstream maps it (an unconstrained NUMERIC becomes Decimal128(38, 10))."""
        schema = super().schema()
        *qualifiers, table = self.table
        where_schema = f"'{_literal(qualifiers[-1])}'" if qualifiers else "current_schema()"
        numeric = self.query("SELECT column_name, numeric_precision, numeric_scale FROM information_schema.columns "
                             f"WHERE data_type = 'numeric' AND table_schema = {where_schema} "
                             f"AND table_name = '{_literal(table)}'").read_all().to_pylist()
        decimals = {row["column_name"]: _decimal(row["numeric_precision"], row["numeric_scale"]) for row in numeric}
        return pa.schema([f.with_type(decimals[f.name]) if f.name in decimals else f for f in schema])

    def explain(self, e: BaseException) -> Exception:
        o = self.options
        text = str(e).replace(o.password or "\0", "***")
        where = f"the postgres source {'.'.join(o.table)}"
        if "Connection refused" in text or "could not translate host name" in text:
            return RuntimeError(f"Cannot connect to {where} on {o.host}:{o.port}. Ensure that the host and port "
                                "are correctly configured in the spicepod, and that the host is reachable.")
        if "password authentication failed" in text:
            return RuntimeError(f"Cannot connect to {where}. Authentication failed. Ensure that the username and "
                                "password are correctly configured in the spicepod.")
        if "does not exist" in text and "relation" in text:
            return RuntimeError(f"Failed to load {where}. The table, '{'.'.join(o.table)}', was not found. Verify "
                                "the source table name in the Spicepod configuration.")
        return RuntimeError(f"{where} ({o.host}:{o.port}): {_first_line(text)}")

    def close(self) -> None:
        super().close()
        if self._root_file is not None:
            os.unlink(self._root_file)


def _literal(text: str) -> str:
    return text.replace("'", "''")


def _decimal(precision: int | None, scale: int | None) -> pa.DataType:
    if precision is None:
        return pa.decimal128(38, 10)
    return pa.decimal128(precision, scale or 0) if precision <= 38 else pa.decimal256(precision, scale or 0)


def _first_line(text: str) -> str:
    """A driver message without its ADBC decoration."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else text


def open_source(options: object) -> PostgresSource:
    assert isinstance(options, PostgresOptions)
    return PostgresSource(options)

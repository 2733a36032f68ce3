"""Conditions on a dataset's `time_column`, as SQL any source or accelerator can run: rows newer
than the accelerator's newest (append), inside `refresh_data_window`, older than
`retention_period`.

`time_format` says how the column holds time (upstream's values): `timestamp` / `timestamptz`
(a timestamp type), `unix_seconds` / `unix_millis` (numbers), `ISO8601` (text), `date`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
from sqlglot import exp

from ..spicepod import TimeFormat

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class Nanos:
    """An instant to the nanosecond, where a datetime stops at the microsecond: the newest value
    of a nanosecond column, which an append compares exactly (else it takes that row again)."""

    since_epoch: int  # nanoseconds, UTC

    def floor(self) -> dt.datetime:
        return _EPOCH + dt.timedelta(microseconds=self.since_epoch // 1000)

    def text(self, sep: str = "T") -> str:
        """`2024-01-01T00:00:00.000000001` (UTC)."""
        return self.floor().strftime(f"%Y-%m-%d{sep}%H:%M:%S") + f".{self.since_epoch % 1_000_000_000:09d}"


Value = dt.datetime | dt.date | int | float | str | Nanos


def cutoff(fmt: TimeFormat, seconds_ago: float, now: dt.datetime | None = None) -> Value:
    """The instant `seconds_ago` before now, as the column holds it."""
    at = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=seconds_ago)
    if fmt == "unix_seconds":
        return int(at.timestamp())
    if fmt == "unix_millis":
        return int(at.timestamp() * 1000)
    if fmt == "date":
        return at.date()
    if fmt == "ISO8601":
        return at.isoformat()
    return at


def compare(column: str, op: Callable[..., exp.Expression], value: Value, fmt: TimeFormat, dialect: str | None,
            unit: str = "us") -> exp.Expression:
    """`column <op> value` with the value written as `dialect` reads a time of that kind.

    SQLite has no time types: the ADBC driver stores Arrow timestamps as ISO text with as many
    fraction digits as the unit, so there the value is that text (`unit` is the column's).
    ISO8601 text, whose offset and separator vary, is compared there as instants (julianday,
    to the millisecond): as text, `2024-01-01 10:00` sorts before `2024-01-01T09:00`."""
    col: exp.Expression = exp.column(column, quoted=True)
    if fmt == "ISO8601" and dialect == "sqlite":
        text = value.isoformat() if isinstance(value, (dt.date, dt.datetime)) else str(value)
        return op(this=exp.Anonymous(this="julianday", expressions=[col]),
                  expression=exp.Anonymous(this="julianday", expressions=[exp.Literal.string(text)]))
    if fmt == "ISO8601":
        col = exp.cast(col, exp.DataType.build("timestamptz"))
        value = dt.datetime.fromisoformat(str(value)) if isinstance(value, str) else value
    return op(this=col, expression=literal(value, dialect, unit))


def literal(value: Value, dialect: str | None, unit: str = "us") -> exp.Expression:
    """`value` as `dialect` compares it with a column of its kind. A time is an instant: a naive
    column holds UTC (DuckDB's sessions here are UTC), a zoned one is compared by instant."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return exp.Literal.number(value)
    if isinstance(value, str):
        return exp.Literal.string(value)
    if isinstance(value, Nanos):
        if dialect is None:
            return _utc_timestamp(value.text() + "Z", "Nanosecond")
        if dialect == "duckdb":
            return exp.cast(exp.Literal.string(value.text(" ")), exp.DataType.build("TIMESTAMP_NS", dialect="duckdb"))
        if dialect == "sqlite":
            return exp.Literal.string(_sqlite_text(value.text(), unit))
        value = value.floor()  # the databases read here keep microseconds at most
    if isinstance(value, dt.datetime):
        utc = value.astimezone(dt.UTC) if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        if dialect is None:
            # DataFusion: a zoned literal. A naive one (what CAST(... AS TIMESTAMPTZ) gives) is
            # read as wall-clock time in the zone of a zoned column it is compared with.
            return _utc_timestamp(utc.isoformat(), "Microsecond")
        if dialect == "duckdb":  # a naive UTC literal compares with every DuckDB timestamp type
            return exp.cast(exp.Literal.string(utc.strftime("%Y-%m-%d %H:%M:%S.%f")), exp.DataType.build("timestamp"))
        if dialect == "sqlite":
            return exp.Literal.string(_sqlite_text(utc.strftime("%Y-%m-%dT%H:%M:%S.%f"), unit))
        if dialect == "mysql":  # MariaDB reads no offset in a literal; its sessions here are UTC
            return exp.cast(exp.Literal.string(utc.strftime("%Y-%m-%d %H:%M:%S.%f")),
                            exp.DataType.build("datetime(6)", dialect="mysql"))  # DATETIME alone drops the fraction
        return exp.cast(exp.Literal.string(utc.isoformat()), exp.DataType.build("timestamptz"))
    if dialect == "sqlite":
        return exp.Literal.string(value.isoformat())
    return exp.cast(exp.Literal.string(value.isoformat()), exp.DataType.build("date"))


def _utc_timestamp(text: str, unit: str) -> exp.Expression:
    return exp.Anonymous(this="arrow_cast", expressions=[exp.Literal.string(text),
                                                         exp.Literal.string(f'Timestamp({unit}, Some("UTC"))')])


def _sqlite_text(text: str, unit: str) -> str:
    """An ISO time (`...T12:00:00.123456[789]`) as the ADBC SQLite driver stores a timestamp of
    `unit`: as many fraction digits as the unit has, none for seconds."""
    whole, _, fraction = text.partition(".")
    digits = {"s": 0, "ms": 3, "us": 6, "ns": 9}[unit]
    return whole + ("." + fraction.ljust(digits, "0")[:digits] if digits else "")


def newest_value(array: pa.ChunkedArray | pa.Array) -> Value | None:
    """The largest value of a time column (None when it has none)."""
    import pyarrow.compute as pc

    if len(array) == 0:
        return None
    scalar = pc.max(array)
    if scalar.is_valid and pa.types.is_timestamp(array.type) and array.type.unit == "ns":
        return Nanos(scalar.value)  # exact: a datetime would drop the nanoseconds
    value = scalar.as_py() if scalar.is_valid else None
    if isinstance(value, (dt.datetime, dt.date, int, float, str)):
        return value
    return None

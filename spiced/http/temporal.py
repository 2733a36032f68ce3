"""Dates, times and timestamps as arrow-rs casts them to text (DataFusion's `arrow_cast(x, 'Utf8')`,
which the JSON kernels use), printed in Python for the few rows of a small batch: one DataFusion
projection costs more than the rows (a point lookup's one row with a timestamp paid a whole query
for its JSON). tests/test_http_encode.py holds both paths to byte-identical output.

arrow-rs's forms, read off its output:
- timestamps `2023-11-14T22:13:20`, fractions as chrono's `%.f` (none when zero, else 3, 6 or 9
  digits, as few as show the value); with a time zone the instant in that zone and its offset,
  `Z` for `UTC`;
- dates `2023-11-14` (date64: as a timestamp); times `01:00:00.000001`.
Values Python's calendar cannot hold (years past 9999, before 1) and named time zones are left to
the kernels: `formatter` returns None for the type, or the printer raises NotPrintable.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable

import pyarrow as pa

_EPOCH = datetime.datetime(1970, 1, 1)
_EPOCH_DATE = datetime.date(1970, 1, 1)
_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_OFFSET = re.compile(r"([+-])(\d{2}):(\d{2})")


class NotPrintable(ValueError):
    """A value only the kernels print (outside Python's calendar)."""


def _fraction(nanos: int) -> str:
    if nanos == 0:
        return ""
    if nanos % 1_000_000 == 0:
        return f".{nanos // 1_000_000:03d}"
    if nanos % 1_000 == 0:
        return f".{nanos // 1_000:06d}"
    return f".{nanos:09d}"


def _clock(seconds: int, nanos: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}{_fraction(nanos)}"


def _date(day: datetime.date) -> str:
    return f"{day.year:04d}-{day.month:02d}-{day.day:02d}"


def _timestamp(value: int, per_second: int, offset_seconds: int) -> str:
    seconds, part = divmod(value, per_second)
    seconds += offset_seconds
    try:
        moment = _EPOCH + datetime.timedelta(seconds=seconds)
    except OverflowError:
        raise NotPrintable(value) from None
    return f"{_date(moment.date())}T{_clock(moment.hour * 3600 + moment.minute * 60 + moment.second, 0)}" + \
        _fraction(part * (1_000_000_000 // per_second))


def _zone(tz: str | None) -> tuple[int, str] | None:
    """The offset in seconds and its printed suffix, for the zones printed here."""
    if tz is None:
        return 0, ""
    if tz == "UTC":
        return 0, "Z"
    match = _OFFSET.fullmatch(tz)
    if match is None:
        return None  # a named zone: its offset depends on the instant
    sign = -1 if match.group(1) == "-" else 1
    return sign * (int(match.group(2)) * 3600 + int(match.group(3)) * 60), tz


def formatter(t: pa.DataType) -> Callable[[int], str] | None:
    """Printer of one value of temporal type `t`, given as its integer storage (`Array.view` to
    int32/int64), or None when only the kernels print this type."""
    if pa.types.is_timestamp(t):
        zone = _zone(t.tz)
        if zone is None:
            return None
        offset, suffix = zone
        per_second = _PER_SECOND[t.unit]
        return lambda v: _timestamp(v, per_second, offset) + suffix
    if pa.types.is_date32(t):
        def date32(v: int) -> str:
            try:
                return _date(_EPOCH_DATE + datetime.timedelta(days=v))
            except OverflowError:
                raise NotPrintable(v) from None
        return date32
    if pa.types.is_date64(t):
        return lambda v: _timestamp(v, 1_000, 0)
    if pa.types.is_time(t):
        per_second = _PER_SECOND[t.unit]
        return lambda v: _clock(v // per_second, (v % per_second) * (1_000_000_000 // per_second))
    return None


def storage(t: pa.DataType) -> pa.DataType:
    """The integer type a temporal array is viewed as."""
    return pa.int32() if t.bit_width == 32 else pa.int64()

"""Record-batch readers for Flight whose errors reach the client with an exact gRPC code and a clean message.

pyarrow turns any Python exception raised while a Flight stream is produced into a status that
carries the Python traceback (`<msg>. Detail: Python exception: Traceback ...`), and that text is
sent to the client. A reader imported through the Arrow C stream interface reports failures as an
errno plus a message instead, which Arrow maps to a status with no detail: `EINVAL` becomes
INVALID_ARGUMENT and `ENOSYS` UNIMPLEMENTED, with exactly our message. So batches are produced by
Python (rows can be counted, engine errors translated) but handed to Flight through a small
ArrowArrayStream built with ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa

log = logging.getLogger("runtime.flight")

StreamCode = Literal["invalid_argument", "unimplemented", "unknown"]
# Arrow's C stream import maps EINVAL and ENOSYS to exact statuses; any other errno is sent as UNKNOWN.
_ERRNO: dict[StreamCode, int] = {"invalid_argument": errno.EINVAL, "unimplemented": errno.ENOSYS,
                                 "unknown": errno.ETIMEDOUT}
_ARROW_ARRAY_SIZE = 80  # sizeof(struct ArrowArray): 5 int64 + 5 pointers


class StreamError(Exception):
    """Raised by a batch iterator to end the stream with this gRPC code and message."""

    def __init__(self, code: StreamCode, message: str) -> None:
        super().__init__(message)
        self.code: StreamCode = code
        self.message = message


class _CStream(ctypes.Structure):
    pass


_GetSchema = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_CStream), ctypes.c_void_p)
_GetNext = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_CStream), ctypes.c_void_p)
_GetLastError = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CStream))
_Release = ctypes.CFUNCTYPE(None, ctypes.POINTER(_CStream))
_CStream._fields_ = [
    ("get_schema", _GetSchema),
    ("get_next", _GetNext),
    ("get_last_error", _GetLastError),
    ("release", _Release),
    ("private_data", ctypes.c_void_p),
]


@dataclass
class _Source:
    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]
    error: ctypes.Array[ctypes.c_char] | None = field(default=None)


# The C side holds only an integer key; the Python objects live here until `release`.
_sources: dict[int, _Source] = {}
_keys = itertools.count(1)
_lock = threading.Lock()


def _source(stream: ctypes._Pointer[_CStream]) -> _Source:
    return _sources[stream.contents.private_data]


def _fail(source: _Source, code: int, message: str) -> int:
    source.error = ctypes.create_string_buffer(message.encode("utf-8", "replace"))
    return code


@_GetSchema
def _get_schema(stream: ctypes._Pointer[_CStream], out: int) -> int:
    source = _source(stream)
    try:
        source.schema._export_to_c(out)
    except Exception as e:  # noqa: BLE001 - must become an errno, never cross the C boundary
        return _fail(source, errno.EINVAL, str(e))
    return 0


@_GetNext
def _get_next(stream: ctypes._Pointer[_CStream], out: int) -> int:
    source = _source(stream)
    try:
        batch = next(source.batches)
        batch._export_to_c(out)
    except StopIteration:
        ctypes.memset(out, 0, _ARROW_ARRAY_SIZE)  # a released ArrowArray marks the end of the stream
    except StreamError as e:
        return _fail(source, _ERRNO[e.code], e.message)
    except Exception as e:  # noqa: BLE001 - must become an errno, never cross the C boundary
        return _fail(source, errno.EINVAL, str(e))
    return 0


@_GetLastError
def _get_last_error(stream: ctypes._Pointer[_CStream]) -> int | None:
    error = _source(stream).error
    return ctypes.addressof(error) if error is not None else None


@_Release
def _release(stream: ctypes._Pointer[_CStream]) -> None:
    with _lock:
        source = _sources.pop(stream.contents.private_data, None)
    stream.contents.release = _Release()
    close = getattr(source.batches, "close", None) if source is not None else None
    if close is not None:
        try:
            close()  # an abandoned generator runs its `finally` now, not at some later GC
        except Exception:  # noqa: BLE001 - nothing may cross the C boundary
            log.exception("Flight stream cleanup failed")


def reader(schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> pa.RecordBatchReader:
    """A reader over `batches`; a StreamError from the iterator ends the stream with its code."""
    with _lock:
        key = next(_keys)
        _sources[key] = _Source(schema, iter(batches))
    c_stream = _CStream(_get_schema, _get_next, _get_last_error, _release, key)
    # Importing moves the struct's contents into Arrow; our copy is released and may be dropped.
    return pa.RecordBatchReader._import_from_c(ctypes.addressof(c_stream))


def failing_reader(code: StreamCode, message: str, schema: pa.Schema | None = None) -> pa.RecordBatchReader:
    """A reader that fails on its first batch: how a DoGet reports INVALID_ARGUMENT/UNIMPLEMENTED cleanly."""

    def batches() -> Iterator[pa.RecordBatch]:
        raise StreamError(code, message)
        yield  # pragma: no cover - makes this a generator

    return reader(schema if schema is not None else pa.schema([]), batches())


def live_streams() -> int:
    """How many streams have not been released yet (tests check nothing leaks)."""
    with _lock:
        return len(_sources)

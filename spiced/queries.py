"""The active-query registry: every synchronous query running in this process (`POST /v1/sql`,
Flight raw-SQL DoGet, Flight SQL statements), listed by `GET /v1/sql/active` and stopped by
`POST /v1/sql/{query_id}/cancel` (spiced/http/queries.py).

Each query gets a UUIDv7 (time-ordered: 48-bit Unix milliseconds, then random bits), is listed with
its protocol, the first `PREVIEW_CHARS` characters of its SQL (longer SQL is cut there and ends with
`…`) and its start time in Unix milliseconds, and leaves the registry when it ends, however it ends
(spiced.tracker). The id is not sent to the client that runs the query, as upstream. Any caller the
HTTP API admits may list and cancel every query (upstream's releases up to v2.1.5 do not scope
them to a principal).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from .errors import QueryError
from .interrupt import Stopper

Protocol = Literal["http", "flight", "flightsql"]
PREVIEW_CHARS = 1000


def uuid7() -> uuid.UUID:
    """RFC 9562 version 7: Unix milliseconds in the top 48 bits, then version, random, variant, random."""
    value = (time.time_ns() // 1_000_000 & (1 << 48) - 1) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 4122 variant
    return uuid.UUID(int=value)


_HEX = frozenset("0123456789abcdefABCDEF")
_GROUP_STARTS = (0, 9, 14, 19, 24)
_GROUP_LENGTHS = (8, 4, 4, 4, 12)


def parse_query_id(text: str) -> uuid.UUID:
    """A query id as upstream parses it (Rust's uuid crate): 32 hex digits, hyphenated 8-4-4-4-12,
    `{hyphenated}` or `urn:uuid:hyphenated`, any case. ValueError carries the crate's message."""
    size = len(text.encode())
    inner = (text[1:-1] if size == 38 and text.startswith("{") and text.endswith("}")
             else text[9:] if size == 45 and text.startswith("urn:uuid:") else text)
    if size == 32 and set(text) <= _HEX:
        return uuid.UUID(hex=text)
    if size in (36, 38, 45) and len(inner) == 36 and all(
            (c == "-") if i in (8, 13, 18, 23) else (c in _HEX) for i, c in enumerate(inner)):
        return uuid.UUID(hex=inner)
    raise ValueError(_parse_error(text))


def _parse_error(text: str) -> str:
    """The uuid crate's account of why `text` is not a UUID (its `InvalidUuid::into_err`)."""
    if len(text) >= 2 and text.startswith("{") and text.endswith("}"):
        inner, offset, simple = text[1:-1], 1, False
    elif text.startswith("urn:uuid:"):
        inner, offset, simple = text[9:], 9, False
    else:
        inner, offset, simple = text, 0, True
    hyphens, bounds, index = 0, [0, 0, 0, 0], 0
    for c in inner:
        if c == "-":
            if hyphens < 4:
                bounds[hyphens] = index
            hyphens += 1
        elif c not in _HEX:
            return ("invalid character: expected an optional prefix of `urn:uuid:` followed by [0-9a-fA-F-], "
                    f"found `{c}` at {index + offset + 1}")
        index += len(c.encode())
    if hyphens == 0 and simple:
        return f"invalid length: expected length 32 for simple format, found {len(text.encode())}"
    if hyphens != 4:
        return f"invalid group count: expected 5, found {hyphens + 1}"
    for group in range(4):
        if bounds[group] != _GROUP_STARTS[group + 1] - 1:
            return (f"invalid group length in group {group}: expected {_GROUP_LENGTHS[group]}, "
                    f"found {bounds[group] - _GROUP_STARTS[group]}")
    return f"invalid group length in group 4: expected 12, found {index - _GROUP_STARTS[4]}"


def preview(sql: str) -> str:
    return sql if len(sql) <= PREVIEW_CHARS else sql[:PREVIEW_CHARS] + "…"


@dataclass(frozen=True, slots=True)
class ActiveQuery:
    id: uuid.UUID
    protocol: Protocol
    sql_preview: str
    started_at_ms: int
    stopper: Stopper = field(default_factory=Stopper, compare=False, repr=False)

    def cancel(self) -> None:
        self.stopper.stop(QueryError(f"Query {self.id} was cancelled", kind="cancelled"))

    def as_json(self) -> dict[str, object]:
        return {"query_id": str(self.id), "protocol": self.protocol, "sql_preview": self.sql_preview,
                "started_at_ms": self.started_at_ms}


class ActiveQueries:
    """Thread-safe: queries start and end on worker and gRPC threads, listings run on the event loop."""

    def __init__(self) -> None:
        self._queries: dict[uuid.UUID, ActiveQuery] = {}
        self._lock = threading.Lock()

    def start(self, protocol: Protocol, sql: str) -> ActiveQuery:
        query = ActiveQuery(uuid7(), protocol, preview(sql), time.time_ns() // 1_000_000)
        with self._lock:
            self._queries[query.id] = query
        return query

    def end(self, query: ActiveQuery) -> None:
        with self._lock:
            self._queries.pop(query.id, None)

    def running(self) -> list[ActiveQuery]:
        """Newest first."""
        with self._lock:
            queries = list(self._queries.values())
        return sorted(queries, key=lambda q: (q.started_at_ms, q.id.int), reverse=True)

    def cancel(self, query_id: uuid.UUID) -> bool:
        """Stop the query (it ends on its own thread, within about a second); False if none runs."""
        with self._lock:
            query = self._queries.get(query_id)
        if query is None:
            return False
        query.cancel()
        return True

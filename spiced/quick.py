"""Which queries start on the event loop instead of a worker thread.

Handing a query to a worker thread and back costs more than a small query itself: about 0.3 ms of
server CPU per `SELECT 1` at one connection and 0.5 ms at 16 (the wake-ups of the loop, the worker
and DataFusion's runtime, and the GIL passed between them), against 0.2–0.3 ms for planning and
running it. A query whose first batches come quickly is therefore started on the loop, where the
loop would otherwise wait for it anyway.

Whether a query is quick is learnt, not guessed: the first runs of a query go to a worker thread
and its first step there (plan, execute, first batches) is timed. Once `PROVEN` of its runs took
at most `QUICK`, it starts inline. Runs in between that were slower do not count against it: on a
busy machine a quick query often waits for a core or the GIL, while a heavy one (an aggregate over
a large table, a sort, a database far away) is never quick. A run slower than `SLOW` in a worker
starts the count again. An inline run is given `SLOW`: past it, the caller stops it and runs it
again in a worker (the loop is held at most about a second more, the time DataFusion takes to
notice the stop, spiced.interrupt), and the query never starts inline again. So a query that is
only sometimes heavy (its literals decide: `generate_series(1, $n)`) holds the loop once.

Queries are told apart by their SQL text with its literals blanked (a point lookup for any key is
one query), and by the catalog's version, so that learning starts again when a table is replaced.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from .errors import QueryError
from .interrupt import WATCHDOG, Stopper

T = TypeVar("T")
log = logging.getLogger("runtime.query")

QUICK = 0.002  # seconds
SLOW = 0.050
PROVEN = 3
KEPT = 4096

_LITERALS = re.compile(r"'(?:[^']|'')*'|(?<![\w$.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?!\w)")
_NEVER = -1


class QuickQueries:
    def __init__(self, quick: float = QUICK, slow: float = SLOW, proven: int = PROVEN, kept: int = KEPT) -> None:
        self._quick, self.slow, self._proven, self._kept = quick, slow, proven, kept
        self._seen: OrderedDict[tuple[int, str], int] = OrderedDict()  # key → quick runs (_NEVER: not inline)
        self._lock = threading.Lock()

    @staticmethod
    def key(sql: str, version: int) -> tuple[int, str]:
        return version, _LITERALS.sub("?", sql)

    def is_quick(self, key: tuple[int, str]) -> bool:
        return self._seen.get(key, 0) >= self._proven

    def record(self, key: tuple[int, str], seconds: float, inline: bool) -> None:
        """How long the first step of a query took, and whether it ran on the loop."""
        with self._lock:
            runs = self._seen.pop(key, 0)
            if runs != _NEVER:
                if seconds > self.slow:
                    runs = _NEVER if inline else 0
                elif seconds <= self._quick:
                    runs += 1
            self._seen[key] = runs
            if runs == self._proven:
                log.debug("Quick query, started on the event loop from now on: %s", key[1])
            if len(self._seen) > self._kept:
                self._seen.popitem(last=False)




def attempt_inline(run: Callable[[Stopper], T], stopper: Stopper, limit: float) -> T | None:
    """`run(attempt)` in this thread, where `attempt` is a stopper of its own that `stopper` (the
    query's: a cancel) stops too and that stops itself after `limit` seconds. None when the limit
    stopped it: the caller starts the query again in a worker thread."""
    attempt = Stopper()
    too_slow = QueryError(f"Not done within {limit:g}s on the event loop", kind="timeout")

    def follow() -> None:
        attempt.stop(stopper.error or too_slow)

    remove = stopper.on_stop(follow)
    alarm = WATCHDOG.arm(time.monotonic() + limit, attempt, too_slow)
    try:
        result = run(attempt)
    except QueryError as e:
        if e is not too_slow:
            raise
        result = None
    finally:
        went_off = not WATCHDOG.disarm(alarm)
    if went_off or attempt.error is too_slow:  # also when the limit passed as `run` returned
        remove()
        return None
    return result

"""Stopping a running query from another thread (`POST /v1/sql/{id}/cancel`), including while a
thread is blocked in DataFusion waiting for a batch.

DataFusion stops a query when its stream is dropped; a thread blocked in the stream's `next()`
holds it, and that call has no cancel. But the binding wakes once a second while it waits
(datafusion-python's `wait_for_future` runs a no-op Python statement so that Ctrl-C gets through),
and a Python exception made pending for that thread (`PyThreadState_SetAsyncExc`) goes off right
there: `next()` returns with it, the Rust future is dropped, and the caller drops the stream. So a
cancel stops the query within about a second, and a query that is never cancelled pays only two
lock round trips per batch: awaiting every first batch on an event loop instead (as timed queries
do, spiced.stream.WaitLoop) costs about 0.4 ms per `SELECT 1` (bench/first_batch.py).

The interrupt is only ever sent while the thread is inside `Stopper.call`, under the same lock
that marks the call's end, and a sent interrupt that has not gone off by then is made to go off
inside `call` (a Python function call checks for it), so it can never surface in unrelated code.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import ctypes
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import QueryError

T = TypeVar("T")

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.c_void_p)
_set_async_exc.restype = ctypes.c_int


class Interrupted(BaseException):
    """Made pending in a thread blocked in DataFusion; never leaves `Stopper.call`."""


class Stopped(Exception):
    """The query was stopped; `error` (a QueryError) is what ends it."""

    def __init__(self, error: QueryError) -> None:
        super().__init__(str(error))
        self.error = error


def _checkpoint() -> None:
    """Entering a Python function checks for a pending asynchronous exception."""


# The query whose `Stopper.call` is running in this thread: code deep inside a call (a database
# driver) registers how to cancel itself with `CURRENT.get().on_stop(...)`.
CURRENT: contextvars.ContextVar[Stopper | None] = contextvars.ContextVar("spiced_stopper", default=None)


class Stopper:
    """One query's off switch: `stop()` from any thread; the query's own thread runs its blocking
    DataFusion calls through `call` (or waits for a future through `wait`), which raise Stopped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []
        self._error: QueryError | None = None
        self._blocked: int | None = None  # the thread inside `call`
        self._interrupt_sent = False
        self._waiting: concurrent.futures.Future[object] | None = None

    @property
    def error(self) -> QueryError | None:
        """The error that stopped the query; None while it may run."""
        return self._error

    def stop(self, error: QueryError) -> bool:
        """End the query with `error`; False when it was already stopped."""
        with self._lock:
            if self._error is not None:
                return False
            self._error = error
            if self._blocked is not None:
                _set_async_exc(self._blocked, id(Interrupted))
                self._interrupt_sent = True
            waiting = self._waiting
            hooks, self._hooks = self._hooks, []
        if waiting is not None:
            waiting.cancel()
        for hook in hooks:
            try:
                hook()
            except Exception:  # a driver that cannot cancel: the interrupt still lands when it returns
                pass
        return True

    def on_stop(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run `hook` (from the stopping thread) when the query is stopped, for work an interrupt
        cannot reach: a database driver blocked in C is asked to cancel its statement. Returns
        the function that takes the hook back."""
        with self._lock:
            stopped = self._error is not None
            if not stopped:
                self._hooks.append(hook)
        if stopped:
            hook()

        def remove() -> None:
            with self._lock:
                if hook in self._hooks:
                    self._hooks.remove(hook)
        return remove

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in this thread, interrupted (within about a second) by `stop`."""
        me = threading.get_ident()
        with self._lock:
            if self._error is not None:
                raise Stopped(self._error)
            self._blocked = me
        went_off = False
        token = CURRENT.set(self)
        try:
            try:
                result = fn(*args)
            except Interrupted:
                went_off = True
            finally:
                CURRENT.reset(token)
                with self._lock:
                    self._blocked = None
                if self._interrupt_sent and not went_off:
                    # Sent as `fn` was returning (or raising): it goes off here, not in later code.
                    _checkpoint()
                    _set_async_exc(me, None)  # only if the checkpoint did not raise it
        except Interrupted:
            went_off = True
        if went_off:
            assert self._error is not None
            raise Stopped(self._error)
        return result

    def wait(self, future: concurrent.futures.Future[T]) -> T:
        """`future.result()`; `stop` cancels the future and this raises Stopped."""
        with self._lock:
            stopped = self._error is not None
            if not stopped:
                self._waiting = future  # type: ignore[assignment]
        if stopped:
            future.cancel()
        else:
            try:
                return future.result()
            except concurrent.futures.CancelledError:
                if self._error is None:
                    raise
            finally:
                with self._lock:
                    self._waiting = None
                # An exception from `result()` is kept by the future and its traceback keeps this
                # frame: without the `del` that cycle (and whatever the future's coroutine held,
                # such as a DataFusion stream) would live until the garbage collector runs.
                del future
        assert self._error is not None
        raise Stopped(self._error)


class Alarm:
    __slots__ = ("at", "stopper", "error", "armed")

    def __init__(self, at: float, stopper: Stopper, error: QueryError) -> None:
        self.at, self.stopper, self.error, self.armed = at, stopper, error, True


class Watchdog:
    """One thread that stops queries still running at a given time: time limits, and inline starts
    (spiced.quick) past theirs. (A threading.Timer per query starts a thread per query and waits
    for it to start: for a small query, more than the query.) Almost every alarm is disarmed long
    before it is due; disarmed ones leave the heap when due, or all at once when they are most of
    it, so the thread wakes about once per due alarm, not per query."""

    def __init__(self, name: str = "query-watchdog") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._alarms: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._disarmed = 0
        self._thread: threading.Thread | None = None

    def arm(self, at: float, stopper: Stopper, error: QueryError) -> Alarm:
        """`stopper.stop(error)` at `at` (time.monotonic()), unless disarmed first."""
        alarm = Alarm(at, stopper, error)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name=self._name, daemon=True)
                self._thread.start()
            heapq.heappush(self._alarms, (at, next(self._order), alarm))
            if self._alarms[0][2] is alarm:
                self._cond.notify()
        return alarm

    def disarm(self, alarm: Alarm) -> bool:
        """False when the alarm went off first (its stop is under way, or done)."""
        with self._cond:
            armed, alarm.armed = alarm.armed, False
            if armed:
                self._disarmed += 1
                if self._disarmed > 64 and self._disarmed * 2 > len(self._alarms):
                    self._alarms = [entry for entry in self._alarms if entry[2].armed]
                    heapq.heapify(self._alarms)
                    self._disarmed = 0
        return armed

    def pending(self) -> int:
        """Alarms held, disarmed ones not yet dropped included (for tests)."""
        with self._cond:
            return len(self._alarms)

    def _watch(self) -> None:
        with self._cond:
            while True:
                while self._alarms and not self._alarms[0][2].armed:
                    heapq.heappop(self._alarms)
                    self._disarmed -= 1
                if not self._alarms:
                    self._cond.wait()
                    continue
                left = self._alarms[0][0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                alarm = heapq.heappop(self._alarms)[2]
                alarm.armed = False
                self._cond.release()
                try:
                    alarm.stopper.stop(alarm.error)
                finally:
                    self._cond.acquire()


WATCHDOG = Watchdog()


def bounded_call(stopper: Stopper, at: float | None, error: QueryError, fn: Callable[..., T], *args: object) -> T:
    """`stopper.call(fn, *args)`, stopped with `error` if time.monotonic() reaches `at` first."""
    if at is None:
        return stopper.call(fn, *args)
    alarm = WATCHDOG.arm(at, stopper, error)
    try:
        return stopper.call(fn, *args)
    finally:
        WATCHDOG.disarm(alarm)

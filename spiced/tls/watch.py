"""Noticing that TLS material files changed: stat stamps, content comparison, the polling loop,
and filesystem notifications (`notify`) that wake the same check within milliseconds.

A stamp is `(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)` from `os.stat`, which follows
symlinks: an atomic rename gives a new inode and a kubelet `..data` swap resolves to a new target,
so both are seen without watching directories (ctime also catches a `chmod` that makes a file
readable again). A changed stamp only says "read me"; the bytes decide whether the material
really changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("runtime.tls.reload")

# After the filesystem reports a change, wait until it has been quiet this long before reading, so a
# certificate and key written one after the other are read as a pair (watchfiles' `step`).
SETTLE_MS = 15
_GROUP_MS = 300  # ... but never group changes for longer than this (watchfiles' `debounce`)

Stamp = tuple[int, int, int, int, int]

# A file modified this recently may be rewritten again within the filesystem's timestamp
# granularity with the same size, leaving its stamp unchanged; such "racy" stamps are re-read
# on the next tick (the same rule git uses for its index).
_RACY_NS = 1_000_000_000


def stamp(path: Path) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass(frozen=True, slots=True)
class Reading:
    data: bytes | None  # None when the read failed
    error: OSError | None
    changed: bool  # differs from the previous read (content, or readable vs not)


@dataclass
class _Seen:
    stamp: Stamp | None
    racy: bool
    content: bytes | None  # None: unreadable at the last read


class FileWatch:
    """Per watched path, the stamp and the bytes of its last read."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self._seen: dict[Path, _Seen] = {p: _Seen(None, True, None) for p in paths}

    @property
    def paths(self) -> list[Path]:
        return list(self._seen)

    def changed(self) -> set[Path]:
        """Paths whose stamp moved (or was racy) since their last read."""
        return {p for p, seen in self._seen.items() if seen.racy or stamp(p) != seen.stamp}

    def read(self, path: Path) -> Reading:
        """Read `path` and say whether the outcome differs from the last read.

        The stamp is taken *before* reading, so a write racing the read shows up as a change on the
        next tick. A failed read counts as content `None`: failing again is not a change, so a bad
        file is retried (and counted) only when it changes again, not on every tick.
        """
        before = stamp(path)
        racy = before is not None and time.time_ns() - max(before[3], before[4]) < _RACY_NS
        previous = self._seen[path].content
        try:
            data: bytes | None = path.read_bytes()
            error = None
        except OSError as e:
            data, error = None, e
        self._seen[path] = _Seen(before, racy, data)
        return Reading(data, error, data != previous)


async def poll(stop: asyncio.Event, interval: float, tick: Callable[[], None]) -> None:
    """Call `tick` every `interval` seconds until `stop` is set. A failing tick never ends the loop."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
        else:
            return
        try:
            tick()
        except Exception:
            log.exception("TLS reload: unexpected error while checking TLS material")


def watched_dirs(paths: Iterable[Path]) -> set[Path]:
    """The directories whose entries decide what `paths` read: each path's own directory (an atomic
    rename, or kubelet's `..data` symlink swap, happens there) and, for a symlink, its target's."""
    dirs: set[Path] = set()
    for path in paths:
        path = path.absolute()
        dirs.add(path.parent)
        with suppress(OSError):
            dirs.add(path.resolve(strict=True).parent)
    return {d for d in dirs if d.is_dir()}


async def notify(stop: asyncio.Event, paths: Iterable[Path], tick: Callable[[], None],
                 label: str = "TLS reload") -> None:
    """Call `tick` shortly after the filesystem reports any change in the directories holding `paths`,
    until `stop` is set. Returns early, with one WARN line, where notifications are unavailable (the
    polling loop, which runs beside this, then carries on alone)."""
    import watchfiles

    paths = list(paths)
    while not stop.is_set():
        dirs = watched_dirs(paths)
        if not dirs:
            return
        try:
            async for _ in watchfiles.awatch(*dirs, watch_filter=None, recursive=False, stop_event=stop,
                                             step=SETTLE_MS, debounce=_GROUP_MS):
                try:
                    tick()
                except Exception:
                    log.exception("%s: unexpected error while checking for changes", label)
                if watched_dirs(paths) != dirs:
                    break  # a symlink now points into another directory: watch that one instead
            else:
                return  # stopped
        except (OSError, RuntimeError) as e:  # no inotify here, or its watch limit reached
            log.warning("%s: filesystem notifications unavailable (%s); checking every 2 s instead", label, e)
            return

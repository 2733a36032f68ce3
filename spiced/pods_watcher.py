"""`--pods-watcher-enabled` (what `spice run` passes): the spicepod file watched, and its changes
applied without a restart, as upstream's pods watcher does.

- Datasets and views are applied (spiced.datasets.lifecycle `apply`): added, removed or changed
  ones are loaded, dropped or loaded again while the others keep serving.
- `runtime:` is read when the process starts: a change there is reported with upstream's WARN and
  takes effect at the next start.
- A spicepod that no longer parses or validates is reported with upstream's WARN, and the running
  state is kept.

The file is checked on filesystem notifications for its directory (an editor's rename, a
Kubernetes ConfigMap's symlink swap) and every 2 s besides; only a change of its content counts.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

from .config import RuntimeConfig, load_config
from .engine import Engine
from .errors import ConfigError
from .tls.watch import notify

log = logging.getLogger("runtime.pods_watcher")
POLL_SECONDS = 2.0


class PodsWatcher:
    def __init__(self, config: RuntimeConfig, args: argparse.Namespace, engine: Engine) -> None:
        self.config = config  # as started: `runtime:` changes are compared with it
        self.args = args
        self.engine = engine
        self.file = config.spicepod.file
        self._digest = _digest(self.file)
        self._changed = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        notifications = asyncio.create_task(notify(stop, [self.file], self._changed.set, label="Spicepod watcher"))
        try:
            while not stop.is_set():
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), POLL_SECONDS)
                self._changed.clear()
                await self.check()
        finally:
            notifications.cancel()

    async def check(self) -> None:
        """Apply the spicepod if its content changed since it was last read."""
        digest = _digest(self.file)
        if digest is None or digest == self._digest:
            return  # gone for a moment (a rename under way), or unchanged
        self._digest = digest
        try:
            config = await asyncio.to_thread(load_config, self.args, workdir=self.config.workdir)
        except ConfigError as e:
            detail = str(e).removeprefix("Failed to start Spice runtime: ")
            log.warning("Invalid app state detected, unable to load pods information: %s", detail)
            return
        for section in _runtime_changes(self.config.spicepod.raw, config.spicepod.raw):
            log.warning("`%s` changed, but it is applied when spiced starts: the previous value stays in effect. "
                        "Restart spiced to apply it.", section)
        for warning in config.spicepod.warnings:
            log.warning("%s", warning)
        log.info("Spicepod %s changed; applying its datasets and views.", self.file.name)
        await self.engine.apply(config.spicepod)


def _digest(file: Path) -> bytes | None:
    try:
        return hashlib.sha256(file.read_bytes()).digest()
    except OSError:
        return None


def _runtime_changes(old: Mapping[str, object], new: Mapping[str, object]) -> list[str]:
    before, after = old.get("runtime"), new.get("runtime")
    before = before if isinstance(before, Mapping) else {}
    after = after if isinstance(after, Mapping) else {}
    return [f"runtime.{key}" for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]

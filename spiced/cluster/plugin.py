"""What an executor received from its scheduler, where tasks running on it can read it.

The executor installs the plugin before its worker registers with the scheduler, so no task can
reach a worker that does not have it."""

from __future__ import annotations

from distributed import Worker, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from ..config import Spicepod


class SpicepodPlugin(WorkerPlugin):
    name = "spiced"

    def __init__(self, spicepod: Spicepod) -> None:
        self.spicepod = spicepod


def worker_spicepod(worker: Worker | None = None) -> Spicepod:
    """The spicepod of the executor running the calling task, or of `worker` (`Client.run` passes it to a
    function that takes `dask_worker`)."""
    plugin = (worker or get_worker()).plugins.get(SpicepodPlugin.name)
    if not isinstance(plugin, SpicepodPlugin):
        raise RuntimeError("this Dask worker is not a spiced executor: it has no spicepod")
    return plugin.spicepod

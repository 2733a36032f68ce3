"""An executor's DataFusion session's object stores.

Stages travel as DataFusion plans that name their files: a local path, which an executor reads
where the scheduler does (a shared volume), or an `s3://` / `https://` URL, which it reads through
the same object store as the scheduler, built on the executor from the spicepod the scheduler sent
(spiced/cluster/definition.py: its secrets resolved there).
"""

from __future__ import annotations

from datafusion import SessionContext
from distributed import Worker

from ..connectors.files import FileOptions, register_store
from .plugin import worker_spicepod


def register_object_stores(session: SessionContext, worker: Worker) -> None:
    """The object stores of the executor's spicepod in `session` (the execution plugin's hook)."""
    for dataset in worker_spicepod(worker).datasets:
        if isinstance(dataset.options, FileOptions):
            register_store(session, dataset.options)

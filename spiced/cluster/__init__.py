"""Cluster mode on Dask `distributed`: a scheduler and executors joined over mutual TLS.

Roles (flags parsed in spiced/config.py, wired in spiced/runtime.py and spiced/cluster/executor.py):

- `spiced --role scheduler …` is the normal runtime (HTTP, Flight, the spicepod) plus a Dask
  `Scheduler` listening on `--node-bind-address` (`tls://`, plaintext `tcp://` only with
  `--allow-insecure-connections`).
- `spiced --scheduler-address https://host:50052 …` (or `--role executor`) runs a Dask `Worker` in
  its own process (no Nanny), an HTTP health listener (`/health`, `/v1/ready`) and no SQL. It needs
  no spicepod: it asks the scheduler for its app definition over the mTLS channel first
  (spiced/cluster/definition.py) and then joins.

The API for query execution (spiced/cluster/execution.py):

On the scheduler, `RuntimeState.cluster` is a `spiced.cluster.node.ClusterNode`:

    node.client              # distributed.Client, SYNCHRONOUS, on its own IO thread: call it from
                             # threads (`node.client.submit(...).result()`, `.gather(...)`), never
                             # from the runtime's event loop, which runs the scheduler itself
                             # (from a coroutine: `await asyncio.to_thread(...)`)
    node.executors()         # tuple[ExecutorInfo, ...]: address (tls://host:port), name, nthreads, status
    await node.wait_for_executors(n, timeout)   # on the runtime's event loop

On an executor, inside a task:

    from spiced.cluster.plugin import worker_spicepod
    spicepod = worker_spicepod()   # the scheduler's spicepod (spiced.config.Spicepod), secrets resolved
                                   # (in a `Client.run` function: `worker_spicepod(dask_worker)`)

DataFusion is imported on executors at startup, so a first task does not pay for it. Executors do
not build a DataFusion session: the execution side does, per task or once per worker (remember
`datafusion.execution.enable_file_stream_work_stealing=false` for partitioned scans).

Importing this package imports `distributed`, which sets its own loggers' levels on first import;
the levels spiced configured (`SPICED_LOG`, `-v`) are put back.
"""

from __future__ import annotations

import logging


def _import_distributed() -> None:
    names = ("distributed", "distributed.client", "distributed.gc")
    levels = {name: logging.getLogger(name).level for name in names}
    import distributed  # noqa: F401

    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


_import_distributed()

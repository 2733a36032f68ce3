"""`spiced` entry point: flags → config → runtime (a cluster executor's own, spiced/cluster/executor.py).

Exit codes, as upstream: 2 for a usage error (argparse), 1 when the configuration, the TLS
material or a bind is refused, 0 once a started runtime has shut down.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import logs
from .config import cluster_role, load_config, load_executor_config, parse_args, standalone_cluster_warnings
from .errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure(verbosity=2 if args.very_verbose else args.verbose, env_filter=os.environ.get("SPICED_LOG"))
    if args.open_telemetry is not None:
        logging.getLogger("spiced").warning(
            "`--open_telemetry` is deprecated and has no effect; it will be removed in a future version")
    for warning in standalone_cluster_warnings(args):
        logging.getLogger("spiced").warning("%s", warning)
    try:
        if cluster_role(args) == "executor":
            from .cluster.executor import ExecutorRuntime

            code = ExecutorRuntime(load_executor_config(args)).run()
        else:
            config = load_config(args)
            from .runtime import Runtime

            code = Runtime(config, args).run()
    except ConfigError as e:
        print(f"Spice Runtime error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """End the process once the runtime's bounded shutdown is over, skipping interpreter finalizers:
    a Flight server still waiting on a stalled client would otherwise block exit in pyarrow's
    `FlightServerBase` destructor, with no bound."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

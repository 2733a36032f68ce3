"""`spice run`: start the `spiced` of this installation with upstream's defaults, forward signals, return its code.

The runtime gets its own process group so that a terminal Ctrl-C reaches it once, through us, rather than
twice (directly and forwarded); a second SIGINT would otherwise count as "force exit" in the runtime.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from spice_cli import CliError

DEFAULT_FLAGS = ("--metrics", "127.0.0.1:9090", "--pods-watcher-enabled")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def runtime_argv(args: Sequence[str], verbosity: int = 0) -> list[str]:
    """The runtime command line: defaults, `-v`/`-vv` from `spice -v run`, then the user's args unchanged."""
    verbose = [] if verbosity <= 0 else ["-v"] if verbosity == 1 else ["-vv"]
    return [sys.executable, "-m", "spiced", *DEFAULT_FLAGS, *verbose, *args]


def exit_code(returncode: int) -> int:
    """The shell convention for a child killed by a signal: 128 + signal number."""
    return 128 - returncode if returncode < 0 else returncode


def run(args: Sequence[str], verbosity: int = 0) -> int:
    print("Spice.ai runtime starting...", file=sys.stderr, flush=True)
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)  # arrived while the child was being spawned
        else:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        try:
            child = subprocess.Popen(runtime_argv(args, verbosity), process_group=0)
        except OSError as e:
            raise CliError(f"error running Spice.ai: {e}") from None
        for signum in pending:
            child.send_signal(signum)
        code = exit_code(child.wait())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0:
        print("error running Spice.ai", file=sys.stderr, flush=True)
    return code

"""The `spice` command line: `run`, `sql`, `status`, `datasets`, `refresh`, `version`, `init`, the dev PKI `tls`
and the cluster's dev PKI `cluster tls`.

    CliError        one line on stderr, exit 1 (raised anywhere, printed once by `app.main`)
"""

from __future__ import annotations

__version__ = "0.1.0"


class CliError(Exception):
    """A failure the user can act on: its message is printed as one line and the CLI exits 1."""

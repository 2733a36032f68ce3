"""Log lines in upstream's shape: `<RFC3339 UTC>  INFO runtime::flight: message key=value`.

Logger names use dots (`runtime.flight`) and print as upstream's targets (`runtime::flight`).
Structured fields travel in `extra={"fields": {...}}`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

# Loggers at INFO by default, as upstream; everything else (libraries) at WARN.
OWN_TARGETS = ("spiced", "runtime", "secrets", "data_components", "cache", "extensions")

_LEVELS = {"TRACE": TRACE, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING,
           "WARNING": logging.WARNING, "ERROR": logging.ERROR, "OFF": logging.CRITICAL + 10}
_NAMES = {TRACE: "TRACE", logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN",
          logging.ERROR: "ERROR", logging.CRITICAL: "ERROR"}


class SpiceFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        level = _NAMES.get(record.levelno, record.levelname)
        line = f"{ts} {level:>5} {record.name.replace('.', '::')}: {record.getMessage()}"
        fields: Mapping[str, Any] | None = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info and logging.getLogger().isEnabledFor(logging.DEBUG):
            line += "\n" + self.formatException(record.exc_info)
        return line


def parse_filter(spec: str) -> tuple[int, dict[str, int]]:
    """Parse `SPICED_LOG` (`DEBUG`, `runtime=TRACE,WARN`) into a default level and per-target levels."""
    default: int | None = None
    explicit: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, level = part.rpartition("=")
        lvl = _LEVELS.get(level.strip().upper())
        if lvl is None:
            continue
        if name:
            explicit[name.strip().replace("::", ".")] = lvl
        else:
            default = lvl
    # A bare level replaces the whole filter, our own targets included; named targets win over it.
    targets = {t: default for t in OWN_TARGETS} if default is not None else {}
    targets.update(explicit)
    return (logging.WARNING if default is None else default), targets


def configure(verbosity: int = 0, env_filter: str | None = None) -> None:
    """Install the formatter on stderr. `-v`/`-vv` win over `SPICED_LOG`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SpiceFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    default, targets = logging.WARNING, {t: logging.INFO for t in OWN_TARGETS}
    if env_filter:
        default, parsed = parse_filter(env_filter)
        targets.update(parsed)
    if verbosity:
        own = logging.DEBUG if verbosity == 1 else TRACE
        targets.update({t: own for t in OWN_TARGETS})
    root.setLevel(default)
    for name, level in targets.items():
        logging.getLogger(name).setLevel(level)

"""Upstream's duration texts (`10s`, `500ms`, `1h30m`, `7d`) as seconds."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConfigError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def seconds(text: str) -> float | None:
    """`text` as seconds; None when it is not a duration."""
    compact = text.replace(" ", "")
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def parse_duration(text: str, key: str, file: Path) -> float:
    """A spicepod duration; a bad one is a config error naming the file and the key."""
    value = seconds(text)
    if value is None:
        raise ConfigError(f"Failed to start Spice runtime: Unable to load spicepod {file}: {key}: "
                          f"invalid duration {text!r} (expected e.g. 10s, 500ms, 1m)")
    return value

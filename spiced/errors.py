"""The runtime's exception tree, mapped once at each boundary.

    SpicedError
     ├── ConfigError          bad flags or spicepod: exit 1, "Spice Runtime error: <message>"
     │    └── TlsConfigError  bad TLS / mTLS configuration ("Unable to configure TLS: ...")
     ├── MaterialError        TLS material that cannot be read or parsed (startup or reload)
     └── QueryError           SQL that is refused or fails: HTTP 4xx, Flight INVALID_ARGUMENT
"""

from __future__ import annotations

from typing import Literal


class SpicedError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(SpicedError):
    """Configuration that cannot run. The message is the text after `Spice Runtime error: `."""


class TlsConfigError(ConfigError):
    """TLS or mTLS configuration that cannot run."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"Unable to configure TLS: {detail}")
        self.detail = detail


ReloadResult = Literal["ok", "io_error", "parse_error"]


class MaterialError(SpicedError):
    """TLS material that could not be read (`io_error`) or parsed (`parse_error`).

    Messages never contain key bytes: they name the file and the kind of problem only.
    """

    def __init__(self, message: str, result: ReloadResult) -> None:
        super().__init__(message)
        self.result: ReloadResult = result


class QueryError(SpicedError):
    """A query that was refused or failed; `message` is what the client sees."""

    def __init__(self, message: str, *, kind: Literal["invalid", "timeout", "internal"] = "invalid") -> None:
        super().__init__(message)
        self.kind = kind

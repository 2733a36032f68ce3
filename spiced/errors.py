"""The runtime's exception tree, mapped once at each boundary.

    SpicedError
     ├── ConfigError          bad flags or spicepod: exit 1, "Spice Runtime error: <message>"
     │    └── TlsConfigError  bad TLS / mTLS configuration ("Unable to configure TLS: ...")
     ├── MaterialError        TLS material that cannot be read or parsed (startup or reload)
     └── QueryError           SQL that is refused or fails; its `kind` decides the HTTP status, the
                              Flight code and the `err_code` metric label (spiced/tracker.py)
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


# How a query ended in failure, classified once (the engine classifies DataFusion's errors by their
# kind, spiced.engine.classify) and mapped by each protocol to its status and by spiced.tracker to
# the `err_code` label:
#   syntax               DataFusion `SQL error` (the parser)
#   planning             `Error during planning`, `Schema error`
#   execution            `Execution error`, `Object Store error`, `External error`
#   unsupported          `This feature is not implemented` (the client's query, counted as upstream's InternalError)
#   resources_exhausted  `Resources exhausted` (a memory pool refusal)
#   internal             anything else (Arrow, IO, internal errors, an encoder bug)
#   timeout              runtime.query.timeout expired
#   cancelled            POST /v1/sql/{id}/cancel
#   disconnected         the client went away before the last batch (never raised by the engine)
QueryErrorKind = Literal["syntax", "planning", "execution", "unsupported", "resources_exhausted", "internal",
                         "timeout", "cancelled", "disconnected"]
CLIENT_ERROR_KINDS: frozenset[QueryErrorKind] = frozenset({"syntax", "planning", "execution", "unsupported"})


class QueryError(SpicedError):
    """A query that was refused or failed; `message` is what the client sees."""

    def __init__(self, message: str, *, kind: QueryErrorKind = "internal") -> None:
        super().__init__(message)
        self.kind: QueryErrorKind = kind

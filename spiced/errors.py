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
# kind, spiced.errors.classify) and mapped by each protocol to its status and by spiced.tracker to
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
#   not_cached           `Cache-Control: only-if-cached` and no cached result (spiced/results_cache.py)
#   unavailable          cluster mode: the executors running the query died, or none is left (retryable)
QueryErrorKind = Literal["syntax", "planning", "execution", "unsupported", "resources_exhausted", "internal",
                         "timeout", "cancelled", "disconnected", "not_cached", "unavailable"]
CLIENT_ERROR_KINDS: frozenset[QueryErrorKind] = frozenset({"syntax", "planning", "execution", "unsupported"})


class QueryError(SpicedError):
    """A query that was refused or failed; `message` is what the client sees."""

    def __init__(self, message: str, *, kind: QueryErrorKind = "internal") -> None:
        super().__init__(message)
        self.kind: QueryErrorKind = kind


def engine_message(e: BaseException) -> str:
    """DataFusion's text without the Python binding's `DataFusion error: ` wrapper."""
    text = str(e)
    return text.removeprefix("DataFusion error: ")


# DataFusionError's Display prefixes → kind (upstream's error_code.rs classifies the same variants).
_KINDS: tuple[tuple[str, QueryErrorKind], ...] = (
    ("SQL error: ", "syntax"),
    ("Error during planning: ", "planning"),
    ("Schema error: ", "planning"),
    ("Execution error: ", "execution"),
    ("Object Store error: ", "execution"),
    ("External error: ", "execution"),
    ("This feature is not implemented: ", "unsupported"),
    ("Resources exhausted: ", "resources_exhausted"),
)


def classify(message: str) -> QueryErrorKind:
    """The kind of a DataFusion error from its text; a `Context` wrapper (`<what>\ncaused by\n<error>`)
    is classified by the error it wraps, as upstream unwraps Context and Shared."""
    inner = message.rpartition("caused by\n")[2].lstrip()
    for prefix, kind in _KINDS:
        if inner.startswith(prefix):
            return kind
    return "internal"


def engine_error(e: BaseException) -> QueryError:
    """A DataFusion failure as the QueryError the client sees, classified once."""
    message = engine_message(e)
    return QueryError(message, kind=classify(message))

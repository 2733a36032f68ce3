"""Everything the CLI prints: bordered result tables, the `Time:` line, REPL error labels, plain tables.

The bordered table follows arrow-rs `pretty_format_batches` (what upstream's REPL prints): `+`/`-`/`|`
borders, a header row, left-aligned cells with one space of padding, NULL as an empty cell.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

MAX_ROWS = 500

GREY = "\x1b[38;5;8m"
RED = "\x1b[31m"
RESET = "\x1b[0m"

# gRPC code name -> (label, message or None for "the server's own message")
_LABELS: dict[str, tuple[str, str | None]] = {
    "INVALID_ARGUMENT": ("Query Error", None),
    "ALREADY_EXISTS": ("Query Error", None),
    "NOT_FOUND": ("Query Error", None),
    "UNAVAILABLE": ("Query Error", None),
    "INTERNAL": ("Internal Error", "Unexpected internal error. Use '.error' for details."),
    "UNKNOWN": ("Error", "Unexpected error. Use '.error' for details."),
    "DATA_LOSS": ("Error", "Unexpected error. Use '.error' for details."),
    "FAILED_PRECONDITION": ("Error", "Unexpected error. Use '.error' for details."),
    "UNAUTHENTICATED": ("Authentication Failed", "Invalid credentials. Verify credentials and try again."),
    "PERMISSION_DENIED": ("Permission Denied",
                          "Insufficient permissions. Check authorization scopes or account access."),
    "DEADLINE_EXCEEDED": ("Timeout", "Query exceeded time limit. Optimize query or increase timeout if configurable."),
    "CANCELLED": ("Operation Cancelled", "Request cancelled. Retry if needed."),
    "ABORTED": ("Operation Aborted", "Request aborted before completion. Check logs or retry."),
    "RESOURCE_EXHAUSTED": ("Resource Exhausted",
                           "Server resources exhausted. Reduce query complexity or try later."),
    "UNIMPLEMENTED": ("Unsupported Operation", "Feature not implemented. Check documentation for alternatives."),
    "OUT_OF_RANGE": ("Result Limit Exceeded", "Results too large. Consider adding a LIMIT clause to the query."),
}
_TRUNCATE_AT = 280


def use_color(stream: IO[str]) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def paint(text: str, color: str, enabled: bool) -> str:
    return f"{color}{text}{RESET}" if enabled else text


# --- the `Time:` line -------------------------------------------------------------------------------

def format_seconds(seconds: float) -> str:
    """Shortest round-trip digits without an exponent, like Rust's `{}` for f64 (`0.022671708`, `1`)."""
    text = format(Decimal(repr(float(seconds))), "f")
    return text[:-2] if text.endswith(".0") else text


def time_line(seconds: float, *, shown: int, total: int, cached: bool = False) -> str:
    cache = " (cached)" if cached else ""
    if total == 0:
        return f"Time: {format_seconds(seconds)} seconds{cache}."
    rows = f"{total} rows" if shown == total else f"{shown}/{total} rows displayed"
    return f"Time: {format_seconds(seconds)} seconds. {rows}{cache}."


# --- error labels ---------------------------------------------------------------------------------

def error_text(code: str | None, message: str) -> tuple[str, str]:
    """The (label, text) the REPL prints for a failed query; `code` is a gRPC code name or None."""
    if code is None:
        return "Error", f"Unexpected Flight error: {message}. Check connection or query syntax."
    label, fixed = _LABELS.get(code, ("Error", "Unexpected error. Use '.error' for details."))
    if fixed is not None:
        return label, fixed
    if len(message) > _TRUNCATE_AT:
        lines = message.splitlines()
        if len(lines) > 1:
            return label, f"{lines[0]}\nMessage truncated due to length. Run '.error' for full details."
        return label, "Query failed. Message truncated; run '.error' for full details."
    return label, message


def error_line(code: str | None, message: str, *, color: bool) -> str:
    label, text = error_text(code, message)
    return f"{paint(label + ':', RED, color)} {text}"


# --- bordered result table ------------------------------------------------------------------------

_TRAILING_ZEROS = re.compile(r"\.(\d*?)0+(?=$|Z|[+-]\d)")


def _temporal(text: str) -> str:
    # pyarrow prints `2024-01-01 00:00:00.123000000`; arrow-rs prints `2024-01-01T00:00:00.123`.
    text = text.replace(" ", "T", 1)
    return _TRAILING_ZEROS.sub(lambda m: f".{m.group(1)}" if m.group(1) else "", text)


def _value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else repr(value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def column_strings(column: pa.ChunkedArray | pa.Array) -> list[str]:
    """Display text of every value of one column (NULL -> empty)."""
    # Imported here: `spice status` and friends render plain tables only, and pyarrow is most of their start-up.
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = kind.value_type
    if pa.types.is_temporal(kind) and not pa.types.is_duration(kind) and not pa.types.is_interval(kind):
        return ["" if v is None else _temporal(v) for v in pc.cast(column, pa.string()).to_pylist()]
    return [_value(v) for v in column.to_pylist()]


def bordered_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An arrow-rs style table; a cell holding newlines spans several text lines."""
    split_rows = [[cell.split("\n") for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in split_rows:
        for i, lines in enumerate(row):
            widths[i] = max(widths[i], *(len(line) for line in lines))
    border = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {c.ljust(w)} " for c, w in zip(cells, widths, strict=True)) + "|"

    out = [border, line(headers), border]
    for row in split_rows:
        height = max((len(lines) for lines in row), default=1)
        for k in range(height):
            out.append(line([lines[k] if k < len(lines) else "" for lines in row]))
    out.append(border)
    return "\n".join(out)


def result_table(table: pa.Table, max_rows: int = MAX_ROWS) -> str:
    """The first `max_rows` rows of an Arrow table as a bordered table."""
    head = table.slice(0, max_rows)
    columns = [column_strings(head.column(i)) for i in range(head.num_columns)]
    rows = [[col[r] for col in columns] for r in range(head.num_rows)]
    return bordered_table(head.column_names, rows)


# --- borderless tables (`spice status`, `spice datasets`) -----------------------------------------

def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Upper-case headers, left-aligned columns separated by spaces, no borders."""
    all_rows = [[h.upper() for h in headers], *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in all_rows)

"""spice_cli.render: bordered tables, the `Time:` line, error labels and borderless status tables."""

from __future__ import annotations

import datetime as dt
import io
from decimal import Decimal

import pyarrow as pa
import pytest

from spice_cli import render


def test_table_matches_arrow_pretty_print() -> None:
    table = pa.table({"id": [1, 2, 3], "city": ["Seattle", "Portland", None], "fare": [12.5, 8.25, 30.0]})
    assert render.result_table(table) == "\n".join([
        "+----+----------+------+",
        "| id | city     | fare |",
        "+----+----------+------+",
        "| 1  | Seattle  | 12.5 |",
        "| 2  | Portland | 8.25 |",
        "| 3  |          | 30.0 |",
        "+----+----------+------+",
    ])


def test_single_column_select_one() -> None:
    assert render.result_table(pa.table({"Int64(1)": [1]})) == \
        "+----------+\n| Int64(1) |\n+----------+\n| 1        |\n+----------+"


def test_header_only_when_no_rows() -> None:
    assert render.result_table(pa.table({"a": pa.array([], pa.int64())})) == "+---+\n| a |\n+---+\n+---+"


def test_multiline_cell_spans_lines() -> None:
    out = render.result_table(pa.table({"t": ["one\ntwo", "x"], "n": [1, 2]}))
    assert out.splitlines()[3:6] == ["| one | 1 |", "| two |   |", "| x   | 2 |"]


def test_value_formats() -> None:
    table = pa.table({
        "b": [True, None],
        "ts": pa.array([dt.datetime(2024, 1, 1, 0, 0, 0, 123000), dt.datetime(2024, 1, 2)], pa.timestamp("ns")),
        "tz": pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.UTC)] * 2, pa.timestamp("us", tz="UTC")),
        "d": [dt.date(2024, 3, 4), None],
        "dec": [Decimal("12.50"), Decimal("-1.00")],
        "bin": [b"\x01\xff", None],
        "l": [[1, 2], []],
        "s": [{"k": 1}, None],
        "f": [float("nan"), float("inf")],
        "dict": pa.array(["x", "y"]).dictionary_encode(),
    })
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in render.result_table(table).splitlines()[3:5]]
    assert rows[0] == ["true", "2024-01-01T00:00:00.123", "2024-01-01T00:00:00Z", "2024-03-04", "12.50", "01ff",
                       "[1, 2]", "{k: 1}", "NaN", "x"]
    assert rows[1] == ["", "2024-01-02T00:00:00", "2024-01-01T00:00:00Z", "", "-1.00", "", "[]", "", "inf", "y"]


def test_at_most_500_rows_are_rendered() -> None:
    out = render.result_table(pa.table({"n": list(range(1234))}))
    lines = out.splitlines()
    assert len(lines) == 3 + 500 + 1
    assert lines[-2] == "| 499 |" and "| 500 |" not in out


@pytest.mark.parametrize(("seconds", "text"), [
    (0.022671708, "0.022671708"), (5e-05, "0.00005"), (1.0, "1"), (12.5, "12.5"), (1e-07, "0.0000001"),
])
def test_seconds_are_shortest_round_trip_without_exponent(seconds: float, text: str) -> None:
    assert render.format_seconds(seconds) == text
    assert float(text) == seconds


def test_time_lines() -> None:
    assert render.time_line(0.022671708, shown=3, total=3) == "Time: 0.022671708 seconds. 3 rows."
    assert render.time_line(0.5, shown=1, total=1) == "Time: 0.5 seconds. 1 rows."
    assert render.time_line(0.5, shown=500, total=1234) == "Time: 0.5 seconds. 500/1234 rows displayed."
    assert render.time_line(0.01, shown=3, total=3, cached=True) == "Time: 0.01 seconds. 3 rows (cached)."
    assert render.time_line(0.01, shown=0, total=0) == "Time: 0.01 seconds."


@pytest.mark.parametrize(("code", "line"), [
    ("INVALID_ARGUMENT", "Query Error: table 'spice.public.foo' not found"),
    ("NOT_FOUND", "Query Error: table 'spice.public.foo' not found"),
    ("ALREADY_EXISTS", "Query Error: table 'spice.public.foo' not found"),
    ("UNAVAILABLE", "Query Error: table 'spice.public.foo' not found"),
    ("INTERNAL", "Internal Error: Unexpected internal error. Use '.error' for details."),
    ("UNKNOWN", "Error: Unexpected error. Use '.error' for details."),
    ("DATA_LOSS", "Error: Unexpected error. Use '.error' for details."),
    ("FAILED_PRECONDITION", "Error: Unexpected error. Use '.error' for details."),
    ("UNAUTHENTICATED", "Authentication Failed: Invalid credentials. Verify credentials and try again."),
    ("PERMISSION_DENIED",
     "Permission Denied: Insufficient permissions. Check authorization scopes or account access."),
    ("DEADLINE_EXCEEDED",
     "Timeout: Query exceeded time limit. Optimize query or increase timeout if configurable."),
    ("CANCELLED", "Operation Cancelled: Request cancelled. Retry if needed."),
    ("ABORTED", "Operation Aborted: Request aborted before completion. Check logs or retry."),
    ("RESOURCE_EXHAUSTED",
     "Resource Exhausted: Server resources exhausted. Reduce query complexity or try later."),
    ("UNIMPLEMENTED",
     "Unsupported Operation: Feature not implemented. Check documentation for alternatives."),
    ("OUT_OF_RANGE",
     "Result Limit Exceeded: Results too large. Consider adding a LIMIT clause to the query."),
    (None, "Error: Unexpected Flight error: table 'spice.public.foo' not found. Check connection or query syntax."),
])
def test_error_labels(code: str | None, line: str) -> None:
    assert render.error_line(code, "table 'spice.public.foo' not found", color=False) == line


def test_long_messages_are_truncated() -> None:
    multi = "first line of the error\n" + "x" * 300
    assert render.error_line("INVALID_ARGUMENT", multi, color=False) == (
        "Query Error: first line of the error\nMessage truncated due to length. Run '.error' for full details.")
    assert render.error_line("INVALID_ARGUMENT", "y" * 281, color=False) == (
        "Query Error: Query failed. Message truncated; run '.error' for full details.")
    assert render.error_line("INVALID_ARGUMENT", "y" * 280, color=False) == "Query Error: " + "y" * 280


def test_label_is_red_only_when_asked() -> None:
    assert render.error_line("INTERNAL", "m", color=True).startswith("\x1b[31mInternal Error:\x1b[0m ")


def test_colour_needs_a_terminal_and_no_NO_COLOR(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert render.use_color(Tty()) and not render.use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not render.use_color(Tty())


def test_plain_table() -> None:
    out = render.plain_table(["name", "endpoint", "status"],
                             [["http", "127.0.0.1:8090", "Ready"], ["metrics", "N/A", "Disabled"]])
    assert out.splitlines() == [
        "NAME     ENDPOINT        STATUS",
        "http     127.0.0.1:8090  Ready",
        "metrics  N/A             Disabled",
    ]

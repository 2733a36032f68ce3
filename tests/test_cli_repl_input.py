"""spice_cli.repl input handling: when a buffer is complete, multi-line assembly, commands, `show tables`."""

from __future__ import annotations

import io

import pytest

from spice_cli import repl
from spice_cli.flight_client import FlightSettings, SqlClient


@pytest.mark.parametrize("text", ["SELECT 1;", "  select 1 ;  ", "SELECT\n1;", ".exit", "EXIT", " Quit ", "q",
                                  ".error", "HELP", ".clear", ".clear history", "show tables", "SHOW TABLES;"])
def test_complete(text: str) -> None:
    assert repl.is_complete(text)


@pytest.mark.parametrize("text", ["SELECT 1", "SELECT 1; --", "", "   ", ".exi", "quit now", "SELECT ';' FROM t"])
def test_incomplete(text: str) -> None:
    assert not repl.is_complete(text)


def feed_all(lines: list[str]) -> tuple[list[str], bool]:
    assembler = repl.LineAssembler()
    out = [s for line in lines if (s := assembler.feed(line)) is not None]
    return out, assembler.pending


def test_statement_spans_lines_and_keeps_its_semicolon() -> None:
    assert feed_all(["SELECT", "  city,", "  fare", "FROM trips;"]) == (["SELECT\n  city,\n  fare\nFROM trips;"], False)


def test_blank_lines_between_statements_are_skipped() -> None:
    assert feed_all(["", "SELECT 1;", "   ", "SELECT 2;"]) == (["SELECT 1;", "SELECT 2;"], False)


def test_blank_line_inside_a_statement_is_kept() -> None:
    assert feed_all(["SELECT", "", "1;"]) == (["SELECT\n\n1;"], False)


def test_commands_submit_without_semicolon() -> None:
    assert feed_all(["help", ".error", "Exit"]) == (["help", ".error", "Exit"], False)


def test_unfinished_statement_stays_pending() -> None:
    assert feed_all(["SELECT 1;", "SELECT 2"]) == (["SELECT 1;"], True)


@pytest.mark.parametrize("text", ["show tables", "show tables;", "  SHOW TABLES  "])
def test_show_tables_rewrite(text: str) -> None:
    assert repl.rewrite(text) == (
        "select table_catalog, table_schema, table_name, table_type from information_schema.tables "
        "where table_schema != 'information_schema';")


def test_other_sql_is_sent_unchanged() -> None:
    assert repl.rewrite("show tables from x;") == "show tables from x;"


def _repl(out: io.StringIO) -> repl.Repl:
    # The client is never contacted by these commands (pyarrow connects lazily).
    return repl.Repl(SqlClient(FlightSettings("grpc://127.0.0.1:9")), out)


@pytest.mark.parametrize("command", [".exit", "exit", "QUIT", "q"])
def test_exit_commands_leave(command: str) -> None:
    out = io.StringIO()
    assert _repl(out).submit(command) is False
    assert out.getvalue() == ""


def test_help_text() -> None:
    out = io.StringIO()
    assert _repl(out).submit("help") is True
    assert out.getvalue() == (
        "Available commands:\n\n"
        ".exit, exit, quit, q: Exit the REPL\n"
        ".error: Show details of the last error\n"
        ".clear: Clear the screen\n"
        ".clear history: Clear the query history\n"
        "help: Show this help message\n\n"
        "Other lines will be interpreted as SQL\n")


def test_error_without_previous_error() -> None:
    out = io.StringIO()
    _repl(out).submit(".error")
    assert out.getvalue() == "No previous error recorded.\n"


def test_piped_loop_stops_at_exit_and_drops_unfinished_input() -> None:
    out = io.StringIO()
    r = _repl(out)
    repl._piped(r, io.StringIO("help\n.exit\nhelp\n"))
    assert out.getvalue().count("Available commands:") == 1
    out2 = io.StringIO()
    repl._piped(_repl(out2), io.StringIO("help\nSELECT 1"))
    assert out2.getvalue().count("Available commands:") == 1

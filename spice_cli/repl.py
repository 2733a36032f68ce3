"""The `spice sql` REPL: input assembly, commands, and the read loop (prompt_toolkit on a TTY, lines when piped).

Input is submitted when the trimmed buffer ends with `;` or is a command; otherwise the next line is
appended. Queries go through `flight_client.SqlClient`; everything printed comes from `render`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import IO

from spice_cli import CliError
from spice_cli.flight_client import ConnectionFailed, FlightSettings, QueryFailed, SqlClient
from spice_cli.render import GREY, MAX_ROWS, error_line, paint, result_table, time_line, use_color

BANNER = "Welcome to the Spice.ai SQL REPL! Type 'help' for help.\n\nshow tables; -- list available tables"
PROMPT = "sql> "
CONTINUATION = "  -> "
EXIT_COMMANDS = frozenset({".exit", "exit", "quit", "q"})
COMMANDS = EXIT_COMMANDS | {".error", "help", ".clear", ".clear history", "show tables"}
SHOW_TABLES = ("select table_catalog, table_schema, table_name, table_type from information_schema.tables "
               "where table_schema != 'information_schema';")
HELP = [(".exit, exit, quit, q", "Exit the REPL"), (".error", "Show details of the last error"),
        (".clear", "Clear the screen"), (".clear history", "Clear the query history"),
        ("help", "Show this help message")]
CONNECTION_HINT = ("Check if the Spice runtime is running, endpoint including port is correct, "
                   "and TLS config (if used) is valid.")


def is_complete(buffer: str) -> bool:
    text = buffer.strip()
    return text.endswith(";") or text.lower() in COMMANDS


def rewrite(sql: str) -> str:
    return SHOW_TABLES if sql.strip().lower() in ("show tables", "show tables;") else sql


class LineAssembler:
    """Joins piped lines into submissions; blank lines between statements are skipped."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def feed(self, line: str) -> str | None:
        if not self._lines and not line.strip():
            return None
        self._lines.append(line)
        buffer = "\n".join(self._lines)
        if not is_complete(buffer):
            return None
        self._lines = []
        return buffer.strip()

    @property
    def pending(self) -> bool:
        return bool(self._lines)


class Repl:
    """Runs submissions against one client and prints the results to `out`."""

    def __init__(self, client: SqlClient, out: IO[str], *, clear_history: Callable[[], None] = lambda: None) -> None:
        self.client = client
        self.out = out
        self.color = use_color(out)
        self.last_error: str | None = None
        self._clear_history = clear_history

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def submit(self, text: str) -> bool:
        """Handle one submission; False means leave the REPL."""
        command = text.strip().lower()
        if command in EXIT_COMMANDS:
            return False
        if command == ".error":
            self._print(self.last_error or "No previous error recorded.")
        elif command == "help":
            self._print("Available commands:\n")
            for name, what in HELP:
                self._print(f"{paint(name, GREY, self.color)}: {what}")
            self._print("\nOther lines will be interpreted as SQL")
        elif command == ".clear":
            if self.out.isatty():
                self.out.write("\x1b[2J\x1b[H")
                self.out.flush()
        elif command == ".clear history":
            self._clear_history()
        elif command:
            self.run_sql(rewrite(text))
        return True

    def run_sql(self, sql: str) -> bool:
        """Run one statement and print its table and `Time:` line, or its error label. True on success."""
        # Integer nanoseconds, like Rust's Duration: the seconds then print as `0.022671708`, not float noise.
        start = time.perf_counter_ns()
        try:
            result = self.client.query(sql)
        except QueryFailed as e:
            failure = e.failure
            self.last_error = f"{failure.code or 'ERROR'}: {failure.details}"
            self._print(error_line(failure.code, failure.message, color=self.color))
            return False
        total = result.table.num_rows
        body = "No results." if total == 0 else result_table(result.table)
        shown = min(total, MAX_ROWS)
        elapsed = (time.perf_counter_ns() - start) / 1e9
        self._print(f"{body}\n\n{time_line(elapsed, shown=shown, total=total, cached=result.cached)}")
        return True


def connect(settings: FlightSettings) -> SqlClient:
    """Open the client and probe it before anything is printed, as upstream does."""
    client = SqlClient(settings)
    try:
        client.probe()
    except ConnectionFailed as e:
        client.close()
        reason = str(e).rstrip(".")
        raise CliError(f"SQL REPL Error: Connection failed to spiced at '{settings.endpoint}': {reason}. "
                       f"{CONNECTION_HINT}") from None
    return client


def run(settings: FlightSettings, query: str | None = None) -> int:
    """`spice sql`: one-shot with `query`, interactive on a TTY, line by line when stdin is piped."""
    client = connect(settings)
    try:
        if query is not None:
            return 0 if Repl(client, sys.stdout).run_sql(rewrite(query)) else 1
        print(BANNER, flush=True)
        if sys.stdin.isatty() and sys.stdout.isatty():
            _interactive(client)
        else:
            _piped(Repl(client, sys.stdout), sys.stdin)
        return 0
    finally:
        client.close()


def _piped(repl: Repl, lines: Iterable[str]) -> None:
    assembler = LineAssembler()
    for line in lines:
        submission = assembler.feed(line.rstrip("\r\n"))
        if submission is not None and not repl.submit(submission):
            return
    # An unfinished statement at EOF is dropped silently, as upstream does.


def _interactive(client: SqlClient) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.formatted_text import ANSI
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

    bindings = KeyBindings()

    @bindings.add("enter")
    def _enter(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        if not buffer.text.strip() or is_complete(buffer.text):
            buffer.validate_and_handle()
        else:
            buffer.insert_text("\n")

    @bindings.add("c-c")
    def _interrupt(event: KeyPressEvent) -> None:
        # Ctrl-C discards a non-empty buffer and leaves on an empty one.
        event.app.exit(exception=KeyboardInterrupt() if event.current_buffer.text else EOFError())

    def new_session() -> PromptSession[str]:
        return PromptSession(ANSI(paint(PROMPT, GREY, True)), multiline=True, key_bindings=bindings,
                             prompt_continuation=CONTINUATION, history=InMemoryHistory(), enable_suspend=True)

    session = new_session()

    def clear_history() -> None:
        nonlocal session
        session = new_session()

    repl = Repl(client, sys.stdout, clear_history=clear_history)
    while True:
        try:
            text = session.prompt()
        except KeyboardInterrupt:
            continue
        except EOFError:
            return
        try:
            if not repl.submit(text):
                return
        except KeyboardInterrupt:
            continue  # Ctrl-C while a query runs abandons that query, not the session

"""Real, throwaway PostgreSQL and MariaDB servers for the data-connector tests, with TLS from the test PKI.

    with postgres_server(tmp_path, pki) as pg:             # PostgreSQL 15, TLS only, scram-sha-256
        pg.run_sql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")   # as the superuser
        mark = pg.mark()
        ... connect to pg.uri() (verify-full against pg.ca_cert) as pg.user / pg.password ...
        assert "SELECT id FROM t" in pg.statements(since=mark, user=pg.user)

    with mariadb_server(tmp_path, pki) as my:              # MariaDB 10.11, user `spice` REQUIRE SSL
        my.run_sql("CREATE TABLE t (id int)")               # as root, in my.database
        my.uri()                                           # mysql://spice:...@127.0.0.1:PORT/spicedb

Both servers listen on 127.0.0.1 only, on a free port, with a login user `spice` (random password), a
database `spicedb` it may use fully (tables the superuser creates there included), and every statement
logged so tests can assert what reached the server. `server_cert=` starts a server with another
certificate, e.g. `issue_named(pki, "db.example.test")` for a name the clients will not accept.

Where things live: the servers refuse to run as root (PostgreSQL) or should not (MariaDB), so when the
tests run as root each server runs as its Debian account (`postgres`, `mysql`) in a private directory
made with `mkdtemp` under /tmp and owned by that account. The pytest directory is not used for the live
server because pytest makes /tmp/pytest-of-<user> 0700 (re-tightened every session, so loosening the
parents would not stick) and because a unix socket path must stay under 108 bytes. The `directory`
argument receives the server's log when it stops, so a failed test keeps its evidence where pytest keeps
the other artefacts. The private directory is removed on stop. Not root: the servers run as the
current user, the same way.

The binaries come from the Debian packages (`scripts/install-db-tools.sh`), never from /usr/local/bin.
"""

from __future__ import annotations

import atexit
import datetime as dt
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.pki import Issued, Pki

START_TIMEOUT = 30.0  # generous: the 2-core CI machine may be running other tests at the same time
STOP_TIMEOUT = 10.0
PORT_ATTEMPTS = 4
LOG_TAIL = 40
USER = "spice"
DATABASE = "spicedb"


class DbServerError(RuntimeError):
    """A server or one of its tools failed; the message carries the relevant output or log tail."""


# ---------------------------------------------------------------- binaries


def _pg_bindir() -> Path:
    """The Debian PostgreSQL binaries: /usr/lib/postgresql/<newest>/bin, else what `pg_config --bindir` says.

    /usr/local/bin may hold wrappers or other builds, so it is never consulted."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    pg_config = shutil.which("pg_config", path="/usr/bin")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout
        bindir = Path(out.strip())
        if (bindir / "postgres").exists():
            return bindir
    raise DbServerError("PostgreSQL server binaries not found: run scripts/install-db-tools.sh")


def _mariadb_tool(*names: str) -> str:
    """The first of `names` found in the Debian locations (/usr/sbin, /usr/bin)."""
    for name in names:
        path = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if path:
            return path
    raise DbServerError(f"MariaDB tool {names[0]} not found: run scripts/install-db-tools.sh")


# ---------------------------------------------------------------- accounts, directories, processes


@dataclass(frozen=True)
class _Account:
    """Who runs a server: its Debian account when we are root, otherwise ourselves (None fields)."""

    uid: int | None
    gid: int | None

    @classmethod
    def service(cls, name: str) -> _Account:
        if os.geteuid() != 0:
            return cls(None, None)
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise DbServerError(f"system user {name!r} missing: run scripts/install-db-tools.sh") from None
        return cls(entry.pw_uid, entry.pw_gid)

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    @property
    def extra_groups(self) -> list[int] | None:
        """Popen's supplementary groups: none of root's when switching to the account, untouched otherwise."""
        return None if self.uid is None else []


def _private_dir(prefix: str, account: _Account) -> Path:
    """A fresh 0700 directory under /tmp owned by the server account (see the module docstring for why)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    account.chown(path)
    return path


def _install_tls_files(cert: Issued, ca: Path, directory: Path, account: _Account) -> None:
    """Copies of the server cert, its key and the CA (server.crt, server.key, ca.crt) that the server account
    owns and can read (the originals sit in a pytest dir it cannot enter); both servers insist the key is
    private."""
    for src, name, mode in ((cert.cert, "server.crt", 0o644), (cert.key, "server.key", 0o600),
                            (ca, "ca.crt", 0o644)):
        shutil.copyfile(src, directory / name)
        (directory / name).chmod(mode)
        account.chown(directory / name)


def _child_env(home: Path) -> dict[str, str]:
    """A small, predictable environment: English messages, UTF-8 text (psql takes its client encoding from
    it), UTC, and no PG*/MYSQL_* settings leaking in."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PGCLIENTENCODING": "UTF8", "TZ": "UTC"}


def _run(argv: Sequence[str], *, account: _Account, cwd: Path, input: str | None = None,
         timeout: float = START_TIMEOUT) -> str:
    """Run a tool to completion; its stdout, or DbServerError with both streams."""
    try:
        done = subprocess.run(list(argv), input=input, capture_output=True, encoding="utf-8", cwd=cwd,
                              env=_child_env(cwd), timeout=timeout, user=account.uid, group=account.gid,
                              extra_groups=account.extra_groups)
    except subprocess.TimeoutExpired as e:
        raise DbServerError(f"{Path(argv[0]).name} did not finish within {timeout:.0f} s") from e
    if done.returncode != 0:
        raise DbServerError(f"{Path(argv[0]).name} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


def _spawn(argv: Sequence[str], *, account: _Account, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start a server in its own session (so stop() can kill every process it forked), output to `log`.

    The log is opened here, by us, in append mode: the server's processes write whole lines through the
    inherited descriptor, which is immediate, so PostgreSQL's statement lines are there before the result
    reaches the client (MariaDB's general log is its own file, written before each statement runs)."""
    with open(log, "ab") as out:
        return subprocess.Popen(list(argv), cwd=cwd, env=_child_env(cwd), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, start_new_session=True, user=account.uid, group=account.gid,
                                extra_groups=account.extra_groups)


def _free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1; the server may still lose it to someone else (retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


class _PortInUse(Exception):
    """The server could not bind its port: try another one."""


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, *, ready: str, clash: str, name: str, offset: int = 0,
                timeout: float = START_TIMEOUT) -> None:
    """Wait for the server's own "ready" line in the log past `offset` (this attempt's part); _PortInUse on a
    bind clash, DbServerError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if ready in text:
            return
        if proc.poll() is not None:
            if clash in text:
                raise _PortInUse
            raise DbServerError(f"{name} exited with {proc.returncode} while starting; log tail:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise DbServerError(f"{name} not ready after {timeout:.0f} s; log tail:\n{_tail(log)}")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send `sig` to the server, wait, then SIGKILL its whole session: nothing it forked may outlive the test."""
    try:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait(STOP_TIMEOUT)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(STOP_TIMEOUT)


def _pg_literal(value: str) -> str:
    """A PostgreSQL string literal (standard_conforming_strings: a backslash is just a backslash)."""
    return "'" + value.replace("'", "''") + "'"


def _my_literal(value: str) -> str:
    """A MariaDB string literal (there a backslash escapes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _uri(scheme: str, user: str, password: str, host: str, port: int, database: str, params: dict[str, str]) -> str:
    query = ("?" + urllib.parse.urlencode(params, safe="/")) if params else ""
    return (f"{scheme}://{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
            f"@{host}:{port}/{urllib.parse.quote(database, safe='')}{query}")


# ---------------------------------------------------------------- certificates


def issue_named(pki: Pki, name: str, *dns_names: str) -> Issued:
    """A server leaf from the test CA whose SANs are `name` (and `dns_names`) only, not localhost/127.0.0.1:
    serve it with `server_cert=` to see clients that verify the host name refuse the server."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = []
    for n in (name, *dns_names):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            names.append(x509.DNSName(n))
    serial = x509.random_serial_number()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spiced tests")]))
            .issuer_name(pki.ca.certificate.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(pki.ca.private_key, hashes.SHA256()))
    cert_path, key_path = pki.directory / f"named-{name}.crt", pki.directory / f"named-{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Issued(name, cert_path, key_path, serial, cert)


# ---------------------------------------------------------------- the common server object


@dataclass
class LoggedStatement:
    user: str
    sql: str


_LIVE: set[DbServer] = set()


@dataclass(eq=False)
class DbServer:
    """What both servers share: where to connect, the statement log, and stopping."""

    name: str
    directory: Path        # the caller's directory: the logs are copied here on stop
    rundir: Path           # the private directory the live server uses (removed on stop)
    log: Path              # the server's own output (startup, errors; PostgreSQL: statements too)
    tls: bool
    ca_cert: Path
    password: str
    host: str = "127.0.0.1"
    port: int = 0
    user: str = USER
    database: str = DATABASE
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _baseline: int = field(default=0, repr=False)

    def _parse(self, text: str) -> list[LoggedStatement]:
        raise NotImplementedError

    def _stop_signal(self) -> signal.Signals:
        return signal.SIGKILL

    @property
    def statement_log(self) -> Path:
        return self.log

    @property
    def pid(self) -> int:
        """The server's main process (its others are its children)."""
        if self.proc is None:
            raise DbServerError(f"{self.name} is not running")
        return self.proc.pid

    def log_text(self) -> str:
        """The server log so far (PostgreSQL: connections with their TLS details, errors, statements), for
        ad-hoc assertions."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _statement_text(self) -> str:
        return self.statement_log.read_text(errors="replace") if self.statement_log.exists() else ""

    def logged(self, *, since: int | None = None, user: str | None = None) -> list[LoggedStatement]:
        """Statements the server received, with the user that sent them, in order."""
        entries = self._parse(self._statement_text())[self._baseline if since is None else since:]
        return [e for e in entries if user is None or e.user == user]

    def statements(self, *, since: int | None = None, user: str | None = None) -> list[str]:
        """SQL the server received since `since` (a mark(); default: since the server was handed to the test,
        so the setup is left out), optionally only that of `user`."""
        return [e.sql for e in self.logged(since=since, user=user)]

    def mark(self) -> int:
        """A position in the statement log: statements(since=mark) shows only what came after."""
        return len(self._parse(self._statement_text()))

    def stop(self) -> None:
        """Stop at once (no clean shutdown: the data is thrown away), keep the log, remove the private dir."""
        _LIVE.discard(self)
        if self.proc is not None:
            _kill(self.proc, self._stop_signal())
            self.proc = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            copies = [(self.log, f"{self.name}.log")]
            if self.statement_log != self.log:
                copies.append((self.statement_log, f"{self.name}-statements.log"))
            for log, name in copies:
                if log.exists():
                    shutil.copyfile(log, self.directory / name)
        finally:
            shutil.rmtree(self.rundir, ignore_errors=True)


@atexit.register
def _stop_leftovers() -> None:
    """A test run interrupted outside a `with` block still takes its servers down with it."""
    for server in list(_LIVE):
        server.stop()


def _start_on_free_port(server: DbServer, launch: Callable[[int], subprocess.Popen[bytes]], *,
                        ready: str, clash: str) -> None:
    """Start on a fresh free port, again on another one when the port was taken meanwhile."""
    for _ in range(PORT_ATTEMPTS):
        server.port = _free_port()
        offset = server.log.stat().st_size if server.log.exists() else 0
        server.proc = launch(server.port)
        try:
            _wait_ready(server.proc, server.log, ready=ready, clash=clash, name=server.name, offset=offset)
            return
        except _PortInUse:
            _kill(server.proc, signal.SIGKILL)
            server.proc = None
    raise DbServerError(f"{server.name}: no free port after {PORT_ATTEMPTS} attempts; log tail:\n{_tail(server.log)}")


@contextmanager
def _serving(server: DbServer, start: Callable[[], None]) -> Iterator[None]:
    """Run `start`, hand the server over, and stop it whatever happens (a failed start included)."""
    _LIVE.add(server)
    try:
        start()
        server._baseline = server.mark()
        yield
    finally:
        server.stop()


# ---------------------------------------------------------------- PostgreSQL

_PG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \S+ \[\d+\] (?:<(.*?)@.*?> )?[A-Z0-9]+:  (.*)$")
_PG_STATEMENT = re.compile(r"^(?:statement|execute [^:]*): (.*)$", re.S)


@dataclass(eq=False)
class PgServer(DbServer):
    bindir: Path = Path()

    def uri(self, *, host: str = "localhost", **params: str) -> str:
        """A libpq URI for the `spice` user; with TLS it verifies the server (verify-full against ca_cert)
        unless `params` say otherwise. `host` defaults to localhost: a name the default cert carries."""
        query = {"sslmode": "verify-full", "sslrootcert": str(self.ca_cert)} if self.tls else {"sslmode": "disable"}
        return _uri("postgresql", self.user, self.password, host, self.port, self.database, {**query, **params})

    @property
    def psql(self) -> str:
        """The Debian psql of the same version (a client for the tests too)."""
        return str(self.bindir / "psql")

    def run_sql(self, sql: str, *, database: str | None = None) -> str:
        """Run `sql` (one or more statements) as the superuser over the unix socket; the rows come back
        unaligned, '|'-separated, without headers. Stops at the first error (DbServerError)."""
        argv = [self.psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.rundir),
                "-p", str(self.port), "-U", "postgres", "-d", database or self.database, "-f", "-"]
        return _run(argv, account=_Account(None, None), cwd=self.rundir, input=sql)

    def _parse(self, text: str) -> list[LoggedStatement]:
        """The stderr log, one entry per line; PostgreSQL continues a multi-line message on lines that
        start with a tab."""
        messages: list[tuple[str, str]] = []
        for line in text.splitlines():
            if line.startswith("\t") and messages:
                user, message = messages[-1]
                messages[-1] = (user, message + "\n" + line[1:])
                continue
            m = _PG_LINE.match(line)
            if m:
                messages.append((m.group(1) or "", m.group(2)))
        out = []
        for user, message in messages:
            s = _PG_STATEMENT.match(message)
            if s:
                out.append(LoggedStatement(user, s.group(1)))
        return out

    def _stop_signal(self) -> signal.Signals:
        return signal.SIGQUIT  # the postmaster's immediate shutdown: it takes its backends down too


def _pg_conf(rundir: Path, tls: bool) -> str:
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": _pg_literal(str(rundir)),
        "max_connections": "50",
        "shared_buffers": "'32MB'",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "autovacuum": "off",
        "password_encryption": "'scram-sha-256'",
        "log_destination": "'stderr'",
        "logging_collector": "off",
        "log_statement": "'all'",
        "log_connections": "on",
        "log_line_prefix": "'%m [%p] %q<%u@%d> '",
        "lc_messages": "'C'",
        "timezone": "'UTC'",
        "log_timezone": "'UTC'",
        "ssl": "on" if tls else "off",
    }
    if tls:
        settings["ssl_cert_file"] = _pg_literal(str(rundir / "server.crt"))
        settings["ssl_key_file"] = _pg_literal(str(rundir / "server.key"))
    return "\n# tests/dbservers.py\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())


def _pg_hba(tls: bool) -> str:
    """The superuser only through the private socket; `spice` over TCP with a password, and with TLS on
    only over TLS, so a client that silently falls back to plaintext is refused."""
    tcp = "hostssl" if tls else "host"
    return ("local all postgres trust\n"
            f"{tcp} all all 127.0.0.1/32 scram-sha-256\n")


def _pg_setup(password: str) -> str:
    """`spice` owns spicedb and gets every right on what the superuser creates there (tests seed tables
    with run_sql, then read them as `spice`)."""
    return (f"CREATE ROLE {USER} LOGIN PASSWORD {_pg_literal(password)};\n"
            f"CREATE DATABASE {DATABASE} OWNER {USER};\n"
            f"\\connect {DATABASE}\n"
            f"ALTER DEFAULT PRIVILEGES FOR ROLE postgres GRANT ALL ON TABLES TO {USER};\n"
            f"ALTER DEFAULT PRIVILEGES FOR ROLE postgres GRANT ALL ON SEQUENCES TO {USER};\n"
            f"ALTER DEFAULT PRIVILEGES FOR ROLE postgres GRANT USAGE ON SCHEMAS TO {USER};\n")


@contextmanager
def postgres_server(directory: Path, pki: Pki, *, tls: bool = True,
                    server_cert: Issued | None = None) -> Iterator[PgServer]:
    """A fresh PostgreSQL cluster on 127.0.0.1:<free port>, serving `server_cert` (default pki.server,
    valid for localhost and 127.0.0.1) when `tls`. Stopped (immediately) when the block exits."""
    account = _Account.service("postgres")
    rundir = _private_dir("spiced-pg-", account)
    server = PgServer(name="postgres", directory=directory, rundir=rundir, log=rundir / "postgres.log", tls=tls,
                      ca_cert=pki.ca.cert, password=f"pg-{secrets.token_hex(12)}", bindir=_pg_bindir())
    data = rundir / "data"

    def start() -> None:
        _run([str(server.bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-locale",
              "-E", "UTF8", "--no-sync", "--no-instructions"], account=account, cwd=rundir)
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(_pg_conf(rundir, tls))
        (data / "pg_hba.conf").write_text(_pg_hba(tls))
        if tls:
            _install_tls_files(server_cert or pki.server, pki.ca.cert, rundir, account)
        argv = [str(server.bindir / "postgres"), "-D", str(data)]
        _start_on_free_port(
            server, lambda port: _spawn([*argv, "-p", str(port)], account=account, cwd=rundir, log=server.log),
            ready="database system is ready to accept connections", clash="Address already in use")
        server.run_sql(_pg_setup(server.password), database="postgres")

    with _serving(server, start):
        yield server


# ---------------------------------------------------------------- MariaDB

# "<date> <time>\t" on the first entry of a second, "\t\t" otherwise; then the connection id and command.
_MY_LINE = re.compile(r"^(?:\d{6} [ \d]\d:\d\d:\d\d)?\t+\s*(\d+) (\w[\w ]*?)\t(.*)$")
_MY_CONNECT = re.compile(r"^(\S*?)@")


@dataclass(eq=False)
class MariaDbServer(DbServer):
    client: str = ""

    @property
    def statement_log(self) -> Path:
        return self.rundir / "general.log"

    def uri(self, *, host: str | None = None, **params: str) -> str:
        """mysql://spice:<password>@127.0.0.1:<port>/spicedb, with `params` as the query string (TLS options
        are named differently by every driver, so none are added here)."""
        return _uri("mysql", self.user, self.password, host or self.host, self.port, self.database, params)

    def run_sql(self, sql: str, *, database: str | None = None) -> str:
        """Run `sql` as root over the unix socket, in `database` (default spicedb); rows come back
        tab-separated without headers. Stops at the first error (DbServerError)."""
        argv = [self.client, "--no-defaults", f"--socket={self.rundir / 'mysqld.sock'}", "--user=root",
                "--default-character-set=utf8mb4",
                "--batch", "--skip-column-names", f"--database={database or self.database}"]
        return _run(argv, account=_Account(None, None), cwd=self.rundir, input=sql)

    def _parse(self, text: str) -> list[LoggedStatement]:
        """The general log: `Query` (text protocol) and `Execute` (prepared, parameters filled in) entries;
        the user comes from the connection's `Connect` entry. A line that is not an entry continues the
        previous statement."""
        users: dict[str, str] = {}
        out: list[LoggedStatement] = []
        last: LoggedStatement | None = None
        for line in text.splitlines():
            m = _MY_LINE.match(line)
            if not m:
                if last is not None:
                    last.sql += "\n" + line
                continue
            conn, command, argument = m.groups()
            last = None
            if command in ("Connect", "Change user"):
                u = _MY_CONNECT.match(argument)
                users[conn] = u.group(1) if u else ""
            elif command in ("Query", "Execute"):
                last = LoggedStatement(users.get(conn, ""), argument)
                out.append(last)
        return out


def _mariadbd_argv(server: MariaDbServer, data: Path, tls: bool, port: int) -> list[str]:
    rundir = server.rundir
    argv = [_mariadb_tool("mariadbd", "mysqld"), "--no-defaults", f"--datadir={data}",
            f"--socket={rundir / 'mysqld.sock'}", f"--pid-file={rundir / 'mysqld.pid'}", f"--tmpdir={rundir}",
            "--skip-networking=0", "--bind-address=127.0.0.1", f"--port={port}", "--skip-name-resolve",
            "--general-log=1", f"--general-log-file={server.statement_log}", "--lc-messages=en_US",
            "--skip-log-bin", "--innodb-flush-log-at-trx-commit=0", "--innodb-buffer-pool-size=32M",
            "--innodb-doublewrite=0", "--innodb-use-native-aio=0", "--performance-schema=0",
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci", "--default-time-zone=+00:00",
            "--max-connections=100"]
    if tls:
        argv += [f"--ssl-cert={rundir / 'server.crt'}", f"--ssl-key={rundir / 'server.key'}",
                 f"--ssl-ca={rundir / 'ca.crt'}"]
    return argv


def _mariadb_setup(password: str, tls: bool) -> str:
    """`spice` from 127.0.0.1 only (TCP; TLS required when TLS is on): a driver that quietly moves to the
    unix socket (the Rust `mysql` crate does, unless prefer_socket=false) is refused and shows in the log.
    root keeps only its passwordless socket login (the install also creates root@127.0.0.1 and friends)."""
    require = " REQUIRE SSL" if tls else ""
    return (f"CREATE DATABASE {DATABASE};\n"
            f"CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY {_my_literal(password)}{require};\n"
            f"GRANT ALL ON {DATABASE}.* TO '{USER}'@'127.0.0.1';\n"
            "DELETE FROM mysql.global_priv WHERE User = '' OR (User = 'root' AND Host <> 'localhost');\n"
            "FLUSH PRIVILEGES;\n")


@contextmanager
def mariadb_server(directory: Path, pki: Pki, *, tls: bool = True,
                   server_cert: Issued | None = None) -> Iterator[MariaDbServer]:
    """A fresh MariaDB server on 127.0.0.1:<free port>, serving `server_cert` (default pki.server) when
    `tls`. Killed when the block exits."""
    account = _Account.service("mysql")
    rundir = _private_dir("spiced-my-", account)
    server = MariaDbServer(name="mariadb", directory=directory, rundir=rundir, log=rundir / "mariadb.err", tls=tls,
                           ca_cert=pki.ca.cert, password=f"my-{secrets.token_hex(12)}",
                           client=_mariadb_tool("mariadb", "mysql"))
    data = rundir / "data"

    def start() -> None:
        _run([_mariadb_tool("mariadb-install-db", "mysql_install_db"), "--no-defaults", f"--datadir={data}",
              "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"],
             account=account, cwd=rundir, timeout=START_TIMEOUT * 2)
        if tls:
            _install_tls_files(server_cert or pki.server, pki.ca.cert, rundir, account)
        _start_on_free_port(
            server, lambda port: _spawn(_mariadbd_argv(server, data, tls, port), account=account, cwd=rundir,
                                        log=server.log),
            ready="ready for connections", clash="Address already in use")
        server.run_sql(_mariadb_setup(server.password, tls), database="mysql")

    with _serving(server, start):
        yield server

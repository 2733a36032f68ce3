"""tests/dbservers.py starts real PostgreSQL and MariaDB servers that real clients (psql, mariadb) reach over
verified TLS, that log what those clients send, and that leave nothing behind.

The module-scoped `pg` and `mariadb` fixtures show the intended use: one server per module, seeded with
run_sql, each test looking at its own statements through mark(). Tests that need another certificate
start their own short-lived server.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.dbservers import (
    DbServerError,
    MariaDbServer,
    PgServer,
    issue_named,
    mariadb_server,
    postgres_server,
)
from tests.pki import Issued, Pki

CLIENT_TIMEOUT = 30.0
OTHER_NAME = "db.example.test"


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[PgServer]:
    with postgres_server(tmp_path_factory.mktemp("pg"), pki) as server:
        server.run_sql("CREATE TABLE trips (id int PRIMARY KEY, city text); "
                       "INSERT INTO trips VALUES (1, 'Seattle'), (2, 'Portland');")
        yield server


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[MariaDbServer]:
    with mariadb_server(tmp_path_factory.mktemp("mariadb"), pki) as server:
        server.run_sql("CREATE TABLE trips (id int PRIMARY KEY, city varchar(32)); "
                       "INSERT INTO trips VALUES (1, 'Seattle'), (2, 'Portland');")
        yield server


def psql(server: PgServer, sql: str, *, host: str = "localhost", sslmode: str = "verify-full",
         ca: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The PostgreSQL client as a connector would use it: TCP, the `spice` password, the test CA as root."""
    conninfo = (f"host={host} port={server.port} user={server.user} dbname={server.database} "
                f"sslmode={sslmode} sslrootcert={ca or server.ca_cert}")
    env = {"PATH": os.environ["PATH"], "PGPASSWORD": server.password, "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run([server.psql, "-X", "-A", "-t", "-d", conninfo, "-c", sql],
                          capture_output=True, text=True, env=env, timeout=CLIENT_TIMEOUT)


def mariadb_client(server: MariaDbServer, sql: str, *, ca: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The MariaDB client over TCP, verifying the server certificate (chain and host name) against the CA."""
    argv = [server.client, "--no-defaults", f"--host={server.host}", f"--port={server.port}", f"--user={server.user}",
            f"--password={server.password}", "--ssl", "--ssl-verify-server-cert", f"--ssl-ca={ca or server.ca_cert}",
            "--connect-timeout=10", "--batch", "--skip-column-names", server.database, "-e", sql]
    return subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)


def process_tree(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def still_alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie waiting for init to reap it is gone for our purpose)."""
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_postgres_serves_verified_tls_and_logs_statements(pg: PgServer) -> None:
    mark = pg.mark()
    sql = "SELECT city FROM trips WHERE id = 2"
    r = psql(pg, f"{sql}; SHOW ssl; SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Portland", "on", "t"]
    assert pg.statements(since=mark, user=pg.user)[0].startswith(sql)
    assert "SSL enabled" in pg.log_text()


def test_postgres_accepts_the_address_and_refuses_plaintext(pg: PgServer) -> None:
    assert psql(pg, "SELECT 1", host="127.0.0.1").stdout.strip() == "1"  # the certificate's IP SAN
    r = psql(pg, "SELECT 1", sslmode="disable")
    assert r.returncode != 0 and "no encryption" in r.stderr


def test_postgres_rejects_a_certificate_for_another_name(tmp_path: Path, pki: Pki) -> None:
    with postgres_server(tmp_path, pki, server_cert=issue_named(pki, OTHER_NAME)) as other:
        tree = process_tree(other.pid)
        r = psql(other, "SELECT 1")
        assert r.returncode != 0
        assert f'server certificate for "{OTHER_NAME}" does not match host name "localhost"' in r.stderr
        assert psql(other, "SELECT 1", sslmode="verify-ca").stdout.strip() == "1"  # only the name is wrong
        assert other.statements(user=other.user) == ["SELECT 1"]
    assert not still_alive(tree)
    assert not other.rundir.exists()
    assert "SELECT 1" in (tmp_path / "postgres.log").read_text()


def test_mariadb_serves_verified_tls_and_logs_statements(mariadb: MariaDbServer) -> None:
    mark = mariadb.mark()
    sql = "SELECT city FROM trips WHERE id = 1"
    r = mariadb_client(mariadb, f"{sql}; SHOW STATUS LIKE 'Ssl_cipher'")
    assert r.returncode == 0, r.stderr
    city, status = r.stdout.splitlines()
    assert city == "Seattle"
    assert status.startswith("Ssl_cipher\t") and status.split("\t")[1]
    assert mariadb.statements(since=mark, user=mariadb.user) == [sql, "SHOW STATUS LIKE 'Ssl_cipher'"]


def test_mariadb_rejects_a_wrong_ca_and_plaintext(mariadb: MariaDbServer, pki: Pki) -> None:
    r = mariadb_client(mariadb, "SELECT 1", ca=pki.foreign_ca.cert)
    assert r.returncode != 0 and "certificate" in r.stderr.lower()
    plain = subprocess.run([mariadb.client, "--no-defaults", f"--host={mariadb.host}", f"--port={mariadb.port}",
                            f"--user={mariadb.user}", f"--password={mariadb.password}", "--skip-ssl",
                            mariadb.database, "-e", "SELECT 1"], capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert plain.returncode != 0 and "Access denied" in plain.stderr


def test_mariadb_rejects_a_certificate_for_another_name_and_stops_on_error(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(RuntimeError, match="the test failed"):
        with mariadb_server(tmp_path, pki, server_cert=issue_named(pki, OTHER_NAME)) as other:
            tree = process_tree(other.pid)
            r = mariadb_client(other, "SELECT 1")
            assert r.returncode != 0 and "Validation of SSL server certificate failed" in r.stderr, r.stderr
            raise RuntimeError("the test failed")
    assert not still_alive(tree)
    assert not other.rundir.exists()


def test_a_server_that_cannot_start_raises_with_its_log(tmp_path: Path, pki: Pki) -> None:
    mismatched = Issued("mismatched", pki.server.cert, pki.client.key, pki.server.serial, pki.server.certificate)
    before = set(Path("/tmp").glob("spiced-pg-*"))
    with pytest.raises(DbServerError, match="(?s)log tail:.*private key"):
        with postgres_server(tmp_path, pki, server_cert=mismatched):
            pass
    assert set(Path("/tmp").glob("spiced-pg-*")) <= before


def test_tls_off(tmp_path: Path, pki: Pki) -> None:
    with postgres_server(tmp_path, pki, tls=False) as plain:
        assert psql(plain, "SHOW ssl", sslmode="disable").stdout.strip() == "off"

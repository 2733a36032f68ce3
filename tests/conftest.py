"""Fixtures shared by the test modules: one generated PKI and one event-loop thread per module, and
PostgreSQL and MariaDB servers seeded with the module's own `SEED_PG` / `SEED_MY`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dbservers import MariaDbServer, PgServer, mariadb_server, postgres_server
from tests.pki import Pki
from tests.tlsprobe import LoopThread


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    with LoopThread() as lt:
        yield lt


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory, pki: Pki, request: pytest.FixtureRequest) -> Iterator[PgServer]:
    with postgres_server(tmp_path_factory.mktemp("pg"), pki) as server:
        server.run_sql(request.module.SEED_PG)
        yield server


@pytest.fixture(scope="module")
def my(tmp_path_factory: pytest.TempPathFactory, pki: Pki, request: pytest.FixtureRequest) -> Iterator[MariaDbServer]:
    with mariadb_server(tmp_path_factory.mktemp("my"), pki) as server:
        server.run_sql(request.module.SEED_MY)
        yield server

"""Data connectors by `from:` scheme. Each parses its dataset's parameters once at startup
(`Connector.options`) and opens a source from them (`Connector.open`)."""

from __future__ import annotations

from typing import cast

from . import embedded, mysql, postgres
from .base import Connector, Source
from .files import FileOptions, FileSource, http_options, local_options, s3_options
from .params import LISTING, Param, Spec


def _file_source(options: object) -> Source:
    return FileSource(cast(FileOptions, options))


_S3 = Spec("s3", "s3", component=(
    Param("region", secret=True), Param("endpoint", secret=True), Param("auth", secret=True),
    Param("key", secret=True), Param("secret", secret=True), Param("session_token", secret=True),
), runtime=(*LISTING, Param("allow_http", default="false", one_of=("true", "false"))))

_HTTP = Spec("http", "http", component=(
    Param("port"), Param("username", secret=True), Param("password", secret=True),
), runtime=LISTING)

CONNECTORS: dict[str, Connector] = {
    "file": Connector(Spec("file", "file", runtime=LISTING), local_options, _file_source),
    "s3": Connector(_S3, s3_options, _file_source),
    "http": Connector(_HTTP, http_options("http"), _file_source),
    "https": Connector(_HTTP, http_options("https"), _file_source),
    "postgres": Connector(postgres.SPEC, postgres.options, postgres.open_source),
    "mysql": Connector(mysql.SPEC, mysql.options, mysql.open_source),
    "duckdb": Connector(embedded.DUCKDB_SPEC, embedded.duckdb_options, embedded.open_source),
    "sqlite": Connector(embedded.SQLITE_SPEC, embedded.sqlite_options, embedded.open_source),
}


def secret_params(scheme: str) -> frozenset[str]:
    """The parameter names (as written in a spicepod) whose values are credentials."""
    connector = CONNECTORS.get(scheme)
    if connector is None:
        return frozenset()
    spec = connector.spec
    return frozenset({f"{spec.prefix}_{p.name}" for p in spec.component if p.secret}
                     | {p.name for p in spec.runtime if p.secret})

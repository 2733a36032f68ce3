"""`spice refresh <dataset>`: `POST /v1/datasets/{name}/acceleration/refresh` with upstream's
`RefreshOverrides` (`refresh_sql`, `refresh_mode`) as the JSON body."""

from __future__ import annotations

from typing import Literal
from urllib.parse import quote

import typer

from spice_cli import CliError
from spice_cli.status import HttpSettings, message_of, phrase_of, send

RefreshMode = Literal["full", "append"]


def overrides(refresh_sql: str | None, refresh_mode: RefreshMode | None) -> dict[str, str]:
    body: dict[str, str] = {}
    if refresh_sql is not None:
        body["refresh_sql"] = refresh_sql
    if refresh_mode is not None:
        body["refresh_mode"] = refresh_mode
    return body


def refresh(s: HttpSettings, dataset: str, refresh_sql: str | None, refresh_mode: RefreshMode | None) -> None:
    """Ask the runtime to refresh `dataset`; prints its answer. A refusal is a CliError with the
    runtime's message."""
    typer.echo(f"Refreshing dataset {dataset} with {refresh_mode} mode..." if refresh_mode
               else f"Refreshing dataset {dataset} ...")
    path = f"/v1/datasets/{quote(dataset, safe='')}/acceleration/refresh"
    response = send(s, "POST", path, overrides(refresh_sql, refresh_mode))
    text = message_of(response) if response.content else ""
    if not response.is_success:
        raise CliError(text or f"ERROR POST {path} returned {response.status_code} {phrase_of(response)}")
    typer.echo(text)

"""The app definition a scheduler gives its executors over the node channel (mTLS): the spicepod it
runs and the secret values that spicepod looks up, resolved on the scheduler, in one answer
(upstream's `GetAppDefinition` and `ExpandSecret`).

The scheduler builds the definition from its current spicepod at each request, recording every
secret lookup the build makes (`${secrets:…}`, `${env:…}`, connector secrets loaded by their
prefixed name); the executor builds the same typed spicepod answering those lookups from the
recording, so it needs neither the spicepod file nor the secret stores. Relative `file:` paths keep
resolving against the scheduler's working directory (a path shared by the nodes), and views are sent
with their SQL inline.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..config import Spicepod, build_spicepod, secret_stores
from ..secrets import SecretResolver
from ..spicepod import validate_spicepod

HANDLER = "spiced_app_definition"  # the scheduler's Dask handler

SecretKey = tuple[str, str]  # (store, key) as looked up: ("secrets", "pg_pass"), ("env", "TOKEN")


class RecordingSecrets(SecretResolver):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: dict[SecretKey, str | None] = {}

    def lookup(self, store: str, key: str, param: str) -> str | None:
        value = super().lookup(store, key, param)
        self.recorded[(store, key)] = value
        return value


class ReceivedSecrets(SecretResolver):
    """The scheduler's answers to the lookups its own build made; nothing else resolves."""

    def __init__(self, values: Mapping[SecretKey, str | None]) -> None:
        self._values = dict(values)

    def lookup(self, store: str, key: str, param: str) -> str | None:
        return self._values.get((store, key))


def definition(spicepod: Spicepod, workdir: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What the scheduler sends (plain types, for Dask's messages)."""
    raw = copy.deepcopy(dict(spicepod.raw))
    spec = validate_spicepod(spicepod.file, raw)
    secrets = RecordingSecrets(secret_stores(spec), workdir, environ)
    pod = build_spicepod(spicepod.file, raw, spec, workdir, secrets)
    sql = {v.name: v.sql for v in pod.views}
    views = raw.get("views")
    for view in views if isinstance(views, list) else []:
        if isinstance(view, dict) and view.get("name") in sql:
            view.pop("sql_ref", None)
            view["sql"] = sql[view["name"]]
    return {"spicepod": yaml.safe_dump(raw, sort_keys=False), "file": str(spicepod.file), "workdir": str(workdir),
            "secrets": [[store, key, value] for (store, key), value in secrets.recorded.items()]}


def received_spicepod(message: Mapping[str, Any]) -> Spicepod:
    """The executor's typed spicepod from the scheduler's definition (ConfigError if it does not build)."""
    file = Path(message["file"])
    raw = yaml.safe_load(message["spicepod"])
    spec = validate_spicepod(file, raw)
    secrets = ReceivedSecrets({(store, key): value for store, key, value in message["secrets"]})
    return build_spicepod(file, raw, spec, Path(message["workdir"]), secrets)

"""`${store:key}` references and the secret stores behind them (only the `env` store is built in).

Upstream's rules: the env store upper-cases the key and tries `SPICE_<KEY>` before `<KEY>`;
`.env.local` then `.env` in the working directory fill gaps without overriding the real
environment; `${secrets:key}` searches every declared store, last declared first.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

from .errors import ConfigError

log = logging.getLogger("secrets")

REFERENCE = re.compile(r"\$\{\s*([a-zA-Z][a-zA-Z0-9_-]*)\s*:\s*([a-zA-Z][a-zA-Z0-9_-]*)\s*\}")


@dataclass(frozen=True, slots=True)
class SecretStoreSpec:
    name: str
    kind: str
    params: Mapping[str, str] = field(default_factory=dict)


class EnvStore:
    def __init__(self, cwd: Path, environ: Mapping[str, str], file_path: str | None = None) -> None:
        values: dict[str, str] = {}
        files = [cwd / ".env", cwd / ".env.local"]  # later files win, the real environment wins over both
        if file_path:
            path = cwd / file_path
            if path.is_file():
                files = [path]
            else:
                log.warning("Error opening path %s", file_path)
        for f in files:
            if f.is_file():
                values.update({k: v for k, v in dotenv_values(f).items() if v is not None})
        values.update(environ)
        self._values = values

    def get(self, key: str) -> str | None:
        key = key.upper()
        return self._values.get(f"SPICE_{key}", self._values.get(key))


@dataclass(frozen=True, slots=True)
class Resolved:
    value: str
    missing: tuple[str, ...]


class SecretResolver:
    def __init__(self, stores: Sequence[SecretStoreSpec], cwd: Path, environ: Mapping[str, str] | None = None) -> None:
        environ = dict(os.environ) if environ is None else environ
        specs = list(stores) or [SecretStoreSpec(name="env", kind="env")]
        self._stores: dict[str, EnvStore] = {}
        for spec in specs:
            if spec.kind != "env":
                raise ConfigError(f"Secret store {spec.kind} is not available in this runtime; use `from: env`")
            self._stores[spec.name] = EnvStore(cwd, environ, spec.params.get("file_path"))

    def lookup(self, store: str, key: str, param: str) -> str | None:
        if store == "secrets":
            for candidate in reversed(list(self._stores.values())):
                value = candidate.get(key)
                if value is not None:
                    return value
            return None
        if store not in self._stores:
            raise ConfigError(f"Secret '{store}' referenced in {param} not found.")
        return self._stores[store].get(key)

    def resolve(self, text: str, param: str) -> Resolved:
        """Replace every reference in `text`; unresolved ones become '' and are reported."""
        missing: list[str] = []

        def substitute(m: re.Match[str]) -> str:
            value = self.lookup(m.group(1), m.group(2), param)
            if value is None:
                log.error("Key '%s' not found in any connected secrets.", m.group(2))
                missing.append(m.group(2))
                return ""
            return value

        return Resolved(REFERENCE.sub(substitute, text), tuple(missing))

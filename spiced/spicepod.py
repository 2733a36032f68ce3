"""The spicepod.yaml schema: YAML in, validated models out, errors naming the key path.

Strict sections (`runtime.tls`, `runtime.auth`, each dataset, `acceleration`, views) reject
unknown keys; unknown top-level keys are ignored, as upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class TlsSpec(_Strict):
    enabled: bool
    certificate_file: str | None = None
    key_file: str | None = None
    certificate: str | None = None
    key: str | None = None
    client_auth_mode: Literal["none", "request", "required"] | None = None
    client_auth_ca_file: str | None = None
    client_auth_ca: str | None = None
    # ours, beyond upstream: the expiry warning threshold, and "poll" to turn off filesystem notifications
    expiry_warning_days: NonNegativeInt | None = None
    watch: Literal["notify", "poll"] | None = None


class ApiKeySpec(_Strict):
    enabled: bool = True
    keys: list[str] = Field(default_factory=list)


class AuthSpec(_Strict):
    api_key: ApiKeySpec | None = Field(default=None, alias="api-key")


class QuerySpec(_Loose):
    timeout: str | None = None


class TaskHistorySpec(_Strict):
    enabled: bool = True
    captured_output: str | None = None
    retention_period: str | None = None
    retention_check_interval: str | None = None


HashingAlgorithm = Literal["siphash", "ahash", "xxh3", "xxh32", "xxh64", "xxh128", "blake3"]


class SqlResultsCacheSpec(_Strict):
    """`runtime.caching.sql_results` (upstream v2); spiced/results_cache.py says what is acted on."""

    enabled: bool = True
    max_size: str = "128MiB"
    item_ttl: str = "1s"
    caching_policy: Literal["lru", "tiny_lfu"] = Field(default="lru", alias="eviction_policy")
    hashing_algorithm: HashingAlgorithm | None = None
    cache_key_type: Literal["plan", "sql"] = "plan"
    engine: Literal["moka", "pingora"] | None = None
    stale_while_revalidate_ttl: str | None = None
    encoding: Literal["none", "zstd"] = "none"
    warmup: Literal["disabled", "on_first_refresh"] = "disabled"


class OtherCacheSpec(_Strict):
    """`runtime.caching.search_results` / `embeddings`: no search or embeddings here."""

    enabled: bool = True
    max_size: str | None = None
    item_ttl: str | None = None
    caching_policy: Literal["lru", "tiny_lfu"] | None = Field(default=None, alias="eviction_policy")
    hashing_algorithm: str | None = None
    engine: str | None = None


class CachingSpec(_Strict):
    sql_results: SqlResultsCacheSpec | None = None
    search_results: OtherCacheSpec | None = None
    embeddings: OtherCacheSpec | None = None


class LegacyResultsCacheSpec(_Strict):
    """`runtime.results_cache` (v1), which upstream carries over to `caching.sql_results`."""

    enabled: bool = True
    cache_max_size: str = "128MiB"
    item_ttl: str = "1s"
    caching_policy: Literal["lru", "tiny_lfu"] = Field(default="lru", alias="eviction_policy")
    cache_key_type: Literal["plan", "sql"] = "plan"
    hashing_algorithm: HashingAlgorithm | None = None
    engine: Literal["moka", "pingora"] | None = None
    max_stale_while_revalidate: str | None = None


class RuntimeSpec(_Loose):
    tls: TlsSpec | None = None
    caching: CachingSpec | None = None
    results_cache: LegacyResultsCacheSpec | None = None
    auth: AuthSpec | None = None
    query: QuerySpec | None = None
    task_history: TaskHistorySpec | None = None
    access_log: bool | None = None  # ours: one INFO line per HTTP request and Flight call (--access-log)


class SecretSpec(_Strict):
    from_: str = Field(alias="from")
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class AccelerationSpec(_Strict):
    enabled: bool = True
    engine: str = "arrow"
    mode: Literal["memory"] = "memory"
    refresh_mode: Literal["full", "append"] = "full"
    refresh_check_interval: str | None = None
    refresh_sql: str | None = None
    refresh_data_window: str | None = None
    on_zero_results: Literal["return_empty", "use_source"] = "return_empty"
    params: dict[str, Any] = Field(default_factory=dict)
    indexes: dict[str, Any] | None = None
    primary_key: str | None = None
    on_conflict: dict[str, Any] | None = None

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        if v.lower() != "arrow":
            raise ValueError(
                f"The accelerator engine {v} is not available. Valid engines are arrow, duckdb, sqlite, and postgres."
                " (this runtime implements arrow)"
            )
        return v.lower()


Scalar = str | bool | int | float | None


class DatasetSpec(_Strict):
    from_: str = Field(alias="from")
    name: str
    description: str | None = None
    params: dict[str, Scalar] = Field(default_factory=dict)
    acceleration: AccelerationSpec | None = None
    metadata: dict[str, Any] | None = None
    dependsOn: list[str] | None = None
    time_column: str | None = None
    time_format: str | None = None


class ViewSpec(_Strict):
    name: str
    sql: str | None = None
    sql_ref: str | None = None
    description: str | None = None


class SpicepodSpec(_Loose):
    version: Literal["v1", "v1beta1"]
    kind: Literal["Spicepod"]
    name: str
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    secrets: list[SecretSpec] = Field(default_factory=list)
    datasets: list[DatasetSpec] = Field(default_factory=list)
    views: list[ViewSpec] = Field(default_factory=list)


def key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + {"from_": "from"}.get(str(part), str(part))
    return out or "<root>"


def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "missing required field"
    if kind == "value_error":
        return str(err["ctx"]["error"])
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return f"{err['msg'][0].lower()}{err['msg'][1:]} (got {shown})"


def find_spicepod(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("spicepod.yaml", "spicepod.yml"):
        if (path / name).is_file():
            return path / name
    raise ConfigError(
        f"Failed to start Spice runtime: Unable to load spicepod {path}: spicepod.yaml not found in {path}, "
        "run `spice init <name>` to initialize spicepod.yaml"
    )


MAX_ALIASES = 100


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a cap on alias references: a few lines of nested aliases
    ("billion laughs") would otherwise expand to billions of nodes when the spicepod is walked."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} alias references; refusing to expand them")
        return super().compose_node(parent, index)


def _prefix(file: Path) -> str:
    return f"Failed to start Spice runtime: Unable to load spicepod {file}"


def read_spicepod(file: Path) -> dict[str, Any]:
    """Read one spicepod file into a mapping (YAML errors name line and column)."""
    prefix = _prefix(file)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{prefix}: {e}") from None
    try:
        raw = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"{prefix}: Unable to parse spicepod.yaml: {detail}") from None
    except RecursionError:
        raise ConfigError(f"{prefix}: Unable to parse spicepod.yaml: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: Unable to parse spicepod.yaml: expected a mapping at the top level")
    return raw


def validate_spicepod(file: Path, raw: dict[str, Any]) -> SpicepodSpec:
    """Validate a spicepod mapping; the first problem becomes one line naming the key path."""
    prefix = _prefix(file)
    try:
        spec = SpicepodSpec.model_validate(raw)
    except RecursionError:
        raise ConfigError(f"{prefix}: Unable to parse spicepod.yaml: nested too deeply") from None
    except ValidationError as e:
        first = e.errors()[0]
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"{prefix}: {key_path(first['loc'])}: {_describe(dict(first))}{more}") from None
    names = [d.name.lower() for d in spec.datasets]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"{prefix}: Unable to load duplicate spicepod dataset component "
                              f"'{spec.datasets[i].name}'")
    return spec

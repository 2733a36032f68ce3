"""The spicepod.yaml schema: YAML in, validated models out, errors naming the key path.

Versions are upstream's current ones: `v1` and `v2` (also as full tags, `v2.0.0`); `v1beta1` is
refused, as upstream 2.0 does. Strict sections (`runtime` and its `tls`, `auth`, `caching`,
`task_history`, ..., each dataset, `acceleration`, views) reject unknown keys; unknown top-level keys
are ignored, as upstream. A key upstream defines and this runtime does not act on is an `unmodelled()`
field: it parses, and `unmodelled_keys` names it for one WARN at startup.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    NonNegativeInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

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


class SecretSpec(_Strict):
    from_: str = Field(alias="from")
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


def unmodelled(default: Any = None, **kwargs: Any) -> Any:
    """A key upstream defines and this runtime does not act on: it parses, and setting it gives
    one WARN naming its path (`unmodelled_keys`)."""
    return Field(default, json_schema_extra={"unmodelled": True}, **kwargs)


Duration = str
TimeFormat = Literal["timestamp", "timestamptz", "unix_seconds", "unix_millis", "ISO8601", "date"]
ReadyState = Literal["on_load", "on_registration"]


class AccelerationSpec(_Strict):
    enabled: bool = True
    engine: str = "arrow"
    mode: Literal["memory", "file", "file_create", "file_update"] = "memory"
    refresh_mode: Literal["full", "append", "changes", "caching", "snapshot"] | None = None
    refresh_check_interval: Duration | None = None
    refresh_sql: str | None = None
    refresh_data_window: Duration | None = None
    refresh_retry_enabled: bool = True
    refresh_retry_max_attempts: NonNegativeInt | None = None
    refresh_jitter_enabled: bool = False
    refresh_jitter_max: Duration | None = None
    refresh_on_startup: Literal["auto", "always"] = "auto"
    on_zero_results: Literal["return_empty", "use_source"] = "return_empty"
    ready_state: ReadyState | None = None  # deprecated here: the dataset-level key
    retention_check_enabled: bool = False
    retention_period: Duration | None = None
    retention_check_interval: Duration | None = None
    retention_sql: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    indexes: dict[str, Any] | None = None
    primary_key: str | None = None
    # Upstream keys this runtime parses and does not act on (a WARN names each one set).
    refresh_cron: str | None = unmodelled()
    refresh_append_overlap: Duration | None = unmodelled()
    on_conflict: dict[str, Any] | None = unmodelled()
    metrics: Any = unmodelled()
    partition_by: Any = unmodelled()
    snapshots: Any = unmodelled()
    snapshots_trigger: Any = unmodelled()
    snapshots_trigger_threshold: Any = unmodelled()
    snapshots_creation_policy: Any = unmodelled()
    snapshots_compaction: Any = unmodelled()
    storage_profile: Any = unmodelled()
    write_mode: Any = unmodelled()
    maintained_aggregates: Any = unmodelled()
    engine_secret: Any = unmodelled()

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        if v.lower() not in ("arrow", "duckdb", "sqlite"):
            raise ValueError(
                f"The accelerator engine {v} is not available. Valid engines are arrow, duckdb, sqlite, and postgres."
                " (this runtime implements arrow, duckdb and sqlite)"
            )
        return v.lower()

    @field_validator("refresh_mode")
    @classmethod
    def _known_refresh_mode(cls, v: str | None) -> str | None:
        if v not in (None, "full", "append"):
            raise ValueError(f"refresh_mode {v} is not available in this runtime (it implements full and append)")
        return v


Scalar = str | bool | int | float | None


class QuerySpec(_Loose):  # upstream's Query does not deny unknown keys
    timeout: Duration | None = None
    memory_limit: str | None = unmodelled()
    temp_directory: str | None = unmodelled()
    spill_compression: Literal["zstd", "lz4_frame", "uncompressed"] | None = unmodelled()
    target_partitions: NonNegativeInt | None = unmodelled()
    max_concurrent_queries: NonNegativeInt | None = unmodelled()


class TaskHistorySpec(_Strict):
    enabled: bool = True
    captured_output: str | None = None
    captured_plan: str | None = None
    min_sql_duration: Duration | None = None
    min_plan_duration: Duration | None = None
    retention_period: Duration | None = None
    retention_check_interval: Duration | None = None


class TracingSpec(_Strict):
    zipkin_enabled: bool
    zipkin_endpoint: str | None = None


class TelemetrySpec(_Strict):
    enabled: bool = True
    user_agent_collection: Literal["full", "disabled"] = "full"
    properties: dict[str, Any] = Field(default_factory=dict)
    metric_prefix: str | None = None
    otel_exporter: dict[str, Any] | None = None


class CorsSpec(_Strict):
    enabled: bool = False
    allowed_origins: list[str] = Field(default_factory=lambda: ["*"])


class RuntimeSpec(_Strict):
    tls: TlsSpec | None = None
    caching: CachingSpec | None = None
    results_cache: LegacyResultsCacheSpec | None = None
    auth: AuthSpec | None = None
    query: QuerySpec | None = None
    access_log: bool | None = None  # ours: one INFO line per HTTP request and Flight call (--access-log)
    # Upstream keys this runtime parses and does not act on (a WARN names each one set).
    task_history: TaskHistorySpec | None = unmodelled()
    dataset_load_parallelism: NonNegativeInt | None = unmodelled()
    tracing: TracingSpec | None = unmodelled()
    telemetry: TelemetrySpec | None = unmodelled()
    params: dict[str, Scalar] | None = unmodelled()
    cors: CorsSpec | None = unmodelled()
    flight: dict[str, Any] | None = unmodelled()
    mcp: dict[str, Any] | None = unmodelled()
    shutdown_timeout: Duration | None = unmodelled()
    ready_state: ReadyState | None = unmodelled()
    output_level: Literal["info", "verbose", "very_verbose"] | None = unmodelled()
    cpu: dict[str, Any] | None = unmodelled()
    metrics: list[dict[str, Any]] | None = unmodelled()
    scheduler: dict[str, Any] | None = unmodelled()
    source_rate_control: dict[str, Any] | None = unmodelled()
    functions: dict[str, Any] | None = unmodelled()


AccessMode = Literal["read", "read_write", "read_write_create"]


class DatasetSpec(_Strict):
    from_: str = Field(alias="from")
    name: str
    description: str | None = None
    params: dict[str, Scalar] = Field(default_factory=dict)
    acceleration: AccelerationSpec | None = None
    time_column: str | None = None
    time_format: TimeFormat | None = None
    ready_state: ReadyState = "on_load"
    # Upstream keys this runtime parses and does not act on (a WARN names each one set).
    metadata: dict[str, Any] | None = unmodelled()
    columns: list[dict[str, Any]] | None = unmodelled()
    access: AccessMode | None = unmodelled()
    mode: AccessMode | None = unmodelled()  # upstream's older name for `access`
    has_metadata_table: bool | None = unmodelled()
    replication: dict[str, Any] | None = unmodelled()
    time_partition_column: str | None = unmodelled()
    time_partition_format: TimeFormat | None = unmodelled()
    embeddings: list[dict[str, Any]] | None = unmodelled()
    dependsOn: list[str] | None = unmodelled()
    unsupported_type_action: Literal["error", "warn", "ignore", "string"] | None = unmodelled()
    on_schema_change: Literal["block", "fail", "append_new_columns", "sync_all_columns"] | None = unmodelled()
    metrics: Any = unmodelled()
    vectors: Any = unmodelled()
    full_text_search: Any = unmodelled()
    check_availability: Literal["auto", "disabled"] | None = unmodelled()


class ViewSpec(_Strict):
    name: str
    sql: str | None = None
    sql_ref: str | None = None
    description: str | None = None
    metadata: dict[str, Any] | None = unmodelled()
    dependsOn: list[str] | None = unmodelled()


# `vMAJOR[.MINOR[.PATCH[-PRERELEASE]]]` (upstream's SpicepodVersion, spec.rs); majors 1 and 2 only.
_VERSION = re.compile(r"v(0|[1-9]\d*)(?:\.(?:0|[1-9]\d*)(?:\.(?:0|[1-9]\d*)(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?)?)?")
_QUERY_KEYS = ("memory_limit", "temp_directory")


def carry_over_v1_keys(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Upstream's v1 → v2 carry-overs: `runtime.memory_limit` / `temp_directory` → `runtime.query.*`,
    `datasets[i].invalid_type_action` → `unsupported_type_action` (the v2 key wins when both are set).
    Upstream's deserializers apply them whatever the version, and so does this. `raw` is not changed.
    Returns the carried-over mapping and {v2 key path: key path as written}."""
    pod = dict(raw)
    written: dict[str, str] = {}
    if isinstance(pod.get("runtime"), dict):
        pod["runtime"] = _carry_query_keys(pod["runtime"], written)
    if isinstance(pod.get("datasets"), list):
        pod["datasets"] = [_carry_type_action(d, f"datasets[{i}]", written) for i, d in enumerate(pod["datasets"])]
    return pod, written


def _carry_query_keys(runtime: dict[str, Any], written: dict[str, str]) -> dict[str, Any]:
    query = runtime.get("query")
    query = {} if query is None else query
    if not isinstance(query, dict) or not any(k in runtime for k in _QUERY_KEYS):
        return runtime
    runtime, query = dict(runtime), dict(query)
    for key in _QUERY_KEYS:
        if key in runtime:
            value = runtime.pop(key)
            if key not in query:
                query[key] = value
                written[f"runtime.query.{key}"] = f"runtime.{key}"
    runtime["query"] = query
    return runtime


def _carry_type_action(dataset: Any, where: str, written: dict[str, str]) -> Any:
    if not isinstance(dataset, dict) or "invalid_type_action" not in dataset:
        return dataset
    dataset = dict(dataset)
    value = dataset.pop("invalid_type_action")
    if "unsupported_type_action" not in dataset:
        dataset["unsupported_type_action"] = value
        written[f"{where}.unsupported_type_action"] = f"{where}.invalid_type_action"
    return dataset


class SpicepodSpec(_Loose):
    version: str
    kind: Literal["Spicepod"]
    name: str
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    secrets: list[SecretSpec] = Field(default_factory=list)
    datasets: list[DatasetSpec] = Field(default_factory=list)
    views: list[ViewSpec] = Field(default_factory=list)
    # Upstream sections this runtime does not serve: any value parses, a WARN names each non-empty one.
    catalogs: Any = unmodelled()
    models: Any = unmodelled()
    embeddings: Any = unmodelled()
    rerankers: Any = unmodelled()
    search_engines: Any = unmodelled()
    tools: Any = unmodelled()
    workers: Any = unmodelled()
    functions: Any = unmodelled()
    dependencies: Any = unmodelled()
    extensions: Any = unmodelled()
    management: Any = unmodelled()
    snapshots: Any = unmodelled()
    metadata: Any = unmodelled()
    _written: dict[str, str] = PrivateAttr(default_factory=dict)  # from `carry_over_v1_keys`

    @field_validator("version")
    @classmethod
    def _supported_version(cls, v: str) -> str:
        m = _VERSION.fullmatch(v)
        if m is None or m.group(1) not in ("1", "2"):
            hint = " (v1beta1 is no longer accepted: change it to v1)" if v == "v1beta1" else ""
            raise ValueError(f"unsupported spicepod version '{v}': expected v1 or v2, or a full tag such as "
                             f"v2.0.0{hint}")
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _carry_over(cls, data: Any, handler: ModelWrapValidatorHandler[SpicepodSpec]) -> SpicepodSpec:
        written: dict[str, str] = {}
        if isinstance(data, dict):
            data, written = carry_over_v1_keys(data)
        spec = handler(data)
        spec._written = written
        return spec

    def written_path(self, path: str) -> str:
        """The key path as the spicepod file spells it (a v1 key carried over names its v1 place)."""
        return self._written.get(path, path)


def unmodelled_keys(spec: SpicepodSpec) -> list[str]:
    """Key paths of the `unmodelled()` keys set in `spec` (explicitly, and not to `[]`, `{}` or null),
    in the models' field order and as the file spells them."""
    return [spec.written_path(key_path(loc)) for loc in _unmodelled(spec, ())]


def _unmodelled(value: Any, loc: tuple[int | str, ...]) -> Iterator[tuple[int | str, ...]]:
    if isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            if name not in value.model_fields_set:
                continue
            child, where = getattr(value, name), (*loc, field.alias or name)
            if not _is_unmodelled(field):
                yield from _unmodelled(child, where)
            elif child is not None and not (isinstance(child, (list, dict)) and not child):
                yield where
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _unmodelled(item, (*loc, i))


def _is_unmodelled(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("unmodelled") is True


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
        where = key_path(first["loc"])
        where = carry_over_v1_keys(raw)[1].get(where, where)
        raise ConfigError(f"{prefix}: {where}: {_describe(dict(first))}{more}") from None
    names = [d.name.lower() for d in spec.datasets]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"{prefix}: Unable to load duplicate spicepod dataset component "
                              f"'{spec.datasets[i].name}'")
    return spec

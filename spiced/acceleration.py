"""A dataset's `acceleration:` block, checked once into a frozen `Acceleration`: the engine and
where it keeps its data, and how the data is refreshed and retained.

Names, defaults and engine parameters are upstream's (datasets reference, data-refresh and
data-accelerators docs). What upstream defines and this runtime does not act on is reported,
never taken silently: a key in `acceleration:` by spiced.spicepod, an engine parameter by the
parameter machinery (`Ignoring parameter …: not supported for accelerator duckdb.`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import sqlglot
from sqlglot import exp

from .connectors.params import BOOL, Checked, Param, ParamError, Spec, check
from .datasets.overrides import RefreshMode
from .spicepod import AccelerationSpec, DatasetSpec

Engine = Literal["arrow", "duckdb", "sqlite"]
Mode = Literal["memory", "file", "file_create", "file_update"]

ENGINE_SPECS: dict[str, Spec] = {
    "arrow": Spec("arrow", "arrow", kind="accelerator"),
    "duckdb": Spec("duckdb", "duckdb", kind="accelerator", component=(
        Param("file"), Param("data_dir"), Param("memory_limit"),
        Param("preserve_insertion_order", default="true", one_of=BOOL),
    ), runtime=(
        Param("connection_pool_size"),
        Param("on_refresh_recompute_statistics", default="enabled", one_of=("enabled", "disabled")),
        Param("on_refresh_sort_columns"),
    )),
    "sqlite": Spec("sqlite", "sqlite", kind="accelerator", component=(Param("file"),),
                   runtime=(Param("busy_timeout", default="5000ms"),)),
}
_ENGINES: dict[str, Engine] = {"arrow": "arrow", "duckdb": "duckdb", "sqlite": "sqlite"}
FILE_EXTENSIONS = {"duckdb": ("db", "ddb", "duckdb"), "sqlite": ("sqlite", "db")}
DEFAULT_POOL_SIZE = 10


@dataclass(frozen=True, slots=True)
class Retention:
    check_interval: float
    period: float | None = None  # rows whose time column is older than this go
    sql: str | None = None  # `DELETE FROM <dataset> WHERE …`: rows it matches go


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """The engine's own parameters, checked."""

    file: Path | None = None  # the database file, in the file modes
    pool_size: int = DEFAULT_POOL_SIZE  # connections serving queries
    busy_timeout: float = 5.0  # sqlite: seconds a connection waits on a lock
    memory_limit: str | None = None  # duckdb's memory_limit setting
    preserve_insertion_order: bool = True  # duckdb
    recompute_statistics: bool = True  # duckdb: ANALYZE after each refresh
    sort_columns: tuple[str, ...] = ()  # duckdb: rows stored in this order at each refresh


@dataclass(frozen=True, slots=True)
class Acceleration:
    enabled: bool = True
    engine: Engine = "arrow"
    mode: Mode = "memory"
    settings: EngineSettings = field(default_factory=EngineSettings)
    refresh_mode: RefreshMode = "full"
    refresh_check_interval: float | None = None
    refresh_check_interval_text: str | None = None
    refresh_sql: str | None = None
    refresh_data_window: float | None = None
    retry_enabled: bool = True
    retry_max_attempts: int | None = None  # None: until it loads
    jitter_max: float | None = None  # seconds of random delay before each refresh; None: none
    refresh_on_startup: Literal["auto", "always"] = "auto"
    on_zero_results: Literal["return_empty", "use_source"] = "return_empty"
    retention: Retention | None = None
    indexes: tuple[tuple[tuple[str, ...], bool], ...] = ()  # (columns, unique)
    primary_key: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def persistent(self) -> bool:
        """Data kept in a file across restarts."""
        return self.mode != "memory"


class AccelerationError(ValueError):
    """`<key>: <what is wrong>`; spiced.config adds the file and the dataset."""


Duration = Callable[[str, str], float]  # (text, key) → seconds, or a config error naming the key


def acceleration(d: DatasetSpec, a: AccelerationSpec, workdir: Path, duration: Duration,
                 params: Mapping[str, str]) -> Acceleration:
    """`a` checked against `d` (its time column, its name); `params` are the engine parameters
    with secrets resolved. Raises AccelerationError."""
    engine = a.engine
    if engine == "arrow" and a.mode != "memory":
        raise AccelerationError(f"mode: the arrow accelerator keeps data in memory only (got {a.mode}); "
                                "use engine duckdb or sqlite for mode file")
    try:
        checked = check(ENGINE_SPECS[engine], params)
    except ParamError as e:
        raise AccelerationError(f"params: Invalid configuration for accelerator {engine}. {e}") from None
    warnings = list(checked.warnings)
    settings = _engine_settings(engine, a.mode, checked, workdir, duration, warnings)

    interval = duration(a.refresh_check_interval, "refresh_check_interval") if a.refresh_check_interval else None
    window = duration(a.refresh_data_window, "refresh_data_window") if a.refresh_data_window else None
    if window is not None and not d.time_column:
        raise AccelerationError("refresh_data_window: requires the dataset's time_column")
    if a.refresh_sql is not None:
        check_refresh_sql(a.refresh_sql, d.name)
    jitter = None
    if a.refresh_jitter_enabled:
        if a.refresh_jitter_max:
            jitter = duration(a.refresh_jitter_max, "refresh_jitter_max")
        elif interval is not None:
            jitter = interval / 10  # upstream: 10% of the refresh interval
    elif a.refresh_jitter_max:
        warnings.append(f"Dataset {d.name}: acceleration.refresh_jitter_max is set but refresh_jitter_enabled "
                        "is false: no jitter is applied.")
    if engine == "arrow" and (a.indexes or a.primary_key):
        warnings.append(f"Dataset {d.name}: acceleration.indexes and primary_key are not acted on by the arrow "
                        "accelerator here; use engine duckdb or sqlite for indexes.")
    return Acceleration(
        enabled=a.enabled, engine=_ENGINES[engine], mode=a.mode, settings=settings,
        refresh_mode="append" if a.refresh_mode == "append" else "full",
        refresh_check_interval=interval, refresh_check_interval_text=a.refresh_check_interval,
        refresh_sql=a.refresh_sql, refresh_data_window=window,
        retry_enabled=a.refresh_retry_enabled, retry_max_attempts=a.refresh_retry_max_attempts,
        jitter_max=jitter, refresh_on_startup=a.refresh_on_startup, on_zero_results=a.on_zero_results,
        retention=_retention(d, a, duration),
        indexes=_indexes(a.indexes) if engine != "arrow" else (),
        primary_key=_columns(a.primary_key) if engine != "arrow" and a.primary_key else (),
        warnings=tuple(warnings),
    )


def _engine_settings(engine: str, mode: str, checked: Checked, workdir: Path, duration: Duration,
                     warnings: list[str]) -> EngineSettings:
    if engine == "arrow":
        return EngineSettings()
    file = None
    if mode != "memory":
        file = _database_file(engine, checked, workdir, warnings)
    elif checked.get("file") is not None:
        warnings.append(f"'{engine}_file' is ignored: the accelerator's mode is memory.")
    pool = checked.get("connection_pool_size")
    if pool is not None and (not pool.isdigit() or int(pool) < 1):
        raise AccelerationError(f"params.connection_pool_size: expected a positive integer (got {pool!r})")
    busy = 5.0
    if engine == "sqlite":
        text = checked.get("busy_timeout") or "5000ms"
        try:
            busy = duration(text, "params.busy_timeout")
        except Exception:
            raise AccelerationError('params.busy_timeout: The "busy_timeout" acceleration parameter value must '
                                    "be a valid duration.") from None
    sort = checked.get("on_refresh_sort_columns")
    return EngineSettings(
        file=file, pool_size=int(pool) if pool else DEFAULT_POOL_SIZE, busy_timeout=busy,
        memory_limit=checked.get("memory_limit"),
        preserve_insertion_order=checked.flag("preserve_insertion_order") if engine == "duckdb" else True,
        recompute_statistics=checked.get("on_refresh_recompute_statistics") != "disabled",
        sort_columns=tuple(c.strip() for c in sort.split(",") if c.strip()) if sort else (),
    )


def _database_file(engine: str, checked: Checked, workdir: Path, warnings: list[str]) -> Path:
    """Upstream's `<engine>_file`, else `<engine>_data_dir` (duckdb), else `.spice/data`."""
    given = checked.get("file")
    data_dir = checked.get("data_dir")
    if given is not None and data_dir is not None:
        warnings.append(f"'{engine}_data_dir' and '{engine}_file' were both specified but '{engine}_file' "
                        f"({given}) will be used.")
    if given is not None:
        path = Path(given)
    else:
        path = Path(data_dir or ".spice/data") / f"accelerated_{engine}.db"
    path = path if path.is_absolute() else workdir / path
    extension = path.suffix.lstrip(".")
    if extension not in FILE_EXTENSIONS[engine]:
        raise AccelerationError(
            f'params.{engine}_file: The "{engine}_file" acceleration parameter has an invalid extension. '
            f'Expected one of "{", ".join(FILE_EXTENSIONS[engine])}" but got "{extension}".')
    if path.is_dir():
        raise AccelerationError(f'params.{engine}_file: The "{engine}_file" acceleration parameter is a directory.')
    return path


def _retention(d: DatasetSpec, a: AccelerationSpec, duration: Duration) -> Retention | None:
    if not a.retention_check_enabled:
        return None
    if not a.retention_check_interval:
        raise AccelerationError("retention_check_interval: required when retention_check_enabled is true")
    period = duration(a.retention_period, "retention_period") if a.retention_period else None
    if period is None and not a.retention_sql:
        raise AccelerationError("retention_period: retention needs retention_period (with the dataset's "
                                "time_column) or retention_sql")
    if period is not None and not d.time_column:
        raise AccelerationError("retention_period: requires the dataset's time_column")
    if a.retention_sql is not None:
        retention_condition(a.retention_sql, d.name)
    return Retention(duration(a.retention_check_interval, "retention_check_interval"), period, a.retention_sql)


def _columns(text: str) -> tuple[str, ...]:
    """`col` or `(a, b)`."""
    return tuple(c.strip().strip('"') for c in text.strip().strip("()").split(",") if c.strip())


def _indexes(indexes: Mapping[str, object] | None) -> tuple[tuple[tuple[str, ...], bool], ...]:
    out = []
    for columns, kind in (indexes or {}).items():
        if kind not in ("enabled", "unique"):
            raise AccelerationError(f"indexes.{columns}: expected enabled or unique (got {kind!r})")
        out.append((_columns(columns), kind == "unique"))
    return tuple(out)


# ---------------------------------------------------------------- refresh_sql and retention_sql


def check_refresh_sql(sql: str, dataset: str) -> exp.Select:
    """Upstream's rule: `SELECT <columns or *> FROM <dataset> [WHERE …]`, plain column names only,
    no joins. Returns the parsed statement; raises AccelerationError saying what is wrong."""
    try:
        tree = sqlglot.parse_one(sql)
    except (sqlglot.errors.SqlglotError, RecursionError) as e:
        raise AccelerationError(f"refresh_sql: cannot parse {sql!r}: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, exp.Select):
        raise AccelerationError(f"refresh_sql: expected SELECT … FROM {dataset} (got {sql!r})")
    source = tree.args.get("from_") or tree.args.get("from")
    table = source.this if source is not None else None
    if not isinstance(table, exp.Table) or _table_name(table) != dataset.lower() or tree.args.get("joins"):
        raise AccelerationError(f"refresh_sql: must select from the dataset {dataset} only (got {sql!r})")
    for column in tree.expressions:
        if not isinstance(column, (exp.Column, exp.Star)):
            raise AccelerationError(f"refresh_sql: only column names may be selected (got {column.sql()!r})")
    for clause in ("group", "having", "order", "limit", "offset", "with_", "with"):
        if tree.args.get(clause):
            raise AccelerationError(f"refresh_sql: only SELECT <columns> FROM {dataset} WHERE … is allowed "
                                    f"(got {sql!r})")
    return tree


def retention_condition(sql: str, dataset: str) -> exp.Expression:
    """The WHERE of upstream's `DELETE FROM <dataset> WHERE …`."""
    try:
        tree = sqlglot.parse_one(sql)
    except (sqlglot.errors.SqlglotError, RecursionError) as e:
        raise AccelerationError(f"retention_sql: cannot parse {sql!r}: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, exp.Delete) or not isinstance(tree.this, exp.Table) \
            or _table_name(tree.this) != dataset.lower():
        raise AccelerationError(f"retention_sql: expected DELETE FROM {dataset} WHERE … (got {sql!r})")
    where = tree.args.get("where")
    if where is None:
        raise AccelerationError(f"retention_sql: a WHERE clause is required (got {sql!r})")
    condition: exp.Expression = where.this
    return condition


def _table_name(table: exp.Table) -> str:
    return ".".join(p for p in (table.db, table.name) if p).lower()

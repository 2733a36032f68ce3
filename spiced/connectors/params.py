"""Connector parameters as upstream checks them: prefixed component parameters (`pg_host`), bare
runtime parameters (`connection_pool_size`), defaults, allowed values, and upstream's texts for
what is dropped (a WARN, loading goes on) and what is wrong (the dataset cannot load).

Upstream's machinery lives in its `runtime-parameters` crate; the texts below are its texts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Param:
    name: str  # without the prefix
    default: str | None = None
    one_of: tuple[str, ...] = ()
    ignore_case: bool = False
    required: bool = False
    secret: bool = False  # never shown; auto-loaded from the secret stores as `<prefix>_<name>`
    deprecated: str | None = None  # upstream's message, e.g. "use 'schema_infer_max_records' instead"


@dataclass(frozen=True, slots=True)
class Spec:
    """The parameters of one connector: `component` ones are written `<prefix>_<name>`."""

    connector: str
    prefix: str
    component: tuple[Param, ...] = ()
    runtime: tuple[Param, ...] = ()
    kind: str = "connector"  # or "accelerator"

    @property
    def label(self) -> str:
        return f"{self.kind} {self.connector}"


# Finds a missing secret parameter in the secret stores by its prefixed name (`pg_pass`).
SecretLookup = Callable[[str], "str | None"]


class ParamError(ValueError):
    """Upstream's `Invalid configuration for connector <c>. <message>`."""


@dataclass(frozen=True, slots=True)
class Checked:
    values: Mapping[str, str]  # bare names → values, defaults filled in
    warnings: tuple[str, ...] = field(default=())

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def flag(self, name: str) -> bool:
        return self.values.get(name, "false").lower() == "true"


def check(spec: Spec, params: Mapping[str, str], lookup_secret: SecretLookup | None = None) -> Checked:
    """Sort `params` by `spec`: drop (with upstream's WARN text) what does not belong, fill defaults,
    load missing secrets, and raise ParamError on a missing required or disallowed value."""
    component = {p.name: p for p in spec.component}
    runtime = {p.name: p for p in spec.runtime}
    prefix = spec.prefix + "_"
    values: dict[str, str] = {}
    warnings: list[str] = []
    for key, value in params.items():
        bare = key[len(prefix):] if key.startswith(prefix) else None
        if bare is not None and bare in component:
            values[bare] = value
        elif key in runtime:
            values[key] = value
        elif key in component:
            warnings.append(f"Ignoring parameter {key}: must be prefixed with `{prefix}` for {spec.label}.")
        elif bare is not None and bare in runtime:
            warnings.append(f"Ignoring parameter {key}: must not be prefixed with `{prefix}` for {spec.label}.")
        else:
            warnings.append(f"Ignoring parameter {key}: not supported for {spec.label}.")
    for p in (*spec.component, *spec.runtime):
        if p.deprecated and p.name in values:
            warnings.append(f"Parameter '{_display(spec, p)}' is deprecated for {spec.label}: {p.deprecated}")
        if p.name not in values and p.secret and lookup_secret is not None:
            found = lookup_secret(f"{spec.prefix}_{p.name}")
            if found is not None:
                values[p.name] = found
        if p.name not in values and p.default is not None:
            values[p.name] = p.default
        if p.required and p.name not in values:
            raise ParamError(f"Missing required parameter: {_display(spec, p)}")
        given = values.get(p.name)
        if given is not None and p.one_of:
            allowed = [v.lower() for v in p.one_of] if p.ignore_case else list(p.one_of)
            if (given.lower() if p.ignore_case else given) not in allowed:
                raise ParamError(f"'{_display(spec, p)}' parameter must be one of: {', '.join(p.one_of)}. "
                                 f"Found {given}.")
    return Checked(values, tuple(warnings))


def _display(spec: Spec, p: Param) -> str:
    return p.name if p in spec.runtime else f"{spec.prefix}_{p.name}"


BOOL = ("true", "false")

# The listing parameters every file-like connector (file, s3, http) takes bare.
LISTING: tuple[Param, ...] = (
    Param("file_format", one_of=("parquet", "csv", "json")),
    Param("file_extension"),
    Param("hive_partitioning_enabled", default="false", one_of=BOOL),
    Param("schema_infer_max_records"),
    Param("csv_has_header", default="true", one_of=BOOL),
    Param("csv_delimiter", default=","),
    Param("csv_quote", default='"'),
    Param("csv_escape"),
    Param("csv_schema_infer_max_records", deprecated="use 'schema_infer_max_records' instead"),
    Param("file_compression_type", one_of=("GZIP", "BZIP2", "XZ", "ZSTD", "UNCOMPRESSED"), ignore_case=True),
)

"""Flags + spicepod + secrets → one frozen `RuntimeConfig`. Nothing below this module reads argv,
YAML or the environment.

Precedence (upstream): CLI file > CLI inline > spicepod file > spicepod inline, resolved separately
for the certificate, the key and the client CA; CLI flags override the spicepod.

Cluster mode (`--role`, `--scheduler-address` and the `--node-*` flags) is parsed into
`ClusterSettings`, with upstream's validation and texts. A scheduler's config is a `RuntimeConfig`;
an executor has no spicepod of its own (it receives the scheduler's) and gets an `ExecutorConfig`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from . import __version__
from .acceleration import Acceleration, AccelerationError, acceleration
from .connectors import CONNECTORS
from .connectors.params import ParamError, check
from .durations import parse_duration, seconds
from .errors import ConfigError, TlsConfigError
from .results_cache import CacheSettings
from .secrets import SecretResolver, SecretStoreSpec
from .spicepod import (
    DatasetSpec,
    RuntimeSpec,
    SpicepodSpec,
    TimeFormat,
    TlsSpec,
    find_spicepod,
    read_spicepod,
    unmodelled_keys,
    validate_spicepod,
)

ClientAuthMode = Literal["none", "request", "required"]
ClusterRole = Literal["scheduler", "executor"]
MaterialOrigin = Literal["cli_file", "cli_inline", "spicepod_file", "spicepod_inline"]


@dataclass(frozen=True, slots=True)
class MaterialSource:
    """Where one piece of TLS material comes from: a file path (hot-reloaded) or inline PEM."""

    origin: MaterialOrigin
    path: Path | None = None
    pem: bytes | None = field(default=None, repr=False)

    @property
    def is_file(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        if self.path is not None:
            return f"file {self.path}"
        return "inline PEM (spicepod / CLI)"


DEFAULT_EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True, slots=True)
class TlsSettings:
    certificate: MaterialSource
    key: MaterialSource
    client_auth_mode: ClientAuthMode = "none"
    client_ca: MaterialSource | None = None
    expiry_warning_days: int = DEFAULT_EXPIRY_WARNING_DAYS  # ours: WARN while a certificate expires within this
    watch: Literal["notify", "poll"] = "notify"  # ours: "poll" turns filesystem notifications off

    @property
    def reloadable(self) -> bool:
        """Upstream: reload only when both cert and key are file-backed; otherwise load everything once."""
        return self.certificate.is_file and self.key.is_file


@dataclass(frozen=True, slots=True)
class Dataset:
    name: str
    from_: str
    connector: str  # the `from:` scheme: file, s3, http, https, postgres, mysql, duckdb, sqlite
    options: object = field(repr=False)  # the connector's own frozen options (spiced.connectors)
    description: str | None = None
    acceleration: Acceleration | None = None
    warnings: tuple[str, ...] = ()  # upstream's WARN texts for parameters dropped; logged at registration
    time_column: str | None = None
    time_format: TimeFormat = "timestamp"
    ready_state: Literal["on_load", "on_registration"] = "on_load"

    @property
    def accelerated(self) -> bool:
        return self.acceleration is not None and self.acceleration.enabled


@dataclass(frozen=True, slots=True)
class View:
    name: str
    sql: str


@dataclass(frozen=True, slots=True)
class Spicepod:
    file: Path
    name: str
    version: str
    datasets: tuple[Dataset, ...]
    views: tuple[View, ...]
    raw: Mapping[str, object] = field(repr=False, default_factory=dict)
    warnings: tuple[str, ...] = ()  # one per upstream key set that nothing here acts on; logged at startup


DEFAULT_NODE_PORT = 50052


@dataclass(frozen=True, slots=True)
class ClusterMtls:
    """The node's mTLS material, always file-backed (hot-reloaded together)."""

    ca: Path
    certificate: Path
    key: Path


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    role: ClusterRole
    bind_addr: tuple[str, int]
    advertise_host: str
    mtls: ClusterMtls | None  # None: plaintext, allowed by --allow-insecure-connections
    scheduler: tuple[str, int] | None = None  # an executor's scheduler (host, port)
    warnings: tuple[str, ...] = ()  # upstream's WARN texts for flags adjusted or without effect

    @property
    def scheme(self) -> Literal["tls", "tcp"]:
        """The Dask transport: mTLS, or plaintext TCP."""
        return "tcp" if self.mtls is None else "tls"

    @property
    def scheduler_address(self) -> str:
        assert self.scheduler is not None
        host, port = self.scheduler
        return f"{self.scheme}://{_url_host(host)}:{port}"

    @property
    def scheduler_url(self) -> str:
        """As upstream names the scheduler in its log lines (`https://host:50052`)."""
        assert self.scheduler is not None
        host, port = self.scheduler
        return f"{'http' if self.mtls is None else 'https'}://{_url_host(host)}:{port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    spicepod: Spicepod
    http_addr: tuple[str, int] = ("127.0.0.1", 8090)
    flight_addr: tuple[str, int] = ("127.0.0.1", 50051)
    metrics_addr: tuple[str, int] | None = None
    tls: TlsSettings | None = None
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    query_timeout: float | None = None
    access_log: bool = False  # INFO line per HTTP request and Flight call (spiced/http/observe.py, flight/peers.py)
    pods_watcher: bool = False
    results_cache: CacheSettings = field(default_factory=CacheSettings)
    verbosity: int = 0
    workdir: Path = field(default_factory=Path.cwd)
    cluster: ClusterSettings | None = None  # a scheduler's node settings
    async_query_ttl: float = 12 * 3600.0  # how long a scheduler keeps async query results (spiced/jobs.py)


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """A cluster executor: its listeners and node settings; the spicepod comes from the scheduler."""

    cluster: ClusterSettings
    http_addr: tuple[str, int] = ("127.0.0.1", 8090)
    metrics_addr: tuple[str, int] | None = None
    tls: TlsSettings | None = None  # the HTTP health listener's, from the --tls-* flags
    warnings: tuple[str, ...] = ()  # flags that have no effect on an executor


# ---------------------------------------------------------------- flags


def _bind_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep:
            raise ValueError
        ipaddress.ip_address(host)
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid socket address syntax: '{text}' (expected IP:port)") from None
    return host, number


def looks_like_pem(text: str) -> bool:
    return "-----BEGIN" in text or "\n" in text


def _shown(text: str) -> str:
    """A flag value fit for an error message: PEM (possibly a private key) is never echoed."""
    return "<PEM text, not shown>" if looks_like_pem(text) else repr(text)


def _bool_value(text: str) -> bool:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    raise argparse.ArgumentTypeError(f"invalid value {_shown(text)}: expected true or false")


def _client_auth_mode(text: str) -> ClientAuthMode:
    if text in ("none", "request", "required"):
        return text  # type: ignore[return-value]
    raise argparse.ArgumentTypeError(f"invalid value {_shown(text)}: expected none, request or required")


def _role(text: str) -> ClusterRole:
    if text in ("scheduler", "executor"):
        return text  # type: ignore[return-value]
    raise argparse.ArgumentTypeError(f"invalid value {_shown(text)}: expected scheduler or executor")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spiced", description="Spice.ai runtime (Python).")
    p.add_argument("path", nargs="?", help="Spicepod directory or YAML file (default: the working directory)")
    p.add_argument("--http", type=_bind_address, metavar="BIND_ADDRESS", help="HTTP API address (127.0.0.1:8090)")
    p.add_argument("--flight", type=_bind_address, metavar="FLIGHT_BIND_ADDRESS",
                   help="Flight address (127.0.0.1:50051)")
    p.add_argument("--open_telemetry", type=_bind_address, metavar="OPEN_TELEMETRY_BIND_ADDRESS",
                   help=argparse.SUPPRESS)
    p.add_argument("--tls-enabled", type=_bool_value, metavar="<true|false>")
    p.add_argument("--tls-certificate", metavar="PEM")
    p.add_argument("--tls-certificate-file", metavar="PATH")
    p.add_argument("--tls-key", metavar="PEM")
    p.add_argument("--tls-key-file", metavar="PATH")
    p.add_argument("--tls-client-auth-mode", type=_client_auth_mode, metavar="<none|request|required>")
    p.add_argument("--tls-client-auth-ca-file", metavar="PATH")
    p.add_argument("--tls-client-auth-ca", metavar="PEM")
    p.add_argument("--pods-watcher-enabled", action="store_true",
                   help="Watch spicepod.yaml and apply its changes without a restart (spice run passes it)")
    p.add_argument("--access-log", action="store_true", default=None,
                   help="Log every HTTP request and Flight call at INFO (also runtime.access_log: true)")
    p.add_argument("--telemetry-enabled", type=_bool_value, metavar="<true|false>")
    p.add_argument("--set-runtime", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--very-verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"v{__version__}")
    m = p.add_argument_group("Metrics")
    m.add_argument("--metrics", type=_bind_address, metavar="BIND_ADDRESS",
                   help="Enable Prometheus metrics. (disabled by default)")
    c = p.add_argument_group("Cluster")
    c.add_argument("--role", type=_role, metavar="<scheduler|executor>",
                   help="Explicit cluster role. If omitted but --scheduler-address is set, the role is executor.")
    c.add_argument("--scheduler-address", metavar="URL",
                   help="URL of the scheduler's node port (https://host:50052); implies --role executor")
    c.add_argument("--node-bind-address", type=_bind_address, metavar="BIND_ADDRESS",
                   help="Bind address for the internal cluster service (0.0.0.0:50052)")
    c.add_argument("--node-advertise-address", metavar="HOST_OR_IP",
                   help="Hostname or IP this node advertises to the rest of the cluster")
    c.add_argument("--node-mtls-ca-certificate-file", metavar="PATH",
                   help="CA certificate used to validate peer node identities")
    c.add_argument("--node-mtls-certificate-file", metavar="PATH",
                   help="Certificate for both server TLS and client mTLS on the node port")
    c.add_argument("--node-mtls-key-file", metavar="PATH", help="Private key file for the node certificate")
    c.add_argument("--allow-insecure-connections", action="store_true",
                   help="Allow cluster communication without mTLS (development and testing only)")
    return p


# ---------------------------------------------------------------- spicepod → typed config

def _param_text(value: str | bool | int | float | None) -> str:
    """Upstream turns numbers and booleans into strings (`true`, not Python's `True`)."""
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str, key: str, file: Path) -> int:
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise ConfigError(f"Failed to start Spice runtime: Unable to load spicepod {file}: {key}: "
                          f"invalid size {text!r} (expected e.g. 128MiB, 512KB)")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def results_cache_settings(runtime: RuntimeSpec, file: Path) -> CacheSettings:
    """`runtime.caching.sql_results`, else the legacy `runtime.results_cache`, else upstream's defaults."""
    warnings: list[str] = []
    if runtime.caching is not None:
        for other in ("search_results", "embeddings"):
            if getattr(runtime.caching, other) is not None:
                warnings.append(f"runtime.caching.{other}: not supported (this runtime has no search or "
                                "embeddings); ignored")
    if runtime.caching is not None and runtime.caching.sql_results is not None:
        s = runtime.caching.sql_results
        where, size_key, size, swr = "runtime.caching.sql_results", "max_size", s.max_size, s.stale_while_revalidate_ttl
        swr_key = "stale_while_revalidate_ttl"
        policy, key_type, enabled, ttl = s.caching_policy, s.cache_key_type, s.enabled, s.item_ttl
        hashing, engine = s.hashing_algorithm, s.engine
        if s.encoding != "none":
            warnings.append(f"{where}.encoding: {s.encoding} is not supported; results are held unencoded")
        if s.warmup != "disabled":
            warnings.append(f"{where}.warmup: {s.warmup} is not supported; the cache fills as queries run")
    elif runtime.results_cache is not None:
        r = runtime.results_cache
        where, size_key, size, swr = ("runtime.results_cache", "cache_max_size", r.cache_max_size,
                                      r.max_stale_while_revalidate)
        swr_key = "max_stale_while_revalidate"
        policy, key_type, enabled, ttl = r.caching_policy, r.cache_key_type, r.enabled, r.item_ttl
        hashing, engine = r.hashing_algorithm, r.engine
    else:
        return CacheSettings(warnings=tuple(warnings))
    if swr is not None:
        warnings.append(f"{where}.{swr_key}: not supported; entries expire after item_ttl "
                        "(a client may still accept them with Cache-Control: max-stale)")
    if policy != "lru":
        warnings.append(f"{where}.eviction_policy: {policy} is not supported; the least recently used goes first")
    if hashing is not None:
        warnings.append(f"{where}.hashing_algorithm: {hashing} is not used; keys are compared whole")
    if engine is not None:
        warnings.append(f"{where}.engine: {engine} is not used; the cache is the runtime's own")
    return CacheSettings(enabled=enabled, max_size=parse_size(size, f"{where}.{size_key}", file),
                         item_ttl=parse_duration(ttl, f"{where}.item_ttl", file), key_type=key_type,
                         max_size_text=size, item_ttl_text=ttl, warnings=tuple(warnings))


def _dataset(i: int, d: DatasetSpec, file: Path, workdir: Path, secrets: SecretResolver) -> Dataset:
    prefix = f"Failed to start Spice runtime: Unable to load spicepod {file}: datasets[{i}]"
    scheme, sep, target = d.from_.partition(":")
    connector = CONNECTORS.get(scheme)
    if not sep or connector is None:
        raise ConfigError(
            f"{prefix}.from: Cannot setup the dataset {d.name} ({scheme}). The connector '{scheme}' is not a valid "
            f"connector. For details, visit: https://spiceai.org/docs/components/data-connectors "
            f"(this runtime reads {', '.join(sorted(CONNECTORS))})")
    if d.name.count(".") > 1:
        catalog = d.name.split(".")[0]
        raise ConfigError(
            f"{prefix}.name: Dataset names should not include a catalog. Unexpected '{catalog}' in '{d.name}'. "
            f"Remove '{catalog}' from the dataset name and try again."
        )
    params = {k: secrets.resolve(_param_text(v), f"datasets[{i}].params.{k}").value for k, v in d.params.items()}
    try:
        checked = check(connector.spec, params,
                        lambda key: secrets.lookup("secrets", key, f"datasets[{i}].params.{key}"))
        options = connector.options(target, checked, workdir)
    except ParamError as e:
        raise ConfigError(f"{prefix}.params: Invalid configuration for {connector.spec.label}. {e}") from None
    except ValueError as e:
        raise ConfigError(f"{prefix}.{e}") from None
    accel = None
    if d.acceleration is not None:
        where = f"datasets[{i}].acceleration"
        engine_params = {k: secrets.resolve(_param_text(v), f"{where}.params.{k}").value
                         for k, v in d.acceleration.params.items()}
        try:
            accel = acceleration(d, d.acceleration, workdir,
                                 lambda text, key: parse_duration(text, f"{where}.{key}", file), engine_params)
        except AccelerationError as e:
            raise ConfigError(f"{prefix}.acceleration.{e}") from None
    ready_state = (d.acceleration.ready_state if d.acceleration is not None and d.acceleration.ready_state
                   else d.ready_state)
    return Dataset(d.name, d.from_, scheme, options, d.description, accel,
                   checked.warnings + (accel.warnings if accel is not None else ()),
                   d.time_column, d.time_format or "timestamp", ready_state)


def _material(
    cli_file: str | None, cli_inline: str | None, pod_file: str | None, pod_inline: str | None,
    key: str, secrets: SecretResolver,
) -> MaterialSource | None:
    flag = "--tls-client-auth-ca" if key == "client_auth_ca" else f"--tls-{key}"
    if cli_file:
        if looks_like_pem(cli_file):
            raise TlsConfigError(f"{flag}-file was given PEM text instead of a path; pass inline PEM with {flag}")
        return MaterialSource("cli_file", path=Path(cli_file))
    if cli_inline:
        return MaterialSource("cli_inline", pem=cli_inline.encode())
    if pod_file:
        r = secrets.resolve(pod_file, f"runtime.tls.{key}_file")
        if r.missing:
            raise TlsConfigError(f"runtime.tls.{key}_file references secret '{r.missing[0]}', "
                                 "which resolved to nothing")
        if looks_like_pem(r.value):
            raise TlsConfigError(f"runtime.tls.{key}_file holds PEM text instead of a path; "
                                 f"use runtime.tls.{key} for inline PEM")
        return MaterialSource("spicepod_file", path=Path(r.value))
    if pod_inline:
        r = secrets.resolve(pod_inline, f"runtime.tls.{key}")
        if r.missing or not r.value.strip():
            name = r.missing[0] if r.missing else pod_inline
            raise TlsConfigError(f"runtime.tls.{key} references secret '{name}', which resolved to nothing")
        return MaterialSource("spicepod_inline", pem=r.value.encode())
    return None


def tls_settings(args: argparse.Namespace, spec: TlsSpec | None, secrets: SecretResolver) -> TlsSettings | None:
    enabled = bool(args.tls_enabled) or bool(spec and spec.enabled)
    if not enabled:
        return None
    s = spec or TlsSpec(enabled=False)
    cert = _material(args.tls_certificate_file, args.tls_certificate, s.certificate_file, s.certificate, "certificate",
                     secrets)
    if cert is None:
        raise TlsConfigError(
            "TLS certificate is required: provide --tls-certificate-file (recommended for hot-reload), "
            "--tls-certificate (inline PEM), or runtime.tls.{certificate_file,certificate} in the spicepod"
        )
    key = _material(args.tls_key_file, args.tls_key, s.key_file, s.key, "key", secrets)
    if key is None:
        raise TlsConfigError(
            "TLS key is required: provide --tls-key-file (recommended for hot-reload), --tls-key (inline PEM), "
            "or runtime.tls.{key_file,key} in the spicepod"
        )
    mode: ClientAuthMode = args.tls_client_auth_mode or s.client_auth_mode or "none"
    ca = _material(args.tls_client_auth_ca_file, args.tls_client_auth_ca, s.client_auth_ca_file, s.client_auth_ca,
                   "client_auth_ca", secrets)
    if mode == "required" and ca is None:
        raise TlsConfigError(
            "client_auth_mode=required requires a client CA: provide --tls-client-auth-ca-file (recommended for "
            "hot-reload), --tls-client-auth-ca (inline PEM), or runtime.tls.{client_auth_ca_file,client_auth_ca} "
            "in the spicepod"
        )
    if mode == "request" and ca is None:
        raise TlsConfigError(
            "client_auth_mode=request requires a client CA so presented certs can be verified: provide "
            "--tls-client-auth-ca-file, --tls-client-auth-ca, or runtime.tls.{client_auth_ca_file,client_auth_ca}"
        )
    if mode == "none" and ca is not None:
        raise TlsConfigError(
            "client_auth_mode=none must not have a client CA configured (set client_auth_mode=request or required "
            "to enable mTLS, or remove the CA configuration)"
        )
    if ca is not None and not ca.is_file and cert.is_file and key.is_file:
        raise TlsConfigError(
            "client_auth_ca configured inline but tls.certificate_file/key_file are file-backed: this would prevent "
            "the client CA from hot-reloading with the cert and key. Switch to tls.client_auth_ca_file so the entire "
            "bundle rotates together, or move cert/key to inline form."
        )
    return TlsSettings(cert, key, mode, ca, DEFAULT_EXPIRY_WARNING_DAYS if s.expiry_warning_days is None
                       else s.expiry_warning_days, s.watch or "notify")


def _api_keys(spec: SpicepodSpec, secrets: SecretResolver) -> tuple[str, ...]:
    auth = spec.runtime.auth
    if auth is None or auth.api_key is None or not auth.api_key.enabled:
        return ()
    keys = tuple(v for i, k in enumerate(auth.api_key.keys)
                 if (v := secrets.resolve(k, f"runtime.auth.api-key.keys[{i}]").value))
    if not keys:
        raise ConfigError("Unable to configure API key auth: runtime.auth.api-key is enabled "
                          "but no key resolved to a value")
    return keys


def _apply_set_runtime(raw: dict[str, object], items: Sequence[str]) -> None:
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("Invalid set format. Use key=value")
        node = raw.setdefault("runtime", {})
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict):
                raise ConfigError(f"--set-runtime {key}: runtime.{part} is not a mapping")
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set-runtime {key}: not a mapping")
        node[parts[-1]] = value


# ---------------------------------------------------------------- cluster flags

_MTLS_FLAGS = "--node-mtls-ca-certificate-file, --node-mtls-certificate-file, --node-mtls-key-file"
_NODE_FLAGS = {"node_bind_address": "--node-bind-address", "node_advertise_address": "--node-advertise-address",
               "node_mtls_ca_certificate_file": "--node-mtls-ca-certificate-file",
               "node_mtls_certificate_file": "--node-mtls-certificate-file",
               "node_mtls_key_file": "--node-mtls-key-file",
               "allow_insecure_connections": "--allow-insecure-connections"}


def _cluster_error(detail: str) -> ConfigError:
    return ConfigError(f"Invalid cluster configuration: {detail}")


def cluster_role(args: argparse.Namespace) -> ClusterRole | None:
    """Upstream's effective role: explicit, or executor when only --scheduler-address is given."""
    role: ClusterRole | None = args.role
    return role or ("executor" if args.scheduler_address else None)


def _mtls(args: argparse.Namespace) -> ClusterMtls | None:
    files = (args.node_mtls_ca_certificate_file, args.node_mtls_certificate_file, args.node_mtls_key_file)
    if all(files):
        return ClusterMtls(*(Path(f) for f in files))
    if any(files):
        raise _cluster_error(f"Cluster mTLS requires all of: {_MTLS_FLAGS}")
    return None


def _advertise_host(text: str, bind_port: int, warnings: list[str]) -> str:
    """A host; a port given with it is dropped with upstream's WARN (the bind port is advertised)."""
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit() and int(port) <= 65535:
        warnings.append(f"Port in --node-advertise-address will be ignored. Using port {bind_port} "
                        "from --node-bind-address.")
        return host.strip("[]")
    return text


def _scheduler(text: str, mtls: bool) -> tuple[str, int]:
    """`--scheduler-address`: a URL whose scheme, when omitted, follows the transport; port 50052 by default."""
    scheme = "https" if mtls else "http"
    try:
        parts = urlsplit(text if "://" in text else f"{scheme}://{text}")
        port = parts.port
    except ValueError:  # urllib's port and IPv6 errors; upstream's url crate says this for both
        raise _cluster_error("Invalid --scheduler-address URL: invalid port number") from None
    if not parts.hostname:
        raise _cluster_error("Invalid --scheduler-address URL: empty host")
    if parts.scheme != scheme:
        transport = "cluster mTLS" if mtls else "plaintext (--allow-insecure-connections)"
        raise _cluster_error(f"Invalid --scheduler-address URL: {parts.scheme}:// does not match the node transport, "
                             f"{transport}; use {scheme}:// or leave the scheme out")
    return parts.hostname, DEFAULT_NODE_PORT if port is None else port


def cluster_settings(args: argparse.Namespace) -> ClusterSettings | None:
    """The node settings of a scheduler or executor, None for a standalone runtime (ConfigError when invalid).

    Checked in upstream's order: an incomplete mTLS triple, then every flag a cluster role still needs,
    named together in one line."""
    mtls = _mtls(args)
    role = cluster_role(args)
    if role is None:
        return None
    missing = []
    if mtls is None and not args.allow_insecure_connections:
        missing.append(f"{_MTLS_FLAGS} (or --allow-insecure-connections)")
    if not args.node_advertise_address:
        missing.append("--node-advertise-address")
    if role == "executor" and not args.scheduler_address:
        missing.append("--scheduler-address")
    if missing:
        raise _cluster_error(f"Cluster mode requires the following flags: {', '.join(missing)}")
    bind: tuple[str, int] = args.node_bind_address or ("0.0.0.0", DEFAULT_NODE_PORT)
    warnings: list[str] = []
    advertise = _advertise_host(args.node_advertise_address, bind[1], warnings)
    scheduler = None
    if role == "executor":
        scheduler = _scheduler(args.scheduler_address, mtls is not None)
    elif args.scheduler_address:
        warnings.append("--scheduler-address has no effect on a scheduler: it listens on --node-bind-address")
    return ClusterSettings(role, bind, advertise, mtls, scheduler, tuple(warnings))


def standalone_cluster_warnings(args: argparse.Namespace) -> tuple[str, ...]:
    """Node flags given to a standalone runtime, which has no node port."""
    given = [flag for attr, flag in _NODE_FLAGS.items() if getattr(args, attr)]
    if cluster_role(args) is not None or not given:
        return ()
    return (f"{', '.join(given)}: no effect without --role or --scheduler-address (standalone runtime)",)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse spiced's flags; usage errors exit 2 (argparse), as upstream's clap does."""
    return build_parser().parse_args(argv)


def secret_stores(spec: SpicepodSpec) -> list[SecretStoreSpec]:
    """The spicepod's `secrets:` declarations."""
    return [SecretStoreSpec(s.name, s.from_.split(":")[0], {k: str(v) for k, v in s.params.items()})
            for s in spec.secrets]


def build_spicepod(file: Path, raw: dict[str, object], spec: SpicepodSpec, workdir: Path,
                   secrets: SecretResolver) -> Spicepod:
    """The typed spicepod: datasets checked against their connectors, secrets resolved, views read."""
    datasets = tuple(_dataset(i, d, file, workdir, secrets) for i, d in enumerate(spec.datasets))
    views: list[View] = []
    for i, v in enumerate(spec.views):
        sql = v.sql
        if sql is None and v.sql_ref:
            try:
                sql = (file.parent / v.sql_ref).read_text()
            except OSError as e:
                raise ConfigError(f"Failed to start Spice runtime: Unable to load spicepod {file}: "
                                  f"views[{i}].sql_ref: {e}") from None
        if not sql:
            raise ConfigError(f"Failed to start Spice runtime: Unable to load spicepod {file}: "
                              f"views[{i}].sql: missing required field")
        if v.name.lower() in {d.name.lower() for d in datasets}:
            raise ConfigError(f"Failed to start Spice runtime: Unable to load spicepod {file}: "
                              f"views[{i}].name: view '{v.name}' collides with a dataset")
        views.append(View(v.name, sql))
    ignored = tuple(f"Spicepod key {path} is not supported by this runtime and is ignored."
                    for path in unmodelled_keys(spec))
    return Spicepod(file, spec.name, spec.version, datasets, tuple(views), raw, ignored)


ASYNC_QUERY_TTL_ENV = "SPICED_ASYNC_QUERY_RESULT_TTL"


def async_query_ttl(environ: Mapping[str, str]) -> float:
    """How long a scheduler keeps async query results: upstream's 12 hours, or the duration in
    SPICED_ASYNC_QUERY_RESULT_TTL (a ConfigError when it is not one)."""
    text = environ.get(ASYNC_QUERY_TTL_ENV)
    if text is None:
        return 12 * 3600.0
    value = seconds(text)
    if value is None or value <= 0:
        raise ConfigError(f"Failed to start Spice runtime: environment variable {ASYNC_QUERY_TTL_ENV}: invalid "
                          f"duration {text[:100]!r} (expected e.g. 30m, 12h)")
    return value


def load_config(argv: Sequence[str] | argparse.Namespace | None = None, *, workdir: Path | None = None,
                environ: Mapping[str, str] | None = None) -> RuntimeConfig:
    """Build a standalone runtime's or a scheduler's config from flags, the spicepod and secrets
    (ConfigError when it cannot run). Executors take `load_executor_config`."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    cluster = cluster_settings(args)
    assert cluster is None or cluster.role == "scheduler", "an executor's config is load_executor_config's"
    workdir = workdir or Path.cwd()
    file = find_spicepod(Path(args.path) if args.path else workdir)
    raw = read_spicepod(file)
    _apply_set_runtime(raw, args.set_runtime)
    spec = validate_spicepod(file, raw)
    secrets = SecretResolver(secret_stores(spec), workdir, environ)
    pod = build_spicepod(file, raw, spec, workdir, secrets)
    timeout = None
    if spec.runtime.query and spec.runtime.query.timeout:
        timeout = parse_duration(spec.runtime.query.timeout, "runtime.query.timeout", file)
    cache = results_cache_settings(spec.runtime, file)
    environ = os.environ if environ is None else environ
    return RuntimeConfig(
        spicepod=pod,
        http_addr=args.http or ("127.0.0.1", 8090),
        flight_addr=args.flight or ("127.0.0.1", 50051),
        metrics_addr=args.metrics,
        tls=tls_settings(args, spec.runtime.tls, secrets),
        api_keys=_api_keys(spec, secrets),
        query_timeout=timeout,
        access_log=bool(args.access_log) or bool(spec.runtime.access_log),
        pods_watcher=args.pods_watcher_enabled,
        results_cache=cache,
        verbosity=2 if args.very_verbose else args.verbose,
        workdir=workdir,
        cluster=cluster,
        async_query_ttl=async_query_ttl(environ),
    )


# Flags that configure what an executor does not run: the spicepod and its SQL serving.
_NOT_ON_EXECUTORS = {"path": "a spicepod path", "flight": "--flight", "pods_watcher_enabled": "--pods-watcher-enabled",
                     "access_log": "--access-log", "set_runtime": "--set-runtime"}


def load_executor_config(args: argparse.Namespace, *, workdir: Path | None = None,
                         environ: Mapping[str, str] | None = None) -> ExecutorConfig:
    """An executor's config: node settings and its HTTP health listener; no spicepod is read."""
    cluster = cluster_settings(args)
    assert cluster is not None and cluster.role == "executor", "a scheduler's config is load_config's"
    given = [flag for attr, flag in _NOT_ON_EXECUTORS.items() if getattr(args, attr)]
    warnings = (f"{', '.join(given)}: no effect on a cluster executor, which serves no SQL and takes the "
                "scheduler's spicepod",) if given else ()
    return ExecutorConfig(
        cluster=cluster,
        http_addr=args.http or ("127.0.0.1", 8090),
        metrics_addr=args.metrics,
        tls=tls_settings(args, None, SecretResolver([], workdir or Path.cwd(), environ)),
        warnings=warnings,
    )

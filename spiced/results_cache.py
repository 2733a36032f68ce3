"""The SQL results cache, as upstream's `runtime.caching.sql_results`: on by default, results of
read-only queries over datasets kept for `item_ttl` within `max_size` bytes (least recently used
first out), dropped when a dataset they read is refreshed, and never shared across API keys or
client certificates.

A request steers it with `Cache-Control` (`no-cache`, `only-if-cached`, `min-fresh=N`,
`max-stale[=N]`) and `Spice-Cache-Key`; the answer says what happened (`Results-Cache-Status`
HIT / MISS / BYPASS / STALE), on HTTP as headers and on Flight as response metadata.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
from opentelemetry.metrics import Observation

from .errors import QueryError
from .metrics import Metrics

CacheStatus = Literal["HIT", "MISS", "BYPASS", "STALE"]
CacheScope = Literal["shared", "user"]
CUSTOM_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    enabled: bool = True
    max_size: int = 128 * 1024 * 1024
    item_ttl: float = 1.0
    key_type: Literal["plan", "sql"] = "plan"
    max_size_text: str = "128MiB"
    item_ttl_text: str = "1s"
    warnings: tuple[str, ...] = ()  # keys given that the cache does not act on; logged at startup


@dataclass(frozen=True, slots=True)
class CacheRequest:
    """What one query's client asked of the cache, and who it is (for the scope)."""

    principal: str | None = None  # a stable, non-secret id of the API key or client certificate
    no_cache: bool = False
    only_if_cached: bool = False
    min_fresh: float = 0.0
    max_stale: float | None = None  # None: no stale entry; inf: any
    custom_key: str | None = None

    @property
    def scope(self) -> CacheScope:
        return "user" if self.principal else "shared"


class CacheRequestError(ValueError):
    """A `Spice-Cache-Key` or `Cache-Control` value that cannot be used (a 400)."""


def principal_of(api_key: str | None, certificate_fingerprint: str | None) -> str | None:
    """Whom a cached result belongs to: a digest, so no key material is held as a cache key."""
    if api_key:
        return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:32]
    if certificate_fingerprint:
        return "cert:" + certificate_fingerprint
    return None


def parse_request(cache_control: str | None, custom_key: str | None, principal: str | None) -> CacheRequest:
    no_cache = only_if_cached = False
    min_fresh, max_stale = 0.0, None
    for directive in (d.strip().lower() for d in (cache_control or "").split(",") if d.strip()):
        name, _, value = directive.partition("=")
        name = name.strip()
        if name in ("no-cache", "no-store"):
            no_cache = True
        elif name == "only-if-cached":
            only_if_cached = True
        elif name == "min-fresh":
            min_fresh = _seconds(name, value)
        elif name == "max-stale":
            max_stale = _seconds(name, value) if value else float("inf")
    if custom_key is not None and not CUSTOM_KEY.match(custom_key):
        raise CacheRequestError("Invalid Spice-Cache-Key: expected 1 to 128 characters from [A-Za-z0-9_-]")
    return CacheRequest(principal, no_cache, only_if_cached, min_fresh, max_stale, custom_key)


def _seconds(name: str, value: str) -> float:
    if not value.strip().isdigit():
        raise CacheRequestError(f"Invalid Cache-Control directive {name}={value!r}: expected whole seconds")
    return float(value)


def not_cached() -> QueryError:
    return QueryError("The query result is not in the results cache (Cache-Control: only-if-cached)",
                      kind="not_cached")


def params_text(params: Mapping[str, object]) -> str:
    return repr(sorted((k, repr(v)) for k, v in params.items()))


@dataclass(frozen=True, slots=True)
class KnownPlan:
    text: str  # the logical plan's text: the cache key's basis
    schema: pa.Schema


class KnownPlans:
    """The plans of cacheable queries by their SQL text and parameters, at a catalog version
    (spiced.engine), so that a repeated query finds its cached result without being planned again:
    planning is about half of what a hit costs (0.13 of 0.27 ms for a point lookup). Least recently
    used first out."""

    def __init__(self, kept: int = 4096) -> None:
        self._plans: OrderedDict[tuple[int, str, str], KnownPlan] = OrderedDict()
        self._kept = kept
        self._lock = threading.Lock()

    @staticmethod
    def _key(version: int, sql: str, params: Mapping[str, object] | None) -> tuple[int, str, str]:
        return version, sql, params_text(params) if params else ""

    def get(self, version: int, sql: str, params: Mapping[str, object] | None) -> KnownPlan | None:
        key = self._key(version, sql, params)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
            return plan

    def put(self, version: int, sql: str, params: Mapping[str, object] | None, plan: KnownPlan) -> None:
        with self._lock:
            self._plans[self._key(version, sql, params)] = plan
            if len(self._plans) > self._kept:
                self._plans.popitem(last=False)


@dataclass(slots=True)
class Entry:
    schema: pa.Schema
    batches: list[pa.RecordBatch]
    tables: frozenset[str]
    size: int
    stored_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Lookup:
    status: CacheStatus
    entry: Entry | None = None


class ResultsCache:
    def __init__(self, settings: CacheSettings, metrics: Metrics) -> None:
        self.settings = settings
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self._hits = self._requests = 0
        self._m_requests = metrics.hot_counter("results_cache_requests", "Results cache lookups.")
        self._m_hits = metrics.hot_counter("results_cache_hits", "Results cache hits.")
        self._m_misses = metrics.hot_counter("results_cache_misses", "Results cache misses.")
        self._m_evictions = metrics.hot_counter("results_cache_evictions", "Results cache evictions.")
        self._m_stale = metrics.hot_counter("results_cache_stale_rejections", "Stale entries not served.")
        for counter in (self._m_requests, self._m_hits, self._m_misses, self._m_stale):
            counter.add(0)  # published at 0 from startup, as upstream
        for reason in ("size", "expired", "invalidated"):
            self._m_evictions.add(0, {"reason": reason})
        metrics.observe("results_cache_max_size_bytes", "Results cache size limit.",
                        lambda _: [Observation(settings.max_size)])
        metrics.observe("results_cache_size_bytes", "Bytes held by the results cache.",
                        lambda _: [Observation(self._size)])
        metrics.observe("results_cache_items_count", "Entries in the results cache.",
                        lambda _: [Observation(len(self._entries))])
        metrics.observe("results_cache_hit_ratio", "Hits over lookups.",
                        lambda _: [Observation(self._hits / self._requests if self._requests else 0.0)])

    def key(self, request: CacheRequest, sql: str, plan_text: str, params: Mapping[str, object] | None) -> str:
        if request.custom_key is not None:
            basis = "custom:" + request.custom_key
        else:
            basis = (plan_text if self.settings.key_type == "plan" else "sql:" + sql)
            if params:
                basis += "\nparams:" + params_text(params)
        return f"{request.principal or 'shared'}\n{basis}"

    def lookup(self, key: str, request: CacheRequest) -> Lookup:
        """The entry a request may be served (HIT, or STALE within its max-stale), else MISS or BYPASS."""
        found = self._find(key, request) if not request.no_cache else None
        self._m_requests.add(1)
        with self._lock:
            self._requests += 1
        if found is None:
            self._m_misses.add(1)
            return Lookup("BYPASS" if request.no_cache else "MISS")
        return found

    def hit(self, key: str, request: CacheRequest) -> Lookup | None:
        """The entry a request may be served, counted as a lookup; None, and nothing counted, when
        there is none (the caller then plans the query and looks it up)."""
        found = self._find(key, request) if not request.no_cache else None
        if found is not None:
            self._m_requests.add(1)
            with self._lock:
                self._requests += 1
        return found

    def _find(self, key: str, request: CacheRequest) -> Lookup | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            age = time.monotonic() - entry.stored_at
            left = self.settings.item_ttl - age
            if left > 0 and left >= request.min_fresh:
                status: CacheStatus = "HIT"
            elif left <= 0 and request.max_stale is not None and -left <= request.max_stale:
                status = "STALE"
            else:
                if left <= 0:
                    self._m_stale.add(1)
                    self._drop(key, "expired")
                return None
            self._entries.move_to_end(key)
            self._hits += 1
        self._m_hits.add(1)
        return Lookup(status, entry)

    def store(self, key: str, schema: pa.Schema, batches: list[pa.RecordBatch], tables: Iterable[str]) -> None:
        size = sum(b.nbytes for b in batches)
        if size > self.settings.max_size:
            return
        with self._lock:
            replaced = self._entries.pop(key, None)  # the same query stored twice (two ran at once)
            if replaced is not None:
                self._size -= replaced.size
            while self._entries and self._size + size > self.settings.max_size:
                oldest = next(iter(self._entries))
                self._drop(oldest, "size")
            self._entries[key] = Entry(schema, batches, frozenset(tables), size)
            self._size += size

    def invalidate(self, table: str) -> None:
        """Drop every entry that read `table` (a refresh replaced its data)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if table in e.tables]:
                self._drop(key, "invalidated")

    def clear(self) -> None:
        """Drop every entry (the spicepod changed: a view may read other tables now)."""
        with self._lock:
            for key in list(self._entries):
                self._drop(key, "invalidated")

    def _drop(self, key: str, reason: str) -> None:
        entry = self._entries.pop(key)
        self._size -= entry.size
        self._m_evictions.add(1, {"reason": reason})

    @property
    def size(self) -> int:
        return self._size


def response_headers(status: CacheStatus | None, request: CacheRequest) -> dict[str, str]:
    """Upstream's answer headers (HTTP; Flight sends the same names as metadata, lower-case)."""
    if status is None:
        return {}
    headers: dict[str, str] = {"Results-Cache-Status": status, "Results-Cache-Scope": request.scope}
    if status != "BYPASS":
        headers["X-Cache"] = "Miss from spiceai" if status == "MISS" else "Hit from spiceai"
    vary = (["Spice-Cache-Key"] if request.custom_key is not None else []) + \
        (["Authorization", "X-API-Key"] if request.scope == "user" else [])
    if vary:
        headers["Vary"] = ", ".join(vary)
    return headers

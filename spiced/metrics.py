"""One OpenTelemetry MeterProvider, the runtime's instruments, and their Prometheus exposition.

Names follow upstream: no unit suffixes (units would be appended to the name), no `target_info`,
no `otel_scope_*` labels. Counters carry the exporter's `_total` sample suffix (`http_requests_total`):
prometheus_client writes counter families that way and a bare-named counter sample would not parse
as a counter; `runtime_tls_reload_total` is exactly upstream's name either way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

MS_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


class HotCounter:
    """A counter (or up-down counter) on a request's path: `add` only updates a total under a lock,
    and the SDK reads the totals when /metrics is scraped (an observable instrument), the same
    series as a synchronous counter. The SDK's own `add` costs about 9 µs (it builds a measurement
    and hashes its attributes on every call); a request records several."""

    def __init__(self) -> None:
        self._totals: dict[tuple[tuple[str, str], ...], float] = {}
        self._lock = threading.Lock()

    def add(self, amount: float, attributes: Mapping[str, str] | None = None) -> None:
        key = tuple(sorted(attributes.items())) if attributes else ()
        with self._lock:
            self._totals[key] = self._totals.get(key, 0) + amount

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            totals = list(self._totals.items())
        return [Observation(value, dict(key)) for key, value in totals]


@dataclass(frozen=True, slots=True)
class Exposition:
    body: bytes
    content_type: str


class Metrics:
    """Every instrument the runtime records, on a private registry (tests can run several runtimes)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reader = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=self.registry)
        ms_view = View(instrument_name="*_ms", aggregation=ExplicitBucketHistogramAggregation(MS_BUCKETS))
        self.provider = MeterProvider(metric_readers=[reader], views=[ms_view])
        m = self._meter = self.provider.get_meter("spiced_runtime")
        self.tls_reload = m.create_counter(
            "runtime_tls_reload_total", description="Total TLS material reload attempts, labeled by scope and result.")
        self.http_server_started = m.create_counter("runtime_http_server_started", description="HTTP server starts.")
        self.flight_server_started = m.create_counter(
            "runtime_flight_server_started", description="Flight server starts.")
        self.http_requests = self.hot_counter("http_requests", "HTTP requests served.")
        self.http_duration = m.create_histogram(
            "http_requests_duration_ms", description="HTTP request duration in milliseconds.")
        self.flight_tls_front_restarts = m.create_counter(
            "runtime_flight_tls_front_restarts",
            description="Flight TLS front processes started again after one exited or stopped answering, by reason.")
        self.flight_requests = self.hot_counter("flight_requests", "Flight requests served.")
        self.flight_duration = m.create_histogram(
            "flight_request_duration_ms", description="Flight request duration in milliseconds.")
        self.query_executions = self.hot_counter("query_executions", "Queries executed.")
        self.query_failures = m.create_counter("query_failures", description="Queries that failed.")
        self.query_duration = m.create_histogram(
            "query_duration_ms", description="Query duration, planning to last batch, in milliseconds.")
        self.query_execution_duration = m.create_histogram(
            "query_execution_duration_ms", description="Query execution time in milliseconds.")
        self.query_active = self.hot_counter("query_active_count", "Queries running now.", up_down=True)
        self.query_returned_rows = self.hot_counter("query_returned_rows", "Rows returned by queries.")
        self.dataset_load_state = m.create_gauge(
            "dataset_load_state",
            description="0 Initializing, 1 Ready, 2 Disabled, 3 Error, 4 Refreshing, 5 ShuttingDown.")
        self.dataset_active = m.create_up_down_counter(
            "dataset_active_count", description="Datasets registered, by engine.")
        self.dataset_load_errors = m.create_counter("dataset_load_errors", description="Dataset load failures.")
        self.client_cert_requests = self.hot_counter(
            "client_cert_requests", "Requests that presented a verified client certificate.")
        self.anonymous_requests = self.hot_counter(
            "client_cert_absent_requests", "Requests without a client certificate.")

    @property
    def meter(self) -> Meter:
        """For a component that owns its instruments (spiced/results_cache.py)."""
        return self._meter

    def hot_counter(self, name: str, description: str, *, up_down: bool = False) -> HotCounter:
        """A counter cheap enough for every request (HotCounter)."""
        counter = HotCounter()
        create = self._meter.create_observable_up_down_counter if up_down else self._meter.create_observable_counter
        create(name, callbacks=[counter.observe], description=description)
        return counter

    def observe(self, name: str, description: str,
                callback: Callable[[CallbackOptions], Iterable[Observation]]) -> None:
        """A gauge whose values `callback` reports at each collection (only the label sets it reports exist)."""
        self._meter.create_observable_gauge(name, callbacks=[callback], description=description)

    def exposition(self) -> Exposition:
        return Exposition(generate_latest(self.registry), CONTENT_TYPE_LATEST)

    def shutdown(self) -> None:
        self.provider.shutdown()

"""The SQL results cache through the real runtime: what is cached and for how long, what a request
may ask of it, what a refresh drops, whom a result belongs to, and the memory bound, over HTTP (curl's
peer: httpx) and Flight (pyarrow, reading the response metadata)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.flight as fl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Runtime, run_spiced, spiced_fails, write_pod
from tests.tlsprobe import wait_for

ROWS = 5000
CSV = "id,city,fare\n" + "".join(f"{i},city{i % 7},{i * 0.5}\n" for i in range(ROWS))
POD = """version: v1
kind: Spicepod
name: cache
runtime:
  caching:
    sql_results:
      item_ttl: 400ms
      max_size: 256KiB
datasets:
  - from: file:trips.csv
    name: trips
    acceleration:
      enabled: true
"""
COUNT = "SELECT city, count(*) AS n FROM trips GROUP BY city ORDER BY city"


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    with run_spiced(write_pod(tmp_path_factory.mktemp("cache"), POD, csv=CSV), metrics=True) as runtime:
        yield runtime


def post(rt: Runtime, sql: str, **headers: str) -> httpx.Response:
    return httpx.post(rt.http_url + "/v1/sql", content=sql, timeout=30,
                      headers={k.replace("_", "-"): v for k, v in headers.items()})


def status(r: httpx.Response) -> str | None:
    return r.headers.get("results-cache-status")


def metric(rt: Runtime, name: str, **labels: str) -> float:
    text = httpx.get(rt.metrics_url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not exposed")


class FlightHeaders(fl.ClientMiddlewareFactory):
    def __init__(self) -> None:
        self.seen: list[dict[str, list[str]]] = []

    def start_call(self, info: fl.CallInfo) -> fl.ClientMiddleware:
        factory = self

        class Record(fl.ClientMiddleware):
            def received_headers(self, headers: dict[str, list[str]]) -> None:
                if "results-cache-status" in headers:
                    factory.seen.append(headers)
        return Record()


def test_a_repeat_is_a_hit_with_upstream_headers_until_the_ttl(rt: Runtime) -> None:
    sql = COUNT.replace("FROM trips", "FROM trips WHERE id >= 1")
    first, second = post(rt, sql), post(rt, sql)
    assert (status(first), status(second)) == ("MISS", "HIT")
    assert first.text == second.text
    assert second.headers["x-cache"] == "Hit from spiceai" and first.headers["x-cache"] == "Miss from spiceai"
    assert second.headers["results-cache-scope"] == "shared"
    time.sleep(0.5)
    assert status(post(rt, sql)) == "MISS"


def test_each_query_is_one_lookup_and_parameters_tell_repeats_apart(rt: Runtime) -> None:
    """A repeat is answered from the plan the query had (spiced.results_cache.KnownPlans), not planned
    again: still one lookup per query in the metrics, and still told apart by its parameter values."""
    def query(low: int) -> httpx.Response:
        return httpx.post(rt.http_url + "/v1/sql", timeout=30, json={
            "sql": "SELECT count(*) AS n FROM trips WHERE id >= $1 AND fare >= 0", "parameters": [low]})

    before = metric(rt, "results_cache_requests_total"), metric(rt, "results_cache_hits_total")
    answers = [query(low) for low in (10, 20, 10, 20)]
    assert [status(r) for r in answers] == ["MISS", "MISS", "HIT", "HIT"]
    assert [r.json() for r in answers] == [[{"n": ROWS - 10}], [{"n": ROWS - 20}]] * 2
    assert status(post(rt, "SELECT count(*) AS n FROM trips WHERE id >= 10 AND fare >= 0",
                       Cache_Control="no-cache")) == "BYPASS"
    after = metric(rt, "results_cache_requests_total"), metric(rt, "results_cache_hits_total")
    assert (after[0] - before[0], after[1] - before[1]) == (5, 2)


def test_queries_over_no_dataset_or_the_catalog_are_not_cached(rt: Runtime) -> None:
    for sql in ("SELECT 1", "SELECT * FROM information_schema.tables", "EXPLAIN SELECT * FROM trips"):
        r = post(rt, sql)
        assert r.status_code == 200 and status(r) is None and "x-cache" not in r.headers


def test_cache_control_directives(rt: Runtime) -> None:
    sql = COUNT.replace("FROM trips", "FROM trips WHERE id >= 2")
    assert status(post(rt, sql, Cache_Control="no-cache")) == "BYPASS"
    assert status(post(rt, sql)) == "HIT"  # no-cache skips the lookup but still stores
    assert status(post(rt, sql, Cache_Control="min-fresh=5")) == "MISS"  # fewer than 5 s of freshness left
    time.sleep(0.5)
    assert status(post(rt, sql, Cache_Control="max-stale=5")) == "STALE"
    miss = post(rt, COUNT.replace("FROM trips", "FROM trips WHERE id >= 3"), Cache_Control="only-if-cached")
    assert miss.status_code == 504 and "not in the results cache" in miss.text
    assert post(rt, sql, Cache_Control="min-fresh=soon").status_code == 400


def test_a_client_cache_key_names_the_entry(rt: Runtime) -> None:
    first = post(rt, "SELECT count(*) AS n FROM trips", Spice_Cache_Key="trip-count")
    again = post(rt, "SELECT count(*) AS n FROM trips WHERE id >= 0", Spice_Cache_Key="trip-count")
    assert (status(first), status(again), again.text) == ("MISS", "HIT", first.text)
    assert "Spice-Cache-Key" in again.headers["vary"]
    assert post(rt, "SELECT 1 FROM trips", Spice_Cache_Key="not valid!").status_code == 400


def test_a_refresh_drops_what_read_the_dataset(rt: Runtime) -> None:
    sql = COUNT.replace("FROM trips", "FROM trips WHERE id >= 4")
    assert [status(post(rt, sql)) for _ in range(2)] == ["MISS", "HIT"]
    mark = len(rt.logs())
    assert httpx.post(rt.http_url + "/v1/datasets/trips/acceleration/refresh").status_code == 201
    rt.wait_for_log("Loaded .* for dataset trips", after=mark)
    wait_for(lambda: status(post(rt, sql)) == "MISS", timeout=2)
    assert metric(rt, "results_cache_evictions_total", reason="invalidated") >= 1


def test_flight_answers_the_status_as_response_metadata(rt: Runtime) -> None:
    headers = FlightHeaders()
    with fl.FlightClient(rt.flight_uri, middleware=[headers]) as client:
        ticket = fl.Ticket(COUNT.replace("FROM trips", "FROM trips WHERE id >= 5").encode())
        first, second = client.do_get(ticket).read_all(), client.do_get(ticket).read_all()
        assert first.equals(second)
        with pytest.raises(fl.FlightUnavailableError, match="not in the results cache"):
            opts = fl.FlightCallOptions(headers=[(b"cache-control", b"only-if-cached")])
            client.do_get(fl.Ticket(b"SELECT max(id) FROM trips WHERE id >= 6"), opts).read_all()
    assert [h["results-cache-status"] for h in headers.seen] == [["MISS"], ["HIT"]]


def test_size_stays_within_max_size_under_distinct_large_results(rt: Runtime) -> None:
    for k in range(40):  # each ~30 KB of Arrow: far more than 256 KiB in all
        assert post(rt, f"SELECT * FROM trips WHERE id % 4 = {k % 4} AND id > {k}").status_code == 200
    assert metric(rt, "results_cache_size_bytes") <= 256 * 1024
    assert metric(rt, "results_cache_max_size_bytes") == 256 * 1024
    assert metric(rt, "results_cache_evictions_total", reason="size") > 0
    assert metric(rt, "results_cache_hits_total") >= 1 and metric(rt, "results_cache_requests_total") >= 1


def test_results_never_cross_api_keys(tmp_path: Path) -> None:
    pod = POD.replace("runtime:\n", "runtime:\n  auth:\n    api-key:\n      enabled: true\n      keys:\n"
                                    "        - alpha-key\n        - beta-key\n")
    with run_spiced(write_pod(tmp_path, pod, csv=CSV)) as rt:
        alpha = [post(rt, COUNT, X_API_Key="alpha-key") for _ in range(2)]
        beta = post(rt, COUNT, Authorization="Bearer beta-key")
        assert [status(r) for r in alpha] == ["MISS", "HIT"] and status(beta) == "MISS"
        assert alpha[1].headers["results-cache-scope"] == "user"
        assert "X-API-Key" in alpha[1].headers["vary"] and "Authorization" in alpha[1].headers["vary"]


def test_disabled_legacy_and_unsupported_keys(tmp_path: Path) -> None:
    off = POD.replace("      item_ttl: 400ms\n", "      enabled: false\n").replace(
        "  caching:\n", "  caching:\n    search_results:\n      enabled: true\n")
    with run_spiced(write_pod(tmp_path / "off", off, csv=CSV)) as rt:
        assert status(post(rt, COUNT)) is None
        assert not any("Initialized sql results cache" in line for line in rt.logs())
        assert any(" WARN " in line and "runtime.caching.search_results: not supported" in line for line in rt.logs())
    legacy = POD.replace("  caching:\n    sql_results:\n      item_ttl: 400ms\n      max_size: 256KiB\n",
                         "  results_cache:\n    enabled: true\n    cache_max_size: 1MiB\n    item_ttl: 5s\n"
                         "    hashing_algorithm: xxh3\n    max_stale_while_revalidate: 5s\n")
    with run_spiced(write_pod(tmp_path / "legacy", legacy, csv=CSV)) as rt:
        assert [status(post(rt, COUNT)) for _ in range(2)] == ["MISS", "HIT"]
        assert any("Initialized sql results cache; max size: 1.00 MiB, item ttl: 5s" in line for line in rt.logs())
        [warning] = [line for line in rt.logs() if "hashing_algorithm" in line]
        assert " WARN " in warning and "runtime.results_cache.hashing_algorithm: xxh3 is not used" in warning
        assert any("runtime.results_cache.max_stale_while_revalidate: not supported" in line for line in rt.logs())
    bad = POD.replace("max_size: 256KiB", "max_size: lots")
    r = spiced_fails(write_pod(tmp_path / "bad", bad, csv=CSV))
    assert r.returncode == 1 and "runtime.caching.sql_results.max_size: invalid size 'lots'" in r.stderr


def test_table_functions_are_not_cached(rt: Runtime) -> None:
    # generate_series shows in a plan as a bare table without its arguments: keyed by plan, two
    # different series would share an entry
    small, large = (post(rt, f"SELECT count(*) AS n FROM generate_series(1, {n})") for n in (10, 20))
    assert (small.json(), large.json()) == ([{"n": 10}], [{"n": 20}])
    assert status(small) is None and status(large) is None

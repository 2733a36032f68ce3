"""spiced/metrics.py's hot counters: the same Prometheus series as the SDK's synchronous counters,
and no add lost between threads."""

from __future__ import annotations

import threading

from prometheus_client.parser import text_string_to_metric_families

from spiced.metrics import Metrics


def families(metrics: Metrics) -> dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]]:
    text = metrics.exposition().body.decode()
    return {f.name: (f.type, [(s.name, s.labels, s.value) for s in f.samples])
            for f in text_string_to_metric_families(text)}


def test_a_hot_counter_is_exposed_as_the_sdk_exposes_a_counter() -> None:
    metrics = Metrics()
    hot = metrics.hot_counter("hot_things", "Things.")
    sync = metrics.meter.create_counter("sync_things", description="Things.")
    updown = metrics.hot_counter("hot_level", "Level.", up_down=True)
    sync_updown = metrics.meter.create_up_down_counter("sync_level", description="Level.")
    for counter in (hot, sync):
        counter.add(1, {"method": "GET", "status": "200"})
        counter.add(2, {"status": "200", "method": "GET"})  # the same series, whatever the order
        counter.add(1)
    for level in (updown, sync_updown):
        level.add(3, {"protocol": "http"})
        level.add(-3, {"protocol": "http"})
    found = families(metrics)

    def renamed(name: str, prefix: str) -> tuple[str, list[tuple[str, dict[str, str], float]]]:
        kind, samples = found[prefix + name]
        return kind, [(s.replace(prefix, "", 1), labels, value) for s, labels, value in samples]

    assert renamed("things", "hot_") == renamed("things", "sync_")
    assert renamed("level", "hot_") == renamed("level", "sync_")
    assert found["hot_things"][0] == "counter" and found["hot_level"][0] == "gauge"
    assert sorted(v for _, _, v in found["hot_things"][1]) == [1.0, 3.0]


def test_no_add_is_lost_between_threads() -> None:
    metrics = Metrics()
    counter = metrics.hot_counter("busy", "Busy.")

    def work() -> None:
        for _ in range(20_000):
            counter.add(1, {"protocol": "flight"})

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert families(metrics)["busy"][1] == [("busy_total", {"protocol": "flight"}, 160_000.0)]

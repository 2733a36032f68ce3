"""`spice run` passes `--pods-watcher-enabled`: edits to spicepod.yaml under a running runtime are
applied (datasets added, changed, removed; views), the other datasets serve throughout, and a
spicepod that no longer parses keeps the running state."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support import Runtime
from tests.test_cli_run import start_spice_run

HEAD = """version: v2
kind: Spicepod
name: watched
runtime:
  caching:
    sql_results:
      enabled: false
datasets:
  - from: file:numbers.parquet
    name: keep
    acceleration:
      enabled: true
"""


def dataset(name: str, extra: str = "") -> str:
    return f"  - from: file:numbers.parquet\n    name: {name}\n    acceleration:\n      enabled: true\n{extra}"


def write(pod: Path, text: str) -> None:
    """As editors do: a new file renamed over the old one."""
    tmp = pod.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, pod)


def sql(rt: Runtime, query: str) -> httpx.Response:
    return httpx.post(rt.http_url + "/v1/sql", content=query, timeout=10)


def rows(rt: Runtime, query: str) -> list[dict[str, object]]:
    answer = sql(rt, query)
    assert answer.status_code == 200, answer.text
    result: list[dict[str, object]] = answer.json()
    return result


def eventually(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except (AssertionError, httpx.HTTPError) as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout} s: {last}")


@pytest.fixture()
def watched(tmp_path: Path) -> Iterator[tuple[Runtime, Path]]:
    pq.write_table(pa.table({"id": list(range(100)), "name": [f"n{i}" for i in range(100)]}),
                   tmp_path / "numbers.parquet")
    pod = tmp_path / "spicepod.yaml"
    pod.write_text(HEAD + dataset("old"))
    rt = start_spice_run(tmp_path, "--http", "127.0.0.1:0", "--flight", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
    try:
        rt.wait_for_log(r"Loaded 100 rows .* for dataset old", timeout=30)
        rt.wait_for_log(r"Loaded 100 rows .* for dataset keep", timeout=30)
        yield rt, pod
    finally:
        if rt.proc.poll() is None:
            rt.stop()


def test_spicepod_edits_apply_while_other_datasets_keep_serving(watched: tuple[Runtime, Path]) -> None:
    rt, pod = watched
    failures: list[str] = []
    answered = 0
    stop = threading.Event()

    def keep_querying() -> None:
        nonlocal answered
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                answer = client.post(rt.http_url + "/v1/sql", content="SELECT count(*) AS n FROM keep")
                if answer.status_code != 200 or answer.json() != [{"n": 100}]:
                    failures.append(f"{answer.status_code} {answer.text}")
                answered += 1
                time.sleep(0.01)

    reader = threading.Thread(target=keep_querying, daemon=True)
    reader.start()
    try:
        # Added: a dataset (in another engine) and a view over it.
        write(pod, HEAD + dataset("old") + dataset("added", "      engine: duckdb\n      mode: file\n")
              + "views:\n  - name: small\n    sql: SELECT id FROM added WHERE id < 3\n")
        eventually(lambda: rows(rt, "SELECT count(*) AS n FROM added") == [{"n": 100}])
        eventually(lambda: rows(rt, "SELECT id FROM small ORDER BY id") == [{"id": 0}, {"id": 1}, {"id": 2}])

        # Changed: entries edited, so they are loaded again with the new settings (in file mode
        # too, where the file still holds the rows of the old settings).
        added = "      engine: duckdb\n      mode: file\n      refresh_sql: SELECT * FROM added WHERE id < 50\n"
        write(pod, HEAD + dataset("old", "      refresh_sql: SELECT * FROM old WHERE id >= 90\n")
              + dataset("added", added) + "views:\n  - name: small\n    sql: SELECT id FROM added WHERE id < 3\n")
        eventually(lambda: rows(rt, "SELECT count(*) AS n FROM old") == [{"n": 10}])
        eventually(lambda: rows(rt, "SELECT count(*) AS n FROM added") == [{"n": 50}])

        # A spicepod that no longer parses: said once, and everything keeps serving as it was.
        mark = len(rt.logs())
        write(pod, pod.read_text() + "datasets: [\n")
        rt.wait_for_log(r"WARN .*Invalid app state detected, unable to load pods information: .*spicepod.yaml",
                        after=mark)
        time.sleep(2.5)  # the next poll must not apply or report it again
        assert rows(rt, "SELECT count(*) AS n FROM old") == [{"n": 10}]
        assert rows(rt, "SELECT count(*) AS n FROM added") == [{"n": 50}]
        assert sum("Invalid app state detected" in line for line in rt.logs()[mark:]) == 1

        # Removed: the dataset and the view over it are gone; queries on them are refused with a 4xx.
        write(pod, HEAD + dataset("old", "      refresh_sql: SELECT * FROM old WHERE id >= 90\n"))
        rt.wait_for_log(r"Dataset added unregistered\.")
        eventually(lambda: sql(rt, "SELECT count(*) FROM added").status_code == 400)
        assert "not found" in sql(rt, "SELECT count(*) FROM added").text
        assert sql(rt, "SELECT * FROM small").status_code == 400
        listed = httpx.get(rt.http_url + "/v1/datasets", timeout=10).json()
        assert sorted(d["name"] for d in listed) == ["keep", "old"]

        # A runtime setting is read at startup: the edit is reported, not applied.
        mark = len(rt.logs())
        write(pod, pod.read_text().replace("enabled: false", "enabled: true", 1))
        rt.wait_for_log(r"WARN .*`runtime.caching` changed, but it is applied when spiced starts", after=mark)
    finally:
        stop.set()
        reader.join(timeout=15)
    assert answered > 50
    assert failures == []

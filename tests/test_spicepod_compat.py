"""Spicepod compatibility with upstream's current schema (spiced/spicepod.py): the versions upstream
2.x accepts (`v1`, `v2`, full tags) load and `v1beta1` is refused; v1 keys upstream carries over
(`invalid_type_action`, `runtime.memory_limit`) land in their v2 place; an upstream key this runtime
does not act on is one WARN naming its path, and the runtime still serves; a key upstream does not
define is still an error in the strict sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from spice_cli.init import init
from spiced.config import load_config
from spiced.errors import ConfigError
from spiced.spicepod import SpicepodSpec, read_spicepod, unmodelled_keys, validate_spicepod
from tests.support import TRIPS_CSV, run_spiced, spiced_fails, sql_json, write_pod

DATASET = "datasets:\n  - from: file:trips.csv\n    name: trips\n"


def head(version: str = "v1") -> str:
    return f"version: {version}\nkind: Spicepod\nname: compat\n"


def ignored(path: str) -> str:
    return f"Spicepod key {path} is not supported by this runtime and is ignored."


def load(tmp_path: Path, text: str) -> tuple[str, ...]:
    """Load `text` as the runtime does; the WARN texts for its unmodelled keys."""
    write_pod(tmp_path, text)
    return load_config([], workdir=tmp_path, environ={}).spicepod.warnings


def spec_of(tmp_path: Path, text: str) -> SpicepodSpec:
    file = write_pod(tmp_path, text) / "spicepod.yaml"
    return validate_spicepod(file, read_spicepod(file))


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    return str(e.value)


# ------------------------------------------------------------------------------ versions

@pytest.mark.parametrize("version", ["v1", "v2", "v2.0", "v2.0.0", "v2.0.0-rc.1", "v1.11.0"])
def test_upstream_versions_load(tmp_path: Path, version: str) -> None:
    assert load(tmp_path, head(version) + DATASET) == ()


@pytest.mark.parametrize("version", ["v1beta1", "v3", "v0", "v02", "2", "latest"])
def test_other_versions_name_the_key_and_the_accepted_values(tmp_path: Path, version: str) -> None:
    message = config_error(tmp_path, head(f"'{version}'"))
    assert message == (f"Failed to start Spice runtime: Unable to load spicepod {tmp_path / 'spicepod.yaml'}: "
                       f"version: unsupported spicepod version '{version}': expected v1 or v2, or a full tag "
                       "such as v2.0.0" + (" (v1beta1 is no longer accepted: change it to v1)"
                                           if version == "v1beta1" else ""))


def test_v1beta1_exits_1_with_one_line(tmp_path: Path) -> None:
    write_pod(tmp_path, head("v1beta1") + DATASET)
    r = spiced_fails(tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"Spice Runtime error: Failed to start Spice runtime: Unable to load spicepod {tmp_path / 'spicepod.yaml'}: "
        "version: unsupported spicepod version 'v1beta1': expected v1 or v2, or a full tag such as v2.0.0 "
        "(v1beta1 is no longer accepted: change it to v1)"]


def test_v2_pod_serves(tmp_path: Path) -> None:
    write_pod(tmp_path, head("v2") + DATASET + "    acceleration:\n      enabled: true\n")
    with run_spiced(tmp_path) as rt:
        assert sql_json(rt, "SELECT count(*) AS n FROM trips") == [{"n": 3}]
    assert not [line for line in rt.logs() if "Spicepod key" in line]


def test_spice_init_writes_a_v2_pod_the_runtime_loads(tmp_path: Path) -> None:
    path = init("fresh", tmp_path)
    assert path.read_text().startswith("version: v2\n")
    assert load_config([str(path.parent)], workdir=tmp_path, environ={}).spicepod.version == "v2"


# ------------------------------------------------------------------------------ v1 carry-overs

def test_invalid_type_action_is_carried_over_to_unsupported_type_action(tmp_path: Path) -> None:
    text = head("v1") + DATASET + "    invalid_type_action: warn\n"
    file = write_pod(tmp_path, text) / "spicepod.yaml"
    raw = read_spicepod(file)
    assert validate_spicepod(file, raw).datasets[0].unsupported_type_action == "warn"
    assert raw["datasets"][0]["invalid_type_action"] == "warn"  # the pod as written stays (/v1/spicepods)
    assert load(tmp_path, text) == (ignored("datasets[0].invalid_type_action"),)  # named as the file spells it


def test_unsupported_type_action_wins_over_the_deprecated_key(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, head("v1") + DATASET + "    invalid_type_action: warn\n"
                                                    "    unsupported_type_action: string\n")
    assert spec.datasets[0].unsupported_type_action == "string"
    assert unmodelled_keys(spec) == ["datasets[0].unsupported_type_action"]


def test_a_bad_deprecated_value_names_the_key_as_written(tmp_path: Path) -> None:
    message = config_error(tmp_path, head("v1") + DATASET + "    invalid_type_action: sometimes\n")
    assert "datasets[0].invalid_type_action: input should be" in message


def test_runtime_memory_limit_and_temp_directory_move_under_query(tmp_path: Path) -> None:
    text = head("v1") + "runtime:\n  memory_limit: 1GiB\n  temp_directory: /tmp/spill\n  query:\n    timeout: 5s\n"
    spec = spec_of(tmp_path, text)
    query = spec.runtime.query
    assert query is not None and (query.memory_limit, query.temp_directory, query.timeout) == \
        ("1GiB", "/tmp/spill", "5s")
    assert unmodelled_keys(spec) == ["runtime.memory_limit", "runtime.temp_directory"]
    both = spec_of(tmp_path, head("v1") + "runtime:\n  memory_limit: 1GiB\n  query:\n    memory_limit: 2GiB\n")
    assert both.runtime.query is not None and both.runtime.query.memory_limit == "2GiB"


def test_legacy_results_cache_still_configures_the_cache(tmp_path: Path) -> None:
    write_pod(tmp_path, head("v1") + "runtime:\n  results_cache:\n    cache_max_size: 1MiB\n    item_ttl: 5s\n")
    c = load_config([], workdir=tmp_path, environ={})
    assert (c.results_cache.max_size, c.results_cache.item_ttl) == (1024 * 1024, 5.0)
    assert c.spicepod.warnings == ()


# ------------------------------------------------------------------------------ unmodelled keys

UNMODELLED = {
    "datasets[0].dependsOn": DATASET + "    dependsOn: [other]\n",
    "datasets[0].acceleration.storage_profile": DATASET + "    acceleration:\n      storage_profile: ram\n",
    "runtime.cors": "runtime:\n  cors:\n    enabled: true\n",
    "runtime.query.max_concurrent_queries": "runtime:\n  query:\n    max_concurrent_queries: 8\n",
    "models": "models:\n  - from: openai:gpt-4o\n    name: assistant\n",
    "views[0].metadata": "views:\n  - name: v\n    sql: SELECT 1\n    metadata: {owner: me}\n",
}


@pytest.mark.parametrize("path", list(UNMODELLED))
def test_each_unmodelled_key_is_named(tmp_path: Path, path: str) -> None:
    assert load(tmp_path, head() + UNMODELLED[path]) == (ignored(path),)


@pytest.mark.parametrize("extra", ["models: []\n", "catalogs: {}\n", "metadata:\n", DATASET + "    metadata: {}\n"],
                         ids=["empty-list", "empty-map", "null", "empty-dataset-metadata"])
def test_empty_upstream_sections_say_nothing(tmp_path: Path, extra: str) -> None:
    assert load(tmp_path, head() + extra) == ()


def test_unmodelled_keys_are_one_warn_each_and_the_runtime_serves(tmp_path: Path) -> None:
    write_pod(tmp_path, head("v2") + """\
runtime:
  tracing:
    zipkin_enabled: false
  task_history:
    enabled: false
models:
  - from: openai:gpt-4o
    name: assistant
datasets:
  - from: file:trips.csv
    name: trips
    time_partition_column: day
    acceleration:
      enabled: true
      refresh_cron: '0 * * * *'
""", csv=TRIPS_CSV)
    paths = ["runtime.task_history", "runtime.tracing", "datasets[0].time_partition_column",
             "datasets[0].acceleration.refresh_cron", "models"]
    with run_spiced(tmp_path) as rt:
        assert sql_json(rt, "SELECT count(*) AS n FROM trips") == [{"n": 3}]
    warns = [line for line in rt.logs() if " WARN " in line]
    for path in paths:
        assert sum(ignored(path) in line for line in warns) == 1, (path, warns)
    assert len([line for line in warns if "Spicepod key" in line]) == len(paths), warns


# ------------------------------------------------------------------------------ typos

@pytest.mark.parametrize("extra, key", [
    ("runtime:\n  tracin:\n    zipkin_enabled: true\n", "runtime.tracin"),
    ("runtime:\n  task_history:\n    enabld: false\n", "runtime.task_history.enabld"),
    ("runtime:\n  cors:\n    allowed_origin: ['*']\n", "runtime.cors.allowed_origin"),
    (DATASET + "    depends_on: [x]\n", "datasets[0].depends_on"),
    ("views:\n  - name: v\n    sql: SELECT 1\n    dependson: [x]\n", "views[0].dependson"),
])
def test_a_key_upstream_does_not_define_is_an_error(tmp_path: Path, extra: str, key: str) -> None:
    assert f": {key}: unknown field" in config_error(tmp_path, head() + extra)


def test_a_runtime_typo_exits_1_naming_the_key(tmp_path: Path) -> None:
    write_pod(tmp_path, head("v2") + "runtime:\n  shutdown_timout: 5s\n")
    r = spiced_fails(tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"Spice Runtime error: Failed to start Spice runtime: Unable to load spicepod {tmp_path / 'spicepod.yaml'}: "
        "runtime.shutdown_timout: unknown field"]


def test_unknown_top_level_keys_stay_ignored(tmp_path: Path) -> None:
    assert load(tmp_path, head() + "something_new: {a: 1}\n") == ()

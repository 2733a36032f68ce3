"""Files in S3 and over HTTPS as datasets through the real runtime, against a local S3 server (moto)
and a local HTTPS file server: in place with the Parquet reader's pruning visible in the requests the
server saw, accelerated, hive partitions, credentials, and failures that name their cause."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.objectstores import S3Server, http_file_server, s3_server, trust_env
from tests.pki import Pki
from tests.support import Runtime, dataset_yaml, run_spiced, spiced_fails, spicepod_yaml, sql_json, write_pod

ROWS, GROUP = 200_000, 20_000  # 10 row groups, ~3 MB uncompressed: larger than DataFusion's footer prefetch
NO_AWS = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": ""}


def write_ids(path: Path, first: int = 0, rows: int = ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = pa.array(range(first, first + rows), pa.int64())
    pq.write_table(pa.table({"id": ids, "value": pc.multiply(ids, 2)}), path, row_group_size=GROUP,
                   compression="none")
    return path



def s3_params(s3: S3Server, **extra: str) -> str:
    params = {"s3_endpoint": s3.endpoint, "s3_region": s3.region, "s3_auth": "key", "s3_key": s3.key,
              "s3_secret": "${env:MOTO_SECRET}", "allow_http": "true", **extra}
    return "".join(f"      {k}: {v}\n" for k, v in params.items() if v)




@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    work = tmp_path_factory.mktemp("s3data")
    with s3_server(tmp_path_factory.mktemp("s3"), auth=True) as server:
        server.create_bucket("data")
        server.put("data", "ids/ids.parquet", write_ids(work / "ids.parquet"))
        for year, first in ((2023, 0), (2024, 1000)):
            server.put("data", f"sales/year={year}/part.parquet", write_ids(work / f"{year}.parquet", first, 1000))
        server.create_bucket("open", public=True)
        server.put("open", "trips.csv", b"id,city\n1,Seattle\n2,Portland\n")
        yield server


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory, s3: S3Server) -> Iterator[Runtime]:
    spicepod = spicepod_yaml(dataset_yaml("s3://data/ids/ids.parquet", "ids", s3_params(s3)),
                   dataset_yaml("s3://data/ids/ids.parquet", "ids_accel", s3_params(s3), accelerated=True),
                   dataset_yaml("s3://data/sales/", "sales", s3_params(s3, file_format="parquet",
                                                               hive_partitioning_enabled="true")),
                   dataset_yaml("s3://open/trips.csv", "trips", s3_params(s3, s3_auth="public", s3_key="",
                                                                     s3_secret="")))
    workdir = write_pod(tmp_path_factory.mktemp("pod"), spicepod)
    with run_spiced(workdir, env={"MOTO_SECRET": s3.secret, **NO_AWS}, timeout=60) as runtime:
        yield runtime


def test_a_filter_reads_only_the_row_groups_it_needs(rt: Runtime, s3: S3Server) -> None:
    s3.clear_requests()
    assert sql_json(rt, "SELECT count(*) AS n, sum(value) AS v FROM ids WHERE id BETWEEN 100 AND 199") == \
        [{"n": 100, "v": sum(i * 2 for i in range(100, 200))}]
    ranges = [r.byte_range for r in s3.requests() if r.method == "GET" and r.path.endswith("ids.parquet")]
    fetched = sum(last - first + 1 for first, last in (r for r in ranges if r is not None))
    size = ROWS * 16
    assert ranges and fetched < size / 4, (fetched, size)  # one row group of ten, and the footer


def test_in_place_and_accelerated_agree(rt: Runtime) -> None:
    query = "SELECT id, value FROM {t} WHERE id % 40000 = 7 ORDER BY id"
    assert sql_json(rt, query.format(t="ids")) == sql_json(rt, query.format(t="ids_accel"))
    assert sql_json(rt, "SELECT count(*) AS n FROM ids_accel") == [{"n": ROWS}]


def test_hive_partitions_become_columns(rt: Runtime) -> None:
    assert sql_json(rt, "SELECT year, count(*) AS n FROM sales GROUP BY year ORDER BY year") == \
        [{"year": "2023", "n": 1000}, {"year": "2024", "n": 1000}]
    assert sql_json(rt, "SELECT min(id) AS first FROM sales WHERE year = '2024'") == [{"first": 1000}]


def test_a_public_bucket_is_read_without_credentials(rt: Runtime, s3: S3Server) -> None:
    s3.clear_requests()
    assert sql_json(rt, "SELECT city FROM trips ORDER BY id") == [{"city": "Seattle"}, {"city": "Portland"}]
    assert all(r.access_key is None for r in s3.requests())


def test_a_wrong_secret_fails_the_dataset_and_names_the_source(tmp_path: Path, s3: S3Server) -> None:
    workdir = write_pod(tmp_path, spicepod_yaml(dataset_yaml("s3://data/ids/ids.parquet", "ids", s3_params(s3))))
    with run_spiced(workdir, env={"MOTO_SECRET": "not-the-secret", **NO_AWS}, ready=False) as rt:
        line = rt.wait_for_log("Failed to load data for dataset ids")
        assert " WARN " in line and "ids/ids.parquet" in line and ("403" in line or "400" in line)
        assert "not-the-secret" not in "\n".join(rt.logs())


def test_s3_parameters_are_checked_as_upstream(tmp_path: Path) -> None:
    base = "version: v1\nkind: Spicepod\nname: p\ndatasets:\n  - from: s3://b/k.parquet\n    name: t\n    params:\n"
    r = spiced_fails(write_pod(tmp_path, base + "      s3_auth: key\n      s3_secret: x\n"))
    assert r.returncode == 1
    assert "S3 auth method 'key' requires an AWS access key. Specify an access key with the `s3_key` parameter." \
        in r.stderr
    r = spiced_fails(write_pod(tmp_path, base + "      s3_endpoint: http://127.0.0.1:9\n"))
    assert "The 'http://127.0.0.1:9' is a HTTP URL, but `allow_http` is not enabled." in r.stderr
    r = spiced_fails(write_pod(tmp_path, base + "      s3_auth: magic\n"))
    assert "Unsupported S3 auth method 'magic'. Use 'public', 'iam_role', or 'key' for `s3_auth` parameter." \
        in r.stderr


def test_https_files_in_place_and_accelerated_with_a_private_ca(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    root = tmp_path / "www"
    write_ids(root / "ids.parquet")
    (root / "trips.csv").write_text("id,city\n1,Seattle\n2,Portland\n")
    with http_file_server(root, tls=pki.server) as www:
        spicepod = spicepod_yaml(f"  - from: {www.url_for('ids.parquet')}\n    name: ids\n",
                       f"  - from: {www.url_for('trips.csv')}\n    name: trips\n"
                       "    acceleration:\n      enabled: true\n")
        with run_spiced(write_pod(tmp_path / "pod", spicepod), env=trust_env(pki.ca.cert)) as rt:
            www.clear_requests()
            assert sql_json(rt, "SELECT count(*) AS n FROM ids WHERE id < 10") == [{"n": 10}]
            gets = [r for r in www.requests() if r.method == "GET"]
            assert gets and all(r.range is not None for r in gets)
            assert sql_json(rt, "SELECT city FROM trips ORDER BY id") == [{"city": "Seattle"}, {"city": "Portland"}]
        # without the private CA the runtime refuses the server's certificate
        with run_spiced(write_pod(tmp_path / "pod2", spicepod), ready=False) as rt:
            line = rt.wait_for_log("Failed to load data for dataset")
            assert " WARN " in line and "https://" in line


def test_plain_http_and_basic_auth_files_in_place_and_accelerated(tmp_path: Path) -> None:
    root = tmp_path / "www"
    write_ids(root / "ids.parquet")
    (root / "trips.csv").write_text("id,city\n1,Seattle\n2,Portland\n")
    with http_file_server(root, basic_auth=("reader", "s3cr3t-pw-value")) as www:
        auth = "    params:\n      http_username: reader\n      http_password: ${env:HTTP_PASS}\n"
        spicepod = spicepod_yaml(f"  - from: {www.url_for('ids.parquet')}\n    name: ids\n{auth}",
                                 f"  - from: {www.url_for('trips.csv')}\n    name: trips\n{auth}"
                                 "    acceleration:\n      enabled: true\n")
        with run_spiced(write_pod(tmp_path / "pod", spicepod), env={"HTTP_PASS": "s3cr3t-pw-value"}) as rt:
            www.clear_requests()
            assert sql_json(rt, "SELECT count(*) AS n, sum(value) AS v FROM ids WHERE id BETWEEN 100 AND 199") == \
                [{"n": 100, "v": sum(i * 2 for i in range(100, 200))}]
            gets = [r for r in www.requests() if r.method == "GET"]
            assert gets and all(r.authorization and r.byte_range is not None for r in gets)
            fetched = sum(last - first + 1 for first, last in (r.byte_range for r in gets if r.byte_range))
            assert fetched < ROWS * 16 / 4, fetched  # the row group the filter keeps, and the footer
            assert sql_json(rt, "SELECT city FROM trips ORDER BY id") == [{"city": "Seattle"}, {"city": "Portland"}]
            assert "s3cr3t-pw-value" not in "\n".join(rt.logs())
        # a wrong password: the dataset fails with the server's answer, the runtime stays up
        with run_spiced(write_pod(tmp_path / "pod2", spicepod), env={"HTTP_PASS": "wrong"}, ready=False) as rt:
            line = rt.wait_for_log("Failed to load data for dataset")
            assert " WARN " in line and "401" in line


def test_a_password_in_the_url_is_refused(tmp_path: Path) -> None:
    base = "version: v1\nkind: Spicepod\nname: p\ndatasets:\n  - from: {url}\n    name: t\n"
    r = spiced_fails(write_pod(tmp_path, base.format(url="http://u:s3cr3t-pw-value@127.0.0.1:9/x.parquet")))
    assert r.returncode == 1 and "use the `http_password` parameter" in r.stderr.splitlines()[-1]
    assert "s3cr3t-pw-value" not in r.stderr


def test_a_file_added_to_a_folder_is_read_by_queries_and_full_refreshes(tmp_path: Path) -> None:
    """DataFusion caches folder listings without expiry unless told not to: a new file must count."""
    write_ids(tmp_path / "parts" / "a.parquet", 0, 10)
    params = "      file_format: parquet\n"
    (tmp_path / "spicepod.yaml").write_text(
        spicepod_yaml(dataset_yaml("file:parts/", "in_place", params),
                      dataset_yaml("file:parts/", "loaded", params, accelerated=True))
        + "runtime:\n  caching:\n    sql_results:\n      enabled: false\n")
    with run_spiced(tmp_path) as rt:
        assert sql_json(rt, "SELECT count(*) AS n FROM in_place", cached=False) == [{"n": 10}]
        write_ids(tmp_path / "parts" / "b.parquet", 10, 5)
        assert sql_json(rt, "SELECT count(*) AS n FROM in_place", cached=False) == [{"n": 15}]
        mark = len(rt.logs())
        answer = httpx.post(rt.http_url + "/v1/datasets/loaded/acceleration/refresh", timeout=10)
        assert answer.status_code == 201, answer.text
        rt.wait_for_log(r"Loaded 15 rows .* for dataset loaded", after=mark)
        assert sql_json(rt, "SELECT count(*) AS n FROM loaded", cached=False) == [{"n": 15}]

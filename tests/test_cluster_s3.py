"""A dataset in S3 (moto, SigV4 checked) queried through a real scheduler: the executors read its files
through the object store whose settings come with each query (the secret resolved by the scheduler),
including for a dataset added while the cluster runs; an accelerated copy stays on the scheduler."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from tests.cluster_rig import make_pki, run_cluster
from tests.objectstores import S3Server, s3_server
from tests.support import dataset_yaml, spicepod_yaml, write_pod
from tests.tlsprobe import wait_for

QUERY = "SELECT g, count(*) AS n, sum(v) AS total FROM {table} GROUP BY g ORDER BY g"
ON_BOTH = r"DEBUG runtime::cluster: Query ran \d+ stage\(s\) as \d+ task\(s\) on 2 executor\(s\)"


def s3_params(s3: S3Server) -> str:
    params = {"s3_endpoint": s3.endpoint, "s3_region": s3.region, "s3_auth": "key", "s3_key": s3.key,
              "s3_secret": "${env:MOTO_SECRET}", "allow_http": "true", "file_format": "parquet"}
    return "".join(f"      {k}: {v}\n" for k, v in params.items())


def test_executors_read_an_s3_dataset_with_the_schedulers_secret(tmp_path: Path) -> None:
    parts = []
    for i in range(4):
        table = pa.table({"g": [j % 3 for j in range(i * 1000, (i + 1) * 1000)],
                          "v": list(range(i * 1000, (i + 1) * 1000))})
        pq.write_table(table, tmp_path / f"part{i}.parquet")
        parts.append(table)
    whole = pa.concat_tables(parts)
    expected = [{"g": g, "n": sum(1 for x in whole["g"].to_pylist() if x == g),
                 "total": sum(v for x, v in zip(whole["g"].to_pylist(), whole["v"].to_pylist(), strict=True) if x == g)}
                for g in range(3)]
    with s3_server(tmp_path / "s3", auth=True) as s3:
        s3.create_bucket("data")
        for i in range(4):
            s3.put("data", f"parts/part{i}.parquet", tmp_path / f"part{i}.parquet")
        accelerated = dataset_yaml("s3://data/parts/", "parts_accel", s3_params(s3), accelerated=True)
        pod = write_pod(tmp_path / "pod", spicepod_yaml(accelerated))
        pki = make_pki(tmp_path / "pki", "scheduler1", "executor1", "executor2")
        with run_cluster(tmp_path, pod, pki, ("executor1", "executor2"), env={"MOTO_SECRET": s3.secret},
                         args=("--pods-watcher-enabled",)) as cluster:
            http = cluster.scheduler.http_url + "/v1/sql"
            wait_for(lambda: httpx.get(cluster.scheduler.http_url + "/v1/ready", timeout=10).status_code == 200,
                     timeout=30)
            answer = httpx.post(http, content=QUERY.format(table="parts_accel"), timeout=30,
                                headers={"cache-control": "no-cache"})
            assert answer.json() == expected
            assert not any(re.search(ON_BOTH, line) for line in cluster.scheduler.logs())  # it ran on the scheduler
            # Added while running: the executors joined before it existed, and read it all the same.
            (pod / "spicepod.yaml").write_text(spicepod_yaml(accelerated, dataset_yaml("s3://data/parts/", "parts",
                                                                                     s3_params(s3))))

            def on_both_executors() -> bool:
                answer = httpx.post(http, content=QUERY.format(table="parts"), timeout=30,
                                    headers={"cache-control": "no-cache"})
                if answer.status_code != 200:
                    assert "not found" in answer.text, answer.text  # not loaded yet
                    return False
                assert answer.json() == expected
                return any(re.search(ON_BOTH, line) for line in cluster.scheduler.logs())

            wait_for(on_both_executors, timeout=60, interval=0.5)

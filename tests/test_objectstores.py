"""tests/objectstores.py against DataFusion's own object stores (`datafusion.object_store.AmazonS3` and `Http`),
the ones the S3 and HTTP(S) connectors build on. Each test also pins a DataFusion behaviour the connectors rely on
or must work around (path-style S3, AWS_SKIP_SIGNATURE, SSL_CERT_FILE, no Basic auth over Http)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from datafusion import SessionContext
from datafusion.object_store import AmazonS3, Http

from tests.objectstores import S3Server, http_file_server, s3_server, trust_env
from tests.pki import Pki

ROWS, GROUP = 200_000, 20_000  # 10 row groups, ~4 MB: much larger than DataFusion's 512 KiB footer prefetch


def write_ids(path: Path, first: int = 0, rows: int = ROWS) -> Path:
    """An uncompressed Parquet file (so its size is predictable): id, and value = id * 2."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = pa.array(range(first, first + rows), pa.int64())
    pq.write_table(pa.table({"id": ids, "value": pc.multiply(ids, 2)}), path,
                   row_group_size=GROUP, compression="none")
    return path


def s3_context(s3: S3Server, bucket: str, *, key: str | None = None, secret: str | None = None) -> SessionContext:
    """A SessionContext reading s3://bucket from the test server (no key/secret: anonymous, if the env allows)."""
    ctx = SessionContext()
    store = AmazonS3(bucket_name=bucket, region=s3.region, access_key_id=key, secret_access_key=secret,
                     endpoint=s3.endpoint, allow_http=True)
    # The URL registered is scheme + host: "s3://" + the store's bucket ("s3://bucket" here would give s3://bucketbucket).
    ctx.register_object_store("s3://", store, None)
    return ctx


def trust(monkeypatch: pytest.MonkeyPatch, ca: Path) -> None:
    """Make stores built from now on in this process trust `ca` (rustls reads the variables at build time)."""
    for name, value in trust_env(ca).items():
        monkeypatch.setenv(name, value)


@pytest.fixture(autouse=True)
def no_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """AmazonS3 starts from AmazonS3Builder::from_env(): a developer's AWS_* variables must not steer these tests."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="module")
def s3_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(tmp_path_factory.mktemp("s3-auth"), auth=True) as server:
        server.create_bucket("private")
        server.create_bucket("public", public=True)
        for bucket in ("private", "public"):
            server.put(bucket, "ids.parquet", write_ids(tmp_path_factory.mktemp("ids") / "ids.parquet", rows=100))
        yield server


def test_s3_parquet_filter_fetches_only_some_ranges(s3: S3Server, tmp_path: Path) -> None:
    file = write_ids(tmp_path / "ids.parquet")
    s3.create_bucket("ranges")
    s3.put("ranges", "data/ids.parquet", file)
    ctx = s3_context(s3, "ranges", key=s3.key, secret=s3.secret)
    ctx.register_parquet("ids", "s3://ranges/data/ids.parquet")
    s3.clear_requests()

    rows = ctx.sql(f"SELECT count(*) AS n, sum(value) AS total FROM ids WHERE id >= {ROWS - GROUP}").to_pylist()

    assert rows == [{"n": GROUP, "total": sum(2 * i for i in range(ROWS - GROUP, ROWS))}]
    gets = [r for r in s3.requests() if r.method == "GET"]
    assert gets and all(r.path == "/ranges/data/ids.parquet" and r.status == 206 for r in gets)
    assert all(r.authorization and r.access_key == s3.key for r in s3.requests())
    fetched = sum(last - first + 1 for first, last in (r.byte_range for r in gets if r.byte_range))
    assert 0 < fetched < file.stat().st_size * 0.3, (fetched, file.stat().st_size, gets)


def test_s3_hive_folder_prunes_partitions(s3: S3Server, tmp_path: Path) -> None:
    local = tmp_path / "sales"
    write_ids(local / "year=2023" / "part-0.parquet", first=0, rows=10)
    write_ids(local / "year=2024" / "part-0.parquet", first=100, rows=5)
    write_ids(local / "year=2024" / "part-1.parquet", first=200, rows=5)
    s3.create_bucket("hive")
    assert s3.put_tree("hive", local, "sales/") == [
        "sales/year=2023/part-0.parquet", "sales/year=2024/part-0.parquet", "sales/year=2024/part-1.parquet"]
    ctx = s3_context(s3, "hive", key=s3.key, secret=s3.secret)
    ctx.register_listing_table("sales", "s3://hive/sales/", table_partition_cols=[("year", pa.int32())])
    s3.clear_requests()

    rows = ctx.sql("SELECT year, count(*) AS n, min(id) AS lo FROM sales WHERE year = 2024 GROUP BY year").to_pylist()

    assert rows == [{"year": 2024, "n": 10, "lo": 100}]
    assert not [r for r in s3.requests() if "year=2023" in r.path], s3.requests()
    s3.delete("hive", "sales/year=2024/part-1.parquet")
    assert s3.keys("hive", "sales/year=2024/") == ["sales/year=2024/part-0.parquet"]


def test_s3_auth_needs_the_right_secret(s3_auth: S3Server) -> None:
    ok = s3_context(s3_auth, "private", key=s3_auth.key, secret=s3_auth.secret)
    ok.register_parquet("ids", "s3://private/ids.parquet")
    assert ok.sql("SELECT count(*) AS n FROM ids").to_pylist() == [{"n": 100}]

    s3_auth.clear_requests()
    wrong = s3_context(s3_auth, "private", key=s3_auth.key, secret="not-the-secret")
    with pytest.raises(Exception, match="403 Forbidden"):
        wrong.register_parquet("ids", "s3://private/ids.parquet")
    assert [(r.method, r.status, r.access_key) for r in s3_auth.requests()] == [("HEAD", 403, s3_auth.key)]


def test_s3_anonymous_reads_a_public_bucket_only(s3_auth: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    # DataFusion's AmazonS3 has no "anonymous" argument: object_store reads AWS_SKIP_SIGNATURE when the store is built.
    monkeypatch.setenv("AWS_SKIP_SIGNATURE", "true")
    s3_auth.clear_requests()
    public = s3_context(s3_auth, "public")
    public.register_parquet("ids", "s3://public/ids.parquet")
    assert public.sql("SELECT count(*) AS n FROM ids").to_pylist() == [{"n": 100}]
    assert s3_auth.requests() and not any(r.authorization for r in s3_auth.requests())

    with pytest.raises(Exception, match="403 Forbidden"):
        s3_context(s3_auth, "private").register_parquet("ids", "s3://private/ids.parquet")


def test_s3_over_tls(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trust(monkeypatch, pki.ca.cert)
    with s3_server(tmp_path / "s3", tls=pki.server, ca=pki.ca.cert) as s3:
        s3.create_bucket("secure")
        s3.put("secure", "ids.parquet", write_ids(tmp_path / "ids.parquet", rows=10))
        ctx = s3_context(s3, "secure", key=s3.key, secret=s3.secret)
        ctx.register_parquet("ids", s3.url("secure", "ids.parquet"))
        assert ctx.sql("SELECT count(*) AS n FROM ids").to_pylist() == [{"n": 10}]
        assert s3.endpoint.startswith("https://") and s3.requests()


def test_http_tls_parquet_and_csv(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "www"
    write_ids(root / "data" / "ids.parquet")
    (root / "data" / "trips.csv").write_text("id,city\n1,Seattle\n2,Portland\n3,Seattle\n")
    with http_file_server(root, tls=pki.server) as web:
        trust(monkeypatch, pki.ca.cert)
        ctx = SessionContext()
        # Registered under scheme + host = "" + the store's URL: the origin https://127.0.0.1:PORT.
        ctx.register_object_store("", Http(web.url), None)
        ctx.register_parquet("ids", web.url_for("data/ids.parquet"))
        ctx.register_csv("trips", web.url_for("data/trips.csv"))
        web.clear_requests()

        assert ctx.sql(f"SELECT count(*) AS n FROM ids WHERE id >= {ROWS - GROUP}").to_pylist() == [{"n": GROUP}]
        assert ctx.sql("SELECT count(*) AS n FROM trips WHERE city = 'Seattle'").to_pylist() == [{"n": 2}]

        parquet_gets = [r for r in web.requests() if r.method == "GET" and r.path.endswith(".parquet")]
        assert parquet_gets and all(r.status == 206 and r.byte_range for r in parquet_gets)
        with pytest.raises(Exception, match="405 Method Not Allowed"):  # a folder needs WebDAV PROPFIND
            ctx.register_listing_table("folder", web.url_for("data/"))
        assert web.requests()[-1].method == "PROPFIND"


def test_http_basic_auth_and_ranges(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_bytes(b"0123456789")
    with http_file_server(tmp_path / "www", basic_auth=("alice", "s3cret")) as web, httpx.Client() as client:
        missing = client.get(web.url_for("hello.txt"))
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Basic ")
        assert client.get(web.url_for("hello.txt"), auth=("alice", "wrong")).status_code == 401
        ranged = client.get(web.url_for("hello.txt"), auth=("alice", "s3cret"), headers={"Range": "bytes=2-4"})
        assert (ranged.status_code, ranged.content, ranged.headers["content-range"]) == (206, b"234", "bytes 2-4/10")
        assert [(r.method, r.authorization, r.status, r.byte_range) for r in web.requests()] == [
            ("GET", False, 401, None), ("GET", True, 401, None), ("GET", True, 206, (2, 4))]


def test_datafusion_http_cannot_send_basic_auth_nor_use_plain_http(pki: Pki, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "t.csv").write_text("a\n1\n")
    trust(monkeypatch, pki.ca.cert)
    with http_file_server(tmp_path / "www", tls=pki.server, basic_auth=("alice", "s3cret")) as web:
        with_credentials = web.url.replace("https://", "https://alice:s3cret@")
        ctx = SessionContext()
        ctx.register_object_store("", Http(with_credentials), None)  # the store keeps only the URL's origin
        with pytest.raises(Exception, match="401 Unauthorized"):
            ctx.register_csv("t", web.url_for("t.csv"))
        assert [(r.method, r.authorization) for r in web.requests()] == [("HEAD", False)]

    with http_file_server(tmp_path / "www") as plain:
        ctx = SessionContext()
        ctx.register_object_store("", Http(plain.url), None)
        with pytest.raises(Exception, match="builder error"):  # https only: the client is built without allow_http
            ctx.register_csv("t", plain.url_for("t.csv"))
        assert plain.requests() == []


def test_servers_stop_even_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), s3_server(tmp_path / "s3") as s3:
        proc = s3.process.proc
        1 / 0  # noqa: B018
    assert proc.poll() is not None
    with pytest.raises(RuntimeError, match=r"(?s)did not start.*does not exist"):
        with http_file_server(tmp_path / "no-such-root"):
            pass

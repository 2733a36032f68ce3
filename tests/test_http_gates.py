"""spiced/http/gates.py: the client-certificate gate and the API-key gate, through a real Hypercorn
(plain HTTP for keys; the TLS manager's listener context for client certificates) with curl and
httpx as clients."""

from __future__ import annotations

import logging
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pyarrow import ipc

from spiced.config import ClientAuthMode
from spiced.metrics import Metrics
from spiced.tls.manager import TlsManager
from tests.http_rig import ApiServer, api_server, curl, make_state, sample_value
from tests.pki import Issued, Pki
from tests.support import write_pod
from tests.tlsprobe import LoopThread, file_settings, wait_for

KEYS = ("key-one", "key-two")
CERT_REQUIRED = b'{"message":"Valid client TLS certificate required"}'


@pytest.fixture(scope="module")
def keyed(loop: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with api_server(loop, make_state(write_pod(tmp_path_factory.mktemp("keys")), api_keys=KEYS)) as server:
        yield server


# ------------------------------------------------------------------ API keys


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"X-API-Key": "key-one"}, 200),
    ({"X-API-Key": "key-two"}, 200),
    ({"X-API-Key": "key-three"}, 401),
    ({"X-API-Key": ""}, 401),
    ({"Authorization": "Bearer key-one"}, 200),
    ({"Authorization": "bearer key-two"}, 200),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"Authorization": "Basic key-one"}, 401),
    ({"X-API-Key": "key-one", "Authorization": "Bearer wrong"}, 200),  # X-API-Key wins
    ({"X-API-Key": "wrong", "Authorization": "Bearer key-one"}, 401),
], ids=lambda v: repr(v) if isinstance(v, dict) else str(v))
def test_api_key_matrix_on_sql(keyed: ApiServer, headers: dict[str, str], status: int) -> None:
    r = httpx.post(keyed.url + "/v1/sql", content="SELECT 1", headers=headers)
    assert r.status_code == status
    if status == 401:
        assert r.content == b"Unauthorized" and "content-type" not in r.headers
    else:
        assert r.json() == [{"Int64(1)": 1}]


@pytest.mark.parametrize("path", ["/health", "/v1/ready"])
def test_health_and_ready_need_no_key(keyed: ApiServer, path: str) -> None:
    assert httpx.get(keyed.url + path).status_code == 200


@pytest.mark.parametrize("path", ["/v1/datasets", "/v1/status", "/v1/spicepods", "/metrics", "/v1/openapi.json"])
def test_other_routes_need_a_key(keyed: ApiServer, path: str) -> None:
    assert httpx.get(keyed.url + path).status_code == 401
    assert httpx.get(keyed.url + path, headers={"X-API-Key": "key-two"}).status_code == 200


def test_api_key_with_curl(keyed: ApiServer) -> None:
    refused = curl("-i", keyed.url + "/v1/sql", "-d", "SELECT 1")
    head, _, body = refused.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401") and body == b"Unauthorized" and b"content-type" not in head.lower()
    ok = curl(keyed.url + "/v1/sql", "-H", "Authorization: Bearer key-one", "-d", "SELECT 1")
    assert ok.stdout == b'[{"Int64(1)":1}]'


def test_keys_are_not_logged(keyed: ApiServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        httpx.post(keyed.url + "/v1/sql", content="SELECT 1", headers={"X-API-Key": "key-one"})
        httpx.post(keyed.url + "/v1/sql", content="SELECT 1", headers={"X-API-Key": "not-a-key"})
        wait_for(lambda: sum(r.name == "runtime.http" for r in caplog.records) >= 2, timeout=5)
    assert not any("key-one" in r.getMessage() or "not-a-key" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ client certificates (real TLS)


def _tls_server(loop: LoopThread, pki: Pki, tmp: Path, mode: ClientAuthMode,
                api_keys: tuple[str, ...] = ()) -> Iterator[ApiServer]:
    cert, key = tmp / "server.crt", tmp / "server.key"
    shutil.copyfile(pki.server.cert, cert)
    shutil.copyfile(pki.server.key, key)
    metrics = Metrics()
    manager = TlsManager.create(file_settings(pki, cert, key, mode, pki.client_ca.cert if mode != "none" else None),
                                metrics)
    state = make_state(write_pod(tmp / "pod"), tls=manager, api_keys=api_keys, metrics=metrics)
    with api_server(loop, state, ssl_context=manager.listener_context("http")) as server:
        yield server


@pytest.fixture(scope="module")
def required(loop: LoopThread, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from _tls_server(loop, pki, tmp_path_factory.mktemp("required"), "required")


@pytest.fixture(scope="module")
def requested(loop: LoopThread, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    yield from _tls_server(loop, pki, tmp_path_factory.mktemp("request"), "request")


@pytest.fixture(scope="module")
def channel(loop: LoopThread, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """mTLS-as-channel: `required` and API keys together."""
    yield from _tls_server(loop, pki, tmp_path_factory.mktemp("channel"), "required", KEYS)


def tls_curl(pki: Pki, url: str, *args: str, client: Issued | None = None) -> tuple[int, bytes, bytes]:
    creds = ["--cert", str(client.cert), "--key", str(client.key)] if client is not None else []
    out = curl("-i", "--cacert", str(pki.ca.cert), *creds, *args, url)
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert out.returncode == 0, out.stderr
    return int(head.split()[1]), head.lower(), body


def https(pki: Pki, client: Issued | None = None, *, http2: bool = False) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    return httpx.Client(verify=ctx, http2=http2, http1=not http2, timeout=10)


def test_required_without_certificate_is_401_json(required: ApiServer, pki: Pki) -> None:
    status, head, body = tls_curl(pki, required.url + "/v1/sql", "-d", "SELECT 1")
    assert (status, body) == (401, CERT_REQUIRED)
    assert b"content-type: application/json" in head
    for path in ("/v1/datasets", "/v1/status", "/nope"):
        assert tls_curl(pki, required.url + path)[::2] == (401, CERT_REQUIRED), path


@pytest.mark.parametrize("path", ["/health", "/v1/ready", "/metrics"])
def test_required_leaves_health_ready_and_metrics_open(required: ApiServer, pki: Pki, path: str) -> None:
    assert tls_curl(pki, required.url + path)[0] == 200


def test_required_with_a_verified_certificate_answers_rows(required: ApiServer, pki: Pki) -> None:
    status, head, body = tls_curl(pki, required.url + "/v1/sql", "-d", "SELECT 1", client=pki.client)
    assert (status, body) == (200, b'[{"Int64(1)":1}]') and b"content-type: application/json" in head


def test_required_over_h2(required: ApiServer, pki: Pki) -> None:
    with https(pki, http2=True) as anonymous, https(pki, pki.client, http2=True) as verified:
        refused = anonymous.post(required.url + "/v1/sql", content="SELECT 1")
        served = verified.post(required.url + "/v1/sql", content="SELECT 1")
    assert (refused.http_version, refused.status_code, refused.content) == ("HTTP/2", 401, CERT_REQUIRED)
    assert (served.status_code, served.json()) == (200, [{"Int64(1)": 1}])


def test_identity_in_the_access_log_and_client_counts(requested: ApiServer, pki: Pki,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    def access_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "runtime.http" and r.levelno == logging.DEBUG]

    with caplog.at_level(logging.DEBUG, logger="runtime.http"):
        with https(pki, pki.client) as verified, https(pki) as anonymous:
            assert verified.post(requested.url + "/v1/sql", content="SELECT 1").status_code == 200
            assert anonymous.post(requested.url + "/v1/sql", content="SELECT 1").status_code == 200  # request mode
        wait_for(lambda: len(access_lines()) >= 2, timeout=5)
    with_identity, without = access_lines()[:2]
    assert with_identity.startswith("POST /v1/sql 200 ") and 'client_subject="' in with_identity
    assert "client_fingerprint=" in with_identity
    assert without.startswith("POST /v1/sql 200 ") and "client_subject" not in without
    text = requested.state.metrics.exposition().body.decode()
    assert sample_value(text, "client_cert_requests_total") == 1
    assert sample_value(text, "client_cert_absent_requests_total") == 1


@pytest.mark.parametrize(("client", "key", "status", "body"), [
    (True, True, 200, b'[{"Int64(1)":1}]'),
    (True, False, 401, b"Unauthorized"),
    (False, True, 401, CERT_REQUIRED),  # the certificate gate runs first
    (False, False, 401, CERT_REQUIRED),
], ids=["cert+key", "cert only", "key only", "neither"])
def test_mtls_as_channel_needs_both(channel: ApiServer, pki: Pki, client: bool, key: bool, status: int,
                                   body: bytes) -> None:
    args = ["-H", "X-API-Key: key-one"] if key else []
    got = tls_curl(pki, channel.url + "/v1/sql", "-d", "SELECT 1", *args, client=pki.client if client else None)
    assert (got[0], got[2]) == (status, body)
    assert tls_curl(pki, channel.url + "/health")[0] == 200


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
def test_streamed_results_over_tls(required: ApiServer, pki: Pki, http2: bool) -> None:
    """Large results leave as views of Arrow buffers; both protocols must carry them intact."""
    sql = "SELECT value, concat('v', value) AS s FROM generate_series(1, 200000) ORDER BY value"
    with https(pki, pki.client, http2=http2) as c:
        rows = c.post(required.url + "/v1/sql", content=sql).json()
        arrow = c.post(required.url + "/v1/sql", content=sql, headers={"Accept": "application/vnd.apache.arrow.stream"})
    assert len(rows) == 200_000 and rows[0] == {"value": 1, "s": "v1"} and rows[-1] == {"value": 200000, "s": "v200000"}
    assert ipc.open_stream(arrow.content).read_all().num_rows == 200_000

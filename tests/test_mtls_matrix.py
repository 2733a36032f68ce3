"""Issue 4's matrix against the real `spiced`: {none, request, required} × {no certificate, valid,
foreign CA, expired, serverAuth-only} × {/v1/sql, /health + /v1/ready, /metrics on the HTTP listener,
the metrics listener, Flight DoGet}, with curl and pyarrow Flight as the clients."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow.flight as flight
import pytest

from tests.pki import Issued, Pki
from tests.support import Runtime, run_spiced, write_pod

MODES = ("none", "request", "required")
CLIENTS = ("anonymous", "valid", "foreign", "expired", "server_usage")


@pytest.fixture(scope="module", params=MODES)
def runtime(request: pytest.FixtureRequest, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    mode = request.param
    args = ["--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
            "--tls-key-file", str(pki.server.key), "--tls-client-auth-mode", mode]
    if mode != "none":
        args += ["--tls-client-auth-ca-file", str(pki.client_ca.cert)]
    with run_spiced(write_pod(tmp_path_factory.mktemp(mode)), *args, metrics=True) as rt:
        rt.mode = mode  # type: ignore[attr-defined]
        yield rt


def client_cert(pki: Pki, client: str) -> Issued | None:
    return {"anonymous": None, "valid": pki.client, "foreign": pki.foreign_client, "expired": pki.expired_client,
            "server_usage": pki.server_usage_client}[client]


def curl(pki: Pki, cert: Issued | None, url: str, *extra: str) -> tuple[int, str]:
    """(HTTP status, body); status 0 when the TLS handshake (or the first read after it) failed."""
    cmd = ["curl", "-s", "--max-time", "10", "--cacert", str(pki.ca.cert), "-w", "\n%{http_code}", *extra, url]
    if cert is not None:
        cmd[1:1] = ["--cert", str(cert.cert), "--key", str(cert.key)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    body, _, code = out.stdout.rpartition("\n")
    return (int(code) if out.returncode == 0 else 0), body


def localhost(address: str) -> str:
    return address.replace("127.0.0.1", "localhost")


def accepted(mode: str, client: str) -> bool:
    """Does the TLS handshake on the HTTP/Flight listeners accept this client?"""
    return mode == "none" or client in ("anonymous", "valid")


@pytest.mark.parametrize("client", CLIENTS)
def test_http_sql(runtime: Runtime, pki: Pki, client: str) -> None:
    mode = runtime.mode  # type: ignore[attr-defined]
    status, body = curl(pki, client_cert(pki, client), f"https://{localhost(runtime.http_address)}/v1/sql",
                        "-d", "SELECT 1")
    if not accepted(mode, client):
        assert status == 0, f"{client} must fail the handshake in mode {mode}"
    elif mode == "required" and client == "anonymous":
        assert (status, body) == (401, '{"message":"Valid client TLS certificate required"}')
    else:
        assert (status, body) == (200, '[{"Int64(1)":1}]')


@pytest.mark.parametrize("client", CLIENTS)
def test_http_probes(runtime: Runtime, pki: Pki, client: str) -> None:
    mode = runtime.mode  # type: ignore[attr-defined]
    base = f"https://{localhost(runtime.http_address)}"
    health, ready = (curl(pki, client_cert(pki, client), base + "/health"),
                     curl(pki, client_cert(pki, client), base + "/v1/ready"))
    if accepted(mode, client):
        assert health == (200, "ok\n") and ready == (200, "ready")
    else:
        assert health[0] == 0 and ready[0] == 0


@pytest.mark.parametrize("client", CLIENTS)
def test_metrics_on_http_listener(runtime: Runtime, pki: Pki, client: str) -> None:
    mode = runtime.mode  # type: ignore[attr-defined]
    status, body = curl(pki, client_cert(pki, client), f"https://{localhost(runtime.http_address)}/metrics")
    if accepted(mode, client):
        assert status == 200 and "# TYPE http_requests_total counter" in body
    else:
        assert status == 0


@pytest.mark.parametrize("client", CLIENTS)
def test_metrics_listener_never_asks(runtime: Runtime, pki: Pki, client: str) -> None:
    status, body = curl(pki, client_cert(pki, client), f"https://{localhost(runtime.addresses['metrics'])}/metrics")
    assert status == 200 and "# TYPE" in body


@pytest.mark.parametrize("client", CLIENTS)
def test_flight_doget(runtime: Runtime, pki: Pki, client: str) -> None:
    mode = runtime.mode  # type: ignore[attr-defined]
    cert = client_cert(pki, client)
    kwargs = {"cert_chain": cert.cert_pem, "private_key": cert.key_pem} if cert else {}
    with flight.FlightClient(f"grpc+tls://{localhost(runtime.addresses['flight'])}", tls_root_certs=pki.ca.cert_pem,
                             **kwargs) as c:
        options = flight.FlightCallOptions(timeout=10)
        if accepted(mode, client) and not (mode == "required" and client == "anonymous"):
            table = c.do_get(flight.Ticket(b"SELECT 1"), options).read_all()
            assert table.to_pylist() == [{"Int64(1)": 1}]
        else:
            with pytest.raises(flight.FlightUnavailableError):
                c.do_get(flight.Ticket(b"SELECT 1"), options).read_all()


def test_startup_line_names_mode_and_ca(runtime: Runtime, pki: Pki) -> None:
    mode = runtime.mode  # type: ignore[attr-defined]
    logs = "\n".join(runtime.logs())
    if mode == "required":
        assert (f"Public TLS client certificates: required (client_auth_mode=required); "
                f"CA from file {pki.client_ca.cert}") in logs
    elif mode == "request":
        assert (f"Public TLS client certificates: requested but optional (client_auth_mode=request); "
                f"CA from file {pki.client_ca.cert}") in logs
    else:
        assert "Public TLS client certificates:" not in logs


# ------------------------------------------------------------------ CA bundle rotation and API keys

def test_client_ca_rotation_applies_to_new_connections(pki: Pki, tmp_path: Path) -> None:
    bundle = tmp_path / "clients.pem"
    bundle.write_bytes(pki.client_ca.cert_pem)
    args = ["--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
            "--tls-key-file", str(pki.server.key),
            "--tls-client-auth-mode", "required", "--tls-client-auth-ca-file", str(bundle)]
    with run_spiced(write_pod(tmp_path / "pod"), *args) as rt:
        url = f"https://{localhost(rt.http_address)}/v1/sql"
        assert curl(pki, pki.client, url, "-d", "SELECT 1")[0] == 200
        assert curl(pki, pki.foreign_client, url, "-d", "SELECT 1")[0] == 0
        tmp = tmp_path / "clients.pem.new"
        tmp.write_bytes(pki.foreign_ca.cert_pem)  # the old CA removed, a new one added
        tmp.replace(bundle)
        rt.wait_for_log("TLS reload: swapped client CA bundle")
        assert curl(pki, pki.client, url, "-d", "SELECT 1")[0] == 0
        assert curl(pki, pki.foreign_client, url, "-d", "SELECT 1")[0] == 200
        with flight.FlightClient(f"grpc+tls://{localhost(rt.addresses['flight'])}", tls_root_certs=pki.ca.cert_pem,
                                 cert_chain=pki.foreign_client.cert_pem, private_key=pki.foreign_client.key_pem) as c:
            assert c.do_get(flight.Ticket(b"SELECT 1")).read_all().num_rows == 1


API_KEY_POD = """version: v1
kind: Spicepod
name: keys
runtime:
  auth:
    api-key:
      keys: ["${ secrets:api_key }"]
datasets:
  - from: file:trips.csv
    name: trips
"""


def test_mtls_and_api_keys_combine(pki: Pki, tmp_path: Path) -> None:
    args = ["--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
            "--tls-key-file", str(pki.server.key),
            "--tls-client-auth-mode", "required", "--tls-client-auth-ca-file", str(pki.client_ca.cert)]
    with run_spiced(write_pod(tmp_path, API_KEY_POD), *args, env={"SPICE_API_KEY": "k-123"}) as rt:
        url = f"https://{localhost(rt.http_address)}/v1/sql"
        assert curl(pki, pki.client, url, "-d", "SELECT 1") == (401, "Unauthorized")
        assert curl(pki, pki.client, url, "-d", "SELECT 1", "-H", "X-API-Key: k-123")[0] == 200
        assert curl(pki, pki.client, url, "-d", "SELECT 1", "-H", "Authorization: Bearer k-123")[0] == 200
        assert curl(pki, None, url, "-d", "SELECT 1", "-H", "X-API-Key: k-123")[0] == 401  # the key alone is not enough
        assert any("mTLS-as-channel mode active" in line for line in rt.logs())
        uri = f"grpc+tls://{localhost(rt.addresses['flight'])}"
        with flight.FlightClient(uri, tls_root_certs=pki.ca.cert_pem, cert_chain=pki.client.cert_pem,
                                 private_key=pki.client.key_pem) as c:
            with pytest.raises(flight.FlightUnauthenticatedError):
                c.do_get(flight.Ticket(b"SELECT 1")).read_all()
            token = c.authenticate_basic_token("", "k-123")
            table = c.do_get(flight.Ticket(b"SELECT 1"), flight.FlightCallOptions(headers=[token])).read_all()
            assert table.num_rows == 1
        assert not any("k-123" in line for line in rt.logs())

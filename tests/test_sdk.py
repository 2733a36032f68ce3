"""The official Spice.ai JavaScript SDK (`@spiceai/spice`, tests/js/sdk_client.mjs via tests.jsclient)
end to end against the real `spiced`, in four configurations, each one module-scoped runtime:

    plaintext    grpc:// Flight, http:// HTTP
    tls          server certificate; the SDK verifies it with tlsRootCertFile + flightTlsEnabled
                 (over HTTPS through NODE_EXTRA_CA_CERTS: the SDK's fetch agent ignores tlsRootCertFile)
    tls_api_key  tls, and the spicepod's runtime.auth.api-key: the SDK sends apiKey (Bearer over
                 Flight, X-API-Key over HTTP)
    mtls         tls with --tls-client-auth-mode request and the client CA; the SDK presents
                 tlsClientCertFile / tlsClientKeyFile over Flight

In each one every call works: `sql()` over Flight returning string columns (a CSV dataset, a Parquet
file with a string column, a join of the two), `sqlJson()` over HTTP, positional and named parameters
over Flight and over HTTP, `refreshAcceleration()` of an accelerated dataset (whose new rows are
served after), `listActiveQueries()` + `cancelActiveQuery()` of a long query another client started;
and the configuration's refusal works: a TLS client gets nothing from the plaintext listeners; a TLS
client without the CA is refused (Flight UNAVAILABLE, HTTPS "unable to verify the first certificate");
a wrong or missing API key is refused (Flight UNAUTHENTICATED, HTTP 401); a client certificate from a
foreign CA is refused at the Flight handshake.

mTLS is tested in `request` mode because the SDK cannot present a client certificate over HTTP: its
HTTPS agent (one module-wide `https.Agent` in dist/node/platform/node.js) takes no certificate
options, so under `required` every SDK HTTP call is answered 401. That limitation is asserted on its
own in `test_required_client_auth_serves_flight_but_not_the_sdks_http`: Flight works, HTTP is 401.
"""

from __future__ import annotations

import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.jsclient import ensure_installed, run_sdk
from tests.pki import Pki
from tests.support import TRIPS_CSV, Runtime, run_spiced, write_pod
from tests.tlsprobe import wait_for

CONFIGS = ("plaintext", "tls", "tls_api_key", "mtls")
API_KEY = "sdk-e2e-key"
CERT_REQUIRED = '{"message":"Valid client TLS certificate required"}'
# A single-partition aggregation that runs for minutes (tests/test_active_queries.py).
LONG = "SELECT count(*) AS {tag} FROM generate_series(1, 10000000000)"

DATASETS = """\
datasets:
  - from: file:trips.csv
    name: trips
    acceleration:
      enabled: true
  - from: file:cities.parquet
    name: cities
  - from: file:rides.csv
    name: rides
    acceleration:
      enabled: true
"""
API_KEY_AUTH = f"""\
runtime:
  auth:
    api-key:
      enabled: true
      keys: ["{API_KEY}"]
"""
RIDES_CSV = "id,city\n1,Seattle\n2,Portland\n"
CITIES = pa.table({"name": ["Seattle", "Portland", "Spokane", "Tacoma"],
                   "state": ["WA", "OR", "WA", None],
                   "population": pa.array([755_078, 652_503, 229_071, 219_346], pa.int64())})

TRIP_CITIES = [{"city": "Seattle", "fare": 12.5}, {"city": "Portland", "fare": 8.25}, {"city": "Seattle", "fare": 30}]
WA_CITIES = [{"name": "Seattle", "state": "WA"}, {"name": "Spokane", "state": "WA"}]


def spicepod(api_key: bool) -> str:
    return "version: v1\nkind: Spicepod\nname: sdk\n" + (API_KEY_AUTH if api_key else "") + DATASETS


@dataclass
class Setup:
    """One configuration's runtime and how the SDK (and an httpx client) reach it."""

    name: str
    rt: Runtime
    pki: Pki
    workdir: Path

    @property
    def tls(self) -> bool:
        return self.name != "plaintext"

    @property
    def api_key(self) -> str | None:
        return API_KEY if self.name == "tls_api_key" else None

    def connection(self) -> dict[str, Any]:
        """The SDK's connection options for this configuration (maxRetries 0: failures show at once)."""
        job: dict[str, Any] = {"flightUrl": self.rt.addresses["flight"], "httpUrl": self.rt.http_url, "maxRetries": 0}
        if self.tls:
            job |= {"flightTlsEnabled": True, "tlsRootCertFile": str(self.pki.ca.cert)}
        if self.api_key:
            job["apiKey"] = self.api_key
        if self.name == "mtls":
            job |= {"tlsClientCertFile": str(self.pki.client.cert), "tlsClientKeyFile": str(self.pki.client.key)}
        return job

    def sdk(self, *steps: dict[str, Any], check: bool = True, timeout: float = 30) -> dict[str, Any]:
        """One SDK job (tests/js/sdk_client.mjs): `steps` in order, each on a new SpiceClient."""
        return run_sdk({**self.connection(), "steps": list(steps)}, timeout, check=check)

    def http(self) -> httpx.Client:
        """Another client: httpx with the CA, the client certificate (mtls) and the API key."""
        kwargs: dict[str, Any] = {"base_url": self.rt.http_url, "timeout": 120}
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.pki.ca.cert))
            if self.name == "mtls":
                context.load_cert_chain(self.pki.client.cert, self.pki.client.key)
            kwargs["verify"] = context
        if self.api_key:
            kwargs["headers"] = {"X-API-Key": self.api_key}
        return httpx.Client(**kwargs)


def tls_args(pki: Pki, client_auth: str | None = None) -> list[str]:
    args = ["--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert), "--tls-key-file",
            str(pki.server.key)]
    if client_auth:
        args += ["--tls-client-auth-mode", client_auth, "--tls-client-auth-ca-file", str(pki.client_ca.cert)]
    return args


def write_workdir(workdir: Path, *, api_key: bool) -> Path:
    write_pod(workdir, spicepod(api_key), csv=TRIPS_CSV)
    (workdir / "rides.csv").write_text(RIDES_CSV)
    pq.write_table(CITIES, workdir / "cities.parquet")
    return workdir


@pytest.fixture(scope="module", params=CONFIGS)
def setup(request: pytest.FixtureRequest, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    ensure_installed()
    name: str = request.param
    workdir = write_workdir(tmp_path_factory.mktemp(name), api_key=name == "tls_api_key")
    args = [] if name == "plaintext" else tls_args(pki, "request" if name == "mtls" else None)
    with run_spiced(workdir, *args) as rt:
        yield Setup(name, rt, pki, workdir)


def rows(out: dict[str, Any]) -> list[Any]:
    return [r["rows"] for r in out["results"]]


def errors(out: dict[str, Any]) -> list[tuple[Any, str]]:
    """(code, error) of every step of a job whose steps were all expected to fail."""
    results = out["results"]
    assert all("error" in r for r in results), f"a step was served: {results}"
    return [(r["code"], r["error"]) for r in results]


# ------------------------------------------------------------------ queries


def test_sql_over_flight_returns_string_columns(setup: Setup) -> None:
    out = setup.sdk(
        {"call": "sql", "query": "SELECT city, fare FROM trips ORDER BY id"},
        {"call": "sql", "query": "SELECT name, state FROM cities WHERE state = 'WA' ORDER BY name"},
        {"call": "sql", "query": "SELECT name, state, population FROM cities ORDER BY population DESC"},
        {"call": "sql", "query": "SELECT t.id, c.name, c.state FROM trips t JOIN cities c ON c.name = t.city "
                                 "ORDER BY t.id"},
    )
    assert rows(out) == [
        TRIP_CITIES,
        WA_CITIES,
        [{"name": "Seattle", "state": "WA", "population": 755_078}, {"name": "Portland", "state": "OR",
                                                                      "population": 652_503},
         {"name": "Spokane", "state": "WA", "population": 229_071}, {"name": "Tacoma", "state": None,
                                                                      "population": 219_346}],
        [{"id": 1, "name": "Seattle", "state": "WA"}, {"id": 2, "name": "Portland", "state": "OR"},
         {"id": 3, "name": "Seattle", "state": "WA"}],
    ]


def test_sql_json_over_http(setup: Setup) -> None:
    out = setup.sdk(
        {"call": "sqlJson", "query": "SELECT city, fare FROM trips ORDER BY id"},
        {"call": "sqlJson", "query": "SELECT name, state FROM cities WHERE state = 'WA' ORDER BY name"},
        {"call": "sqlJson", "query": "SELECT * FROM cities WHERE population < 0"},
    )
    assert [(r["rows"], r["row_count"]) for r in out["results"]] == [(TRIP_CITIES, 3), (WA_CITIES, 2), ([], 0)]


@pytest.mark.parametrize("call", ["sql", "sqlHttp"])
def test_positional_and_named_parameters(setup: Setup, call: str) -> None:
    """`sql(query, {parameters})`: over Flight a Flight SQL prepared statement with a bound batch,
    over HTTP the {"sql", "parameters"} JSON body."""
    out = setup.sdk(
        {"call": call, "query": "SELECT id, fare FROM trips WHERE city = $1 ORDER BY id", "parameters": ["Seattle"]},
        {"call": call, "query": "SELECT city FROM trips WHERE city = $1 AND fare > $2", "parameters": ["Seattle", 20]},
        {"call": call, "query": "SELECT city, fare FROM trips WHERE id = $id", "parameters": {"id": 2}},
        {"call": call, "query": "SELECT name FROM cities WHERE state = $state AND population > $least ORDER BY name",
         "parameters": {"state": "WA", "least": 200_000}},
        {"call": call, "query": "SELECT $1 AS s, $2 AS i, $3 AS f", "parameters": ["x", 7, 2.5]},
        {"call": call, "query": "SELECT $1 + 1 AS v", "parameters": [{"value": 41, "type": "Int32"}]},  # a typed Param
    )
    assert rows(out) == [
        [{"id": 1, "fare": 12.5}, {"id": 3, "fare": 30}],
        [{"city": "Seattle"}],
        [{"city": "Portland", "fare": 8.25}],
        [{"name": "Seattle"}, {"name": "Spokane"}],
        [{"s": "x", "i": 7, "f": 2.5}],
        [{"v": 42}],
    ]


# ------------------------------------------------------------------ refresh, active queries


def test_refresh_acceleration_then_the_new_data_is_served(setup: Setup) -> None:
    query = "SELECT id, city FROM rides ORDER BY id"
    assert rows(setup.sdk({"call": "sql", "query": query})) == [[{"id": 1, "city": "Seattle"},
                                                                  {"id": 2, "city": "Portland"}]]
    with (setup.workdir / "rides.csv").open("a") as f:
        f.write("3,Spokane\n")
    mark = len(setup.rt.logs())
    out = setup.sdk({"call": "refresh", "dataset": "rides"})
    assert out["results"][0]["answer"] == {"message": "Dataset refresh triggered for rides."}
    setup.rt.wait_for_log(r"Loaded 3 rows \(.*\) for dataset rides in ", after=mark)
    out = setup.sdk({"call": "sql", "query": query}, {"call": "sqlJson", "query": query},
                    {"call": "sql", "query": "SELECT city, fare FROM trips ORDER BY id"})
    rides = [{"id": 1, "city": "Seattle"}, {"id": 2, "city": "Portland"}, {"id": 3, "city": "Spokane"}]
    assert rows(out) == [rides, rides, TRIP_CITIES]


def test_list_and_cancel_a_query_another_client_started(setup: Setup) -> None:
    """Another client (httpx, with this configuration's CA, certificate and key) runs a long query; the
    SDK finds it with listActiveQueries() and cancels it with cancelActiveQuery()."""
    sql_text = LONG.format(tag=f"sdk_{setup.name}_{uuid.uuid4().hex[:8]}")
    answer: dict[str, Any] = {}

    def other_client() -> None:
        try:
            with setup.http() as client:
                answer["response"] = client.post("/v1/sql", content=sql_text)
        except Exception as e:  # noqa: BLE001 - reported below
            answer["error"] = e

    def still_listed(client: httpx.Client) -> list[dict[str, Any]]:
        return [q for q in client.get("/v1/sql/active").json()["queries"] if q["sql_preview"] == sql_text]

    thread = threading.Thread(target=other_client, daemon=True)
    thread.start()
    try:
        out = setup.sdk({"call": "listActive", "sqlPreview": sql_text},
                        {"call": "cancelActive", "sqlPreview": sql_text})
    finally:
        if thread.is_alive():  # the SDK did not cancel it: stop the work before failing
            with setup.http() as client:
                for q in still_listed(client):
                    client.post(f"/v1/sql/{q['query_id']}/cancel")
        thread.join(30)
    listed, found = out["results"]
    query_id = listed["listed"]["query_id"]
    assert listed["listed"]["protocol"] == "http" and listed["listed"]["sql_preview"] == sql_text
    assert found["listed"] == listed["listed"]
    assert found["cancelled"] == {"query_id": query_id, "status": "cancelled"}
    response = answer.get("response")
    assert response is not None, f"the other client got no answer: {answer.get('error')!r}"
    assert (response.status_code, response.text) == (499, f"Query {query_id} was cancelled")
    with setup.http() as client:
        wait_for(lambda: not still_listed(client), timeout=10)
    out = setup.sdk({"call": "listActive"}, {"call": "cancelActive", "queryId": query_id, "continueOnError": True},
                    check=False)
    assert sql_text not in [q["sql_preview"] for q in out["results"][0]["queries"]]
    assert out["results"][1]["error"] == (f"No active query '{query_id}' found. It may have already finished, "
                                          "or it was submitted by a different client.")


# ------------------------------------------------------------------ refusals


def refused(setup: Setup, **connection: Any) -> list[tuple[Any, str]]:
    """The SDK's Flight `sql()`, HTTP `sqlJson()` and `listActiveQueries()` with these connection
    options overriding the configuration's; every one must fail."""
    steps = [{"call": call, "query": "SELECT 1 AS one", "continueOnError": True} for call in ("sql", "sqlJson")]
    job = {**setup.connection(), **connection, "steps": [*steps, {"call": "listActive", "continueOnError": True}]}
    out = run_sdk({k: v for k, v in job.items() if v is not None}, 30, check=False)
    assert not out["ok"] and out["exit_code"] == 1, out
    return errors(out)


def test_the_configurations_refusal(setup: Setup) -> None:
    if setup.name == "plaintext":
        # A TLS client gets nothing from the plaintext listeners.
        https = setup.rt.http_url.replace("http://", "https://")
        (flight_code, _), (_, sql_json), (_, listing) = refused(
            setup, flightTlsEnabled=True, tlsRootCertFile=str(setup.pki.ca.cert), httpUrl=https)
        assert flight_code == 14
        assert "EPROTO" in sql_json and "EPROTO" in listing, (sql_json, listing)
        return
    # Without the CA: Flight fails the handshake (UNAVAILABLE), HTTPS does not trust the server.
    (flight_code, flight_error), (_, sql_json), (_, listing) = refused(setup, tlsRootCertFile=None)
    assert flight_code == 14, flight_error
    url = setup.rt.http_url
    assert sql_json == f"request to {url}/v1/sql failed, reason: unable to verify the first certificate"
    assert listing == f"request to {url}/v1/sql/active failed, reason: unable to verify the first certificate"
    if setup.name == "tls_api_key":
        for key in ("wrong", None):
            (flight_code, flight_error), (_, sql_json), (_, listing) = refused(setup, apiKey=key)
            assert flight_code == 16, f"expected UNAUTHENTICATED (16), got: {flight_error}"
            assert sql_json.startswith("HTTP query failed with status 401: "), sql_json
            assert listing.startswith("Failed to list active queries: 401 Unauthorized"), listing
        out = run_sdk({**setup.connection(), "apiKey": "wrong",
                       "steps": [{"call": "refresh", "dataset": "rides"}]}, 30, check=False)
        assert not out["ok"] and "Failed to refresh dataset 'rides': 401 Unauthorized" in out["error"], out["error"]
    if setup.name == "mtls":
        # A client certificate the client CA did not sign is refused at the handshake.
        foreign = {"tlsClientCertFile": str(setup.pki.foreign_client.cert),
                   "tlsClientKeyFile": str(setup.pki.foreign_client.key)}
        out = run_sdk({**setup.connection(), **foreign, "steps": [{"call": "sql", "query": "SELECT 1"}]}, 30,
                      check=False)
        assert not out["ok"] and out["code"] == 14, out["error"]
    # and the configuration still serves a proper client
    assert rows(setup.sdk({"call": "sql", "query": "SELECT 1 AS one"})) == [[{"one": 1}]]


# ------------------------------------------------------------------ the SDK's limit: no client certificate over HTTP


def test_required_client_auth_serves_flight_but_not_the_sdks_http(pki: Pki, tmp_path: Path) -> None:
    """Under client_auth_mode=required the SDK's Flight calls present the certificate and are served;
    its HTTP calls cannot present one (module docstring) and are answered 401."""
    ensure_installed()
    with run_spiced(write_workdir(tmp_path, api_key=False), *tls_args(pki, "required")) as rt:
        setup = Setup("mtls", rt, pki, tmp_path)
        out = setup.sdk(
            {"call": "sql", "query": "SELECT city, fare FROM trips ORDER BY id"},
            {"call": "sql", "query": "SELECT city FROM trips WHERE id = $1", "parameters": [2]},
            {"call": "sqlJson", "query": "SELECT 1 AS one", "continueOnError": True},
            {"call": "sqlHttp", "query": "SELECT 1 AS one", "continueOnError": True},
            {"call": "listActive", "continueOnError": True},
            {"call": "refresh", "dataset": "rides", "continueOnError": True},
            check=False)
        flight, params, sql_json, sql_http, listing, refresh = out["results"]
        assert flight["rows"] == TRIP_CITIES and params["rows"] == [{"city": "Portland"}]
        assert sql_json["error"] == sql_http["error"] == f"HTTP query failed with status 401: {CERT_REQUIRED}"
        assert listing["error"] == f"Failed to list active queries: 401 Unauthorized - {CERT_REQUIRED}"
        assert refresh["error"] == f"Failed to refresh dataset 'rides': 401 Unauthorized - {CERT_REQUIRED}"

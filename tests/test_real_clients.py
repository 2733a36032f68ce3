"""Clients nobody on this team wrote, against the real `spiced` on every TLS listener (HTTP, Flight,
metrics) in client_auth_mode none, request and required: the ADBC Flight SQL driver (Go), pyarrow
Flight, the official Spice.ai JavaScript SDK (tests/js), curl over HTTP/1.1 and HTTP/2,
`openssl s_client`, and Python's ssl module closing with unwrap().

Each client connects, queries and closes ROUNDS times, each time on a new connection, closing the
way that client closes (ADBC's Go driver, s_client and unwrap() send close_notify; the SDK leaves its
channels to the process's end). Then `FrontHealth.check()` proves a fresh pyarrow client is still
served and the Flight TLS front is the same process, idle, and holds no more descriptors or memory;
for the HTTP and metrics listeners a fresh curl must be served too.

Every call has a deadline (CALL_TIMEOUT): a wedged front fails a test within seconds, never hangs it.
A test that fails marks its runtime poisoned: the next test gets a fresh one (its wedged front
killed), so one failure does not cascade through the rest of the matrix.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import adbc_driver_flightsql
import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import psutil
import pyarrow.flight as fl
import pytest

from tests import front_health
from tests.front_health import FrontHealth, front_process
from tests.jsclient import run_sdk, steps
from tests.pki import Issued, Pki
from tests.support import BASIC_SPICEPOD, Runtime, run_spiced, write_pod

MODES = ("none", "request", "required")
ROUNDS = 3
CALL_TIMEOUT = 5.0  # seconds any one client call may take
QUERIES: list[tuple[str, list[dict[str, Any]]]] = [
    ("SELECT 1 AS one", [{"one": 1}]),
    ("SELECT count(*) AS n FROM trips", [{"n": 3}]),
]
COUNT_SQL = QUERIES[1][0]
CERT_REQUIRED = '{"message":"Valid client TLS certificate required"}'

# (mode, does the client present a certificate?) for every client. In `required` mode an anonymous
# client is refused by Flight at the handshake and answered 401 by HTTP /v1/sql.
SERVED = [("none", False), ("request", False), ("request", True), ("required", True)]
ALL = [*SERVED, ("required", False)]


def case_id(mode: str, with_cert: bool) -> str:
    return f"{mode}-{'client_cert' if with_cert else 'anonymous'}"


def cases(pairs: list[tuple[str, bool]]) -> list[Any]:
    return [pytest.param(mode, with_cert, id=case_id(mode, with_cert)) for mode, with_cert in pairs]


# ------------------------------------------------------------------ runtimes, one per mode, shared


def tls_args(pki: Pki, mode: str) -> list[str]:
    args = ["--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert), "--tls-key-file",
            str(pki.server.key), "--tls-client-auth-mode", mode]
    if mode != "none":
        args += ["--tls-client-auth-ca-file", str(pki.client_ca.cert)]
    return args


@dataclass
class Stand:
    """A runtime in one client_auth_mode and the baseline health of its Flight TLS front. Started on
    first use; restarted when a test that used it failed (its front may be wedged)."""

    mode: str
    pki: Pki
    root: Path
    spicepod: str | None = None
    rt: Runtime | None = None
    health: FrontHealth | None = None
    poisoned: bool = False
    _front_pid: int | None = None
    _stack: contextlib.ExitStack | None = None
    _starts: int = 0

    @property
    def runtime(self) -> Runtime:
        assert self.rt is not None
        return self.rt

    def ensure(self) -> None:
        if self.rt is not None and (self.poisoned or self.rt.proc.poll() is not None):
            self.stop()
        if self.rt is None:
            self._start()

    def _start(self) -> None:
        self._starts += 1
        workdir = self.root / f"run{self._starts}"
        write_pod(workdir, self.spicepod or BASIC_SPICEPOD)
        stack = contextlib.ExitStack()
        try:
            self.rt = stack.enter_context(run_spiced(workdir, *tls_args(self.pki, self.mode), metrics=True))
            self._front_pid = front_process(self.rt).pid
            if self.spicepod is None:  # FrontHealth's probe carries no API key
                self.health = FrontHealth.of(self.rt, self.pki, client_cert=self.mode == "required")
        except BaseException:
            stack.close()
            self.rt = None
            raise
        self._stack = stack
        self.poisoned = False

    def stop(self) -> None:
        rt, front, stack = self.rt, self._front_pid, self._stack
        self.rt, self.health, self._front_pid, self._stack = None, None, None, None
        try:
            if self.poisoned and rt is not None:
                _kill_runtime(rt)  # no graceful shutdown to wait for: its front may be wedged
            if stack is not None:
                stack.close()
        finally:
            _kill_fronts([front])  # a wedged front ignores SIGTERM and may outlive its runtime


def _fronts_of(rt: Runtime) -> list[int]:
    with contextlib.suppress(psutil.Error):
        return [c.pid for c in psutil.Process(rt.proc.pid).children()
                if "spiced.flight.front_process" in c.cmdline()]
    return []


def _kill_runtime(rt: Runtime) -> None:
    fronts = _fronts_of(rt)  # before the runtime dies: its children are ours to find only until then
    rt.proc.kill()
    rt.proc.wait(10)
    _kill_fronts(fronts)


def _kill_fronts(pids: list[int | None]) -> None:
    """Kill our runtime's Flight TLS front processes, by pid, if they are still there."""
    for pid in pids:
        if pid is None:
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if "spiced.flight.front_process" in proc.cmdline():
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="module")
def stands(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stand]]:
    made = {mode: Stand(mode, pki, tmp_path_factory.mktemp(f"rt-{mode}")) for mode in MODES}
    yield made
    for stand in made.values():
        stand.stop()


@contextlib.contextmanager
def _poisoned_on_failure(stand: Stand, request: pytest.FixtureRequest) -> Iterator[Stand]:
    stand.ensure()
    failed = request.session.testsfailed
    yield stand
    if request.session.testsfailed > failed:  # the call's report is in before fixtures are torn down
        stand.poisoned = True


@pytest.fixture
def stand(request: pytest.FixtureRequest, stands: dict[str, Stand]) -> Iterator[Stand]:
    """The runtime for the test's `mode` (its first parameter, given indirectly)."""
    with _poisoned_on_failure(stands[request.param], request) as s:
        yield s


def check_healthy(stand: Stand, what: str, *, listeners: tuple[str, ...] = ()) -> None:
    """The Flight TLS front is healthy after `what`; a fresh curl is served on each listener named."""
    assert stand.health is not None
    stand.health.check(what)
    for listener in listeners:
        path = "/health" if listener == "http" else "/metrics"
        answer = curl(stand, listener, path, with_cert=stand.mode == "required")
        assert answer.status == 200, f"a fresh curl to the {listener} listener after {what}: {answer}"


# ------------------------------------------------------------------ helpers per client


def client_cert(pki: Pki, with_cert: bool) -> Issued | None:
    return pki.client if with_cert else None


def address(rt: Runtime, listener: str) -> tuple[str, int]:
    host, port = rt.addresses[listener].rsplit(":", 1)
    return host, int(port)


def adbc_kwargs(pki: Pki, cert: Issued | None) -> dict[str, str]:
    opts = adbc_driver_flightsql.DatabaseOptions
    kwargs = {opts.TLS_ROOT_CERTS.value: pki.ca.cert.read_text(),
              opts.TIMEOUT_QUERY.value: str(CALL_TIMEOUT), opts.TIMEOUT_FETCH.value: str(CALL_TIMEOUT),
              opts.TIMEOUT_UPDATE.value: str(CALL_TIMEOUT)}
    if cert is not None:
        kwargs[opts.MTLS_CERT_CHAIN.value] = cert.cert.read_text()
        kwargs[opts.MTLS_PRIVATE_KEY.value] = cert.key.read_text()
    return kwargs


def adbc_round(rt: Runtime, kwargs: dict[str, str]) -> None:
    """Connect, query, prepare and run a statement twice, close (the Go driver sends close_notify)."""
    with flightsql.connect(rt.flight_uri, db_kwargs=kwargs, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 AS one")
        assert cur.fetchall() == [(1,)]
        cur.adbc_prepare(COUNT_SQL)
        for _ in range(2):  # the prepared statement, executed twice
            cur.execute(COUNT_SQL)
            assert cur.fetchall() == [(3,)]


def pyarrow_client(rt: Runtime, pki: Pki, cert: Issued | None) -> fl.FlightClient:
    kwargs = {"cert_chain": cert.cert_pem, "private_key": cert.key_pem} if cert else {}
    return fl.FlightClient(rt.flight_uri, tls_root_certs=pki.ca.cert_pem, **kwargs)


def sdk_job(stand: Stand, with_cert: bool, calls: list[str], queries: list[str] | None = None,
            **extra: Any) -> dict[str, Any]:
    """Every call on every query (QUERIES by default), ROUNDS times, each step on a new SpiceClient.
    run_sdk hands tlsRootCertFile to Node as NODE_EXTRA_CA_CERTS for the SDK's HTTPS agent."""
    rt, pki = stand.runtime, stand.pki
    queries = [q for q, _ in QUERIES] if queries is None else queries
    job: dict[str, Any] = {"flightUrl": rt.addresses["flight"], "httpUrl": rt.http_url, "flightTlsEnabled": True,
                           "tlsRootCertFile": str(pki.ca.cert), "repeat": ROUNDS,
                           "steps": [step for call in calls for step in steps(call, queries)]}
    if with_cert:
        job |= {"tlsClientCertFile": str(pki.client.cert), "tlsClientKeyFile": str(pki.client.key)}
    return job | extra


SQL_V1_JSON_HINT = ("; sqlJson() sends Accept: application/vnd.spiceai.sql.v1+json and reads the rows from the "
                    "`data` of {row_count, schema, data, execution_time_ms}: an answer that is a bare JSON array "
                    "reads as no rows")


def sdk_rows(out: dict[str, Any], call: str) -> list[list[dict[str, Any]]]:
    """Every round's rows per query, checked against QUERIES."""
    results = [r for r in out["results"] if r["call"] == call]
    assert len(results) == ROUNDS * len(QUERIES), out["results"]
    for r in results:
        expected = dict(QUERIES)[r["query"]]
        hint = SQL_V1_JSON_HINT if call == "sqlJson" else ""
        assert r["rows"] == expected, f"{call}() round {r['round']} {r['query']!r}: {r['rows']} != {expected}{hint}"
    return [r["rows"] for r in results]


@dataclass
class Answer:
    status: int  # 0: no HTTP answer (TLS or connection failure)
    body: str
    version: str
    error: str

    def __str__(self) -> str:
        body = self.body if len(self.body) < 300 else self.body[:300] + "..."
        return f"HTTP {self.status} (HTTP/{self.version}) {body!r} {self.error}".strip()


def curl(stand: Stand, listener: str, path: str, *, with_cert: bool, http2: bool = False,
         sql: str | None = None) -> Answer:
    """One request on a new connection, with the server's CA (and the client certificate if asked)."""
    pki = stand.pki
    host, port = address(stand.runtime, listener)
    cmd = ["curl", "-sS", "--max-time", str(CALL_TIMEOUT), "--cacert", str(pki.ca.cert),
           "--http2" if http2 else "--http1.1", "-w", "\n%{http_code} %{http_version}"]
    if with_cert:
        cmd += ["--cert", str(pki.client.cert), "--key", str(pki.client.key)]
    if sql is not None:
        cmd += ["--data-binary", sql]
    done = subprocess.run([*cmd, f"https://{host}:{port}{path}"], capture_output=True, text=True,
                          timeout=CALL_TIMEOUT + 5, check=False)
    body, _, tail = done.stdout.rpartition("\n")
    code, _, version = tail.partition(" ")
    return Answer(int(code) if done.returncode == 0 and code.isdigit() else 0, body, version, done.stderr.strip())


# ------------------------------------------------------------------ ADBC Flight SQL driver (Go)


@pytest.mark.parametrize(("stand", "with_cert"), cases(SERVED), indirect=["stand"])
def test_adbc_flight_sql_connects_queries_prepares_and_closes(stand: Stand, with_cert: bool) -> None:
    kwargs = adbc_kwargs(stand.pki, client_cert(stand.pki, with_cert))
    for i in range(ROUNDS):
        try:
            adbc_round(stand.runtime, kwargs)
        except adbc_driver_manager.Error as e:
            raise AssertionError(f"ADBC connection {i + 1} of {ROUNDS} failed: {e}") from None
    check_healthy(stand, f"{ROUNDS} ADBC connections closed by the Go driver")


@pytest.mark.parametrize("stand", ["required"], indirect=True)
def test_adbc_flight_sql_without_client_cert_is_refused_in_required_mode(stand: Stand) -> None:
    kwargs = adbc_kwargs(stand.pki, None)
    for _ in range(ROUNDS):
        start = time.monotonic()
        with pytest.raises(adbc_driver_manager.Error) as info:
            adbc_round(stand.runtime, kwargs)
        assert "Unavailable" in str(info.value) and "DeadlineExceeded" not in str(info.value), (
            f"expected UNAVAILABLE at the handshake, got: {info.value}")
        assert time.monotonic() - start < CALL_TIMEOUT, "the refusal waited for the client's deadline"
    check_healthy(stand, f"{ROUNDS} ADBC connections refused without a client certificate")


# ------------------------------------------------------------------ pyarrow Flight


@pytest.mark.parametrize(("stand", "with_cert"), cases(SERVED), indirect=["stand"])
def test_pyarrow_flight_do_get_and_close(stand: Stand, with_cert: bool) -> None:
    for _ in range(ROUNDS):
        client = pyarrow_client(stand.runtime, stand.pki, client_cert(stand.pki, with_cert))
        try:
            for sql, rows in QUERIES:
                table = client.do_get(fl.Ticket(sql.encode()), fl.FlightCallOptions(timeout=CALL_TIMEOUT)).read_all()
                assert table.to_pylist() == rows
        finally:
            client.close()
    check_healthy(stand, f"{ROUNDS} pyarrow Flight clients closed")


@pytest.mark.parametrize("stand", ["required"], indirect=True)
def test_pyarrow_flight_without_client_cert_is_refused_in_required_mode(stand: Stand) -> None:
    for _ in range(ROUNDS):
        client = pyarrow_client(stand.runtime, stand.pki, None)
        try:
            with pytest.raises(fl.FlightUnavailableError):
                client.do_get(fl.Ticket(b"SELECT 1"), fl.FlightCallOptions(timeout=CALL_TIMEOUT)).read_all()
        finally:
            client.close()
    check_healthy(stand, f"{ROUNDS} pyarrow Flight clients refused without a client certificate")


# ------------------------------------------------------------------ the Spice.ai JavaScript SDK


@pytest.mark.parametrize(("stand", "with_cert"), cases(SERVED), indirect=["stand"])
def test_js_sdk_sql_over_flight_tls(stand: Stand, with_cert: bool) -> None:
    """`sql()` over Arrow Flight with tlsRootCertFile + flightTlsEnabled (and the client certificate
    options for mTLS), a new SpiceClient for each round and query."""
    out = run_sdk(sdk_job(stand, with_cert, ["sql"]), timeout=30)
    sdk_rows(out, "sql")
    check_healthy(stand, f"{ROUNDS} rounds of the JavaScript SDK over Flight")


@pytest.mark.parametrize("stand", ["required"], indirect=True)
def test_js_sdk_sql_over_flight_without_client_cert_is_refused_in_required_mode(stand: Stand) -> None:
    for _ in range(ROUNDS):
        out = run_sdk(sdk_job(stand, False, ["sql"], ["SELECT 1 AS one"], repeat=1, maxRetries=0),
                      timeout=15, check=False)
        assert not out["ok"], "Flight served the SDK without a client certificate in required mode"
        assert out["code"] == 14, f"expected UNAVAILABLE (14) at the handshake, got: {out['error']}"
    check_healthy(stand, f"{ROUNDS} JavaScript SDK clients refused without a client certificate")


@pytest.mark.parametrize("call", ["sqlHttp", "sqlJson"])
@pytest.mark.parametrize("stand", MODES, indirect=True)
def test_js_sdk_over_https(stand: Stand, call: str) -> None:
    """`sql()` (sqlHttp) and `sqlJson()` over HTTP only. The SDK's HTTPS agent ignores tlsRootCertFile
    and has no client certificate option, so the CA comes from NODE_EXTRA_CA_CERTS (run_sdk sets it
    from tlsRootCertFile) and the SDK is always anonymous here: served in none/request, answered 401
    by /v1/sql in required."""
    if stand.mode == "required":
        for _ in range(ROUNDS):
            out = run_sdk(sdk_job(stand, False, [call], repeat=1), timeout=20, check=False)
            assert not out["ok"] and "status 401" in out["error"] and CERT_REQUIRED in out["error"], out["error"]
    else:
        sdk_rows(run_sdk(sdk_job(stand, False, [call]), timeout=30), call)
    check_healthy(stand, f"{ROUNDS} rounds of the JavaScript SDK's {call}() over HTTPS", listeners=("http",))


API_KEY = "k-real-clients-123"
API_KEY_POD = f"""version: v1
kind: Spicepod
name: keys
runtime:
  auth:
    api-key:
      enabled: true
      keys: ["{API_KEY}"]
datasets:
  - from: file:trips.csv
    name: trips
"""


@pytest.fixture(scope="module")
def keyed_stand(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    """A TLS runtime (mode none) whose spicepod requires an API key."""
    stand = Stand("none", pki, tmp_path_factory.mktemp("rt-keyed"), spicepod=API_KEY_POD)
    yield stand
    stand.stop()


@pytest.fixture
def keyed(keyed_stand: Stand, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stand]:
    with _poisoned_on_failure(keyed_stand, request) as stand:
        # FrontHealth's probe sends no API key: the keyed runtime's probe is the same call with the key.
        def served_with_key(rt: Runtime, pki: Pki, *, client_cert: bool = False) -> None:
            assert not client_cert
            client = fl.FlightClient(rt.flight_uri, tls_root_certs=pki.ca.cert_pem)
            try:
                options = fl.FlightCallOptions(timeout=10, headers=[(b"authorization", f"Bearer {API_KEY}".encode())])
                assert client.do_get(fl.Ticket(b"SELECT 1 AS one"), options).read_all().to_pylist() == [{"one": 1}]
            finally:
                client.close()

        monkeypatch.setattr(front_health, "served", served_with_key)
        if stand.health is None:
            stand.health = FrontHealth.of(stand.runtime, stand.pki)
        yield stand


def test_js_sdk_api_key_is_sent_over_flight_and_https(keyed: Stand) -> None:
    job = sdk_job(keyed, False, ["sql", "sqlHttp"], apiKey=API_KEY)
    out = run_sdk(job, timeout=30)
    sdk_rows(out, "sql")
    sdk_rows(out, "sqlHttp")
    check_healthy(keyed, f"{ROUNDS} rounds of the JavaScript SDK with an API key", listeners=("http",))


@pytest.mark.parametrize("call", ["sql", "sqlHttp"])
def test_js_sdk_wrong_api_key_is_refused(keyed: Stand, call: str) -> None:
    job = sdk_job(keyed, False, [call], apiKey="wrong", repeat=1, maxRetries=0)
    out = run_sdk(job, timeout=20, check=False)
    assert not out["ok"]
    if call == "sql":
        assert out["code"] == 16, f"expected UNAUTHENTICATED (16), got: {out['error']}"
    else:
        assert "status 401" in out["error"], out["error"]
    check_healthy(keyed, f"the JavaScript SDK refused with a wrong API key ({call})", listeners=("http",))


# ------------------------------------------------------------------ curl, HTTP/1.1 and HTTP/2


def expected_http(listener: str, path: str, mode: str, with_cert: bool) -> tuple[int, str, str]:
    """(status, how the body is checked: "exact" / "line" (a line starting with) / "any", text)."""
    if listener == "metrics":  # the metrics listener serves /metrics and a probe, nothing else
        return {"/v1/sql": (404, "any", ""), "/health": (200, "exact", "OK"),
                "/metrics": (200, "line", "# TYPE http_requests_total counter")}[path]
    if path == "/v1/sql":
        return (401, "exact", CERT_REQUIRED) if mode == "required" and not with_cert else (200, "exact", '[{"one":1}]')
    return {"/health": (200, "exact", "ok\n"), "/metrics": (200, "line", "# TYPE http_requests_total counter")}[path]


def body_matches(how: str, text: str, body: str) -> bool:
    if how == "exact":
        return body == text
    if how == "line":
        return any(line.startswith(text) for line in body.splitlines())
    return True


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
@pytest.mark.parametrize(("stand", "with_cert"), cases(ALL), indirect=["stand"])
def test_curl_serves_sql_probes_and_metrics_on_both_listeners(stand: Stand, with_cert: bool, http2: bool) -> None:
    version = "2" if http2 else "1.1"
    for _ in range(ROUNDS):
        for listener in ("http", "metrics"):
            for path in ("/v1/sql", "/health", "/metrics"):
                sql = "SELECT 1 AS one" if path == "/v1/sql" else None
                answer = curl(stand, listener, path, with_cert=with_cert, http2=http2, sql=sql)
                status, how, text = expected_http(listener, path, stand.mode, with_cert)
                where = f"{listener} listener {path} over HTTP/{version}"
                assert answer.status == status, f"{where}: {answer}"
                assert body_matches(how, text, answer.body), f"{where}: body {how} {text!r} expected; {answer}"
                negotiated = version if listener == "http" else "1.1"  # metrics offers only http/1.1 (ALPN)
                assert answer.version == negotiated, f"{where} negotiated HTTP/{answer.version}"
    check_healthy(stand, f"{ROUNDS} rounds of curl over HTTP/{version}", listeners=("http", "metrics"))


# ------------------------------------------------------------------ openssl s_client


LISTENER_ALPN = {"flight": "h2", "http": "http/1.1", "metrics": "http/1.1"}


def tls_cases() -> list[Any]:
    """(listener, mode, with_cert) a handshake must succeed for: Flight refuses only an anonymous client
    in required mode; the HTTP listener takes it (and answers 401 on /v1/sql); metrics never asks."""
    return [pytest.param(listener, mode, with_cert, id=f"{listener}-{case_id(mode, with_cert)}")
            for listener in LISTENER_ALPN for mode, with_cert in (SERVED if listener == "flight" else ALL)]


@dataclass
class SClient:
    returncode: int
    output: str
    ended_by_itself: bool  # it exited before we closed its stdin (an error, or the server closed)
    stuck: bool  # still running CALL_TIMEOUT after its stdin closed (killed): the handshake never finished


def s_client(stand: Stand, listener: str, with_cert: bool, *, hold: float) -> SClient:
    """`openssl s_client` with the server's CA and ALPN; stdin held open `hold` seconds (so what the
    server sends after the handshake is read), then closed: s_client sends close_notify and exits."""
    host, port = address(stand.runtime, listener)
    cmd = ["openssl", "s_client", "-connect", f"{host}:{port}", "-servername", "localhost", "-alpn",
           LISTENER_ALPN[listener], "-CAfile", str(stand.pki.ca.cert), "-verify_return_error"]
    if with_cert:
        cmd += ["-cert", str(stand.pki.client.cert), "-key", str(stand.pki.client.key)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        try:
            proc.wait(hold)
            ended = True
        except subprocess.TimeoutExpired:
            ended = False
        try:
            out, _ = proc.communicate(b"", timeout=CALL_TIMEOUT)
            stuck = False
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            stuck = True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return SClient(proc.returncode, out.decode(errors="replace"), ended, stuck)


@pytest.mark.parametrize(("listener", "stand", "with_cert"), tls_cases(), indirect=["stand"])
def test_openssl_s_client_verifies_negotiates_alpn_and_closes(listener: str, stand: Stand, with_cert: bool) -> None:
    for i in range(ROUNDS):
        done = s_client(stand, listener, with_cert, hold=0.3)
        assert not done.stuck, (f"s_client {i + 1} of {ROUNDS} to {listener} was still running {CALL_TIMEOUT} s after "
                                f"its stdin closed (handshake never finished):\n{done.output[-1500:]}")
        assert "Verify return code: 0 (ok)" in done.output, done.output[-1500:]
        assert f"ALPN protocol: {LISTENER_ALPN[listener]}" in done.output, done.output[-1500:]
        asked = stand.mode != "none" and listener != "metrics"  # metrics never asks for a certificate
        assert ("Requested Signature Algorithms" in done.output) == asked, (
            f"{listener} in mode {stand.mode} {'did not ask' if asked else 'asked'} for a client certificate")
        assert not done.ended_by_itself and done.returncode == 0, (
            f"s_client {i + 1}: the connection ended before the client closed it:\n{done.output[-1500:]}")
    health_listeners = () if listener == "flight" else (listener,)
    check_healthy(stand, f"{ROUNDS} openssl s_client connections to {listener} closed with close_notify",
                  listeners=health_listeners)


@pytest.mark.parametrize("stand", ["required"], indirect=True)
def test_openssl_s_client_without_client_cert_is_refused_by_flight_in_required_mode(stand: Stand) -> None:
    for _ in range(ROUNDS):
        done = s_client(stand, "flight", False, hold=CALL_TIMEOUT)
        assert not done.stuck, f"s_client never finished its handshake with Flight:\n{done.output[-1500:]}"
        assert done.ended_by_itself and done.returncode != 0, (
            f"Flight kept the anonymous client:\n{done.output[-1500:]}")
        errors = [line for line in done.output.splitlines() if ":error:" in line]
        assert any("alert certificate required" in line for line in errors), (
            f"Flight dropped the connection without the certificate_required alert (RFC 8446 4.4.2.4: the server "
            f"MUST abort the handshake with it); s_client says: {errors}")
    check_healthy(stand, f"{ROUNDS} openssl s_client connections refused by Flight")


# ------------------------------------------------------------------ Python ssl, closed with unwrap()


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS, H2_ACK = 0x4, 0x1
H2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2_SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def ssl_context(pki: Pki, listener: str, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    if with_cert:
        ctx.load_cert_chain(pki.client.cert, pki.client.key)
    ctx.set_alpn_protocols([LISTENER_ALPN[listener]])
    return ctx


def recv_some(tls: ssl.SSLSocket, have: bytes, what: str) -> bytes:
    chunk = tls.recv(65536)
    if not chunk:
        raise ConnectionError(f"the server closed while we waited for {what} (after {have[:80]!r})")
    return have + chunk


def read_http_response(tls: ssl.SSLSocket) -> tuple[str, bytes]:
    """(status line, body) of one HTTP/1.1 response with a Content-Length, read to its last byte."""
    data = b""
    while b"\r\n\r\n" not in data:
        data = recv_some(tls, data, "the response head")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length")
    while len(body) < length:
        body = recv_some(tls, body, "the response body")
    return lines[0], body


def h2_handshake(tls: ssl.SSLSocket) -> None:
    """HTTP/2's connection preface both ways: ours plus empty SETTINGS; the server's SETTINGS, which we
    acknowledge, and its ACK of ours. Frames are read whole; the first must be SETTINGS."""
    tls.sendall(H2_PREFACE + H2_EMPTY_SETTINGS)
    data, first, settings, acked = b"", None, False, False
    while not (settings and acked):
        while len(data) < 9 or len(data) < 9 + int.from_bytes(data[:3], "big"):
            data = recv_some(tls, data, "the server's HTTP/2 SETTINGS")
        length, kind, flags = int.from_bytes(data[:3], "big"), data[3], data[4]
        first = kind if first is None else first
        assert first == H2_SETTINGS, f"the server's first HTTP/2 frame is type {first}, not SETTINGS"
        if kind == H2_SETTINGS and flags & H2_ACK:
            acked = True
        elif kind == H2_SETTINGS:
            settings = True
            tls.sendall(H2_SETTINGS_ACK)
        data = data[9 + length:]


def close_notify(tls: ssl.SSLSocket, listener: str) -> None:
    """unwrap(): our close_notify, then the server's in answer. Frames the server already had on the
    way (an h2 WINDOW_UPDATE or PING) are read and dropped until its close_notify comes."""
    try:
        tls.unwrap()
        return
    except ssl.SSLError as e:
        if "APPLICATION_DATA_AFTER_CLOSE_NOTIFY" not in str(e):
            raise AssertionError(f"unwrap() on {listener}: {e!r}") from None
    except OSError as e:
        raise AssertionError(f"unwrap() on {listener}: the server did not answer close_notify: {e!r}") from None
    try:
        while tls.recv(65536):
            pass
    except ssl.SSLZeroReturnError:  # its close_notify
        return
    except OSError as e:
        raise AssertionError(f"after close_notify on {listener}: "
                             f"the server did not answer with its own: {e!r}") from None


def ssl_round(stand: Stand, listener: str, with_cert: bool) -> None:
    """Handshake, one real exchange, then unwrap(): our close_notify, and the server's in answer."""
    host, port = address(stand.runtime, listener)
    ctx = ssl_context(stand.pki, listener, with_cert)
    with socket.create_connection((host, port), timeout=CALL_TIMEOUT) as raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
        except TimeoutError:
            raise AssertionError(f"the TLS handshake with {listener} did not finish within {CALL_TIMEOUT} s") from None
        try:
            assert tls.selected_alpn_protocol() == LISTENER_ALPN[listener]
            if listener == "flight":
                h2_handshake(tls)
            else:
                path = "/health" if listener == "http" else "/metrics"
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: python-ssl\r\n\r\n".encode())
                status, _ = read_http_response(tls)
                assert status.startswith("HTTP/1.1 200"), status
            close_notify(tls, listener)
        finally:
            tls.close()


@pytest.mark.parametrize(("listener", "stand", "with_cert"), tls_cases(), indirect=["stand"])
def test_python_ssl_exchange_then_unwrap(listener: str, stand: Stand, with_cert: bool) -> None:
    for _ in range(ROUNDS):
        ssl_round(stand, listener, with_cert)
    health_listeners = () if listener == "flight" else (listener,)
    check_healthy(stand, f"{ROUNDS} Python ssl connections to {listener} closed with unwrap()",
                  listeners=health_listeners)


def flight_refusal(stand: Stand) -> BaseException | None:
    """What an anonymous Python ssl client gets from Flight: None if it is served an HTTP/2 preface."""
    host, port = address(stand.runtime, "flight")
    with socket.create_connection((host, port), timeout=CALL_TIMEOUT) as raw:
        try:
            # TLS 1.3: the client's handshake ends before the server has looked at its certificate;
            # the refusal (a certificate_required alert) is what the first read gets.
            with ssl_context(stand.pki, "flight", False).wrap_socket(raw, server_hostname="localhost") as tls:
                h2_handshake(tls)
        except (ssl.SSLError, OSError) as e:
            return e
    return None


@pytest.mark.parametrize("stand", ["required"], indirect=True)
def test_python_ssl_without_client_cert_is_refused_by_flight_in_required_mode(stand: Stand) -> None:
    for _ in range(ROUNDS):
        error = flight_refusal(stand)
        assert error is not None, "Flight served an anonymous client in required mode"
        assert not isinstance(error, TimeoutError), f"Flight neither served nor refused within {CALL_TIMEOUT} s"
        assert "CERTIFICATE_REQUIRED" in str(error).upper(), (
            f"Flight dropped the connection without the certificate_required alert (RFC 8446 4.4.2.4: the server "
            f"MUST abort the handshake with it); the client got: {error!r}")
    check_healthy(stand, f"{ROUNDS} Python ssl clients refused by Flight without a certificate")

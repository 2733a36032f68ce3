"""spiced/tracker.py, spiced/flight/results.py, spiced/http/sql.py, the access log: how a query's end
is reported, the same way on every protocol, against the real `spiced` process.

- one `err_code` for one failure whether it came over HTTP, Flight raw SQL or Flight SQL (parsed
  from /metrics with prometheus_client);
- exactly one WARN line per failed query, with the verified client identity under mTLS;
- the opt-in INFO access log (`--access-log`, `runtime.access_log: true`), and its absence by default;
- a raw-SQL GetFlightInfo whose SQL does not plan ends, at the DoGet of its ticket, in
  INVALID_ARGUMENT with the bare DataFusion message.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.flight as fl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spiced.flight import flight_sql_pb2 as pb
from spiced.flight import sql
from tests.pki import Pki
from tests.query_rig import ENDLESS, assert_stopped, find, flight_read, flight_ticket, long_sql
from tests.support import Runtime, run_spiced, write_pod
from tests.tlsprobe import wait_for

PROTOCOLS = ("http", "flight", "flightsql")
FAILURES = [  # SQL, err_code (upstream's vocabulary, spiced/tracker.py)
    ("SELEC 1", "SyntaxError"),
    ("SELECT * FROM nope", "QueryPlanningError"),
    ("SELECT nope FROM trips", "QueryPlanningError"),  # a Schema error
    ("SELECT range(1, 10, 0)", "QueryExecutionError"),
    ("SELECT 10 / (value - 5) AS x FROM generate_series(1, 10)", "InternalError"),  # an Arrow error
    ("SELECT 1; SELECT 2", "InternalError"),  # NotImplemented
]


def metric_failures(text: str) -> dict[tuple[str, str], float]:
    return {(s.labels["protocol"], s.labels["err_code"]): s.value for family in text_string_to_metric_families(text)
            if family.name == "query_failures" for s in family.samples if s.name == "query_failures_total"}


def failures(rt: Runtime, client: httpx.Client | None = None) -> dict[tuple[str, str], float]:
    get = client.get if client is not None else httpx.get
    return metric_failures(get(rt.http_url + "/metrics").text)


def run_failing(rt: Runtime, sql_text: str, protocol: str, *, http: httpx.Client | None = None,
                flight: fl.FlightClient | None = None) -> BaseException | httpx.Response:
    """Run `sql_text`, expecting it to fail; the HTTP response or the Flight error."""
    if protocol == "http":
        return (http or httpx.Client()).post(rt.http_url + "/v1/sql", content=sql_text, timeout=30)
    try:
        if flight is None:
            flight_read(rt, flight_ticket(sql_text, protocol))
        else:
            reader = flight.do_get(fl.Ticket(flight_ticket(sql_text, protocol)))
            while True:
                reader.read_chunk()
    except StopIteration:
        pass
    except Exception as e:  # the Flight error is the outcome
        if not isinstance(e, (fl.FlightError, pa.ArrowException)):
            raise
        error: BaseException = e
        return error
    raise AssertionError(f"{sql_text!r} over {protocol} did not fail")


def warn_lines(rt: Runtime, after: int) -> list[str]:
    return [line for line in rt.logs()[after:] if " WARN runtime::query: Query failed " in line]


def wait_warnings(rt: Runtime, after: int, count: int) -> list[str]:
    wait_for(lambda: len(warn_lines(rt, after)) >= count, timeout=10)
    time.sleep(0.3)  # a second line for the same query would have been written by now
    return warn_lines(rt, after)


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    with run_spiced(write_pod(tmp_path_factory.mktemp("outcomes"))) as runtime:
        yield runtime


# ---------------------------------------------------------------- one vocabulary


@pytest.mark.parametrize("sql_text, err_code", FAILURES)
def test_the_same_failure_has_the_same_err_code_on_every_protocol(rt: Runtime, sql_text: str, err_code: str) -> None:
    before = failures(rt)
    after = len(rt.logs())
    outcomes = {protocol: run_failing(rt, sql_text, protocol) for protocol in PROTOCOLS}
    response = outcomes["http"]
    assert isinstance(response, httpx.Response) and response.status_code == 400
    assert response.text.startswith("Failed to execute query: ")
    for protocol in ("flight", "flightsql"):
        assert "Traceback" not in str(outcomes[protocol])
    now = failures(rt)
    for protocol in PROTOCOLS:
        assert now.get((protocol, err_code), 0) == before.get((protocol, err_code), 0) + 1, (protocol, now)
    changed = {key for key in now if now[key] != before.get(key, 0)}
    assert changed == {(protocol, err_code) for protocol in PROTOCOLS}
    lines = wait_warnings(rt, after, 3)
    assert len(lines) == 3, lines  # one per failed query
    for protocol, line in zip(PROTOCOLS, sorted(lines, key=lambda line: PROTOCOLS.index(
            re.search(r" protocol=(\w+) ", line).group(1))), strict=True):  # type: ignore[union-attr]
        assert re.search(rf"Query failed query_id=[0-9a-f-]{{36}} protocol={protocol} err_code={err_code} "
                         r'error=".+"$', line), line
        assert "client_subject" not in line and "Traceback" not in line


def test_timeouts_are_query_timeout_on_every_protocol(tmp_path: Path) -> None:
    with run_spiced(write_pod(tmp_path), "--set-runtime", "query.timeout=300ms") as timed:
        slow = long_sql("timed")
        response = httpx.post(timed.http_url + "/v1/sql", content=slow, timeout=30)
        assert (response.status_code, response.text) == (504, "Failed to execute query: Query timed out after 0.3s")
        for protocol in ("flight", "flightsql"):
            error = run_failing(timed, slow, protocol)
            assert isinstance(error, fl.FlightTimedOutError), repr(error)
            assert str(error).startswith("Query timed out after 0.3s. Detail: TimedOut. ")  # pyarrow's tail
        counts = failures(timed)
        assert ({protocol: counts.get((protocol, "QueryTimeout")) for protocol in PROTOCOLS}
                == dict.fromkeys(PROTOCOLS, 1))
        lines = wait_warnings(timed, 0, 3)
        assert len(lines) == 3 and all(' err_code=QueryTimeout error="Query timed out after 0.3s"' in x for x in lines)


def test_a_client_that_leaves_mid_stream_ends_its_query(rt: Runtime) -> None:
    sql_text = long_sql("leaves", ENDLESS)
    before = failures(rt).get(("http", "Cancelled"), 0)
    with httpx.Client(timeout=30) as client, client.stream("POST", rt.http_url + "/v1/sql", content=sql_text) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()  # kept: a dropped iterator closes the connection
        next(chunks)
        assert find(rt, sql_text) is not None
    wait_for(lambda: find(rt, sql_text) is None, timeout=10)
    assert failures(rt)[("http", "Cancelled")] == before + 1
    assert_stopped(rt)


# ---------------------------------------------------------------- raw SQL through GetFlightInfo


def test_raw_sql_that_does_not_plan_fails_at_doget_with_invalid_argument(rt: Runtime) -> None:
    with fl.connect(rt.flight_uri) as client:
        good = client.get_flight_info(fl.FlightDescriptor.for_command(b"SELECT id FROM trips"))
        assert good.endpoints[0].ticket.ticket == b"SELECT id FROM trips"  # upstream's ticket, unchanged
        assert good.schema == pa.schema([("id", pa.int64())])

        for bad, message in ((b"SELECT * FROM nope", "table 'spice.public.nope' not found"),
                             (b"SELEC 1", 'SQL error: ParserError("Expected: an SQL statement, found: SELEC')):
            before = failures(rt)
            info = client.get_flight_info(fl.FlightDescriptor.for_command(bad))
            assert info.schema == pa.schema([])
            assert info.endpoints[0].ticket.ticket == sql.pack(pb.TicketStatementQuery(statement_handle=bad))
            with pytest.raises(pa.ArrowInvalid) as error:
                client.do_get(info.endpoints[0].ticket).read_chunk()
            assert str(error.value).startswith(message)
            assert "gRPC client debug context: INVALID_ARGUMENT" in str(error.value)
            assert "Failed to execute query" not in str(error.value) and "Traceback" not in str(error.value)
            changed = {k: v - before.get(k, 0) for k, v in failures(rt).items() if v != before.get(k, 0)}
            assert list(changed) == [("flight", "SyntaxError" if bad == b"SELEC 1" else "QueryPlanningError")]

        # The raw SQL sent straight to DoGet keeps upstream's INTERNAL.
        with pytest.raises(fl.FlightInternalError, match="^Failed to execute query: Error during planning: table"):
            client.do_get(fl.Ticket(b"SELECT * FROM nope")).read_chunk()


# ---------------------------------------------------------------- the access log


def access_lines(rt: Runtime, after: int = 0) -> list[str]:
    return [line for line in rt.logs()[after:] if " runtime::http: " in line and re.search(r" \d+\.\d+ms ", line + " ")
            or "Flight call" in line]


def test_no_access_log_by_default(rt: Runtime) -> None:
    after = len(rt.logs())
    assert httpx.post(rt.http_url + "/v1/sql", content="SELECT 1").status_code == 200
    assert flight_read(rt, b"SELECT 1") == 1
    assert rt.wait_for_log(" INFO runtime::", timeout=0.1, after=0)  # INFO lines do get out
    time.sleep(0.5)
    assert access_lines(rt, after) == []


def test_the_access_log_flag_logs_every_request_and_call_at_info(tmp_path: Path) -> None:
    with run_spiced(write_pod(tmp_path), "--access-log") as logged:
        after = len(logged.logs())
        assert httpx.post(logged.http_url + "/v1/sql", content="SELECT 1").status_code == 200
        assert httpx.get(logged.http_url + "/v1/nope").status_code == 404
        assert flight_read(logged, b"SELECT 1") == 1
        with pytest.raises(fl.FlightInternalError):
            flight_read(logged, b"SELECT * FROM nope")
        http_ok = logged.wait_for_log(r" INFO runtime::http: POST /v1/sql 200 [\d.]+ms client=anonymous$", after=after)
        logged.wait_for_log(r" INFO runtime::http: GET /v1/nope 404 [\d.]+ms client=anonymous$", after=after)
        flight_ok = logged.wait_for_log(r" INFO runtime::flight: Flight call method=do_get .* status=OK ", after=after)
        logged.wait_for_log(r" INFO runtime::flight: Flight call method=do_get .* status=INTERNAL ", after=after)
        assert re.search(r"command=- peer=ipv4:127\.0\.0\.1:\d+ duration_ms=[\d.]+ status=OK client=anonymous$",
                         flight_ok)
        assert "X-API-Key" not in http_ok


MTLS_POD = """\
version: v1
kind: Spicepod
name: mtls
runtime:
  access_log: true
datasets:
  - from: file:trips.csv
    name: trips
"""


def test_under_mtls_failures_and_access_lines_name_the_client(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    args = ["--tls-enabled", "true", "--tls-certificate-file", str(pki.server.cert),
            "--tls-key-file", str(pki.server.key),
            "--tls-client-auth-mode", "required", "--tls-client-auth-ca-file", str(pki.client_ca.cert)]
    subject = pki.client.certificate.subject.rfc4514_string()
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    with run_spiced(write_pod(tmp_path / "pod", MTLS_POD), *args) as secured, \
            httpx.Client(verify=ctx, timeout=30) as verified, \
            httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca.cert)), timeout=30) as anonymous, \
            fl.FlightClient(secured.flight_uri.replace("127.0.0.1", "localhost"), tls_root_certs=pki.ca.cert_pem,
                            cert_chain=pki.client.cert_pem, private_key=pki.client.key_pem) as flight:
        # The active-query routes are behind the certificate gate like /v1/sql.
        refused = anonymous.get(secured.http_url + "/v1/sql/active")
        assert (refused.status_code, refused.content) == (401, b'{"message":"Valid client TLS certificate required"}')
        assert anonymous.post(
            secured.http_url + "/v1/sql/0198f0a1-9c3d-7c4e-8a11-2b3c4d5e6f70/cancel").status_code == 401
        assert verified.get(secured.http_url + "/v1/sql/active").json() == {"queries": [], "total_count": 0}

        after = len(secured.logs())
        response = run_failing(secured, "SELECT * FROM nope", "http", http=verified)
        assert isinstance(response, httpx.Response) and response.status_code == 400
        assert isinstance(run_failing(secured, "SELECT * FROM nope", "flight", flight=flight), fl.FlightInternalError)
        assert isinstance(run_failing(secured, "SELEC 1", "flightsql", flight=flight), pa.ArrowInvalid)
        lines = wait_warnings(secured, after, 3)
        assert len(lines) == 3, lines
        identity = f'client_subject="{subject}" client_fingerprint='
        expected = [("http", "QueryPlanningError", "Error during planning: table 'spice.public.nope' not found"),
                    ("flight", "QueryPlanningError", "Error during planning: table 'spice.public.nope' not found"),
                    ("flightsql", "SyntaxError", 'SQL error: ParserError(\\"Expected: an SQL statement')]
        for line, (protocol, code, text) in zip(lines, expected, strict=True):
            assert f" protocol={protocol} err_code={code} {identity}" in line, line
            assert f' error="{text}' in line, line

        secured.wait_for_log(rf' INFO runtime::http: POST /v1/sql 400 [\d.]+ms {re.escape(identity)}[0-9a-f]{{16}}$',
                             after=after)
        call = secured.wait_for_log(r" INFO runtime::flight: Flight call method=do_get command=statement_query ",
                                    after=after)
        assert re.search(rf" status=INVALID_ARGUMENT {re.escape(identity)}[0-9a-f]{{16}}$", call), call
        refused_line = secured.wait_for_log(r" INFO runtime::http: GET /v1/sql/active 401 ")
        assert refused_line.endswith("client=anonymous")

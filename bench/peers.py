"""`python -m bench peers`: small queries against the Rust peers, measured in the same command (issue #16).

Three servers hold the same 5M generated rows (bench/common.py) in memory and answer the same SQL:

- ours: spiced with TLS (the bench's throwaway PKI: an ECDSA P-256 leaf), the table accelerated
  with arrow, the results cache off in its spicepod (so every request runs the query; no request
  header is involved), `POST /v1/sql`;
- nginx → roapi: roapi (PyPI, pinned) behind Debian's nginx, which terminates TLS with the same
  certificate and Mozilla-intermediate settings like ours (TLS 1.2/1.3, the same TLS 1.2 ciphers
  and groups) and proxies over keep-alive upstream connections, `POST /api/sql`;
- roapi plaintext: the same roapi process asked directly.

roapi loads each table into memory at startup (its default, read-only mode), the counterpart of
our arrow acceleration. nginx runs as its own foreground process (`daemon off`) with a prefix,
pid file, logs and temp paths in a temp folder; `worker_processes auto`; `keepalive_requests` raised
on both sides, as ours is unlimited (the 1000 default would add TLS handshakes to busy connections).

Measures, the servers taking turns within each round so every round compares one moment of a
shared machine; medians:

- `SELECT 1` req/s: wrk -t1 -c16, 10 s, 3 rounds;
- server CPU per request over those runs: utime+stime (psutil, from /proc/<pid>/stat) of every
  server process (ours: the runtime and its children, e.g. the Flight front; nginx→roapi: the
  nginx master and workers, and roapi) before and after each run, divided by wrk's requests;
- `SELECT 1` p50 on one keep-alive connection: wrk -t1 -c1 --latency (wrk's own per-request
  timing, its 50 % line), 4 s, 3 rounds;
- point lookup `SELECT * FROM big WHERE id = k`, a random k per request: wrk -c16, 4 s, 3 rounds;
- the GROUP BY over the 5M rows: wrk -c16, 4 s, 3 rounds;
- 1M rows as JSON: curl (a new connection each time, HTTP/1.1), total time and time to first
  byte (`%{time_starttransfer}`, the TLS handshake included), 1 warm-up and 3 rounds;
- Flight small call: the 1-row DoGet p50 of ours over TLS against bench/bare_flight.py's pyarrow
  servers over native grpc+tls (one with a prebuilt table, one running the SQL with DataFusion),
  the calls alternating;
- results-cache hits, ours alone (the peers have none), on a second runtime whose cache is on: one
  point lookup repeated, its req/s and server CPU per request at 16 connections (wrk, 10 s, 3 runs),
  p50 on one connection, and its Flight DoGet p50 against bare pyarrow's prebuilt 1-row table.

The figures are printed with the ratio ours / nginx→roapi and the issue's goals, each marked met
or not. About 5 minutes on 2 shared cores.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pyarrow.flight as flight

from bench.common import OUT
from tests.pki import Pki
from tests.support import run_spiced, write_pod

ROAPI_VERSION = "0.12.7"
SCRIPT = Path(__file__).with_name("post_sql.lua")
SELECT1 = "SELECT 1"
LOOKUP = "SELECT * FROM big WHERE id = {k}"
GROUP_BY = "SELECT grp, count(*) AS n, sum(amount) AS total, avg(id) AS mean FROM big GROUP BY grp"
MILLION = "SELECT id, grp, amount, label, ts, maybe FROM big LIMIT 1000000"
CACHED = "SELECT * FROM big WHERE id = 4242"  # the same lookup every time: a results-cache hit
ROUNDS = 3
SELECT1_SECONDS, SHORT_SECONDS = 10, 4
FLIGHT_CALLS = 400
NAMES = ("ours", "nginx", "roapi")
TITLES = {"ours": "ours (TLS)", "nginx": "nginx (TLS) → roapi", "roapi": "roapi plaintext"}


def spicepod(parquet: Path, cache: bool = False) -> str:
    caching = "item_ttl: 1h" if cache else "enabled: false"
    return f"""version: v1
kind: Spicepod
name: peers
runtime:
  caching:
    sql_results:
      {caching}
datasets:
  - from: file:{parquet}
    name: big
    acceleration:
      enabled: true
      engine: arrow
"""


# Mozilla intermediate, as spiced/tls/policy.py serves it.
NGINX_CONF = """\
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000000;
    client_max_body_size 1m;
    upstream roapi {{
        server 127.0.0.1:{upstream};
        keepalive 32;
        keepalive_requests 1000000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {ciphers};
        ssl_ecdh_curve X25519:prime256v1:secp384r1;
        ssl_prefer_server_ciphers off;
        ssl_session_cache shared:MozSSL:10m;
        ssl_session_timeout 1d;
        ssl_session_tickets off;
        location / {{
            proxy_pass http://roapi;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffers 64 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


@dataclass
class Target:
    url: str  # the SQL endpoint
    pids: list[int]  # the server processes whose CPU is counted (with their children)


@dataclass
class Wrk:
    rate: float
    requests: int
    errors: int
    p50_ms: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port}:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def roapi_binary() -> Path:
    """roapi from PyPI, installed once into bench/out (its wheel ships the binary)."""
    target = OUT / f"roapi-{ROAPI_VERSION}"
    binary = target / "bin" / "roapi"
    if not binary.exists():
        staging = target.with_suffix(".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--target", str(staging), f"roapi=={ROAPI_VERSION}"], check=True)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return binary


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise RuntimeError("nginx is missing: `make peer-tools` installs Debian's package")
    return found


@contextmanager
def roapi(parquet: Path, tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = _free_port()
    log = tmp / "roapi.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(roapi_binary()), "--addr-http", f"127.0.0.1:{port}",
                                 "--addr-postgres", f"127.0.0.1:{_free_port()}",
                                 "--addr-flight-sql", f"127.0.0.1:{_free_port()}", "--table", f"big={parquet}"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, "roapi", log, timeout=180)
        with httpx.Client(timeout=10) as http:  # listening may come before the table is loaded
            deadline = time.monotonic() + 180
            while http.post(f"http://127.0.0.1:{port}/api/sql", content=SELECT1).status_code != 200:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"roapi did not answer SQL:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        yield proc, port
    finally:
        _stop(proc)


@contextmanager
def nginx(tmp: Path, upstream: int, cert: Path, key: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    from spiced.tls.policy import INTERMEDIATE_CIPHERS

    prefix = tmp / "nginx"
    prefix.mkdir()
    port = _free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=prefix, upstream=upstream, port=port, cert=cert, key=key,
                                      ciphers=INTERMEDIATE_CIPHERS))
    log = prefix / "error.log"
    log.touch()
    proc = subprocess.Popen([nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", str(log),
                             "-g", "daemon off;"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc, "nginx", log)
        yield proc, port
    finally:
        _stop(proc, signal.SIGTERM)  # the master's fast shutdown: it ends its workers


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        root = psutil.Process(pid)
        for proc in (root, *root.children(recursive=True)):
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def _duration_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]


def wrk(url: str, sql: str, *, conns: int, seconds: int, rows: int = 1) -> Wrk:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "30s", "--latency", "-s", str(SCRIPT), url,
           "--", sql, str(rows)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    requests = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if socket_errors:
        print(f"  wrk: socket errors {socket_errors.group(1)} for {url}")
    return Wrk(float(rate.group(1)) if rate else float("nan"), int(requests.group(1)) if requests else 0,
               int(errors.group(1)) if errors else 0, _duration_ms(p50.group(1)) if p50 else float("nan"))


@dataclass
class Samples:
    values: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in NAMES})

    def median(self, name: str) -> float:
        return statistics.median(self.values[name]) if self.values[name] else float("nan")

    def spread(self) -> str:
        """The range of the per-round ratios ours / nginx→roapi."""
        ratios = sorted(o / p for o, p in zip(self.values["ours"], self.values["nginx"], strict=False) if p)
        return f"{ratios[0]:.2f}-{ratios[-1]:.2f}" if ratios else "-"


def _rounds(targets: dict[str, Target], measure: Callable[[str, Target], dict[str, float]],
            rounds: int = ROUNDS) -> dict[str, Samples]:
    """The servers take turns within each round; `measure` returns named figures of one run."""
    out: dict[str, Samples] = {}
    for _ in range(rounds):
        for name in NAMES:
            for key, value in measure(name, targets[name]).items():
                out.setdefault(key, Samples()).values[name].append(value)
    return out


def _wrk_measure(sql: str, conns: int, seconds: int, rows: int = 1, cpu: bool = False
                 ) -> Callable[[str, Target], dict[str, float]]:
    def measure(name: str, target: Target) -> dict[str, float]:
        before = _cpu_seconds(target.pids) if cpu else 0.0
        result = wrk(target.url, sql, conns=conns, seconds=seconds, rows=rows)
        used = _cpu_seconds(target.pids) - before if cpu else 0.0
        if result.errors:
            print(f"  wrk: {result.errors} of {result.requests} responses not 2xx from {TITLES[name]}")
        figures = {"rate": result.rate, "p50_ms": result.p50_ms}
        if cpu and result.requests:
            figures["cpu_ms"] = used * 1000 / result.requests
        return figures
    return measure


def _curl_measure(ca: Path) -> Callable[[str, Target], dict[str, float]]:
    def measure(name: str, target: Target) -> dict[str, float]:
        out = subprocess.run(["curl", "-sS", "--http1.1", "-o", "/dev/null", "--cacert", str(ca), "-X", "POST",
                              "-H", "Content-Type: text/plain", "--data-binary", MILLION,
                              "-w", "%{http_code} %{time_starttransfer} %{time_total} %{size_download}", target.url],
                             capture_output=True, text=True, check=True).stdout.split()
        if out[0] != "200":
            print(f"  curl: HTTP {out[0]} from {TITLES[name]}")
        return {"first": float(out[1]), "total": float(out[2]), "bytes": float(out[3])}
    return measure


def json_shapes(targets: dict[str, Target], ca: Path) -> list[str]:
    """Whether the JSON bodies are alike: an array of objects, the same keys and values."""
    notes = []
    sql = "SELECT id, grp, amount, label, ts, maybe FROM big WHERE id IN (0, 1) ORDER BY id"
    with httpx.Client(verify=str(ca), timeout=30) as http:
        bodies = {n: http.post(targets[n].url, content=sql).raise_for_status().json() for n in ("ours", "roapi")}
    for name, body in bodies.items():
        if not (isinstance(body, list) and all(isinstance(r, dict) for r in body)):
            notes.append(f"{TITLES[name]} answers {str(body)[:120]}, not an array of objects")
    if bodies["ours"] != bodies["roapi"]:
        notes.append("the JSON rows differ: ours " + json.dumps(bodies["ours"]) + "; roapi " +
                     json.dumps(bodies["roapi"]))
    elif not notes:
        notes.append(f"JSON alike: both answer an array of objects, equal for {sql!r}: {json.dumps(bodies['ours'])}")
    return notes


def flight_small_calls(ours_uri: str, pki: Pki, parquet: Path, ours_sql: str = SELECT1) -> dict[str, float]:
    """p50 (ms) of a 1-row DoGet over TLS: ours (`ours_sql`), bare pyarrow (a prebuilt table) and
    pyarrow running the SQL with DataFusion (bench/bare_flight.py), the calls alternating."""
    roots = pki.ca.cert_pem
    bare = subprocess.Popen([sys.executable, "-m", "bench.bare_flight", str(parquet), str(pki.server.cert),
                             str(pki.server.key)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert bare.stdout is not None
        tls_port, _, df_tls_port = bare.stdout.readline().split()
        clients = {"ours": flight.FlightClient(ours_uri, tls_root_certs=roots),
                   "bare": flight.FlightClient(f"grpc+tls://localhost:{tls_port}", tls_root_certs=roots),
                   "bare_datafusion": flight.FlightClient(f"grpc+tls://localhost:{df_tls_port}",
                                                          tls_root_certs=roots)}
        times: dict[str, list[float]] = {name: [] for name in clients}
        for i in range(50 + FLIGHT_CALLS):
            for name, client in clients.items():
                ticket = flight.Ticket((ours_sql if name == "ours" else SELECT1).encode())
                t0 = time.perf_counter()
                client.do_get(ticket).read_all()
                if i >= 50:
                    times[name].append((time.perf_counter() - t0) * 1000)
        for client in clients.values():
            client.close()
    finally:
        if bare.stdin:
            bare.stdin.close()
        try:
            bare.wait(15)
        except subprocess.TimeoutExpired:
            bare.kill()
            bare.wait()
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class Line:
    measure: str
    samples: Samples
    unit: str
    goal: str
    met: Callable[[float, float], bool] | None  # of (ours, ours / nginx→roapi)
    fmt: str = ".4g"


def report(lines: list[Line], flight_p50: dict[str, float], notes: list[str]) -> None:
    print("\n== Small queries against roapi and nginx (medians; ratio = ours / nginx→roapi, rounds: its range"
          " over the rounds)")
    print(f"{'measure':44} {'ours TLS':>10} {'nginx→roapi':>12} {'roapi':>10} {'ratio':>6} {'rounds':>10}  goal")
    for line in lines:
        ours, peer, plain = (line.samples.median(n) for n in NAMES)
        ratio = ours / peer if peer else float("nan")
        mark = "" if line.met is None else (" MET" if line.met(ours, ratio) else " not met")
        print(f"{line.measure + ' (' + line.unit + ')':44} {ours:>10{line.fmt}} {peer:>12{line.fmt}} "
              f"{plain:>10{line.fmt}} {ratio:>6.2f} {line.samples.spread():>10}  {line.goal}{mark}")
    print(f"Flight 1-row DoGet p50 over TLS (ms): ours {flight_p50['ours']:.3f}, bare pyarrow grpc+tls "
          f"{flight_p50['bare']:.3f} ({flight_p50['ours'] / flight_p50['bare']:.2f}x), pyarrow + DataFusion "
          f"grpc+tls {flight_p50['bare_datafusion']:.3f} ({flight_p50['ours'] / flight_p50['bare_datafusion']:.2f}x); "
          "the `flight` section splits out the TLS cost")
    for note in notes:
        print(f"  note: {note}")


def cached_hits(parquet: Path, pki: Pki, tmp: Path) -> list[str]:
    """Ours alone (the peers have no results cache): a point lookup answered from the results cache,
    with a runtime of its own whose cache is on. Its CPU per request is the issue's goal for a hit."""
    with run_spiced(write_pod(tmp / "cached", spicepod(parquet, cache=True)), "--tls-enabled", "true",
                    "--tls-certificate-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key),
                    timeout=300) as rt:
        target = Target(f"https://127.0.0.1:{rt.http_port}/v1/sql", [rt.proc.pid])
        with httpx.Client(verify=str(pki.ca.cert), timeout=30) as http:
            first = http.post(target.url, content=CACHED).headers.get("results-cache-status")
            again = http.post(target.url, content=CACHED).headers.get("results-cache-status")
        wrk(target.url, CACHED, conns=16, seconds=1)
        busy = [_wrk_measure(CACHED, 16, SELECT1_SECONDS, cpu=True)("ours", target) for _ in range(ROUNDS)]
        single = [_wrk_measure(CACHED, 1, SHORT_SECONDS)("ours", target) for _ in range(ROUNDS)]
        flight_p50 = flight_small_calls(rt.flight_uri.replace("127.0.0.1", "localhost"), pki, parquet, CACHED)
    rate, cpu = (statistics.median(r[k] for r in busy) for k in ("rate", "cpu_ms"))
    p50 = statistics.median(r["p50_ms"] for r in single)
    met = "met" if cpu <= 0.25 else "not met"
    return [f"results cache ({first} then {again}): {CACHED!r} at 16 conns {rate:.0f} req/s, server CPU "
            f"{cpu:.3f} ms per request (goal <= 0.25 ms: {met}); p50 on one conn {p50:.3f} ms; Flight DoGet "
            f"p50 {flight_p50['ours']:.3f} ms against {flight_p50['bare']:.3f} ms for bare pyarrow's prebuilt "
            f"1-row table (+{flight_p50['ours'] - flight_p50['bare']:.3f} ms)"]


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the context managers that end the servers


def run(parquet: Path, rows: int) -> None:
    """Starts the three servers, measures, prints the table; every process started is ended, also on
    an error, Ctrl-C or SIGTERM."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _run(parquet, rows)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(parquet: Path, rows: int) -> None:
    started = time.monotonic()
    roapi_binary()
    nginx_binary()
    tmp = Path(tempfile.mkdtemp(prefix="spiced-bench-peers-"))
    try:
        pki = Pki.create(tmp / "pki")
        with ExitStack() as stack:
            rt = stack.enter_context(run_spiced(
                write_pod(tmp / "pod", spicepod(parquet)), "--tls-enabled", "true",
                "--tls-certificate-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key),
                timeout=300))
            rproc, rport = stack.enter_context(roapi(parquet, tmp))
            nproc, nport = stack.enter_context(nginx(tmp, rport, pki.server.cert, pki.server.key))
            targets = {"ours": Target(f"https://127.0.0.1:{rt.http_port}/v1/sql", [rt.proc.pid]),
                       "nginx": Target(f"https://127.0.0.1:{nport}/api/sql", [nproc.pid, rproc.pid]),
                       "roapi": Target(f"http://127.0.0.1:{rport}/api/sql", [rproc.pid])}
            print(f"peers: roapi {ROAPI_VERSION} ({rows:,} rows loaded), "
                  f"{subprocess.run([nginx_binary(), '-v'], capture_output=True, text=True).stderr.strip()}; "
                  f"servers up in {time.monotonic() - started:.0f} s")
            notes = json_shapes(targets, pki.ca.cert)
            for name in NAMES:  # warm-up: connections, code paths, the table's first scans
                wrk(targets[name].url, SELECT1, conns=16, seconds=1)
                wrk(targets[name].url, GROUP_BY, conns=2, seconds=1)
            select1 = _rounds(targets, _wrk_measure(SELECT1, 16, SELECT1_SECONDS, cpu=True))
            single = _rounds(targets, _wrk_measure(SELECT1, 1, SHORT_SECONDS))
            lookup = _rounds(targets, _wrk_measure(LOOKUP, 16, SHORT_SECONDS, rows=rows))
            group = _rounds(targets, _wrk_measure(GROUP_BY, 16, SHORT_SECONDS))
            _rounds(targets, _curl_measure(pki.ca.cert), rounds=1)  # warm-up
            million = _rounds(targets, _curl_measure(pki.ca.cert))
            sizes = {n: million["bytes"].median(n) / 1e6 for n in NAMES}
            notes.append("1M rows JSON body: " + ", ".join(f"{TITLES[n]} {sizes[n]:.1f} MB" for n in NAMES))
            flight_p50 = flight_small_calls(rt.flight_uri.replace("127.0.0.1", "localhost"), pki, parquet)
            runtime_warnings = [line for line in rt.logs() if re.search(r"\b(WARN|ERROR)\b", line)]
            notes += [f"runtime: {line}" for line in runtime_warnings[:5]]
        notes += cached_hits(parquet, pki, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        Line("SELECT 1, 16 conns", select1["rate"], "req/s", ">= 1.25x", lambda o, r: r >= 1.25, ".0f"),
        Line("server CPU per request, SELECT 1", select1.get("cpu_ms", Samples()), "ms", "<= 0.6 ms",
             lambda o, r: o <= 0.6, ".3f"),
        Line("SELECT 1 p50, one keep-alive conn", single["p50_ms"], "ms", "<= 0.6 ms", lambda o, r: o <= 0.6,
             ".3f"),
        Line("lookup WHERE id = k, 16 conns", lookup["rate"], "req/s", ">= 1.25x", lambda o, r: r >= 1.25, ".1f"),
        Line(f"GROUP BY {rows / 1e6:g}M rows, 16 conns", group["rate"], "req/s", "report", None, ".1f"),
        Line("1M rows JSON, curl total", million["total"], "s", "<= 0.5x", lambda o, r: r <= 0.5, ".3f"),
        Line("1M rows JSON, curl first byte", million["first"], "s", "< 0.1 s", lambda o, r: o < 0.1, ".3f"),
    ]
    report(lines, flight_p50, notes)
    print(f"(section took {time.monotonic() - started:.0f} s)")

"""`make soak`: certificate and client-CA rotation under load, with nothing lost.

Four phases, each against a fresh `spiced` with TLS on all three listeners (HTTP, Flight, metrics):

  1. server certificate rotated by atomic rename of plain files        (mode none)
  2. server certificate rotated by kubelet-style `..data` symlink swap  (mode none)
  3. client-CA bundle rotated by atomic rename          (client_auth_mode required)
  4. client-CA bundle rotated by kubelet-style swap     (client_auth_mode required)

While a phase rotates, it runs: wrk POSTing `/v1/sql` on 16 keep-alive connections, wrk opening a
new connection per request (wrk reaches the mTLS phases through stunnel, which presents the client
certificate), HTTP/2 from h2load rounds of new connections (mode none only: h2load cannot present a
client certificate, and stunnel forwards no ALPN) and from httpx in every phase (one long-lived h2
connection that must span every rotation, and new h2 connections; with the client certificate
under mTLS, every response checked to be HTTP/2 negotiated by ALPN), pyarrow Flight DoGet streams
(a long-lived client, a new client per stream, a slow reader whose streams span rotations), and a
probe making fresh handshakes on every listener and recording the certificate served. A few invalid
rotations are mixed in. Each rotation waits for `runtime_tls_reload_total` to count it.

Printed per phase and in total: requests sent and failed, handshakes seen per certificate serial,
rotations by result (from /metrics, parsed with prometheus_client), and the longest delay between a
rotation and the first handshake that saw it. Exit status 1 if anything failed.

    python -m bench.soak                 # the full run (>= 20 rotations of each kind), a few minutes
    python -m bench.soak --quick         # 3 valid rotations per phase (and one after the invalid ones)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from bench.soak_check import POLL, Applied, PhaseReport, check_phase, describe, matches
from bench.soak_load import (
    FlightLoad,
    FlightTarget,
    H2loadLoop,
    HttpxH2Load,
    Load,
    PyHttpLoad,
    Stunnel,
    Wrk,
    wait_until,
)
from bench.soak_plan import (
    CA_INVALID,
    FLIGHT_SQL,
    SERVER_INVALID,
    Layout,
    PhaseSpec,
    Step,
    ca_plan,
    server_plan,
    write_workdir,
)
from bench.soak_probe import (
    Probe,
    ReloadCounter,
    client_ctx,
    probe_contexts,
    probe_targets,
)
from tests.pki import Pki
from tests.support import Runtime, run_spiced

STEP_TIMEOUT = 2 * POLL + 8.0  # a rotation not counted by then is a failure


def run_phase(spec: PhaseSpec, pki: Pki, work: Path) -> PhaseReport:
    report = PhaseReport(spec)
    started = time.monotonic()
    files = {"tls.crt": pki.server.cert_pem, "tls.key": pki.server.key_pem}
    flags = ["--tls-enabled", "true"]
    if spec.kind == "client_ca":
        files["ca.crt"] = pki.client_ca.cert_pem
    layout = Layout(work / f"material-{spec.layout}-{spec.kind}", spec.layout, files)
    flags += ["--tls-certificate-file", str(layout.path("tls.crt")), "--tls-key-file", str(layout.path("tls.key"))]
    if spec.kind == "client_ca":
        flags += ["--tls-client-auth-mode", "required", "--tls-client-auth-ca-file", str(layout.path("ca.crt"))]
    steps = (server_plan(pki, spec.valid, spec.invalid, spec.layout) if spec.kind == "server"
             else ca_plan(pki, spec.valid, spec.invalid, spec.layout))
    with run_spiced(work, *flags, metrics=True, timeout=120) as rt, ExitStack() as stack:
        counter = ReloadCounter(rt.metrics_url.replace("127.0.0.1", "localhost"), pki.ca.cert)
        stack.callback(counter.close)
        mtls = spec.kind == "client_ca"
        client = (pki.client.cert, pki.client.key) if mtls else (None, None)
        targets = probe_targets(rt.http_port, rt.flight_port, int(rt.addresses["metrics"].rsplit(":", 1)[1]))
        clients = {"client" if mtls else "-": probe_contexts(pki.ca.cert, *client)}
        if mtls:
            clients["foreign"] = probe_contexts(pki.ca.cert, pki.foreign_client.cert, pki.foreign_client.key)
        probe = Probe(targets, clients)
        loads = start_loads(spec, rt, pki, stack, mtls)
        running = list(loads)  # stopped on the way out if the phase ends early (wrk would run on)
        stack.callback(lambda: [load.stop() for load in running])
        probe.start()
        stack.callback(probe.stop)
        flight_load = next((load for load in loads if isinstance(load, FlightLoad)), None)
        applied = rotate(spec, layout, steps, rt, counter, probe, report, flight_load)
        windows = [(a.rotated, a.counted) for a in applied if a.step.expect == "ok"]
        if flight_load is not None and windows:
            # Rotations are seen within milliseconds, so the phase can end while the slow stream
            # started before the first one still runs: let it finish (stopping would cancel it).
            wait_until(lambda: flight_load.spanning(windows)["slow"] > 0, flight_load.slow_seconds + 15)
        probe.stop()
        report.loads = [load.stop() for load in loads]
        running.clear()
        for load in loads:
            if isinstance(load, FlightLoad):
                spanning = load.spanning(windows)
                load.result.detail += f"; streams running across a swap: {dict(spanning) or 0}"
                if windows and not spanning["slow"]:
                    report.failures.append("no slow Flight stream ran across a rotation")
            elif isinstance(load, HttpxH2Load):
                spanned = load.spanning(windows)
                load.result.detail += f"; long-lived conn across {spanned} of {len(windows)} swaps"
                if spanned < len(windows):
                    report.failures.append(f"{load.name}: the long-lived h2 connection ran across only "
                                           f"{spanned} of {len(windows)} rotations")
        report.counts = counter.read()
        check_phase(spec, report, applied, probe.records, rt, pki)
    report.seconds = time.monotonic() - started
    for r in report.loads:
        if r.failed:
            report.failures.append(f"{r.name}: {r.failed} failed of {r.sent}")
    return report


def start_loads(spec: PhaseSpec, rt: Runtime, pki: Pki, stack: ExitStack, mtls: bool) -> list[Load]:
    loads: list[Load] = []
    cert, key = (pki.client.cert, pki.client.key) if mtls else (None, None)
    if spec.http_load == "wrk":
        url = rt.http_url
        if mtls:
            tunnel = Stunnel(rt.http_port, pki.ca.cert, pki.client.cert, pki.client.key)
            stack.callback(tunnel.stop)
            url = f"http://127.0.0.1:{tunnel.port}"
        via = " via stunnel" if mtls else ""
        loads += [Wrk(f"wrk /v1/sql, 16 keep-alive conns{via}", url + "/v1/sql", connections=16),
                  Wrk(f"wrk /v1/sql, new conn per request{via}", url + "/v1/sql", connections=2, new_connections=True)]
    else:
        loads.append(PyHttpLoad("python /v1/sql, 16 keep-alive + 2 new-conn", rt.http_port,
                                client_ctx(pki.ca.cert, cert, key), keepalive=16, fresh=2))
    if spec.h2load:
        if not mtls:  # h2load presents no client certificate, and through stunnel it would get no ALPN
            loads.append(H2loadLoop("h2load /v1/sql over h2, new conns per round", rt.http_url + "/v1/sql"))
        # the client certificate is the load's own (pki.client), as for wrk/stunnel and Flight: its CA
        # is in every bundle the CA rotations install, so it must be accepted throughout
        loads.append(HttpxH2Load(f"httpx h2 long-lived + new conns{', client cert' if mtls else ''}",
                                 rt.http_url + "/v1/sql", pki.ca.cert, cert, key))
    if spec.flight:
        target = FlightTarget(rt.flight_uri.replace("127.0.0.1", "localhost"), pki.ca.cert_pem,
                              pki.client.cert_pem if mtls else None, pki.client.key_pem if mtls else None)
        loads.append(FlightLoad("flight DoGet streams", target, FLIGHT_SQL, spec.rows,
                                spec.rows * (spec.rows - 1) // 2))
    for i, load in enumerate(loads):
        try:
            load.start()
        except BaseException:
            for started in loads[:i]:
                started.stop()
            raise
    return loads


def rotate(spec: PhaseSpec, layout: Layout, steps: Iterator[Step], rt: Runtime, counter: ReloadCounter,
           probe: Probe, report: PhaseReport, flight_load: FlightLoad | None) -> list[Applied]:
    applied: list[Applied] = []
    # let the load reach steady state before the first rotation, and see the initial certificate
    wait_until(lambda: len(probe.snapshot()) >= 3 * probe.streams, 30)
    valid = 0
    for step in steps:
        if step.expect == "ok":
            valid += 1
            if flight_load is not None and valid % 4 == 1:
                # Every fourth valid rotation (the first included) lands just after a slow Flight
                # stream started, so at least one stream certainly runs across a swap; the others
                # fall wherever the streams happen to be.
                wait_until(flight_load.slow_stream_young, 30, interval=0.01)
        before = counter.read()
        log_from = len(rt.logs())
        layout.apply(step.changes)
        rotated, rotated_wall = time.monotonic(), time.time()
        report.rotations[step.expect] += 1
        report.expected[step.expect] += 1
        seen = wait_until(lambda s=step, b=before: counter.read().get(s.expect, 0) > b.get(s.expect, 0), STEP_TIMEOUT)
        counted = time.monotonic()
        if not seen:
            report.failures.append(f"{step.label}: not counted as {step.expect} within {STEP_TIMEOUT:.0f} s "
                                   f"(counts {counter.read()}, before {before})")
            continue
        after = counter.read()
        extras = {k: after.get(k, 0) - before.get(k, 0) - (k == step.expect) for k in after}
        extras = {k: v for k, v in extras.items() if v}
        applied.append(Applied(step, rotated, counted, log_from, extras))
        if step.expect == "ok":
            swapped = _swap_logged(rt, log_from)
            if swapped is not None:
                report.swaps.append(swapped - rotated_wall)
            # the next rotation starts once the probe has seen this one on every listener
            wait_until(lambda s=step, r=rotated: _seen_everywhere(probe, s, r), STEP_TIMEOUT)
    return applied


def _swap_logged(rt: Runtime, log_from: int) -> float | None:
    """Wall-clock time of the runtime's first `TLS reload: swapped` line after `log_from`."""
    for line in rt.logs()[log_from:]:
        if "TLS reload: swapped" in line:
            stamp = datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            return stamp.timestamp()
    return None


def _seen_everywhere(probe: Probe, step: Step, rotated: float) -> bool:
    seen = {r.listener for r in probe.snapshot() if r.started >= rotated and matches(r, step)}
    wanted = {"http", "flight", "metrics"} if step.serial is not None else {"http", "flight"}
    return wanted <= seen


# ------------------------------------------------------------------------------------------ main


def phases(valid: int, http_load: Literal["wrk", "python"]) -> list[PhaseSpec]:
    half = (valid + 1) // 2
    return [
        PhaseSpec("server certificate, atomic rename of plain files", "server", "plain", half,
                  SERVER_INVALID[:4], http_load),
        PhaseSpec("server certificate, kubelet ..data symlink swap", "server", "kubelet", valid - half,
                  SERVER_INVALID[4:], http_load),
        PhaseSpec("client CA bundle (mTLS required), atomic rename", "client_ca", "plain", half,
                  CA_INVALID[:3], http_load),
        PhaseSpec("client CA bundle (mTLS required), kubelet ..data swap", "client_ca", "kubelet", valid - half,
                  CA_INVALID[3:], http_load),
    ]


@contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="spiced-soak-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rotations", type=int, default=24,
                    help="valid rotations per kind (server certificate, client CA), split over two layouts")
    ap.add_argument("--quick", action="store_true", help="3 valid rotations per phase")
    ap.add_argument("--python-load", action="store_true", help="Python HTTP clients instead of wrk")
    args = ap.parse_args(argv)
    valid = 6 if args.quick else args.rotations
    http_load: Literal["wrk", "python"] = "python" if args.python_load else "wrk"
    missing = [t for t in ("wrk", "h2load") if shutil.which(t) is None]
    if http_load == "wrk" and not Stunnel.available():
        missing.append("stunnel4")
    if http_load == "wrk" and missing:
        print(f"soak: missing {', '.join(missing)}: install with `make load-tools` "
              "(Debian: apt-get install wrk nghttp2-client stunnel4), or run with --python-load", file=sys.stderr)
        return 2
    print(f"soak: {valid} valid rotations of the server certificate and {valid} of the client CA bundle, "
          f"poll interval {POLL:.0f} s, {os.cpu_count()} cores, HTTP load: {http_load}")
    reports = []
    with workdir() as work:
        write_workdir(work)
        pki = Pki.create(work / "pki")
        for spec in phases(valid, http_load):
            report = run_phase(spec, pki, work)
            report.print()
            reports.append(report)
    sent, failed = sum(r.sent for r in reports), sum(r.failed for r in reports)
    problems = sum(len(r.failures) for r in reports)
    rot = Counter[str]()
    for r in reports:
        for k, v in r.counts.items():
            rot[k] += v
    every = [d for r in reports for delays in r.delays.values() for d in delays]
    print("\n== total")
    print(f"  requests and streams sent: {sent}, failed: {failed}")
    print(f"  rotations counted by runtime_tls_reload_total: {dict(sorted(rot.items()))}")
    swaps = [d for r in reports for d in r.swaps]
    if swaps:
        print(f"  delay rotation -> swap logged by the runtime: {describe(swaps)}")
    if every:
        print(f"  delay rotation -> first handshake that saw it, all listeners: {describe(every)}")
    print(f"  result: {'PASS' if problems == 0 else f'FAIL ({problems} problems)'}")
    return 0 if problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

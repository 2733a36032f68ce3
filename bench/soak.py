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
import functools
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Literal

from bench.soak_load import H2loadLoop, HttpxH2Load, Stunnel, Wrk
from tests.pki import Pki
from tests.soak_rig import (
    CA_INVALID,
    POLL,
    SERVER_INVALID,
    PhaseSpec,
    describe,
    flight_streams,
    python_http_load,
    run_phase,
    write_workdir,
)
from tests.soak_traffic import Load
from tests.support import Runtime


def soak_loads(spec: PhaseSpec, rt: Runtime, pki: Pki, stack: ExitStack,
               http_load: Literal["wrk", "python"]) -> list[Load]:
    """The full soak's loads (tests.soak_rig.run_phase starts them): HTTP/1.1 from wrk or Python,
    HTTP/2 from h2load and httpx, and Flight DoGet streams."""
    mtls = spec.kind == "client_ca"
    loads: list[Load] = []
    cert, key = (pki.client.cert, pki.client.key) if mtls else (None, None)
    if http_load == "wrk":
        url = rt.http_url
        if mtls:
            tunnel = Stunnel(rt.http_port, pki.ca.cert, pki.client.cert, pki.client.key)
            stack.callback(tunnel.stop)
            url = f"http://127.0.0.1:{tunnel.port}"
        via = " via stunnel" if mtls else ""
        loads += [Wrk(f"wrk /v1/sql, 16 keep-alive conns{via}", url + "/v1/sql", connections=16),
                  Wrk(f"wrk /v1/sql, new conn per request{via}", url + "/v1/sql", connections=2, new_connections=True)]
    else:
        loads.append(python_http_load(spec, rt, pki))
    if not mtls:  # h2load presents no client certificate, and through stunnel it would get no ALPN
        loads.append(H2loadLoop("h2load /v1/sql over h2, new conns per round", rt.http_url + "/v1/sql"))
    # the client certificate is the load's own (pki.client), as for wrk/stunnel and Flight: its CA
    # is in every bundle the CA rotations install, so it must be accepted throughout
    loads.append(HttpxH2Load(f"httpx h2 long-lived + new conns{', client cert' if mtls else ''}",
                             rt.http_url + "/v1/sql", pki.ca.cert, cert, key))
    if spec.flight:
        loads.append(flight_streams(spec, rt, pki))
    return loads


# ------------------------------------------------------------------------------------------ main


def phases(valid: int) -> list[PhaseSpec]:
    half = (valid + 1) // 2
    return [
        PhaseSpec("server certificate, atomic rename of plain files", "server", "plain", half,
                  SERVER_INVALID[:4]),
        PhaseSpec("server certificate, kubelet ..data symlink swap", "server", "kubelet", valid - half,
                  SERVER_INVALID[4:]),
        PhaseSpec("client CA bundle (mTLS required), atomic rename", "client_ca", "plain", half,
                  CA_INVALID[:3]),
        PhaseSpec("client CA bundle (mTLS required), kubelet ..data swap", "client_ca", "kubelet", valid - half,
                  CA_INVALID[3:]),
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
        loads = functools.partial(soak_loads, http_load=http_load)
        for spec in phases(valid):
            report = run_phase(spec, pki, work, loads)
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

"""A phase of the soak (bench/soak.py, `make soak`; its fast variant is tests/test_rotation_load.py):
a fresh `spiced` with TLS on every listener, its material rotated again and again in one layout
while loads and a probe run, then judged.

What is set up and rotated: the work directory (spicepod, data), the material on disk in either
layout, and the plan of valid and invalid rotations for each kind of phase.

    layout = Layout(dir, "kubelet", {"tls.crt": ..., "tls.key": ...})
    for step in server_plan(pki, valid=12, invalid=SERVER_INVALID[:3], method="kubelet"):
        layout.apply(step.changes)      # then wait for runtime_tls_reload_total{result=step.expect}

How a phase is judged: counts from /metrics against the rotations applied, one WARN line per
invalid rotation, no key bytes or tracebacks in the log, and every probe handshake against the
timeline of swaps (which certificate or CA bundle it could have met), with the longest delay from a
rotation to the first handshake that saw it. `PhaseReport.print` is the table `make soak` shows.

    report = run_phase(spec, pki, work)           # the loads: python_loads, or the caller's own
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.hazmat.primitives import serialization

from tests.pki import Issued, Pki
from tests.soak_traffic import (
    FlightLoad,
    FlightTarget,
    Load,
    LoadResult,
    Probe,
    ProbeRecord,
    PyHttpLoad,
    ReloadCounter,
    client_ctx,
    probe_contexts,
    probe_targets,
)
from tests.support import Runtime, run_spiced
from tests.tlsprobe import TimedOut, wait_for

POLL = 2.0  # the runtime's polling interval
# A rotation must reach a fresh handshake within one poll interval plus this much slack for a
# loaded event loop and the probe's own pace (one handshake after another, per listener).
DELAY_SLACK = 1.5


# --------------------------------------------------------------------------------------------- plan


FLIGHT_ROWS = 200_000

DELETE = "<delete>"  # step contents that are not bytes
DIRECTORY = "<directory>"
Content = bytes | str

SPICEPOD = """version: v1
kind: Spicepod
name: soak
datasets:
  - from: file:trips.csv
    name: trips
    acceleration:
      enabled: true
  - from: file:numbers.parquet
    name: numbers
    acceleration:
      enabled: true
"""
TRIPS_CSV = "id,city,fare\n1,Seattle,12.5\n2,Portland,8.25\n3,Seattle,30.0\n"
FLIGHT_SQL = "SELECT id, v FROM numbers"


def write_workdir(directory: Path, rows: int = FLIGHT_ROWS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spicepod.yaml").write_text(SPICEPOD)
    (directory / "trips.csv").write_text(TRIPS_CSV)
    ids = pa.array(range(rows), pa.int64())
    pq.write_table(pa.table({"id": ids, "v": pa.array([i * 0.5 for i in range(rows)], pa.float64())}),
                   directory / "numbers.parquet")
    return directory


class Layout:
    """The directory the runtime reads its material from, and how a rotation lands there.

    plain:   `tls.crt`, `tls.key`, `ca.crt` are regular files; a rotation writes each changed file
             to a temporary name and renames it over the old one (key before certificate).
    kubelet: as a Kubernetes secret volume: `tls.crt -> ..data/tls.crt`, `..data -> ..<gen>/`; a
             rotation writes a complete new generation directory and re-points `..data` atomically.
    """

    def __init__(self, directory: Path, kind: Literal["plain", "kubelet"], files: dict[str, bytes]) -> None:
        self.dir, self.kind = directory, kind
        self.current: dict[str, Content] = dict(files)
        self._gen = 0
        directory.mkdir(parents=True, exist_ok=True)
        if kind == "plain":
            for name, data in files.items():
                (directory / name).write_bytes(data)
        else:
            self._write_generation()
            for name in files:
                (directory / name).symlink_to(Path("..data") / name)

    def path(self, name: str) -> Path:
        return self.dir / name

    def apply(self, changes: dict[str, Content]) -> None:
        self.current.update(changes)
        if self.kind == "kubelet":
            self._write_generation()
            return
        for name in sorted(changes, key=lambda n: n != "tls.key"):  # key first, then the rest
            _put(self.dir / name, changes[name])

    def _write_generation(self) -> None:
        self._gen += 1
        gen = self.dir / f"..gen_{self._gen:04d}"
        gen.mkdir()
        for name, content in self.current.items():
            _put(gen / name, content)
        link = self.dir / "..data"
        old = link.resolve() if link.is_symlink() else None
        tmp = self.dir / "..data_tmp"
        tmp.symlink_to(gen.name)
        os.replace(tmp, link)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _put(path: Path, content: Content) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    if content == DELETE:
        path.unlink(missing_ok=True)
    elif content == DIRECTORY:
        path.unlink(missing_ok=True)
        path.mkdir()
    else:
        assert isinstance(content, bytes)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)


@dataclass
class Step:
    label: str
    changes: dict[str, Content]
    expect: Literal["ok", "parse_error", "io_error"]
    message: str | None = None  # the WARN line an invalid rotation must log (a substring)
    serial: int | None = None  # server phases: the serial served after a valid rotation
    foreign: bool | None = None  # CA phases: whether the foreign-CA client is accepted afterwards


def encrypted(key: Issued) -> bytes:
    private = serialization.load_pem_private_key(key.key_pem, password=None)
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.BestAvailableEncryption(b"soak-password"))


SERVER_INVALID = ("garbage", "truncated", "mismatched_key", "encrypted_key", "deleted", "directory", "empty")
CA_INVALID = ("garbage", "truncated", "empty", "key_instead", "deleted", "directory")


def server_invalid(kind: str, current: Issued, other: Issued) -> Step:
    pem = current.cert_pem
    cases: dict[str, Step] = {
        "garbage": Step("garbage PEM", {"tls.crt": b"this is not a certificate\n" * 4}, "parse_error",
                        "rejected new material, keeping old: TLS PEM contained no certificates"),
        "truncated": Step("truncated PEM", {"tls.crt": pem[: len(pem) // 2]}, "parse_error",
                          "rejected new material, keeping old: failed to parse TLS certificate"),
        "mismatched_key": Step("key of another certificate", {"tls.key": other.key_pem}, "parse_error",
                               "rejected new material, keeping old: TLS certificate and private key do not match"),
        "encrypted_key": Step("encrypted key", {"tls.key": encrypted(current)}, "parse_error",
                              "rejected new material, keeping old: failed to parse TLS private key"),
        "deleted": Step("certificate deleted", {"tls.crt": DELETE}, "io_error",
                        "failed to read cert file: No such file or directory (os error 2)"),
        "directory": Step("directory in place of the certificate", {"tls.crt": DIRECTORY}, "io_error",
                          "failed to read cert file: Is a directory (os error 21)"),
        "empty": Step("empty certificate file", {"tls.crt": b""}, "parse_error",
                      "rejected new material, keeping old: TLS PEM contained no certificates"),
    }
    return cases[kind]


def server_plan(pki: Pki, valid: int, invalid: tuple[str, ...], method: str) -> Iterator[Step]:
    """`valid` rotations to new leaves, with the invalid ones spread between them. Issued lazily so
    that each invalid case is built against the certificate current at that point."""
    every = max(1, valid // (len(invalid) + 1))
    current = pki.server
    pending = list(invalid)
    for i in range(valid):
        leaf = pki.issue_server(f"soak-{method}-{i}")
        yield Step(f"{method} {i + 1}", {"tls.key": leaf.key_pem, "tls.crt": leaf.cert_pem}, "ok", serial=leaf.serial)
        current = leaf
        if pending and (i + 1) % every == 0:
            yield server_invalid(pending.pop(0), current, pki.client)
    for kind in pending:
        yield server_invalid(kind, current, pki.client)
    # end on a valid rotation, so that every invalid file was replaced while traffic ran
    if invalid:
        leaf = pki.issue_server(f"soak-{method}-final")
        yield Step(f"{method} {valid + 1}", {"tls.key": leaf.key_pem, "tls.crt": leaf.cert_pem}, "ok",
                   serial=leaf.serial)


def ca_invalid(kind: str, pki: Pki) -> Step:
    pem = pki.client_ca.cert_pem
    cases = {
        "garbage": Step("garbage PEM", {"ca.crt": b"not a CA bundle\n"}, "parse_error",
                        "rejected new client CA bundle, keeping old: client CA bundle contained no certificates"),
        "truncated": Step("truncated PEM", {"ca.crt": pem[: len(pem) // 2]}, "parse_error",
                          "rejected new client CA bundle, keeping old: failed to parse client CA bundle"),
        "empty": Step("empty bundle", {"ca.crt": b""}, "parse_error",
                      "rejected new client CA bundle, keeping old: client CA bundle contained no certificates"),
        "key_instead": Step("a private key instead of CAs", {"ca.crt": pki.client.key_pem}, "parse_error",
                            "rejected new client CA bundle, keeping old: client CA bundle contained no certificates"),
        "deleted": Step("bundle deleted", {"ca.crt": DELETE}, "io_error",
                        "failed to read client CA file: No such file or directory (os error 2)"),
        "directory": Step("directory in place of the bundle", {"ca.crt": DIRECTORY}, "io_error",
                          "failed to read client CA file: Is a directory (os error 21)"),
    }
    return cases[kind]


def ca_plan(pki: Pki, valid: int, invalid: tuple[str, ...], method: str) -> Iterator[Step]:
    """Bundles that alternately trust and stop trusting the foreign CA (the load's own client CA
    is always in), so every valid rotation changes who a new connection admits."""
    ours, foreign = pki.client_ca.cert_pem, pki.foreign_ca.cert_pem
    with_foreign = [ours + foreign, foreign + ours, ours + foreign + ours]
    every = max(1, valid // (len(invalid) + 1))
    pending = list(invalid)
    trusted = False  # the initial bundle holds only our client CA

    def flip(i: int) -> Step:
        nonlocal trusted
        trusted = not trusted
        if trusted:
            return Step(f"{method} {i}: add foreign CA", {"ca.crt": with_foreign[i % 3]}, "ok", foreign=True)
        return Step(f"{method} {i}: remove foreign CA", {"ca.crt": ours}, "ok", foreign=False)

    for i in range(valid):
        yield flip(i + 1)
        if pending and (i + 1) % every == 0:
            yield ca_invalid(pending.pop(0), pki)
    for kind in pending:
        yield ca_invalid(kind, pki)
    if invalid:
        yield flip(valid + 1)


@dataclass
class PhaseSpec:
    title: str
    kind: Literal["server", "client_ca"]
    layout: Literal["plain", "kubelet"]
    valid: int
    invalid: tuple[str, ...]
    flight: bool = True  # the loads include Flight DoGet streams
    rows: int = FLIGHT_ROWS  # rows of the `numbers` dataset in the workdir (see write_workdir)


# -------------------------------------------------------------------------------------------- phase


STEP_TIMEOUT = 2 * POLL + 8.0  # a rotation not counted by then is a failure

# Builds a phase's loads, not yet started (run_phase starts them); may leave cleanups on the stack.
LoadSet = Callable[[PhaseSpec, Runtime, Pki, ExitStack], list[Load]]


def python_http_load(spec: PhaseSpec, rt: Runtime, pki: Pki) -> PyHttpLoad:
    cert, key = (pki.client.cert, pki.client.key) if spec.kind == "client_ca" else (None, None)
    return PyHttpLoad("python /v1/sql, 16 keep-alive + 2 new-conn", rt.http_port,
                      client_ctx(pki.ca.cert, cert, key), keepalive=16, fresh=2)


def flight_streams(spec: PhaseSpec, rt: Runtime, pki: Pki) -> FlightLoad:
    mtls = spec.kind == "client_ca"
    target = FlightTarget(rt.flight_uri.replace("127.0.0.1", "localhost"), pki.ca.cert_pem,
                          pki.client.cert_pem if mtls else None, pki.client.key_pem if mtls else None)
    return FlightLoad("flight DoGet streams", target, FLIGHT_SQL, spec.rows, spec.rows * (spec.rows - 1) // 2)


def python_loads(spec: PhaseSpec, rt: Runtime, pki: Pki, stack: ExitStack) -> list[Load]:
    """The loads that need nothing installed: HTTP/1.1 from Python, and Flight DoGet streams."""
    loads: list[Load] = [python_http_load(spec, rt, pki)]
    if spec.flight:
        loads.append(flight_streams(spec, rt, pki))
    return loads


def run_phase(spec: PhaseSpec, pki: Pki, work: Path, make_loads: LoadSet = python_loads) -> PhaseReport:
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
        loads = make_loads(spec, rt, pki, stack)
        _start(loads)
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
            # If none ran across a rotation after all, FlightLoad.across reports it.
            with suppress(TimedOut):
                wait_for(lambda: flight_load.spanning(windows)["slow"] > 0, flight_load.slow_seconds + 15)
        probe.stop()
        report.loads = [load.stop() for load in loads]
        running.clear()
        for load in loads:
            report.failures += load.across(windows)
        report.counts = counter.read()
        check_phase(spec, report, applied, probe.records, rt, pki)
    report.seconds = time.monotonic() - started
    for r in report.loads:
        if r.failed:
            report.failures.append(f"{r.name}: {r.failed} failed of {r.sent}")
    return report


def _start(loads: list[Load]) -> None:
    """Start every load, or none: those already started stop again if one fails to."""
    for i, load in enumerate(loads):
        try:
            load.start()
        except BaseException:
            for started in loads[:i]:
                started.stop()
            raise


def rotate(spec: PhaseSpec, layout: Layout, steps: Iterator[Step], rt: Runtime, counter: ReloadCounter,
           probe: Probe, report: PhaseReport, flight_load: FlightLoad | None) -> list[Applied]:
    applied: list[Applied] = []
    # let the load reach steady state before the first rotation, and see the initial certificate
    with suppress(TimedOut):
        wait_for(lambda: len(probe.snapshot()) >= 3 * probe.streams, 30)
    valid = 0
    for step in steps:
        if step.expect == "ok":
            valid += 1
            if flight_load is not None and valid % 4 == 1:
                # Every fourth valid rotation (the first included) lands just after a slow Flight
                # stream started, so at least one stream certainly runs across a swap; the others
                # fall wherever the streams happen to be.
                with suppress(TimedOut):
                    wait_for(flight_load.slow_stream_young, 30, interval=0.01)
        before = counter.read()
        log_from = len(rt.logs())
        layout.apply(step.changes)
        rotated, rotated_wall = time.monotonic(), time.time()
        report.rotations[step.expect] += 1
        report.expected[step.expect] += 1
        try:
            wait_for(lambda s=step, b=before: counter.read().get(s.expect, 0) > b.get(s.expect, 0), STEP_TIMEOUT)
        except TimedOut:
            report.failures.append(f"{step.label}: not counted as {step.expect} within {STEP_TIMEOUT:.0f} s "
                                   f"(counts {counter.read()}, before {before})")
            continue
        counted = time.monotonic()
        after = counter.read()
        extras = {k: after.get(k, 0) - before.get(k, 0) - (k == step.expect) for k in after}
        extras = {k: v for k, v in extras.items() if v}
        applied.append(Applied(step, rotated, counted, log_from, extras))
        if step.expect == "ok":
            swapped = _swap_logged(rt, log_from)
            if swapped is not None:
                report.swaps.append(swapped - rotated_wall)
            # the next rotation starts once the probe has seen this one on every listener (if it
            # never does, check_phase reports it)
            with suppress(TimedOut):
                wait_for(lambda s=step, r=rotated: _seen_everywhere(probe, s, r), STEP_TIMEOUT)
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


# ------------------------------------------------------------------------------------------ judging


@dataclass
class Applied:
    step: Step
    rotated: float  # monotonic time the files were in place
    counted: float  # monotonic time /metrics showed the attempt (the swap, if any, happened before)
    log_from: int  # index of the first runtime log line after the rotation
    extras: dict[str, int] = field(default_factory=dict)  # other results counted meanwhile (split writes)


def describe(delays: list[float]) -> str:
    """p50 and max of rotation delays, in seconds."""
    return f"p50 {statistics.median(delays):.2f} s, max {max(delays):.2f} s ({len(delays)})"


@dataclass
class PhaseReport:
    spec: PhaseSpec
    seconds: float = 0.0
    loads: list[LoadResult] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    expected: Counter[str] = field(default_factory=Counter)
    extras: Counter[str] = field(default_factory=Counter)
    handshakes: dict[str, Counter[str]] = field(default_factory=dict)  # serial/outcome -> listener -> n
    delays: dict[str, list[float]] = field(default_factory=dict)  # listener -> each rotation's delay
    swaps: list[float] = field(default_factory=list)  # each valid rotation -> the runtime's swap line
    failures: list[str] = field(default_factory=list)
    rotations: Counter[str] = field(default_factory=Counter)

    @property
    def sent(self) -> int:
        return sum(r.sent for r in self.loads)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.loads)

    def print(self, out: object = sys.stdout) -> None:
        def p(*a: object) -> None:
            print(*a, file=out)

        p(f"\n== {self.spec.title}  ({self.seconds:.0f} s)")
        p(f"  {'load':44} {'sent':>8} {'failed':>7}  detail")
        for r in self.loads:
            p(f"  {r.name:44} {r.sent:>8} {r.failed:>7}  {r.detail}")
            for e in r.errors:
                p(f"      ! {e}")
        p(f"  {'total':44} {self.sent:>8} {self.failed:>7}")
        p(f"  rotations applied: {dict(self.rotations)}")
        got = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        want = ", ".join(f"{k}={v}" for k, v in sorted(self.expected.items()))
        extra = f"; split-write attempts between two renames: {dict(self.extras)}" if self.extras else ""
        p(f"  runtime_tls_reload_total{{scope=\"public\"}}: {got}  (rotations: {want}{extra})")
        p("  handshakes seen:")
        for what, per_listener in self.handshakes.items():
            cells = "  ".join(f"{k} {v:>5}" for k, v in sorted(per_listener.items()))
            p(f"    {what:44} {cells}")
        if self.swaps:
            p(f"  delay rotation -> swap logged by the runtime: {describe(self.swaps)}")
        delays = ", ".join(f"{k} {describe(v)}" for k, v in sorted(self.delays.items()))
        p(f"  delay rotation -> first handshake that saw it: {delays}  (bound {POLL + DELAY_SLACK:.1f} s)")
        p("  failures: " + ("none" if not self.failures else ""))
        for f in self.failures[:30]:
            p(f"    ! {f}")
        if len(self.failures) > 30:
            p(f"    ! … and {len(self.failures) - 30} more")


def matches(rec: ProbeRecord, step: Step) -> bool:
    if step.serial is not None:
        return rec.serial == step.serial
    if rec.who != "foreign":
        return False
    return (rec.serial is not None) == step.foreign


def check_phase(spec: PhaseSpec, report: PhaseReport, applied: list[Applied], records: list[ProbeRecord],
                rt: Runtime, pki: Pki) -> None:
    logs = rt.logs()
    fail = report.failures.append
    # counters: exactly one count per rotation; other counts only as split writes of the plain layout
    for a in applied:
        for k, v in a.extras.items():
            if a.step.expect == "ok" and spec.layout == "plain" and k in ("parse_error", "io_error") and v == 1:
                report.extras[k] += 1
            else:
                fail(f"{a.step.label}: unexpected extra reload results {a.extras}")
    want = report.expected + report.extras
    for result in ("ok", "parse_error", "io_error"):
        if report.counts.get(result, 0) != want.get(result, 0):
            fail(f"runtime_tls_reload_total result={result}: {report.counts.get(result, 0)}, "
                 f"expected {want.get(result, 0)}")
    # one clear WARN line per invalid rotation
    ends = [a.log_from for a in applied[1:]] + [len(logs)]
    for a, end in zip(applied, ends, strict=False):
        warns = [ln for ln in logs[a.log_from:end] if " WARN runtime::tls::reload:" in ln]
        if a.step.expect != "ok":
            if len(warns) != 1 or a.step.message not in warns[0]:
                fail(f"{a.step.label}: expected one WARN line containing {a.step.message!r}, got {warns}")
        elif len(warns) != sum(a.extras.values()):
            fail(f"{a.step.label}: unexpected WARN lines {warns}")
    tracebacks = [ln for ln in logs if "Traceback" in ln]
    if tracebacks:
        fail(f"traceback in the runtime log: {tracebacks[:2]}")
    # no key bytes in any log line
    keys = [pki.server.key, pki.client.key] + sorted(pki.directory.glob("soak-*.key"))
    text = "\n".join(logs)
    for key in keys:
        for line in key.read_text().splitlines():
            if line.startswith("-----"):
                continue
            for i in range(0, max(1, len(line) - 16), 8):
                if line[i:i + 16] in text:
                    fail(f"bytes of {key.name} in the runtime log")
                    break
    if spec.kind == "server":
        _check_server_probes(report, applied, records, pki)
    else:
        _check_ca_probes(report, applied, records)


def _check_server_probes(report: PhaseReport, applied: list[Applied], records: list[ProbeRecord], pki: Pki) -> None:
    valid = [a for a in applied if a.step.expect == "ok"]
    initial = pki.server.serial
    names = {initial: f"{initial:x}"[:12] + " (initial)"}
    for i, a in enumerate(valid, 1):
        assert a.step.serial is not None
        names[a.step.serial] = f"{a.step.serial:x}"[:12] + f" (rotation {i})"
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for rec in records:
        if rec.serial is None:
            report.failures.append(f"probe {rec.listener}: refused: {rec.error}")
            continue
        table[names.get(rec.serial, f"{rec.serial:x}"[:12] + " (unknown!)")][rec.listener] += 1
        # served serial must be the current one, or (during a rotation window) the next one
        allowed = {initial}
        for a in valid:
            if a.counted <= rec.started:
                allowed = {a.step.serial}  # type: ignore[set-item]
            elif a.rotated < rec.ended:
                allowed.add(a.step.serial)  # type: ignore[arg-type]
        if rec.serial not in allowed:
            report.failures.append(f"probe {rec.listener} at +{rec.started:.2f}: served {rec.serial:x}, "
                                   f"expected one of {[f'{s:x}' for s in allowed]}")
    report.handshakes = dict(table)
    for a in valid:
        for listener in ("http", "flight", "metrics"):
            first = next((r for r in records if r.listener == listener and r.started >= a.rotated
                          and r.serial == a.step.serial), None)
            if first is None:
                report.failures.append(f"{a.step.label}: never served on {listener}")
                continue
            # To the handshake that was served the new certificate, not to the end of its request
            # (which on a loaded HTTP listener waits its turn behind the load).
            report.delays.setdefault(listener, []).append((first.handshaked or first.ended) - a.rotated)
    for listener, delays in report.delays.items():
        if max(delays) > POLL + DELAY_SLACK:
            report.failures.append(f"{listener}: a rotation took {max(delays):.2f} s to reach a new handshake")


def _check_ca_probes(report: PhaseReport, applied: list[Applied], records: list[ProbeRecord]) -> None:
    valid = [a for a in applied if a.step.expect == "ok"]
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for rec in records:
        accepted = rec.serial is not None
        who = "client of the load's CA" if rec.who == "client" else "client of the rotated (foreign) CA"
        table[f"{who} {'accepted' if accepted else 'refused'}"][rec.listener] += 1
        if rec.listener == "metrics":
            if not accepted:
                report.failures.append(f"probe metrics ({rec.who}): refused: {rec.error}")
            continue
        if rec.who == "client":
            if not accepted:
                report.failures.append(f"probe {rec.listener}: our client refused: {rec.error}")
            continue
        allowed = {False}  # the initial bundle has only our client CA
        for a in valid:
            if a.counted <= rec.started:
                allowed = {bool(a.step.foreign)}
            elif a.rotated < rec.ended:
                allowed.add(bool(a.step.foreign))
        if accepted not in allowed:
            report.failures.append(f"probe {rec.listener}: foreign client {'accepted' if accepted else 'refused'} "
                                   f"at +{rec.started:.2f} ({rec.error}), bundle said {allowed}")
    report.handshakes = dict(table)
    for a in valid:
        for listener in ("http", "flight"):
            first = next((r for r in records if r.listener == listener and r.who == "foreign"
                          and r.started >= a.rotated and (r.serial is not None) == a.step.foreign), None)
            if first is None:
                report.failures.append(f"{a.step.label}: never took effect on {listener}")
                continue
            report.delays.setdefault(listener, []).append(first.ended - a.rotated)
    for listener, delays in report.delays.items():
        if max(delays) > POLL + DELAY_SLACK:
            report.failures.append(f"{listener}: a CA rotation took {max(delays):.2f} s to reach a new handshake")

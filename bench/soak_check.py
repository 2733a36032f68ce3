"""Judging a soak phase: counts from /metrics against the rotations applied, one WARN line per
invalid rotation, no key bytes or tracebacks in the log, and every probe handshake against the
timeline of swaps (which certificate or CA bundle it could have met), with the longest delay from a
rotation to the first handshake that saw it. `PhaseReport.print` is the table `make soak` shows.
"""

from __future__ import annotations

import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from bench.soak_load import LoadResult
from bench.soak_plan import PhaseSpec, Step
from bench.soak_probe import ProbeRecord
from tests.pki import Pki
from tests.support import Runtime

POLL = 2.0  # the runtime's polling interval
# A rotation must reach a fresh handshake within one poll interval plus this much slack for a
# loaded event loop and the probe's own pace (one handshake after another, per listener).
DELAY_SLACK = 1.5


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

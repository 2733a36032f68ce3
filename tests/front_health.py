"""The health of a running runtime's Flight TLS front, checked after each thing a client did to it.

    health = FrontHealth.of(rt, pki)        # baseline: the front's pid, fds and RSS while idle
    ... a client does something odd ...
    health.check()                          # a fresh client is served, the front is idle and leaks nothing

`check` asserts, in this order:
  - the front process is the same one (nothing crashed and was quietly restarted);
  - a fresh pyarrow client is served `SELECT 1` over TLS (with the client certificate when given);
  - its open file descriptors come back to the baseline (a few seconds allowed for lingering closes);
  - its CPU time does not grow while nobody talks to it, measured over `idle_seconds` (>= 1 s);
  - its RSS stays within `rss_margin` bytes of the baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil
import pyarrow.flight as fl

from tests.pki import Pki
from tests.support import Runtime

IDLE_CPU_SECONDS = 0.05  # CPU the front may spend over an idle second (timers, the watchdog's pings)
RSS_MARGIN = 40 * 1024 * 1024


def front_process(rt: Runtime) -> psutil.Process:
    """The runtime's Flight TLS front (its child running spiced.flight.front_process)."""
    deadline = time.monotonic() + 10.0
    while True:
        for child in psutil.Process(rt.proc.pid).children():
            try:
                if "spiced.flight.front_process" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                    return child
            except psutil.NoSuchProcess:
                continue
        if time.monotonic() > deadline:
            raise AssertionError("no Flight TLS front process under the runtime")
        time.sleep(0.05)


def served(rt: Runtime, pki: Pki, *, client_cert: bool = False) -> None:
    """A fresh pyarrow Flight client gets `SELECT 1` over TLS."""
    kw: dict[str, bytes] = {}
    if client_cert:
        kw = {"cert_chain": pki.client.cert.read_bytes(), "private_key": pki.client.key.read_bytes()}
    client = fl.FlightClient(rt.flight_uri, tls_root_certs=pki.ca.cert.read_bytes(), **kw)
    try:
        table = client.do_get(fl.Ticket(b"SELECT 1 AS one"), fl.FlightCallOptions(timeout=10)).read_all()
        assert table.to_pylist() == [{"one": 1}]
    finally:
        client.close()


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


@dataclass
class FrontHealth:
    rt: Runtime
    pki: Pki
    pid: int
    fds: int
    rss: int
    client_cert: bool = False

    @classmethod
    def of(cls, rt: Runtime, pki: Pki, *, client_cert: bool = False) -> FrontHealth:
        """The baseline, taken after one served call so that every lazy allocation is done."""
        served(rt, pki, client_cert=client_cert)
        proc = front_process(rt)
        health = cls(rt, pki, proc.pid, 0, 0, client_cert)
        health.fds = health._settled_fds(proc, None)
        health.rss = proc.memory_info().rss
        return health

    def _settled_fds(self, proc: psutil.Process, target: int | None, timeout: float = 5.0) -> int:
        """The front's fd count once it stops changing (or reaches `target`)."""
        deadline = time.monotonic() + timeout
        last = proc.num_fds()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = proc.num_fds()
            if (target is not None and now <= target) or (target is None and now == last):
                return now
            last = now
        return last

    def check(self, what: str = "", *, idle_seconds: float = 1.0) -> None:
        label = f" after {what}" if what else ""
        proc = front_process(self.rt)
        assert proc.pid == self.pid, f"the front was restarted{label} (pid {self.pid} -> {proc.pid})"
        served(self.rt, self.pki, client_cert=self.client_cert)
        fds = self._settled_fds(proc, self.fds)
        assert fds <= self.fds, f"the front holds {fds} descriptors{label}, {self.fds} before"
        before = _cpu(proc)
        time.sleep(max(idle_seconds, 1.0))
        spent = _cpu(proc) - before
        assert spent < IDLE_CPU_SECONDS * max(idle_seconds, 1.0), f"the idle front spent {spent:.3f} CPU-s{label}"
        rss = proc.memory_info().rss
        assert rss < self.rss + RSS_MARGIN, f"the front's RSS grew from {self.rss} to {rss}{label}"

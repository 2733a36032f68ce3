"""The soak's observers: a probe that makes fresh handshakes on every listener and records the
certificate each was served (or that it was refused), and the reload counter read from /metrics.

    probe = Probe(probe_targets(http, flight, metrics), {"-": probe_contexts(ca)}); probe.start()
    ...; probe.stop(); probe.records            # ProbeRecord(listener, who, started, ended, serial, error)
    ReloadCounter(metrics_url, ca).read()       # {"ok": 3, "parse_error": 1}
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class ProbeTarget:
    listener: str  # "http", "flight", "metrics"
    port: int
    alpn: str  # the protocol the handshake must negotiate
    request: bytes | None  # an HTTP/1.1 request expecting 200; None: send the h2 preface (Flight)


@dataclass(frozen=True)
class ProbeRecord:
    listener: str
    who: str  # which client certificate was presented ("-" for none)
    started: float
    ended: float
    serial: int | None  # None: the connection was refused
    error: str | None
    handshaked: float | None = None  # when the TLS handshake completed (the served certificate is known)


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def probe_once(target: ProbeTarget, ctx: ssl.SSLContext, timeout: float = 15.0,
               handshaked: list[float] | None = None) -> tuple[int | None, str | None]:
    """One fresh connection: full handshake, then one request (HTTP) or the h2 preface (Flight) and
    an answer read back, because under TLS 1.3 a refused client certificate shows only on the first
    read. Returns (served serial, None) or (None, reason refused)."""
    try:
        with socket.create_connection(("127.0.0.1", target.port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            if handshaked is not None:
                handshaked.append(time.monotonic())
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            serial = x509.load_der_x509_certificate(der).serial_number
            if tls.selected_alpn_protocol() != target.alpn:
                return None, f"ALPN {tls.selected_alpn_protocol()!r}, expected {target.alpn!r}"
            if target.request is None:
                tls.sendall(H2_PREFACE)
                answer = b""
                while len(answer) < 9:  # the header of the server's SETTINGS frame
                    chunk = tls.recv(9 - len(answer))
                    if not chunk:
                        return None, f"connection closed after the handshake; got {answer!r}"
                    answer += chunk
                if answer[3:4] != b"\x04":
                    return None, f"unexpected h2 frame {answer!r}"
                return serial, None
            tls.sendall(target.request)
            data = b""
            while b"\r\n" not in data:
                chunk = tls.recv(4096)
                if not chunk:
                    return None, f"connection closed; got {data!r}"
                data += chunk
            status = data.split(b"\r\n", 1)[0]
            if b" 200 " not in status + b" ":
                return None, f"status line {status!r}"
            return serial, None
    except (OSError, ssl.SSLError) as e:
        return None, f"{type(e).__name__}: {e}"


def http_probe_request(body: bytes = b"SELECT 1") -> bytes:
    return (b"POST /v1/sql HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


class Probe:
    """Fresh handshakes against every target, one thread per target and client certificate, back to
    back with `gap` seconds between them, each recorded with the serial the server presented.
    `clients` maps a name (which certificate it presents) to its client contexts by ALPN protocol
    (see `probe_contexts`)."""

    def __init__(self, targets: list[ProbeTarget], clients: dict[str, dict[str, ssl.SSLContext]],
                 gap: float = 0.02, parallel: int = 3) -> None:
        self._targets, self._clients, self._gap = targets, clients, gap
        self.records: list[ProbeRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Several staggered probes per target: a rotation's first new handshake is then not held
        # back by a probe that started just before it and is still waiting behind the load.
        self._threads = [threading.Thread(target=self._run, args=(t, who, contexts[t.alpn], n * gap),
                                          name=f"soak-probe-{who}-{t.listener}-{n}", daemon=True)
                         for who, contexts in clients.items() for t in targets for n in range(parallel)]

    def _run(self, target: ProbeTarget, who: str, ctx: ssl.SSLContext, delay: float = 0.0) -> None:
        self._stop.wait(delay)
        while not self._stop.is_set():
            self.record(self.once(target, who, ctx))
            self._stop.wait(self._gap)

    @staticmethod
    def once(target: ProbeTarget, who: str, ctx: ssl.SSLContext) -> ProbeRecord:
        started, handshaked = time.monotonic(), []
        serial, error = probe_once(target, ctx, handshaked=handshaked)
        return ProbeRecord(target.listener, who, started, time.monotonic(), serial, error,
                           handshaked[0] if handshaked else None)

    def record(self, rec: ProbeRecord) -> None:
        with self._lock:
            self.records.append(rec)

    def snapshot(self) -> list[ProbeRecord]:
        with self._lock:
            return list(self.records)

    @property
    def streams(self) -> int:
        return len(self._threads)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def probe_targets(http_port: int, flight_port: int, metrics_port: int | None) -> list[ProbeTarget]:
    targets = [ProbeTarget("http", http_port, "http/1.1", http_probe_request()),
               ProbeTarget("flight", flight_port, "h2", None)]
    if metrics_port is not None:
        targets.append(ProbeTarget("metrics", metrics_port, "http/1.1", GET_HEALTH))
    return targets


def client_ctx(ca: Path, cert: Path | None = None, key: Path | None = None, alpn: str = "http/1.1") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols([alpn])
    return ctx


def probe_contexts(ca: Path, cert: Path | None = None, key: Path | None = None) -> dict[str, ssl.SSLContext]:
    """One context per ALPN protocol the targets need, keyed by protocol."""
    return {alpn: client_ctx(ca, cert, key, alpn) for alpn in ("http/1.1", "h2")}


# ------------------------------------------------------------------------------------------ metrics


class ReloadCounter:
    """`runtime_tls_reload_total{scope="public"}` by result, read from a /metrics endpoint."""

    def __init__(self, url: str, ca: Path) -> None:
        import httpx

        self._client = httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=30)
        self._url = url + "/metrics"

    def read(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        text = self._client.get(self._url).raise_for_status().text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "runtime_tls_reload_total" and sample.labels.get("scope") == "public":
                    counts[sample.labels["result"]] = int(sample.value)
        return counts

    def close(self) -> None:
        self._client.close()

"""The certificates the runtime serves and trusts, and how close each is to its end.

Operators learn of an expiry before clients fail, three ways:
  - metrics, named after the x509-certificate-exporter's family (the de facto convention; upstream
    has none): `x509_cert_not_after` and `x509_cert_not_before`, Unix seconds, labelled `scope`
    (`public`, or `cluster` for a cluster node's mTLS material), `kind` (`server` or `client_ca`),
    `subject_CN` and `serial_number`. Gauges are
    observed from the certificates in use at scrape time, so a rotation replaces a certificate's
    series instead of adding one: the label sets stay bounded by the certificates served and trusted;
  - logs: WARN at startup and once a day while a certificate expires within the threshold
    (`runtime.tls.expiry_warning_days`, default 30), ERROR once it has expired (it is still served:
    clients decide), each with subject, serial and days left;
  - `/v1/status` (each TLS listener's `tls` field) and `spice status`: `CertificateFacts.as_json`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from opentelemetry.metrics import CallbackOptions, Observation

from ..metrics import Metrics

log = logging.getLogger("runtime.tls")

Kind = Literal["server", "client_ca"]
_CHECK_EVERY = 3600.0  # seconds between checks; each certificate is warned about at most once a day


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    scope: str
    kind: Kind
    subject: str
    common_name: str
    issuer: str
    serial: str  # hex, as openssl prints it
    fingerprint: str  # SHA-256 of the DER, hex
    not_before: datetime
    not_after: datetime
    source: str  # "file <path>" or "inline"

    @classmethod
    def of(cls, cert: x509.Certificate, scope: str, kind: Kind, source: str) -> CertificateFacts:
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return cls(scope, kind, cert.subject.rfc4514_string(), str(cn[0].value) if cn else "",
                   cert.issuer.rfc4514_string(), format(cert.serial_number, "X"),
                   hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
                   cert.not_valid_before_utc, cert.not_valid_after_utc, source)

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400

    def as_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "issuer": self.issuer, "serial": self.serial,
                "sha256_fingerprint": self.fingerprint, "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat(), "source": self.source}

    def log_fields(self) -> str:
        return (f'scope={self.scope} kind={self.kind} subject="{self.subject}" serial={self.serial} '
                f"not_after={self.not_after.isoformat()}")


def facts_of(certs: Iterable[x509.Certificate], scope: str, kind: Kind, source: str) -> list[CertificateFacts]:
    return [CertificateFacts.of(c, scope, kind, source) for c in certs]


class ExpiryMonitor:
    """Logs and metrics for `certificates()`, the certificates in use now (read at every check and scrape)."""

    def __init__(self, certificates: Callable[[], Sequence[CertificateFacts]], metrics: Metrics,
                 warning_days: int) -> None:
        self._sources = [certificates]
        self._warning_days = warning_days
        self._warned: dict[str, date] = {}  # fingerprint → the day it was last warned about
        self._expired: set[str] = set()  # fingerprints already logged as expired
        metrics.observe("x509_cert_not_after", "The certificate's notAfter (Unix seconds), by scope and kind.",
                        self._observe(lambda f: f.not_after))
        metrics.observe("x509_cert_not_before", "The certificate's notBefore (Unix seconds), by scope and kind.",
                        self._observe(lambda f: f.not_before))

    def include(self, certificates: Callable[[], Sequence[CertificateFacts]]) -> None:
        """Watch these certificates too (a cluster node's, beside the public ones)."""
        self._sources.append(certificates)

    def _certificates(self) -> list[CertificateFacts]:
        return [f for source in self._sources for f in source()]

    def _observe(self, when: Callable[[CertificateFacts], datetime]) -> Callable[[CallbackOptions], list[Observation]]:
        def observe(_: CallbackOptions) -> list[Observation]:
            return [Observation(when(f).timestamp(), {"scope": f.scope, "kind": f.kind, "subject_CN": f.common_name,
                                                      "serial_number": f.serial})
                    for f in self._certificates()]
        return observe

    def check(self, now: datetime | None = None) -> None:
        """Log what needs saying now: each expired certificate once, each one close to expiry once a day."""
        now = now or datetime.now(UTC)
        for f in self._certificates():
            if f.not_after <= now:
                if f.fingerprint not in self._expired:
                    self._expired.add(f.fingerprint)
                    log.error("TLS certificate has expired; it is still served, clients that verify it will refuse: %s",
                              f.log_fields())
            elif f.days_left(now) <= self._warning_days and self._warned.get(f.fingerprint) != now.date():
                self._warned[f.fingerprint] = now.date()
                log.warning("TLS certificate expires in %.1f days: %s", f.days_left(now), f.log_fields())

    async def run(self, stop: asyncio.Event) -> None:
        """`check` now and every hour until `stop` is set."""
        while True:
            self.check()
            try:
                await asyncio.wait_for(stop.wait(), _CHECK_EVERY)
                return
            except TimeoutError:
                pass


def monitor_for(public: ExpiryMonitor | None, cluster: Callable[[], Sequence[CertificateFacts]] | None,
                metrics: Metrics, warning_days: int) -> ExpiryMonitor | None:
    """One monitor for a node's certificates: the public TLS manager's, with the cluster profile's
    included (scope `cluster`), or the cluster's alone when the public listeners are plaintext."""
    if cluster is None:
        return public
    if public is None:
        return ExpiryMonitor(cluster, metrics, warning_days)
    public.include(cluster)
    return public

"""The cluster mTLS profile: the node's CA, certificate and key, validated and rotated as one bundle.

Every reload re-reads the three files and validates them together (the key matches the certificate,
the certificate was issued by the CA); only then are the server context (inbound), the client context
(outbound) and the trusted CA swapped, with one assignment. A bundle that fails keeps the previous one,
so a node never pairs a new certificate with an old verifier. Attempts are counted in
`runtime_tls_reload_total{scope="cluster"}`; file stamps are recorded on failed reads too, so one bad
file is counted once, not on every poll.

Both directions require a certificate from the cluster CA, and only from it: the contexts trust the
cluster CA bundle alone (no system store, not the public client CA). Hostnames are checked outbound:
a peer's certificate must name the host it is dialled at (`spice cluster tls add --host`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from ..config import ClusterMtls
from ..errors import ConfigError, MaterialError, ReloadResult
from ..metrics import Metrics
from . import material, policy
from .expiry import CertificateFacts, facts_of
from .material import CaBundle, CertKeyPair
from .watch import FileWatch, Reading, notify, poll

SCOPE = "cluster"

log = logging.getLogger("runtime.cluster.pki")
handshake_log = logging.getLogger("runtime.cluster.tls")


class NodeSocket(ssl.SSLSocket):
    """Logs a failed handshake with its peer: one WARN line per connection the node port refuses
    (no certificate, a certificate from another CA, plaintext). A bare disconnect (a TCP probe) and
    this node's own failed dials are DEBUG: the dialler reports those."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as e:
            try:
                host, port = self.getpeername()[:2]
                peer = f"{host}:{port}"
            except OSError:
                peer = "(disconnected peer)"
            if self.server_side:
                level = logging.DEBUG if isinstance(e, ssl.SSLEOFError) else logging.WARNING
                handshake_log.log(level, "Cluster mTLS: refused a connection from %s: %s", peer, _reason(e))
            else:
                handshake_log.debug("Cluster mTLS: handshake with %s failed: %s", peer, _reason(e))
            raise


def _reason(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return f"certificate verify failed: {e.verify_message}"
    if e.reason:
        return str(e.reason).lower().replace("_", " ")
    return str(e)


@dataclass(frozen=True, slots=True)
class ClusterBundle:
    """One validated generation of the node's material and the contexts built from it."""

    pair: CertKeyPair
    ca: CaBundle
    server: ssl.SSLContext = field(repr=False)
    client: ssl.SSLContext = field(repr=False)
    digest: bytes  # over the three files' bytes: a rewrite with the same content is not a rotation


def load_bundle(mtls: ClusterMtls, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> ClusterBundle:
    """Validate the three files as one bundle (MaterialError naming the file and the problem)."""
    try:
        ca = material.load_ca_bundle(ca_pem)
    except MaterialError as e:
        raise MaterialError(f"Failed to parse cluster CA certificate at {mtls.ca}: {e}", e.result) from None
    try:
        pair = material.load_pair(cert_pem, key_pem)
    except MaterialError as e:
        raise MaterialError(f"Failed to load cluster node certificate {mtls.certificate} and key {mtls.key}: {e}",
                            e.result) from None
    _check_issuer(pair.leaf, ca.certificates())
    server, client = _contexts(pair, ca)
    digest = hashlib.sha256(b"\0".join((ca_pem, cert_pem, key_pem))).digest()
    return ClusterBundle(pair, ca, server, client, digest)


def _check_issuer(leaf: x509.Certificate, authorities: list[x509.Certificate]) -> None:
    """Upstream's check and texts: the issuer's name first, then the signature."""
    issuer = material.name_line(leaf.issuer) or ""
    by_name = {material.name_line(ca.subject) or "": ca for ca in authorities}
    ca = by_name.get(issuer)
    if ca is None:
        expected = material.name_line(authorities[0].subject) or ""
        raise MaterialError("The node certificate was not issued by the provided CA, "
                            f"expected {expected} but found issuer {issuer}", "parse_error")
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise MaterialError("The node certificate was not issued by the provided CA, signature verification "
                            f"failed for issuer {issuer}: {str(e) or 'invalid signature'}", "parse_error") from None


def _contexts(pair: CertKeyPair, ca: CaBundle) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its hostname
    for ctx in (server, client):
        policy.harden(ctx)
        material.load_chain_into(ctx, pair)
        ctx.load_verify_locations(cadata=ca.pem)
        ctx.sslsocket_class = NodeSocket
    server.verify_mode = ssl.CERT_REQUIRED
    policy.forbid_resumption(server)
    return server, client


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else "unknown"


class ClusterTls:
    """The node's current bundle; `current(server_side)` is read by every new handshake."""

    def __init__(self, mtls: ClusterMtls, metrics: Metrics, files: FileWatch, bundle: ClusterBundle) -> None:
        self._mtls = mtls
        self._metrics = metrics
        self._files = files
        self._bundle = bundle
        self._lock = threading.Lock()
        self._log_configured(bundle)

    @classmethod
    def create(cls, mtls: ClusterMtls, metrics: Metrics) -> ClusterTls:
        """Load and validate the bundle, or raise ConfigError (`Invalid cluster configuration: …`)."""
        files = FileWatch([mtls.ca, mtls.certificate, mtls.key])
        try:
            return cls(mtls, metrics, files, _load(mtls, files))
        except MaterialError as e:
            raise ConfigError(f"Invalid cluster configuration: {e}") from None
        except ssl.SSLError as e:
            raise ConfigError(f"Invalid cluster configuration: failed to build the TLS context: {e.reason or e}") \
                from None

    def current(self, *, server_side: bool) -> ssl.SSLContext:
        bundle = self._bundle
        return bundle.server if server_side else bundle.client

    def certificates(self) -> tuple[CertificateFacts, ...]:
        """The node certificate (`server`) and the cluster CAs trusted for peers (`client_ca`)."""
        bundle = self._bundle
        return (*facts_of([bundle.pair.leaf], SCOPE, "server", f"file {self._mtls.certificate}"),
                *facts_of(bundle.ca.certificates(), SCOPE, "client_ca", f"file {self._mtls.ca}"))

    def _log_configured(self, bundle: ClusterBundle) -> None:
        ca_name = material.name_line(bundle.ca.certificates()[0].subject) or ""
        log.info("Cluster mTLS configured with CA %s and node certificate CN %s", ca_name,
                 _common_name(bundle.pair.leaf))

    # ------------------------------------------------------------------ reload

    def reload_all(self) -> None:
        """Re-read the bundle now, changed or not (SIGHUP)."""
        self._reload(forced=True)

    def check_for_changes(self) -> None:
        """One poll: reload when any of the three files changed since it was last read."""
        if self._files.changed():
            self._reload(forced=False)

    async def watch(self, stop: asyncio.Event, interval: float = 2.0, notifications: bool = True) -> None:
        """Poll every `interval` seconds until `stop`, and react to filesystem notifications beside it."""
        watchers = [poll(stop, interval, self.check_for_changes)]
        if notifications:
            watchers.append(notify(stop, self._files.paths, self.check_for_changes, label="Cluster mTLS reload"))
        await asyncio.gather(*watchers)

    def _reload(self, *, forced: bool) -> None:
        with self._lock:
            reads = _read_all(self._mtls, self._files)
            if not forced and not any(r.changed for r in reads.values()):
                return
            try:
                bundle = _bundle_from(self._mtls, reads)
            except MaterialError as e:
                if e.result == "io_error":
                    log.warning("Cluster mTLS reload: I/O error reading rotated material, keeping previous: %s", e)
                else:
                    log.warning("Cluster mTLS reload: rotated material failed validation, keeping previous: %s", e)
                self._count(e.result)
                return
            except ssl.SSLError as e:
                log.warning("Cluster mTLS reload: rotated material failed validation, keeping previous: %s",
                            e.reason or e)
                self._count("parse_error")
                return
            if bundle.digest == self._bundle.digest:
                log.debug("Cluster mTLS reload: file changed but content identical")
                return
            self._bundle = bundle  # the publication: server cert, verifier and outbound identity at once
            self._log_configured(bundle)
            log.info("Cluster mTLS: rotated PKI bundle (server cert + verifier + outbound) atomically",
                     extra={"fields": {"ca": self._mtls.ca, "cert": self._mtls.certificate}})
            self._count("ok")

    def _count(self, result: ReloadResult) -> None:
        self._metrics.tls_reload.add(1, {"scope": SCOPE, "result": result})


def _read_all(mtls: ClusterMtls, files: FileWatch) -> Mapping[Path, Reading]:
    """All three files, every time, so all three stamps are recorded."""
    return {path: files.read(path) for path in (mtls.ca, mtls.certificate, mtls.key)}


def _bundle_from(mtls: ClusterMtls, reads: Mapping[Path, Reading]) -> ClusterBundle:
    for path, read in reads.items():
        if read.error is not None:
            raise MaterialError(f"failed to read TLS file at {path}: {material.os_error_text(read.error)}",
                                "io_error")
    ca, cert, key = (reads[p].data for p in (mtls.ca, mtls.certificate, mtls.key))
    assert ca is not None and cert is not None and key is not None
    return load_bundle(mtls, ca, cert, key)


def _load(mtls: ClusterMtls, files: FileWatch) -> ClusterBundle:
    return _bundle_from(mtls, _read_all(mtls, files))

"""The cluster mTLS profile (spiced/tls/cluster.py) in-process: real handshakes through the Dask-facing
`NodeContext` against its current contexts, reloads counted once per change, all-or-nothing swaps."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from spice_cli import cluster_pki
from spiced.cluster.security import node_context
from spiced.config import ClusterMtls
from spiced.metrics import Metrics
from spiced.tls.cluster import ClusterTls
from tests.pki import Pki
from tests.tlsprobe import LoopThread, handshake, refused, replace_atomically, serve_echo


def yes(_what: str) -> bool:
    return True


@pytest.fixture(scope="module")
def authorities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two cluster CAs (`spice cluster tls init` twice), each with a few node certificates."""
    root = tmp_path_factory.mktemp("cluster-tls")
    dirs = {"a": root / "a", "b": root / "b"}
    for d in dirs.values():
        cluster_pki.init(yes, d)
        for name in ("node", "node-v2", "peer"):
            cluster_pki.add(name, None, yes, d)
    return dirs


@pytest.fixture()
def node(tmp_path: Path, authorities: dict[str, Path]) -> ClusterMtls:
    for name in ("ca.crt", "node.crt", "node.key"):
        shutil.copy(authorities["a"] / name, tmp_path / name)
    return ClusterMtls(tmp_path / "ca.crt", tmp_path / "node.crt", tmp_path / "node.key")


def counts(metrics: Metrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.exposition().body.decode()):
        for sample in family.samples:
            if sample.name == "runtime_tls_reload_total" and sample.labels.get("scope") == "cluster":
                out[sample.labels["result"]] = sample.value
    return out


def peer_context(directory: Path, name: str = "peer") -> ssl.SSLContext:
    """A peer that trusts `directory`'s CA and presents its certificate `name`."""
    ctx = ssl.create_default_context(cafile=str(directory / "ca.crt"))
    ctx.load_cert_chain(directory / f"{name}.crt", directory / f"{name}.key")
    return ctx


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.fixture()
def served(loop: LoopThread, node: ClusterMtls) -> tuple[ClusterTls, Metrics, int]:
    metrics = Metrics()
    tls = ClusterTls.create(node, metrics)
    port = loop.call(serve_echo(node_context(lambda: tls.current(server_side=True), server_side=True)))
    return tls, metrics, port


def test_both_directions_require_the_cluster_ca(served: tuple[ClusterTls, Metrics, int], authorities: dict[str, Path],
                                                tmp_path: Path) -> None:
    tls, _, port = served
    a, b = authorities["a"], authorities["b"]
    assert handshake(port, peer_context(a)).serial == serial(a / "node.crt")
    no_cert = ssl.create_default_context(cafile=str(a / "ca.crt"))
    assert refused(port, no_cert) is not None
    other_ca = ssl.create_default_context(cafile=str(a / "ca.crt"))
    other_ca.load_cert_chain(b / "peer.crt", b / "peer.key")
    assert refused(port, other_ca) is not None
    public = Pki.create(tmp_path / "public")
    public_client = ssl.create_default_context(cafile=str(a / "ca.crt"))
    public_client.load_cert_chain(public.client.cert, public.client.key)
    assert refused(port, public_client) is not None
    # Outbound: the node's client context trusts its cluster CA only (not the system store).
    outbound = tls.current(server_side=False)
    assert outbound.verify_mode == ssl.CERT_REQUIRED and outbound.check_hostname
    assert [c["subject"] for c in outbound.get_ca_certs()] == \
        [((("commonName", cluster_pki.CA_CN),), (("organizationalUnitName", cluster_pki.organizational_unit()),))]


def test_certificate_and_key_swap_together_or_not_at_all(served: tuple[ClusterTls, Metrics, int], node: ClusterMtls,
                                                         authorities: dict[str, Path]) -> None:
    tls, metrics, port = served
    a = authorities["a"]
    replace_atomically(node.certificate, (a / "node-v2.crt").read_bytes())  # its key is not there yet
    tls.check_for_changes()
    assert counts(metrics) == {"parse_error": 1}
    assert handshake(port, peer_context(a)).serial == serial(a / "node.crt")
    replace_atomically(node.key, (a / "node-v2.key").read_bytes())
    tls.check_for_changes()
    assert counts(metrics) == {"parse_error": 1, "ok": 1}
    assert handshake(port, peer_context(a)).serial == serial(a / "node-v2.crt")
    for _ in range(3):  # the files are still "racy" (just written): read again, but the same content is no change
        tls.check_for_changes()
    tls.reload_all()  # SIGHUP with nothing new
    assert counts(metrics) == {"parse_error": 1, "ok": 1}


def test_a_bad_file_is_counted_once_and_the_old_bundle_kept(served: tuple[ClusterTls, Metrics, int],
                                                            node: ClusterMtls, authorities: dict[str, Path]) -> None:
    tls, metrics, port = served
    replace_atomically(node.certificate, b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    for _ in range(3):
        tls.check_for_changes()
    node.key.unlink()
    for _ in range(3):
        tls.check_for_changes()
    assert counts(metrics) == {"parse_error": 1, "io_error": 1}
    assert handshake(port, peer_context(authorities["a"])).serial == serial(authorities["a"] / "node.crt")


def test_a_new_ca_rotates_with_the_certificate(served: tuple[ClusterTls, Metrics, int], node: ClusterMtls,
                                               authorities: dict[str, Path]) -> None:
    tls, metrics, port = served
    a, b = authorities["a"], authorities["b"]
    replace_atomically(node.ca, (b / "ca.crt").read_bytes())
    tls.check_for_changes()  # a's certificate under b's CA: refused, nothing swapped
    assert counts(metrics) == {"parse_error": 1}
    replace_atomically(node.key, (b / "node.key").read_bytes())
    replace_atomically(node.certificate, (b / "node.crt").read_bytes())
    tls.check_for_changes()
    assert counts(metrics) == {"parse_error": 1, "ok": 1}
    assert handshake(port, peer_context(b)).serial == serial(b / "node.crt")
    former_peer = ssl.create_default_context(cafile=str(b / "ca.crt"))
    former_peer.load_cert_chain(a / "peer.crt", a / "peer.key")
    assert refused(port, former_peer) is not None  # the verifier moved with the certificate

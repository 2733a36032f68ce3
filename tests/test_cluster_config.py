"""Cluster flags (spiced/config.py): upstream's validation and texts, in-process and through the real
`spiced` (exit 1, one line on stderr), including the node certificate's issuer check."""

from __future__ import annotations

from pathlib import Path

import pytest

from spice_cli import cluster_pki
from spiced.config import (
    ClusterSettings,
    cluster_settings,
    load_executor_config,
    parse_args,
    standalone_cluster_warnings,
)
from spiced.errors import ConfigError
from tests.pki import issue, make_ca
from tests.support import spiced_fails, write_pod

MTLS = "--node-mtls-ca-certificate-file, --node-mtls-certificate-file, --node-mtls-key-file"
PREFIX = "Spice Runtime error: Invalid cluster configuration: "


def settings(*argv: str) -> ClusterSettings | None:
    return cluster_settings(parse_args(list(argv)))


def refusal(*argv: str) -> str:
    with pytest.raises(ConfigError) as e:
        settings(*argv)
    return str(e.value)


def mtls_flags(directory: Path, node: str = "node") -> list[str]:
    return ["--node-mtls-ca-certificate-file", str(directory / "ca.crt"),
            "--node-mtls-certificate-file", str(directory / f"{node}.crt"),
            "--node-mtls-key-file", str(directory / f"{node}.key")]


def test_incomplete_mtls_is_refused_with_or_without_a_role() -> None:
    text = f"Invalid cluster configuration: Cluster mTLS requires all of: {MTLS}"
    assert refusal("--role", "scheduler", "--node-mtls-ca-certificate-file", "ca.crt") == text
    assert refusal("--node-mtls-key-file", "k.pem", "--node-mtls-certificate-file", "c.pem") == text


def test_missing_flags_are_named_together() -> None:
    assert refusal("--role", "scheduler") == ("Invalid cluster configuration: Cluster mode requires the following "
                                              f"flags: {MTLS} (or --allow-insecure-connections), "
                                              "--node-advertise-address")
    assert refusal("--scheduler-address", "10.0.0.1", "--allow-insecure-connections") == \
        "Invalid cluster configuration: Cluster mode requires the following flags: --node-advertise-address"
    assert refusal("--role", "executor", "--allow-insecure-connections", "--node-advertise-address", "h") == \
        "Invalid cluster configuration: Cluster mode requires the following flags: --scheduler-address"


def test_scheduler_address_implies_executor_with_upstreams_defaults() -> None:
    s = settings("--scheduler-address", "sched.cluster.local", "--allow-insecure-connections",
                 "--node-advertise-address", "10.0.0.7")
    assert s is not None and s.role == "executor" and s.mtls is None
    assert (s.scheduler, s.scheduler_address, s.scheduler_url) == \
        (("sched.cluster.local", 50052), "tcp://sched.cluster.local:50052", "http://sched.cluster.local:50052")
    assert s.bind_addr == ("0.0.0.0", 50052) and s.advertise_host == "10.0.0.7"
    s = settings("--role", "executor", "--scheduler-address", "https://10.0.0.1:7000", *mtls_flags(Path("/p")),
                 "--node-advertise-address", "10.0.0.7:9999", "--node-bind-address", "127.0.0.1:50062")
    assert s is not None and s.scheduler_address == "tls://10.0.0.1:7000" and s.advertise_host == "10.0.0.7"
    assert s.warnings == ("Port in --node-advertise-address will be ignored. Using port 50062 from "
                          "--node-bind-address.",)


def test_scheduler_address_errors() -> None:
    assert refusal("--scheduler-address", "http://h:99999", "--allow-insecure-connections",
                   "--node-advertise-address", "h") == \
        "Invalid cluster configuration: Invalid --scheduler-address URL: invalid port number"
    assert refusal("--scheduler-address", "http://h:1", *mtls_flags(Path("/p")), "--node-advertise-address", "h") \
        == ("Invalid cluster configuration: Invalid --scheduler-address URL: http:// does not match the node "
            "transport, cluster mTLS; use https:// or leave the scheme out")


def test_standalone_runtime_and_usage_errors() -> None:
    assert settings() is None
    args = parse_args(["--node-bind-address", "127.0.0.1:1", "--allow-insecure-connections"])
    assert cluster_settings(args) is None
    assert standalone_cluster_warnings(args) == ("--node-bind-address, --allow-insecure-connections: no effect "
                                                 "without --role or --scheduler-address (standalone runtime)",)
    with pytest.raises(SystemExit) as e:
        parse_args(["--role", "worker"])
    assert e.value.code == 2


def test_executor_config_has_no_spicepod_and_says_which_flags_do_nothing(tmp_path: Path) -> None:
    args = parse_args(["--scheduler-address", "h", "--allow-insecure-connections", "--node-advertise-address", "h",
                       "--flight", "127.0.0.1:1", "--http", "127.0.0.1:9091"])
    config = load_executor_config(args, workdir=tmp_path, environ={})
    assert config.http_addr == ("127.0.0.1", 9091) and config.tls is None
    assert config.warnings == ("--flight: no effect on a cluster executor, which serves no SQL and takes the "
                               "scheduler's spicepod",)


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A spicepod, the cluster PKI, and a second CA with the same name (another `spice cluster tls init`)."""
    root = tmp_path_factory.mktemp("cluster-config")
    yes = lambda _what: True  # noqa: E731
    cluster_pki.init(yes, root / "pki")
    cluster_pki.add("node", None, yes, root / "pki")
    cluster_pki.init(yes, root / "twin")
    return write_pod(root / "pod"), root / "pki", root / "twin"


def test_flag_errors_exit_1_with_one_line(pods: tuple[Path, Path, Path]) -> None:
    workdir, _, _ = pods
    r = spiced_fails(workdir, "--role", "scheduler", "--node-mtls-key-file", "k.pem")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"{PREFIX}Cluster mTLS requires all of: {MTLS}"]
    r = spiced_fails(workdir, "--scheduler-address", "https://127.0.0.1:1")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"{PREFIX}Cluster mode requires the following flags: {MTLS} "
                                     "(or --allow-insecure-connections), --node-advertise-address"]


def test_node_certificate_from_another_ca_is_refused_at_startup(pods: tuple[Path, Path, Path]) -> None:
    workdir, pki, _ = pods
    other = make_ca(pki, "other")
    stranger = issue(other, pki, "stranger", server=True)
    r = spiced_fails(workdir, "--role", "scheduler", "--node-advertise-address", "127.0.0.1",
                     "--node-bind-address", "127.0.0.1:0",
                     "--node-mtls-ca-certificate-file", str(pki / "ca.crt"),
                     "--node-mtls-certificate-file", str(stranger.cert), "--node-mtls-key-file", str(stranger.key))
    assert r.returncode == 1
    ou = cluster_pki.organizational_unit()
    assert r.stderr.splitlines() == [
        f"{PREFIX}The node certificate was not issued by the provided CA, expected "
        f"CN={cluster_pki.CA_CN}, OU={ou} but found issuer CN=other test CA, O=spiced tests"]


def test_same_named_ca_is_refused_by_signature(pods: tuple[Path, Path, Path]) -> None:
    from spiced.metrics import Metrics
    from spiced.tls.cluster import ClusterTls

    _, pki, twin = pods
    mtls = settings("--role", "scheduler", "--node-advertise-address", "h",
                    "--node-mtls-ca-certificate-file", str(twin / "ca.crt"),
                    "--node-mtls-certificate-file", str(pki / "node.crt"),
                    "--node-mtls-key-file", str(pki / "node.key"))
    assert mtls is not None and mtls.mtls is not None
    with pytest.raises(ConfigError) as e:
        ClusterTls.create(mtls.mtls, Metrics())
    issuer = f"CN={cluster_pki.CA_CN}, OU={cluster_pki.organizational_unit()}"
    assert str(e.value) == ("Invalid cluster configuration: The node certificate was not issued by the provided CA, "
                            f"signature verification failed for issuer {issuer}: invalid signature")

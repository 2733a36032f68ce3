"""`spice cluster tls`: upstream's development PKI for cluster mode, in `~/.spice/pki`.

    spice cluster tls init                   ca.crt, ca.key: a dedicated cluster CA (ECDSA P-256, 10 years)
    spice cluster tls add NAME [--host H]    NAME.crt, NAME.key: a node leaf (clientAuth + serverAuth,
                                             SANs localhost, 127.0.0.1 and H; 1 year)

Upstream's texts, file names and modes (the directory 0700, every file 0600); an existing CA or
certificate is replaced only after `Overwrite (y/n)?` is answered `y`. The CA is the cluster's alone:
every leaf it signs can join the cluster and submit work to it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spice_cli import CliError
from spice_cli.pki import Issued, load_ca, new_ca, new_leaf, write_issued

CA_VALIDITY_YEARS = 10
CLIENT_VALIDITY_YEARS = 1
CA_CN = "Spice.ai CLI Root CA - DO NOT USE IN PRODUCTION"
DEFAULT_OU = "unknown"
_NAME = re.compile(r"[A-Za-z0-9_-]+")

Confirm = Callable[[str], bool]  # asked "<what> already exists. Overwrite (y/n)? "


@dataclass(frozen=True, slots=True)
class CaCreated:
    issued: Issued
    not_after: dt.date
    ou: str


@dataclass(frozen=True, slots=True)
class LeafCreated:
    issued: Issued
    not_after: dt.date
    dns: tuple[str, ...]
    ips: tuple[str, ...]


def pki_dir() -> Path:
    return Path.home() / ".spice" / "pki"


def organizational_unit() -> str:
    """The CA's OU: git's user.email, as upstream, else `unknown`."""
    try:
        done = subprocess.run(["git", "config", "--get", "user.email"], capture_output=True, text=True, timeout=5,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_OU
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else DEFAULT_OU


def _ca_files(directory: Path) -> Issued:
    return Issued(directory / "ca.crt", directory / "ca.key")


def init(confirm: Confirm, directory: Path | None = None) -> CaCreated | None:
    """Create the cluster CA; None when the user declines to replace an existing one."""
    directory = directory or pki_dir()
    issued = _ca_files(directory)
    if issued.cert.exists() and not confirm("CA certificate"):
        return None
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ou = organizational_unit()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_CN),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)])
    cert, key = new_ca(subject, CA_VALIDITY_YEARS * 365)
    write_issued(issued, cert, key, private_cert=True)
    return CaCreated(issued, cert.not_valid_after_utc.date(), ou)


def add(name: str, host: str | None, confirm: Confirm, directory: Path | None = None) -> LeafCreated | None:
    """Issue a node certificate; None when the user declines to replace an existing one."""
    if not name:
        raise CliError("client name cannot be empty")
    if not _NAME.fullmatch(name):
        raise CliError("client name can only contain letters, numbers, hyphens, and underscores")
    directory = directory or pki_dir()
    ca = _ca_files(directory)
    if not ca.cert.exists():
        raise CliError("CA certificate not found. Run 'spice cluster tls init' first.")
    if not ca.key.exists():
        raise CliError("CA private key not found. Run 'spice cluster tls init' first.")
    issued = Issued(directory / f"{name}.crt", directory / f"{name}.key")
    if issued.cert.exists() and not confirm(f"Certificate for '{name}'"):
        return None
    ca_cert, ca_key = load_ca(ca.cert, ca.key)
    dns, ips = ["localhost"], ["127.0.0.1"]
    if host:
        try:
            ips.append(str(ipaddress.ip_address(host)))
        except ValueError:
            dns.append(host)
    cert, key = new_leaf(ca_cert, ca_key, name, hosts=[*dns, *ips],
                         usages=[ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
                         days=CLIENT_VALIDITY_YEARS * 365, key_encipherment=True)
    write_issued(issued, cert, key, private_cert=True)
    return LeafCreated(issued, cert.not_valid_after_utc.date(), tuple(dns), tuple(ips))

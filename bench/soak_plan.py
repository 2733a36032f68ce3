"""What the soak sets up and rotates: the work directory (spicepod, data), the material on disk in
either layout, and the plan of valid and invalid rotations for each kind of phase.

    layout = Layout(dir, "kubelet", {"tls.crt": ..., "tls.key": ...})
    for step in server_plan(pki, valid=12, invalid=SERVER_INVALID[:3], method="kubelet"):
        layout.apply(step.changes)      # then wait for runtime_tls_reload_total{result=step.expect}
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.hazmat.primitives import serialization

from tests.pki import Issued, Pki

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
    http_load: Literal["wrk", "python"] = "wrk"
    h2load: bool = True  # HTTP/2 load: h2load rounds (mode none) and httpx's HttpxH2Load (every phase)
    flight: bool = True
    rows: int = FLIGHT_ROWS  # rows of the `numbers` dataset in the workdir (see write_workdir)

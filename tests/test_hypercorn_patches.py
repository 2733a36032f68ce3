"""spiced/http/hypercorn_patches.py: Hypercorn's internals are replaced only by an explicit
`install()`, which refuses a Hypercorn other than the one they were written against."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from spiced.http import hypercorn_patches
from tests.support import write_pod


def test_importing_the_http_app_and_server_patches_nothing() -> None:
    code = ("import hypercorn.asyncio.run as r, hypercorn.protocol as p, hypercorn.protocol.h2 as h2\n"
            "before = (r.TCPServer, p.H2Protocol, h2.StreamBuffer)\n"
            "import spiced.http.app, spiced.http.server, spiced.http.gates\n"
            "assert (r.TCPServer, p.H2Protocol, h2.StreamBuffer) == before\n"
            "from spiced.http import hypercorn_patches\n"
            "hypercorn_patches.install(); hypercorn_patches.install()\n"
            "assert r.TCPServer is hypercorn_patches._TlsAwareTCPServer\n"
            "assert p.H2Protocol is hypercorn_patches._H2Protocol"
            " and h2.StreamBuffer is hypercorn_patches._StreamBuffer\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_install_refuses_another_hypercorn(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.19.0" if name == "hypercorn" else real(name))
    with pytest.raises(hypercorn_patches.HypercornMismatch,
                       match=r"Hypercorn 0\.19\.0 is installed; .*hypercorn==0\.18\.0"):
        hypercorn_patches.install()


def test_the_runtime_exits_1_with_one_line_on_another_hypercorn(tmp_path: Path) -> None:
    write_pod(tmp_path)
    code = ("import importlib.metadata as m, sys\n"
            "real = m.version\n"
            "m.version = lambda name: '0.19.0' if name == 'hypercorn' else real(name)\n"
            "from spiced.__main__ import main\n"
            "sys.exit(main(['--http', '127.0.0.1:0', '--flight', '127.0.0.1:0']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "Spice Runtime error: Unable to start Spice Runtime servers: Hypercorn 0.19.0 is installed; spiced extends "
        "the internals of Hypercorn 0.18.0 (spiced/http/hypercorn_patches.py): install hypercorn==0.18.0"]

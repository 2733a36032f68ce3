"""The official Spice.ai JavaScript SDK (`@spiceai/spice`, pinned in tests/js/package.json) as a test
client: `run_sdk(job)` runs `node tests/js/sdk_client.mjs` on a JSON job and returns its one JSON line.

    out = run_sdk({"flightUrl": "127.0.0.1:50051", "flightTlsEnabled": True, "tlsRootCertFile": "ca.pem",
                   "queries": ["SELECT 1 AS one"], "repeat": 3, "calls": ["sql"]})
    out["results"][0]["rows"] == [{"one": 1}]

The job's keys are documented at the top of tests/js/sdk_client.mjs. The packages are installed from
tests/js/package-lock.json on first use (`npm ci`) when tests/js/node_modules is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

JS_DIR = Path(__file__).resolve().parent / "js"
SCRIPT = JS_DIR / "sdk_client.mjs"
_install_lock = threading.Lock()


def node() -> str:
    path = shutil.which("node")
    if path is None:
        raise AssertionError("node (>= 20) is needed for the JavaScript SDK client and is not on PATH")
    return path


def ensure_installed(timeout: float = 300.0) -> None:
    """`npm ci --prefix tests/js` when tests/js/node_modules is missing (the lockfile pins every package)."""
    with _install_lock:
        if (JS_DIR / "node_modules" / "@spiceai" / "spice" / "package.json").exists():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise AssertionError("npm is needed to install tests/js (the JavaScript SDK) and is not on PATH")
        done = subprocess.run([npm, "ci", "--prefix", str(JS_DIR), "--no-audit", "--no-fund"], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise AssertionError(f"npm ci --prefix {JS_DIR} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        (JS_DIR / "node_modules" / ".installed").touch()  # the Makefile's stamp: `make test` need not reinstall


def run_sdk(job: dict[str, Any], timeout: float = 60, *, check: bool = True,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the SDK on `job`; returns the parsed result line.

    With `check` (the default) any failure raises AssertionError carrying the script's stderr; with
    `check=False` a failed job's `{"ok": false, "error": ..., "code": ...}` is returned instead (for
    refusals a test expects). A script that prints nothing parseable or outlives `timeout` always raises.
    """
    ensure_installed()
    job = {"timeoutMs": int(max(1.0, timeout - 5) * 1000), **job}
    full_env = {**os.environ, "NODE_NO_WARNINGS": "1", **(env or {})}
    try:
        done = subprocess.run([node(), str(SCRIPT)], input=json.dumps(job), capture_output=True, text=True,
                              timeout=timeout, cwd=JS_DIR, env=full_env, check=False)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the JavaScript SDK client did not finish within {timeout} s; stderr:\n"
                             f"{_text(e.stderr)[-3000:]}") from None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        out: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(f"the JavaScript SDK client exited {done.returncode} without a result line; "
                             f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-3000:]}") from None
    if check and (done.returncode != 0 or not out.get("ok")):
        raise AssertionError(f"the JavaScript SDK client failed (exit {done.returncode}): {out.get('error')}\n"
                             f"stderr:\n{done.stderr[-3000:]}")
    out["exit_code"] = done.returncode
    out["stderr"] = done.stderr
    return out


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data

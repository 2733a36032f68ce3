"""The official Spice.ai JavaScript SDK (`@spiceai/spice`, pinned in tests/js/package.json) as a test
client: `run_sdk(job)` runs `node tests/js/sdk_client.mjs` on a JSON job and returns its one JSON line.

    out = run_sdk({"flightUrl": "127.0.0.1:50051", "flightTlsEnabled": True, "tlsRootCertFile": "ca.pem",
                   "steps": [{"call": "sql", "query": "SELECT 1 AS one"},
                             {"call": "sql", "query": "SELECT $1 AS v", "parameters": [7]}]})
    out["results"][0]["rows"] == [{"one": 1}]

The job's keys (connection options for every step; steps `sql`, `sqlHttp`, `sqlJson`, `refresh`,
`listActive`, `cancelActive`; `repeat`) are documented at the top of tests/js/sdk_client.mjs; `steps()`
builds the usual list. The SDK's HTTPS agent ignores tlsRootCertFile, so for an https httpUrl run_sdk
hands the same file to Node as NODE_EXTRA_CA_CERTS. The packages are installed from
tests/js/package-lock.json on first use (`npm ci`) when tests/js/node_modules is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterable
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
    """Run the SDK on `job`; returns the parsed result line (plus `exit_code` and `stderr`).

    With `check` (the default) any failure raises AssertionError carrying the script's stderr; with
    `check=False` a failed job's `{"ok": false, "error": ..., "code": ..., "details": ...}` is returned
    instead (for refusals a test expects). A script that prints nothing parseable or outlives `timeout`
    always raises. NODE_EXTRA_CA_CERTS is set from the job's tlsRootCertFile when its httpUrl is https
    (`env` wins over it).
    """
    ensure_installed()
    job = {"timeoutMs": int(max(1.0, timeout - 5) * 1000), **job}
    full_env = {**os.environ, "NODE_NO_WARNINGS": "1", **_extra_ca(job), **(env or {})}
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


def steps(call: str, queries: Iterable[str | tuple[str, Any]]) -> list[dict[str, Any]]:
    """One `call` step per query; a (query, parameters) pair is a parameterized one."""
    return [{"call": call, "query": q} if isinstance(q, str) else {"call": call, "query": q[0], "parameters": q[1]}
            for q in queries]


def _extra_ca(job: dict[str, Any]) -> dict[str, str]:
    """The SDK's HTTPS agent (node-fetch with a module-wide https.Agent) ignores tlsRootCertFile:
    Node takes a private CA only from NODE_EXTRA_CA_CERTS, read once at start."""
    http_url, root = job.get("httpUrl"), job.get("tlsRootCertFile")
    if isinstance(http_url, str) and http_url.startswith("https://") and root:
        return {"NODE_EXTRA_CA_CERTS": str(root)}
    return {}


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data

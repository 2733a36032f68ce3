"""`spice init [name]`: write a minimal spicepod (exactly `version`, `kind`, `name`).

With a name, the pod goes to `<name>/spicepod.yaml`; without one, to `./spicepod.yaml` named after the cwd.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from spice_cli import CliError


def init(name: str | None, cwd: Path | None = None) -> Path:
    cwd = cwd or Path.cwd()
    directory = cwd / name if name else cwd
    pod_name = name or cwd.resolve().name or "spicepod"
    if not pod_name.strip() or "/" in pod_name:
        raise CliError(f"invalid spicepod name '{pod_name}'")
    path = directory / "spicepod.yaml"
    if path.exists() or (directory / "spicepod.yml").exists():
        raise CliError(f"spicepod.yaml already exists in {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"version": "v2", "kind": "Spicepod", "name": pod_name}, sort_keys=False))
    return path

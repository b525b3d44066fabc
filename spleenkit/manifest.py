"""The run manifest: what produced a run folder (versions, device, parameters, data, times)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spleenkit.environment import package_versions
from spleenkit.io import write_json

MANIFEST_NAME = "manifest.json"


def now() -> str:
    """The current time in ISO 8601 with the UTC offset."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The commit of the kit's source checkout (with ``+dirty`` if modified), or None outside git."""
    folder = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def build_manifest(parameters: dict[str, Any], device: str | None = None, **extra: Any) -> dict[str, Any]:
    """A manifest dict: versions, git commit, command line, host, device and all parameters."""
    return {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "command": sys.argv,
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "device": device,
        "parameters": parameters,
        **extra,
    }


def write_manifest(run_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` into the run folder atomically and return its path."""
    return write_json(Path(run_dir) / MANIFEST_NAME, manifest)


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a run folder's manifest."""
    return json.loads((Path(run_dir) / MANIFEST_NAME).read_text())

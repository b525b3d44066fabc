"""The run manifest: what produced a run folder (versions, device, parameters, data, times)."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spleenkit.environment import package_versions
from spleenkit.errors import Terminated, first_line
from spleenkit.io import write_json

MANIFEST_NAME = "manifest.json"

log = logging.getLogger(__name__)


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


def stop_reason(error: BaseException) -> str:
    """Why a run stopped, for its manifest: interrupted (Ctrl-C), terminated (SIGTERM), or the error's first line."""
    if isinstance(error, Terminated):
        return "terminated (SIGTERM)"
    return "interrupted" if isinstance(error, KeyboardInterrupt) else first_line(error)


def write_stopped_manifest(run_dir: str | os.PathLike[str], error: BaseException,
                           manifest: dict[str, Any]) -> Path | None:
    """Write the manifest of a run that stopped early, with ``stopped`` saying why (:func:`stop_reason`). A failure
    to write it (a full disk) is logged and None returned, so that the error that stopped the run is the one
    reported."""
    manifest["stopped"] = stop_reason(error)
    try:
        return write_manifest(run_dir, manifest)
    except Exception as failure:  # noqa: BLE001 - the first error is the one to report
        log.warning("%s: could not record the stopped run (%s)", run_dir, failure)
        return None

"""The kit as a student meets it: JupyterLab in a real browser, the student copy of 01_data.ipynb, Run All.

JupyterLab runs on 127.0.0.1 (a free port, a random token, settings and workspaces in a temporary
folder, no news or update checks) with a kernel running this Python; Debian's Chromium (headless,
driven by playwright-core from tests/browser) opens the notebook, clicks Run > Run All Cells and waits
until every cell has run. Then no cell may show an error, the figures must be images, and each
exercise's check must say "not answered yet" instead of crashing. The screenshot is kept in
runs/browser/ (a CI artifact). Needs `apt-get install chromium` and `npm ci --prefix tests/browser`
(.ci/run does both); without them the test fails and says so.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spleenkit.course import build_student_copies
from spleenkit.notebooks import this_python_kernel

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "browser" / "run_notebook.mjs"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "runs" / "browser"
NOTEBOOK = "01_data.ipynb"

# the server makes no request of its own: no news feed, no update check, no extension index
SERVER_CONFIG = {
    "LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate",
               "extension_manager": "readonly"},
    "ServerApp": {"open_browser": False, "port_retries": 0, "allow_root": True},  # CI runs as root
}
# every cell in the page (no windowing), no autosave into the copy, no "get news?" question
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(base: str, token: str, server: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with status {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer on {base} within {seconds:.0f} s:\n{log.read_text()[-3000:]}")


def _browser_tools() -> str:
    """The node executable; fails (never skips) with the command to run when something is missing."""
    node = shutil.which("node")
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"Chromium at {CHROMIUM} (apt-get update && apt-get install -y chromium)")
    if node is None:
        missing.append("Node.js (apt-get install -y nodejs npm)")
    if not (REPO / "tests" / "browser" / "node_modules" / "playwright-core").is_dir():
        missing.append("playwright-core (npm ci --prefix tests/browser)")
    if missing:
        pytest.fail("the browser test needs " + "; ".join(missing))
    return node  # type: ignore[return-value]


@pytest.mark.slow
def test_student_runs_the_data_notebook_in_jupyterlab(tmp_path: Path) -> None:
    node = _browser_tools()
    # the course folder a student gets: notebooks/ (student copies) beside data/ (the repository's, so the
    # synthetic phantoms are made once per checkout and shared with the other notebook tests)
    course = tmp_path / "course"
    build_student_copies(course / "notebooks", only=["01"])
    (REPO / "data").mkdir(exist_ok=True)
    (course / "data").symlink_to(REPO / "data", target_is_directory=True)
    config, settings = tmp_path / "config", tmp_path / "settings"
    config.mkdir()
    (config / "jupyter_server_config.json").write_text(json.dumps(SERVER_CONFIG))
    for name, values in SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))

    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "jupyterlab.log"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "jupyterlab_01_data.png"
    screenshot.unlink(missing_ok=True)
    with this_python_kernel(), log.open("w") as log_stream:
        environment = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTERLAB_SETTINGS_DIR": str(settings),
                       "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
                       "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_DATA_DIR": str(tmp_path / "jupyter"),
                       "SPLEENKIT_NONINTERACTIVE": "1"}  # the 3D viewer would load its code from the internet
        environment.pop("SPLEENKIT_STRICT_EXERCISES", None)  # a student's checks give hints
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={course}"],
            stdout=log_stream, stderr=subprocess.STDOUT, env=environment, cwd=course)
        try:
            _wait_for_server(base, token, server, log)
            run = subprocess.run(
                [node, str(DRIVER), "--url", f"{base}/lab/tree/notebooks/{NOTEBOOK}?token={token}",
                 "--screenshot", str(screenshot), "--timeout", "150", "--chromium", CHROMIUM],
                capture_output=True, text=True, timeout=200, cwd=DRIVER.parent)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    try:
        report = json.loads(run.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        pytest.fail(f"the browser driver reported nothing (status {run.returncode}):\n{run.stdout}\n{run.stderr}"
                    f"\nJupyterLab's log:\n{log.read_text()[-3000:]}")
    (ARTIFACTS / "report.json").write_text(json.dumps(report, indent=1))
    assert "error" not in report, f"{report['error']}\nJupyterLab's log:\n{log.read_text()[-3000:]}"
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000

    tracebacks = [text for text in report["stderr"] if "Traceback" in text]
    assert not tracebacks, "cells show errors:\n" + "\n".join(tracebacks)
    assert report["code_cells"] >= 10 and all(p and p[1:-2].isdigit() for p in report["prompts"]), report["prompts"]
    assert set(report["dialogs"]) <= {"Select Kernel"}, f"JupyterLab asked: {report['dialogs']}"
    drawn = [image for image in report["images"] if image["complete"] and image["width"] > 200]
    assert len(drawn) >= 2, f"expected the three-plane figure and the histogram, got {report['images']}"
    shown = "\n".join(report["texts"])
    assert "dataset (synthetic)" in shown
    assert shown.count("not answered yet") == 3, "each exercise's check answers the empty stub with a hint"


def test_the_committed_screenshot_is_small() -> None:
    # refresh it from runs/browser/jupyterlab_01_data.png after the browser test when the notebook changes
    picture = REPO / "docs" / "images" / "jupyterlab_01_data.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size < 300_000
    assert "docs/images/jupyterlab_01_data.png" in (REPO / "README.md").read_text()

"""The kit as a student meets it: JupyterLab in a real browser, the student copy of 01_data.ipynb, Run All.

JupyterLab runs on 127.0.0.1 (a free port, a random token, settings and workspaces in a temporary
folder, no news or update checks) with a kernel running this Python; Debian's Chromium (headless, a
fresh profile, driven by the Python Playwright package, which downloads no browser of its own) opens
the notebook, clicks Run > Run All Cells and waits until every cell has run. Then no cell may show an
error, the figures must be images, and each exercise's check must say "not answered yet" instead of
crashing. The screenshot is kept in runs/browser/ (a CI artifact). Needs `apt-get install chromium`
(.ci/run does it) and `playwright` (the dev extra); without them the test fails and says so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from spleenkit.course import build_student_copies
from spleenkit.notebooks import this_python_kernel

REPO = Path(__file__).resolve().parents[1]
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


def _check_browser_tools() -> None:
    """Fails (never skips) with the command to run when Chromium or Playwright is missing."""
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"Chromium at {CHROMIUM} (apt-get update && apt-get install -y chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if missing:
        pytest.fail("the browser test needs " + "; ".join(missing))


# what the page shows, read in the browser: the open notebook's cells, prompts, images and outputs
NOTEBOOK_PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
KERNEL_IDLE = """() => [...document.querySelectorAll(".jp-StatusBar-TextItem")]
    .some((item) => /\\| Idle$/.test(item.textContent.trim()) && !item.textContent.startsWith("No Kernel"))"""
ALL_CELLS_RUN = """(panel) => {
    const prompts = [...document.querySelectorAll(`${panel} .jp-CodeCell .jp-InputArea-prompt`)];
    const indicator = document.querySelector(`${panel} .jp-Notebook-ExecutionIndicator`);
    const failed = [...document.querySelectorAll(`${panel} [data-mime-type="application/vnd.jupyter.stderr"]`)]
      .some((e) => e.textContent.includes("Traceback"));
    return indicator !== null && indicator.getAttribute("data-status") === "idle"
      && (failed || (prompts.length > 0 && prompts.every((p) => /\\[\\d+\\]/.test(p.textContent))));
}"""
WHAT_IS_SHOWN = """(panel) => {
    const cells = [...document.querySelectorAll(`${panel} .jp-CodeCell`)];
    const outputs = [...document.querySelectorAll(`${panel} .jp-OutputArea-output`)];
    const stderr = [...document.querySelectorAll('.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]')];
    return {
      code_cells: cells.length,
      prompts: cells.map((c) => c.querySelector(".jp-InputArea-prompt")?.textContent.trim()),
      images: [...document.querySelectorAll(`${panel} .jp-OutputArea-output img`)]
        .map((img) => ({ width: img.naturalWidth, height: img.naturalHeight, complete: img.complete })),
      stderr: stderr.map((e) => e.innerText.slice(0, 2000)),
      texts: outputs.map((o) => o.innerText.slice(0, 500)),
    };
}"""


VIEWER_IMAGE = f"{NOTEBOOK_PANEL} .widget-image"


def drive_viewer(page, wait_ms: float = 20_000) -> dict:  # noqa: ANN001 - a Playwright page
    """Use the offline slice viewer as a student would: move a slider with the keyboard, then switch the spleen's
    outline off; report whether the picture changed each time (the kernel redraws it)."""
    picture = page.locator(VIEWER_IMAGE).first
    picture.wait_for(state="visible", timeout=wait_ms)
    picture.scroll_into_view_if_needed()

    def changed_from(before: bytes) -> bool:
        deadline = time.monotonic() + wait_ms / 1000
        while time.monotonic() < deadline:
            page.wait_for_timeout(300)
            if picture.screenshot() != before:
                return True
        return False

    shown: dict = {}
    before = picture.screenshot()
    handle = page.locator(f"{NOTEBOOK_PANEL} .widget-slider .noUi-handle").first
    handle.focus()
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    shown["slider_changed_picture"] = changed_from(before)
    before = picture.screenshot()
    page.locator(f"{NOTEBOOK_PANEL} .widget-checkbox input[type=checkbox]").first.click()
    shown["outline_changed_picture"] = changed_from(before)
    return shown


def run_all_cells(url: str, screenshot: Path, timeout: float = 150) -> dict:
    """Open ``url`` (a notebook in JupyterLab) in headless Chromium, Run > Run All Cells as a student does, wait
    until the kernel is idle and every code cell has run (or one failed), and return what the page shows."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    report: dict = {"url": re.sub(r"token=[^&]+", "token=...", url), "steps": [], "console_errors": [],
                    "dialogs": [], "blocked": []}

    def left_ms() -> float:
        return max(1.0, timeout - (time.monotonic() - started)) * 1000

    def step(name: str) -> None:
        report["steps"].append({"name": name, "seconds": round(time.monotonic() - started, 1)})

    server = urllib.parse.urlsplit(url).netloc

    def only_this_server(route) -> None:  # nothing leaves this machine: the badges' images are refused
        target = urllib.parse.urlsplit(route.request.url)
        if target.netloc == server or target.scheme in ("data", "blob"):
            route.continue_()
        else:
            report["blocked"].append(f"{target.scheme}://{target.netloc}")
            route.abort()

    with tempfile.TemporaryDirectory(prefix="spleenkit-chromium-") as profile, sync_playwright() as playwright:
        # as root, with no network but loopback: no sandbox, no GPU, none of Chromium's own traffic, no name look-ups
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 900},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"])
        context.route("**/*", only_this_server)
        page = context.pages[0] if context.pages else context.new_page()
        page.on("console", lambda message: report["console_errors"].append(message.text[:300])
                if message.type == "error" else None)

        def answer_dialogs() -> bool:  # a student answers a dialog (which kernel?) with its default button
            dialog = page.locator(".jp-Dialog")
            if not dialog.is_visible():
                return False
            report["dialogs"].append(dialog.locator(".jp-Dialog-header").inner_text().strip())
            dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
            dialog.wait_for(state="detached", timeout=left_ms())
            return True

        def until(what: str, predicate: str) -> None:
            while time.monotonic() - started < timeout:
                if answer_dialogs():
                    continue
                if page.evaluate(predicate, NOTEBOOK_PANEL):
                    return step(what)
                page.wait_for_timeout(500)
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for: {what}")

        try:
            page.goto(url, timeout=left_ms())
            page.locator(f"{NOTEBOOK_PANEL} .jp-Cell").first.wait_for(timeout=left_ms())
            # the kernel is ready when the status bar says "<kernel> | Idle" (the toolbar's execution indicator
            # also says idle while the status bar still reads "No Kernel | Initializing")
            until("notebook open, kernel idle", KERNEL_IDLE)
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            step("Run All Cells clicked")
            until("all cells run (or one failed), kernel idle", ALL_CELLS_RUN)
            report.update(page.evaluate(WHAT_IS_SHOWN, NOTEBOOK_PANEL))
            report["viewer"] = drive_viewer(page)
            step("slice viewer used")
            # the picture: the three-plane figure with the cell that drew it
            figure = page.locator(f"{NOTEBOOK_PANEL} .jp-OutputArea-output img").first
            if figure.count():
                figure.evaluate("(img) => img.closest('.jp-Cell').scrollIntoView({ block: 'center' })")
            page.wait_for_timeout(300)
            page.screenshot(path=str(screenshot))
            step("screenshot taken")
        except (PlaywrightError, TimeoutError) as error:
            report["error"] = str(error)[:3000]
            try:
                page.screenshot(path=str(screenshot))
            except PlaywrightError:
                pass
        finally:
            context.close()
    return report


@pytest.mark.slow
def test_student_runs_the_data_notebook_in_jupyterlab(tmp_path: Path) -> None:
    _check_browser_tools()
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
                       "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_DATA_DIR": str(tmp_path / "jupyter")}
        for name in ("SPLEENKIT_NONINTERACTIVE", "CI"):  # a student's live session: the offline viewer is shown
            environment.pop(name, None)
        environment.pop("SPLEENKIT_STRICT_EXERCISES", None)  # a student's checks give hints
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={course}"],
            stdout=log_stream, stderr=subprocess.STDOUT, env=environment, cwd=course)
        try:
            _wait_for_server(base, token, server, log)
            report = run_all_cells(f"{base}/lab/tree/notebooks/{NOTEBOOK}?token={token}", screenshot)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
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
    # the offline viewer (ipywidgets, nothing from the internet) answers its slider and its outline toggle
    assert report["viewer"] == {"slider_changed_picture": True, "outline_changed_picture": True}, report["viewer"]


def test_the_committed_screenshot_is_small() -> None:
    # refresh it from runs/browser/jupyterlab_01_data.png after the browser test when the notebook changes
    picture = REPO / "docs" / "images" / "jupyterlab_01_data.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size < 300_000
    assert "docs/images/jupyterlab_01_data.png" in (REPO / "README.md").read_text()

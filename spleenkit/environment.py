"""What the kit runs on: versions, device, cores, memory, GPUs, and whether this is Colab or a live session;
and which model a later notebook works with (notebook 03's, or a stand-in it says it is using)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spleenkit.manifest import package_versions


def total_memory_gib() -> float | None:
    """Physical memory in GiB (None where it cannot be read)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def peak_memory_mib() -> float:
    """This process's peak resident memory so far, in MiB.

    On Linux it is read from /proc/self/status (VmHWM), which starts afresh in every program:
    ``ru_maxrss``, the fallback elsewhere, keeps the high-water mark of the process that started
    this one, so a command run from a 1 GiB notebook kernel would report 1 GiB before doing anything.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def on_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


def is_interactive() -> bool:
    """True in a live Jupyter session; False under papermill, nbclient tests, scripts and CI.

    Heavy interactive widgets (the 3D viewer) are shown only when this is True: in a headless
    papermill run the cell after such a widget can wait forever for a front end.
    """
    if os.environ.get("SPLEENKIT_NONINTERACTIVE") or os.environ.get("CI") or os.environ.get("PAPERMILL_EXECUTION"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False
    # papermill and nbclient start kernels without a connected front end; Jupyter front ends set this
    return "JPY_SESSION_NAME" in os.environ or "VSCODE_PID" in os.environ or on_colab()


def environment_report() -> dict[str, Any]:
    """Versions, device, cores, memory, GPU count, the CPU's capability and the precision the kit will use
    for training and inference (with why), as shown by the welcome notebook and ``spleenkit info``."""
    from spleenkit.devices import describe_device, describe_precision, pick_device

    device = pick_device("auto")
    precision = describe_precision(device)
    return {
        "versions": package_versions(),
        **describe_device(device),
        "memory_gib": total_memory_gib(),
        "colab": on_colab(),
        "cpu_capability": precision["cpu"]["label"],
        "training_precision": f"{precision['training']['dtype']}: {precision['training']['reason']}",
        "inference_precision": f"{precision['inference']['dtype']}: {precision['inference']['reason']}",
    }


COLAB_WORKSPACE = "/content/spleenkit"


def colab_setup(workspace: str = COLAB_WORKSPACE) -> bool:
    """On Colab (after the notebook's setup cell installed the kit), make the notebooks' relative paths work.

    Colab opens a notebook in /content, outside any checkout, so ``../data`` and ``../runs`` would
    point at the file system root: this moves into ``<workspace>/notebooks`` and turns on the widget
    manager the 3D viewer needs. Anywhere else it does nothing. Returns True on Colab.
    """
    if not on_colab():
        return False
    import logging

    folder = os.path.join(workspace, "notebooks")
    os.makedirs(folder, exist_ok=True)
    os.chdir(folder)
    try:
        from google.colab import output  # type: ignore[import-not-found]

        output.enable_custom_widget_manager()
    except (ImportError, AttributeError):
        pass
    log = logging.getLogger(__name__)
    log.info("Colab: working in %s; data and runs go to %s", folder, workspace)
    from spleenkit.devices import pick_device

    device = pick_device("auto")  # what every notebook will use: the GPU when the runtime has one
    if device.type == "cpu":
        log.warning("Colab: no GPU in this runtime, so the kit computes on the CPU (the quick defaults are fine); "
                    "for full-scale training choose Runtime > Change runtime type > GPU, then run again")
    return True


# --------------------------------------------------------------------------- the model of notebook 03
STAND_IN_FOLDER = "stand-in"


@dataclass(frozen=True)
class NotebookModel:
    """The model a later notebook (05, 06) works with: ``path`` to its ``model.pt``, and whether it is a
    ``stand_in`` trained for a few epochs because the run of notebook 03 was not found (``banner`` then
    says so, as Markdown, with how to get the real one; empty otherwise)."""

    path: Path
    stand_in: bool
    banner: str = ""


def stand_in_banner(expected: str | os.PathLike[str], stand_in: str | os.PathLike[str], epochs: int,
                    colab: bool | None = None) -> str:
    """The Markdown warning a notebook shows when it works with a stand-in model instead of notebook 03's.

    It names the file that was looked for and the stand-in used, says what the stand-in's numbers are
    worth, and how to get the real model (run 03 with the same ``runs_dir``; on Colab, where every
    notebook gets its own runtime, keep ``runs_dir`` on Google Drive or run 03 in the same runtime first).
    """
    colab = on_colab() if colab is None else colab
    lines = [
        f"> **⚠ A stand-in model, not the one notebook 03 trained.** `{expected}` was not found, so this "
        f"notebook uses `{stand_in}`, trained for {epochs} epoch(s) only: its scores and masks say nothing "
        "about the recipe. The code and the lesson are the same.",
        ">",
        "> **To use the real model:** run `03_training.ipynb` first with the same `runs_dir` and `run_name`, "
        "then run this notebook again (it picks the real model up by itself).",
    ]
    if colab:
        lines += [">", "> **On Colab** every notebook runs in its own runtime, whose files vanish with it: mount "
                  "Google Drive (`from google.colab import drive; drive.mount('/content/drive')`), point "
                  "`runs_dir` of 03 and of this notebook at the same folder on Drive, or run 03 in this "
                  "runtime before this notebook."]
    return "\n".join(lines)


def notebook_model(runs_dir: str | os.PathLike[str], run_name: str, data_dir: str | os.PathLike[str],
                   preset: str = "quick", epochs: int = 2, device: str = "auto") -> NotebookModel:
    """Notebook 03's model, ``<runs_dir>/<run_name>/model.pt``; when it is missing, a stand-in.

    The stand-in is trained (``preset``, ``epochs``) into ``<runs_dir>/stand-in``, never into 03's run
    folder, so that it is never mistaken for the real model later, and a second notebook reuses it
    instead of training again. The result carries the banner a notebook displays (see
    :func:`stand_in_banner`).
    """
    import logging

    expected = Path(runs_dir) / run_name / "model.pt"
    if expected.is_file():
        return NotebookModel(expected, stand_in=False)
    stand_in_dir = Path(runs_dir) / STAND_IN_FOLDER
    model = stand_in_dir / "model.pt"
    if not model.is_file():
        from spleenkit.training import train

        logging.getLogger(__name__).warning("%s does not exist (notebook 03 not run): training a stand-in for "
                                            "%d epoch(s) into %s", expected, epochs, stand_in_dir)
        train(data_dir, stand_in_dir, preset, epochs=epochs, device=device, progress=False)
    banner = stand_in_banner(expected, model, _epochs_of(stand_in_dir, epochs))
    return NotebookModel(model, stand_in=True, banner=banner)


def _epochs_of(run_dir: Path, default: int) -> int:
    """The epochs a run was trained for, from its manifest's preset (``default`` where it cannot be read)."""
    from spleenkit.manifest import read_manifest

    try:
        return int(read_manifest(run_dir)["parameters"]["preset"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return default

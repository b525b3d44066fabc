"""What the kit runs on: versions, device, cores, memory, GPUs, and whether this is Colab or a live session."""

from __future__ import annotations

import os
import sys
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

"""What the notebooks show besides MONAI: tables of rows (Markdown for a cell, fixed-width text for a kept output),
the environment report as rows, and the model later notebooks work with (notebook 03's, or a stand-in trained for
a few epochs, with the banner that says so).

The papermill runner, profiles and kept outputs are :mod:`spleenkit.notebooks`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spleenkit import training
from spleenkit.environment import on_colab
from spleenkit.manifest import read_manifest

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- tables for notebooks
def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " x ".join(_cell(v) for v in value) if all(isinstance(v, (int, float)) for v in value) else str(value)
    return "" if value is None else str(value)


def _columns(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns:
        return list(columns)
    names: list[str] = []
    for row in rows:
        names += [key for key in row if key not in names]
    return names


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a fixed-width text table (what a kept output holds: the same text on every machine)."""
    names = _columns(rows, columns)
    cells = [[_cell(row.get(name)) for name in names] for row in rows]
    widths = [max([len(name), *(len(line[i]) for line in cells)]) for i, name in enumerate(names)]
    lines = ["  ".join(name.ljust(width) for name, width in zip(names, widths, strict=True)).rstrip(),
             "  ".join("-" * width for width in widths)]
    lines += ["  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip()
              for line in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a Markdown table, for ``IPython.display.Markdown`` in a notebook."""
    names = _columns(rows, columns)
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(" --- " for _ in names) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(name)).replace("|", "\\|") for name in names) + " |" for row in rows]
    return "\n".join(lines)


def environment_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The environment report as what / value rows (versions flattened), for the welcome notebook."""
    rows = [{"what": f"{name} version", "value": version or "not installed"}
            for name, version in report.get("versions", {}).items()]
    labels = {"device": "device the kit computes on", "cpu_count": "CPU cores", "cpu_threads": "torch CPU threads",
              "memory_gib": "memory (GiB)", "gpu_count": "GPUs", "gpu_name": "GPU",
              "gpu_memory_gib": "GPU memory (GiB)", "colab": "running on Colab",
              "cpu_capability": "CPU vector instructions", "training_precision": "training precision",
              "inference_precision": "inference precision"}
    rows += [{"what": labels.get(key, key), "value": value} for key, value in report.items() if key != "versions"]
    return rows


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
        lines += [">", "> **On Colab** every notebook runs in its own runtime, whose files vanish with it: the first "
                  "cell's `colab_setup()` keeps data and runs on Google Drive (`My Drive/spleenkit`) unless the "
                  "mount was refused or turned off (`drive=False`); run 03 with Drive mounted, or run 03 in this "
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
    expected = Path(runs_dir) / run_name / "model.pt"
    if expected.is_file():
        return NotebookModel(expected, stand_in=False)
    stand_in_dir = Path(runs_dir) / STAND_IN_FOLDER
    model = stand_in_dir / "model.pt"
    if not model.is_file():
        log.warning("%s does not exist (notebook 03 not run): training a stand-in for "
                                            "%d epoch(s) into %s", expected, epochs, stand_in_dir)
        training.train(data_dir, stand_in_dir, preset, epochs=epochs, device=device, progress=False)
    banner = stand_in_banner(expected, model, _epochs_of(stand_in_dir, epochs))
    return NotebookModel(model, stand_in=True, banner=banner)


def _epochs_of(run_dir: Path, default: int) -> int:
    """The epochs a run was trained for, from its manifest's preset (``default`` where it cannot be read)."""
    try:
        return int(read_manifest(run_dir)["parameters"]["preset"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return default

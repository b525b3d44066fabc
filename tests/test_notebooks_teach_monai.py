"""The lessons teach MONAI in view: each notebook imports the MONAI (and Ignite) names it teaches and uses them
in its own code, not only through the kit. One dict entry per notebook: the names its code must import from
``monai``/``ignite`` and then use outside the import."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

REQUIRED: dict[str, set[str]] = {
    "02_transforms.ipynb": {
        "Compose", "LoadImaged", "EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityRanged",
        "EnsureTyped", "SpatialPadd", "RandCropByPosNegLabeld", "RandFlipd", "RandRotate90d", "RandScaleIntensityd",
        "RandShiftIntensityd", "Dataset", "CacheDataset", "PersistentDataset", "DataLoader",
    },
    "03_training.ipynb": {
        "UNet", "DiceCELoss", "CacheDataset", "DataLoader", "SupervisedTrainer", "SupervisedEvaluator",
        "ValidationHandler", "CheckpointSaver", "StatsHandler", "TensorBoardStatsHandler", "ProgressBar",
        "SlidingWindowInferer",
    },
}


def monai_names_in_use(path: Path) -> set[str]:
    """Names the notebook's code imports from monai or ignite and uses again after importing them."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    source = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    lines = [line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
             for line in source.splitlines()]  # IPython magics are not Python
    tree = ast.parse("\n".join(lines))
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").split(".")[0] in {"monai", "ignite"} for alias in node.names}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return imported & used


@pytest.mark.parametrize("notebook", sorted(REQUIRED))
def test_the_notebook_builds_the_monai_objects_it_teaches_in_view(notebook: str) -> None:
    missing = sorted(REQUIRED[notebook] - monai_names_in_use(NOTEBOOK_DIR / notebook))
    assert not missing, f"{notebook} does not import and use in view: {', '.join(missing)}"


def test_the_count_sees_an_import_without_a_use_as_missing(tmp_path: Path) -> None:
    source = ["from monai.networks.nets import UNet\n", "from monai.losses import DiceLoss\n", "loss = DiceLoss()"]
    cells = [{"cell_type": "code", "source": source}]
    path = tmp_path / "99_x.ipynb"
    path.write_text(json.dumps({"cells": cells}), encoding="utf-8")
    assert monai_names_in_use(path) == {"DiceLoss"}

"""The notebooks teach MONAI in view: each lesson imports from MONAI, and uses outside its solution cells,
the objects it is about (a student copy keeps them, since only solution cells become stubs)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# notebook -> the MONAI names its code imports and uses in view
REQUIRED: dict[str, list[str]] = {
    "02_transforms": ["Compose", "LoadImaged", "EnsureChannelFirstd", "Orientationd", "Spacingd",
                      "ScaleIntensityRanged", "EnsureTyped", "SpatialPadd", "RandCropByPosNegLabeld", "RandAffined",
                      "RandGaussianNoised", "RandScaleIntensityd", "RandShiftIntensityd", "Dataset", "CacheDataset",
                      "PersistentDataset", "DataLoader"],
    "03_training": ["UNet", "DiceCELoss", "DiceLoss", "Dataset", "ThreadDataLoader", "DataLoader",
                    "set_determinism", "SupervisedTrainer", "SupervisedEvaluator", "SlidingWindowInferer", "MeanDice",
                    "ValidationHandler", "CheckpointSaver", "StatsHandler", "TensorBoardStatsHandler",
                    "LrScheduleHandler"],
    "05_evaluation": ["DataLoader", "Dataset", "sliding_window_inference", "SlidingWindowInferer", "decollate_batch",
                      "Compose", "Activationsd", "Invertd", "AsDiscreted", "AsDiscrete", "LoadImage",
                      "KeepLargestConnectedComponentd", "DiceMetric", "HausdorffDistanceMetric"],
    "06_inference_visualization": ["SlidingWindowInferer", "Compose", "Activationsd", "Invertd", "AsDiscreted"],
}


def code_in_view(notebook: str) -> ast.Module:
    """The notebook's code cells except solutions, as one module (IPython magics and shell lines become pass)."""
    cells = nbformat.read(NOTEBOOKS / f"{notebook}.ipynb", as_version=4).cells
    lines = [re.sub(r"^(\s*)[%!].*", r"\1pass", line) for cell in cells
             if cell.cell_type == "code" and "solution" not in cell.metadata.get("tags", [])
             for line in cell.source.splitlines()]
    return ast.parse("\n".join(lines))


@pytest.mark.parametrize("notebook", sorted(REQUIRED))
def test_notebook_imports_and_uses_the_monai_it_teaches(notebook: str) -> None:
    tree = code_in_view(notebook)
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").split(".")[0] == "monai" for alias in node.names}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    for name in REQUIRED[notebook]:
        assert name in imported, f"{notebook} does not import {name} from monai"
        assert name in used, f"{notebook} imports {name} but never uses it"


# notebook -> the MONAI names its exercises have the students write (in the solution cells of the instructor copy;
# a student copy asks for them): 00 and 01 teach no MONAI in view, so their exercises do
WRITTEN_BY_STUDENTS: dict[str, list[str]] = {
    "00_welcome": ["DataLoader"],
    "01_data": ["Compose", "LoadImaged", "EnsureChannelFirstd", "ScaleIntensityRanged"],
}


@pytest.mark.parametrize("notebook", sorted(WRITTEN_BY_STUDENTS))
def test_the_first_notebooks_have_the_students_write_monai(notebook: str) -> None:
    cells = nbformat.read(NOTEBOOKS / f"{notebook}.ipynb", as_version=4).cells
    solutions = ast.parse("\n".join(cell.source for cell in cells if "solution" in cell.metadata.get("tags", [])))
    imported = {alias.asname or alias.name for node in ast.walk(solutions) if isinstance(node, ast.ImportFrom)
                and (node.module or "").split(".")[0] == "monai" for alias in node.names}
    used = {node.id for node in ast.walk(solutions) if isinstance(node, ast.Name)}
    tasks = "\n".join(cell.source for cell in cells if cell.cell_type == "markdown")
    for name in WRITTEN_BY_STUDENTS[notebook]:
        assert name in imported and name in used, f"{notebook}: no exercise has the students write {name}"
        assert name in tasks, f"{notebook}: no task names {name}"


@pytest.mark.parametrize("preset", ["seed", "bundle-0.5.9", "tutorial", "fast", "quick"])
def test_03s_schedule_in_view_steps_as_the_package_does(preset: str) -> None:
    """03's engines in view step the recipe's schedule when spleenkit.train does: StepLR once per epoch, as bundle
    0.5.9's LrScheduleHandler does, the cosine decay once per iteration."""
    from spleenkit.presets import get_preset
    from spleenkit.training import epoch_level_schedule

    assignments = {node.targets[0].id: node.value for node in ast.walk(code_in_view("03_training"))
                   if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    handlers = [node for node in ast.walk(code_in_view("03_training")) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "LrScheduleHandler"]
    assert [ast.unparse(keyword.value) for handler in handlers for keyword in handler.keywords
            if keyword.arg == "epoch_level"] == ["schedule_per_epoch"]
    in_view = eval(compile(ast.Expression(assignments["schedule_per_epoch"]), "03", "eval"),  # noqa: S307
                   {"recipe": get_preset(preset)})
    assert in_view == epoch_level_schedule(preset)

"""MONAI's own check of spleen_ct_segmentation, run on the kit's bundle/.

MONAI model-zoo tests this bundle (``ci/unit_tests/test_spleen_ct_segmentation.py`` and its ``_dist`` twin) on ten
random 64^3 volumes: a ``ConfigWorkflow`` of train.json with one epoch, no cache, one loader worker each and 32^3
crops, then train.json + evaluate.json on the model that training left, then inference.json with its first handler
disabled and a 32^3 window, each initialized (properties checked), run and finalized; and the same training and
evaluation under ``torchrun --nproc_per_node=2`` from the merged, overridden configs. The sequence here is that
one, for the default recipe and each ``preset`` the bundle offers; the only change is ``bundle_root``, a temporary
folder instead of the bundle's own (a run must not write into the checkout).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spleenkit.bundle import bundle_source

BUNDLE = bundle_source()
CONFIGS = BUNDLE / "configs"
# the recipes the bundle offers: the default (seed) and each other preset its configs can express (a sequence takes
# about 20 s of CPU time; the default runs in the quick suite, the others with the slow tests)
PRESETS = [None, *(pytest.param(name, marks=pytest.mark.slow) for name in ("bundle-0.5.9", "fast", "quick"))]


def ci_overrides(dataset: Path, root: Path, preset: str | None) -> dict[str, Any]:
    """The CI test's overrides for training and evaluation (its TEST_CASE_1), with the bundle root and recipe."""
    overrides: dict[str, Any] = {
        "bundle_root": str(root),
        "dataset_dir": str(dataset),
        "images": "$list(sorted(glob.glob(@dataset_dir + '/image_*.nii.gz')))",
        "labels": "$list(sorted(glob.glob(@dataset_dir + '/label_*.nii.gz')))",
        "epochs": 1,
        "train#dataset#cache_rate": 0.0,
        "validate#dataset#cache_rate": 0.0,
        "train#dataloader#num_workers": 1,
        "validate#dataloader#num_workers": 1,
        "train#random_transforms#0#spatial_size": [32, 32, 32],
    }
    return {**overrides, "preset": preset} if preset else overrides


def ci_inference_overrides(dataset: Path, root: Path, preset: str | None) -> dict[str, Any]:
    """The CI test's overrides for inference (its TEST_CASE_2), with the 32^3 window."""
    overrides: dict[str, Any] = {
        "bundle_root": str(root),
        "dataset_dir": str(dataset),
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/image_*.nii.gz')))",
        "handlers#0#_disabled_": True,
        "inferer#roi_size": [32, 32, 32],
    }
    return {**overrides, "preset": preset} if preset else overrides


def run_workflow(workflow_type: str, configs: list[str], overrides: dict[str, Any], check: bool = True) -> None:
    """initialize, check the properties (training and inference), run, finalize: as the CI test does."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(workflow_type=workflow_type, config_file=[str(CONFIGS / name) for name in configs],
                              meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
                              **overrides)
    workflow.initialize()
    if check:
        assert workflow.check_properties() in (None, []), workflow.check_properties()
    workflow.run()
    workflow.finalize()


def trained_recipe(root: Path) -> Any:
    """The model training left, loaded strictly into the recipe it recorded."""
    from spleenkit.model import load_model
    from spleenkit.runs import run_preset

    recipe = run_preset(root / "models")
    load_model(root / "models" / "model.pt", recipe)
    return recipe


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("preset", PRESETS, ids=lambda name: name or "default")
def test_model_zoo_ci_sequence(preset: str | None, random_volumes: Path, tmp_path: Path) -> None:
    import nibabel as nib

    overrides = ci_overrides(random_volumes, tmp_path, preset)
    run_workflow("train", ["train.json"], overrides)
    # one epoch, whatever the recipe's validation interval (seed: 5, quick: 10): the last epoch was validated and
    # the validation handlers' CheckpointSaver kept the best (the only) model
    recipe = trained_recipe(tmp_path)
    assert recipe.name == (preset or "seed") and recipe.epochs == 1 and recipe.patch_size == (32, 32, 32)

    run_workflow("eval", ["train.json", "evaluate.json"], overrides, check=False)  # the CI skips this check too
    rows = (tmp_path / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()
    assert len(rows) == 1 + recipe.validation_cases

    run_workflow("infer", ["inference.json"], ci_inference_overrides(random_volumes, tmp_path, preset))
    masks = sorted((tmp_path / "eval").glob("image_*/image_*_trans.nii.gz"))
    assert len(masks) == 10
    assert nib.load(masks[0]).shape[:3] == (64, 64, 64)  # back on the input's grid


def export_config(configs: list[str], overrides: dict[str, Any], path: Path) -> Path:
    """The merged configs with the overrides applied, written to one file (as the CI's ``export_overrided_config``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in configs])
    parser.update(pairs=overrides)
    ConfigParser.export_config_file(parser.config, str(path), indent=4)
    return path


def torchrun(config_file: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run`` on one exported config (2 CPU
    processes, gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
               "-m", "monai.bundle", "run", "--config_file", str(config_file),
               "--logging_file", str(CONFIGS / "logging.conf"), "--meta_file", str(CONFIGS / "metadata.json")]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_model_zoo_ci_sequence_with_two_processes(random_volumes: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    overrides = ci_overrides(random_volumes, root, "quick")  # validates every 10 epochs; this run has one
    result = torchrun(export_config(["train.json", "multi_gpu_train.json"], overrides, tmp_path / "train.json"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "cpu, gloo)" in result.stdout + result.stderr  # spleenkit's process group: gloo between CPU processes
    recipe = trained_recipe(root)
    assert recipe.name == "quick" and recipe.epochs == 1

    result = torchrun(export_config(["train.json", "evaluate.json", "multi_gpu_evaluate.json"], overrides,
                                    tmp_path / "evaluate.json"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rows = (root / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()
    assert len(rows) == 1 + recipe.validation_cases  # both processes' cases, saved once

"""The MONAI bundle in bundle/: the seed's five commands on CPU, its keys and properties, metadata, refusals."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spleenkit.bundle import (
    COMMANDS,
    bundle_command,
    bundle_source,
    check_overrides,
    format_command,
    override_problems,
    verify_network,
)
from spleenkit.cli import main
from spleenkit.errors import BadInputError

BUNDLE = bundle_source()
CONFIGS = BUNDLE / "configs"
SCHEMA = Path(__file__).parent / "fixtures" / "meta_schema_20220324.json"
SCHEMA_MD5 = "e3312addf5d9958749594dd53d9d97e0"  # of the copy kept here: verify_metadata checks it before use
# sys.argv[0] of `python -m monai.bundle ...` (and of each torchrun worker)
MONAI_MAIN = "/venv/lib/python3.11/site-packages/monai/bundle/__main__.py"

# the commands of spleen_ct_segmentation's README, verbatim
SEED_COMMANDS = {
    "train": "python -m monai.bundle run training --meta_file configs/metadata.json --config_file "
             "configs/train.json --logging_file configs/logging.conf",
    "train-multi-gpu": "torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run training "
                       "--meta_file configs/metadata.json --config_file "
                       "\"['configs/train.json','configs/multi_gpu_train.json']\" --logging_file configs/logging.conf",
    "evaluate": "python -m monai.bundle run evaluating --meta_file configs/metadata.json --config_file "
                "\"['configs/train.json','configs/evaluate.json']\" --logging_file configs/logging.conf",
    "evaluate-multi-gpu": "torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run evaluating "
                          "--meta_file configs/metadata.json --config_file \"['configs/train.json',"
                          "'configs/evaluate.json','configs/multi_gpu_evaluate.json']\" "
                          "--logging_file configs/logging.conf",
    "infer": "python -m monai.bundle run evaluating --meta_file configs/metadata.json --config_file "
             "configs/inference.json --logging_file configs/logging.conf",
}
# tiny settings for CPU: the quick recipe (validation every 10 epochs) for one epoch, which must still validate and
# leave models/model.pt; 4 training and 2 validation phantoms, 32^3 crops at 4x4x5 mm
SPACING = [4, 4, 5]
PATCH = [32, 32, 32]


def tiny(dataset: Path, root: Path, **extra: Any) -> dict[str, Any]:
    return {"dataset_dir": str(dataset), "bundle_root": str(root), "preset": "quick", "epochs": 1,
            "patch_size": PATCH, "spacing": SPACING, "num_samples": 1, "num_workers": 0, "validation_cases": 2,
            **extra}


def tiny_inference(dataset: Path, root: Path) -> dict[str, Any]:
    return {"dataset_dir": str(dataset), "bundle_root": str(root), "preset": "quick", "roi_size": PATCH,
            "spacing": SPACING, "num_workers": 0}


def run_bundle(command: str, overrides: dict[str, Any], timeout: int = 400) -> subprocess.CompletedProcess:
    """One of the seed's commands, run from the bundle folder as its README says."""
    return subprocess.run(bundle_command(command, overrides=overrides), cwd=BUNDLE, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def merged(*names: str) -> dict:
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files([str(CONFIGS / name) for name in names])


def workflow(workflow_type: str, configs: list[str], **overrides: Any):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(workflow_type=workflow_type, config_file=[str(CONFIGS / c) for c in configs],
                          meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
                          **overrides)


def write_model(root: Path) -> Path:
    from spleenkit.model import atomic_save, build_unet

    return atomic_save(build_unet("seed").state_dict(), root / "models" / "model.pt")


# --------------------------------------------------------------------------- structure and metadata
def test_commands_are_the_seed_readme_commands() -> None:
    assert set(COMMANDS) == set(SEED_COMMANDS)
    for name, text in SEED_COMMANDS.items():
        assert format_command(bundle_command(name)) == text


def test_monai_bundle_run_shows_help() -> None:
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--", "--help"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PAGER": "cat"})
    assert result.returncode == 0, result.stderr[-2000:]
    shown = result.stdout + result.stderr  # fire writes help to stderr when not on a terminal
    assert "run_id" in shown and "config_file" in shown and "Typical usage examples" in shown


def test_bundle_files_are_complete() -> None:
    for name in ("metadata.json", "train.json", "evaluate.json", "inference.json", "multi_gpu_train.json",
                 "multi_gpu_evaluate.json", "logging.conf"):
        assert (CONFIGS / name).is_file(), name
    assert (BUNDLE / "docs" / "README.md").is_file()
    assert "Apache License" in (BUNDLE / "LICENSE").read_text()
    for config in CONFIGS.glob("*.json"):
        assert "cuda:0" not in config.read_text(), f"{config.name} hard-codes a GPU"


def test_bundle_folder_can_be_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    copy = Path(shutil.copytree(BUNDLE, tmp_path / "bundle"))
    monkeypatch.setenv("SPLEENKIT_BUNDLE_DIR", str(copy))
    assert bundle_source() == copy
    assert main(["bundle", "path"]) == 0


def verify_metadata(meta_file: Path) -> None:
    """MONAI's metadata check with the schema kept in the tests: an existing file with the right hash is
    not downloaded again, so this runs offline."""
    from monai.bundle import verify_metadata as monai_verify_metadata

    monai_verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA), hash_val=SCHEMA_MD5, hash_type="md5")


def test_metadata_follows_the_bundle_schema() -> None:
    verify_metadata(CONFIGS / "metadata.json")
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    assert metadata["monai_version"] and metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == \
        [96, 96, 96]


@pytest.mark.parametrize(("path", "value", "complaint"), [
    (("network_data_format",), None, "'network_data_format' is a required property"),
    (("network_data_format", "outputs", "pred", "num_channels"), None, "'num_channels' is a required property"),
    (("version",), "one", "does not match"),
    (("network_data_format", "inputs", "image", "value_range"), [0], "is not valid under any of the given schemas"),
])
def test_schema_rejects_broken_metadata(path: tuple[str, ...], value: Any, complaint: str, tmp_path: Path) -> None:
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    parent = metadata
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=complaint):
        verify_metadata(broken)


def test_network_matches_the_metadata_input_and_output() -> None:
    verify_network(BUNDLE)  # monai.bundle.verify_net_in_out with the metadata's network_data_format


def test_official_keys_are_kept() -> None:
    train = merged("train.json")
    ids = ["bundle_root", "ckpt_dir", "output_dir", "dataset_dir", "images", "labels", "val_interval", "epochs",
           "device", "network_def", "network", "loss", "optimizer", "train#deterministic_transforms",
           "train#random_transforms", "train#preprocessing", "train#dataset#data", "train#dataset#cache_rate",
           "train#dataloader#num_workers", "train#inferer", "train#postprocessing", "train#handlers",
           "train#key_metric", "train#trainer#max_epochs", "validate#preprocessing", "validate#dataset",
           "validate#dataloader", "validate#inferer", "validate#postprocessing", "validate#handlers",
           "validate#key_metric#val_mean_dice", "validate#evaluator", "initialize", "run", "training"]
    assert override_problems(train, ids) == []
    saver = train["validate"]["handlers"][-1]
    assert saver["_target_"] == "CheckpointSaver" and saver["key_metric_filename"] == "model.pt"
    evaluate = merged("train.json", "evaluate.json")
    assert override_problems(evaluate, ["validate#handlers#0#load_path", "evaluating", "run"]) == []
    assert evaluate["validate"]["handlers"][0]["_target_"] == "CheckpointLoader"
    inference = merged("inference.json")
    assert override_problems(inference, [
        "bundle_root", "output_dir", "dataset_dir", "datalist", "device", "network_def", "network", "preprocessing",
        "dataset", "dataloader", "inferer", "postprocessing", "handlers", "evaluator", "checkpointloader",
        "load_pretrain", "output_postfix", "initialize", "run", "evaluating"]) == []


def test_train_and_infer_workflow_properties(synthetic_dataset: Path, tmp_path: Path) -> None:
    train = workflow("train", ["train.json"], dataset_dir=str(synthetic_dataset), bundle_root=str(tmp_path),
                     validation_cases=2, cache_rate=0, num_workers=0)
    train.initialize()
    assert train.check_properties() == []
    assert train.max_epochs == 1260 and train.val_interval == 5
    assert len(train.train_dataset_data) == 4 and len(train.val_dataset_data) == 2
    write_model(tmp_path)
    infer = workflow("infer", ["inference.json"], dataset_dir=str(synthetic_dataset), bundle_root=str(tmp_path),
                     num_workers=0)
    infer.initialize()  # loads models/model.pt
    assert infer.check_properties() == []
    assert [Path(item["image"]).name for item in infer.dataset_data] == ["spleen_7.nii.gz"]


# --------------------------------------------------------------------------- refusals
def test_override_naming_no_key_is_refused_with_a_suggestion() -> None:
    config = merged("train.json")
    problems = override_problems(config, ["epoch", "train#trainer#max_epoch", "trainr#dataset", "dataset_dir",
                                          "network_def#num_res_units", "train#dataloader#pin_memory"])
    assert problems[0] == "--epoch names no key of the bundle's configs; did you mean --epochs?"
    assert "did you mean --train#trainer#max_epochs" in problems[1]
    assert problems[2].startswith("--trainr#dataset names no key")
    assert len(problems) == 3  # new arguments of components (network_def, dataloader) are accepted


def test_check_overrides_reads_the_monai_command_line(tmp_path: Path) -> None:
    argv = [MONAI_MAIN, "run", "training", "--meta_file",
            str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "train.json"), "--epoch", "1"]
    with pytest.raises(BadInputError, match="did you mean --epochs"):
        check_overrides(argv)
    check_overrides(argv[:-2] + ["--epochs", "1", "--patch_size=[32,32,32]"])
    files = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']"
    check_overrides(argv[:6] + [files, "--validate#handlers#0#load_path", "x.pt"])
    check_overrides(["pytest", "--epoch", "1"])  # not a bundle run: nothing to check


def test_network_and_recipe_overrides_reach_the_kit() -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser(merged("train.json"))
    parser.update({"network_def#num_res_units": 3, "patch_size": [64, 64, 64], "amp": "false", "epochs": 7})
    parser.parse()
    recipe = parser.get_parsed_content("recipe")
    assert recipe.patch_size == (64, 64, 64) and recipe.validation_roi_size == (64, 64, 64)
    assert recipe.amp is False and parser.get_parsed_content("train#trainer#max_epochs") == 7
    network = parser.get_parsed_content("network_def")
    assert len(network.model[0].conv) == 3  # three residual units where the preset has two


def test_bundle_networks_train_in_the_kits_layout() -> None:
    """train.json's network is channels-last on a CPU, as train() makes it, and the multi-GPU configs wrap
    that same network in DDP (the layout set before wrapping, as DDP needs)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser(merged("train.json"))
    parser.update({"device": "cpu"})
    parser.parse()
    network = parser.get_parsed_content("network")
    weight = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d)).weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    for names in (("train.json", "multi_gpu_train.json"), ("train.json", "evaluate.json", "multi_gpu_evaluate.json")):
        assert merged(*names)["network"]["module"] == merged("train.json")["network"]


@pytest.mark.parametrize("names", [("train.json",), ("inference.json",), ("train.json", "multi_gpu_train.json"),
                                   ("train.json", "evaluate.json", "multi_gpu_evaluate.json")])
def test_every_run_checks_its_overrides_first(names: tuple[str, ...]) -> None:
    """``python -m monai.bundle run`` calls check_overrides before anything else is built."""
    assert merged(*names)["initialize"][0] == "$spleenkit.bundle.check_overrides()"


def test_cli_bundle_run_refuses_unknown_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bundle", "run", "train", "--set", "epoch=1"]) == 2
    assert "did you mean --epochs" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["evaluating", "inference"])
def test_missing_model_is_a_clear_error(kind: str, synthetic_dataset: Path, tmp_path: Path) -> None:
    if kind == "evaluating":
        flow = workflow("train", ["train.json", "evaluate.json"], dataset_dir=str(synthetic_dataset),
                        bundle_root=str(tmp_path), validation_cases=2, num_workers=0, run_id="evaluating")
    else:
        flow = workflow("infer", ["inference.json"], dataset_dir=str(synthetic_dataset), bundle_root=str(tmp_path),
                        num_workers=0, run_id="evaluating")
    with pytest.raises(RuntimeError) as caught:
        flow.initialize()
        flow.run()
    error: BaseException | None = caught.value
    while error is not None and not isinstance(error, BadInputError):
        error = error.__cause__
    assert error is not None, f"no BadInputError behind {caught.value!r}"
    assert str(tmp_path / "models" / "model.pt") in str(error) and "no trained model here" in str(error)


# --------------------------------------------------------------------------- the configs' one face into the package
def test_configs_reach_the_package_only_through_spleenkit_bundle() -> None:
    """Every path into the kit that a config names is ``spleenkit.bundle.<name>``, and each such name is there:
    moving a function inside the package changes a line of ``spleenkit.bundle.FACE``, never a config."""
    import re

    import spleenkit.bundle as face

    used: set[str] = set()
    for path in sorted(CONFIGS.glob("*.json")):
        text = path.read_text()
        for name in re.findall(r"spleenkit(?:\.\w+)+", text):
            assert name == "spleenkit.bundle" or name.startswith("spleenkit.bundle."), f"{path.name}: {name}"
            used.add(name.removeprefix("spleenkit.bundle").lstrip("."))
        imports = [item for item in json.loads(text).get("imports", []) if "spleenkit" in item]
        assert imports in ([], ["$import spleenkit", "$import spleenkit.bundle"]), f"{path.name}: {imports}"
    used.discard("")
    assert {"recipe", "load_datalist", "pick_device", "FinalValidation"} <= used
    missing = [name for name in sorted(used) if not callable(getattr(face, name, None))]
    assert missing == [], missing
    assert set(face.FACE) <= used  # no stale entries: each name the face hands out is one a config calls
    with pytest.raises(AttributeError):
        face.not_a_name  # noqa: B018


# --------------------------------------------------------------------------- a failure's last line
def test_a_failed_start_ends_with_the_kits_line_and_leaves_no_manifest(tmp_path: Path) -> None:
    """``python -m monai.bundle run`` prints MONAI's wrapped traceback; its last line is the kit's message, and a
    training that could not start left no models/manifest.json (nor the bundle root)."""
    command = bundle_command("train", overrides={"dataset_dir": str(tmp_path / "no-such-dataset"), "preset": "quick",
                                                 "epochs": 1, "bundle_root": str(tmp_path / "root")})
    result = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=400,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Failed to evaluate" in result.stderr  # MONAI's traceback is still there, above
    assert lines[-1] == f"spleenkit: error: {tmp_path / 'no-such-dataset'}: dataset folder not found", lines[-3:]
    assert not (tmp_path / "root" / "models" / "manifest.json").exists()


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"preset": "quik"}, "spleenkit: error: preset=quik: unknown preset 'quik'; choose one of"),
    ({"network_def#strides": [2, 2]}, "spleenkit: error: strides=2,2: expected 4 strides, one between each pair of"),
    ({"network_def#norm": "batc"}, "spleenkit: error: norm=batc: expected one of batch, instance"),
    ({"network_def#_target_": "UNett"}, "spleenkit: error: the bundle stopped: ModuleNotFoundError: Cannot locate"),
])
def test_the_last_line_names_the_fault(overrides: dict[str, Any], expected: str, synthetic_dataset: Path,
                                       tmp_path: Path) -> None:
    from spleenkit.bundle import last_line

    flow = workflow("train", ["train.json"], dataset_dir=str(synthetic_dataset), bundle_root=str(tmp_path),
                    validation_cases=2, cache_rate=0, num_workers=0, **overrides)
    with pytest.raises(Exception) as caught:
        flow.initialize()
        flow.run()
    line = last_line(caught.value)  # MONAI raised its wrapper ("Failed to evaluate ...") or its own error
    assert expected in line and "\n" not in line, line
    assert not (tmp_path / "models" / "manifest.json").exists()


def test_a_mistyped_override_ends_with_the_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    """The excepthook the bundle installs under ``python -m monai.bundle``: the traceback, then one line."""
    import types

    from spleenkit.bundle import report_last

    printed: list[str] = []
    system = types.SimpleNamespace(excepthook=lambda *error: printed.append("traceback"), stderr=sys.stderr)
    report_last(system)
    report_last(system)  # installed once
    try:
        try:
            check_overrides([MONAI_MAIN, "run", "training", "--config_file", str(CONFIGS / "train.json"), "--epoch",
                             "1"])
        except BadInputError as error:
            raise RuntimeError("Failed to evaluate ConfigExpression") from error
    except RuntimeError as error:
        system.excepthook(RuntimeError, error, error.__traceback__)
    assert printed == ["traceback"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "spleenkit: error: --epoch names no key of the bundle's configs; did you mean --epochs?")


def test_cli_bundle_run_gives_the_kits_line_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # as a terminal shows them, not pytest's capture
        assert main(["bundle", "run", "train", "--set", f"dataset_dir={tmp_path / 'none'}", "--set",
                     f"bundle_root={tmp_path / 'root'}"]) == 2
    assert capsys.readouterr().err.strip() == f"spleenkit: error: {tmp_path / 'none'}: dataset folder not found"
    # MONAI's notices on configs it cannot vouch for, and on the original metadata's key, are not the kit's news
    assert [str(found.message)[:60] for found in shown if issubclass(found.category, UserWarning)
            and ("parsing config_file" in str(found.message) or "optional_packages_version" in str(found.message))] \
        == []


# --------------------------------------------------------------------------- the five commands on CPU
@pytest.fixture(scope="module")
def trained(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed's training command, one epoch on the tiny phantoms: the bundle root it filled."""
    root = tmp_path_factory.mktemp("bundle_run")
    result = run_bundle("train", tiny(synthetic_dataset, root))
    assert_ok(result)
    return root


@pytest.mark.slow
def test_training_command_writes_the_best_model(trained: Path) -> None:
    import torch

    from spleenkit.model import load_model
    from spleenkit.runs import run_preset

    network = load_model(trained / "models" / "model.pt", "quick")  # a plain UNet state dict, strict keys
    assert all(torch.isfinite(value).all() for value in network.state_dict().values() if value.is_floating_point()), \
        "training left non-finite weights"
    assert list((trained / "eval").glob("events.out.tfevents.*"))
    recipe = run_preset(trained / "models")  # models/ is a kit run folder: its manifest holds the recipe
    assert recipe.patch_size == tuple(PATCH) and recipe.spacing == tuple(SPACING) and recipe.epochs == 1
    assert recipe.name == "quick" and recipe.validation_interval == 10  # validated at its last epoch all the same


@pytest.mark.slow
def test_evaluating_command_gives_the_kit_numbers(trained: Path, synthetic_dataset: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # float32 on both sides: bfloat16 rounding may differ between implementations in boundary voxels
    assert_ok(run_bundle("evaluate", tiny(synthetic_dataset, trained, amp=False)))
    with (trained / "eval" / "val_mean_dice_raw.csv").open() as stream:
        bundle_dice = {Path(row["filename"]).name.split(".")[0]: float(row["class0"])
                       for row in csv.DictReader(stream)}
    assert sorted(bundle_dice) == ["spleen_5", "spleen_6"]
    # the kit's command on the same model.pt and data; it reads the recipe from models/manifest.json
    out = trained / "kit_evaluation"
    assert main(["evaluate", "--model", str(trained / "models" / "model.pt"), "--data", str(synthetic_dataset),
                 "--out", str(out), "--no-amp", "--no-save-predictions"]) == 0
    capsys.readouterr()
    with (out / "per_case.csv").open() as stream:
        kit_dice = {row["case"]: float(row["dice"]) for row in csv.DictReader(stream) if row["space"] == "original"}
    assert kit_dice.keys() == bundle_dice.keys()
    for case, value in bundle_dice.items():
        assert value == pytest.approx(kit_dice[case], abs=1e-4)


@pytest.mark.slow
def test_inference_command_writes_masks_on_the_input_grid(trained: Path, synthetic_dataset: Path) -> None:
    import nibabel as nib
    import numpy as np

    assert_ok(run_bundle("infer", tiny_inference(synthetic_dataset, trained)))
    mask = nib.load(trained / "eval" / "spleen_7" / "spleen_7_trans.nii.gz")
    image = nib.load(synthetic_dataset / "imagesTs" / "spleen_7.nii.gz")
    assert mask.shape[:3] == image.shape and np.allclose(mask.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0.0, 1.0}


@pytest.mark.slow
def test_multi_gpu_training_falls_back_to_gloo_on_cpu(synthetic_dataset: Path, tmp_path: Path) -> None:
    from spleenkit.model import load_model

    result = run_bundle("train-multi-gpu", tiny(synthetic_dataset, tmp_path))
    assert_ok(result)
    assert "cpu, gloo)" in result.stdout + result.stderr  # spleenkit.distributed: gloo between CPU processes
    load_model(tmp_path / "models" / "model.pt", "quick")  # validated at its only epoch, though quick's interval is 10


@pytest.mark.slow
def test_multi_gpu_evaluation_on_cpu(trained: Path, synthetic_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.pt").write_bytes((trained / "models" / "model.pt").read_bytes())
    assert_ok(run_bundle("evaluate-multi-gpu", tiny(synthetic_dataset, root)))
    with (root / "eval" / "val_mean_dice_raw.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert sorted(Path(row["filename"]).name for row in rows) == ["spleen_5.nii.gz", "spleen_6.nii.gz"]

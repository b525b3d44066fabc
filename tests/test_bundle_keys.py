"""The bundle, key for key: every id of MONAI's spleen_ct_segmentation 0.5.9 configs is in the kit's configs
with the same kind of value, the bundle builds exactly the package's pipeline, and overrides at any depth
take effect through ``python -m monai.bundle run`` and ``ConfigWorkflow``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from spleenkit.bundle import bundle_command, bundle_source, override_problems
from spleenkit.cli import main
from spleenkit.errors import BadInputError

BUNDLE = bundle_source()
CONFIGS = BUNDLE / "configs"
OFFICIAL = Path(__file__).parent / "fixtures" / "official_spleen_ct_segmentation"
# each official file, with the kit's files that are merged when it runs (the seed's commands)
RUNS = {
    "train.json": ["train.json"],
    "evaluate.json": ["train.json", "evaluate.json"],
    "inference.json": ["inference.json"],
    "multi_gpu_train.json": ["train.json", "multi_gpu_train.json"],
    "multi_gpu_evaluate.json": ["train.json", "evaluate.json", "multi_gpu_evaluate.json"],
}
PRESETS = ["seed", "bundle-0.5.9", "fast", "quick"]
# tiny settings for CPU (the synthetic phantoms: 64x64 in-plane, 5 mm slices)
SPACING = [4, 4, 5]


def load(*names: str) -> dict[str, Any]:
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files([str(CONFIGS / name) for name in names])


def parser_for(names: list[str], **overrides: Any) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser(load(*names))
    parser.update({"device": "cpu", **overrides})
    return parser


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value[:1] in ("$", "@", "%")


def kind(value: Any) -> str:
    """What kind of value a config holds: a component, a dict, a list, a number, a flag, text or nothing."""
    if isinstance(value, dict):
        return "component" if "_target_" in value else "dict"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, bool):
        return "flag"
    if isinstance(value, int | float):
        return "number"
    return "nothing" if value is None else "text" if isinstance(value, str) else type(value).__name__


def leaves(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every (id, value) of a raw config, ids as MONAI writes them (``train#handlers#0#_target_``)."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    found = []
    for key, value in items:
        name = f"{prefix}#{key}" if prefix else str(key)
        found.append((name, value))
        found.extend(leaves(value, name))
    return found


def lookup(config: Any, name: str) -> tuple[bool, Any]:
    """The raw value of an id in a config file, whose top-level keys may themselves hold ``#``."""
    for key in sorted((k for k in config if name == k or name.startswith(k + "#")), key=len, reverse=True):
        value = config[key]
        rest = name[len(key) + 1:].split("#") if name != key else []
        for part in rest:
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                break
        else:
            return True, value
    return False, None


# --------------------------------------------------------------------------- every official id
@pytest.mark.parametrize("official_file", list(RUNS))
def test_every_official_id_is_in_the_kits_configs_with_the_same_kind_of_value(official_file: str) -> None:
    official = json.loads((OFFICIAL / official_file).read_text())
    kit = json.loads((CONFIGS / official_file).read_text())
    parser = None
    problems = []
    for name, value in leaves(official):
        found, mine = lookup(kit, name)
        if not found:
            problems.append(f"{name} is missing")
            continue
        expected = kind(value)
        if name.endswith("_target_"):  # a class name, or an expression giving the callable
            ok = isinstance(mine, str)
        elif is_reference(value) or not is_reference(mine):
            ok = kind(mine) == expected
        else:  # an official literal given by an expression: it must resolve to the same kind
            parser = parser or parser_for(RUNS[official_file])
            ok = kind(parser.get_parsed_content(name.replace("::", "#"))) == expected
        if not ok:
            problems.append(f"{name}: {mine!r} is not a {expected} like {value!r}")
    assert not problems, "\n".join(problems)


def test_the_fixtures_are_the_official_structure() -> None:
    """The walk above is only as good as its fixtures: they hold the known 0.5.9 settings and their notice."""
    def official(name: str) -> dict[str, Any]:
        return json.loads((OFFICIAL / name).read_text())

    train = official("train.json")
    assert train["optimizer"]["_target_"] == "Novograd" and train["epochs"] == 800
    assert [t["_target_"] for t in train["train"]["deterministic_transforms"]] == [
        "LoadImaged", "EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityRanged", "EnsureTyped"]
    assert official("inference.json")["load_pretrain"] is True
    assert "LOCAL_RANK" in official("multi_gpu_train.json")["device"]
    notice = (OFFICIAL / "README.md").read_text()
    assert "Apache License, Version 2.0" in notice and "Project-MONAI/model-zoo" in notice


# --------------------------------------------------------------------------- the bundle builds the package's pipeline
@pytest.mark.parametrize("preset", PRESETS)
def test_train_config_builds_the_packages_pipeline(preset: str, synthetic_dataset: Path, tmp_path: Path) -> None:
    from spleenkit.compare import compare_networks, compare_objects, compare_transforms
    from spleenkit.model import build_unet
    from spleenkit.predict import make_inferer
    from spleenkit.training import make_loss, make_optimizer, make_scheduler
    from spleenkit.transforms import (
        deterministic_transforms,
        random_transforms,
        training_transforms,
        validation_transforms,
    )

    parser = parser_for(["train.json"], preset=preset, dataset_dir=str(synthetic_dataset), validation_cases=2,
                        cache_rate=0, num_workers=0, bundle_root=str(tmp_path))
    recipe = parser.get_parsed_content("recipe")
    assert recipe.name == preset
    built = parser.get_parsed_content
    checks = {
        "train#deterministic_transforms": compare_transforms(built("train#deterministic_transforms"),
                                                             deterministic_transforms(recipe)),
        "train#pad_transforms + train#random_transforms + train#augmentation_transforms": compare_transforms(
            built("train#pad_transforms") + built("train#random_transforms") + built("train#augmentation_transforms"),
            random_transforms(recipe)),
        "train#preprocessing": compare_transforms(built("train#preprocessing"), training_transforms(recipe)),
        "validate#preprocessing": compare_transforms(built("validate#preprocessing"), validation_transforms(recipe)),
        "network_def": compare_networks(built("network_def"), build_unet(recipe)),
        "loss": compare_objects(built("loss"), make_loss(recipe)),
        "validate#inferer": compare_objects(built("validate#inferer"),
                                            make_inferer(recipe, device="cpu", stitch_device="auto")),
    }
    network = built("network")
    optimizer, reference = built("optimizer"), make_optimizer(recipe, network.parameters())
    checks["optimizer"] = compare_objects({"type": type(optimizer), **optimizer.defaults},
                                          {"type": type(reference), **reference.defaults})
    schedule = built("lr_scheduler")
    expected = make_scheduler(recipe, reference, recipe.epochs * len(built("train#dataloader")))
    checks["lr_scheduler"] = compare_objects(
        None if schedule is None else (type(schedule), schedule.state_dict()),
        None if expected is None else (type(expected), expected.state_dict()))
    assert {name: str(result) for name, result in checks.items() if not result} == {}
    handlers = [type(h).__name__ for h in built("train#handlers")]
    assert ("LrScheduleHandler" in handlers) == (recipe.scheduler is not None)


@pytest.mark.parametrize("preset", PRESETS)
def test_inference_config_builds_the_packages_pipeline(preset: str) -> None:
    from spleenkit.compare import compare_networks, compare_objects, compare_transforms
    from spleenkit.model import build_unet
    from spleenkit.predict import make_inferer, postprocessing
    from spleenkit.transforms import inference_transforms

    parser = parser_for(["inference.json"], preset=preset)
    recipe = parser.get_parsed_content("recipe")
    built = parser.get_parsed_content
    reference_chain = inference_transforms(recipe)
    checks = {
        "preprocessing": compare_transforms(built("preprocessing"), reference_chain),
        "postprocessing": compare_transforms(built("postprocessing").transforms[:3],
                                             postprocessing(invert=reference_chain)),
        "network_def": compare_networks(built("network_def"), build_unet(recipe)),
        "inferer": compare_objects(built("inferer"), make_inferer(recipe, device="cpu", stitch_device="auto")),
    }
    assert {name: str(result) for name, result in checks.items() if not result} == {}
    assert type(built("postprocessing").transforms[3]).__name__ == "SaveImaged"


def test_a_difference_would_be_found() -> None:
    """The comparisons above can fail: a changed argument deep in the bundle shows up as a named difference."""
    from spleenkit.compare import compare_networks, compare_transforms
    from spleenkit.model import build_unet
    from spleenkit.transforms import inference_transforms

    parser = parser_for(["inference.json"], **{"preprocessing#transforms#4#a_max": 200,
                                               "network_def#num_res_units": 1})
    chain = compare_transforms(parser.get_parsed_content("preprocessing"), inference_transforms("seed"))
    assert not chain and "step 5 (ScaleIntensityRanged)" in str(chain) and "200" in str(chain)
    assert not compare_networks(parser.get_parsed_content("network_def"), build_unet("seed"))
    # and the recipe read back from the bundle's ids follows the change
    assert parser.get_parsed_content("recipe").intensity_range == (-57.0, 200.0)


def test_presets_the_configs_cannot_express_are_refused() -> None:
    parser = parser_for(["train.json"], preset="tutorial")
    with pytest.raises(Exception) as caught:
        parser.get_parsed_content("recipe")
    error: BaseException | None = caught.value
    while error is not None and not isinstance(error, BadInputError):
        error = error.__cause__ or error.__context__
    assert error is not None and "DiceLoss and CropForegroundd" in str(error) and "spleenkit train" in str(error)


# --------------------------------------------------------------------------- overrides at any depth
DEEP = {
    "train#random_transforms#0#spatial_size": [48, 48, 48],  # a transform argument inside the random chain
    "validate#inferer#roi_size": [64, 64, 64],  # the sliding window
    "network_def#num_res_units": 3,  # a network argument
    "train#dataloader#num_workers": 1,  # a data loader's workers
    "train#handlers#3#_disabled_": True,  # no TensorBoard
}


def workflow(workflow_type: str, configs: list[str], **overrides: Any) -> Any:
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(workflow_type=workflow_type, config_file=[str(CONFIGS / c) for c in configs],
                          meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
                          **overrides)


def write_model(root: Path, **settings: Any) -> Path:
    from spleenkit.model import atomic_save, build_unet
    from spleenkit.presets import get_preset

    return atomic_save(build_unet(get_preset("seed", **settings)).state_dict(), root / "models" / "model.pt")


def test_deep_overrides_take_effect_in_the_training_workflow(synthetic_dataset: Path, tmp_path: Path) -> None:
    train = workflow("train", ["train.json"], dataset_dir=str(synthetic_dataset), bundle_root=str(tmp_path),
                     validation_cases=2, cache_rate=0, num_workers=0, spacing=SPACING, **DEEP)
    train.initialize()
    assert train.check_properties() == []
    crops = train.train_dataset[0]  # the random chain run on one case: num_samples crops
    assert len(crops) == 4 and all(tuple(crop["image"].shape) == (1, 48, 48, 48) for crop in crops)
    assert list(train.val_inferer.roi_size) == [64, 64, 64]
    network = train.parser.get_parsed_content("network_def")
    assert len(network.model[0].conv) == 3  # three residual units where the preset has two
    assert train.parser.get_parsed_content("train#dataloader").num_workers == 1
    names = [type(handler).__name__ for handler in train.train_handlers]
    assert "TensorBoardStatsHandler" not in names and "StatsHandler" in names
    # the recipe the run records is read back from those ids
    recipe = train.parser.get_parsed_content("recipe")
    assert recipe.patch_size == (48, 48, 48) and recipe.validation_roi_size == (64, 64, 64)
    assert recipe.num_res_units == 3 and recipe.spacing == (4, 4, 5)


def test_deep_overrides_take_effect_in_the_evaluation_workflow(synthetic_dataset: Path, tmp_path: Path) -> None:
    write_model(tmp_path, num_res_units=3)
    evaluate = workflow("train", ["train.json", "evaluate.json"], dataset_dir=str(synthetic_dataset),
                        bundle_root=str(tmp_path), validation_cases=2, num_workers=0, spacing=SPACING, amp=False,
                        run_id="evaluating", **{"validate#inferer#roi_size": [48, 48, 48],
                                                "network_def#num_res_units": 3,
                                                "validate#handlers#1#_disabled_": True})
    evaluate.initialize()
    assert evaluate.check_properties() == []
    assert list(evaluate.val_inferer.roi_size) == [48, 48, 48]
    assert [type(h).__name__ for h in evaluate.val_handlers] == ["CheckpointLoader", "MetricsSaver"]
    evaluate.run()
    rows = (tmp_path / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()
    assert len(rows) == 3  # a header and the two validation cases


def test_deep_overrides_take_effect_in_the_inference_workflow(synthetic_dataset: Path, tmp_path: Path) -> None:
    write_model(tmp_path, num_res_units=3)
    infer = workflow("infer", ["inference.json"], dataset_dir=str(synthetic_dataset), bundle_root=str(tmp_path),
                     num_workers=0, spacing=SPACING, run_id="evaluating",
                     **{"inferer#roi_size": [160, 160, 160], "network_def#num_res_units": 3,
                        "dataloader#num_workers": 0, "postprocessing#transforms#3#output_postfix": "seg"})
    infer.initialize()  # loads models/model.pt: only a network with three residual units fits it
    assert infer.check_properties() == []
    assert list(infer.inferer.roi_size) == [160, 160, 160]
    assert infer.parser.get_parsed_content("recipe").validation_roi_size == (160, 160, 160)
    infer.run()
    assert [p.name for p in (tmp_path / "eval").glob("*/*.nii.gz")] == ["spleen_7_seg.nii.gz"]


@pytest.fixture(scope="module")
def overridden_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m monai.bundle run training`` with overrides at several depths: the bundle root it filled."""
    root = tmp_path_factory.mktemp("deep_overrides")
    overrides = {"dataset_dir": str(synthetic_dataset), "bundle_root": str(root), "epochs": 1, "val_interval": 1,
                 "spacing": SPACING, "num_samples": 1, "num_workers": 0, "validation_cases": 2,
                 "train#random_transforms#0#spatial_size": [48, 48, 48], "network_def#num_res_units": 3,
                 "train#dataloader#num_workers": 0, "train#handlers#3#_disabled_": True}
    result = subprocess.run(bundle_command("train", overrides=overrides), cwd=BUNDLE, capture_output=True, text=True,
                            timeout=400, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return root


@pytest.mark.slow
def test_monai_bundle_run_applies_deep_training_overrides(overridden_run: Path) -> None:
    from spleenkit.model import load_model
    from spleenkit.presets import get_preset
    from spleenkit.runs import run_preset

    recipe = run_preset(overridden_run / "models")  # the recipe the run recorded, read from the bundle's ids
    assert recipe.patch_size == (48, 48, 48) and recipe.validation_roi_size == (48, 48, 48)
    assert recipe.num_res_units == 3
    load_model(overridden_run / "models" / "model.pt", get_preset("seed", num_res_units=3))  # strict keys
    # train#handlers#3 (TensorBoard of the training loss) disabled: the log holds validation scalars only
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(overridden_run / "eval")).Reload()
    tags = events.Tags()["scalars"]
    assert "val_mean_dice" in tags and "train_loss" not in tags, tags


@pytest.mark.slow
def test_monai_bundle_run_applies_the_inferer_window(overridden_run: Path, synthetic_dataset: Path) -> None:
    overrides = {"dataset_dir": str(synthetic_dataset), "bundle_root": str(overridden_run), "spacing": SPACING,
                 "num_workers": 0, "inferer#roi_size": [160, 160, 160], "network_def#num_res_units": 3,
                 "postprocessing#transforms#3#output_postfix": "window160"}
    result = subprocess.run(bundle_command("infer", overrides=overrides), cwd=BUNDLE, capture_output=True, text=True,
                            timeout=400, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (overridden_run / "eval" / "spleen_7" / "spleen_7_window160.nii.gz").is_file()


# --------------------------------------------------------------------------- refusals of ids in neither config
@pytest.mark.parametrize(("key", "suggestion"), [
    ("train#random_transforms#0#spatal_size", "--train#random_transforms#0#spatial_size"),
    ("validate#inferer#roi_sise", "--validate#inferer#roi_size"),
    ("network_def#num_res_unit", "--network_def#num_res_units"),
    ("train#dataloder#num_workers", "--train#dataloader#num_workers"),
    ("train#handler#3#_disabled_", "--train#handlers#3#_disabled_"),
])
def test_nested_ids_in_neither_config_are_refused_with_a_suggestion(key: str, suggestion: str) -> None:
    problems = override_problems(load("train.json"), [key])
    assert len(problems) == 1 and f"did you mean {suggestion}" in problems[0], problems


def test_official_ids_at_every_depth_are_accepted() -> None:
    for official_file, names in RUNS.items():
        official = json.loads((OFFICIAL / official_file).read_text())
        ids = [name for name, _ in leaves(official)]
        assert override_problems(load(*names), ids) == [], official_file


def test_cli_bundle_run_refuses_a_nested_id(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bundle", "run", "infer", "--set", "inferer#roi_sise=[64,64,64]"]) == 2
    assert "did you mean --inferer#roi_size" in capsys.readouterr().err

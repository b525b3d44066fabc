"""The kit against the originals it reproduces, object for object.

The official spleen_ct_segmentation 0.5.9 configs and MONAI's spleen_segmentation_3d tutorial (both kept as test
fixtures, with their sources and licence) are built with MONAI's own ConfigParser and compared with what the kit's
bundle and the package build for the ``seed`` and ``bundle-0.5.9`` recipes and the ``tutorial`` recipe: transform
chains with every argument, network, loss, optimiser, schedule, inferers, post-processing, the handlers' settings,
engines and split. What the kit adds or sets its own way is listed in :data:`ADDITIONS` with the reason; each entry
undoes the kit's change, after which the two must be equal, and an entry whose change is no longer there fails.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from spleenkit.bundle import bundle_source
from spleenkit.compare import compare_networks, compare_objects, compare_transforms, describe

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "official_spleen_ct_segmentation"
TUTORIAL = FIXTURES / "monai_spleen_segmentation_3d_tutorial" / "tutorial.json"
CONFIGS = bundle_source() / "configs"
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- building both sides
def parser(folder: Path, names: list[str], **overrides: Any) -> Any:
    from monai.bundle import ConfigParser

    built = ConfigParser(ConfigParser.load_config_files([str(folder / name) for name in names]))
    built.update(overrides)
    return built


def both(names: list[str], preset: str, dataset: Path, root: Path) -> tuple[Any, Any]:
    """The official configs and the kit's, with the same data (MONAI's CI volumes), bundle root and device."""
    shared = {"bundle_root": str(root), "dataset_dir": str(dataset),
              "images": "$list(sorted(glob.glob(@dataset_dir + '/image_*.nii.gz')))",
              "labels": "$list(sorted(glob.glob(@dataset_dir + '/label_*.nii.gz')))",
              "datalist": "$list(sorted(glob.glob(@dataset_dir + '/image_*.nii.gz')))"}
    official = parser(OFFICIAL, names, **shared, device="$torch.device('cpu')")
    kit = parser(CONFIGS, names, **shared, device="cpu", preset=preset)
    if "train.json" in names:  # the datalist override is inference's; train.json builds its own from images
        official.update({"datalist": None})
        kit.update({"datalist": None})
    return official, kit


def settings(handler: Any) -> dict[str, Any]:
    """A handler's settings as plain data: its numbers, flags, names and paths; the names of what it saves or
    loads; a checkpoint's file name and count. Engines, networks and loggers it holds are left out."""
    found: dict[str, Any] = {"type": type(handler).__name__}
    for key, value in vars(handler).items():
        if isinstance(value, bool | int | float | str | Path | type(None)):
            found[key] = str(value) if isinstance(value, Path) else value
        elif isinstance(value, list | tuple) and all(isinstance(item, str | int | float) for item in value):
            found[key] = list(value)
        elif isinstance(value, dict):
            found[key] = sorted(value)
        elif hasattr(value, "save_handler") and hasattr(value, "n_saved"):  # an ignite Checkpoint
            saver = value.save_handler
            found[key] = {"n_saved": value.n_saved, "score_name": value.score_name,
                          "dirname": str(getattr(saver, "dirname", "")), "filename": getattr(saver, "filename", None)}
        elif hasattr(value, "log_dir"):  # a TensorBoard writer
            found[key] = str(value.log_dir)
    return found


def handler_list(handlers: list[Any]) -> list[dict[str, Any]]:
    return [settings(handler) for handler in handlers]


def engine_settings(engine: Any) -> dict[str, Any]:
    return {"type": type(engine).__name__, "max_epochs": engine.state.max_epochs, "amp": engine.amp,
            "key_metric": sorted(getattr(engine, "_key_metric_name", None) or [])}


# --------------------------------------------------------------------------- what the kit adds, and why
@dataclass(frozen=True)
class Addition:
    """A listed difference: why the kit differs, and how to take it out of the kit's side (as described data)."""

    reason: str
    undo: Callable[[Any], Any]


def _without(name: str) -> Callable[[list[Any]], list[Any]]:
    return lambda steps: [step for step in steps if step.get("type") != name]


def _replace(**values: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda found: {**found, **values}


ADDITIONS: dict[str, Addition] = {
    "train#random_transforms": Addition(
        "SpatialPadd to the crop size before the random crop: a no-op on images at least as large as the crop; on "
        "smaller ones the original gives crops of uneven size, which cannot be batched",
        _without("SpatialPadd")),
    "train#preprocessing": Addition("the same SpatialPadd, inside the training chain", _without("SpatialPadd")),
    "train#trainer": Addition(
        "amp=False: the kit's precision step (train#iteration_update) runs autocast where it helps, float16 on a GPU, "
        "bfloat16 on a CPU that has it; MONAI's amp=True does nothing on a CPU",
        _replace(amp=True)),
    "validate#evaluator": Addition(
        "amp=False: the evaluator's inferer is the same window run under the kit's autocast", _replace(amp=True)),
    "evaluator": Addition(
        "amp=False: inference runs under the kit's autocast on a GPU and in float32 with batch norm folded on a CPU "
        "(the masks of float32)", _replace(amp=True)),
    "train#trainer#train_handlers": Addition(
        "FinalValidation after the original handlers: a last validation when the last epoch is not a multiple of "
        "val_interval, so that every training leaves models/model.pt (as spleenkit train does)",
        lambda handlers: [found for found in handlers if found["type"] != "FinalValidation"]),
    "validate#inferer": Addition(
        "the windows and the stitched output on the kit's device (the original leaves them where the input is: the "
        "same on one device)", _replace(sw_device=None, device=None)),
    "inferer": Addition("the same, for inference", _replace(sw_device=None, device=None)),
    "loaders' num_workers": Addition(
        "the machine's cores (spleenkit.devices) where the original says 4",
        _replace(num_workers=4)),
    "validate#handlers (evaluate)": Addition(
        "CheckpointLoader checks models/model.pt first and says what to do when it is missing or does not fit "
        "(spleenkit.bundle.checked_weights, the same path); MetricsSaver saves val_accuracy, the accuracy metric's "
        "name (the original's 'val_acc' names no metric)",
        lambda handlers: [{**found, "metrics": ["val_mean_dice", "val_acc"]} if found["type"] == "MetricsSaver"
                          else found for found in handlers]),
    "validate#postprocessing (evaluate)": Addition(
        "OriginalLabeld after the original steps: scores against the label file as stored, as spleenkit evaluate "
        "does", _without("OriginalLabeld")),
    "datasets' copy_cache": Addition(
        "CacheDataset(copy_cache=False): the random crops never change the cached volumes, so no copy per item",
        _replace(copy_cache=True)),
}
# the seed recipe follows the model card where release 0.5.9's train.json has its own numbers
SEED_RECIPE = {
    "optimizer": "Adam 1e-4 (the model card) where 0.5.9 has Novograd 2e-3",
    "lr_scheduler": "no schedule (the model card) where 0.5.9 steps StepLR(5000, 0.1) once per epoch",
    "epochs": "1260 epochs (the model card) where 0.5.9 has 800",
    "val_interval": "validation every 5 epochs where 0.5.9 validates every epoch",
}


def compared(official: Any, kit: Any, addition: str | None = None) -> str | None:
    """The first difference between two objects' settings (:func:`spleenkit.compare.describe`), after undoing the
    listed addition on the kit's side, which must then have changed something; None when equal."""
    from spleenkit.compare import first_difference

    mine = describe(kit)
    if addition is not None:
        undone = ADDITIONS[addition].undo(mine)
        assert undone != mine, f"the listed addition {addition!r} is no longer there: remove it from ADDITIONS"
        mine = undone
    return first_difference(mine, describe(official))


@pytest.fixture(scope="module")
def built(random_volumes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any]]:
    return {preset: both(["train.json"], preset, random_volumes, tmp_path_factory.mktemp(preset))
            for preset in ("seed", "bundle-0.5.9")}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("preset", ["seed", "bundle-0.5.9"])
def test_train_json_builds_the_originals_objects(preset: str, built: dict[str, tuple[Any, Any]]) -> None:
    from spleenkit.model import build_unet
    from spleenkit.predict import make_inferer
    from spleenkit.training import make_loss
    from spleenkit.transforms import deterministic_transforms, random_transforms, validation_transforms

    official, kit = built[preset]
    o, k = official.get_parsed_content, kit.get_parsed_content
    recipe = k("recipe")
    assert recipe.name == preset
    # the seed's own numbers (SEED_RECIPE, checked below) taken out of the original's side: no schedule, so no
    # LrScheduleHandler; 1260 epochs
    seed = preset == "seed"
    metrics = {name: compared(o(name), k(name))  # before an engine attaches them (and records itself in them)
               for name in ("train#key_metric", "validate#key_metric", "validate#additional_metrics")}
    handlers = handler_list([h for h in o("train#handlers") if not (seed and type(h).__name__ == "LrScheduleHandler")])
    if seed:  # validation every 5 epochs
        handlers = [{**h, "interval": 5} if h["type"] == "ValidationHandler" else h for h in handlers]
    trainer = {**engine_settings(o("train#trainer")), **({"max_epochs": 1260} if seed else {})}
    problems: dict[str, str | None] = {
        # transform chains, every argument; the bundle's and the package's
        "train#deterministic_transforms": compared(o("train#deterministic_transforms"),
                                                   k("train#deterministic_transforms")),
        "package deterministic_transforms": compared(o("train#deterministic_transforms"),
                                                     deterministic_transforms(recipe)),
        "train#random_transforms": compared(
            o("train#random_transforms"),
            k("train#pad_transforms") + k("train#random_transforms") + k("train#augmentation_transforms"),
            "train#random_transforms"),
        "package random_transforms": compared(o("train#random_transforms"), random_transforms(recipe),
                                              "train#random_transforms"),
        "train#preprocessing": compared(o("train#preprocessing").transforms, k("train#preprocessing").transforms,
                                        "train#preprocessing"),
        "validate#preprocessing": compared(o("validate#preprocessing").transforms,
                                           k("validate#preprocessing").transforms),
        "package validation_transforms": compared(o("validate#preprocessing").transforms,
                                                  validation_transforms(recipe).transforms),
        # network, loss, inferers, post-processing, metrics
        "network_def": compared(o("network_def"), k("network_def")),
        "package build_unet": compared(o("network_def"), build_unet(recipe)),
        "loss": compared(o("loss"), k("loss")),
        "package make_loss": compared(o("loss"), make_loss(recipe)),
        "train#inferer": compared(o("train#inferer"), k("train#inferer")),
        "validate#inferer": compared(o("validate#inferer"), k("validate#inferer"), "validate#inferer"),
        "package make_inferer": compared(o("validate#inferer"), make_inferer(recipe, device="cpu",
                                                                            stitch_device="auto"),
                                         "validate#inferer"),
        "train#postprocessing": compared(o("train#postprocessing").transforms, k("train#postprocessing").transforms),
        "validate#postprocessing": compared(o("validate#postprocessing").transforms,
                                            k("validate#postprocessing").transforms),
        **metrics,
        # handlers and engines
        "train#handlers": compared(handlers, handler_list(k("train#handlers"))),
        "train#trainer#train_handlers": compared(handlers, handler_list(k("train#trainer#train_handlers")),
                                                 "train#trainer#train_handlers"),
        "validate#handlers": compared(handler_list(o("validate#handlers")), handler_list(k("validate#handlers"))),
        "train#trainer": compared(trainer, engine_settings(k("train#trainer")), "train#trainer"),
        "validate#evaluator": compared(engine_settings(o("validate#evaluator")),
                                       engine_settings(k("validate#evaluator")), "validate#evaluator"),
        # data: the split, the caches, the loaders
        "train#dataset#data": compared(o("train#dataset#data"), k("train#dataset#data")),
        "validate#dataset#data": compared(o("validate#dataset#data"), k("validate#dataset#data")),
        "cache_rate": compared([official[part]["dataset"]["cache_rate"] for part in ("train", "validate")],
                               [k(f"{part}#dataset#cache_rate") for part in ("train", "validate")]),
        "train#dataloader": compared(
            {key: official["train"]["dataloader"][key] for key in ("batch_size", "shuffle", "num_workers")},
            {key: k(f"train#dataloader#{key}") for key in ("batch_size", "shuffle", "num_workers")},
            "loaders' num_workers"),
        "validate#dataloader": compared(
            {key: official["validate"]["dataloader"][key] for key in ("batch_size", "shuffle", "num_workers")},
            {key: k(f"validate#dataloader#{key}") for key in ("batch_size", "shuffle", "num_workers")},
            "loaders' num_workers"),
        "train#dataset#copy_cache": compared({"copy_cache": True}, {"copy_cache": k("train#dataset#copy_cache")},
                                             "datasets' copy_cache"),
        # the seed of set_determinism
        "set_determinism": compared(re.findall(r"seed=(\d+)", " ".join(official["initialize"])), [str(recipe.seed)]),
    }
    # optimiser, schedule and length: release 0.5.9's in bundle-0.5.9, the model card's in seed
    network = k("network")
    optimizer = k("optimizer")
    reference = o("optimizer")
    schedule, original_schedule = k("lr_scheduler"), o("lr_scheduler")
    length = {"optimizer": compared({"type": type(reference).__name__, **reference.defaults},
                                    {"type": type(optimizer).__name__, **optimizer.defaults}),
              "lr_scheduler": compared(None if original_schedule is None else settings(original_schedule),
                                       None if schedule is None else settings(schedule)),
              "epochs": compared(o("epochs"), k("train#trainer#max_epochs")),
              "val_interval": compared(o("val_interval"), k("train#handlers#1#interval"))}
    if preset == "seed":
        assert {name for name, found in length.items() if found} == set(SEED_RECIPE), length
        assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 1e-4 and schedule is None
        assert (k("train#trainer#max_epochs"), k("train#handlers#1#interval")) == (1260, 5)
    else:
        problems.update(length)
        assert type(schedule).__name__ == "StepLR" and k("train#handlers#0#epoch_level") is True
    # the network: the same tensors, channels-last on a CPU (oneDNN's fast layout for 3D convolutions), a listed
    # addition that the settings above do not show
    assert compare_networks(network, o("network"))
    weight = next(module for module in network.modules() if isinstance(module, torch.nn.Conv3d)).weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert {name: found for name, found in problems.items() if found} == {}


@pytest.mark.filterwarnings("ignore")
def test_evaluate_and_inference_json_build_the_originals_objects(random_volumes: Path, tmp_path: Path) -> None:
    from spleenkit.model import atomic_save, build_unet
    from spleenkit.predict import make_inferer, postprocessing
    from spleenkit.transforms import inference_transforms

    atomic_save(build_unet("seed").state_dict(), tmp_path / "models" / "model.pt")  # what CheckpointLoader reads
    official, kit = both(["train.json", "evaluate.json"], "seed", random_volumes, tmp_path)
    o, k = official.get_parsed_content, kit.get_parsed_content
    problems = {
        "validate#postprocessing": compared(o("validate#postprocessing").transforms,
                                            k("validate#postprocessing").transforms,
                                            "validate#postprocessing (evaluate)"),
        "validate#handlers": compared(handler_list(o("validate#handlers")), handler_list(k("validate#handlers")),
                                      "validate#handlers (evaluate)"),
        "validate#dataset#cache_rate": compared(o("validate#dataset#cache_rate"), k("validate#dataset#cache_rate")),
    }
    official, kit = both(["inference.json"], "seed", random_volumes, tmp_path)
    o, k = official.get_parsed_content, kit.get_parsed_content
    recipe = k("recipe")
    chain = inference_transforms(recipe)
    problems.update({
        "preprocessing": compared(o("preprocessing").transforms, k("preprocessing").transforms),
        "package inference_transforms": compared(o("preprocessing").transforms, chain.transforms),
        "network_def": compared(o("network_def"), k("network_def")),
        "inferer": compared(o("inferer"), k("inferer"), "inferer"),
        "package make_inferer": compared(o("inferer"), make_inferer(recipe, device="cpu", stitch_device="auto"),
                                         "inferer"),
        "postprocessing": compared(o("postprocessing").transforms, k("postprocessing").transforms),
        "package postprocessing": compared(o("postprocessing").transforms[:3], postprocessing(invert=chain).transforms),
        "handlers": compared(handler_list(o("handlers")), handler_list(k("handlers"))),
        "checkpointloader": compared(settings(o("checkpointloader")), settings(k("checkpointloader"))),
        "evaluator": compared(engine_settings(o("evaluator")), engine_settings(k("evaluator")), "evaluator"),
        "dataset#data": compared(o("dataset#data"), k("dataset#data")),
        "dataloader": compared({key: official["dataloader"][key] for key in ("batch_size", "shuffle", "num_workers")},
                               {key: k(f"dataloader#{key}") for key in ("batch_size", "shuffle", "num_workers")},
                               "loaders' num_workers"),
        "set_determinism": compared(re.findall(r"seed=(\d+)", " ".join(official["initialize"])), [str(recipe.seed)]),
    })
    assert {name: found for name, found in problems.items() if found} == {}


# the multi-GPU files: small, compared as written (their objects need a process group)
MULTI_GPU_ADDITIONS = {
    "device": "spleenkit.bundle.pick_device: this process's GPU under torchrun (LOCAL_RANK, as the original), the CPU "
              "without one",
    "network": "spleenkit.bundle.distributed_data_parallel over the channels-last network: DistributedDataParallel, "
               "which takes device_ids for GPUs only (the original's cannot run on CPU processes)",
    "train#trainer#train_handlers": "the original slice of train#handlers, plus FinalValidation on every process",
    "initialize": "the process group opened by spleenkit.bundle.init_process_group (NCCL between GPUs, gloo between "
                  "CPU processes), overrides checked first, the recipe's seed, the run's manifest",
    "finalize": "spleenkit.bundle.destroy_process_group: the same, when a group is open",
}


@pytest.mark.parametrize("name", ["multi_gpu_train.json", "multi_gpu_evaluate.json"])
def test_multi_gpu_configs_are_the_originals_but_for_the_listed_ids(name: str) -> None:
    official = json.loads((OFFICIAL / name).read_text())
    kit = json.loads((CONFIGS / name).read_text())
    # "training" / "evaluating": the run ids of the README's commands (`run training`), aliases of "run"
    assert set(kit) - set(official) <= {"training", "evaluating"} and set(official) <= set(kit)
    assert all(kit[alias] == "%run" for alias in set(kit) - set(official))
    differing = {key for key in official if kit[key] != official[key]}
    assert differing <= set(MULTI_GPU_ADDITIONS), differing - set(MULTI_GPU_ADDITIONS)
    assert "$@validate#evaluator.logger.setLevel(logging.WARNING if dist.get_rank() > 0 else logging.INFO)" \
        in kit["initialize"]


# --------------------------------------------------------------------------- the tutorial
@pytest.fixture(scope="module")
def tutorial() -> Any:
    from monai.bundle import ConfigParser

    return ConfigParser(json.loads(TUTORIAL.read_text()))


def test_the_tutorial_recipe_builds_the_tutorials_objects(tutorial: Any) -> None:
    from spleenkit.model import build_unet
    from spleenkit.predict import make_inferer
    from spleenkit.presets import get_preset
    from spleenkit.training import make_loss, make_optimizer
    from spleenkit.transforms import training_transforms, validation_transforms

    t = tutorial.get_parsed_content
    recipe = get_preset("tutorial")
    network = build_unet(recipe)
    optimizer, reference = make_optimizer(recipe, network.parameters()), t("optimizer")
    checks = {
        "train_transforms": compare_transforms(training_transforms(recipe), t("train_transforms")),
        "val_transforms": compare_transforms(validation_transforms(recipe), t("val_transforms")),
        "network": compare_networks(network, t("network")),
        # Norm.BATCH is the name "BATCH", the kit writes "batch" (as the bundle): MONAI looks either up alike
        "network settings": compare_objects({**describe(network), "norm": str(network.norm).lower()},
                                            {**describe(t("network")), "norm": str(t("network").norm).lower()}),
        "loss": compare_objects(make_loss(recipe), t("loss")),
        "optimizer": compare_objects({"type": type(optimizer), **optimizer.defaults},
                                     {"type": type(reference), **reference.defaults}),
        "inferer": compare_objects({**describe(make_inferer(recipe, device="cpu", stitch_device="auto")),
                                    "sw_device": None, "device": None},  # the listed device addition
                                   describe(t("inferer"))),
    }
    assert {name: str(result) for name, result in checks.items() if not result} == {}
    numbers = {"epochs": t("max_epochs"), "validation_interval": t("val_interval"), "seed": t("determinism_seed"),
               "validation_cases": t("validation_cases"), "batch_size": t("train_loader")["batch_size"],
               "cache_rate": t("train_dataset")["cache_rate"], "amp": False}
    assert {name: getattr(recipe, name) for name in numbers} == numbers
    assert recipe.include_background is make_loss(recipe).include_background is True  # DiceLoss's default


def test_a_chain_in_the_bundles_order_is_not_the_tutorials(tutorial: Any) -> None:
    """The comparison can fail: the kit's earlier tutorial chain (oriented and resampled first) differs at step 3."""
    from spleenkit.presets import get_preset
    from spleenkit.transforms import training_transforms

    earlier = training_transforms(get_preset("seed", crop_foreground=False, pad_to_patch=False))
    found = compare_transforms(earlier, tutorial.get_parsed_content("train_transforms"))
    assert not found and "step 3 is Orientationd, expected ScaleIntensityRanged" in str(found)


# --------------------------------------------------------------------------- claims in the prose
# Every mention of "the bundle's", "official" or "the tutorial's" in the README, bundle/docs and the notebooks is
# either a claim about a value, checked here against the fixtures above (or, for masks, the benchmark's measurement),
# or named in NOT_VALUES with why it states no value (a command, the released weights, a variable's name).
CLAIM_FILES = ["README.md", "bundle/docs/README.md", *sorted(p.relative_to(REPO).as_posix()
                                                           for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
MENTION = re.compile(r"the bundle's|official|the tutorial's", re.IGNORECASE)


def prose(name: str) -> str:
    """A file's text with its whitespace collapsed (a notebook's cells joined), so a phrase may span lines."""
    path = REPO / name
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":
        text = "\n".join("".join(cell["source"]) for cell in json.loads(text)["cells"])
    return " ".join(text.split())


class Originals:
    """The fixtures' values, built once: official train.json / inference.json and the tutorial."""

    def __init__(self) -> None:
        from monai.bundle import ConfigParser

        self.train = json.loads((OFFICIAL / "train.json").read_text())
        self.inference = json.loads((OFFICIAL / "inference.json").read_text())
        self.tutorial = json.loads(TUTORIAL.read_text())
        self.parser = ConfigParser({**self.train, "device": "$torch.device('cpu')",
                                    "images": [], "labels": []})
        self.tutorial_parser = ConfigParser(self.tutorial)

    def get(self, name: str) -> Any:
        return self.parser.get_parsed_content(name)


def _chain_is_the_seeds(o: Originals) -> bool:
    from spleenkit.transforms import deterministic_transforms, random_transforms

    pad, crop = random_transforms("seed")
    return (bool(compare_transforms(deterministic_transforms("seed"), o.get("train#deterministic_transforms")))
            and type(pad).__name__ == "SpatialPadd"
            and bool(compare_transforms([crop], o.get("train#random_transforms"))))


def _network_is_the_seeds(o: Originals) -> bool:
    from spleenkit.model import build_unet

    return bool(compare_networks(build_unet("seed"), o.get("network_def"))) and \
        bool(compare_objects(build_unet("seed"), o.get("network_def")))


def _loss_is_the_seeds(o: Originals) -> bool:
    from spleenkit.training import make_loss

    return bool(compare_objects(make_loss("seed"), o.get("loss")))


def _seed_recipe(o: Originals) -> bool:
    """The seed recipe is the bundle's preprocessing, network, loss, window and split (its optimiser and length are
    the model card's: SEED_RECIPE)."""
    from spleenkit.presets import get_preset

    seed = get_preset("seed")
    window = o.train["validate"]["inferer"]
    return (_chain_is_the_seeds(o) and _network_is_the_seeds(o) and _loss_is_the_seeds(o)
            and list(seed.validation_roi_size) == window["roi_size"]
            and seed.sliding_window_overlap == window["overlap"] and _split(o))


def _split(o: Originals) -> bool:
    from spleenkit.presets import get_preset

    train = o.train
    return ("sorted(glob.glob(" in train["images"] and train["train"]["dataset"]["data"].count("[:-9]") == 2
            and train["validate"]["dataset"]["data"].count("[-9:]") == 2
            and get_preset("seed").validation_cases == get_preset("bundle-0.5.9").validation_cases == 9)


def _tables(o: Originals, name: str) -> bool:
    """Every row of the notebook's tables headed "| argument | the bundle's |": each argument's value, as written,
    is network_def's or the loss's in train.json."""
    import ast

    text = "\n".join("".join(cell["source"]) for cell in json.loads((REPO / name).read_text())["cells"])
    official = {**o.train["network_def"], **o.train["loss"]}
    rows = 0
    for table in re.findall(r"\| argument \| the bundle's \|[^\n]*\n\| ---[^\n]*\n((?:\|[^\n]*\n?)+)", text):
        for row in table.strip().splitlines():
            names, values = row.split("|")[1:3]
            keys = re.findall(r"`(\w+)`", names)
            written = [ast.literal_eval(value) for value in re.findall(r"`([^`]+)`", values)]
            written = written * len(keys) if len(written) == 1 else written
            for key, value in zip(keys, written, strict=True):
                expected = official[key]
                assert (list(value) if isinstance(value, tuple) else value) == expected, f"{name}: {key}"
                rows += 1
    return rows >= 14  # the network's 7 arguments and the loss's 9


def _official_definition_in_07(o: Originals) -> bool:
    import ast

    text = prose("notebooks/07_bundle_and_pretrained.ipynb")
    written = ast.literal_eval(re.search(r"official_definition = (\{.*?\}) #", text).group(1))
    return written == o.train["network_def"] == o.inference["network_def"]


def _reference_is_the_bundles(o: Originals) -> bool:
    """benchmarks/reference.py, "the bundle's plain pipeline": its network and loss are train.json's."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("benchmark_reference", REPO / "benchmarks" / "reference.py")
    reference = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "benchmarks"))  # it imports its sibling, common.py
    try:
        spec.loader.exec_module(reference)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return bool(compare_objects(reference.loss(), o.get("loss"))) and \
        bool(compare_networks(reference.network(), o.get("network_def")))


def _masks_agree(o: Originals) -> bool:
    """The kit's float32 CPU masks against the reference's (benchmarks/results/benchmark.json): no voxel differs."""
    results = json.loads((REPO / "benchmarks" / "results" / "benchmark.json").read_text())
    images = results["parts"]["inference"]["images"]
    return bool(images) and all(image["agreement"]["differing_voxels"] == 0 for image in images.values())


def _tutorial_chain(o: Originals) -> bool:
    from spleenkit.transforms import training_transforms

    return bool(compare_transforms(training_transforms("tutorial"), o.tutorial_parser.get_parsed_content(
        "train_transforms")))


def _tutorial_loss(o: Originals) -> bool:
    from spleenkit.training import make_loss

    return bool(compare_objects(make_loss("tutorial"), o.tutorial_parser.get_parsed_content("loss")))


def _no_augmentation(o: Originals) -> bool:
    from spleenkit.presets import get_preset

    return ([step["_target_"] for step in o.train["train"]["random_transforms"]] == ["RandCropByPosNegLabeld"]
            and get_preset("seed").augment_probability == get_preset("bundle-0.5.9").augment_probability == 0)


def _window(o: Originals) -> dict[str, Any]:
    return {"type": type(o.get("validate#inferer")).__name__, **vars(o.get("validate#inferer"))}


CLAIMS: dict[str, Callable[[Originals], bool]] = {
    # README.md
    "the bundle's exact masks": _masks_agree,
    "the bundle's UNet, loading and saving weights": _network_is_the_seeds,
    "the kit against the bundle's plain pipeline": _reference_is_the_bundles,
    "a reference that builds the bundle's pipeline the plain MONAI way": _reference_is_the_bundles,
    "so the masks are the bundle's": _masks_agree,
    # bundle/docs/README.md
    "which the bundle's structure does not have": lambda o: (
        o.train["loss"]["_target_"] == "DiceCELoss"
        and "CropForegroundd" not in json.dumps(o.train) and o.tutorial["loss"]["_target_"] == "DiceLoss"
        and "CropForegroundd" in json.dumps(o.tutorial["train_transforms"])),
    # 00, 01
    "as the bundle's do": lambda o: o.train["train"]["dataloader"]["batch_size"] == 2,
    "and the bundle's split": _split,
    "the bundle's sorted-name `split_datalist`": _split,
    # 02
    "the bundle's preprocessing chain": _chain_is_the_seeds,
    "write a chain yourself (the tutorial's)": _tutorial_chain,
    "(with the bundle's 1 : 1 it is 1 in 256)": lambda o: (
        (o.train["train"]["random_transforms"][0]["pos"], o.train["train"]["random_transforms"][0]["neg"]) == (1, 1)
        and o.train["train"]["random_transforms"][0]["num_samples"] == 4
        and o.train["train"]["dataloader"]["batch_size"] == 2),
    "(the bundle's 1.5 × 1.5 × 2 mm and 96³)": lambda o: (
        o.train["train"]["deterministic_transforms"][3]["pixdim"] == [1.5, 1.5, 2.0]
        and o.train["train"]["random_transforms"][0]["spatial_size"] == [96, 96, 96] and _chain_is_the_seeds(o)),
    '"seed" for the bundle\'s own numbers': _seed_recipe,
    "This is the bundle's `train#deterministic_transforms`": _chain_is_the_seeds,
    "0 in the bundle's recipes: they train without augmentation": _no_augmentation,
    "With the bundle's recipe (`preset = \"seed\"`) `augment` is empty": _no_augmentation,
    "Write the tutorial's chain": _tutorial_chain,
    "Write the tutorial's training chain": _tutorial_chain,
    "the bundle's step for step": _chain_is_the_seeds,
    # 03
    "build the bundle's UNet": _network_is_the_seeds,
    '"seed" (the bundle\'s)': _seed_recipe,
    "The bundle's network is MONAI's 3D `UNet`": _network_is_the_seeds,
    "| argument | the bundle's | what it means |": lambda o: _tables(o, "notebooks/03_training.ipynb"),
    "so the count below is smaller than the bundle's": lambda o: (
        sum(p.numel() for p in o.get("network_def").parameters())
        > sum(p.numel() for p in __import__("spleenkit.model").model.build_unet("quick").parameters())),
    "Write the bundle's UNet": _network_is_the_seeds,
    "(the bundle's: 4,808,917)": lambda o: sum(p.numel() for p in o.get("network_def").parameters()) == 4_808_917,
    "preset=\"seed\") # the bundle's UNet": _network_is_the_seeds,
    "Write the bundle's loss": _loss_is_the_seeds,
    "Build the bundle's loss with": _loss_is_the_seeds,
    "preset=\"seed\") # the bundle's loss": _loss_is_the_seeds,
    "with the background in (the bundle's)": lambda o: o.train["loss"]["include_background"] is True,
    "the bundle's five levels of 16 to 256 feature maps": lambda o: (
        o.train["network_def"]["channels"] == [16, 32, 64, 128, 256] and o.train["network_def"]["num_res_units"] == 2),
    "4,808,917 weights, the bundle's state-dict names": lambda o: (
        _network_is_the_seeds(o) and sum(p.numel() for p in o.get("network_def").parameters()) == 4_808_917),
    # 04, 05, 06
    '"seed" is the bundle\'s': _seed_recipe,
    '"validation" (the bundle\'s held-out cases)': _split,
    "96³ in the bundle's": lambda o: list(_window(o)["roi_size"]) == [96, 96, 96],
    "(0.5, the bundle's)": lambda o: _window(o)["overlap"] == 0.5,
    '`"constant"` (the bundle\'s)': lambda o: str(_window(o)["mode"]) == "constant",
    "`constant` (the bundle's)": lambda o: str(_window(o)["mode"]) == "constant",
    "it gives the bundle's masks exactly": _masks_agree,
    "the bundle's overlap of 0.5": lambda o: _window(o)["overlap"] == 0.5,
    # 07
    "build the network from the **official JSON definition**": _official_definition_in_07,
    "official_definition = {": _official_definition_in_07,
    # 08
    "the tutorial's Dice loss against the bundle's DiceCE": lambda o: (
        _tutorial_loss(o) and o.train["loss"]["_target_"] == "DiceCELoss"),
    "here the tutorial's DiceLoss": _tutorial_loss,
    '`norm="batch"` (the bundle\'s)': lambda o: o.train["network_def"]["norm"] == "batch",
    '`loss="dice"` (the tutorial\'s) or `"dice_ce"` (the bundle\'s)': lambda o: (
        _tutorial_loss(o) and o.train["loss"]["_target_"] == "DiceCELoss"),
    "The worked example: the tutorial's loss": _tutorial_loss,
}
NOT_VALUES: dict[str, str] = {
    "load the official weights": "the released weights, by name",
    "the official weights and export": "a title",
    "## The MONAI bundle and the official weights": "a title",
    "# Official weights": "a title",
    "work as in the official bundle": "the commands and overrides, tested by the bundle's own tests",
    "every id of the official configs": "names the fixtures",
    "tests/fixtures/official_spleen_ct_segmentation/": "a path",
    "(the bundle's metadata is stored inside)": "the metadata file, by name",
    "the bundle's metadata travels inside the file": "the metadata file, by name",
    "the bundle's released weights load into it": "the released weights, by name",
    "(0: load in the bundle's own process)": "a process, not a value",
    "where the official bundle is": "a folder",
    "fetch_official": "a parameter's name",
    "Train with the bundle's own command": "a command",
    "with the bundle's evaluation command": "a command",
    "The bundle's inference command": "a command",
    "the bundle's prediction (orange)": "a figure's title",
    "official_network": "a variable's name",
    '"network_def": official_definition': "a variable's name",
    "official_shapes": "a variable's name",
    "tensors in the official network": "printed by the check of the official JSON definition above",
    "official_weights": "a variable's name",
    "official, info = load_pretrained": "a variable's name",
    "The official weights are not here": "the released weights, by name",
    "the bundle's own export command": "a command",
    "(the bundle's `CheckpointLoader`": "MONAI's loaders by name; test_guarantees loads such a model.pt with them",
}


@pytest.fixture(scope="module")
def originals() -> Originals:
    return Originals()


@pytest.mark.filterwarnings("ignore")
def test_every_claim_about_the_originals_holds(originals: Originals) -> None:
    texts = {name: prose(name) for name in CLAIM_FILES}
    stale = [fragment for fragment in [*CLAIMS, *NOT_VALUES]
             if not any(" ".join(fragment.split()) in text for text in texts.values())]
    assert stale == [], f"listed fragments no longer in the prose: {stale}"
    false = [fragment for fragment, holds in CLAIMS.items() if not holds(originals)]
    assert false == [], f"claims that the fixtures contradict: {false}"


def test_every_mention_of_the_originals_is_a_checked_claim_or_names_no_value() -> None:
    unchecked = []
    for name in CLAIM_FILES:
        text = prose(name)
        spans = [(match.start(), match.end()) for fragment in [*CLAIMS, *NOT_VALUES]
                 for match in re.finditer(re.escape(" ".join(fragment.split())), text)]
        for mention in MENTION.finditer(text):
            if not any(start <= mention.start() and mention.end() <= end for start, end in spans):
                unchecked.append(f"{name}: ...{text[max(0, mention.start() - 60):mention.end() + 40]}...")
    assert unchecked == [], "add each to CLAIMS (with a check) or NOT_VALUES (with why):\n" + "\n".join(unchecked)

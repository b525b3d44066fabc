"""The write-the-code and predict-then-run exercises of notebooks 00, 01, 04, 07 and the capstone 08.

Each checker must say correct for the instructor's solution, "not answered yet" for a student copy's
stub (None), and give the hint meant for a typical mistake when it is fed that mistake; and the pieces
of the package the new lessons use (fine-tuning, run summaries, the comparison figure) must work.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.data import DistributedSampler, partition_dataset
from monai.losses import DiceCELoss, DiceLoss

from spleenkit.errors import BadInputError
from spleenkit.exercises import check
from spleenkit.presets import PRESETS, get_preset

REPO = Path(__file__).resolve().parents[1]
TRAIN_JSON = REPO / "bundle" / "configs" / "train.json"
CASES = [f"spleen_{n}.nii.gz" for n in range(1, 10)]  # nine training cases: an odd number, as in the course


def status(exercise: str, answer: object, **context: object) -> tuple[str, str]:
    verdict = check(exercise, answer, **context)
    return verdict.status, verdict.message


pytestmark = pytest.mark.usefixtures("lenient")  # checks as a student meets them (conftest.py)


# --------------------------------------------------------------------------- 00
def crop_mm(preset):
    return tuple(v * mm for v, mm in zip(preset.patch_size, preset.spacing, strict=True))


def test_crop_extent_in_mm_on_every_recipe_and_the_voxels_mistake() -> None:
    assert crop_mm(PRESETS["seed"]) == (144.0, 144.0, 192.0) and crop_mm(PRESETS["quick"]) == (192.0, 192.0, 192.0)
    state, message = status("00-crop-extent", crop_mm)
    assert state == "correct" and "seed: 144 x 144 x 192 mm; quick: 192 x 192 x 192 mm" in message
    assert status("00-crop-extent", None)[0] == "unanswered"
    state, hint = status("00-crop-extent", lambda preset: preset.patch_size)
    assert state == "wrong" and "in voxels" in hint
    state, hint = status("00-crop-extent", lambda preset: tuple(v / mm for v, mm in zip(preset.patch_size,
                                                                                        preset.spacing, strict=True)))
    assert state == "wrong" and "divide" in hint
    # the seed's and the quick recipe's numbers, typed in: right for those two, wrong for the recipes the check adds
    printed = {"seed": (144.0, 144.0, 192.0), "quick": (192.0, 192.0, 192.0)}
    state, hint = status("00-crop-extent", lambda preset: printed.get(preset.name, (144.0, 144.0, 192.0)))
    assert state == "wrong" and "multiply each side" in hint
    state, hint = status("00-crop-extent", {"seed": (144, 144, 192), "quick": (192, 192, 192)})  # the old answer
    assert state == "wrong" and "expected a function" in hint


def test_custom_preset_is_compared_setting_by_setting() -> None:
    assert status("00-custom-preset", get_preset("quick", epochs=5, learning_rate=3e-4))[0] == "correct"
    assert status("00-custom-preset", get_preset("quick").replace(epochs=5, learning_rate=3e-4))[0] == "correct"
    assert status("00-custom-preset", None)[0] == "unanswered"
    state, hint = status("00-custom-preset", get_preset("quick", epochs=5))  # forgot the learning rate
    assert state == "wrong" and "learning_rate" in hint and "0.0003" in hint
    state, hint = status("00-custom-preset", get_preset("seed", epochs=5, learning_rate=3e-4))
    assert state == "wrong" and "'seed'" in hint
    assert status("00-custom-preset", {"epochs": 5, "learning_rate": 3e-4})[0] == "wrong"


def training_steps(recipe, cases):
    from monai.data import DataLoader

    return recipe.epochs * len(DataLoader(range(cases - recipe.validation_cases), batch_size=recipe.batch_size))


def test_training_steps_on_other_recipes_and_the_usual_slips() -> None:
    quick = get_preset("quick", batch_size=2)  # notebook 00 asks for batches of two: the last one is short
    assert training_steps(quick, 12) == 500
    state, message = status("00-training-steps", training_steps)
    assert state == "correct" and "= 500 steps" in message
    assert status("00-training-steps", None)[0] == "unanswered"
    slips = {lambda r, c: r.epochs * math.ceil(c / r.batch_size): "held out",  # validation cases counted
             lambda r, c: r.epochs * ((c - r.validation_cases) // r.batch_size): "drop_last",  # short batch dropped
             lambda r, c: r.epochs * math.ceil((c - r.validation_cases) * r.num_samples / r.batch_size): "not crops",
             # batch_size=2 forgotten: 900 for the quick recipe with batches of two, once told "not crops"
             lambda r, c: r.epochs * (c - r.validation_cases): "one step per case",
             lambda r, c: math.ceil((c - r.validation_cases) / r.batch_size): "one epoch's steps"}
    for answer, words in slips.items():
        state, hint = status("00-training-steps", answer)
        assert state == "wrong" and words in hint, (words, hint)
    state, hint = status("00-training-steps", lambda r, c: 500)  # the quick answer typed in
    assert state == "wrong" and "for quick" in hint and "gives 500" in hint
    assert "crops" not in status("00-training-steps", lambda r, c: r.epochs * (c - r.validation_cases))[1]


# --------------------------------------------------------------------------- 01
def describe_case(item):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    image = Compose([LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"])])(item)["image"]
    return {"shape": tuple(image.shape), "spacing": tuple(float(s) for s in image.pixdim)}


def test_load_case_on_files_it_writes_itself(synthetic_dataset: Path) -> None:
    from monai.transforms import LoadImage

    from spleenkit.data import load_datalist

    items = load_datalist(synthetic_dataset)
    assert status("01-load-case", describe_case, items=items)[0] == "correct"
    assert status("01-load-case", None, items=items)[0] == "unanswered"

    def no_channel(item):
        image = LoadImage(image_only=True)(item["image"])
        return {"shape": tuple(image.shape), "spacing": tuple(float(s) for s in image.pixdim)}

    state, hint = status("01-load-case", no_channel, items=items)
    assert state == "wrong" and "no channel axis" in hint and "EnsureChannelFirstd" in hint

    def diagonal(item):
        found = describe_case(item)
        image = LoadImage(image_only=True)(item["image"])
        return {**found, "spacing": tuple(float(image.affine[i, i]) for i in range(3))}

    state, hint = status("01-load-case", diagonal)  # right on a RAS file, negative on the L-P-S one
    assert state == "wrong" and "negative" in hint and "pixdim" in hint
    state, hint = status("01-load-case", lambda item: {**describe_case(item), "spacing": (1.0, 1.0, 1.0)})
    assert state == "wrong" and "(1, 1, 1)" in hint
    state, hint = status("01-load-case", lambda item: describe_case(item)["shape"])
    assert state == "wrong" and "'shape' and 'spacing'" in hint


def spleen_ml(item):
    from monai.transforms import LoadImaged

    label = LoadImaged(keys="label")(item)["label"]
    return float((label > 0).sum()) * float(label.pixdim.prod()) / 1000


def test_volume_as_a_function_and_the_usual_slips(synthetic_dataset: Path) -> None:
    from spleenkit.data import load_datalist

    items = load_datalist(synthetic_dataset)
    state, message = status("01-volume", spleen_ml, items=items)
    assert state == "correct" and "mL" in message
    slips = {lambda item: spleen_ml(item) * 1000: "mm³", lambda item: -spleen_ml(item): "negative",
             lambda item: 123.0: "expected"}
    for answer, words in slips.items():
        state, hint = status("01-volume", answer, items=items)
        assert state == "wrong" and words in hint, (words, hint)
    state, hint = status("01-volume", lambda item: 12.0)  # right for the 2 x 2 x 3 mm case the check writes, only
    assert state == "wrong"


def window_stats(item, window):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityRanged

    low, high = window
    loaded = Compose([LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"])])(item)
    spleen = loaded["label"] > 0
    scaled = ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(loaded)
    inside = scaled["image"][spleen]
    return {"median_hu": float(loaded["image"][spleen].median()), "below": float((inside == 0).float().mean()),
            "above": float((inside == 1).float().mean())}


def test_window_stats_with_monai_and_what_it_says_about_a_bright_spleen(synthetic_dataset: Path) -> None:
    from spleenkit.data import load_datalist
    from spleenkit.exercises import window_shares

    items = load_datalist(synthetic_dataset)
    state, message = status("01-window", window_stats, items=items, window=(-57, 164), shown=0)
    assert state == "correct", message
    for sentence in message.split("; "):  # every number the message gives is the case's own
        name = sentence.split(":")[0].split(" is unusually")[0]
        item = next(item for item in items if Path(item["image"]).name == name)
        shares = window_shares(np.asanyarray(nib.load(item["image"]).dataobj),
                               np.asanyarray(nib.load(item["label"]).dataobj), (-57, 164))
        assert f"{shares['median_hu']:.0f} HU" in sentence
        if "unusually bright" in sentence:
            assert shares["above"] >= 0.05 and f"{shares['above']:.0%} of it to 1" in sentence
        else:
            assert shares["above"] < 0.05 and "keeps it" in sentence
    slips = {lambda item, window: {**window_stats(item, window), "above": 100 * window_stats(item, window)["above"]}:
             "percentage",
             lambda item, window: {**window_stats(item, window), "median_hu": 0.0}: "spleen's voxels only"}
    for answer, words in slips.items():
        state, hint = status("01-window", answer, items=items, window=(-57, 164), shown=0)
        assert state == "wrong" and words in hint, (words, hint)

    def unclipped(item, window):
        from monai.transforms import LoadImaged, ScaleIntensityRanged

        loaded = LoadImaged(keys=["image", "label"])(item)
        scaled = ScaleIntensityRanged(keys="image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0)(loaded)
        inside = scaled["image"][loaded["label"] > 0]
        return {**window_stats(item, window), "above": float((inside == 1).float().mean())}

    brightest = max(items, key=lambda item: window_shares(np.asanyarray(nib.load(item["image"]).dataobj),
                                                           np.asanyarray(nib.load(item["label"]).dataobj),
                                                           (-57, 164))["above"])
    state, hint = status("01-window", unclipped, items=[brightest], window=(-57, 164), shown=0)
    assert state == "wrong" and "clip=True" in hint


# --------------------------------------------------------------------------- 04
def test_partition_exercise_against_the_kits_shares() -> None:
    right = partition_dataset(data=CASES, num_partitions=2, shuffle=True, seed=123, even_divisible=True)
    context = {"cases": CASES, "processes": 2, "seed": 123}
    state, message = status("04-partition", right, per_rank=5, **context)
    assert state == "correct" and "5 per rank" in message
    assert status("04-partition", None, **context)[0] == "unanswered"
    uneven = partition_dataset(data=CASES, num_partitions=2, shuffle=True, seed=123, even_divisible=False)
    state, hint = status("04-partition", uneven, **context)
    assert state == "wrong" and "even_divisible=False" in hint
    unshuffled = partition_dataset(data=CASES, num_partitions=2, even_divisible=True)
    state, hint = status("04-partition", unshuffled, **context)
    assert state == "wrong" and "shuffle" in hint
    other_seed = partition_dataset(data=CASES, num_partitions=2, shuffle=True, seed=0, even_divisible=True)
    state, hint = status("04-partition", other_seed, **context)
    assert state == "wrong" and "seed (123)" in hint
    blocks = [CASES[:5], CASES[4:]]
    assert status("04-partition", blocks, **context)[0] == "wrong"
    state, hint = status("04-partition", [CASES], **context)  # one share for two processes
    assert state == "wrong" and "1 share(s) for 2 processes" in hint
    state, hint = status("04-partition", right[0], **context)  # one process's share, not the list of shares
    assert state == "wrong" and "one list of 5 case names" in hint and "5 share(s)" not in hint
    assert "one case is dealt twice" in message  # 9 cases, 2 processes
    even = CASES[:8]
    state, message = status("04-partition", partition_dataset(data=even, num_partitions=2, shuffle=True, seed=123,
                                                              even_divisible=True), cases=even, processes=2, seed=123)
    assert state == "correct" and "no case is dealt twice" in message and "one case is dealt twice" not in message
    three = partition_dataset(data=CASES[:7], num_partitions=3, shuffle=True, seed=123, even_divisible=True)
    state, message = status("04-partition", three, cases=CASES[:7], processes=3, seed=123)
    assert state == "correct" and "2 cases are dealt twice" in message


def test_train_sampler_exercise_against_the_kits_sampler() -> None:
    context = {"dataset": CASES, "processes": 2, "rank": 1, "seed": 123}
    right = DistributedSampler(CASES, num_replicas=2, rank=1, shuffle=True, seed=123, even_divisible=True)
    state, message = status("04-train-sampler", right, **context)
    assert state == "correct" and "5 of 9" in message
    assert status("04-train-sampler", None, **context)[0] == "unanswered"
    unpadded = DistributedSampler(CASES, num_replicas=2, rank=1, shuffle=True, seed=123, even_divisible=False)
    state, hint = status("04-train-sampler", unpadded, **context)
    assert state == "wrong" and "even_divisible=True" in hint
    unshuffled = DistributedSampler(CASES, num_replicas=2, rank=1, shuffle=False, even_divisible=True)
    state, hint = status("04-train-sampler", unshuffled, **context)
    assert state == "wrong" and "shuffle" in hint
    rank0 = DistributedSampler(CASES, num_replicas=2, rank=0, shuffle=True, seed=123, even_divisible=True)
    state, hint = status("04-train-sampler", rank0, **context)
    assert state == "wrong" and "rank 0 of 2" in hint
    assert status("04-train-sampler", list(right), **context)[0] == "wrong"  # the cases, not a sampler


def global_mean_dice(local_dice):
    import torch
    import torch.distributed as dist

    totals = torch.stack([local_dice.sum(), torch.tensor(float(len(local_dice)))])
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def test_global_dice_needs_the_all_reduce_of_sums_and_counts() -> None:
    import torch
    import torch.distributed as dist

    state, message = status("04-global-dice", global_mean_dice)
    assert state == "correct" and "0.6667" in message
    assert status("04-global-dice", None)[0] == "unanswered"

    def mean_of_means(local_dice):
        mean = local_dice.mean().reshape(1) if len(local_dice) else torch.zeros(1)
        dist.all_reduce(mean)
        return (mean / dist.get_world_size()).item()

    def by_processes(local_dice):
        total = local_dice.sum().reshape(1)
        dist.all_reduce(total)
        return (total / dist.get_world_size()).item()

    def only_some(local_dice):  # a process without cases skips the all-reduce: the others would wait forever
        if len(local_dice) == 0:
            return 0.0
        return global_mean_dice(local_dice)

    def reduce_the_values(local_dice):  # shares of different lengths cannot be all-reduced
        dist.all_reduce(local_dice)
        return local_dice.mean().item()

    slips = {lambda local_dice: local_dice.mean().item(): "the mean of its own cases",
             mean_of_means: "mean of the processes' means", by_processes: "not by the number of processes",
             only_some: "not every rank joined", reduce_the_values: "different shapes"}
    for answer, words in slips.items():
        state, hint = status("04-global-dice", answer)
        assert state == "wrong" and words in hint, (words, hint)
    assert not dist.is_initialized()  # the stand-ins are gone again


# --------------------------------------------------------------------------- 07
def _parser(**entries: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(TRAIN_JSON))
    for key, value in entries.items():
        parser[key.replace("__", "#")] = value
    return parser


def test_override_exercise_builds_the_recipe_from_the_students_parser() -> None:
    context = {"config_file": TRAIN_JSON, "preset": "quick", "epochs": 3}
    state, message = status("07-override", _parser(preset="quick", epochs=3), **context)
    assert state == "correct" and "max_epochs = 3" in message
    assert status("07-override", None, **context)[0] == "unanswered"
    # the official id deep inside works as well: the bundle reads its recipe back from train#trainer#max_epochs
    state, message = status("07-override", _parser(preset="quick", train__trainer__max_epochs=3), **context)
    assert state == "correct" and "max_epochs = 3" in message
    state, hint = status("07-override", _parser(epochs=3), **context)  # the preset forgotten
    assert state == "wrong" and "'seed'" in hint and "'quick'" in hint
    assert status("07-override", ConfigParser(), **context)[0] == "wrong"  # nothing read
    state, hint = status("07-override", _parser(preset="Quick", epochs=3), **context)  # raised RuntimeError before
    assert state == "wrong" and "unknown preset 'Quick'" in hint
    state, hint = status("07-override", _parser(preset="quick", epochs="3"), **context)  # the command line's text
    assert state == "wrong" and "the text '3'" in hint and "my_parser['epochs'] = 3" in hint


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1)
    path = tmp_path_factory.mktemp("export") / "model.ts"
    torch.jit.save(torch.jit.script(network.eval()), str(path))
    return {"exported": path, "network": network, "patch": torch.rand(1, 1, 16, 16, 16), "tolerance": 1e-4}


def export_difference(exported_file, network, patch):
    import torch

    exported = torch.jit.load(str(exported_file))
    with torch.no_grad():
        return (exported(patch) - network.eval()(patch)).abs().max().item()


def test_export_difference_refuses_a_blind_zero_and_a_missing_abs(export: dict) -> None:
    import torch

    state, message = status("07-export-difference", export_difference, **export)
    assert state == "correct" and "under the tolerance" in message
    assert status("07-export-difference", None, **export)[0] == "unanswered"
    state, hint = status("07-export-difference", lambda *args: 0.0, **export)  # a blind 0
    assert state == "wrong" and "still gives" in hint and "its arguments" in hint
    assert status("07-export-difference", 0.0, **export)[0] == "wrong"  # the old answer: a number
    assert "expected a function" in status("07-export-difference", 0.0, **export)[1]

    def no_abs(exported_file, network, patch):
        with torch.no_grad():
            return (torch.jit.load(str(exported_file))(patch) - network.eval()(patch)).max().item()

    state, hint = status("07-export-difference", no_abs, **export)
    assert state == "wrong" and ".abs()" in hint

    def notebook_globals(exported_file, network, patch):  # uses the notebook's own model, not the one it is given
        return export_difference(export["exported"], export["network"], export["patch"])

    state, hint = status("07-export-difference", notebook_globals, **export)
    assert state == "wrong" and "its arguments" in hint


# --------------------------------------------------------------------------- 08
def test_dice_loss_exercise_compares_every_argument() -> None:
    quick = PRESETS["quick"]
    assert status("08-dice-loss", DiceLoss(include_background=False, to_onehot_y=True, softmax=True),
                  preset=quick)[0] == "correct"
    state, hint = status("08-dice-loss", DiceLoss(to_onehot_y=True, softmax=True), preset=quick)  # the tutorial's
    assert state == "wrong" and "include_background" in hint and "(False)" in hint  # quick leaves it out
    assert status("08-dice-loss", DiceLoss(to_onehot_y=True, softmax=True), preset=PRESETS["seed"])[0] == "correct"
    assert status("08-dice-loss", None, preset=quick)[0] == "unanswered"
    state, hint = status("08-dice-loss", DiceLoss(sigmoid=True), preset=quick)
    assert state == "wrong" and "to_onehot_y" in hint
    state, hint = status("08-dice-loss", DiceCELoss(to_onehot_y=True, softmax=True), preset=quick)
    assert state == "wrong" and "DiceLoss" in hint


def test_variant_exercise_refuses_changes_of_the_measure_and_typos() -> None:
    quick = PRESETS["quick"]
    assert status("08-variant", {"learning_rate": 3e-3}, base=quick)[0] == "correct"
    assert status("08-variant", {"loss": "dice"}, base=quick)[0] == "correct"
    assert status("08-variant", {"patch_size": 64, "num_samples": 1}, base=quick)[0] == "correct"
    assert status("08-variant", None, base=quick)[0] == "unanswered"
    refused = {"validation_cases": "which cases the Dice is measured on",
               "sliding_window_overlap": "how the validation Dice is measured",
               "validation_roi_size": "the sliding window's size", "spacing": "the grid the validation Dice",
               "seed": "give both runs another seed", "epochs": "the budget", "validation_interval": "when"}
    values = {"validation_cases": 2, "sliding_window_overlap": 0.75, "validation_roi_size": 32, "spacing": 2.0,
              "seed": 1, "epochs": 5, "validation_interval": 2}
    for key, words in refused.items():
        state, hint = status("08-variant", {key: values[key]}, base=quick)
        assert state == "wrong" and words in hint and "measure different things" in hint, (key, hint)
    for key, value in {"amp": False, "cache_rate": 0.5, "sliding_window_batch_size": 8}.items():
        state, hint = status("08-variant", {key: value}, base=quick)
        assert state == "wrong" and "not what the network learns" in hint, (key, hint)
    state, hint = status("08-variant", {"learning_rat": 3e-3}, base=quick)
    assert state == "wrong" and "learning_rat" in hint
    state, hint = status("08-variant", {"learning_rate": quick.learning_rate}, base=quick)
    assert state == "wrong" and "already" in hint
    state, hint = status("08-variant", {"patch_size": 40}, base=quick)
    assert state == "wrong" and "multiple of 16" in hint
    # values the pieces training builds refuse, whichever refuses them first (the front door or the piece)
    for variant, words in {"loss": ("dicece", "dicece"), "norm": ("batchnorm", "BATCHNORM")}.items():
        state, hint = status("08-variant", {variant: words[0]}, base=quick)
        assert state == "wrong" and words[1].lower() in hint.lower(), (variant, hint)


def test_variant_exercise_refuses_wrong_types_and_out_of_range_values_through_the_front_door() -> None:
    """The recipe front door (Preset.replace) checks each setting's type and range; the variant goes through it.
    On a branch whose Preset.replace checks only names, some of these pass the front door and some are caught by
    the pieces training builds; all of them are refused once the front door checks ranges."""
    quick = PRESETS["quick"]
    for variant in ({"loss": "dicece"}, {"norm": "batchnorm"}, {"learning_rate": -1}, {"batch_size": 0},
                    {"augment_probability": 2.0}, {"rotate_degrees": "ten"}):
        state, hint = status("08-variant", variant, base=quick)
        key, value = next(iter(variant.items()))
        assert state == "wrong" and key in hint, (variant, hint)
        with pytest.raises(BadInputError, match=key):  # refused by the front door itself
            quick.replace(**variant)


def _run_folder(root: Path, name: str, dice: list[float | None], **preset: object) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    settings = {**get_preset("quick").to_dict(), **preset}
    manifest = {"parameters": {"preset": settings, "init_weights": None},
                "dataset": {"validation_cases": ["spleen_10.nii.gz", "spleen_11.nii.gz", "spleen_12.nii.gz"]}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    lines = [json.dumps({"epoch": e, "loss": 1.0 - 0.1 * e, "val_dice": d, "seconds": 2.0, "elapsed": 2.0 * e})
             for e, d in enumerate(dice, start=1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def best_run(folders):
    from spleenkit.runs import read_metrics

    best = {Path(f).name: max((r["val_dice"] for r in read_metrics(f) if r["val_dice"] is not None), default=0.0)
            for f in folders}
    return max(best, key=best.get)


def test_best_run_exercise_reads_the_best_epoch_not_the_last(tmp_path: Path) -> None:
    from spleenkit.runs import read_metrics

    runs = [_run_folder(tmp_path, "baseline", [0.2, 0.5, 0.6]),
            _run_folder(tmp_path, "peaked", [0.3, 0.8, 0.4]),
            _run_folder(tmp_path, "weak", [None, 0.1, 0.2])]
    state, message = status("08-best-run", best_run, run_dirs=runs)
    assert state == "correct" and message.startswith("peaked, best validation Dice 0.8000")
    assert status("08-best-run", lambda folders: str(runs[1]), run_dirs=runs)[0] == "wrong"  # typed in: other runs
    assert status("08-best-run", None, run_dirs=runs)[0] == "unanswered"

    def last(folders):
        return max(folders, key=lambda f: [r["val_dice"] for r in read_metrics(f) if r["val_dice"] is not None][-1]
                   if any(r["val_dice"] is not None for r in read_metrics(f)) else -1).name

    state, hint = status("08-best-run", last, run_dirs=runs)  # the best LAST Dice
    assert state == "wrong" and "best epoch" in hint

    def lowest(folders):
        return min(folders, key=lambda f: max((r["val_dice"] for r in read_metrics(f) if r["val_dice"] is not None),
                                              default=2.0)).name

    state, hint = status("08-best-run", lowest, run_dirs=runs)
    assert state == "wrong" and "lowest" in hint

    def not_validated_yet(folders):  # max() of an empty sequence: a run that has not validated yet
        best = {f.name: max(r["val_dice"] for r in read_metrics(f) if r["val_dice"] is not None) for f in folders}
        return max(best, key=best.get)

    state, hint = status("08-best-run", not_validated_yet, run_dirs=runs)
    assert state == "wrong" and "ValueError" in hint and "may not have validated yet" in hint


def test_run_summary_and_comparison_figure_from_run_folders(tmp_path: Path) -> None:
    from spleenkit.runs import summarize_run
    from spleenkit.visualization import compare_learning_curves

    baseline = _run_folder(tmp_path, "baseline", [None, 0.5, 0.6])
    variant = _run_folder(tmp_path, "variant", [0.3, 0.8, 0.4], loss="dice", patch_size=[48, 48, 48])
    row = summarize_run(variant)
    assert row["run"] == "variant" and row["loss"] == "dice" and row["patch"] == "48x48x48"
    assert row["best val Dice"] == 0.8 and row["best epoch"] == 2 and row["epochs"] == 3
    assert row["start"] == "random" and row["validation cases"] == 3 and row["seconds"] == 6.0
    assert summarize_run(baseline)["best val Dice"] == 0.6
    with pytest.raises(BadInputError, match="not a run folder"):
        summarize_run(tmp_path / "nothing")
    figure = compare_learning_curves({"baseline": baseline, "variant": variant}, title="t")
    loss_ax, dice_ax = figure.axes
    assert [line.get_label() for line in dice_ax.get_lines()] == ["baseline", "variant"]
    assert list(dice_ax.get_lines()[0].get_ydata()) == [0.5, 0.6]  # epochs without validation are left out
    assert len(loss_ax.get_lines()[1].get_xdata()) == 3


# --------------------------------------------------------------------------- 07 fine-tuning
def test_training_starts_from_the_given_weights_and_refuses_another_network(synthetic_dataset: Path,
                                                                             tmp_path: Path) -> None:
    import torch

    from spleenkit.model import atomic_save, build_unet, load_checkpoint
    from spleenkit.runs import summarize_run
    from spleenkit.training import train

    start = build_unet("quick")
    with torch.no_grad():
        for parameter in start.parameters():
            parameter.fill_(0.01)
    weights = atomic_save(start.state_dict(), tmp_path / "start" / "model.pt")
    tiny = {"spacing": (6.0, 6.0, 6.0), "patch_size": 48, "num_samples": 1, "validation_cases": 2,
            "sliding_window_overlap": 0.25, "epochs": 1, "validation_interval": 1, "progress": False,
            "num_workers": 0}
    # a vanishing learning rate (0 itself is refused): Adam moves each weight by about 1e-12 a step, so the saved
    # model shows where the weights started
    result = train(synthetic_dataset, tmp_path / "run", "quick", init_weights=weights, learning_rate=1e-12, **tiny)
    saved = load_checkpoint(result.model_path)
    first_weight = next(name for name in saved if name.endswith("weight"))
    assert torch.allclose(saved[first_weight].float(), torch.full_like(saved[first_weight].float(), 0.01))
    assert summarize_run(result.run_dir)["start"] == "start/model.pt"

    other = atomic_save(build_unet(get_preset("quick", channels=(8, 16, 32, 64, 128))).state_dict(),
                        tmp_path / "other" / "model.pt")
    with pytest.raises(BadInputError, match="does not match the network"):
        train(synthetic_dataset, tmp_path / "refused", "quick", init_weights=other, **tiny)

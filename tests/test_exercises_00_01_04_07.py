"""The write-the-code and predict-then-run exercises of notebooks 00, 01, 04, 07 and the capstone 08.

Each checker must say correct for the instructor's solution, "not answered yet" for a student copy's
stub (None), and give the hint meant for a typical mistake when it is fed that mistake; and the pieces
of the package the new lessons use (fine-tuning, run summaries, the comparison figure) must work.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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
def test_crop_extent_in_mm_and_the_voxels_mistake() -> None:
    right = {name: tuple(v * mm for v, mm in zip(PRESETS[name].patch_size, PRESETS[name].spacing, strict=True))
             for name in ("seed", "quick")}
    assert right == {"seed": (144.0, 144.0, 192.0), "quick": (192.0, 192.0, 192.0)}
    assert status("00-crop-extent", right)[0] == "correct"
    assert status("00-crop-extent", None)[0] == "unanswered"
    state, hint = status("00-crop-extent", {"seed": (96, 96, 96), "quick": (192, 192, 192)})
    assert state == "wrong" and "in voxels" in hint
    state, hint = status("00-crop-extent", {"seed": (64.0, 64.0, 48.0), "quick": (21.3, 21.3, 21.3)})
    assert state == "wrong" and "divide" in hint
    assert status("00-crop-extent", {"quick": (192, 192, 192)})[0] == "wrong"  # seed missing


def test_custom_preset_is_compared_setting_by_setting() -> None:
    assert status("00-custom-preset", get_preset("quick", epochs=5, learning_rate=3e-4))[0] == "correct"
    assert status("00-custom-preset", get_preset("quick").replace(epochs=5, learning_rate=3e-4))[0] == "correct"
    assert status("00-custom-preset", None)[0] == "unanswered"
    state, hint = status("00-custom-preset", get_preset("quick", epochs=5))  # forgot the learning rate
    assert state == "wrong" and "learning_rate" in hint and "0.0003" in hint
    state, hint = status("00-custom-preset", get_preset("seed", epochs=5, learning_rate=3e-4))
    assert state == "wrong" and "'seed'" in hint
    assert status("00-custom-preset", {"epochs": 5, "learning_rate": 3e-4})[0] == "wrong"


def test_training_steps_and_the_usual_slips() -> None:
    quick = get_preset("quick", batch_size=2)  # notebook 00 asks for batches of two: the last one is short
    training = 12 - quick.validation_cases
    right = quick.epochs * math.ceil(training / quick.batch_size)
    assert right == 500
    assert status("00-training-steps", right, preset=quick, cases=12)[0] == "correct"
    assert status("00-training-steps", None, preset=quick, cases=12)[0] == "unanswered"
    slips = {quick.epochs * math.ceil(12 / quick.batch_size): "held out",  # validation cases counted
             quick.epochs * (training // quick.batch_size): "drop_last",  # the short batch dropped
             quick.epochs * math.ceil(training * quick.num_samples / quick.batch_size): "not crops"}
    for answer, words in slips.items():
        state, hint = status("00-training-steps", answer, preset=quick, cases=12)
        assert state == "wrong" and words in hint, (answer, hint)


# --------------------------------------------------------------------------- 01
def test_split_exercise_skips_a_split_the_kit_refuses() -> None:
    assert status("01-split", (9, 3), cases=12, validation_cases=3)[0] == "correct"
    assert status("01-split", (3, 9), cases=12, validation_cases=9)[0] == "skipped"  # fast's 9 of 12


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
    assert status("04-partition", [CASES], **context)[0] == "wrong"  # one share for two processes


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
    assert status("08-variant", None, base=quick)[0] == "unanswered"
    state, hint = status("08-variant", {"validation_cases": 2}, base=quick)
    assert state == "wrong" and "validation cases" in hint
    state, hint = status("08-variant", {"sliding_window_overlap": 0.75}, base=quick)
    assert state == "wrong" and "how the validation Dice is measured" in hint
    state, hint = status("08-variant", {"learning_rat": 3e-3}, base=quick)
    assert state == "wrong" and "learning_rat" in hint
    state, hint = status("08-variant", {"learning_rate": quick.learning_rate}, base=quick)
    assert state == "wrong" and "already" in hint
    state, hint = status("08-variant", {"patch_size": 40}, base=quick)
    assert state == "wrong" and "multiple of 16" in hint


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


def test_best_run_exercise_reads_the_best_epoch_not_the_last(tmp_path: Path) -> None:
    runs = [_run_folder(tmp_path, "baseline", [0.2, 0.5, 0.6]),
            _run_folder(tmp_path, "peaked", [0.3, 0.8, 0.4]),
            _run_folder(tmp_path, "weak", [None, 0.1, 0.2])]
    assert status("08-best-run", "peaked", run_dirs=runs)[0] == "correct"
    assert status("08-best-run", str(runs[1]), run_dirs=runs)[0] == "correct"  # a path is fine too
    assert status("08-best-run", None, run_dirs=runs)[0] == "unanswered"
    state, hint = status("08-best-run", "baseline", run_dirs=runs)  # the best LAST Dice
    assert state == "wrong" and "best epoch" in hint
    state, hint = status("08-best-run", "weak", run_dirs=runs)
    assert state == "wrong" and "lowest" in hint


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

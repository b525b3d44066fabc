"""Every exercise's checker, fed what students hand in when things go wrong, answers with a verdict: an object that
raises whatever is done with it, a function that raises, values of the wrong type, a class instead of an object,
and None. It never raises (Run All goes on), never says correct, and names the exception and the student's line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from spleenkit.exercises import EXERCISES, RESULTS_ENV, STRICT_ENV, check, raised, student_line

REPO = Path(__file__).resolve().parents[1]
CASES = [f"spleen_{n}.nii.gz" for n in range(1, 10)]


@pytest.fixture(autouse=True)
def lenient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STRICT_ENV, raising=False)
    monkeypatch.delenv(RESULTS_ENV, raising=False)


class Raising:
    """A student's object that raises whatever is done with it: read, iterated, compared, converted, called."""

    def _boom(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom from the student's object")

    __getattr__ = __iter__ = __len__ = __getitem__ = __float__ = __int__ = __index__ = __bool__ = _boom
    __array__ = __call__ = __eq__ = __lt__ = __gt__ = __hash__ = __contains__ = __fspath__ = _boom
    __add__ = __sub__ = __mul__ = __truediv__ = __abs__ = __neg__ = __str__ = __format__ = _boom

    def __repr__(self) -> str:
        raise RuntimeError("even its repr raises")


def raising_function(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("boom in the student's function")


def half_written(*args: Any, **kwargs: Any) -> Any:
    ...
    return loss.item()  # noqa: F821 - the skeleton of a task, run before it is filled in


# the wrong types, and the values a student guesses when nothing is computed: 0, 1, True, False
WRONG_TYPES = ["text", 3.5, 7, 0, 1, True, False, [1, 2], {"a": 1}, (None, 1), object(), np.zeros(3),
               torch.ones(2, 2), int, lambda *args, **kwargs: "garbage", lambda *args, **kwargs: 0]


@pytest.fixture(scope="module")
def contexts(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The keywords each exercise's check cell passes, on small stand-ins for the notebooks' data."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import UNet

    from spleenkit.data import load_datalist
    from spleenkit.metrics import mask_metrics, summarize
    from spleenkit.presets import PRESETS, get_preset
    from spleenkit.transforms import validation_transforms

    folder = tmp_path_factory.mktemp("robust")
    items = load_datalist(synthetic_dataset)
    label = np.zeros((16, 16, 12), np.uint8)
    label[4:12, 4:12, 3:9] = 1
    predictions, labels, rows = {}, {}, []
    for name, shift in (("case_a", 1), ("case_b", 2)):
        for kind, array, paths in (("pred", np.roll(label, shift, 0), predictions), ("label", label, labels)):
            paths[name] = str(folder / f"{name}_{kind}.nii.gz")
            nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0])), paths[name])
        rows.append({"case": name, "space": "original", **mask_metrics(np.roll(label, shift, 0), label, (2, 2, 3))})
    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)
    exported = folder / "model.ts"
    torch.jit.save(torch.jit.script(network.eval()), str(exported))
    runs = []
    for name, dice in (("first", [0.2, 0.5]), ("second", [None, 0.7])):
        run = folder / "runs" / name
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(f'{{"epoch": {e}, "loss": 0.5, "val_dice": '
                                                   f'{"null" if d is None else d}}}\n' for e, d in enumerate(dice, 1)))
        runs.append(run)
    mask = np.zeros((10, 10, 10), bool)
    mask[2:4, 4:6, 6:8] = True
    train_json = REPO / "bundle" / "configs" / "train.json"
    return {
        "00-crop-extent": {}, "00-custom-preset": {}, "00-training-steps": {},
        "01-load-case": {"items": items[:1]}, "01-volume": {"items": items[:1]},
        "01-window": {"items": items[:2], "window": (-57, 164), "shown": 0},
        "02-resampled-shape": {"image": items[0]["image"], "preset": "quick"},
        "02-chain": {"preset": "tutorial"},
        "02-no-spleen-batch": {"positive": 1, "negative": 2, "crops": 8},
        "02-cache-gib": {"cases": 41, "shape": (512, 512, 100), "spacing": (0.8, 0.8, 2.5),
                         "target_spacing": (1.5, 1.5, 2.0)},
        "03-best-epoch": {"metrics": [{"epoch": 1, "loss": 0.9, "val_dice": 0.4}]},
        "03-network": {"preset": "seed"}, "03-loss": {"preset": "seed"}, "03-train-step": {"preset": "quick"},
        "04-crops-per-step": {"preset": get_preset("seed"), "processes": 4},
        "04-global-dice": {},
        "04-partition": {"cases": CASES, "processes": 2, "seed": 123},
        "04-train-sampler": {"dataset": CASES, "processes": 2, "rank": 1, "seed": 123},
        "05-metric-means": {"predictions": predictions, "cases": labels, "summary": summarize(rows)},
        "05-largest-component": {"preprocessing": validation_transforms("quick")},
        "05-volume-error": {"prediction_file": predictions["case_a"], "label_file": labels["case_a"]},
        "06-centre-mm": {"mask": mask, "affine": np.diag([2.0, 2.0, 3.0, 1.0])},
        "06-flip": {},
        "06-sliding-window": {"image": torch.rand(1, 24, 16, 16), "network": torch.nn.Conv3d(1, 2, 3, padding=1),
                              "preset": get_preset("quick").replace(validation_roi_size=(16, 16, 16))},
        "06-windows": {},
        "07-override": {"config_file": train_json},
        "07-ignored-overrides": {"config": ConfigParser.load_config_files(str(train_json)),
                                 "overrides": ["epoch", "val_interval"]},
        "07-export-difference": {"exported": exported, "network": network, "patch": torch.rand(1, 1, 16, 16, 16)},
        "08-variant": {"base": PRESETS["quick"]},
        "08-best-run": {"run_dirs": runs},
        "08-dice-loss": {"preset": PRESETS["quick"]},
    }


def test_every_exercise_has_a_context_here(contexts: dict[str, dict[str, Any]]) -> None:
    assert set(contexts) == set(EXERCISES)


@pytest.mark.parametrize("exercise", sorted(EXERCISES))
def test_a_checker_answers_raising_wrong_and_missing_answers_without_raising(
        exercise: str, contexts: dict[str, dict[str, Any]]) -> None:
    context = contexts[exercise]
    assert check(exercise, None, **context).status == "unanswered"
    for answer in [Raising(), raising_function, half_written, *WRONG_TYPES]:
        verdict = check(exercise, answer, **context)  # raises nothing
        assert verdict.status == "wrong", (exercise, answer, verdict)
        assert verdict.message and not verdict.correct
    if EXERCISES[exercise].kind == "function":  # the function is called: its exception and line are named
        verdict = check(exercise, raising_function, **context)
        assert "RuntimeError: boom in the student's function" in verdict.message, verdict.message
        assert 'raise RuntimeError("boom in the student\'s function")' in verdict.message, verdict.message
        verdict = check(exercise, half_written, **context)
        assert "NameError: name 'loss' is not defined" in verdict.message and "return loss.item()" in verdict.message


def test_a_class_instead_of_an_object_is_named_in_one_short_line() -> None:
    from monai.losses import DiceCELoss

    verdict = check("03-loss", DiceCELoss, preset="seed")
    assert verdict.status == "wrong" and "the class DiceCELoss itself" in verdict.message
    assert "DiceCELoss(...)" in verdict.message and len(verdict.message) < 300


def test_the_stop_button_still_stops() -> None:
    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        check("00-crop-extent", interrupted)


def test_the_students_line_is_found_past_library_frames() -> None:
    def student(values: Any) -> float:
        return float(np.asarray(values, dtype=float).sum())  # numpy raises inside its own code

    try:
        student(["a", "b"])
    except ValueError as error:
        number, line = student_line(error)
        assert line == "return float(np.asarray(values, dtype=float).sum())  # numpy raises inside its own code"
        assert "ValueError" in raised(error) and f"line {number} of your code" in raised(error)
    try:
        np.asarray(["a"], dtype=float)
    except ValueError as error:  # raised in a library with no student frame above it but this test's
        assert student_line(error) is not None


def test_a_raising_answer_in_strict_mode_fails_the_notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    from spleenkit.errors import ExerciseFailed

    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(ExerciseFailed, match="RuntimeError"):
        check("00-crop-extent", raising_function)

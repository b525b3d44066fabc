"""The notebooks' exercise checkers: each one says "correct" or gives a hint, and never crashes a lesson.

A check cell calls ``check("01-volume", my_spleen_ml, mask=spleen, spacing=voxel_mm)``: the first
argument names the exercise (two-digit notebook number, a dash, a short name), the second is the
student's answer, the keywords are what the checker needs to work the right answer out itself (so
the check cell shows no solution). ``check`` returns a :class:`Verdict`, which a notebook shows as
one line and which is true only when the answer is correct.

What happens to an answer:

- ``None`` or ``...`` (the student copy's stub; also a tuple or list of them): "not answered yet"
  with a hint, status ``unanswered``.
- a wrong answer, or one the checker cannot read: a hint, status ``wrong``.
- a right one: status ``correct`` and a sentence that says what it means.
- an exercise that does not apply to the data at hand (the split of a one-case dataset): ``skipped``.

Nothing raises in a student's notebook, except a check cell that names an unknown exercise or
gives the wrong keywords (a mistake of the notebook's author). With ``SPLEENKIT_STRICT_EXERCISES=1``
(set by the notebook runner, so in CI and ``spleenkit course check``) a ``wrong`` or ``unanswered``
answer raises :class:`ExerciseFailed`, so an instructor copy whose solution no longer passes fails
the run. With ``SPLEENKIT_EXERCISE_RESULTS=<file>`` every verdict is appended to that file as one
JSON line (the runner writes ``exercises.jsonl`` beside the executed notebooks).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spleenkit.errors import BadInputError, SpleenkitError

if TYPE_CHECKING:
    from spleenkit.presets import Preset

STRICT_ENV = "SPLEENKIT_STRICT_EXERCISES"
RESULTS_ENV = "SPLEENKIT_EXERCISE_RESULTS"
STATUSES = ("correct", "wrong", "unanswered", "skipped")


class Hint(Exception):  # noqa: N818 - a hint for the student, not an error of the program
    """Raised by a checker for a wrong answer; the message is the hint the student sees."""


class Skip(Exception):  # noqa: N818 - a verdict, not an error
    """Raised by a checker when the exercise does not apply to the data at hand; the message says why."""


class ExerciseFailed(SpleenkitError):
    """Strict mode: an answer was wrong or missing (in an instructor copy, a solution that no longer works)."""


@dataclass(frozen=True)
class Exercise:
    """One exercise: its id ("01-volume"), a short title, its checker and the hint for an empty answer."""

    id: str
    title: str
    checker: Callable[..., str]
    hint: str


@dataclass(frozen=True)
class Verdict:
    """What ``check`` says about one answer; true only when the answer is correct."""

    exercise: str
    title: str
    status: str
    message: str

    @property
    def correct(self) -> bool:
        """True when the answer is right."""
        return self.status == "correct"

    def __bool__(self) -> bool:
        return self.correct

    def __str__(self) -> str:
        label = {"correct": "correct!", "wrong": "not quite.", "unanswered": "not answered yet.",
                 "skipped": "skipped:"}[self.status]
        return f"Exercise {self.exercise} ({self.title}): {label} {self.message}"

    def __repr__(self) -> str:  # what a notebook shows for a check cell
        return str(self)


EXERCISES: dict[str, Exercise] = {}


def exercise(exercise_id: str, title: str, hint: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Register a checker: ``checker(answer, **context)`` returns the success message or raises Hint/Skip."""

    def register(checker: Callable[..., str]) -> Callable[..., str]:
        if exercise_id in EXERCISES:
            raise ValueError(f"exercise {exercise_id!r} is registered twice")
        EXERCISES[exercise_id] = Exercise(exercise_id, title, checker, hint)
        return checker

    return register


def strict_mode() -> bool:
    """True when wrong or missing answers must raise (``SPLEENKIT_STRICT_EXERCISES`` set to 1/true/yes)."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def unanswered(answer: Any) -> bool:
    """True for the stubs of a student copy: None, ``...``, or a tuple/list/dict holding only those."""
    if answer is None or answer is Ellipsis:
        return True
    if isinstance(answer, (tuple, list)) and answer:
        return all(unanswered(item) for item in answer)
    if isinstance(answer, dict) and answer:
        return all(unanswered(item) for item in answer.values())
    return False


def check(exercise_id: str, answer: Any, **context: Any) -> Verdict:
    """Check a student's answer to one exercise; see the module's description for what it does."""
    found = EXERCISES.get(exercise_id)
    if found is None:
        raise BadInputError(f"no exercise {exercise_id!r}; known: {', '.join(sorted(EXERCISES))}")
    try:
        inspect.signature(found.checker).bind(answer, **context)
    except TypeError as error:
        raise BadInputError(f"check({exercise_id!r}, ...): the check cell passes the wrong keywords ({error}); "
                            f"the checker takes {inspect.signature(found.checker)}") from error
    if unanswered(answer):
        status, message = "unanswered", found.hint
    else:
        try:
            status, message = "correct", found.checker(answer, **context)
        except Hint as hint:
            status, message = "wrong", str(hint)
        except Skip as reason:
            status, message = "skipped", str(reason)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as error:
            status, message = "wrong", f"could not read the answer {_short(answer)} ({error}). {found.hint}"
    verdict = Verdict(exercise=exercise_id, title=found.title, status=status, message=message)
    _record(verdict)
    if strict_mode() and status in {"wrong", "unanswered"}:
        raise ExerciseFailed(f"{verdict} (strict mode: {STRICT_ENV} is set)")
    return verdict


def _record(verdict: Verdict) -> None:
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as stream:  # one short line per write: appends do not interleave
        stream.write(json.dumps(asdict(verdict)) + "\n")


def read_results(path: str | os.PathLike[str]) -> list[Verdict]:
    """The verdicts recorded in a results file (``SPLEENKIT_EXERCISE_RESULTS``), in order; none when it is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    verdicts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                verdicts.append(Verdict(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as error:
                raise BadInputError(f"{path}: line {number} is not a recorded verdict ({error})") from error
    return verdicts


# --------------------------------------------------------------------------- helpers for checkers
def _short(answer: Any) -> str:
    text = repr(answer)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(answer: Any, what: str = "a number") -> float:
    try:
        value = float(np.asarray(answer, dtype=float).reshape(()))
    except (TypeError, ValueError) as error:
        raise Hint(f"expected {what}, got {_short(answer)}") from error
    if not math.isfinite(value):
        raise Hint(f"expected {what}, got {value}")
    return value


def _close(value: float, expected: float, relative: float = 0.0, absolute: float = 0.0) -> bool:
    return abs(value - expected) <= max(absolute, relative * abs(expected))


def _mask(array: Any) -> np.ndarray:
    return np.asarray(array) > 0


def _spacing(spacing: Sequence[float]) -> np.ndarray:
    return np.asarray([float(s) for s in spacing][:3], dtype=float)


def _choice(answer: Any, options: Sequence[str]) -> str:
    text = str(answer).strip().strip("'\"").lower()
    if text not in options:
        raise Hint(f"answer with one of {', '.join(repr(o) for o in options)}, not {_short(answer)}")
    return text


# --------------------------------------------------------------------------- 00 welcome
@exercise("00-crop-extent", "how much of the body a crop sees",
          "Set crop_mm to a dict {preset name: (x, y, z) in mm}: each side of the crop = voxels x voxel size.")
def _crop_extent(answer: Any, presets: Sequence[str] = ("seed", "quick")) -> str:
    from spleenkit.presets import get_preset

    if not isinstance(answer, dict):
        raise Hint(f"expected a dict like {{'seed': (x, y, z), 'quick': (x, y, z)}}, got {_short(answer)}")
    lines = []
    for name in presets:
        preset = get_preset(name)
        expected = np.asarray(preset.patch_size, dtype=float) * np.asarray(preset.spacing, dtype=float)
        if name not in answer:
            raise Hint(f"crop_mm has no entry for {name!r}")
        try:
            given = np.asarray(answer[name], dtype=float).reshape(-1)
        except (TypeError, ValueError) as error:
            raise Hint(f"crop_mm[{name!r}] should be three numbers in mm, got {_short(answer[name])}") from error
        if given.shape != (3,):
            raise Hint(f"crop_mm[{name!r}] should be three numbers (x, y, z in mm), got {_short(answer[name])}")
        if np.allclose(given, preset.patch_size):
            raise Hint(f"crop_mm[{name!r}] is the crop in voxels; multiply each side by the voxel size in mm "
                       f"(preset.spacing).")
        if np.allclose(given, np.asarray(preset.patch_size) / np.asarray(preset.spacing)):
            raise Hint(f"crop_mm[{name!r}]: voxels / mm is not a length; multiply, do not divide.")
        if not np.allclose(given, expected, atol=0.5):
            raise Hint(f"crop_mm[{name!r}] = {tuple(np.round(given, 1))}: multiply each side of the crop "
                       "(patch_size, voxels) by the voxel size (spacing, mm).")
        lines.append(f"{name}: {' x '.join(f'{v:g}' for v in expected)} mm")
    return ("; ".join(lines) + ". The CPU recipe's small crop sees MORE of the body than the published one: its "
            "voxels are coarser (3 mm), which is what makes it fast, and why its masks look blocky.")


@exercise("00-custom-preset", "a recipe of your own",
          "Set my_recipe to get_preset(name, setting=value, ...): the quick recipe with 5 epochs and rate 3e-4.")
def _custom_preset(answer: Any, base: str = "quick", overrides: dict[str, Any] | None = None) -> str:
    from spleenkit.compare import compare_objects
    from spleenkit.presets import Preset, get_preset

    overrides = {"epochs": 5, "learning_rate": 3e-4} if overrides is None else dict(overrides)
    if not isinstance(answer, Preset):
        raise Hint(f"expected a Preset (what get_preset returns), got {_short(answer)}")
    expected = get_preset(base, **overrides)
    if answer.name != base:
        raise Hint(f"your recipe starts from {answer.name!r}; start from {base!r}, the CPU recipe.")
    found = compare_objects(answer, expected)
    if not found:
        raise Hint(f"{found.difference}. get_preset({base!r}, ...) with keyword overrides changes only those.")
    changed = ", ".join(f"{key}={value!r}" for key, value in overrides.items())
    return (f"{base} with {changed}: every other number stays the recipe's. train(..., preset=my_recipe) and "
            f"`spleenkit train --preset {base} --epochs ...` take it the same way.")


@exercise("00-training-steps", "how many optimisation steps",
          "Set my_steps: epochs x the batches of one epoch (training cases / batch_size, the last batch may be short).")
def _training_steps(answer: Any, preset: Any, cases: int) -> str:
    value = _number(answer, "a whole number of steps")
    training = cases - preset.validation_cases
    per_epoch = math.ceil(training / preset.batch_size)
    expected = preset.epochs * per_epoch
    if value == expected:
        return (f"{preset.epochs} epochs x {per_epoch} batches ({training} training cases in batches of "
                f"{preset.batch_size}, the last one short) = {expected} steps, each on {preset.batch_size} x "
                f"{preset.num_samples} crops. Notebook 03's metrics.jsonl counts them ('iteration').")
    if value == preset.epochs * math.ceil(cases / preset.batch_size):
        raise Hint(f"the validation cases ({preset.validation_cases}) are held out: they are never trained on.")
    if value == preset.epochs * (training // preset.batch_size):
        raise Hint("the last, smaller batch is still a step (the DataLoader keeps it: drop_last is False).")
    if value == preset.epochs * math.ceil(training * preset.num_samples / preset.batch_size):
        raise Hint("the batch counts cases, not crops: the num_samples crops of a case travel in the same step.")
    raise Hint(f"{answer}. Steps per epoch = training cases / batch_size, rounded up; times the epochs.")


# --------------------------------------------------------------------------- 01 data
@exercise("01-split", "the split",
          "Set n_training and n_validation: the split keeps the last validation_cases names for validation.")
def _split(answer: Any, cases: int, validation_cases: int) -> str:
    if cases <= validation_cases:
        raise Skip(f"this dataset has only {cases} labelled case(s), too few to split; use source 'synthetic'.")
    if validation_cases > cases - validation_cases:
        raise Skip(f"holding out {validation_cases} of {cases} cases leaves too few to train on: the kit refuses this "
                   "split; use preset 'quick' for this dataset.")
    try:
        n_training, n_validation = (int(value) for value in answer)
    except (TypeError, ValueError) as error:
        raise Hint(f"expected two numbers (n_training, n_validation), got {_short(answer)}") from error
    expected = (cases - validation_cases, validation_cases)
    if (n_training, n_validation) == expected[::-1]:
        raise Hint("the two numbers are swapped: validation_cases is the size of the validation set.")
    if (n_training, n_validation) != expected:
        raise Hint(f"({n_training}, {n_validation}): there are {cases} labelled cases; look at "
                   "recipe.validation_cases.")
    return f"{expected[0]} cases to train on, {expected[1]} to validate on (for MSD: 32 and 9)."


@exercise("01-volume", "spleen volume",
          "Set my_spleen_ml: count the spleen's voxels, multiply by one voxel's volume in mm³, divide by 1000.")
def _spleen_volume(answer: Any, mask: Any, spacing: Sequence[float]) -> str:
    value = _number(answer, "a volume in mL")
    voxels = int(_mask(mask).sum())
    expected = voxels * float(np.prod(_spacing(spacing))) / 1000
    if _close(value, expected, relative=0.005):
        return f"{expected:.1f} mL (a typical adult spleen holds 100-400 mL)."
    if _close(value, expected * 1000, relative=0.005):
        raise Hint(f"{value:.0f} is in mm³: 1 mL = 1000 mm³.")
    if _close(value, voxels, relative=0.005):
        raise Hint("that is the number of voxels; multiply by one voxel's volume (the product of the three sizes).")
    raise Hint(f"{value:.1f} mL. Count the voxels, multiply by one voxel's volume in mm³ (the product of the three "
               "sizes), then divide by 1000.")


@exercise("01-window", "what the window keeps",
          "Set inside_fraction: the share of the spleen's voxels within recipe.intensity_range (bounds included).")
def _window_fraction(answer: Any, image: Any, mask: Any, window: Sequence[float]) -> str:
    value = _number(answer, "a fraction between 0 and 1")
    low, high = float(window[0]), float(window[1])
    values = np.asarray(image)[_mask(mask)]
    expected = float(np.mean((values >= low) & (values <= high)))
    if _close(value, expected, absolute=0.01):
        return (f"{expected:.1%} of the spleen lies inside {low:g}..{high:g} HU: the window keeps it, with full "
                "contrast.")
    if _close(value, 100 * expected, absolute=1):
        raise Hint("that looks like a percentage; give a fraction between 0 and 1.")
    if _close(value, 1 - expected, absolute=0.01):
        raise Hint("that is the fraction outside the window.")
    raise Hint(f"{value:.3f}. Select the spleen's voxels with ct[spleen], then test both bounds.")


# --------------------------------------------------------------------------- 02 preprocessing
@exercise("02-resampled-shape", "predict the resampled shape",
          "Set my_shape to three whole numbers: each axis' size x its voxel size / the recipe's voxel size.")
def _resampled_shape(answer: Any, spatial_shape: Sequence[int], stored_shape: Sequence[int],
                     stored_spacing: Sequence[float], target_spacing: Sequence[float]) -> str:
    try:
        given = [int(round(float(n))) for n in answer]
    except (TypeError, ValueError) as error:
        raise Hint(f"expected three whole numbers, got {_short(answer)}") from error
    if len(given) != 3:
        raise Hint(f"expected three numbers, one per axis, got {len(given)}")
    expected = [int(n) for n in spatial_shape][:3]
    # Orientationd may have permuted the axes: compare the sizes, allowing Spacingd's rounding
    if all(abs(a - b) <= 1 for a, b in zip(sorted(given), sorted(expected), strict=True)):
        return f"Spacingd made {tuple(expected)} voxels (the extent in mm stays; only the voxel size changes)."
    if sorted(given) == sorted(int(n) for n in list(stored_shape)[:3]):
        raise Hint("that is the shape before resampling.")
    inverted = [round(n * t / z) for n, z, t in zip(stored_shape, stored_spacing, target_spacing, strict=False)]
    if sorted(given) == sorted(inverted):
        raise Hint("the ratio is upside down: extent in mm = size x voxel size; divide that by the new voxel size.")
    raise Hint(f"{tuple(given)}. Multiply each size by its voxel size (the extent in mm) and divide by the "
               "recipe's voxel size.")


@exercise("02-chain", "write the tutorial's training chain",
          "Set my_chain to a monai.transforms.Compose of the tutorial preset's training transforms.")
def _chain(answer: Any, preset: Preset | str) -> str:
    from spleenkit.compare import compare_transforms
    from spleenkit.transforms import training_transforms

    steps = getattr(answer, "transforms", answer)
    if not isinstance(steps, (list, tuple)) or not all(callable(step) for step in steps):
        raise Hint(f"expected Compose([...]) of MONAI transforms, got {_short(answer)}")
    reference = training_transforms(preset)
    preset = getattr(preset, "name", preset)
    verdict = compare_transforms(answer, reference)
    if not verdict:
        names = " -> ".join(type(step).__name__ for step in reference.transforms)
        raise Hint(f"{verdict.difference}. The {preset!r} chain is {names}; its numbers are get_preset({preset!r})'s.")
    return (f"your {len(reference.transforms)} steps equal spleenkit's training_transforms({preset!r}), argument "
            "for argument: CropForegroundd trims the air around the body before the crops are drawn.")


@exercise("02-no-spleen-batch", "a batch without a spleen-centred crop",
          "Set my_probability: the chance that none of the batch's crop centres is drawn on spleen.")
def _no_spleen_batch(answer: Any, positive: int, negative: int, crops: int) -> str:
    value = _number(answer, "a probability between 0 and 1")
    background = negative / (positive + negative)
    expected = background**crops
    if _close(value, expected, relative=0.02, absolute=1e-6):
        return (f"{expected:.4f} (1 batch in {1 / expected:.0f}): each centre is spleen with probability "
                f"{positive}/{positive + negative}, independently, so 'half the crops hold spleen' is true only on "
                "average. (A background-centred crop can still hold spleen near its edge.)")
    if value == 0:
        raise Hint("the centres are drawn one by one, independently: nothing forces half of them onto spleen.")
    if _close(value, background, relative=0.02):
        raise Hint("that is the chance for one crop; every crop of the batch must miss the spleen.")
    if _close(value, 1 - expected, relative=0.02):
        raise Hint("that is the chance that at least one centre is on spleen; the question is the opposite.")
    raise Hint(f"{value:g}. One centre is background with probability neg / (pos + neg); {crops} independent "
               "centres all are with that probability to the power of the number of crops.")


@exercise("02-cache-gib", "will the seed recipe's cache fit",
          "Set my_gib: voxels per case after resampling x 4 bytes x 2 (image and label) x cases / 2**30.")
def _cache_gib(answer: Any, cases: int, shape: Sequence[int], spacing: Sequence[float],
               target_spacing: Sequence[float]) -> str:
    value = _number(answer, "a size in GiB")
    voxels = float(np.prod([n * z / t for n, z, t in zip(shape, spacing, target_spacing, strict=True)]))
    expected = cases * voxels * 4 * 2 / 2**30
    if _close(value, expected, relative=0.1):
        return (f"about {expected:.1f} GiB: fine on a workstation, too much for a small Colab machine, where "
                f"cache_rate=0.5 would halve it.")
    if _close(value, expected / 2, relative=0.1):
        raise Hint("the cache holds the label too, as float32: twice the image.")
    if _close(value, expected / 4, relative=0.1) or _close(value, expected / 8, relative=0.1):
        raise Hint("each voxel is a float32: 4 bytes.")
    raise Hint(f"{value:.2f} GiB. Voxels per case after resampling x 4 bytes x 2 (image and label) x {cases} cases, "
               "divided by 2**30.")


# --------------------------------------------------------------------------- 03 training
@exercise("03-best-epoch", "the best epoch", "Set my_best_epoch to the epoch whose val_dice is highest.")
def _best_epoch(answer: Any, metrics: Sequence[dict[str, Any]]) -> str:
    validated = [row for row in metrics if row.get("val_dice") is not None]
    if not validated:
        raise Skip("no epoch of this run was validated yet")
    best = max(row["val_dice"] for row in validated)
    epochs = [int(row["epoch"]) for row in validated if row["val_dice"] == best]
    if isinstance(answer, float) and not float(answer).is_integer():
        raise Hint(f"{answer} looks like a Dice; give the epoch it belongs to.")
    value = _number(answer, "an epoch number")
    if int(value) not in epochs:
        last = int(metrics[-1]["epoch"])
        if int(value) == last:
            raise Hint("the last epoch is not always the best one: compare the val_dice of every validated epoch.")
        if int(value) == int(min(metrics, key=lambda row: row["loss"])["epoch"]):
            raise Hint("that is the lowest training loss; model.pt is chosen by the validation Dice.")
        raise Hint(f"epoch {int(value)} is not the best. Skip the rows whose val_dice is None, then take the row "
                   "with the largest val_dice.")
    return (f"epoch {epochs[0]}, validation Dice {best:.4f}: the epoch whose weights model.pt holds (later epochs "
            "go on training but did not validate better).")


def _tiny_batch(seed: int = 0, side: int = 16) -> tuple[Any, Any]:
    """A fixed small batch for the 03 checkers: two random images, one label with a cube of spleen, one empty."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 1, side, side, side, generator=generator)
    labels = torch.zeros(2, 1, side, side, side)
    labels[0, :, side // 4:side // 2, side // 4:side // 2, side // 4:side // 2] = 1.0
    return images, labels


@exercise("03-network", "write the bundle's UNet",
          "Set my_network = UNet(spatial_dims=3, in_channels=..., ...) from monai.networks.nets.")
def _network(answer: Any, preset: Preset | str) -> str:
    import torch

    from spleenkit.compare import compare_networks, compare_objects
    from spleenkit.model import BUNDLE_PARAMETER_COUNT, build_unet, count_parameters

    if not isinstance(answer, torch.nn.Module):
        raise Hint(f"expected a network (a torch.nn.Module such as monai.networks.nets.UNet), got {_short(answer)}")
    reference = build_unet(preset)
    count = count_parameters(answer)
    weights = compare_networks(answer, reference)
    if not weights:
        raise Hint(f"{count:,} weights (the bundle's UNet has {count_parameters(reference):,}); first difference: "
                   f"{weights.difference}. Check channels, strides, num_res_units and norm against the table.")
    settings = compare_objects(answer, reference, "the network")
    if not settings:
        raise Hint(f"the weights match, but {settings.difference}: a setting without weights (activation, dropout, "
                   "normalisation options) differs from the bundle's.")
    bundle = " (the bundle's 4,808,917)" if count == BUNDLE_PARAMETER_COUNT else ""
    return (f"{count:,} weights{bundle}, with the bundle's state-dict names and shapes: its released model.pt loads "
            "into your network.")


@exercise("03-loss", "write the bundle's loss",
          "Set my_loss = DiceCELoss(...) from monai.losses with the bundle's settings.")
def _loss(answer: Any, preset: Preset | str) -> str:
    import torch

    from spleenkit.compare import compare_numbers, compare_objects
    from spleenkit.training import make_loss

    if not callable(answer):
        raise Hint(f"expected a loss object such as monai.losses.DiceCELoss(...), got {_short(answer)}")
    reference = make_loss(preset)
    settings = compare_objects(answer, reference, "the loss")
    if not settings:
        raise Hint(f"{settings.difference}. The table of section 3 gives each argument's value.")
    images, labels = _tiny_batch()
    logits = torch.cat([images, 1 - images], dim=1) * 4
    value, expected = float(answer(logits, labels)), float(reference(logits, labels))
    same = compare_numbers([value], [expected], what="loss")
    if not same:
        raise Hint(f"the settings match but the {same.difference} on a fixed batch; did you pass the logits and the "
                   "label (not one-hot)?")
    return f"the bundle's DiceCELoss: every setting, and {value:.4f} on a fixed batch with an empty crop."


def reference_training_losses(preset: Preset | str = "seed", steps: int = 4,
                              step: Callable[..., Any] | None = None) -> list[float]:
    """The losses of ``steps`` float32 training steps with the preset's loss and optimiser on a fixed small
    batch and a small UNet (the step is checked, not the network: a second, not a minute), each made by
    ``step(network, inputs, labels, loss_function, optimizer, scaler, precision)`` (the kit's
    :func:`~spleenkit.training.mixed_precision_step` when None): what the step exercise compares."""
    import torch
    from monai.networks.nets import UNet

    from spleenkit.devices import choose_precision, grad_scaler
    from spleenkit.presets import get_preset
    from spleenkit.training import make_loss, make_optimizer, mixed_precision_step

    device = torch.device("cpu")
    precision = choose_precision(device, False, purpose="the exercise")  # float32: the same numbers everywhere
    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                   num_res_units=1, norm=get_preset(preset).norm)
    loss_function, optimizer = make_loss(preset), make_optimizer(preset, network.parameters())
    scaler = grad_scaler(device, False)
    inputs, labels = _tiny_batch()
    losses = []
    for _ in range(steps):
        if step is None:
            losses.append(float(mixed_precision_step(network, inputs, labels, loss_function, optimizer, scaler,
                                                     device, False)[1]))
        else:
            losses.append(float(step(network, inputs, labels, loss_function, optimizer, scaler, precision)))
    return losses


@exercise("03-train-step", "complete the training step",
          "Define my_training_step(network, inputs, labels, loss_function, optimizer, scaler, precision) -> loss.")
def _train_step(answer: Any, preset: Preset | str, steps: int = 4) -> str:
    from spleenkit.compare import compare_numbers

    if not callable(answer):
        raise Hint(f"expected a function, got {_short(answer)}")
    try:
        losses = reference_training_losses(preset, steps, answer)
    except (RuntimeError, TypeError, ValueError, AttributeError) as error:
        raise Hint(f"the step raised {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
                   "It takes (network, inputs, labels, loss_function, optimizer, scaler, precision).") from error
    expected = reference_training_losses(preset, steps)
    same = compare_numbers(losses, expected, relative=1e-6, absolute=1e-7, what="loss")  # float32, one machine
    if same:
        return (f"{steps} steps give the kit's losses ({', '.join(f'{v:.4f}' for v in losses)}): forward under "
                "autocast, loss in float32, scaled backward, optimiser step.")
    if len(set(round(v, 6) for v in losses)) == 1:
        raise Hint("the loss never changes: the weights are not updated (scaler.step(optimizer), then "
                   "scaler.update()).")
    if _close(losses[0], expected[0], relative=1e-4) and _close(losses[1], expected[1], relative=1e-4):
        raise Hint(f"{same.difference}: the first steps agree, then yours drift: are the gradients cleared "
                   "(optimizer.zero_grad) before each backward pass?")
    if not _close(losses[0], expected[0], relative=1e-4):
        raise Hint(f"{same.difference} already at the first step: the loss of the network's output (logits) and "
                   "the labels, as loss_function(logits.float(), labels).")
    raise Hint(f"{same.difference}. Compare your step with the loop of section 4.")


# --------------------------------------------------------------------------- 04 several GPUs
@exercise("04-crops-per-step", "crops per step", "Set my_crops_per_step to a whole number.")
def _crops_per_step(answer: Any, preset: Any, processes: int) -> str:
    value = _number(answer)
    expected = preset.batch_size * preset.num_samples * processes
    if value == preset.batch_size * preset.num_samples:
        raise Hint("that is one process's share; the step averages the gradients of every process.")
    if value != expected:
        raise Hint(f"{answer}. Each process takes batch_size cases x num_samples crops, and the step averages over "
                   "every process.")
    return f"{preset.batch_size} cases x {preset.num_samples} crops x {processes} processes = {expected}."


@exercise("04-sampler", "which cases each process scores",
          "Set rank1_cases to the list of case names that rank 1 evaluates.")
def _sampler(answer: Any, cases: Sequence[str], processes: int, rank: int) -> str:
    from monai.data import DistributedSampler

    names = list(cases)
    expected = [names[i] for i in DistributedSampler(names, num_replicas=processes, rank=rank, shuffle=False,
                                                      even_divisible=False)]
    given = [names[int(item)] if isinstance(item, (int, np.integer)) else str(item) for item in answer]
    if given == expected:
        return (f"rank {rank} scores {len(expected)} of {len(names)} cases: one in every {processes}, from position "
                f"{rank}, none twice (training pads the shares instead, so that every rank takes as many steps).")
    padded = [names[i] for i in DistributedSampler(names, num_replicas=processes, rank=rank, shuffle=False,
                                                    even_divisible=True)]
    if given == padded:
        raise Hint("that is the padded share training uses; validation does not repeat a case (even_divisible=False).")
    half = math.ceil(len(names) / processes)
    if given == names[rank * half:(rank + 1) * half]:
        raise Hint("the sampler deals the cases out like cards (rank, rank + N, ...), not in consecutive blocks.")
    raise Hint(f"{_short(given)}. Rank r takes the cases at positions r, r + N, r + 2N ... of the sorted list.")


@exercise("04-partition", "each process's share of the cached cases",
          "Set my_shares to partition_dataset(data=..., num_partitions=..., shuffle=..., seed=..., "
          "even_divisible=...).")
def _partition(answer: Any, cases: Sequence[str], processes: int, seed: int, per_rank: int | None = None) -> str:
    from types import SimpleNamespace

    from spleenkit.compare import compare_objects
    from spleenkit.distributed import shard

    names = list(cases)
    expected = [shard(names, SimpleNamespace(world_size=processes, rank=rank), even_divisible=True, shuffle=True,
                      seed=seed) for rank in range(processes)]
    try:
        given = [list(share) for share in answer]
    except TypeError as error:
        raise Hint(f"expected one list of cases per process, got {_short(answer)}") from error
    if len(given) != processes:
        raise Hint(f"{len(given)} share(s) for {processes} processes: num_partitions is the number of processes.")
    found = compare_objects(given, expected, "the shares")
    if found:
        return (f"{processes} shares of {len(expected[0])} cases each"
                + ("" if per_rank is None else f" (the manifest says {per_rank} per rank)")
                + f": the kit's own call. {len(names)} cases do not split evenly, so one case is dealt twice: every "
                  "process runs the same number of steps, as DDP needs.")
    if sorted(len(share) for share in given) != sorted(len(share) for share in expected):
        raise Hint("the shares differ in length: with even_divisible=False one process would finish its epoch first "
                   "and the others would wait at the gradient all-reduce forever. DDP needs equal shares.")
    unshuffled = [shard(names, SimpleNamespace(world_size=processes, rank=rank), even_divisible=True)
                  for rank in range(processes)]
    if given == unshuffled:
        raise Hint(f"the cases are dealt in name order: the kit shuffles them first (shuffle=True, seed={seed}, the "
                   "run's seed), so that a share is not all early or all late cases.")
    raise Hint(f"{found.difference}. Use the run's seed ({seed}) and shuffle=True, even_divisible=True.")


@exercise("04-train-sampler", "a DistributedSampler for one process",
          "Set my_sampler to DistributedSampler(dataset, num_replicas=..., rank=..., shuffle=..., seed=..., "
          "even_divisible=...).")
def _train_sampler(answer: Any, dataset: Sequence[Any], processes: int, rank: int, seed: int) -> str:
    from monai.data import DistributedSampler

    from spleenkit.compare import compare_objects
    from spleenkit.distributed import train_sampler

    if not isinstance(answer, DistributedSampler):
        raise Hint(f"expected a monai.data.DistributedSampler, got {_short(answer)}")
    expected = train_sampler(list(dataset), seed=seed, num_replicas=processes, rank=rank)
    if answer.num_replicas != processes or answer.rank != rank:
        raise Hint(f"this sampler is rank {answer.rank} of {answer.num_replicas}; the task asks for rank {rank} of "
                   f"{processes} (num_replicas, rank).")
    if len(answer) != len(expected):
        raise Hint(f"it yields {len(answer)} cases per epoch, expected {len(expected)}: training pads the shares "
                   "(even_divisible=True) so that every process runs the same number of steps.")
    found = compare_objects(answer, expected, "the sampler")
    if not found:
        raise Hint(f"{found.difference}. The kit reshuffles every epoch (shuffle=True) from the run's seed ({seed}).")
    orders = []
    for epoch in (0, 1):
        answer.set_epoch(epoch)
        orders.append(list(answer))
    answer.set_epoch(0)
    return (f"the kit's sampler: rank {rank} gets {len(expected)} of {len(dataset)} cases per epoch, a new draw each "
            f"epoch (epoch 0: {orders[0]}, epoch 1: {orders[1]}: the engine calls set_epoch for you).")


# --------------------------------------------------------------------------- 05 evaluation
@exercise("05-metric-means", "score every case with MONAI's metric objects",
          "Set my_means = (mean Dice, mean HD95 in mm): one DiceMetric and one HausdorffDistanceMetric, called once "
          "per case on one-hot (batch, class, x, y, z) tensors, then .aggregate().")
def _metric_means(answer: Any, predictions: dict[str, Any], cases: dict[str, Any], summary: dict[str, Any]) -> str:
    try:
        dice, hd95 = (_number(value, "a number") for value in answer)
    except (TypeError, ValueError) as error:
        raise Hint(f"expected two numbers (mean Dice, mean HD95 in mm), got {_short(answer)}") from error
    original = summary["original"]
    expected_dice, expected_hd95 = original["dice"]["mean"], original["hd95_mm"]["mean"]
    dice_right = _close(dice, expected_dice, relative=1e-4, absolute=1e-6)
    hd95_right = _close(hd95, expected_hd95, relative=1e-4, absolute=1e-4)
    if dice_right and hd95_right:
        return (f"mean Dice {expected_dice:.4f}, mean HD95 {expected_hd95:.2f} mm over {original['cases']} cases: "
                "the numbers evaluate_run wrote to summary.json, computed by MONAI's metric objects.")
    if not dice_right:
        if "resampled" in summary and _close(dice, summary["resampled"]["dice"]["mean"], relative=1e-4):
            raise Hint("that is the resampled-space mean; score the saved predictions (on the original grid) "
                       "against the label files.")
        with_background = [(_dice(p, r) + _dice(~p, ~r)) / 2 for p, r in _mask_pairs(predictions, cases)]
        if _close(dice, float(np.mean(with_background)), relative=1e-4):
            raise Hint("your Dice averages the background channel in (almost 1 everywhere): "
                       "DiceMetric(include_background=False).")
        raise Hint(f"mean Dice {dice:.4f}. Call the metric once per case with one-hot tensors of shape "
                   "(1, 2, x, y, z) (AsDiscrete(to_onehot=2), then [None]), then aggregate().")
    if _close(hd95, original["hd_mm"]["mean"], relative=1e-4):
        raise Hint("that is the plain Hausdorff distance (the maximum): HausdorffDistanceMetric(percentile=95).")
    from spleenkit.metrics import mask_metrics

    in_voxels = [mask_metrics(p, r, (1.0,) * p.ndim)["hd95_mm"] for p, r in _mask_pairs(predictions, cases)]
    if None not in in_voxels and _close(hd95, float(np.mean(in_voxels)), relative=1e-4):
        raise Hint("that HD95 is in voxels: pass the voxel size in mm, "
                   "metric(y_pred=..., y=..., spacing=label.pixdim.tolist()).")
    raise Hint(f"mean HD95 {hd95:.2f}. HausdorffDistanceMetric(include_background=False, percentile=95), called "
               "with spacing= the label's voxel size in mm.")


def _dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    total = prediction.sum() + reference.sum()
    return 1.0 if total == 0 else float(2 * (prediction & reference).sum() / total)


def _mask_pairs(predictions: dict[str, Any], cases: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prediction, label) masks per case; ``cases`` maps a case to its label file or to its datalist item."""
    from spleenkit.images import read_binary_mask

    labels = {name: case["label"] if isinstance(case, dict) else case for name, case in cases.items()}
    return [(read_binary_mask(predictions[name])[0], read_binary_mask(labels[name])[0]) for name in labels]


@exercise("05-largest-component", "post-processing with the largest component",
          "Set my_postprocess to a Compose: softmax, back onto the image's grid with Invertd, argmax, then "
          "KeepLargestConnectedComponentd.")
def _largest_component_chain(answer: Any, preprocessing: Any) -> str:
    from spleenkit.compare import compare_transforms
    from spleenkit.predict import postprocessing

    if not hasattr(answer, "transforms") and not isinstance(answer, (list, tuple)):
        raise Hint(f"expected a Compose of transforms, got {_short(answer)}")
    comparison = compare_transforms(answer, postprocessing(largest_component=True, invert=preprocessing))
    if comparison:
        return ("the same chain as evaluate_run(..., largest_component=True): the component is chosen on the 0/1 "
                "mask on the image's own grid.")
    steps = [type(step).__name__ for step in getattr(answer, "transforms", answer)]
    if "KeepLargestConnectedComponentd" in steps and "AsDiscreted" in steps and \
            steps.index("KeepLargestConnectedComponentd") < steps.index("AsDiscreted"):
        raise Hint("keep the largest component of the 0/1 mask, after argmax (AsDiscreted): on probabilities "
                   "every voxel is above 0, so it is all one component.")
    if "nearest_interp" in comparison.difference:
        raise Hint(f"{comparison.difference}: Invertd should interpolate the probabilities (nearest_interp=False) "
                   "and decide after, as the bundle does; nearest neighbour is for labels.")
    raise Hint(f"{comparison.difference}.")


@exercise("05-volume-error", "the volume error in millilitres",
          "Set my_volume_error_ml: (prediction's voxels - reference's voxels) x one voxel's volume / 1000.")
def _volume_error(answer: Any, prediction: Any, reference: Any, spacing: Sequence[float]) -> str:
    value = _number(answer, "a volume difference in mL")
    voxel_ml = float(np.prod(_spacing(spacing))) / 1000
    expected = (int(_mask(prediction).sum()) - int(_mask(reference).sum())) * voxel_ml
    if _close(value, expected, relative=1e-3, absolute=0.01):
        return f"{expected:+.2f} mL ({'too much' if expected > 0 else 'too little'} spleen in the prediction)."
    if _close(value, -expected, relative=1e-3, absolute=0.01):
        raise Hint("the sign is reversed: prediction minus reference, so too much spleen is positive.")
    raise Hint(f"{value:.2f} mL. Subtract the reference's voxel count from the prediction's, multiply by one "
               "voxel's volume (the product of the three zooms), divide by 1000.")


def sliding_window_count(image_shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows ``monai.inferers.sliding_window_inference`` runs over an image (it is run, on zeros)."""
    import torch
    from monai.inferers import sliding_window_inference

    calls = []

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return batch

    with torch.no_grad():  # zeros and a predictor that returns its input: nothing to move, all on the CPU
        sliding_window_inference(torch.zeros(1, 1, *[int(s) for s in image_shape]), [int(s) for s in roi_size],
                                 sw_batch_size=1, predictor=predictor, overlap=overlap, sw_device="cpu", device="cpu")
    return sum(calls)


# --------------------------------------------------------------------------- 06 inference
@exercise("06-centre-mm", "from voxels to millimetres",
          "Set my_centre_mm to three numbers: affine @ [i, j, k, 1] for the mean voxel index of the spleen.")
def _centre_mm(answer: Any, mask: Any, affine: Any) -> str:
    try:
        given = np.asarray(answer, dtype=float).reshape(-1)[:3]
    except (TypeError, ValueError) as error:
        raise Hint(f"expected three numbers (x, y, z in mm), got {_short(answer)}") from error
    affine = np.asarray(affine, dtype=float)
    index = np.argwhere(_mask(mask)).mean(axis=0)
    expected = (affine @ [*index, 1])[:3]
    if given.shape != (3,):
        raise Hint(f"expected three numbers (x, y, z in mm), got {_short(answer)}")
    if np.allclose(given, index, atol=0.5):
        raise Hint("those are voxel indices; multiply [i, j, k, 1] by the affine to get millimetres.")
    if not np.allclose(given, expected, atol=0.5):
        raise Hint(f"{np.round(given, 1)}. Take np.argwhere(mask > 0).mean(axis=0), append 1, multiply by the "
                   "affine.")
    return (f"{np.round(expected, 1)} mm. In RAS a smaller x is further to the patient's left, where a spleen "
            "belongs.")


@exercise("06-header-lies", "spot the flip", "Set header_lies to True or False.")
def _header_lies(answer: Any, image: Any, mask: Any) -> str:
    from spleenkit.inference import orientation_warnings

    if not isinstance(answer, (bool, np.bool_)):
        raise Hint(f"answer True or False, not {_short(answer)}")
    warnings = orientation_warnings(image, _mask(mask))
    if bool(answer) != bool(warnings):
        raise Hint("look again: orientation_warnings(mystery, ...) compares the header with the anatomy"
                   + (" and finds nothing wrong." if not warnings else f" and says: {warnings[0]}"))
    if warnings:
        return "only the voxels changed; the header lies. A correct flip changes the affine too."
    return "voxels and affine changed together: the header still tells the truth."


@exercise("06-sliding-window", "the sliding-window call",
          "Set my_logits: sliding_window_inference(inputs=slab[None], roi_size=..., sw_batch_size=..., "
          "predictor=network, overlap=..., mode=..., sw_device=compute_device, device=torch.device('cpu'))[0], "
          "under torch.no_grad().")
def _sliding_window(answer: Any, image: Any, network: Any, preset: Any, device: Any = "cpu") -> str:
    import torch

    from spleenkit.predict import make_inferer, predict_logits

    if isinstance(answer, torch.Tensor) and answer.device.type != "cpu":
        raise Hint(f"the logits are on {answer.device}: the stitched volume belongs on the CPU, so that the GPU's "
                   "memory does not grow with the scan; add device=torch.device('cpu') (windows still run on "
                   "sw_device=compute_device).")
    logits = torch.as_tensor(answer.detach() if hasattr(answer, "detach") else answer).float().cpu()
    expected = predict_logits(network, image, make_inferer(preset, device=device), device, amp=False).cpu()
    if logits.ndim == expected.ndim + 1 and logits.shape[0] == 1 and logits.shape[1:] == expected.shape:
        raise Hint("that still has the batch axis: the call returns (1, 2, x, y, z); take [0].")
    if tuple(logits.shape) != tuple(expected.shape):
        raise Hint(f"shape {tuple(logits.shape)}, expected {tuple(expected.shape)}: give the call slab[None] "
                   "(a batch of one) and take [0] of its output.")
    if torch.allclose(logits, expected, rtol=1e-4, atol=1e-4):
        return ("the kit's logits (make_inferer + predict_logits), as infer and the bundle's inference.json "
                "compute them. sw_batch_size changes only speed and memory, never the result.")
    if torch.allclose(logits, torch.softmax(expected, 0), rtol=1e-4, atol=1e-4):
        raise Hint("those are probabilities: the check wants the network's raw output (logits), before softmax.")
    window = {"roi_size": tuple(preset.validation_roi_size), "overlap": preset.sliding_window_overlap,
              "mode": "constant"}
    mistakes = [("overlap", {"overlap": 0.25}, "overlap 0.25 (sliding_window_inference's default)"),
                ("overlap", {"overlap": 0.0}, "no overlap"),
                ("mode", {"mode": "gaussian"}, "gaussian blending"),
                ("roi_size", {"roi_size": (96, 96, 96)}, "the seed recipe's 96-voxel window")]
    for setting, change, words in mistakes:
        if change[setting] == window[setting]:
            continue
        from monai.inferers import sliding_window_inference

        with torch.no_grad():
            candidate = sliding_window_inference(image[None], predictor=network, sw_batch_size=1,
                                                 **{**window, **change}, sw_device=device,
                                                 device=torch.device("cpu"))[0].float()
        if torch.allclose(logits, candidate, rtol=1e-4, atol=1e-4):
            raise Hint(f"those logits come from {words}; the recipe's {setting} is {window[setting]!r}.")
    raise Hint(f"your logits differ from the kit's by up to {float((logits - expected).abs().max()):.3g}. Use "
               f"roi_size={window['roi_size']}, overlap={window['overlap']}, mode='constant' and predictor=network.")


@exercise("06-windows", "how many windows", "Set my_windows to the number of windows, a whole number.")
def _windows(answer: Any, image_shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> str:
    value = _number(answer)
    expected = sliding_window_count(image_shape, roi_size, overlap)
    if value != expected:
        steps = [max(1, int(r * (1 - overlap))) for r in roi_size]
        raise Hint(f"{answer}. Along each axis the window moves by roi x (1 - overlap) = {steps} voxels until it "
                   f"reaches the end (the last window is shifted back to fit); multiply the three counts.")
    counts = {o: sliding_window_count(image_shape, roi_size, o) for o in sorted({0.0, 0.25, overlap})}
    listed = ", ".join(f"{n} at overlap {o:g}" for o, n in counts.items())
    return (f"{expected} windows ({listed}): more overlap means more network runs, and smoother seams where the "
            "blended windows meet.")


# --------------------------------------------------------------------------- 07 bundle
@exercise("07-override", "override the bundle from Python",
          "Set my_parser: a ConfigParser that read configs/train.json, with the entries 'preset' and 'epochs' set.")
def _override(answer: Any, config_file: str | os.PathLike[str], preset: str = "quick", epochs: int = 3) -> str:
    from monai.bundle import ConfigParser

    from spleenkit.compare import compare_objects

    if not isinstance(answer, ConfigParser):
        raise Hint(f"expected a monai.bundle.ConfigParser, got {_short(answer)}")
    if "train#trainer" not in answer:
        raise Hint("this parser has no train#trainer: read configs/train.json with my_parser.read_config(path).")
    reference = ConfigParser()
    reference.read_config(str(config_file))
    reference.update({"preset": preset, "epochs": epochs})
    recipe = answer.get_parsed_content("recipe")
    expected = reference.get_parsed_content("recipe")
    max_epochs = answer.get_parsed_content("train#trainer#max_epochs")
    found = compare_objects(recipe, expected, "the recipe")
    if not found:
        raise Hint(f"{found.difference}. Set my_parser['preset'] and my_parser['epochs'], as --preset and --epochs do.")
    return (f"recipe {recipe.name!r} with {recipe.epochs} epochs, and train#trainer#max_epochs = {max_epochs}: "
            "the same as `python -m monai.bundle run training ... --preset quick --epochs 3`. The recipe reads "
            "train#trainer#max_epochs, which reads the top-level epochs, so an override of either reaches the "
            "schedule and the manifest too.")


@exercise("07-ignored-overrides", "overrides that would do nothing",
          "Set ignored_keys to the list of the colleague's keys that name nothing in the configs.")
def _ignored_overrides(answer: Any, config: Any, overrides: Sequence[str]) -> str:
    from spleenkit.bundle import override_problems

    problems = override_problems(config, list(overrides))
    expected = sorted(key for key in overrides if any(p.startswith(f"--{key} ") for p in problems))
    given = sorted(str(key) for key in answer) if not isinstance(answer, str) else [answer]
    if given != expected:
        raise Hint(f"{given}. Compare each key with the ids printed in section 1; an argument of a component "
                   "(network_def#num_res_units) may be added, which is allowed.")
    return "the bundle would stop with:\n" + "\n".join(problems)


@exercise("07-export-difference", "check an export yourself",
          "Set my_difference: run both models on patch under torch.no_grad(), subtract, take .abs().max().")
def _export_difference(answer: Any, exported: str | os.PathLike[str], network: Any, patch: Any,
                       tolerance: float = 1e-4) -> str:
    import torch

    value = _number(answer, "a float")
    with torch.no_grad():
        expected = float((torch.jit.load(str(exported))(patch) - network.eval()(patch)).abs().max())
    if not _close(value, expected, absolute=1e-6):
        raise Hint(f"{value:.2e}. Evaluate both under torch.no_grad(), subtract, take .abs().max().")
    return f"{expected:.1e}, well under the tolerance {tolerance:.0e}."


# --------------------------------------------------------------------------- 08 capstone
# settings a variant may not change: they define what is measured, not how the network learns
_MEASURE_SETTINGS = {"validation_cases": "the validation cases", "seed": "the random seed",
                     "validation_interval": "when the validation Dice is measured",
                     "sliding_window_overlap": "how the validation Dice is measured",
                     "epochs": "the budget (every run gets the same number of epochs)"}


@exercise("08-variant", "a variant worth trying",
          "Set my_variant to a dict of preset settings to change, e.g. {\"learning_rate\": 3e-3}.")
def _variant(answer: Any, base: Any) -> str:
    from spleenkit.presets import get_preset

    if not isinstance(answer, dict) or not answer:
        raise Hint("expected a non-empty dict of preset settings, e.g. {'learning_rate': 3e-3}, got "
                   f"{_short(answer)}")
    for key in answer:
        if key in _MEASURE_SETTINGS:
            raise Hint(f"{key!r} changes {_MEASURE_SETTINGS[key]}, not the recipe: runs compared that way measure "
                       "different things. Change how the network learns (loss, patch, learning rate, schedule ...).")
    try:
        variant = get_preset(base, **answer)
    except BadInputError as error:
        raise Hint(str(error)) from error
    changed = [key for key in answer if getattr(variant, key) != getattr(base, key)]
    if not changed:
        raise Hint(f"{answer} is what {base.name!r} already uses: change at least one setting.")
    if any(int(side) % 16 for side in variant.patch_size):
        raise Hint(f"patch {variant.patch_size}: each side must be a multiple of 16 (the UNet halves it four times).")
    return (f"a variant of {base.name!r} that changes {', '.join(changed)}; train it with "
            "train(..., **my_variant) into a new run folder and compare it with the baseline at the same budget.")


@exercise("08-best-run", "the best run from the run folders",
          "Set best_run to the name of the run folder with the highest validation Dice (read it from the folders).")
def _best_run(answer: Any, run_dirs: Sequence[str | os.PathLike[str]]) -> str:
    from spleenkit.training import read_metrics

    best = {Path(run).name: max((r["val_dice"] for r in read_metrics(run) if r.get("val_dice") is not None),
                                default=float("-inf")) for run in run_dirs}
    last = {Path(run).name: next((r["val_dice"] for r in reversed(read_metrics(run)) if r.get("val_dice") is not None),
                                 float("-inf")) for run in run_dirs}
    name = Path(str(answer)).name
    expected = max(best, key=best.get)
    if name == expected:
        return f"{expected}, best validation Dice {best[expected]:.4f} (the epoch model.pt keeps)."
    if name not in best:
        raise Hint(f"{_short(answer)} is none of the runs compared: {', '.join(best)}")
    if name == max(last, key=last.get):
        raise Hint("that run has the best LAST validation Dice; model.pt keeps the best epoch's weights: compare the "
                   "maximum over the epochs.")
    if name == min(best, key=best.get):
        raise Hint("that is the lowest Dice; Dice is higher when better.")
    raise Hint(f"{name} reaches {best[name]:.4f}; read each run's metrics.jsonl (read_metrics) and take the highest "
               "val_dice.")


@exercise("08-dice-loss", "the variant's loss in MONAI",
          "Set my_loss to monai.losses.DiceLoss(...) with the arguments the kit uses for loss 'dice'.")
def _dice_loss(answer: Any, preset: Any) -> str:
    from monai.losses import DiceLoss

    from spleenkit.compare import compare_objects
    from spleenkit.training import make_loss

    expected = make_loss(preset.replace(loss="dice"))
    if not isinstance(answer, DiceLoss):
        raise Hint(f"expected a monai.losses.DiceLoss, got {type(answer).__name__}")
    found = compare_objects(answer, expected, "DiceLoss")
    if not found:
        raise Hint(f"{found.difference}. The network gives 2 channels of logits and the label 1 channel of 0/1: "
                   "to_onehot_y=True, softmax=True.")
    return ("the kit's DiceLoss: softmax over the 2 logit channels, the label one-hot encoded; without the cross-"
            "entropy term of DiceCELoss.")


def exercise_ids(prefix: str = "") -> list[str]:
    """The registered exercise ids (those starting with ``prefix``, e.g. "05-"), sorted."""
    return sorted(key for key in EXERCISES if key.startswith(prefix))

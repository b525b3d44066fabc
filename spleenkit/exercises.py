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
- an exercise that does not apply to the data at hand (a dataset without a labelled case): ``skipped``.

Nothing raises in a student's notebook, except a check cell that names an unknown exercise or
gives the wrong keywords (a mistake of the notebook's author): whatever the student's object does when
the checker calls or reads it (a ``NameError`` in a half-written function, a ``RuntimeError`` from
MONAI), the verdict is ``wrong`` with a hint naming the exception and the line of the student's code it
came from. Only ``KeyboardInterrupt`` (the stop button) and ``SystemExit`` go through.

Many exercises ask for a **function** (``def my_...``) that the checker calls on inputs of its own (other
cases, other recipes, files it writes), so that an answer printed on screen or guessed cannot pass.

With ``SPLEENKIT_STRICT_EXERCISES=1`` (set by the notebook runner, so in CI and ``spleenkit course
check``) a ``wrong`` or ``unanswered`` answer raises :class:`ExerciseFailed`, so an instructor copy whose
solution no longer passes fails the run. With ``SPLEENKIT_EXERCISE_RESULTS=<file>`` every verdict is
appended to that file as one JSON line (the runner writes ``exercises.jsonl`` beside the executed notebooks).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spleenkit.bundle import override_problems
from spleenkit.compare import compare_networks, compare_numbers, compare_objects, compare_transforms
from spleenkit.devices import Precision, choose_precision, grad_scaler
from spleenkit.distributed import shard, train_sampler
from spleenkit.errors import BadInputError, ExerciseFailed
from spleenkit.images import read_binary_mask, read_nifti, voxel_spacing
from spleenkit.inference import orientation_warnings
from spleenkit.metrics import mask_metrics
from spleenkit.model import BUNDLE_PARAMETER_COUNT, build_unet, count_parameters
from spleenkit.predict import make_inferer, postprocessing, predict_logits
from spleenkit.presets import PRESETS, Preset, get_preset, resolve_preset
from spleenkit.runs import read_metrics
from spleenkit.training import make_loss, make_optimizer, mixed_precision_step
from spleenkit.transforms import deterministic_transforms, training_transforms

STRICT_ENV = "SPLEENKIT_STRICT_EXERCISES"
RESULTS_ENV = "SPLEENKIT_EXERCISE_RESULTS"
STATUSES = ("correct", "wrong", "unanswered", "skipped")


class Hint(Exception):  # noqa: N818 - a hint for the student, not an error of the program
    """Raised by a checker for a wrong answer; the message is the hint the student sees."""


class Skip(Exception):  # noqa: N818 - a verdict, not an error
    """Raised by a checker when the exercise does not apply to the data at hand; the message says why."""


#: What a student hands in: a function the checker calls on inputs of its own, an object written in MONAI or
#: PyTorch code (a network, a loss, a transform chain ...), or a value (a number, a list, a dict of settings).
KINDS = ("function", "object", "value")


@dataclass(frozen=True)
class Exercise:
    """One exercise: its id ("01-volume"), a short title, its checker, the hint for an empty answer, and the kind
    of answer (see :data:`KINDS`)."""

    id: str
    title: str
    checker: Callable[..., str]
    hint: str
    kind: str = "value"


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


def exercise(exercise_id: str, title: str, hint: str,
             kind: str = "value") -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Register a checker: ``checker(answer, **context)`` returns the success message or raises Hint/Skip."""
    if kind not in KINDS:
        raise ValueError(f"exercise {exercise_id!r}: kind {kind!r} is none of {KINDS}")

    def register(checker: Callable[..., str]) -> Callable[..., str]:
        if exercise_id in EXERCISES:
            raise ValueError(f"exercise {exercise_id!r} is registered twice")
        EXERCISES[exercise_id] = Exercise(exercise_id, title, checker, hint, kind)
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
    try:
        empty = unanswered(answer)
    except Exception:  # noqa: BLE001 - an object that cannot even be looked at is an answer, a wrong one
        empty = False
    if empty:
        status, message = "unanswered", found.hint
    elif isinstance(answer, type):
        status, message = "wrong", (f"that is the class {answer.__name__} itself, not an object made from it: call "
                                    f"it, {answer.__name__}(...). {found.hint}")
    else:
        try:
            status, message = "correct", found.checker(answer, **context)
        except Hint as hint:
            status, message = "wrong", str(hint)
        except Skip as reason:
            status, message = "skipped", str(reason)
        except Exception as error:  # noqa: BLE001 - whatever the student's object raises, the lesson goes on
            status, message = "wrong", f"{raised(error)}. {found.hint}"
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
    try:
        text = repr(answer)
    except Exception:  # noqa: BLE001 - a student's object whose repr raises
        text = f"a {type(answer).__name__} object"
    return text if len(text) <= 60 else text[:57] + "..."


def _library_folders() -> tuple[str, ...]:
    """Where code that is not the student's lives: this package, the standard library, installed packages."""
    import sysconfig

    folders = {str(Path(__file__).resolve().parent)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            folders.add(str(Path(path).resolve()))
    return tuple(sorted(folders))


def student_line(error: BaseException) -> tuple[int, str] | None:
    """The line number and text of the innermost frame of ``error``'s traceback that is the student's code
    (a notebook cell, a script: not this package, the standard library or an installed package), or None."""
    import linecache
    import traceback

    libraries = _library_folders()
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        name = frame.filename
        if name.startswith("<frozen") or (Path(name).is_absolute() and str(Path(name).resolve()).startswith(libraries)):
            continue
        line = (frame.line or linecache.getline(name, frame.lineno or 0)).strip()
        return (frame.lineno or 0), line
    return None


def raised(error: BaseException) -> str:
    """One sentence for a student: what their code raised and on which of their lines."""
    try:
        text = str(error).strip()
    except Exception:  # noqa: BLE001 - an exception whose message cannot be made
        text = ""
    first = text.splitlines()[0] if text else ""
    first = first if len(first) <= 160 else first[:157] + "..."
    sentence = f"your answer raised {type(error).__name__}" + (f": {first}" if first else "")
    where = student_line(error)
    if where is not None:
        number, line = where
        sentence += f" (line {number} of your code: `{line}`)" if line else f" (line {number} of your code)"
    return sentence


def _function(answer: Any, signature: str) -> None:
    """A hint unless ``answer`` is a function the checker can call (``signature`` says how it is called)."""
    if not callable(answer) or isinstance(answer, type):
        raise Hint(f"expected a function, def {signature}: ..., got {_short(answer)}")


def _returned(value: Any, call: str) -> Any:
    """``value``, unless the student's function returned None (a body of ``...``, or a forgotten return)."""
    if value is None:
        raise Hint(f"{call} returned None: end the function with `return ...`.")
    return value


def _number(answer: Any, what: str = "a number") -> float:
    if hasattr(answer, "detach") and callable(answer.detach):  # a torch tensor, possibly with gradients
        answer = answer.detach().cpu()
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


def _numbers(answer: Any, count: int, what: str) -> np.ndarray:
    """``count`` finite numbers from a tuple, list, array or tensor, else a hint naming ``what``."""
    if hasattr(answer, "detach") and callable(answer.detach):
        answer = answer.detach().cpu()
    try:
        values = np.asarray(answer, dtype=float).reshape(-1)
    except (TypeError, ValueError) as error:
        raise Hint(f"{what} should be {count} numbers, got {_short(answer)}") from error
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise Hint(f"{what} should be {count} numbers, got {_short(answer)}")
    return values


def _label(preset: Any, names: Sequence[str]) -> str:
    """How a hint names a recipe the checker made: its name and the settings that matter for the exercise."""
    return f"{preset.name} ({', '.join(f'{name}={getattr(preset, name)!r}' for name in names)})"


# --------------------------------------------------------------------------- 00 welcome
def _recipes_for_crops() -> list[Any]:
    """Every recipe, and one with unequal sides and voxels: what the crop function is called with."""
    return [*PRESETS.values(), get_preset("quick", patch_size=(48, 64, 80), spacing=(2.0, 2.5, 4.0))]


@exercise("00-crop-extent", "how much of the body a crop sees",
          "Define my_crop_mm(preset) returning the crop's (x, y, z) size in mm: each side = voxels x voxel size.",
          kind="function")
def _crop_extent(answer: Any) -> str:
    _function(answer, "my_crop_mm(preset)")
    sizes = {}
    for preset in _recipes_for_crops():
        label = _label(preset, ("patch_size", "spacing"))
        expected = np.asarray(preset.patch_size, dtype=float) * np.asarray(preset.spacing, dtype=float)
        given = _numbers(_returned(answer(preset), f"my_crop_mm({preset.name!r})"), 3, f"my_crop_mm for {label}")
        if np.allclose(given, expected, atol=0.5):
            sizes.setdefault(preset.name, expected)  # the made-up recipe comes last, named after its base
            continue
        if np.allclose(given, preset.patch_size):
            raise Hint(f"for {label} that is the crop in voxels; multiply each side by the voxel size in mm "
                       "(preset.spacing).")
        if np.allclose(given, np.asarray(preset.patch_size) / np.asarray(preset.spacing)):
            raise Hint(f"for {label}: voxels / mm is not a length; multiply, do not divide.")
        if np.allclose(np.sort(given), np.sort(expected), atol=0.5):
            raise Hint(f"for {label} the sides come out in the wrong order: pair each side of patch_size with the "
                       "spacing of the same axis (zip).")
        raise Hint(f"for {label} your function gives {tuple(np.round(given, 1))} mm: multiply each side of the crop "
                   "(patch_size, voxels) by the voxel size (spacing, mm).")
    seed, quick = (" x ".join(f"{v:g}" for v in sizes[name]) for name in ("seed", "quick"))
    return (f"seed: {seed} mm; quick: {quick} mm (and right for every other recipe tried). The CPU recipe's small "
            "crop sees MORE of the body than the published one: its voxels are coarser (3 mm), which is what makes "
            "it fast, and why its masks look blocky.")


@exercise("00-custom-preset", "a recipe of your own",
          "Set my_recipe to get_preset(name, setting=value, ...): the quick recipe with 5 epochs and rate 3e-4.",
          kind="object")
def _custom_preset(answer: Any, base: str = "quick", overrides: dict[str, Any] | None = None) -> str:
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
          "Define my_training_steps(recipe, cases) -> epochs x the batches of one epoch (the training cases in "
          "batches of batch_size; len() of a DataLoader counts them, the last short batch included).", kind="function")
def _training_steps(answer: Any) -> str:
    _function(answer, "my_training_steps(recipe, cases)")
    inputs = [(get_preset("quick", batch_size=2), 12), (get_preset("quick"), 12), (get_preset("seed"), 41),
              (get_preset("quick", batch_size=4, epochs=7, num_samples=3), 23)]

    def steps(recipe: Any, cases: int, held_out: bool = True, rounding: Callable[[float], int] = math.ceil,
              per: str = "batch") -> int:
        training = cases - recipe.validation_cases if held_out else cases
        units = training * recipe.num_samples if per == "crop" else training
        per_epoch = units if per == "case" else rounding(units / recipe.batch_size)
        return recipe.epochs * per_epoch

    mistakes = [
        (lambda r, c: steps(r, c, held_out=False), "the validation cases are held out: they are never trained on "
                                                    "(cases - recipe.validation_cases)."),
        (lambda r, c: steps(r, c, rounding=math.floor), "the last, smaller batch is still a step (the DataLoader "
                                                        "keeps it: drop_last is False), so round up."),
        (lambda r, c: steps(r, c, per="crop"), "the batch counts cases, not crops: the num_samples crops of a case "
                                               "travel in the same step."),
        (lambda r, c: steps(r, c, per="case"), "that is one step per case: a batch holds batch_size cases, so an "
                                               "epoch has (training cases / batch_size, rounded up) steps."),
        (lambda r, c: steps(r, c) // r.epochs, "that is one epoch's steps; training runs recipe.epochs epochs."),
    ]
    given = [_number(_returned(answer(recipe, cases), "my_training_steps(...)"), "a whole number of steps")
             for recipe, cases in inputs]
    expected = [steps(recipe, cases) for recipe, cases in inputs]
    if given == expected:
        recipe, cases = inputs[0]
        per_epoch = expected[0] // recipe.epochs
        return (f"quick with batch_size=2 on the 12 phantoms: {recipe.epochs} epochs x {per_epoch} batches "
                f"({cases - recipe.validation_cases} training cases in batches of 2, the last one short) = "
                f"{expected[0]} steps, and right for the other recipes tried (quick itself: {expected[1]}; seed on "
                f"MSD's 41 cases: {expected[2]}). Notebook 03's metrics.jsonl counts them ('iteration').")
    for formula, hint in mistakes:
        if all(value == formula(recipe, cases) for value, (recipe, cases) in zip(given, inputs, strict=True)):
            raise Hint(hint)
    index = next(i for i, (a, b) in enumerate(zip(given, expected, strict=True)) if a != b)
    recipe, cases = inputs[index]
    raise Hint(f"for {_label(recipe, ('epochs', 'batch_size', 'validation_cases'))} and {cases} cases your function "
               f"gives {given[index]:g} steps. Steps per epoch = training cases / batch_size, rounded up; times the "
               "epochs.")


# --------------------------------------------------------------------------- 01 data
def _hidden_case(folder: Path, name: str, shape: Sequence[int], spacing: Sequence[float], flip: bool,
                 spleen: tuple[slice, ...], values: tuple[float, float] = (40.0, 120.0),
                 seed: int = 0) -> dict[str, str]:
    """A small case the student never saw, written as NIfTI: a body of random HU with a block of spleen.

    ``flip`` stores the first two axes as L and P (negative affine diagonal, as DICOM-ordered files are), so that
    reading the voxel size off the affine's diagonal gives negative numbers.
    """
    import nibabel as nib

    generator = np.random.default_rng(seed)
    image = generator.normal(values[0], 30.0, size=tuple(shape)).astype(np.int16)
    label = np.zeros(tuple(shape), np.uint8)
    label[spleen] = 1
    image[label > 0] = generator.normal(values[1], 40.0, size=int(label.sum())).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    if flip:
        affine[0, 0], affine[1, 1] = -spacing[0], -spacing[1]
    affine[:3, 3] = (120.0, -80.0, 35.0)
    paths = {}
    for key, array in (("image", image), ("label", label)):
        paths[key] = str(folder / f"{name}_{key}.nii.gz")
        nib.save(nib.Nifti1Image(array, affine), paths[key])
    return paths


def _cases_to_try(items: Sequence[dict[str, str]], folder: Path) -> list[tuple[str, dict[str, str]]]:
    """(name, item) of the dataset's first and last case and of two small cases written for the check."""
    chosen = list(dict.fromkeys([0, len(items) - 1])) if items else []
    cases = [(Path(items[i]["image"]).name, dict(items[i])) for i in chosen]
    cases.append(("a small case with 0.7 x 0.9 x 2.5 mm voxels stored L-P-S",
                  _hidden_case(folder, "hidden_1", (20, 18, 7), (0.7, 0.9, 2.5), True, np.s_[4:12, 5:11, 2:5])))
    cases.append(("a small case with 2 x 2 x 3 mm voxels",
                  _hidden_case(folder, "hidden_2", (16, 16, 16), (2.0, 2.0, 3.0), False, np.s_[3:13, 3:13, 3:13],
                               seed=1)))
    return cases


@exercise("01-load-case", "load a case with MONAI",
          "Define my_describe_case(item) -> {'shape': ..., 'spacing': ...}: load item with LoadImaged and "
          "EnsureChannelFirstd, give the image's shape and its voxel size in mm (image.pixdim).", kind="function")
def _load_case(answer: Any, items: Sequence[dict[str, str]] = ()) -> str:
    import tempfile

    _function(answer, "my_describe_case(item)")
    with tempfile.TemporaryDirectory() as folder:
        for name, item in _cases_to_try(items, Path(folder)):
            header = read_nifti(item["image"])
            shape = (1, *header.shape[:3])
            spacing = np.asarray(header.header.get_zooms()[:3], dtype=float)
            found = _returned(answer(dict(item)), "my_describe_case(item)")
            if not isinstance(found, dict) or not {"shape", "spacing"} <= set(found):
                raise Hint(f"return a dict with the keys 'shape' and 'spacing', not {_short(found)}")
            try:
                given_shape = tuple(int(n) for n in found["shape"])
            except (TypeError, ValueError) as error:
                raise Hint(f"'shape' should be the image's shape, a tuple of whole numbers, not "
                           f"{_short(found['shape'])}") from error
            given_spacing = _numbers(found["spacing"], 3, "'spacing'")
            if given_shape == shape[1:]:
                raise Hint(f"{name}: shape {given_shape} has no channel axis; EnsureChannelFirstd makes it "
                           f"{shape}, the (channel, x, y, z) a network takes.")
            if given_shape != shape:
                raise Hint(f"{name}: shape {given_shape}, expected {shape} (the file holds {shape[1:]} voxels; "
                           "EnsureChannelFirstd puts the channel first).")
            if np.allclose(given_spacing, 1.0) and not np.allclose(spacing, 1.0):
                raise Hint(f"{name}: (1, 1, 1) is no voxel size of this file; LoadImaged keeps it in the MetaTensor: "
                           "image.pixdim.")
            if np.any(given_spacing < 0):
                raise Hint(f"{name}: a negative voxel size: the affine's diagonal is negative where an axis runs to "
                           "the left or the back (and mixes sizes when axes are swapped); image.pixdim gives "
                           "the sizes.")
            if not np.allclose(given_spacing, spacing, rtol=1e-4):
                raise Hint(f"{name}: spacing {tuple(np.round(given_spacing, 3))}, expected "
                           f"{tuple(np.round(spacing, 3))} mm: read it from the loaded image (image.pixdim).")
    return ("shape and voxel size right on the cases tried (two of the dataset's, two written for the check, one "
            "stored L-P-S): LoadImaged gives MetaTensors that carry the affine (image.affine) and the voxel size "
            "(image.pixdim); EnsureChannelFirstd adds the channel axis the network needs.")


@exercise("01-volume", "spleen volume",
          "Define my_spleen_ml(item) -> the spleen's volume in mL: load item['label'] with MONAI, count its voxels, "
          "multiply by one voxel's volume in mm³ (the product of label.pixdim), divide by 1000.", kind="function")
def _spleen_volume(answer: Any, items: Sequence[dict[str, str]] = ()) -> str:
    import tempfile

    _function(answer, "my_spleen_ml(item)")
    volumes = []
    with tempfile.TemporaryDirectory() as folder:
        for name, item in _cases_to_try(items, Path(folder)):
            label = read_nifti(item["label"])
            voxels = int((np.asanyarray(label.dataobj) > 0).sum())
            expected = voxels * float(np.prod(label.header.get_zooms()[:3])) / 1000
            value = _number(_returned(answer(dict(item)), "my_spleen_ml(item)"), "a volume in mL")
            volumes.append((name, expected))
            if _close(value, expected, relative=0.005):
                continue
            if _close(value, expected * 1000, relative=0.005):
                raise Hint(f"{name}: {value:.0f} is in mm³: 1 mL = 1000 mm³.")
            if _close(value, voxels, relative=0.005):
                raise Hint(f"{name}: that is the number of voxels; multiply by one voxel's volume (the product of "
                           "the three sizes).")
            if _close(value, -expected, relative=0.005):
                raise Hint(f"{name}: a negative volume: the affine's diagonal is negative where an axis runs to the "
                           "left or the back; the voxel sizes are label.pixdim.")
            raise Hint(f"{name}: {value:.1f} mL, expected {expected:.1f}. Count the voxels, multiply by one voxel's "
                       "volume in mm³ (the product of the three sizes), then divide by 1000.")
    shown = "; ".join(f"{name}: {ml:.1f} mL" for name, ml in volumes[:len(volumes) - 2]) or "the cases tried"
    return (f"{shown} (and the two small cases written for the check). A typical adult spleen holds 100-400 mL; "
            "the phantoms range wider on purpose.")


def window_shares(image: Any, mask: Any, window: Sequence[float]) -> dict[str, float]:
    """The spleen's median HU, and the shares of its voxels the window sets to 0 (at or below its low end) and to
    1 (at or above its high end), as ``ScaleIntensityRanged(..., clip=True)`` does: what 01's window lesson says."""
    values = np.asarray(image, dtype=float)[_mask(mask)]
    low, high = float(window[0]), float(window[1])
    return {"median_hu": float(np.median(values)), "below": float(np.mean(values <= low)),
            "above": float(np.mean(values >= high))}


@exercise("01-window", "what the window does to the spleen",
          "Define my_window_stats(item, window) -> {'median_hu': ..., 'below': ..., 'above': ...}: load the case, "
          "ScaleIntensityRanged(keys='image', a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True), then the "
          "shares of the spleen's voxels at 0 and at 1.", kind="function")
def _window_stats(answer: Any, items: Sequence[dict[str, str]], window: Sequence[float], shown: int = 0) -> str:
    _function(answer, "my_window_stats(item, window)")
    if not items:
        raise Skip("this dataset has no labelled case")

    def shares(item: dict[str, str]) -> dict[str, float]:
        image = np.asanyarray(read_nifti(item["image"]).dataobj)
        label = np.asanyarray(read_nifti(item["label"]).dataobj)
        found = window_shares(image, label, window)
        found["at_high"] = float(np.mean(image[_mask(label)] == float(window[1])))  # what clip=False leaves at 1
        return found

    shown = min(max(int(shown), 0), len(items) - 1)
    chosen = {shown: shares(items[shown])}
    if len(items) <= 12:  # find the brightest spleen too (a few seconds on the phantoms; not on 41 full CTs)
        everything = {index: chosen.get(index) or shares(item) for index, item in enumerate(items)}
        brightest = max(everything, key=lambda index: everything[index]["above"])
        chosen[brightest] = everything[brightest]
    low, high = float(window[0]), float(window[1])
    sentences = []
    for index, expected in chosen.items():
        name = Path(items[index]["image"]).name
        found = _returned(answer(dict(items[index]), tuple(window)), "my_window_stats(item, window)")
        if not isinstance(found, dict) or not {"median_hu", "below", "above"} <= set(found):
            raise Hint(f"return a dict with the keys 'median_hu', 'below' and 'above', not {_short(found)}")
        median, below, above = (_number(found[key], f"'{key}', a number") for key in ("median_hu", "below", "above"))
        if not _close(median, expected["median_hu"], absolute=2.0):
            raise Hint(f"{name}: median {median:.0f} HU, expected {expected['median_hu']:.0f}: the median of the "
                       "spleen's voxels only (image[label > 0]), in HU, before the window.")
        for key, value in (("below", below), ("above", above)):
            if _close(value, expected[key], absolute=0.005):
                continue
            if _close(value, 100 * expected[key], absolute=0.5) and expected[key] > 0.01:
                raise Hint(f"{name}: '{key}' looks like a percentage; give a fraction between 0 and 1.")
            other = "above" if key == "below" else "below"
            if _close(value, expected[other], absolute=0.005):
                raise Hint(f"{name}: 'below' and 'above' are swapped: below the window's low end ({low:g} HU) "
                           "becomes 0, above its high end 1.")
            if key == "above" and _close(value, expected["at_high"], absolute=0.005) and expected["above"] > 0.01:
                raise Hint(f"{name}: no spleen voxel at 1? Without clip=True, ScaleIntensityRanged lets values above "
                           "the window run past 1 instead of setting them to 1.")
            raise Hint(f"{name}: '{key}' is {value:.3f}, expected {expected[key]:.3f}: the share of the spleen's "
                       f"voxels that the window sets to {0 if key == 'below' else 1}.")
        inside = 1.0 - expected["below"] - expected["above"]
        if expected["above"] < 0.05:
            sentences.append(f"{name}: median {expected['median_hu']:.0f} HU, {inside:.1%} of the spleen inside "
                             f"{low:g}..{high:g} HU: the window keeps it, with its full contrast")
        else:
            sentences.append(f"{name} is unusually bright: its spleen's median is {expected['median_hu']:.0f} HU "
                             f"(a real one is about 40-60 HU without contrast, 100-140 HU in the portal-venous phase), "
                             f"and the window sets {expected['above']:.0%} of it to 1, the same flat white as bone")
    return "; ".join(sentences) + "."


# --------------------------------------------------------------------------- 02 preprocessing
@exercise("02-resampled-shape", "predict the resampled shape",
          "Set my_shape to three whole numbers: each axis' size x its voxel size / the recipe's voxel size.")
def _resampled_shape(answer: Any, image: str | os.PathLike[str], preset: Preset | str) -> str:
    from monai.transforms import Compose

    preset = get_preset(preset)
    header = read_nifti(image).header
    stored_shape, stored_spacing = header.get_data_shape()[:3], header.get_zooms()[:3]
    given = [int(round(float(n))) for n in _numbers(answer, 3, "my_shape")]
    resampled = Compose(deterministic_transforms(preset, keys=("image",))[:4])({"image": str(image)})["image"]
    expected = [int(n) for n in resampled.shape[1:]]
    # Orientationd may have permuted the axes: compare the sizes, allowing Spacingd's rounding
    if all(abs(a - b) <= 1 for a, b in zip(sorted(given), sorted(expected), strict=True)):
        return (f"Spacingd made {tuple(expected)} voxels of {tuple(preset.spacing)} mm (the extent in mm stays; only "
                "the voxel size changes; Orientationd may also have put the axes in another order).")
    if sorted(given) == sorted(int(n) for n in stored_shape):
        raise Hint("that is the shape before resampling.")
    inverted = [round(n * t / z) for n, z, t in zip(stored_shape, stored_spacing, preset.spacing, strict=False)]
    if sorted(given) == sorted(inverted):
        raise Hint("the ratio is upside down: extent in mm = size x voxel size; divide that by the new voxel size.")
    raise Hint(f"{tuple(given)}. Multiply each size by its voxel size (the extent in mm) and divide by the "
               "recipe's voxel size.")


@exercise("02-chain", "write the tutorial's training chain",
          "Set my_chain to a monai.transforms.Compose of the tutorial preset's training transforms.", kind="object")
def _chain(answer: Any, preset: Preset | str) -> str:
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
                f"{positive}/{positive + negative}, independently, so that share of spleen-centred crops holds only on "
                "average. (A background-centred crop can still hold spleen near its edge.)")
    if value == 0:
        raise Hint("the centres are drawn one by one, independently: nothing forces a share of them onto spleen.")
    if _close(value, (1 - background) ** crops, relative=0.02) and positive != negative:
        raise Hint("that is the chance that every centre is on spleen; the question is that none is: neg / (pos + "
                   "neg) for each.")
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
def _records(*rows: tuple[float, float | None]) -> list[dict[str, Any]]:
    """metrics.jsonl records (epoch, loss, val_dice, ...) from (loss, val_dice) pairs, epochs counted from 1."""
    return [{"epoch": epoch, "iteration": 9 * epoch, "loss": loss, "val_dice": dice, "lr": 1e-3, "seconds": 2.0}
            for epoch, (loss, dice) in enumerate(rows, start=1)]


@exercise("03-best-epoch", "the best epoch",
          "Define my_best_epoch(records) -> the 'epoch' of the record with the highest val_dice, skipping the records "
          "whose val_dice is None (epochs without validation).", kind="function")
def _best_epoch(answer: Any, metrics: Sequence[dict[str, Any]] = ()) -> str:
    _function(answer, "my_best_epoch(records)")
    trials = {"a run whose last epoch has the lowest loss but not the best Dice":
              _records((0.9, 0.2), (0.7, None), (0.6, 0.8), (0.5, 0.7)),
              "a run validated every other epoch": _records((0.9, None), (0.8, 0.62), (0.85, None), (0.5, 0.55),
                                                            (0.75, None), (0.6, 0.58))}
    if any(row.get("val_dice") is not None for row in metrics):
        trials["this notebook's run"] = [dict(row) for row in metrics]
    for what, records in trials.items():
        validated = [row for row in records if row.get("val_dice") is not None]
        best = max(validated, key=lambda row: row["val_dice"])
        found = _returned(answer([dict(row) for row in records]), "my_best_epoch(records)")
        if isinstance(found, dict):
            raise Hint(f"{what}: your function returns the whole record; return its 'epoch'.")
        value = _number(found, "an epoch number")
        if value == best["epoch"]:
            continue
        if not float(value).is_integer() or value < 1:
            raise Hint(f"{what}: {value:g} looks like a Dice or a loss; return the epoch it belongs to (row['epoch']).")
        if int(value) == records.index(best):
            raise Hint(f"{what}: {int(value)} is the record's position in the list; return its 'epoch' (counted "
                       "from 1).")
        if int(value) == int(records[-1]["epoch"]):
            raise Hint(f"{what}: the last epoch is not always the best one: compare the val_dice of every validated "
                       "epoch.")
        if int(value) == int(min(records, key=lambda row: row["loss"])["epoch"]):
            raise Hint(f"{what}: that is the lowest training loss; model.pt is chosen by the validation Dice.")
        raise Hint(f"{what}: epoch {int(value)} is not the best (epoch {best['epoch']}, Dice {best['val_dice']}). Skip "
                   "the records whose val_dice is None, then take the record with the largest val_dice.")
    if "this notebook's run" in trials:
        validated = [row for row in metrics if row.get("val_dice") is not None]
        best = max(validated, key=lambda row: row["val_dice"])
        return (f"epoch {best['epoch']} of this run, validation Dice {best['val_dice']:.4f}: the epoch whose weights "
                "model.pt holds (later epochs go on training but did not validate better); and right on the runs "
                "made up for the check.")
    return "the best epoch of every run tried, epochs without validation skipped."


def _tiny_batch(seed: int = 0, side: int = 16) -> tuple[Any, Any]:
    """A fixed small batch for the 03 checkers: two random images, one label with a cube of spleen, one empty."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 1, side, side, side, generator=generator)
    labels = torch.zeros(2, 1, side, side, side)
    labels[0, :, side // 4:side // 2, side // 4:side // 2, side // 4:side // 2] = 1.0
    return images, labels


@exercise("03-network", "write the bundle's UNet",
          "Set my_network = UNet(spatial_dims=3, in_channels=..., ...) from monai.networks.nets.", kind="object")
def _network(answer: Any, preset: Preset | str) -> str:
    import torch

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
          "Set my_loss = DiceCELoss(...) from monai.losses with the bundle's settings.", kind="object")
def _loss(answer: Any, preset: Preset | str) -> str:
    import torch

    if not callable(answer):
        raise Hint(f"expected a loss object such as monai.losses.DiceCELoss(...), got {_short(answer)}")
    reference = make_loss(preset)
    settings = compare_objects(answer, reference, "the loss")
    if not settings:
        raise Hint(f"{settings.difference}. The table of section 4 (The loss) gives each argument's value.")
    images, labels = _tiny_batch()
    logits = torch.cat([images, 1 - images], dim=1) * 4
    value, expected = float(answer(logits, labels)), float(reference(logits, labels))
    same = compare_numbers([value], [expected], what="loss")
    if not same:
        raise Hint(f"the settings match but the {same.difference} on a fixed batch; did you pass the logits and the "
                   "label (not one-hot)?")
    return f"the bundle's DiceCELoss: every setting, and {value:.4f} on a fixed batch with an empty crop."


def _tiny_training(preset: Preset | str) -> tuple[Any, Any, Any, Any, Any]:
    """A small UNet with the preset's normalisation, loss and optimiser, and a fixed batch, from a fixed start:
    what the step exercise runs a student's step on (the step is checked, not the network: a second, not a minute)."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                   num_res_units=1, norm=get_preset(preset).norm)
    inputs, labels = _tiny_batch()
    return network, inputs, labels, make_loss(preset), make_optimizer(preset, network.parameters())


def _spy_scaler() -> Any:
    """A gradient scaler that records how a step uses it: ``calls`` (scale, step, update, in order) and
    ``backward_through_scale`` (the backward pass ran through the tensor ``scale`` returned). It scales by 1,
    exactly, so that a float32 step gives the same numbers as with the kit's (disabled) scaler on a CPU."""
    import torch

    class SpyScaler(torch.amp.GradScaler):
        def __init__(self) -> None:
            super().__init__("cpu", enabled=False)
            self.calls: list[str] = []
            self.backward_through_scale = False

        def scale(self, outputs: Any) -> Any:
            self.calls.append("scale")
            scaled = outputs * 1.0  # a new tensor: a backward pass that reaches the loss through it is seen
            if getattr(scaled, "requires_grad", False):
                scaled.register_hook(self._seen)
            return scaled

        def _seen(self, gradient: Any) -> None:
            self.backward_through_scale = True

        def step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls.append("step")
            return super().step(optimizer, *args, **kwargs)

        def update(self, new_scale: Any = None) -> None:
            self.calls.append("update")
            super().update(new_scale)

    return SpyScaler()


def reference_training_losses(preset: Preset | str = "seed", steps: int = 4,
                              step: Callable[..., Any] | None = None) -> list[float]:
    """The losses of ``steps`` float32 training steps with the preset's loss and optimiser on a fixed small
    batch and a small UNet, each made by ``step(network, inputs, labels, loss_function, optimizer, scaler,
    precision)`` (the kit's :func:`~spleenkit.training.mixed_precision_step` when None): what the step exercise
    compares. A given step gets a scaler that scales by exactly 1 (:func:`_spy_scaler`)."""
    import torch

    device = torch.device("cpu")
    precision = choose_precision(device, False, purpose="the exercise")  # float32: the same numbers everywhere
    network, inputs, labels, loss_function, optimizer = _tiny_training(preset)
    scaler = grad_scaler(device, False) if step is None else _spy_scaler()
    losses = []
    for _ in range(steps):
        if step is None:
            losses.append(float(mixed_precision_step(network, inputs, labels, loss_function, optimizer, scaler,
                                                     device, False)[1]))
        else:
            losses.append(_number(_returned(step(network, inputs, labels, loss_function, optimizer, scaler, precision),
                                            "my_training_step(...)"), "the loss as a number"))
    return losses


def _probe_step(step: Callable[..., Any], preset: Preset | str, dtype: Any) -> dict[str, Any]:
    """Run one step of a student's ``step`` with ``precision.dtype`` = ``dtype`` and say what it did: the dtype of
    each forward pass's output (bfloat16 under CPU autocast), the scaler's calls, whether the backward pass went
    through the scaled loss, and how often the optimiser stepped."""
    network, inputs, labels, loss_function, optimizer = _tiny_training(preset)
    outputs: list[Any] = []
    network.register_forward_hook(lambda module, args, output: outputs.append(getattr(output, "dtype", None)))
    steps = [0]
    optimizer.register_step_post_hook(lambda *args: steps.__setitem__(0, steps[0] + 1))
    scaler = _spy_scaler()
    name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    precision = Precision(dtype, f"{name}: chosen by the check", "the check")
    _returned(step(network, inputs, labels, loss_function, optimizer, scaler, precision), "my_training_step(...)")
    return {"outputs": outputs, "calls": scaler.calls, "backward_through_scale": scaler.backward_through_scale,
            "optimizer_steps": steps[0]}


@exercise("03-train-step", "write the training step",
          "Define my_training_step(network, inputs, labels, loss_function, optimizer, scaler, precision) -> the loss "
          "as a number: zero the gradients, forward under torch.autocast with precision.dtype, loss, "
          "scaler.scale(loss).backward(), scaler.step(optimizer), scaler.update().", kind="function")
def _train_step(answer: Any, preset: Preset | str, steps: int = 4) -> str:
    import torch

    _function(answer, "my_training_step(network, inputs, labels, loss_function, optimizer, scaler, precision)")
    autocast = ("Run network(inputs) inside `with torch.autocast` for inputs.device.type, with dtype=precision.dtype "
                "and enabled=precision.dtype is not None")
    for dtype in (torch.bfloat16, None):
        probe = _probe_step(answer, preset, dtype)
        name = "float32" if dtype is None else "bfloat16"
        if not probe["outputs"]:
            raise Hint("the step never ran the network forward: logits = network(inputs).")
        seen = {str(output).removeprefix("torch.") for output in probe["outputs"]}
        if dtype is not None and seen != {name}:
            raise Hint(f"with precision.dtype = torch.bfloat16 the network's output was {', '.join(sorted(seen))}: "
                       f"the forward ran without that autocast. {autocast}.")
        if dtype is None and seen != {"float32"}:
            raise Hint(f"with precision.dtype = None (float32) the network's output was {', '.join(sorted(seen))}: "
                       "autocast was on anyway. Turn it on only when there is a dtype: "
                       "enabled=precision.dtype is not None.")
        calls, optimizer_steps = probe["calls"], probe["optimizer_steps"]
        if "scale" not in calls:
            raise Hint("the loss never went through the gradient scaler: scaler.scale(loss).backward() (with "
                       "float16 on a GPU, small gradients would round to 0 without it).")
        if not probe["backward_through_scale"]:
            raise Hint("scaler.scale(loss) was called, but the backward pass ran on the unscaled loss: "
                       "scaler.scale(loss).backward().")
        if optimizer_steps == 0:
            raise Hint("the optimiser never stepped: scaler.step(optimizer) (it unscales the gradients first and "
                       "skips a step whose gradients overflowed).")
        if optimizer_steps > 1:
            raise Hint(f"the optimiser stepped {optimizer_steps} times in one training step: scaler.step(optimizer) "
                       "steps it; do not call optimizer.step() as well.")
        if "step" not in calls:
            raise Hint("optimizer.step() bypasses the scaler: step through it, scaler.step(optimizer), which "
                       "unscales the gradients first and skips a step whose gradients overflowed.")
        if "update" not in calls or calls.index("update") < calls.index("step"):
            raise Hint("scaler.update() belongs after scaler.step(optimizer): it adapts the scale for the next step.")
    losses = reference_training_losses(preset, steps, answer)
    expected = reference_training_losses(preset, steps)
    same = compare_numbers(losses, expected, relative=1e-6, absolute=1e-7, what="loss")  # float32, one machine
    if same:
        return (f"with precision.dtype bfloat16 your forward ran under bfloat16 autocast, with None in float32; the "
                "backward went through scaler.scale, scaler.step stepped the optimiser once and scaler.update "
                f"followed; and {steps} float32 steps give the kit's losses "
                f"({', '.join(f'{v:.4f}' for v in losses)}). On a GPU precision.dtype is float16 and the scaler "
                "scales for real.")
    if len(set(round(v, 6) for v in losses)) == 1:
        raise Hint("the loss never changes: the weights are not updated (scaler.step(optimizer), then "
                   "scaler.update()).")
    if _close(losses[0], expected[0], relative=1e-4) and _close(losses[1], expected[1], relative=1e-4):
        raise Hint(f"{same.difference}: the first steps agree, then yours drift: are the gradients cleared "
                   "(optimizer.zero_grad) before each backward pass?")
    if not _close(losses[0], expected[0], relative=1e-4):
        raise Hint(f"{same.difference} already at the first step: the loss of the network's output (logits) and "
                   "the labels, as loss_function(logits.float(), labels).")
    raise Hint(f"{same.difference}. Compare your step with the order the task gives: zero the gradients, forward "
               "under autocast, loss, scaled backward, scaler.step, scaler.update.")


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


@exercise("04-partition", "each process's share of the cached cases",
          "Set my_shares to partition_dataset(data=..., num_partitions=..., shuffle=..., seed=..., "
          "even_divisible=...).", kind="object")
def _partition(answer: Any, cases: Sequence[str], processes: int, seed: int, per_rank: int | None = None) -> str:
    from types import SimpleNamespace

    names = list(cases)
    expected = [shard(names, SimpleNamespace(world_size=processes, rank=rank), even_divisible=True, shuffle=True,
                      seed=seed) for rank in range(processes)]
    if isinstance(answer, (str, bytes)) or not hasattr(answer, "__iter__"):
        raise Hint(f"expected one list of cases per process, got {_short(answer)}")
    given = list(answer)
    if given and all(isinstance(share, str) for share in given):
        raise Hint(f"that is one list of {len(given)} case names: give one list per process, {processes} lists "
                   "(partition_dataset returns them).")
    try:
        given = [list(share) for share in given]
    except TypeError as error:
        raise Hint(f"expected one list of cases per process, got {_short(answer)}") from error
    if len(given) != processes:
        raise Hint(f"{len(given)} share(s) for {processes} processes: num_partitions is the number of processes.")
    found = compare_objects(given, expected, "the shares")
    if found:
        share = len(expected[0])
        padding = share * processes - len(names)
        twice = "one case is" if padding == 1 else f"{padding} cases are"
        dealt = ("they split evenly, so no case is dealt twice" if padding == 0 else
                 f"they do not split evenly, so {twice} dealt twice")
        return (f"{processes} shares of {share} cases each"
                + ("" if per_rank is None else f" (the manifest says {per_rank} per rank)")
                + f": the kit's own call. {len(names)} cases for {processes} processes: {dealt}, so that every "
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
          "even_divisible=...).", kind="object")
def _train_sampler(answer: Any, dataset: Sequence[Any], processes: int, rank: int, seed: int) -> str:
    from monai.data import DistributedSampler

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


def simulate_all_reduce(function: Callable[[Any], Any], shares: Sequence[Sequence[float]],
                        timeout_s: float = 5.0) -> list[Any]:
    """Call ``function(local_values)`` once per simulated process, each in its own thread, with
    ``torch.distributed.all_reduce`` (and ``get_rank``, ``get_world_size``, ``is_initialized``) standing in for a
    process group: an all-reduce waits for every rank, then leaves each rank's tensor holding the reduction (sum,
    max, min or product) over the ranks, in place, as gloo does. Returns each rank's result in rank order; the
    first exception a rank raised is raised again (with the student's traceback). A rank that never joins an
    all-reduce the others wait in ends the simulation with an error saying so instead of hanging."""
    import threading

    import torch
    import torch.distributed as dist

    world = len(shares)
    barrier = threading.Barrier(world, timeout=timeout_s)
    slots: list[Any] = [None] * world
    reduced: list[Any] = [None]
    local = threading.local()
    operations = {dist.ReduceOp.SUM: lambda t: t.sum(0), dist.ReduceOp.MAX: lambda t: t.max(0).values,
                  dist.ReduceOp.MIN: lambda t: t.min(0).values, dist.ReduceOp.PRODUCT: lambda t: t.prod(0)}

    def all_reduce(tensor: Any, op: Any = dist.ReduceOp.SUM, group: Any = None, async_op: bool = False) -> None:
        rank = local.rank
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"all_reduce takes a torch.Tensor, not {type(tensor).__name__}")
        if op not in operations:
            raise RuntimeError(f"all_reduce: {op} is not supported by the gloo backend of CPU processes; sum, then "
                               "divide")
        slots[rank] = tensor.detach().clone()
        barrier.wait()
        if rank == 0:
            shapes = {tuple(slot.shape) for slot in slots}
            if len(shapes) > 1:
                reduced[0] = RuntimeError(f"all_reduce: the ranks passed tensors of different shapes {sorted(shapes)}: "
                                          "every process must reduce a tensor of the same shape")
            else:
                reduced[0] = operations[op](torch.stack([slot.to(tensor.dtype) for slot in slots]))
        barrier.wait()
        result = reduced[0]
        barrier.wait()  # every rank has read the result before a next all-reduce overwrites it
        if isinstance(result, Exception):
            raise result
        tensor.copy_(result)

    results: list[Any] = [None] * world
    errors: list[BaseException | None] = [None] * world

    def run(rank: int) -> None:
        local.rank = rank
        try:
            results[rank] = function(torch.tensor(list(shares[rank]), dtype=torch.float32))
        except threading.BrokenBarrierError:
            errors[rank] = None  # another rank failed or never came: reported below
        except Exception as error:  # noqa: BLE001 - handed to the caller
            errors[rank] = error
            barrier.abort()

    stand_ins = {"all_reduce": all_reduce, "get_rank": lambda group=None: local.rank,
                 "get_world_size": lambda group=None: world, "is_initialized": lambda: True}
    saved = {name: getattr(dist, name) for name in stand_ins}
    try:
        for name, stand_in in stand_ins.items():
            setattr(dist, name, stand_in)
        threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in range(world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(4 * timeout_s)
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
    failure = next((error for error in errors if error is not None), None)
    if failure is not None:
        raise failure
    if barrier.broken:
        raise Hint(f"with {world} processes, not every rank joined the all-reduce, so the others would wait forever: "
                   "every process must call torch.distributed.all_reduce the same number of times, even one with no "
                   "cases.")
    return results


@exercise("04-global-dice", "the mean Dice over every process",
          "Define my_global_mean_dice(local_dice) -> the mean Dice over every process's cases: all-reduce the sum "
          "of local_dice and the number of cases with torch.distributed.all_reduce, then divide.", kind="function")
def _global_dice(answer: Any) -> str:
    _function(answer, "my_global_mean_dice(local_dice)")
    trials = {"2 processes scoring 2 and 1 of 3 validation cases": [[0.9, 0.7], [0.4]],
              "4 processes scoring 3 cases, one of them none": [[0.8], [0.6], [0.5], []],
              "one process": [[0.5, 0.7, 0.6]]}
    for what, shares in trials.items():
        everything = [value for share in shares for value in share]
        expected = sum(everything) / len(everything)
        results = simulate_all_reduce(answer, shares)
        values = [_number(_returned(result, "my_global_mean_dice(local_dice)"), "a mean Dice") for result in results]
        if all(_close(value, expected, absolute=1e-5) for value in values):
            continue
        local_means = [sum(share) / len(share) if share else float("nan") for share in shares]
        if all(_close(value, mean, absolute=1e-5) for value, mean in zip(values, local_means, strict=True)
               if math.isfinite(mean)) and len(shares) > 1:
            raise Hint(f"{what}: each process returned the mean of its own cases; the mean over all of them needs "
                       "every process's numbers: torch.distributed.all_reduce sums a tensor over the processes.")
        if any(math.isfinite(mean) for mean in local_means) and all(
                _close(value, float(np.nanmean(local_means)), absolute=1e-5) for value in values):
            raise Hint(f"{what}: that is the mean of the processes' means, which weighs a process with one case as "
                       "much as one with two: all-reduce the sum of the Dice and the number of cases, then divide.")
        if all(_close(value, sum(everything) / len(shares), absolute=1e-5) for value in values):
            raise Hint(f"{what}: divide by the number of cases (all-reduced too), not by the number of processes.")
        if len({round(value, 6) for value in values}) > 1:
            raise Hint(f"{what}: the processes returned different numbers ({', '.join(f'{v:.4f}' for v in values)}); "
                       "after an all-reduce every process holds the same sums.")
        raise Hint(f"{what}: your function returns {values[0]:.4f}, expected {expected:.4f} (the mean over "
                   f"{len(everything)} cases).")
    return ("every process returns the mean over all the cases (2 processes with 2 and 1 cases: 0.6667, where the "
            "mean of their means would be 0.6000; 4 processes, one without a case: 0.6333). MONAI's metric objects "
            "count every case once under torchrun too: aggregate() first gathers every process's values "
            "(evenly_divisible_all_gather).")


# --------------------------------------------------------------------------- 05 evaluation
@exercise("05-metric-means", "score every case with MONAI's metric objects",
          "Define my_metric_means(prediction_files, label_files) -> (mean Dice, mean HD95 in mm): one DiceMetric and "
          "one HausdorffDistanceMetric, called once per case on one-hot (batch, class, x, y, z) tensors, then "
          ".aggregate().", kind="function")
def _metric_means(answer: Any, predictions: dict[str, Any] | None = None, cases: dict[str, Any] | None = None,
                  summary: dict[str, Any] | None = None) -> str:
    import tempfile

    _function(answer, "my_metric_means(prediction_files, label_files)")
    with tempfile.TemporaryDirectory() as folder:
        trials = {"two cases made up for the check (2 x 2 x 3 mm voxels)": _scored_cases(Path(folder))}
        if predictions and cases:
            labels = {name: case["label"] if isinstance(case, dict) else case for name, case in cases.items()}
            trials["the cases of this run"] = ([str(predictions[name]) for name in labels],
                                               [str(labels[name]) for name in labels])
        for what, (prediction_files, label_files) in trials.items():
            found = _returned(answer(list(prediction_files), list(label_files)), "my_metric_means(...)")
            try:
                dice, hd95 = (_number(value, "a number") for value in found)
            except (TypeError, ValueError) as error:
                raise Hint(f"expected two numbers (mean Dice, mean HD95 in mm), got {_short(found)}") from error
            pairs = _mask_pairs(prediction_files, label_files)
            rows = [mask_metrics(p, r, spacing) for p, r, spacing in pairs]
            expected_dice = float(np.mean([row["dice"] for row in rows]))
            expected_hd95 = float(np.mean([row["hd95_mm"] for row in rows]))
            if what == "the cases of this run" and summary:
                expected_dice = summary["original"]["dice"]["mean"]
                expected_hd95 = summary["original"]["hd95_mm"]["mean"]
            if not _close(dice, expected_dice, relative=1e-4, absolute=1e-6):
                if summary and what == "the cases of this run" and "resampled" in summary and _close(
                        dice, summary["resampled"]["dice"]["mean"], relative=1e-4):
                    raise Hint(f"{what}: that is the resampled-space mean; score the saved predictions (on the "
                               "original grid) against the label files.")
                with_background = [(_dice(p, r) + _dice(~p, ~r)) / 2 for p, r, _ in pairs]
                if _close(dice, float(np.mean(with_background)), relative=1e-4):
                    raise Hint(f"{what}: your Dice averages the background channel in (almost 1 everywhere): "
                               "DiceMetric(include_background=False).")
                raise Hint(f"{what}: mean Dice {dice:.4f}, expected {expected_dice:.4f}. Call the metric once per "
                           "case with one-hot tensors of shape (1, 2, x, y, z) (AsDiscrete(to_onehot=2), then [None]), "
                           "then aggregate().")
            if _close(hd95, expected_hd95, relative=1e-4, absolute=1e-4):
                continue
            if _close(hd95, float(np.mean([row["hd_mm"] for row in rows])), relative=1e-4):
                raise Hint(f"{what}: that is the plain Hausdorff distance (the maximum): "
                           "HausdorffDistanceMetric(percentile=95).")
            in_voxels = [mask_metrics(p, r, (1.0,) * p.ndim)["hd95_mm"] for p, r, _ in pairs]
            if None not in in_voxels and _close(hd95, float(np.mean(in_voxels)), relative=1e-4):
                raise Hint(f"{what}: that HD95 is in voxels: pass the voxel size in mm, "
                           "metric(y_pred=..., y=..., spacing=label.pixdim.tolist()).")
            raise Hint(f"{what}: mean HD95 {hd95:.2f}, expected {expected_hd95:.2f}. "
                       "HausdorffDistanceMetric(include_background=False, percentile=95), called with spacing= the "
                       "label's voxel size in mm.")
    if summary:
        original = summary["original"]
        return (f"mean Dice {original['dice']['mean']:.4f}, mean HD95 {original['hd95_mm']['mean']:.2f} mm over "
                f"{original['cases']} cases: the numbers evaluate_run wrote to summary.json, computed by MONAI's "
                "metric objects; and right on the cases made up for the check.")
    return "the mean Dice and HD95 of every set of cases tried, computed by MONAI's metric objects."


def _scored_cases(folder: Path) -> tuple[list[str], list[str]]:
    """Two (prediction, label) file pairs with 2 x 2 x 3 mm voxels: shifted predictions with a stray voxel far
    away, so that the Dice, HD95, the plain Hausdorff distance and distances in voxels all differ."""
    import nibabel as nib

    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    predictions, labels = [], []
    for index, shift in enumerate((2, 4)):
        label = np.zeros((24, 24, 16), np.uint8)
        label[5:15, 7:17, 3:9] = 1
        prediction = np.roll(label, shift, axis=1)
        prediction[21, 2, 14] = 1
        for array, paths, kind in ((prediction, predictions, "pred"), (label, labels, "label")):
            paths.append(str(folder / f"case_{index}_{kind}.nii.gz"))
            nib.save(nib.Nifti1Image(array, affine), paths[-1])
    return predictions, labels


def _dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    total = prediction.sum() + reference.sum()
    return 1.0 if total == 0 else float(2 * (prediction & reference).sum() / total)


def _mask_pairs(predictions: Sequence[Any], labels: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray, Any]]:
    """(prediction, label, the label's voxel size in mm) per pair of mask files."""
    pairs = []
    for prediction, label in zip(predictions, labels, strict=True):
        truth, image = read_binary_mask(label)
        pairs.append((read_binary_mask(prediction)[0], truth, voxel_spacing(image.affine)))
    return pairs


@exercise("05-largest-component", "post-processing with the largest component",
          "Set my_postprocess to a Compose: softmax, back onto the image's grid with Invertd, argmax, then "
          "KeepLargestConnectedComponentd.", kind="object")
def _largest_component_chain(answer: Any, preprocessing: Any) -> str:
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
          "Define my_volume_error_ml(prediction_file, label_file) -> (prediction's spleen voxels - the label's) x one "
          "voxel's volume in mm³ (the product of the label's pixdim) / 1000, both read with MONAI's LoadImage.",
          kind="function")
def _volume_error(answer: Any, prediction_file: str | os.PathLike[str] | None = None,
                  label_file: str | os.PathLike[str] | None = None) -> str:
    import tempfile

    _function(answer, "my_volume_error_ml(prediction_file, label_file)")
    with tempfile.TemporaryDirectory() as folder:
        too_much = _hidden_case(Path(folder), "more", (16, 16, 16), (2.0, 2.0, 3.0), False, np.s_[3:13, 3:13, 3:13])
        too_little = _hidden_case(Path(folder), "less", (20, 18, 7), (0.7, 0.9, 2.5), True, np.s_[4:12, 5:11, 2:5])
        pairs = {"a prediction with too much spleen (2 x 2 x 3 mm voxels)":
                 (_hidden_case(Path(folder), "more_pred", (16, 16, 16), (2.0, 2.0, 3.0), False,
                               np.s_[2:13, 3:13, 3:13])["label"], too_much["label"]),
                 "a prediction with too little (0.7 x 0.9 x 2.5 mm voxels stored L-P-S)":
                 (_hidden_case(Path(folder), "less_pred", (20, 18, 7), (0.7, 0.9, 2.5), True,
                               np.s_[5:12, 5:11, 2:5])["label"], too_little["label"])}
        if prediction_file is not None and label_file is not None:
            pairs["the worst case"] = (str(prediction_file), str(label_file))
        errors = {}
        for what, (prediction, label) in pairs.items():
            reference = read_nifti(label)
            voxel_ml = float(np.prod(reference.header.get_zooms()[:3])) / 1000
            predicted = int((np.asanyarray(read_nifti(prediction).dataobj) > 0).sum())
            labelled = int((np.asanyarray(reference.dataobj) > 0).sum())
            expected = (predicted - labelled) * voxel_ml
            value = _number(_returned(answer(prediction, label), "my_volume_error_ml(...)"), "a volume in mL")
            if _close(value, expected, relative=1e-3, absolute=0.01):
                errors[what] = expected
                continue
            if _close(value, -expected, relative=1e-3, absolute=0.01):
                if expected < 0 and any(error > 0 for error in errors.values()):  # right on too much, so abs()
                    raise Hint(f"{what}: keep the sign: too little spleen is a negative error (no abs()).")
                raise Hint(f"{what}: the sign is reversed: prediction minus reference, so too much spleen is "
                           "positive.")
            if _close(value, 1000 * expected, relative=1e-3, absolute=0.01):
                raise Hint(f"{what}: that is in mm³: 1 mL = 1000 mm³.")
            if _close(value, predicted - labelled, relative=1e-3):
                raise Hint(f"{what}: that is a number of voxels; multiply by one voxel's volume (the product of the "
                           "three zooms), divide by 1000.")
            raise Hint(f"{what}: {value:.2f} mL, expected {expected:+.2f}. Subtract the reference's voxel count from "
                       "the prediction's, multiply by one voxel's volume (the product of the three zooms), divide by "
                       "1000.")
    if prediction_file is not None and label_file is not None:
        worst = errors["the worst case"]
        return (f"the worst case holds {worst:+.2f} mL ({'too much' if worst > 0 else 'too little'} spleen in the "
                "prediction), and the files made up for the check come out right too.")
    return "the volume error of every pair of files tried, with its sign."


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


def _hidden_meta_tensor() -> Any:
    """A small channel-first MetaTensor whose first axis runs to the patient's left, with 2 x 3 x 4 mm voxels."""
    import torch
    from monai.data import MetaTensor

    affine = torch.tensor([[-2.0, 0, 0, 10], [0, 3, 0, -5], [0, 0, 4, 7], [0, 0, 0, 1]], dtype=torch.float64)
    values = torch.arange(1 * 5 * 4 * 3, dtype=torch.float32).reshape(1, 5, 4, 3)
    return MetaTensor(values, affine=affine)


@exercise("06-flip", "a flip that keeps the header true",
          "Define my_flip_left_right(image) -> the channel-first MetaTensor mirrored along its first spatial axis, "
          "with an affine that still puts every voxel where it is in the patient.", kind="function")
def _flip(answer: Any, image: str | os.PathLike[str] | None = None, mask: str | os.PathLike[str] | None = None) -> str:
    import torch

    _function(answer, "my_flip_left_right(image)")
    original = _hidden_meta_tensor()
    before = original.affine.clone()
    flipped = _returned(answer(original.clone()), "my_flip_left_right(image)")
    if not isinstance(flipped, torch.Tensor) or not hasattr(flipped, "affine"):
        raise Hint(f"your function returns {type(flipped).__name__}, which has no header: return the MetaTensor (its "
                   ".affine is the header a saved file gets).")
    if tuple(flipped.shape) != tuple(original.shape):
        raise Hint(f"shape {tuple(flipped.shape)}, expected {tuple(original.shape)}: mirror the voxels, keep the "
                   "channel axis.")
    data, affine = flipped.as_tensor().float(), torch.as_tensor(flipped.affine, dtype=torch.float64)
    mirrored = torch.flip(original.as_tensor(), dims=[1])
    if torch.equal(data, original.as_tensor()):
        if torch.allclose(affine, before):
            raise Hint("nothing changed: neither the voxels nor the affine.")
        raise Hint("the affine changed but the voxels did not: mirror the voxels along the first spatial axis too.")
    if not torch.equal(data, mirrored):
        raise Hint("the voxels were mirrored along another axis: the first spatial axis is axis 1 of a channel-first "
                   "tensor (axis 0 is the channel); MONAI's spatial_axis=0 counts the spatial axes only.")
    size = original.shape[1]
    index = torch.tensor([[i, 1.0, 2.0, 1.0] for i in range(size)], dtype=torch.float64).T
    mirrored_index = index.clone()
    mirrored_index[0] = size - 1 - index[0]
    kept = torch.allclose(affine @ index, before @ mirrored_index, atol=1e-6)
    if not kept:
        if torch.allclose(affine, before):
            raise Hint("the voxels moved but the header did not: now it lies, like the copy of section 5 (When the "
                       "header lies), and the spleen would appear on the wrong side. Which MONAI transform changes the "
                       "affine with the voxels? torch.flip does not.")
        if torch.allclose(affine[:3, :3], before[:3, :3] @ torch.diag(torch.tensor([-1.0, 1.0, 1.0],
                                                                                  dtype=torch.float64))):
            raise Hint(f"the first axis' direction flipped, but the origin did not move: the new voxel 0 is the old "
                       f"voxel {size - 1}, so the origin is where that one was.")
        raise Hint("after your flip the affine puts the voxels elsewhere in the patient than before.")
    message = ("the voxels are mirrored and the affine follows: every voxel keeps its position in mm, so a viewer "
               "shows the same patient (MONAI's Flip changes a MetaTensor's affine with its voxels; torch.flip alone "
               "changes only the voxels).")
    if image is not None and mask is not None:
        from monai.transforms import LoadImage

        load = LoadImage(ensure_channel_first=True, image_only=True)
        ct, spleen = answer(load(str(image))), answer(load(str(mask)))
        nifti = _nifti(ct)
        warnings = orientation_warnings(nifti, np.asarray(spleen[0]) > 0, name="your flipped CT")
        if warnings:
            raise Hint(f"on the real CT the kit finds the header wrong after your flip: {warnings[0]}")
        message += " On the real CT, orientation_warnings finds nothing wrong with the flipped copy."
    return message


def _nifti(volume: Any) -> Any:
    """A channel-first MetaTensor as the NIfTI image a saved file would be: its first channel and its affine."""
    import nibabel as nib

    return nib.Nifti1Image(np.asarray(volume[0]), np.asarray(volume.affine, dtype=float))


@exercise("06-sliding-window", "the sliding-window call",
          "Set my_logits: sliding_window_inference(inputs=slab[None], roi_size=..., sw_batch_size=..., "
          "predictor=network, overlap=..., mode=..., sw_device=compute_device, device=torch.device('cpu'))[0], "
          "under torch.no_grad().", kind="object")
def _sliding_window(answer: Any, image: Any, network: Any, preset: Any, device: Any = "cpu") -> str:
    import torch

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


@exercise("06-windows", "how many windows",
          "Define my_window_count(image_shape, roi_size, overlap) -> the number of windows sliding_window_inference "
          "runs: per axis the window moves by int(roi x (1 - overlap)) voxels until it reaches the end; multiply the "
          "three counts.", kind="function")
def _windows(answer: Any, image_shape: Sequence[int] = (273, 273, 113), roi_size: Sequence[int] = (96, 96, 96),
             overlap: float = 0.5) -> str:
    _function(answer, "my_window_count(image_shape, roi_size, overlap)")
    trials = [(tuple(image_shape), tuple(roi_size), overlap), ((64, 64, 64), (32, 32, 32), 0.5),
              ((70, 64, 32), (32, 32, 32), 0.5), ((100, 40, 20), (48, 48, 48), 0.25),
              ((122, 101, 112), (64, 64, 64), 0.0), ((122, 101, 112), (64, 64, 64), 0.75)]
    for shape, roi, share in trials:
        value = _number(_returned(answer(shape, roi, share), "my_window_count(...)"), "a whole number of windows")
        expected = sliding_window_count(shape, roi, share)
        if value == expected:
            continue
        steps = [max(1, int(r * (1 - share))) for r in roi]
        per_axis = [1 if n <= r else math.ceil((n - r) / s) + 1 for n, r, s in zip(shape, roi, steps, strict=True)]
        if value == math.prod(1 if n <= r else (n - r) // s + 1 for n, r, s in zip(shape, roi, steps, strict=True)):
            raise Hint(f"{shape} in windows of {roi} at overlap {share:g}: {value:g}, expected {expected}; the last "
                       "window is shifted back to end at the border, so round the count up, not down.")
        raise Hint(f"{shape} in windows of {roi} at overlap {share:g}: {value:g}, expected {expected} "
                   f"({' x '.join(map(str, per_axis))}). Along each axis the window moves by int(roi x (1 - overlap)) "
                   f"= {steps} voxels until it reaches the end; an axis not longer than the window takes one.")
    shape, roi = tuple(image_shape), tuple(roi_size)
    counts = {o: sliding_window_count(shape, roi, o) for o in sorted({0.0, 0.25, 0.5, 0.75, overlap})}
    listed = ", ".join(f"{n} at overlap {o:g}" for o, n in counts.items())
    ratio = counts[0.5] / counts[0.25]
    return (f"{shape} in windows of {roi}: {listed}; and right on every other shape tried. 0.5 runs {ratio:.2f}x the "
            f"windows of 0.25 here{'' if abs(ratio - 4) < 0.05 else ', not 4x'}: the count follows the scan's size as "
            "well as the overlap.")


# --------------------------------------------------------------------------- 07 bundle
def _innermost(error: BaseException) -> BaseException:
    """The exception at the bottom of a chain (MONAI's parser wraps the one that says what went wrong)."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
        seen.add(id(error))
    return error


@exercise("07-override", "override the bundle from Python",
          "Set my_parser: a ConfigParser that read configs/train.json, with the entries 'preset' and 'epochs' set.",
          kind="object")
def _override(answer: Any, config_file: str | os.PathLike[str], preset: str = "quick", epochs: int = 3) -> str:
    from monai.bundle import ConfigParser

    if not isinstance(answer, ConfigParser):
        raise Hint(f"expected a monai.bundle.ConfigParser, got {_short(answer)}")
    if "train#trainer" not in answer:
        raise Hint("this parser has no train#trainer: read configs/train.json with my_parser.read_config(path).")
    value = answer.get("epochs")
    if isinstance(value, str) and value[:1] not in ("$", "@", "%"):  # not an expression or a reference: plain text
        raise Hint(f"epochs is the text {value!r}: in Python set the number itself, my_parser['epochs'] = {epochs} "
                   "(on the command line the bundle parses the text for you).")
    reference = ConfigParser()
    reference.read_config(str(config_file))
    reference.update({"preset": preset, "epochs": epochs})
    try:
        recipe = answer.get_parsed_content("recipe")
        max_epochs = answer.get_parsed_content("train#trainer#max_epochs")
    except Exception as error:  # noqa: BLE001 - MONAI's parser wraps what went wrong in a RuntimeError
        cause = _innermost(error)
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise Hint(f"the bundle cannot build its recipe from your parser: {text}. Set my_parser['preset'] to "
                   f"{preset!r} and my_parser['epochs'] to {epochs}.") from error
    expected = reference.get_parsed_content("recipe")
    found = compare_objects(recipe, expected, "the recipe")
    if not found:
        raise Hint(f"{found.difference}. Set my_parser['preset'] and my_parser['epochs'], as --preset and --epochs do.")
    return (f"recipe {recipe.name!r} with {recipe.epochs} epochs, and train#trainer#max_epochs = {max_epochs}: "
            f"the same as `python -m monai.bundle run training ... --preset {preset} --epochs {epochs}`. The recipe "
            "reads train#trainer#max_epochs, which reads the top-level epochs, so an override of either reaches the "
            "schedule and the manifest too.")


@exercise("07-ignored-overrides", "overrides that would do nothing",
          "Set ignored_keys to the list of the colleague's keys that name nothing in the configs.")
def _ignored_overrides(answer: Any, config: Any, overrides: Sequence[str]) -> str:
    problems = override_problems(config, list(overrides))
    expected = sorted(key for key in overrides if any(p.startswith(f"--{key} ") for p in problems))
    if isinstance(answer, str):
        given = [answer]
    elif isinstance(answer, (list, tuple, set)):
        given = sorted(str(key) for key in answer)
    else:
        raise Hint(f"expected a list of keys, got {_short(answer)}")
    if given != expected:
        raise Hint(f"{given}. Compare each key with the ids printed in section 1 (What a bundle is); an argument of a "
                   "component (network_def#num_res_units) may be added, which is allowed.")
    return "the bundle would stop with:\n" + "\n".join(problems)


class _ShiftedOutput:
    """Builds a network whose output is ``network``'s plus a fixed shift per channel: an export check must see it."""

    @staticmethod
    def make(network: Any, shift: Sequence[float]) -> Any:
        import torch

        class Shifted(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.network = network
                self.register_buffer("shift", torch.tensor(list(shift), dtype=torch.float32))

            def forward(self, inputs: torch.Tensor) -> torch.Tensor:
                output = self.network(inputs)
                return output + self.shift.view(1, -1, *([1] * (output.ndim - 2))).to(output.dtype)

        return Shifted()


@exercise("07-export-difference", "check an export yourself",
          "Define my_export_difference(exported_file, network, patch) -> the largest absolute difference between "
          "the TorchScript file's output and the network's on patch (torch.jit.load, torch.no_grad(), .abs().max()).",
          kind="function")
def _export_difference(answer: Any, exported: str | os.PathLike[str], network: Any, patch: Any,
                       tolerance: float = 1e-4) -> str:
    import torch

    _function(answer, "my_export_difference(exported_file, network, patch)")
    with torch.no_grad():
        exported_output = torch.jit.load(str(exported))(patch)
        expected = float((exported_output - network.eval()(patch)).abs().max())
    value = _number(_returned(answer(str(exported), network, patch), "my_export_difference(...)"), "a float")
    if not _close(value, expected, absolute=1e-6, relative=1e-3):
        raise Hint(f"{value:.2e}, expected {expected:.2e}: run both models on patch under torch.no_grad(), subtract, "
                   "take .abs().max().")
    for shift in ((-0.01, 0.02), (0.01, -0.02)):
        shifted = _ShiftedOutput.make(network, shift)
        with torch.no_grad():
            wanted = float((exported_output - shifted.eval()(patch)).abs().max())
        value = _number(_returned(answer(str(exported), shifted, patch), "my_export_difference(...)"), "a float")
        if _close(value, wanted, absolute=1e-5):
            continue
        if _close(value, expected, absolute=1e-5):
            raise Hint(f"given a network whose output the check shifted by {shift} your function still gives "
                       f"{value:.2e}: it must use its arguments (exported_file, network, patch), not the notebook's "
                       "variables.")
        if value < wanted - 1e-5:
            raise Hint(f"for a network whose output the check shifted by {shift} the largest difference is "
                       f"{wanted:.3f}, yours {value:.3f}: differences can be negative; take .abs() before .max().")
        raise Hint(f"for a network whose output the check shifted by {shift} the largest difference is {wanted:.3f}, "
                   f"yours {value:.3f}.")
    verdict = "under" if expected <= tolerance else "ABOVE"
    return (f"{expected:.1e} for the export, {verdict} the tolerance {tolerance:.0e}; and 0.02 for copies whose "
            "output the check shifted by 0.01 and 0.02: your function measures what an export check must.")


# --------------------------------------------------------------------------- 08 capstone
# settings a variant may not change: they define what is measured, not how the network learns
_MEASURE_SETTINGS = {"validation_cases": "which cases the Dice is measured on",
                     "seed": "the random draws both runs share (to repeat the comparison, give both runs another seed)",
                     "validation_interval": "when the validation Dice is measured",
                     "sliding_window_overlap": "how the validation Dice is measured (the sliding window's overlap)",
                     "validation_roi_size": "how the validation Dice is measured (the sliding window's size)",
                     "spacing": "the grid the validation Dice is measured on (its voxel size)",
                     "epochs": "the budget (every run gets the same number of epochs)"}
# settings that change speed or memory only: a variant of them would learn the same
_SPEED_SETTINGS = {"amp": "the precision", "channels_last": "the memory layout", "cache_rate": "how much is cached",
                   "sliding_window_batch_size": "how many windows run at once"}


@exercise("08-variant", "a variant worth trying",
          "Set my_variant to a dict of preset settings to change, e.g. {\"learning_rate\": 3e-3}.")
def _variant(answer: Any, base: Any) -> str:
    if not isinstance(answer, dict) or not answer:
        raise Hint("expected a non-empty dict of preset settings, e.g. {'learning_rate': 3e-3}, got "
                   f"{_short(answer)}")
    base = get_preset(base)
    for key in answer:
        if not isinstance(key, str):
            raise Hint(f"the keys are the names of preset settings, as text: {key!r} is not one.")
        if key in ("name", "description", "extra"):
            raise Hint(f"{key!r} names or describes a recipe; change one of its settings (spleenkit presets lists "
                       "them).")
        if key in _MEASURE_SETTINGS:
            raise Hint(f"{key!r} changes {_MEASURE_SETTINGS[key]}, not the recipe: runs compared that way measure "
                       "different things. Change how the network learns (loss, patch, learning rate, schedule ...).")
        if key in _SPEED_SETTINGS:
            raise Hint(f"{key!r} changes {_SPEED_SETTINGS[key]}, which makes training faster or lighter, not what the "
                       "network learns: both runs would reach the same Dice. Change how the network learns.")
    try:
        variant = base.replace(**answer)  # the recipe front door: names, types and ranges
    except BadInputError as error:
        raise Hint(str(error)) from error
    except (TypeError, ValueError) as error:
        raise Hint(f"{_short(answer)}: {error}") from error
    changed = [key for key in answer if getattr(variant, key) != getattr(base, key)]
    if not changed:
        raise Hint(f"{answer} is what {base.name!r} already uses: change at least one setting.")
    if any(int(side) % 16 for side in variant.patch_size):
        raise Hint(f"patch {variant.patch_size}: each side must be a multiple of 16 (the UNet halves it four times).")
    try:  # what training builds from the recipe: a value the pieces refuse would stop the run
        checked = resolve_preset(variant)
        network = build_unet(checked)
        make_loss(checked)
        make_optimizer(checked, network.parameters())
    except Exception as error:  # noqa: BLE001 - MONAI's and torch's refusals come in many types
        cause = _innermost(error)
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise Hint(f"{', '.join(f'{key}={answer[key]!r}' for key in changed)}: training would stop: {text}") from error
    return (f"a variant of {base.name!r} that changes {', '.join(changed)}; train it with "
            "train(..., **{**budget, **my_variant}) into a new run folder and compare it with the baseline at the "
            "same budget.")


def _write_run(folder: Path, dice: Sequence[float | None]) -> Path:
    """A run folder holding only what the best-run exercise reads: metrics.jsonl, one record per epoch."""
    folder.mkdir(parents=True)
    lines = [json.dumps({"epoch": epoch, "loss": 1.0 - 0.1 * epoch, "val_dice": value, "seconds": 2.0})
             for epoch, value in enumerate(dice, start=1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _best_dice(run: str | os.PathLike[str]) -> float:
    """A run's best validation Dice (minus infinity before its first validation)."""
    return max((r["val_dice"] for r in read_metrics(run) if r.get("val_dice") is not None), default=float("-inf"))


@exercise("08-best-run", "the best run from the run folders",
          "Define my_best_run(folders) -> the name of the run folder with the highest validation Dice, read from "
          "each folder's metrics.jsonl (read_metrics); a run may not have validated yet.", kind="function")
def _best_run(answer: Any, run_dirs: Sequence[str | os.PathLike[str]] = ()) -> str:
    import tempfile

    _function(answer, "my_best_run(folders)")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        made_up = [_write_run(root / "steady", [0.2, 0.5, 0.6]), _write_run(root / "early-peak", [0.3, 0.8, 0.4]),
                   _write_run(root / "slow", [None, 0.1, 0.2]), _write_run(root / "not-validated-yet", [None, None])]
        trials = {"the runs made up for the check": made_up}
        if run_dirs:
            trials["the runs of this notebook"] = [Path(run) for run in run_dirs]
        for what, runs in trials.items():
            best = {run.name: _best_dice(run) for run in runs}
            last = {run.name: next((r["val_dice"] for r in reversed(read_metrics(run))
                                    if r.get("val_dice") is not None), float("-inf")) for run in runs}
            expected = max(best, key=best.get)
            found = _returned(answer(list(runs)), "my_best_run(folders)")
            name = Path(str(found)).name
            if name == expected:
                continue
            if name not in best:
                raise Hint(f"{what}: {_short(found)} is none of the runs given: {', '.join(best)}")
            if name == max(last, key=last.get):
                raise Hint(f"{what}: that run has the best LAST validation Dice; model.pt keeps the best epoch's "
                           "weights: compare the maximum over the epochs.")
            validated = [run for run in best if math.isfinite(best[run])]
            if validated and name == min(validated, key=best.get):
                raise Hint(f"{what}: that is the lowest Dice; Dice is higher when better.")
            raise Hint(f"{what}: {name} reaches {best[name]:.4f}, {expected} {best[expected]:.4f}: take each run's "
                       "highest val_dice (skipping None) and the run where it is highest.")
    if run_dirs:
        best = {Path(run).name: _best_dice(run) for run in run_dirs}
        winner = max(best, key=best.get)
        return (f"{winner}, best validation Dice {best[winner]:.4f} (the epoch model.pt keeps); and right on the runs "
                "made up for the check, one of them not validated yet.")
    return "the best run of every set tried, one of them not validated yet."


@exercise("08-dice-loss", "the variant's loss in MONAI",
          "Set my_loss to monai.losses.DiceLoss(...) with the arguments the kit uses for loss 'dice'.", kind="object")
def _dice_loss(answer: Any, preset: Any) -> str:
    from monai.losses import DiceLoss

    expected = make_loss(preset.replace(loss="dice"))
    if not isinstance(answer, DiceLoss):
        raise Hint(f"expected a monai.losses.DiceLoss, got {type(answer).__name__}")
    found = compare_objects(answer, expected, "DiceLoss")
    if not found:
        raise Hint(f"{found.difference}. The network gives 2 channels of logits and the label 1 channel of 0/1: "
                   "to_onehot_y=True, softmax=True; include_background as the recipe has it "
                   f"({preset.include_background}).")
    return ("the kit's DiceLoss: softmax over the 2 logit channels, the label one-hot encoded, the background in "
            "the Dice or not as the recipe says; without the cross-entropy term of DiceCELoss.")

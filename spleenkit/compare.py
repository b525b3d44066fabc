"""Prove two constructions equal: the MONAI objects a notebook builds in view against the package's.

The notebooks write the lesson's MONAI code (a transform chain, a UNet, a loss, an inferer) where
students can see and change it; the CLI and the bundle build the same objects in the package.
These functions compare the two attribute by attribute and name the first difference, so the
lesson and the tool cannot drift apart, and so an exercise can say *which* step or argument is wrong.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# attributes that hold state rather than settings: random generators, caches, bookkeeping, and what a
# transform records when it has run (``_tracing``; a reader's last ``filenames``), so that a chain that has
# already processed data still equals a fresh one
_IGNORED_ATTRIBUTES = frozenset({"R", "_rand_state", "randomize", "_do_transform", "_lazy", "_do_transform_flag",
                                 "overrides", "_seed", "centers", "_idx", "_ratios", "fg_indices", "bg_indices",
                                 "_tracing", "filenames"})
# what a random transform draws each time it runs (RandAffined's angles and zoom, RandGaussianNoised's noise,
# RandScaleIntensityd's factor, RandShiftIntensityd's offset): state in a random transform, a setting elsewhere
# (Affined's rotate_params), so it is left out only where the object is random
_DRAWN_ATTRIBUTES = frozenset({"rotate_params", "shear_params", "translate_params", "scale_params", "affine", "noise",
                               "factor", "_offset"})


@dataclass(frozen=True)
class Comparison:
    """The outcome of a comparison: ``equal``, and where they are not, the first difference in words."""

    equal: bool
    difference: str = ""

    def __bool__(self) -> bool:
        return self.equal

    def __str__(self) -> str:
        return "equal" if self.equal else self.difference


def describe(obj: Any, depth: int = 0) -> Any:
    """Every setting of ``obj`` (a transform, a loss, an inferer ...) as plain comparable data.

    Numbers, strings, sequences, arrays and nested objects become nested lists and dicts with the
    class name under ``"type"``; random states and caches are left out (they hold state, not settings).
    """
    import numpy as np

    if depth > 8:
        return "..."
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"
    if isinstance(obj, bool | int | float | str | type(None)):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [describe(item, depth + 1) for item in obj]
    if isinstance(obj, dict):
        return {str(key): describe(value, depth + 1) for key, value in obj.items()}
    if isinstance(obj, np.random.RandomState):
        return "RandomState"
    if hasattr(obj, "__array__") and not hasattr(obj, "__dict__") or _is_tensor(obj):
        return describe(np.asarray(obj).tolist(), depth + 1)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, type):
        return obj.__qualname__
    if callable(obj) and not hasattr(obj, "__dict__"):
        return getattr(obj, "__qualname__", repr(obj))
    if hasattr(obj, "__dict__"):
        if _is_module(obj):
            return {"type": type(obj).__qualname__, **_module_settings(obj, depth)}
        ignored = _IGNORED_ATTRIBUTES | (_DRAWN_ATTRIBUTES if _is_random(obj) else frozenset())
        settings = {key: describe(value, depth + 1) for key, value in vars(obj).items()
                    if key not in ignored and not key.startswith("__")}
        return {"type": type(obj).__qualname__, **settings}
    return getattr(obj, "__qualname__", repr(obj))


def _is_random(obj: Any) -> bool:
    """A MONAI random transform (a ``Randomizable``), told by its classes' names so that MONAI is not imported."""
    return any(cls.__name__ == "Randomizable" for cls in type(obj).__mro__)


def _is_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and type(obj).__name__ in {"Tensor", "Parameter"}


def _is_module(obj: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(obj, torch.nn.Module)


def _module_settings(module: Any, depth: int) -> dict[str, Any]:
    """A torch module's settings: its plain attributes and its children, not its weights or hooks."""
    settings = {key: describe(value, depth + 1) for key, value in vars(module).items()
                if not key.startswith("_") and key != "training"}
    settings.update({name: describe(child, depth + 1) for name, child in module.named_children()})
    return settings


def first_difference(written: Any, reference: Any, where: str = "") -> str | None:
    """The first place where two descriptions (see :func:`describe`) differ, in words; None when equal."""
    if isinstance(written, dict) and isinstance(reference, dict):
        if written.get("type") != reference.get("type"):
            return f"{where or 'the object'} is {written.get('type')}, expected {reference.get('type')}"
        for key in reference:
            if key not in written:
                return f"{where}.{key} is missing" if where else f"{key} is missing"
            found = first_difference(written[key], reference[key], f"{where}.{key}" if where else key)
            if found:
                return found
        extra = [key for key in written if key not in reference]
        return f"{where or 'the object'} has an unexpected setting {extra[0]!r}" if extra else None
    if isinstance(written, list) and isinstance(reference, list):
        if len(written) != len(reference):
            return f"{where or 'the value'} has {len(written)} items, expected {len(reference)}"
        for index, (a, b) in enumerate(zip(written, reference, strict=True)):
            found = first_difference(a, b, f"{where}[{index}]")
            if found:
                return found
        return None
    if isinstance(written, float) or isinstance(reference, float):
        if isinstance(written, int | float) and isinstance(reference, int | float) and not isinstance(written, bool):
            return None if math.isclose(written, reference, rel_tol=1e-9, abs_tol=1e-12) else \
                f"{where} is {written!r}, expected {reference!r}"
    if written != reference:
        return f"{where or 'the value'} is {written!r}, expected {reference!r}"
    return None


def _steps(chain: Any) -> list[Any]:
    """The transforms of a chain: a Compose's ``transforms`` or a plain sequence."""
    transforms = getattr(chain, "transforms", chain)
    return list(transforms) if isinstance(transforms, Iterable) else [transforms]


def compare_transforms(written: Any, reference: Any) -> Comparison:
    """Compare two transform chains (a ``Compose`` or a list) step by step: class, then every argument.

    The difference names the step by number and class, e.g. ``step 4 (Spacingd): pixdim is [1.5, 1.5, 1.5],
    expected [1.5, 1.5, 2.0]``.
    """
    mine, theirs = _steps(written), _steps(reference)
    for index, (a, b) in enumerate(zip(mine, theirs, strict=False), start=1):
        name, expected_name = type(a).__name__, type(b).__name__
        if name != expected_name:
            return Comparison(False, f"step {index} is {name}, expected {expected_name}")
        found = first_difference(describe(a), describe(b))
        if found:
            return Comparison(False, f"step {index} ({name}): {found}")
    if len(mine) != len(theirs):
        if len(mine) < len(theirs):
            missing = ", ".join(type(step).__name__ for step in theirs[len(mine):])
            return Comparison(False, f"the chain has {len(mine)} steps, expected {len(theirs)}: missing {missing}")
        extra = ", ".join(type(step).__name__ for step in mine[len(theirs):])
        return Comparison(False, f"the chain has {len(mine)} steps, expected {len(theirs)}: extra {extra}")
    return Comparison(True)


def compare_objects(written: Any, reference: Any, what: str | None = None) -> Comparison:
    """Compare two objects of any kind (a loss, an inferer, an optimizer's settings) setting by setting."""
    found = first_difference(describe(written), describe(reference))
    if found is None:
        return Comparison(True)
    return Comparison(False, f"{what}: {found}" if what else found)


def compare_networks(written: Any, reference: Any, *, values: bool = False) -> Comparison:
    """Compare two networks' state dicts: the same names in the same order with the same shapes
    (and, with ``values=True``, the same values); the difference names the first parameter that differs."""
    import torch

    mine, theirs = written.state_dict(), reference.state_dict()
    for (name, tensor), (expected_name, expected) in zip(mine.items(), theirs.items(), strict=False):
        if name != expected_name:
            return Comparison(False, f"parameter {name!r} where {expected_name!r} was expected")
        if tuple(tensor.shape) != tuple(expected.shape):
            return Comparison(False, f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected.shape)}")
        if values and not torch.equal(tensor, expected):
            return Comparison(False, f"{name} holds other values")
    if len(mine) != len(theirs):
        more, fewer = (mine, theirs) if len(mine) > len(theirs) else (theirs, mine)
        first = next(name for name in more if name not in fewer)
        side = "an extra" if more is mine else "a missing"
        return Comparison(False, f"{len(mine)} tensors, expected {len(theirs)}: {side} {first!r}")
    return Comparison(True)


def compare_numbers(written: Sequence[float], reference: Sequence[float], *, relative: float = 1e-5,
                    absolute: float = 1e-6, what: str = "value") -> Comparison:
    """Compare two series of numbers (losses per step, Dice per case) within a tolerance."""
    mine, theirs = [float(v) for v in written], [float(v) for v in reference]
    if len(mine) != len(theirs):
        return Comparison(False, f"{len(mine)} {what}s, expected {len(theirs)}")
    for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if not math.isclose(a, b, rel_tol=relative, abs_tol=absolute):
            return Comparison(False, f"{what} {index} is {a:.6g}, expected {b:.6g}")
    return Comparison(True)

"""Training recipes as plain, frozen data, and the one door every recipe setting comes in by.

A :class:`Preset` holds every number of the pipeline, so that the spacing, the intensity window or
the learning rate are written once. Each of its fields declares what it accepts (a :class:`Setting`
in the field's metadata: its kind, range or choices), and a Preset is checked whenever one is made,
so a bad value is refused where it enters, naming it: ``epochs=ten: expected a whole number of at
least 1``.

:func:`resolve_preset` is the door for everything that comes from outside: ``--set NAME=VALUE`` and
the flags of the command line, notebook parameters, the bundle's overrides and run manifests. Text
is read by one rule (:func:`parse_value`); a name given both as a flag and as a setting is refused.
:func:`get_preset` is the lookup with keyword overrides, through the same door.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spleenkit.errors import BadInputError

Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]

#: The largest patch side accepted (the UNet trains on crops; a whole resampled MSD image is about 340 voxels).
MAX_PATCH_SIDE = 512
TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})
NONE_WORDS = frozenset({"none", "null"})


# --------------------------------------------------------------------------- reading text
def parse_value(text: str) -> Any:
    """The one rule for a value typed as text (``--set``, notebook parameters, bundle overrides): ``none``/``null``
    is None; ``true/yes/on`` and ``false/no/off`` are booleans; JSON is read as JSON (numbers, ``[lists]``,
    ``"quoted text"``); a comma list (``2,2,2``) is a list of such values; anything else stays text. A recipe
    setting reads its text by its own kind instead (``1`` is True for ``amp``, ``4`` is (4, 4, 4) for a patch)."""
    stripped = text.strip()
    lowered = stripped.lower()
    if lowered in NONE_WORDS:
        return None
    if lowered in TRUE_WORDS - {"1"}:
        return True
    if lowered in FALSE_WORDS - {"0"}:
        return False
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        pass
    if "," in stripped:
        return [parse_value(part) for part in stripped.split(",")]
    return stripped


def shown(value: Any) -> str:
    """A value as a user would type it, for messages: ``4,4,4`` for a sequence, text as it is."""
    if isinstance(value, (list, tuple)):
        return ",".join(shown(item) for item in value)
    return str(value)


def _number_text(number: float) -> str:
    return str(int(number)) if float(number).is_integer() and abs(number) < 1e15 else f"{number:g}"


def _number(text: str) -> float:
    return float(text.strip())


def _parts(value: Any) -> list[Any]:
    """A sequence from a value: a list or tuple as it is, text split at commas (brackets allowed), else one item."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip().strip("[]()").strip()
        if not text:
            return []
        return [part for part in (text.split(",") if "," in text else text.split())]
    return [value]


# --------------------------------------------------------------------------- what a field accepts
@dataclass(frozen=True)
class Setting:
    """What one :class:`Preset` field accepts: its ``kind`` ("text", "bool", "int", "float", "choice", "ints",
    "floats", "axcodes" or "mapping"), the range of its numbers (``low``/``high``, ``open_low``/``open_high`` for
    excluded ends), its ``choices``, the ``length`` of a sequence (``min_length`` when it may vary; a single number
    stands for all of a fixed length), whether the numbers must rise (``ordered``), and a ``note`` for messages."""

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str | None, ...] = ()
    length: int | None = None
    min_length: int = 1
    ordered: bool = False
    note: str = ""

    def accepted(self) -> str:
        """What the field accepts, in words (the second half of every refusal)."""
        if self.kind == "bool":
            return "true or false (yes/no, on/off, 1/0)"
        if self.kind == "text":
            return "some text" if self.min_length else "text"
        if self.kind == "mapping":
            return "a JSON object such as {\"note\": \"...\"}"
        if self.kind == "axcodes":
            return "three letters, one of R/L, one of A/P and one of S/I (the bundle uses RAS)"
        if self.kind == "choice":
            return "one of " + ", ".join("none" if c is None else c for c in self.choices)
        whole = self.kind in ("int", "ints")
        if self.kind in ("int", "float"):
            return f"{'a whole number' if whole else 'a number'}{self._range()}"
        count = (f"{self.length} " if self.length else f"{self.min_length} or more ")
        items = f"{count}{'whole numbers' if whole else 'numbers'}{self._range()}"
        if self.ordered:
            items += ", each larger than the one before"
        if self.length and self.length > 1 and not self.ordered:
            items += f" (one number: the same for all {self.length})"
        return items

    def _range(self) -> str:
        low, high, fmt = self.low, self.high, _number_text
        if low is None and high is None:
            return ""
        if high is None:
            return f" above {fmt(low)}" if self.open_low else f" of at least {fmt(low)}"  # type: ignore[arg-type]
        if low is None:
            return f" below {fmt(high)}" if self.open_high else f" of at most {fmt(high)}"
        if not self.open_low and not self.open_high:
            return f" from {fmt(low)} to {fmt(high)}"
        below = f"below {fmt(high)}" if self.open_high else f"at most {fmt(high)}"
        above = f"above {fmt(low)}" if self.open_low else f"at least {fmt(low)}"
        return f" {above} and {below}"

    def refusal(self, name: str, value: Any) -> BadInputError:
        """``<name>=<value>: expected <what the field accepts>[; <note>]``."""
        note = f"; {self.note}" if self.note else ""
        return BadInputError(f"{name}={shown(value)}: expected {self.accepted()}{note}")

    # ----------------------------------------------------------------------- reading one value
    def read(self, name: str, value: Any) -> Any:
        """``value`` (data, or text read by this field's kind) as the field stores it; refused when it does not fit."""
        try:
            return self._read(value)
        except (TypeError, ValueError, OverflowError):
            raise self.refusal(name, value) from None

    def _read(self, value: Any) -> Any:
        kind = self.kind
        if kind == "text":
            if not isinstance(value, str) or len(value.strip()) < self.min_length:
                raise ValueError
            return value
        if kind == "mapping":
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
        if kind == "bool":
            return _boolean(value)
        if kind == "choice":
            if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
                if None in self.choices:
                    return None
                raise ValueError
            if not isinstance(value, str):
                raise ValueError
            for choice in self.choices:
                if choice is not None and choice.lower() == value.strip().lower():
                    return choice
            raise ValueError
        if kind == "axcodes":
            if not isinstance(value, str):
                raise ValueError
            codes = value.strip().upper()
            axes = sorted(next((axis for axis, pair in enumerate(("RL", "AP", "SI")) if code in pair), -1)
                          for code in codes)
            if axes != [0, 1, 2]:
                raise ValueError
            return codes
        if kind in ("int", "float"):
            return self._scalar(value)
        parts = _parts(value)
        if self.length and len(parts) == 1:
            parts = parts * self.length
        if (self.length and len(parts) != self.length) or len(parts) < self.min_length:
            raise ValueError
        numbers = tuple(self._scalar(part) for part in parts)
        if self.ordered and any(a >= b for a, b in zip(numbers, numbers[1:], strict=False)):
            raise ValueError
        return numbers

    def _scalar(self, value: Any) -> int | float:
        whole = self.kind in ("int", "ints")
        if isinstance(value, bool) or value is None:
            raise ValueError
        if isinstance(value, str):
            value = int(value.strip()) if whole and value.strip().lstrip("+-").isdigit() else _number(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError
        if whole:
            if float(value) != int(value):
                raise ValueError
            value = int(value)
        else:
            value = float(value)
        low, high = self.low, self.high
        if low is not None and (value < low or (self.open_low and value == low)):
            raise ValueError
        if high is not None and (value > high or (self.open_high and value == high)):
            raise ValueError
        return value


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
    raise ValueError


def setting(default: Any, kind: str, **accepts: Any) -> Any:
    """A :class:`Preset` field with its default and what it accepts (see :class:`Setting`)."""
    return field(default=default, metadata={"setting": Setting(kind, **accepts)})


_PATCH = {"length": 3, "low": 16, "high": MAX_PATCH_SIDE,
          "note": "the network trains on crops, at least 16 voxels a side for its four poolings (the bundle uses 96)"}
_FRACTION = {"low": 0.0, "high": 1.0}


# --------------------------------------------------------------------------- the recipe
@dataclass(frozen=True)
class Preset:
    """A complete recipe: preprocessing, network, loss, optimisation, validation and caching.

    Every field declares what it accepts; a Preset whose values do not fit (or do not fit together: strides for
    the channels, a patch that leaves instance norm one voxel) cannot be made.
    """

    name: str = field(metadata={"setting": Setting("text")})
    description: str = field(metadata={"setting": Setting("text", min_length=0)})
    # preprocessing (the bundle's deterministic chain)
    spacing: Triple = setting((1.5, 1.5, 2.0), "floats", length=3, low=0.0, high=50.0, open_low=True,
                              note="the voxel size in mm after resampling")
    intensity_range: tuple[float, float] = setting((-57.0, 164.0), "floats", length=2, min_length=2, ordered=True,
                                                   note="the HU window scaled to 0..1")
    orientation: str = setting("RAS", "axcodes")
    # True: the tutorial's chain (window, CropForegroundd on the scaled image, then orient and resample, no
    # EnsureTyped, as MONAI's spleen_segmentation_3d tutorial orders it); False: the bundle's order
    crop_foreground: bool = setting(False, "bool")
    # pad images smaller than the patch (a no-op on images that are large enough; the bundle
    # has no such step, so a small resampled image there yields crops of uneven size)
    pad_to_patch: bool = setting(True, "bool")
    # random part of the training chain
    patch_size: IntTriple = setting((96, 96, 96), "ints", **_PATCH)
    num_samples: int = setting(4, "int", low=1, high=64)
    positive: int = setting(1, "int", low=0, high=100)
    negative: int = setting(1, "int", low=0, high=100)
    # augmentation after the crops (all off in the bundle's recipes): each random transform runs with
    # this probability; rotations up to +-rotate_degrees about every axis, zoom by up to +-scale_range,
    # intensities (already in 0..1) times 1 +- intensity_scale, plus +- intensity_shift, and Gaussian
    # noise of standard deviation up to noise_std. No flips: the spleen is on the left, the back is down
    augment_probability: float = setting(0.0, "float", **_FRACTION)
    rotate_degrees: float = setting(0.0, "float", low=0.0, high=180.0)
    scale_range: float = setting(0.0, "float", low=0.0, high=1.0, open_high=True)
    intensity_scale: float = setting(0.0, "float", low=0.0, high=1.0, open_high=True)
    intensity_shift: float = setting(0.0, "float", **_FRACTION)
    noise_std: float = setting(0.0, "float", **_FRACTION)
    # network (the bundle's UNet)
    channels: tuple[int, ...] = setting((16, 32, 64, 128, 256), "ints", min_length=2, low=1, high=4096)
    strides: tuple[int, ...] = setting((2, 2, 2, 2), "ints", min_length=1, low=1, high=4)
    num_res_units: int = setting(2, "int", low=0, high=8)
    norm: str = setting("batch", "choice", choices=("batch", "instance"))
    # loss: "dice_ce" (DiceCELoss as the bundle sets it) or "dice" (DiceLoss as the tutorial does)
    loss: str = setting("dice_ce", "choice", choices=("dice_ce", "dice"))
    # the loss's Dice over the background channel too (True in the bundle's train.json and the tutorial's DiceLoss)
    include_background: bool = setting(True, "bool")
    # optimisation
    optimizer: str = setting("adam", "choice", choices=("adam", "novograd"))
    learning_rate: float = setting(1e-4, "float", low=0.0, high=1.0, open_low=True, note="the bundle uses 1e-4")
    scheduler: str | None = setting(None, "choice", choices=(None, "step", "cosine"))
    scheduler_step_size: int = setting(5000, "int", low=1)
    scheduler_gamma: float = setting(0.1, "float", low=0.0, high=1.0, open_low=True)
    batch_size: int = setting(2, "int", low=1, high=1024)
    epochs: int = setting(1260, "int", low=1, high=1_000_000)
    # mixed precision where it helps (see precision_request); False: float32 throughout
    amp: bool = setting(True, "bool")
    seed: int = setting(123, "int", low=0, high=2**32 - 1)
    # validation (sliding window)
    validation_interval: int = setting(5, "int", low=1)
    validation_roi_size: IntTriple = setting((96, 96, 96), "ints", **_PATCH)
    sliding_window_batch_size: int = setting(4, "int", low=1, high=1024)
    sliding_window_overlap: float = setting(0.5, "float", low=0.0, high=1.0, open_high=True)
    # data handling
    validation_cases: int = setting(9, "int", low=1)
    cache_rate: float = setting(1.0, "float", **_FRACTION)
    # speed: the network channels-last on a CPU (oneDNN's fast layout for 3D convolutions, about 2x for
    # bfloat16 steps). False keeps PyTorch's default layout, whose float rounding does not depend on the
    # batch size, so 2 processes x batch 1 reproduce 1 process x batch 2 to the last bit
    channels_last: bool = setting(True, "bool")
    extra: dict[str, Any] = field(default_factory=dict, compare=False, metadata={"setting": Setting("mapping")})

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            object.__setattr__(self, item.name, setting_of(item.name).read(item.name, getattr(self, item.name)))
        _check_together(self)

    def replace(self, **overrides: Any) -> Preset:
        """A copy with ``overrides`` applied, every value checked (its name, type and range); the values are used
        as given (:func:`resolve_preset` adds the recipe rules, such as the window following the patch)."""
        return dataclasses.replace(self, **{_known(name, value): value for name, value in overrides.items()})

    def to_dict(self) -> dict[str, Any]:
        """The preset as JSON-friendly data (for manifests and notebook tables)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preset:
        """The preset :meth:`to_dict` wrote (a run manifest's ``parameters.preset``): the named preset with the
        stored settings applied through :func:`resolve_preset`. A setting this version does not know is an error
        naming it; one it added since is given the value the stored run used."""
        if not isinstance(data, Mapping) or not data.get("name"):
            raise BadInputError(f"a stored preset needs a name and its settings, not {data!r:.80}")
        settings = {key: value for key, value in data.items() if key not in ("name", "description", "extra")}
        if "include_background" not in settings:  # stored before the field existed: the loss those runs trained with
            loss = settings.get("loss", getattr(PRESETS.get(str(data["name"])), "loss", None))
            settings["include_background"] = loss != "dice_ce"  # DiceCELoss(False) then, DiceLoss's default True
        return resolve_preset(str(data["name"]), settings)

    def precision_request(self, amp: bool | None = None) -> bool | None:
        """What to ask :func:`spleenkit.devices.choose_precision` for: ``amp`` when given (True forces mixed
        precision, False turns it off), else this recipe's ``amp``: None ("where it helps") when on, False when off.
        The one reading of ``amp`` for training, validation, evaluation and inference."""
        if amp is not None:
            return bool(amp)
        return None if self.amp else False


FIELDS: tuple[str, ...] = tuple(item.name for item in dataclasses.fields(Preset))


@functools.cache
def setting_of(name: str) -> Setting:
    """What the :class:`Preset` field ``name`` accepts (a bool field that declares nothing accepts true or false)."""
    item = next(item for item in dataclasses.fields(Preset) if item.name == name)
    declared = item.metadata.get("setting")
    if declared is None:
        kinds = {"bool": "bool", "int": "int", "float": "float", "str": "text"}
        declared = Setting(kinds.get(str(item.type), "text"))
    return declared


def _known(name: str, value: Any) -> str:
    """``name`` as a field name (``validation-cases`` is ``validation_cases``); an unknown one suggests the nearest."""
    field_name = name.strip().replace("-", "_")
    if field_name in FIELDS:
        return field_name
    close = difflib.get_close_matches(field_name, FIELDS, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"the settings are {', '.join(FIELDS)}"
    raise BadInputError(f"{name}={shown(value)}: unknown preset setting; {hint}")


def _check_together(preset: Preset) -> None:
    """The checks that need two fields: strides for the channels, enough voxels at the bottom for instance norm,
    some foreground or background crops."""
    if len(preset.strides) != len(preset.channels) - 1:
        raise BadInputError(f"strides={shown(preset.strides)}: expected {len(preset.channels) - 1} strides, one "
                            f"between each pair of the {len(preset.channels)} channels ({shown(preset.channels)})")
    if preset.positive + preset.negative == 0:
        raise BadInputError("positive=0: positive and negative crops cannot both be 0 (the bundle draws 1 and 1)")
    reduction = math.prod(preset.strides)
    if preset.norm == "instance" and math.prod(math.ceil(side / reduction) for side in preset.patch_size) < 2:
        # (training only: PyTorch's instance norm refuses a single voxel in training mode)
        raise BadInputError(
            f"patch_size={shown(preset.patch_size)}: leaves 1 voxel at the UNet's deepest level, where instance norm "
            f"has nothing to normalise over; use {2 * reduction} voxels on at least one side, or norm=batch")


# --------------------------------------------------------------------------- the door
def resolve_preset(preset: str | Preset = "seed", settings: Mapping[str, Any] | None = None, *,
                   flags: Mapping[str, Any] | None = None, **keywords: Any) -> Preset:
    """THE one door for recipe settings from outside: the recipe ``preset`` (a name of :data:`PRESETS` or a
    Preset) with ``settings`` (``--set``, notebook parameters, bundle overrides, a manifest's preset) and
    ``flags`` (a command's own options, a function's keyword arguments; ``keywords`` are flags too) applied.

    Text values are read by the field's kind ("3", "1e-3", "4,4,4", "[4, 4, 4]", "true/false/yes/no/on/off/1/0",
    "none"); names may be written with hyphens. A flag of None was not given; a setting of None leaves the recipe's
    value, except where none is a value (``scheduler``). A name given both as a flag and as a setting is refused,
    saying so, as is an unknown name (with the nearest known one) and a value out of range. A new ``patch_size``
    also sets the validation window when the recipe had the two equal (as the bundle does, 96^3 for both).
    """
    base = lookup_preset(preset)
    given_flags = _named({**dict(flags or {}), **keywords}, drop_none=True)
    given_settings = _named(dict(settings or {}), drop_none=False)
    for name, value in given_settings.items():
        if name in given_flags:
            raise BadInputError(f"{name}={shown(value)}: {name} is also given as a flag ({name}="
                                f"{shown(given_flags[name])}); give it once")
    changes = {**given_settings, **given_flags}
    changes = {name: value for name, value in changes.items() if not _none(value) or None in setting_of(name).choices}
    if ("patch_size" in changes and "validation_roi_size" not in changes
            and tuple(base.validation_roi_size) == tuple(base.patch_size)):
        changes["validation_roi_size"] = changes["patch_size"]
    return base.replace(**changes) if changes else base


def _none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)


def _named(values: dict[str, Any], drop_none: bool) -> dict[str, Any]:
    named: dict[str, Any] = {}
    for name, value in values.items():
        if drop_none and value is None:
            continue
        named[_known(str(name), value)] = value
    return named


def lookup_preset(preset: str | Preset) -> Preset:
    """A recipe by name (or the Preset itself); an unknown name lists the known ones."""
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str) and preset.strip() in PRESETS:
        return PRESETS[preset.strip()]
    raise BadInputError(f"preset={shown(preset)}: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def get_preset(name: str | Preset = "seed", **overrides: Any) -> Preset:
    """Look up a recipe by name and apply keyword overrides (None: the recipe's own) through
    :func:`resolve_preset`'s checks; an unknown name lists the known ones."""
    return resolve_preset(name, flags=overrides)


def preset_table(names: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of setting / value-per-preset for the settings that differ between the presets."""
    chosen = [lookup_preset(n) for n in (names or list(PRESETS))]
    rows = []
    for key in sorted(set(FIELDS) - {"name", "description", "extra"}):
        values = [getattr(p, key) for p in chosen]
        if len({repr(v) for v in values}) > 1:
            rows.append({"setting": key, **{p.name: v for p, v in zip(chosen, values, strict=True)}})
    return rows


def recipe_names() -> str:
    """The recipe names, for help texts: ``seed, bundle-0.5.9, tutorial, fast, quick``."""
    return ", ".join(PRESETS)


# --------------------------------------------------------------------------- the recipes
SEED = Preset(
    name="seed",
    description=(
        "The spleen_ct_segmentation model card: DiceCE, Adam 1e-4, mixed precision, 96^3 x 4 "
        "crops, batch 2, 1260 epochs, validation every 5 epochs. Full scale needs a GPU and MSD data."
    ),
)

BUNDLE_0_5_9 = SEED.replace(
    name="bundle-0.5.9",
    description="Bundle release 0.5.9: Novograd 2e-3 with StepLR(5000, 0.1), 800 epochs, validation every epoch.",
    optimizer="novograd",
    learning_rate=2e-3,
    scheduler="step",
    epochs=800,
    validation_interval=1,
)

TUTORIAL = SEED.replace(
    name="tutorial",
    description=(
        "MONAI's spleen_segmentation_3d tutorial: its chain (window, CropForegroundd, orient, resample, crops; "
        "no padding), DiceLoss, Adam 1e-4, no mixed precision, validation window 160^3 at overlap 0.25, 600 "
        "epochs, validation every 2 epochs, seed 0."
    ),
    loss="dice",
    amp=False,
    crop_foreground=True,
    pad_to_patch=False,
    validation_roi_size=(160, 160, 160),
    sliding_window_overlap=0.25,
    epochs=600,
    validation_interval=2,
    seed=0,
)

FAST = SEED.replace(
    name="fast",
    description=(
        "Reaches the seed's quality sooner on a small budget: Adam at 1e-3 with a cosine decay "
        "(as MONAI's fast-training tutorial raises the rate), validation every epoch. The kit's choice for "
        "its loss: the Dice term on the spleen channel alone (include_background=False; the bundle's includes the "
        "background, whose Dice is near 1 on most crops from the start and would take half the Dice term)."
    ),
    include_background=False,
    learning_rate=1e-3,
    scheduler="cosine",
    epochs=300,
    validation_interval=1,
)

QUICK = FAST.replace(
    name="quick",
    description=(
        "For a CPU in minutes on the synthetic data: 3 mm voxels, 64^3 crops (2 per case, one case a batch), "
        "instance normalisation, 100 epochs of a cosine decay from 1e-3, validation every 10, and MONAI's random "
        "rotations, zooms, intensity changes and noise on the crops, so that what it learns from the phantoms "
        "carries over to a real CT. Like fast, the Dice term on the spleen channel alone (the kit's choice; its "
        "Dice on the real CT was measured so)."
    ),
    spacing=(3.0, 3.0, 3.0),
    patch_size=(64, 64, 64),
    validation_roi_size=(64, 64, 64),
    num_samples=2,
    batch_size=1,
    # per-patch normalisation: batch norm's running statistics, learnt on phantoms, do not fit a real scan's
    # features (32 phantoms, 32 epochs, two training seeds: Dice 0.81 and 0.62 on the real example CT with batch
    # norm, 0.85 and 0.88 with instance norm)
    norm="instance",
    epochs=100,
    validation_interval=10,
    validation_cases=3,
    augment_probability=0.5,
    rotate_degrees=10.0,
    scale_range=0.1,
    intensity_scale=0.1,
    intensity_shift=0.1,
    noise_std=0.02,
)

PRESETS: dict[str, Preset] = {p.name: p for p in (SEED, BUNDLE_0_5_9, TUTORIAL, FAST, QUICK)}

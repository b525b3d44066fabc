"""Training recipes as plain, frozen data: one place for every number of the pipeline.

Everything else in the kit takes a :class:`Preset` (usually via :func:`get_preset` with
overrides), so that the spacing, the intensity window or the learning rate are written once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from spleenkit.errors import BadInputError

Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


@dataclass(frozen=True)
class Preset:
    """A complete recipe: preprocessing, network, loss, optimisation, validation and caching."""

    name: str
    description: str
    # preprocessing (the bundle's deterministic chain)
    spacing: Triple = (1.5, 1.5, 2.0)
    intensity_range: tuple[float, float] = (-57.0, 164.0)
    orientation: str = "RAS"
    # True: the tutorial's chain (window, CropForegroundd on the scaled image, then orient and resample, no
    # EnsureTyped, as MONAI's spleen_segmentation_3d tutorial orders it); False: the bundle's order
    crop_foreground: bool = False
    # pad images smaller than the patch (a no-op on images that are large enough; the bundle
    # has no such step, so a small resampled image there yields crops of uneven size)
    pad_to_patch: bool = True
    # random part of the training chain
    patch_size: IntTriple = (96, 96, 96)
    num_samples: int = 4
    positive: int = 1
    negative: int = 1
    # augmentation after the crops (all off in the bundle's recipes): each random transform runs with
    # this probability; rotations up to +-rotate_degrees about every axis, zoom by up to +-scale_range,
    # intensities (already in 0..1) times 1 +- intensity_scale, plus +- intensity_shift, and Gaussian
    # noise of standard deviation up to noise_std. No flips: the spleen is on the left, the back is down
    augment_probability: float = 0.0
    rotate_degrees: float = 0.0
    scale_range: float = 0.0
    intensity_scale: float = 0.0
    intensity_shift: float = 0.0
    noise_std: float = 0.0
    # network (the bundle's UNet)
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    norm: str = "batch"
    # loss: "dice_ce" (DiceCELoss as the bundle sets it) or "dice" (DiceLoss as the tutorial does)
    loss: str = "dice_ce"
    # the loss's Dice over the background channel too (True in the bundle's train.json and the tutorial's DiceLoss)
    include_background: bool = True
    # optimisation
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    scheduler: str | None = None
    scheduler_step_size: int = 5000
    scheduler_gamma: float = 0.1
    batch_size: int = 2
    epochs: int = 1260
    amp: bool = True
    seed: int = 123
    # validation (sliding window)
    validation_interval: int = 5
    validation_roi_size: IntTriple = (96, 96, 96)
    sliding_window_batch_size: int = 4
    sliding_window_overlap: float = 0.5
    # data handling
    validation_cases: int = 9
    cache_rate: float = 1.0
    # speed: the network channels-last on a CPU (oneDNN's fast layout for 3D convolutions, about 2x for
    # bfloat16 steps). False keeps PyTorch's default layout, whose float rounding does not depend on the
    # batch size, so 2 processes x batch 1 reproduce 1 process x batch 2 to the last bit
    channels_last: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def replace(self, **overrides: Any) -> Preset:
        """Return a copy with ``overrides`` applied; unknown names are an error, not ignored."""
        return dataclasses.replace(self, **_checked(overrides))

    def to_dict(self) -> dict[str, Any]:
        """The preset as JSON-friendly data (for manifests and notebook tables)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preset:
        """The preset :meth:`to_dict` wrote (a run manifest's ``parameters.preset``): the named preset with the
        stored settings applied. A setting this version does not know is an error naming it."""
        if not isinstance(data, dict) or not data.get("name"):
            raise BadInputError(f"a stored preset needs a name and its settings, not {data!r:.80}")
        settings = {key: value for key, value in data.items() if key not in ("name", "description", "extra")}
        return get_preset(data["name"]).replace(**settings)


_FIELDS = {f.name for f in dataclasses.fields(Preset)}
_TUPLE_FIELDS = {"spacing", "intensity_range", "patch_size", "channels", "strides", "validation_roi_size"}


def _checked(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise BadInputError(f"unknown preset setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    fixed = {}
    for key, value in overrides.items():
        if key in _TUPLE_FIELDS and value is not None:
            if isinstance(value, (int, float)):
                value = (value,) * 3 if key not in {"intensity_range", "channels", "strides"} else (value,)
            value = tuple(value)
        fixed[key] = value
    return fixed


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


def get_preset(name: str | Preset = "seed", **overrides: Any) -> Preset:
    """Look up a preset by name and apply overrides; an unknown name lists the known ones."""
    if isinstance(name, Preset):
        preset = name
    elif name in PRESETS:
        preset = PRESETS[name]
    else:
        raise BadInputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return preset.replace(**overrides) if overrides else preset


def preset_table(names: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of setting / value-per-preset for the settings that differ between the presets."""
    chosen = [PRESETS[n] for n in (names or list(PRESETS))]
    rows = []
    for key in sorted(_FIELDS - {"name", "description", "extra"}):
        values = [getattr(p, key) for p in chosen]
        if len({repr(v) for v in values}) > 1:
            rows.append({"setting": key, **{p.name: v for p, v in zip(chosen, values, strict=True)}})
    return rows

"""The MONAI transform chains of a preset: training, validation and inference.

The deterministic part matches the bundle's ``train#deterministic_transforms`` step for step
(LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd -> ScaleIntensityRanged ->
EnsureTyped), or, for a preset with ``crop_foreground`` (the tutorial), MONAI's spleen tutorial's
chain in its order (LoadImaged -> EnsureChannelFirstd -> ScaleIntensityRanged -> CropForegroundd ->
Orientationd -> Spacingd); the training chain adds ``RandCropByPosNegLabeld``. Keep the order and
values here and nowhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spleenkit.presets import Preset, get_preset

if TYPE_CHECKING:
    from monai.transforms import Compose, Transform

IMAGE, LABEL = "image", "label"


def deterministic_transforms(preset: Preset | str = "seed", keys: tuple[str, ...] = (IMAGE, LABEL)) -> list[Transform]:
    """The cacheable, deterministic preprocessing: load, channel first, orient, resample, window (the bundle's
    order); with ``crop_foreground``, the tutorial's: load, channel first, window, crop to the body, orient,
    resample. Scaling before the crop decides what is cropped: the scaled image's positive voxels."""
    from monai.transforms import (
        CropForegroundd,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    preset = get_preset(preset)
    keys = list(keys)
    modes = ["bilinear" if key == IMAGE else "nearest" for key in keys]
    low, high = preset.intensity_range
    load = [LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys)]
    # labels=None (MONAI 1.6's default: axis names from the image's space), stated to silence its warning
    geometry = [Orientationd(keys=keys, axcodes=preset.orientation, labels=None),
                Spacingd(keys=keys, pixdim=tuple(preset.spacing), mode=modes)]
    window = ScaleIntensityRanged(keys=IMAGE, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    if preset.crop_foreground:
        return [*load, window, CropForegroundd(keys=keys, source_key=IMAGE), *geometry]
    return [*load, *geometry, window, EnsureTyped(keys=keys)]


def random_transforms(preset: Preset | str = "seed") -> list[Transform]:
    """The random part of training: pad to the patch if needed, positive/negative crops, then the
    preset's augmentation (none in the bundle's recipes): rotation and zoom, intensity scale and shift, noise."""
    from monai.transforms import RandCropByPosNegLabeld, SpatialPadd

    preset = get_preset(preset)
    chain: list[Transform] = []
    if preset.pad_to_patch:
        chain.append(SpatialPadd(keys=[IMAGE, LABEL], spatial_size=tuple(preset.patch_size)))
    chain.append(
        RandCropByPosNegLabeld(
            keys=[IMAGE, LABEL],
            label_key=LABEL,
            spatial_size=tuple(preset.patch_size),
            pos=preset.positive,
            neg=preset.negative,
            num_samples=preset.num_samples,
            image_key=IMAGE,
            image_threshold=0,
        )
    )
    return chain + augmentation_transforms(preset)


def augmentation_transforms(preset: Preset) -> list[Transform]:
    """MONAI's random transforms the preset asks for, applied to each crop: rotation and zoom, intensity scale
    and shift, noise, each with ``augment_probability`` (an empty list when that is 0, as in the bundle's recipes).

    No flips: a left-right flip would put the spleen on the wrong side, and a patient lies supine, head first.
    """
    import math

    from monai.transforms import RandAffined, RandGaussianNoised, RandScaleIntensityd, RandShiftIntensityd

    probability = preset.augment_probability
    if probability <= 0:
        return []
    angle = math.radians(preset.rotate_degrees)
    return [
        RandAffined(keys=[IMAGE, LABEL], prob=probability, rotate_range=(angle,) * 3,
                    scale_range=(preset.scale_range,) * 3, mode=("bilinear", "nearest"), padding_mode="border"),
        RandScaleIntensityd(keys=IMAGE, factors=preset.intensity_scale, prob=probability),
        RandShiftIntensityd(keys=IMAGE, offsets=preset.intensity_shift, prob=probability),
        RandGaussianNoised(keys=IMAGE, std=preset.noise_std, prob=probability),
    ]


def training_transforms(preset: Preset | str = "seed") -> Compose:
    """Deterministic preprocessing followed by the random crops."""
    from monai.transforms import Compose

    return Compose(deterministic_transforms(preset) + random_transforms(preset))


def validation_transforms(preset: Preset | str = "seed") -> Compose:
    """The deterministic preprocessing of image and label."""
    from monai.transforms import Compose

    return Compose(deterministic_transforms(preset))


def inference_transforms(preset: Preset | str = "seed") -> Compose:
    """Image-only preprocessing, invertible with ``Invertd`` to put predictions back on the input grid."""
    from monai.transforms import Compose

    return Compose(deterministic_transforms(preset, keys=(IMAGE,)))


def describe_volume(volume: Any) -> dict[str, Any]:
    """Shape, voxel size (mm), orientation codes and value range of a loaded MetaTensor."""
    import nibabel as nib
    import numpy as np

    affine = np.asarray(getattr(volume, "affine", np.eye(4)), dtype=float)
    spatial = tuple(int(s) for s in volume.shape[-3:])
    return {
        "shape": tuple(int(s) for s in volume.shape),
        "spatial_shape": spatial,
        "spacing": tuple(round(float(s), 3) for s in nib.affines.voxel_sizes(affine)),
        "orientation": "".join(nib.aff2axcodes(affine)),
        "dtype": str(volume.dtype).removeprefix("torch."),
        "min": float(volume.min()),
        "max": float(volume.max()),
    }


def trace_transforms(record: dict[str, str], preset: Preset | str = "seed") -> list[dict[str, Any]]:
    """Run the deterministic chain on one case a step at a time and return, per step, its name, the
    image and label after it and their facts (:func:`describe_volume`): what each step does, visibly."""
    data: dict[str, Any] = dict(record)
    steps = []
    for transform in deterministic_transforms(preset):
        data = transform(data)
        steps.append({"step": type(transform).__name__, "image": data[IMAGE], "label": data.get(LABEL),
                      **describe_volume(data[IMAGE])})
    return steps

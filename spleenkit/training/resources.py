"""What a training run will need, checked before anything heavy starts: the memory of one training step, the
memory of the cache (estimated from the NIfTI headers), whether a patch fits the resampled images, and the cores
this process may use. The recipe's own ranges are checked where it is made (:mod:`spleenkit.presets`); this module
checks the recipe against this machine and these data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spleenkit import environment
from spleenkit.data.datalist import Datalist
from spleenkit.errors import BadInputError
from spleenkit.images import read_nifti
from spleenkit.presets import Preset, get_preset

if TYPE_CHECKING:
    import torch

#: Training memory per input voxel of one patch in float32: 167 bytes kept for the backward pass by the bundle's
#: UNet (measured with saved-tensor hooks), doubled for the gradients and the forward's passing maps.
ACTIVATION_BYTES_PER_VOXEL = 350


def estimate_step_memory(preset: Preset) -> int:
    """Bytes one training step needs for its activations: patches per batch x voxels per patch x
    :data:`ACTIVATION_BYTES_PER_VOXEL`, scaled by the network's width (float32, the upper bound)."""
    patches = preset.batch_size * preset.num_samples
    width = preset.channels[0] / 16
    return int(patches * math.prod(preset.patch_size) * ACTIVATION_BYTES_PER_VOXEL * width)


def check_step_fits(preset: Preset, device: torch.device) -> None:
    """Refuse, before anything heavy starts, a patch whose training step cannot fit in the device's memory."""
    if device.type == "cuda":
        import torch

        available = torch.cuda.get_device_properties(device).total_memory
        where = f"{device}'s memory"
    else:
        memory = environment.total_memory_gib()
        if memory is None:
            return
        available, where = int(memory * 2**30), "this machine's memory"
    needed = estimate_step_memory(preset)
    if needed > 0.9 * available:
        raise BadInputError(
            f"a training step with {preset.batch_size} x {preset.num_samples} patches of {tuple(preset.patch_size)} "
            f"needs about {needed / 2**30:.1f} GiB, more than {where} ({available / 2**30:.1f} GiB); use a smaller "
            "--patch or batch")


def default_num_workers() -> int:
    """The number of CPU cores this process may use (the default for caching and data loading)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- the cache
@dataclass
class CacheEstimate:
    """Memory the CacheDataset will take, estimated from the NIfTI headers before it is filled."""

    cases: int
    cached_cases: int
    total_bytes: int
    largest_shape: tuple[int, int, int]
    available_bytes: int | None = None

    @property
    def gib(self) -> float:
        """The estimate in GiB."""
        return self.total_bytes / 2**30

    @property
    def fits(self) -> bool:
        """False when the cache would take more than 80 % of the machine's memory."""
        return self.available_bytes is None or self.total_bytes <= 0.8 * self.available_bytes

    def combined(self, other: CacheEstimate) -> CacheEstimate:
        """The estimate for both caches together (training and validation)."""
        return CacheEstimate(
            cases=self.cases + other.cases, cached_cases=self.cached_cases + other.cached_cases,
            total_bytes=self.total_bytes + other.total_bytes,
            largest_shape=max(self.largest_shape, other.largest_shape, key=math.prod),
            available_bytes=self.available_bytes)

    def describe(self) -> str:
        """One line for logs and notebooks."""
        memory = f" of {self.available_bytes / 2**30:.1f} GiB" if self.available_bytes else ""
        return (f"caching {self.cached_cases}/{self.cases} cases needs about {self.gib:.2f} GiB{memory} "
                f"(largest resampled volume {self.largest_shape})")


def resampled_shape(path: str | os.PathLike[str], preset: Preset) -> tuple[int, int, int]:
    """The shape a volume gets after Orientationd + Spacingd, read from its header only (no voxels)."""
    import nibabel as nib
    import numpy as np

    image = read_nifti(path)
    shape = np.asarray(image.shape[:3], dtype=float)
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=float)
    # axis i of the file becomes axis ornt[i, 0] after reorientation to RAS (the only orientation used)
    ornt = nib.orientations.io_orientation(image.affine)
    extent = np.zeros(3)
    for axis, (target, _) in enumerate(ornt):
        extent[int(target)] = shape[axis] * zooms[axis]
    return tuple(max(1, int(round(e / s))) for e, s in zip(extent, preset.spacing, strict=True))  # type: ignore[return-value]


def estimate_cache_memory(items: Datalist, preset: Preset | str = "seed", cache_rate: float | None = None,
                          keys: Sequence[str] = ("image", "label"), padded: bool | None = None) -> CacheEstimate:
    """Bytes the cached, resampled volumes take: voxels after resampling x 4 bytes (float32) x one
    channel per key (image and label), padded to the patch when ``padded`` (default: when the preset
    pads, as the training cache does; the validation cache is never padded)."""
    preset = get_preset(preset)
    rate = preset.cache_rate if cache_rate is None else cache_rate
    cached = min(len(items), int(len(items) * rate))
    shapes = []
    for record in items:
        shape = resampled_shape(record["image"], preset)
        if preset.pad_to_patch if padded is None else padded:
            shape = tuple(max(s, p) for s, p in zip(shape, preset.patch_size, strict=True))
        shapes.append(shape)
    per_case = [math.prod(shape) * 4 * len(keys) for shape in shapes]
    memory = environment.total_memory_gib()
    return CacheEstimate(
        cases=len(items),
        cached_cases=cached,
        total_bytes=sum(per_case[:cached]),
        largest_shape=max(shapes, key=math.prod) if shapes else (0, 0, 0),
        available_bytes=int(memory * 2**30) if memory else None,
    )


def check_patch_fits(items: Datalist, preset: Preset) -> None:
    """Without padding, every resampled image must hold a whole patch; say which one does not."""
    if preset.pad_to_patch:
        return
    for record in items:
        shape = resampled_shape(record["image"], preset)
        if any(s < p for s, p in zip(shape, preset.patch_size, strict=True)):
            raise BadInputError(
                f"after resampling to {tuple(preset.spacing)} mm the image is {shape} voxels, smaller than the "
                f"patch {tuple(preset.patch_size)}; use a smaller patch or pad_to_patch=True", record["image"])

"""Prediction: the sliding-window inferer, the network prepared for inference, mixed precision at inference,
post-processing, and the return of a prediction to the image's original grid.

Evaluation (many labelled cases), inference (new scans) and training's validation all predict through
these functions, so a window setting or a post-processing step is defined once.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from spleenkit.devices import autocast, choose_precision, use_fast_layout
from spleenkit.environment import release_free_memory, return_large_blocks_promptly
from spleenkit.errors import BadInputError
from spleenkit.images import read_nifti
from spleenkit.model import check_finite_weights, load_model
from spleenkit.presets import Preset, get_preset
from spleenkit.transforms import inference_transforms

if TYPE_CHECKING:
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import Compose

log = logging.getLogger(__name__)


BLEND_MODES = ("constant", "gaussian")


#: Above this many voxels in the original image, predictions go back to its grid in slabs (bounded
#: memory) instead of through one ``Invertd`` call, whose float64 sampling grid needs ~50 bytes a voxel.
#: The slabs carry one channel instead of two, so they are also faster: 1.6 s instead of 4.2 s for a
#: 512x512x88 CT (benchmarks/); hence the threshold covers a 512x512 CT from about 30 slices up.
INVERT_MAX_VOXELS = 8_000_000


SLAB_VOXELS = 4_000_000


def make_inferer(preset: Preset | str = "seed", overlap: float | None = None, sw_batch_size: int | None = None,
                 blend: str = "constant", device: torch.device | str | None = None,
                 stitch_device: str = "cpu") -> SlidingWindowInferer:
    """MONAI's SlidingWindowInferer with the preset's window, batch and overlap.

    Windows run on ``device``; the stitched output lives on the CPU when ``stitch_device`` is
    "cpu" (GPU memory then no longer grows with the image), or beside the windows when "auto".
    ``blend`` is "constant" (the bundle) or "gaussian" (down-weights window borders).
    """
    import torch
    from monai.inferers import SlidingWindowInferer

    # the overlap and window batch are the recipe's settings: checked at its door like every other
    preset = get_preset(preset, sliding_window_overlap=overlap, sliding_window_batch_size=sw_batch_size)
    if blend not in BLEND_MODES:
        raise BadInputError(f"unknown blend mode {blend!r}; use one of {', '.join(BLEND_MODES)}")
    if stitch_device not in ("cpu", "auto"):
        raise BadInputError(f"unknown stitch device {stitch_device!r}; use cpu or auto")
    window_device = torch.device(device) if device is not None else None
    return SlidingWindowInferer(
        roi_size=tuple(preset.validation_roi_size),
        sw_batch_size=preset.sliding_window_batch_size,
        overlap=preset.sliding_window_overlap,
        mode=blend,
        sw_device=window_device,
        device=torch.device("cpu") if stitch_device == "cpu" else window_device,
    )


def inference_network(network: torch.nn.Module, device: torch.device | str = "cpu",
                      channels_last: bool = True) -> torch.nn.Module:
    """A copy of ``network`` made for inference: eval mode, each batch norm folded into the convolution
    before it, weights in the device's fast layout (:func:`spleenkit.devices.use_fast_layout`).

    Folding turns "convolve, then scale and shift every voxel" into one convolution with adjusted
    weights: the same logits up to float rounding (about 1e-6), one pass over memory fewer per layer.
    The original ``network`` is left as it is (a training network must keep its batch norms).
    """
    import copy

    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(network).eval()
    for module in folded.modules():
        conv, adn = getattr(module, "conv", None), getattr(module, "adn", None)
        norm = next(iter(adn.named_children()), None) if isinstance(adn, torch.nn.Module) else None
        # MONAI's Convolution block: conv, then ADN with the norm first ("NDA", as in the bundle's UNet)
        if (isinstance(conv, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) and norm is not None
                and norm[0] == "N" and isinstance(norm[1], torch.nn.BatchNorm3d) and norm[1].track_running_stats):
            module.conv = fuse_conv_bn_eval(conv, norm[1], transpose=isinstance(conv, torch.nn.ConvTranspose3d))
            adn.N = torch.nn.Identity()
    return use_fast_layout(folded, torch.device(device), channels_last)


def inference_amp(preset: Preset, device: torch.device, amp: bool | None = None) -> bool:
    """Mixed precision for evaluation and inference (:func:`spleenkit.devices.choose_precision`, purpose
    "inference"): ``amp`` when given (a warning where bfloat16 is slower than float32); by default float16
    on CUDA when the preset has mixed precision on, and float32 on a CPU.

    On a CPU, bfloat16 masks differ from float32's in a few boundary voxels (Dice about 0.997-0.998
    against the bundle's float32 masks, benchmarks/), while float32 with :func:`inference_network`
    (fast layout, folded batch norm) gives the bundle's masks exactly at most of bfloat16's speed.
    """
    return choose_precision(device, preset.precision_request(amp), purpose="inference").enabled


def predict_logits(network: torch.nn.Module, image: torch.Tensor, inferer: SlidingWindowInferer,
                   device: torch.device | str = "cpu", amp: bool = True) -> torch.Tensor:
    """Run the sliding window over one channel-first image; returns float32 logits (C, ...).

    The image itself stays where it is (usually the CPU); only the windows go to ``device``,
    under mixed precision when ``amp`` (float16 on CUDA, bfloat16 on the CPU).
    """
    import torch

    network.eval()
    with torch.no_grad():
        logits = autocast_inferer(inferer, torch.device(device), amp)(image[None], network)
    return logits[0]


def postprocessing(largest_component: bool = False, fill_holes: bool = False, invert: Compose | None = None,
                   key: str = "pred", orig_key: str = "image", to_onehot: int | None = None) -> Compose:
    """The post-processing chain on a dict holding logits under ``key``.

    softmax -> [Invertd onto ``orig_key``'s original grid, interpolating probabilities as the
    bundle does] -> argmax -> [keep the largest connected component] -> [fill holes]
    -> [one-hot with ``to_onehot`` channels, for DiceMetric in training's validation].
    """
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        FillHolesd,
        Invertd,
        KeepLargestConnectedComponentd,
    )

    chain: list[Any] = [Activationsd(keys=key, softmax=True)]
    if invert is not None:
        chain.append(Invertd(keys=key, transform=invert, orig_keys=orig_key, nearest_interp=False, to_tensor=True))
    chain.append(AsDiscreted(keys=key, argmax=True))
    if largest_component:
        chain.append(KeepLargestConnectedComponentd(keys=key, applied_labels=[1], independent=True))
    if fill_holes:
        chain.append(FillHolesd(keys=key, applied_labels=[1]))
    if to_onehot:
        chain.append(AsDiscreted(keys=key, to_onehot=to_onehot))
    return Compose(chain)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected spleen component of a 0/1 mask (MONAI's KeepLargestConnectedComponent)."""
    import torch
    from monai.transforms import KeepLargestConnectedComponent

    # a copy: the transform works in place, and the caller's mask must stay as it was
    kept = KeepLargestConnectedComponent(applied_labels=[1])(torch.tensor(np.array(mask, dtype=np.uint8)[None]))
    return np.asarray(kept[0].cpu().numpy(), dtype=np.uint8)


def original_space_mask(logits: torch.Tensor, image: torch.Tensor, preprocessing: Compose,
                        affine: np.ndarray, shape: Sequence[int], largest_component: bool = False,
                        fill_holes: bool = False, max_invert_voxels: int = INVERT_MAX_VOXELS) -> np.ndarray:
    """The prediction on the original image grid (``affine``, ``shape``), as a uint8 0/1 mask.

    Up to ``max_invert_voxels`` this is the bundle's way: softmax, ``Invertd`` (interpolating the
    probabilities), argmax. Larger images are resampled in slabs of slices from the prediction's grid
    to the original one (the same world-coordinate mapping, the foreground probability only), so memory
    stays bounded: by three 1-D linear interpolations where the grids are axis-aligned (always, after
    Orientation + Spacing; 0.2 s instead of 1.8 s for a 512x512x88 CT), else by MONAI's
    ``SpatialResample`` in float64 like ``Invertd``. The tests hold the routes equal (up to rounding
    where the two probabilities tie). The
    largest-component and hole-filling options run on the original grid.
    """
    import torch
    from monai.transforms import FillHoles, KeepLargestConnectedComponent, SpatialResample

    shape = tuple(int(s) for s in shape[:3])
    if math.prod(shape) <= max_invert_voxels:
        inverted = postprocessing(largest_component, fill_holes, invert=preprocessing)(
            {"pred": logits, "image": image})["pred"]
        mask = np.asarray(inverted[0].cpu().numpy() > 0.5, dtype=np.uint8)
    else:
        # argmax of two softmax channels is "foreground probability > 0.5"; interpolation is linear,
        # so interpolating that one channel gives the same answer (up to rounding at exact ties)
        foreground = torch.softmax(logits.float(), dim=0)[1:2].cpu()  # the original grid is built on the CPU
        affine = np.asarray(affine, dtype=np.float64)
        to_source = np.linalg.inv(np.asarray(_affine_of(foreground), dtype=np.float64)) @ affine
        axes = _axis_aligned(to_source)
        resample = None if axes is not None else SpatialResample(mode="bilinear", padding_mode="border",
                                                                 dtype=torch.float64)
        mask = np.zeros(shape, dtype=np.uint8)
        step = max(1, SLAB_VOXELS // (shape[0] * shape[1]))
        for start in range(0, shape[2], step):
            stop = min(shape[2], start + step)
            if resample is None:
                slab = _separable_linear(foreground[0], to_source, axes, shape, start, stop)
            else:
                slab_affine = affine.copy()
                slab_affine[:3, 3] = affine[:3, :3] @ [0, 0, start] + affine[:3, 3]
                slab = resample(foreground, dst_affine=torch.as_tensor(slab_affine),
                                spatial_size=(shape[0], shape[1], stop - start))[0]
            mask[:, :, start:stop] = slab.cpu().numpy() > 0.5
        cleaned = torch.from_numpy(mask)[None]
        if largest_component:
            cleaned = KeepLargestConnectedComponent(applied_labels=[1])(cleaned)
        if fill_holes:
            cleaned = FillHoles(applied_labels=[1])(cleaned)
        mask = np.asarray(cleaned[0].cpu().numpy() if hasattr(cleaned, "cpu") else cleaned[0], dtype=np.uint8)
    if mask.shape != shape:
        raise BadInputError(f"internal error: the prediction on the original grid has shape {mask.shape}, "
                            f"the image {shape}")
    return mask


def _affine_of(image: Any) -> Any:
    """The voxel-to-world affine of a MetaTensor (the resampled image's, which the logits share)."""
    affine = getattr(image, "affine", None)
    if affine is None:
        raise BadInputError("internal error: the prediction carries no affine to map it back with")
    return affine.cpu().numpy() if hasattr(affine, "cpu") else affine


def _axis_aligned(to_source: np.ndarray) -> list[int] | None:
    """For each original axis, the prediction's axis it runs along, when ``to_source`` (original voxel
    -> prediction voxel) only flips, permutes and scales axes, as Orientation + Spacing always do;
    None for an oblique mapping."""
    linear = np.abs(to_source[:3, :3])
    axes = [int(np.argmax(linear[:, column])) for column in range(3)]
    if sorted(axes) != [0, 1, 2]:
        return None
    off_axis = linear.copy()
    off_axis[axes, [0, 1, 2]] = 0
    return axes if off_axis.max() <= 1e-9 * linear.max() else None


def _separable_linear(source: torch.Tensor, to_source: np.ndarray, axes: list[int], shape: Sequence[int],
                      start: int, stop: int) -> torch.Tensor:
    """Slices ``start:stop`` (last axis) of ``source`` resampled onto the original grid by trilinear
    interpolation with border padding, as MONAI's ``SpatialResample`` computes it.

    For an axis-aligned mapping trilinear interpolation is three 1-D linear interpolations in a row,
    so no dense grid of coordinates is built: for a 512x512x88 CT this takes a fraction of the time
    of ``SpatialResample``'s affine grid plus ``grid_sample`` (benchmarks/).
    """
    import torch

    result = source
    ranges = [(0, shape[0]), (0, shape[1]), (start, stop)]
    for original_axis in (2, 0, 1):  # the slab's axis first: every later step works on the slab only
        axis = axes[original_axis]
        low, high = ranges[original_axis]
        indices = np.arange(low, high, dtype=np.float64)
        coordinates = to_source[axis, original_axis] * indices + to_source[axis, 3]
        coordinates = np.clip(coordinates, 0, source.shape[axis] - 1)  # border padding
        below = np.floor(coordinates).astype(np.int64)
        above = np.minimum(below + 1, source.shape[axis] - 1)
        weight = torch.as_tensor(coordinates - below, dtype=result.dtype)
        view = [1, 1, 1]
        view[axis] = -1
        lower = result.index_select(axis, torch.from_numpy(below))
        upper = result.index_select(axis, torch.from_numpy(above))
        result = torch.lerp(lower, upper, weight.view(view))
    return result.permute(*axes)


def predict_mask(network: torch.nn.Module, image_path: str | os.PathLike[str], preset: Preset,
                 inferer: Any, device: torch.device | str = "cpu", amp: bool = True,
                 largest_component: bool = False, fill_holes: bool = False) -> np.ndarray:
    """Predict one NIfTI file; returns a uint8 0/1 mask in the file's own voxel order and shape.

    Preprocess (RAS, preset spacing, window) -> sliding window -> softmax -> back onto the file's
    grid (``Invertd``, or slab-wise resampling for large images) -> argmax -> options.
    """
    image = read_nifti(image_path)
    preprocessing = inference_transforms(preset)
    try:
        data = preprocessing({"image": str(image_path)})
    except Exception as error:  # noqa: BLE001 - MONAI wraps reader failures in RuntimeError
        raise BadInputError(f"cannot preprocess ({_preprocessing_error(error)})", image_path) from error
    logits = predict_logits(network, data["image"], inferer, device, amp)
    resampled = data.pop("image")
    del data
    return original_space_mask(logits, resampled, preprocessing, image.affine, image.shape, largest_component,
                               fill_holes)


def autocast_inferer(inferer: Any, device: torch.device, amp: bool = True) -> Any:
    """Wrap a MONAI inferer so that the forward passes run under the device's autocast; returns float32."""
    from monai.inferers import Inferer

    class AutocastInferer(Inferer):
        """``inferer`` under autocast (float16 on CUDA, bfloat16 on CPU), output cast back to float32."""

        def __init__(self) -> None:
            self.inferer, self.device, self.amp = inferer, device, amp

        def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> Any:
            with autocast(self.device, self.amp):
                output = self.inferer(inputs, network, *args, **kwargs)
            return output.float() if hasattr(output, "float") else output

    return AutocastInferer()


@dataclass
class Prediction:
    """Everything a prediction run needs, set up once: the preset, the device, whether it autocasts, the
    network prepared for inference, the sliding-window inferer, and these settings for a manifest."""

    preset: Preset
    device: torch.device
    amp: bool
    network: torch.nn.Module
    inferer: SlidingWindowInferer
    settings: dict[str, Any]


def prepare_prediction(model: str | os.PathLike[str], preset: Preset, device: torch.device, amp: bool | None = None,
                       *, overlap: float | None = None, sw_batch_size: int | None = None, blend: str = "constant",
                       stitch_device: str = "auto", largest_component: bool = False,
                       fill_holes: bool = False) -> Prediction:
    """The set-up shared by ``spleenkit evaluate`` and ``spleenkit infer``: load ``model`` strictly (its weights
    must be finite), fold batch norm, choose the precision, make the inferer, and name every setting. Where memory is
    small, large blocks go back to the system when freed from now on; earlier work's garbage goes first
    (:mod:`spleenkit.environment`)."""
    return_large_blocks_promptly()
    release_free_memory()
    amp = inference_amp(preset, device, amp)
    network = load_model(model, preset, device)
    check_finite_weights(network, model)
    network = inference_network(network, device, preset.channels_last)
    inferer = make_inferer(preset, overlap, sw_batch_size, blend, device, stitch_device)
    settings = {"model": str(model), "preset": preset.name, "device": str(device), "amp": amp,
                "roi_size": list(preset.validation_roi_size), "overlap": inferer.overlap,
                "sw_batch_size": inferer.sw_batch_size, "blend": blend, "stitch_device": stitch_device,
                "largest_component": largest_component, "fill_holes": fill_holes}
    return Prediction(preset, device, amp, network, inferer, settings)


def _preprocessing_error(error: BaseException) -> str:
    """The innermost cause of a MONAI transform failure ("applying transform <LoadImaged ...>" says nothing)."""
    while error.__cause__ is not None or (error.__context__ is not None and "applying transform" in str(error)):
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

"""Evaluation: sliding-window inference, post-processing, and metrics in two spaces.

A prediction is scored twice: in the *resampled* space the network works in (RAS, the preset's
voxel spacing), and in the *original* space of the image file, after ``Invertd`` has put the
prediction back on the original grid, against the original label file. The two differ because
resampling a label changes it; the original-space numbers are the ones to report.

Metrics use MONAI (Dice, ``HausdorffDistanceMetric(percentile=95)``,
``SurfaceDistanceMetric(symmetric=True)``) with the voxel spacing, so distances are in mm.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spleenkit.errors import BadInputError
from spleenkit.presets import Preset, get_preset

if TYPE_CHECKING:
    import nibabel as nib
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import Compose

    from spleenkit.distributed import DistributedContext

log = logging.getLogger(__name__)

#: Metric columns of a per-case row, in the order of the CSV.
METRICS: tuple[str, ...] = (
    "dice", "hd95_mm", "hd_mm", "assd_mm",
    "pred_volume_ml", "ref_volume_ml", "volume_error_ml", "volume_error_percent",
)
#: Which direction is better for each metric ("max": higher is better; "min": lower; "abs": closer to 0).
BETTER: dict[str, str] = {
    "dice": "max", "hd95_mm": "min", "hd_mm": "min", "assd_mm": "min",
    "pred_volume_ml": "none", "ref_volume_ml": "none", "volume_error_ml": "abs", "volume_error_percent": "abs",
}
SPACES = ("resampled", "original")
BLEND_MODES = ("constant", "gaussian")
#: Above this many voxels in the original image, predictions go back to its grid in slabs (bounded
#: memory) instead of through one ``Invertd`` call, whose float64 sampling grid needs ~50 bytes a voxel.
#: The slabs carry one channel instead of two, so they are also faster: 1.6 s instead of 4.2 s for a
#: 512x512x88 CT (benchmarks/); hence the threshold covers a 512x512 CT from about 30 slices up.
INVERT_MAX_VOXELS = 8_000_000
SLAB_VOXELS = 4_000_000
#: Two grids are "the same" when their shapes are equal and their affines agree to this tolerance (mm).
GRID_TOLERANCE = 1e-4


# --------------------------------------------------------------------------- sliding window
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

    preset = get_preset(preset)
    if blend not in BLEND_MODES:
        raise BadInputError(f"unknown blend mode {blend!r}; use one of {', '.join(BLEND_MODES)}")
    if stitch_device not in ("cpu", "auto"):
        raise BadInputError(f"unknown stitch device {stitch_device!r}; use cpu or auto")
    overlap = preset.sliding_window_overlap if overlap is None else float(overlap)
    if not 0.0 <= overlap < 1.0:
        raise BadInputError(f"overlap must be in [0, 1), got {overlap}")
    sw_batch_size = preset.sliding_window_batch_size if sw_batch_size is None else int(sw_batch_size)
    if sw_batch_size < 1:
        raise BadInputError(f"sliding-window batch size must be at least 1, got {sw_batch_size}")
    window_device = torch.device(device) if device is not None else None
    return SlidingWindowInferer(
        roi_size=tuple(preset.validation_roi_size),
        sw_batch_size=sw_batch_size,
        overlap=overlap,
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

    from spleenkit.devices import use_fast_layout

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


def inference_amp(preset: Preset | str, device: torch.device, amp: bool | None = None) -> bool:
    """Mixed precision for evaluation and inference (:func:`spleenkit.devices.choose_precision`, purpose
    "inference"): ``amp`` when given (a warning where bfloat16 is slower than float32); by default float16
    on CUDA when the preset has mixed precision on, and float32 on a CPU.

    On a CPU, bfloat16 masks differ from float32's in a few boundary voxels (Dice about 0.997-0.998
    against the bundle's float32 masks, benchmarks/), while float32 with :func:`inference_network`
    (fast layout, folded batch norm) gives the bundle's masks exactly at most of bfloat16's speed.
    """
    from spleenkit.devices import choose_precision

    requested = amp if amp is not None else (None if get_preset(preset).amp else False)
    return choose_precision(device, requested, purpose="inference").enabled


def predict_logits(network: torch.nn.Module, image: torch.Tensor, inferer: SlidingWindowInferer,
                   device: torch.device | str = "cpu", amp: bool = True) -> torch.Tensor:
    """Run the sliding window over one channel-first image; returns float32 logits (C, ...).

    The image itself stays where it is (usually the CPU); only the windows go to ``device``,
    under mixed precision when ``amp`` (float16 on CUDA, bfloat16 on the CPU).
    """
    import torch

    from spleenkit.devices import autocast

    device = torch.device(device)
    network.eval()
    with torch.no_grad(), autocast(device, enabled=amp):
        logits = inferer(image[None], network)
    return logits[0].float()


# --------------------------------------------------------------------------- post-processing
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


# --------------------------------------------------------------------------- metrics
def _as_binary(mask: Any, name: str) -> np.ndarray:
    """A 0/1 array (a leading channel of size 1 is dropped); other values are an error."""
    array = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    if array.ndim >= 3 and array.shape[0] == 1:
        array = array[0]
    if array.dtype == bool:
        return array
    if not np.all(np.isin(array, (0, 1))):
        values = np.unique(array)
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (" ..." if values.size > 6 else "")
        raise BadInputError(f"{name} must hold only the labels 0 and 1, found {shown}")
    return array.astype(bool)


def mask_metrics(pred: Any, ref: Any, spacing: Sequence[float]) -> dict[str, float | None]:
    """Dice, HD95, Hausdorff, symmetric mean surface distance (mm) and volumes (mL) of two 0/1 masks.

    ``spacing`` is the voxel size in mm along each array axis. Distances are ``None`` when one
    mask is empty and the other is not (they are undefined there); two empty masks agree perfectly.
    The distances are MONAI's: ``get_edge_surface_distance`` (boundary voxels, exact Euclidean
    distances with the spacing) computed once in both directions, then reduced exactly as
    ``HausdorffDistanceMetric(percentile=95)``, ``HausdorffDistanceMetric()`` and
    ``SurfaceDistanceMetric(symmetric=True)`` reduce them (the tests hold the two equal).
    """
    import torch
    from monai.metrics import compute_dice
    from monai.metrics.utils import get_edge_surface_distance

    pred_mask, ref_mask = _as_binary(pred, "prediction"), _as_binary(ref, "reference")
    if pred_mask.shape != ref_mask.shape:
        raise BadInputError(f"prediction shape {pred_mask.shape} differs from reference shape {ref_mask.shape}")
    spacing = [float(s) for s in spacing]
    if len(spacing) != pred_mask.ndim:
        raise BadInputError(f"spacing {spacing} does not match a {pred_mask.ndim}-D mask")
    voxel_ml = math.prod(spacing) / 1000.0
    pred_ml, ref_ml = float(pred_mask.sum()) * voxel_ml, float(ref_mask.sum()) * voxel_ml
    row: dict[str, float | None] = {
        "pred_volume_ml": pred_ml,
        "ref_volume_ml": ref_ml,
        "volume_error_ml": pred_ml - ref_ml,
        "volume_error_percent": 100.0 * (pred_ml - ref_ml) / ref_ml if ref_ml > 0 else None,
    }
    y_pred, y = torch.from_numpy(pred_mask), torch.from_numpy(ref_mask)
    row["dice"] = float(compute_dice(y_pred[None, None].float(), y[None, None].float(), include_background=True,
                                     ignore_empty=False)[0, 0])
    if pred_mask.any() and ref_mask.any():
        with warnings.catch_warnings():  # MONAI's own use of an argument it deprecated
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
            _, distances, _ = get_edge_surface_distance(y_pred, y, distance_metric="euclidean", spacing=spacing,
                                                        symmetric=True)
        pred_to_ref, ref_to_pred = (np.asarray(d.cpu().numpy(), dtype=np.float64) for d in distances)
        row["hd95_mm"] = max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))
        row["hd_mm"] = max(pred_to_ref.max(), ref_to_pred.max())
        row["assd_mm"] = float(np.concatenate([pred_to_ref, ref_to_pred]).mean())
    elif not pred_mask.any() and not ref_mask.any():
        row.update(hd95_mm=0.0, hd_mm=0.0, assd_mm=0.0)
    else:
        row.update(hd95_mm=None, hd_mm=None, assd_mm=None)
    return {name: (None if row[name] is None else round(float(row[name]), 6)) for name in METRICS}


def voxel_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size along each array axis: the lengths of the affine's first three columns."""
    from nibabel.affines import voxel_sizes

    return tuple(float(v) for v in voxel_sizes(np.asarray(affine, dtype=float)))


def same_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage,
              tolerance: float = GRID_TOLERANCE) -> bool:
    """True when two images share a shape and their affines agree within ``tolerance``."""
    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and np.allclose(a.affine, b.affine, atol=tolerance, rtol=0)


def read_binary_mask(path: str | os.PathLike[str]) -> tuple[np.ndarray, nib.spatialimages.SpatialImage]:
    """Read a 3D 0/1 mask file (integer or float 0.0/1.0); other labels are an error naming the file."""
    from spleenkit.inference import read_nifti

    image = read_nifti(path)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # noqa: BLE001 - any decoding failure is the file's fault
        raise BadInputError(f"cannot read the voxel data ({error})", path) from error
    data = data.reshape(data.shape[:3]) if data.ndim > 3 and all(s == 1 for s in data.shape[3:]) else data
    try:
        return _as_binary(data, "mask"), image
    except BadInputError as error:
        raise BadInputError(str(error), path) from None


def compare_mask_files(pred_path: str | os.PathLike[str], ref_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metrics between two mask files on the same grid (a different grid is an error, never resampled)."""
    pred, pred_image = read_binary_mask(pred_path)
    ref, ref_image = read_binary_mask(ref_path)
    if tuple(pred_image.shape[:3]) != tuple(ref_image.shape[:3]):
        raise BadInputError(f"grid differs from {ref_path}: shape {pred_image.shape[:3]} vs {ref_image.shape[:3]}",
                            pred_path)
    difference = float(np.abs(pred_image.affine - ref_image.affine).max())
    if difference > GRID_TOLERANCE:
        raise BadInputError(
            f"grid differs from {ref_path}: the affines differ by up to {difference:.4g} mm "
            f"(tolerance {GRID_TOLERANCE}); resample one onto the other first if that is what you mean", pred_path)
    spacing = voxel_spacing(ref_image.affine)
    return {"prediction": str(pred_path), "reference": str(ref_path), "shape": list(ref.shape),
            "spacing_mm": list(spacing), **mask_metrics(pred, ref, spacing)}


# --------------------------------------------------------------------------- summaries
def summarise(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean, sd, median, min, max and the worst case of each metric, per space.

    Rows are per-case dicts with ``case``, ``space`` (default "original") and the metrics; an
    undefined value (None/NaN, e.g. HD95 of an empty prediction) is counted, not averaged.
    """
    by_space: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_space.setdefault(str(row.get("space", "original")), []).append(row)
    summary: dict[str, Any] = {}
    for space, space_rows in by_space.items():
        stats: dict[str, Any] = {"cases": len(space_rows)}
        for metric in METRICS:
            pairs = [(str(r.get("case", i)), r.get(metric)) for i, r in enumerate(space_rows)]
            defined = [(c, float(v)) for c, v in pairs if v is not None and not math.isnan(float(v))]
            values = [v for _, v in defined]
            entry: dict[str, Any] = {"n": len(values), "undefined": len(pairs) - len(values)}
            if values:
                entry.update(mean=statistics.fmean(values), sd=statistics.stdev(values) if len(values) > 1 else 0.0,
                             median=statistics.median(values), min=min(values), max=max(values))
                rule = BETTER[metric]
                if rule != "none":
                    key = {"max": lambda p: p[1], "min": lambda p: -p[1], "abs": lambda p: -abs(p[1])}[rule]
                    worst_case, worst_value = min(defined, key=key)
                    entry["worst"] = {"case": worst_case, "value": worst_value}
            stats[metric] = entry
        summary[space] = stats
    return summary


def format_summary(summary: Mapping[str, Any], metrics: Sequence[str] = ("dice", "hd95_mm", "assd_mm",
                                                                         "volume_error_ml")) -> str:
    """The summary as a plain-text table (what ``spleenkit evaluate`` prints)."""
    header = f"{'metric':<18}{'space':<11}{'mean ± sd':>20}{'median':>10}  worst case"
    lines = [header, "-" * len(header)]
    for metric in metrics:
        for space, stats in summary.items():
            entry = stats.get(metric, {})
            if not entry.get("n"):
                lines.append(f"{metric:<18}{space:<11}{'undefined':>20}")
                continue
            worst = entry.get("worst")
            worst_text = f"{worst['value']:.3f} ({worst['case']})" if worst else ""
            undefined = f"  [{entry['undefined']} undefined]" if entry.get("undefined") else ""
            lines.append(f"{metric:<18}{space:<11}{entry['mean']:>11.3f} ± {entry['sd']:<6.3f}"
                         f"{entry['median']:>10.3f}  {worst_text}{undefined}")
    return "\n".join(lines)


def write_rows_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write per-case rows as CSV atomically (an undefined value is an empty cell)."""
    path = Path(path)
    columns = ["case", "space", *METRICS]
    columns += sorted({key for row in rows for key in row} - set(columns))

    def write(stream: Any) -> None:
        writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})

    return _atomic_text(path, write)


def read_rows_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a per-case CSV back into rows (numbers as floats, empty cells as None)."""
    rows = []
    with Path(path).open(newline="") as stream:
        for raw in csv.DictReader(stream):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if key in METRICS:
                    row[key] = float(value) if value not in ("", None) else None
                else:
                    row[key] = value
            rows.append(row)
    return rows


def _atomic_text(path: Path, write: Any) -> Path:
    """Call ``write(stream)`` on a temporary file beside ``path``, then rename it into place."""
    from spleenkit.io import atomic_write

    with atomic_write(path, "w") as stream:
        write(stream)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write JSON atomically; NaN and infinity become null so that any JSON reader accepts it."""
    return _atomic_text(Path(path), lambda stream: stream.write(json.dumps(_json_safe(data), indent=2) + "\n"))


# --------------------------------------------------------------------------- run evaluation
@dataclass
class EvaluationResult:
    """What :func:`evaluate_run` produced: per-case rows, their summary and where they were written."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    out_dir: Path
    csv_path: Path
    summary_path: Path
    prediction_paths: dict[str, Path] = field(default_factory=dict)
    figure_paths: list[Path] = field(default_factory=list)


def run_preset(run_dir: str | os.PathLike[str], fallback: Preset | str = "seed") -> Preset:
    """The preset a run was trained with, read from its manifest (``parameters.preset``), else ``fallback``."""
    from spleenkit.manifest import read_manifest

    try:
        parameters = read_manifest(run_dir).get("parameters", {})
    except (OSError, ValueError):
        return get_preset(fallback)
    stored = parameters.get("preset")
    try:
        if isinstance(stored, str):
            return get_preset(stored)
        if isinstance(stored, dict) and stored.get("name"):
            return Preset.from_dict(stored)
    except BadInputError as error:
        log.warning("the run's manifest names a preset that cannot be rebuilt (%s); using %s", error, fallback)
    return get_preset(fallback)


def select_cases(data_dir: str | os.PathLike[str], preset: Preset, split: str = "validation") -> list[dict[str, str]]:
    """The labelled cases to evaluate: the bundle's validation split (default), the training split, or all."""
    from spleenkit.data.datalist import load_datalist, split_datalist

    items = load_datalist(data_dir, "training")
    items = [item for item in items if "label" in item]
    if split == "all":
        return items
    if split not in ("validation", "training"):
        raise BadInputError(f"unknown split {split!r}; use validation, training or all")
    training, validation = split_datalist(items, preset.validation_cases)
    return validation if split == "validation" else training


def case_name(path: str | os.PathLike[str]) -> str:
    """``case_007`` for ``.../case_007.nii.gz``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def evaluate_case(network: torch.nn.Module, item: Mapping[str, str], preset: Preset, inferer: SlidingWindowInferer,
                  device: torch.device, amp: bool, largest_component: bool = False, fill_holes: bool = False,
                  preprocessing: Compose | None = None) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Score one labelled case in the resampled and the original space.

    Returns the two metric rows and the prediction on the original grid (uint8, the image file's voxel order).
    """
    from spleenkit.transforms import validation_transforms

    name = case_name(item["image"])
    preprocessing = preprocessing or validation_transforms(preset)
    reference, reference_image = read_binary_mask(item["label"])
    from spleenkit.inference import read_nifti

    if not same_grid(read_nifti(item["image"]), reference_image):
        raise BadInputError(f"the label is not on the image's grid ({item['image']})", item["label"])
    data = preprocessing({"image": item["image"], "label": item["label"]})
    started = time.perf_counter()
    logits = predict_logits(network, data["image"], inferer, device, amp)
    seconds = time.perf_counter() - started

    resampled = postprocessing(largest_component, fill_holes)({"pred": logits})["pred"]
    resampled_spacing = [float(s) for s in data["image"].pixdim]
    rows = [{"case": name, "space": "resampled",
             **mask_metrics(resampled[0], data["label"][0] > 0.5, resampled_spacing)}]

    original_mask = original_space_mask(logits, data["image"], preprocessing, reference_image.affine,
                                        reference.shape, largest_component, fill_holes)
    rows.append({"case": name, "space": "original",
                 **mask_metrics(original_mask, reference, voxel_spacing(reference_image.affine))})
    for row in rows:
        row["seconds"] = round(seconds, 2)
    log.info("%s: Dice %.3f (resampled) / %.3f (original), HD95 %s mm (original), %.1f s", name,
             rows[0]["dice"], rows[1]["dice"], _fmt(rows[1]["hd95_mm"]), seconds)
    return rows, original_mask


def label_round_trip(item: Mapping[str, str], preset: Preset | str = "seed",
                     preprocessing: Compose | None = None) -> dict[str, float | None]:
    """Metrics of a label against itself sent to the preset's grid and back (nearest neighbour).

    This is the best original-space score a perfect prediction in the resampled space can reach:
    resampling a label is lossy, which is why the two spaces give different numbers.
    """
    from monai.transforms import Invertd

    from spleenkit.transforms import validation_transforms

    preprocessing = preprocessing or validation_transforms(get_preset(preset))
    data = preprocessing({"image": item["image"], "label": item["label"]})
    back = Invertd(keys="label", transform=preprocessing, orig_keys="label", nearest_interp=True)(data)["label"]
    reference, reference_image = read_binary_mask(item["label"])
    return mask_metrics(np.asarray(back[0].cpu().numpy() > 0.5), reference, voxel_spacing(reference_image.affine))


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.1f}"


def evaluate_run(model: str | os.PathLike[str], data_dir: str | os.PathLike[str],
                 out_dir: str | os.PathLike[str] | None = None, preset: Preset | str | None = None,
                 split: str = "validation", device: str = "auto", amp: bool | None = None,
                 overlap: float | None = None, sw_batch_size: int | None = None, blend: str = "constant",
                 stitch_device: str = "cpu", largest_component: bool = False, fill_holes: bool = False,
                 save_predictions: bool = True, figures: bool = True,
                 max_cases: int | None = None, distributed: DistributedContext | None = None) -> EvaluationResult:
    """Evaluate ``model`` (a run's ``model.pt``) on a dataset split and write the results.

    Writes ``per_case.csv``, ``summary.json``, ``manifest.json`` and a per-case figure into
    ``out_dir`` (default ``RUN_DIR/evaluation``) and, with ``save_predictions``, each case's
    original-space mask into ``RUN_DIR/predictions``. The preset defaults to the run's own.
    Under torchrun (``distributed``), the cases are shared among the ranks and rank 0 writes everything.
    """
    from spleenkit.devices import pick_device
    from spleenkit.distributed import distributed_map
    from spleenkit.inference import check_writable, write_mask
    from spleenkit.manifest import build_manifest, now, write_manifest
    from spleenkit.model import load_model
    from spleenkit.transforms import validation_transforms

    model = Path(model)
    run_dir = model.parent
    preset = run_preset(run_dir) if preset is None else get_preset(preset)
    out = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    if distributed is None or distributed.is_main:
        check_writable(out)
    device_ = pick_device(device) if distributed is None else distributed.device
    amp = inference_amp(preset, device_, amp)
    network = inference_network(load_model(model, preset, device_), device_, preset.channels_last)
    cases = select_cases(data_dir, preset, split)
    if max_cases is not None:
        cases = cases[:max_cases]
    if not cases:
        raise BadInputError(f"no labelled cases in the {split} split", data_dir)
    inferer = make_inferer(preset, overlap, sw_batch_size, blend, device_, stitch_device)
    preprocessing = validation_transforms(preset)
    settings = {"model": str(model), "data_dir": str(data_dir), "preset": preset.name, "split": split,
                "device": str(device_), "amp": amp, "roi_size": list(preset.validation_roi_size),
                "overlap": inferer.overlap, "sw_batch_size": inferer.sw_batch_size, "blend": blend,
                "stitch_device": stitch_device, "largest_component": largest_component, "fill_holes": fill_holes}
    if distributed is not None:
        settings["processes"] = distributed.world_size
    started = now()
    log.info("evaluating %d %s case(s) with %s", len(cases), split, ", ".join(f"{k}={v}" for k, v in settings.items()
                                                                             if k not in ("model", "data_dir")))
    rows: list[dict[str, Any]] = []
    predictions: dict[str, Path] = {}

    def score(item: Mapping[str, str]) -> tuple[list[dict[str, Any]], np.ndarray]:
        return evaluate_case(network, item, preset, inferer, device_, amp, largest_component, fill_holes,
                             preprocessing)

    # one process: every case in turn; under torchrun: rank r scores cases r, r+N ... and rank 0 gets all
    for item, (case_rows, mask) in distributed_map(score, cases, distributed):
        rows.extend(case_rows)
        if save_predictions:
            name = case_rows[0]["case"]
            predictions[name] = write_mask(mask, item["image"], run_dir / "predictions" / f"{name}.nii.gz")
    if distributed is not None and not distributed.is_main:  # rank 0 writes the results
        return EvaluationResult([], {}, out, out / "per_case.csv", out / "summary.json")
    summary = summarise(rows)
    csv_path = write_rows_csv(rows, out / "per_case.csv")
    summary_path = write_json({"settings": settings, **summary}, out / "summary.json")
    figure_paths = []
    if figures:
        from spleenkit.visualization import per_case_metrics, save_figure

        figure_paths.append(save_figure(per_case_metrics(rows), out / "per_case_metrics.png"))
    write_manifest(out, build_manifest(settings, device=str(device_), started=started, finished=now(),
                                       preset=preset.to_dict(), outputs=[csv_path.name, summary_path.name]))
    return EvaluationResult(rows, summary, out, csv_path, summary_path, predictions, figure_paths)


"""Metrics of a predicted mask against a reference, their summaries over cases, and the per-case table.

Metrics use MONAI (Dice, ``HausdorffDistanceMetric(percentile=95)``, ``SurfaceDistanceMetric(symmetric=True)``)
with the voxel spacing, so distances are in mm.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spleenkit.errors import BadInputError
from spleenkit.images import GRID_TOLERANCE, as_binary_mask, read_binary_mask, voxel_spacing
from spleenkit.io import atomic_write

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

    pred_mask, ref_mask = as_binary_mask(pred, "prediction"), as_binary_mask(ref, "reference")
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


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
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

    with atomic_write(path, "w") as stream:
        write(stream)
    return path


SPACES = ("resampled", "original")

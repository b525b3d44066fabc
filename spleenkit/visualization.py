"""Figures for CT volumes, masks, metrics and training runs; and the optional 3D viewer behind one function.

Every function returns a matplotlib ``Figure`` built without pyplot: no global figure state, no
backend chosen on import, PNG rendering through Agg in scripts and CI, and an inline picture when
a notebook shows the returned figure. Pass ``save=PATH`` (or call :func:`save_figure`) for a PNG.

Slices are shown in the radiological convention, with the sides labelled: axial and coronal
views show the patient's right on the screen's left, anterior (or superior) at the top. Give
``affine`` (the image's) and the volume is turned to RAS first, so a flipped axis in the file is
undone for display, exactly as a viewer such as 3D Slicer would do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from spleenkit import environment
from spleenkit.errors import BadInputError
from spleenkit.io import write_with
from spleenkit.metrics import mask_metrics, read_rows_csv
from spleenkit.runs import METRICS_NAME, read_metrics

log = logging.getLogger(__name__)

#: Colour-blind-safe colours (Okabe-Ito).
COLOURS = {"mask": "#E69F00", "reference": "#56B4E9", "tp": "#009E73", "fp": "#D55E00", "fn": "#0072B2",
           "resampled": "#999999", "original": "#0072B2"}
CT_WINDOW = (-160.0, 240.0)  # soft tissue: level 40, width 400 HU
PLANES = ("axial", "coronal", "sagittal")


class KitFigure(Figure):
    """A Figure that shows itself as a PNG in Jupyter without pyplot or a chosen backend."""

    def _repr_png_(self) -> bytes:
        import io

        buffer = io.BytesIO()
        self.savefig(buffer, format="png", bbox_inches="tight")
        return buffer.getvalue()


def new_figure(width: float = 10.0, height: float = 4.0, **kwargs: Any) -> KitFigure:
    """A fresh figure of ``width`` x ``height`` inches with constrained layout."""
    return KitFigure(figsize=(width, height), layout="constrained", **kwargs)


def save_figure(figure: Figure, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Save ``figure`` as a PNG atomically (a temporary file renamed into place) and return the path."""
    return write_with(path, lambda temporary: figure.savefig(temporary, format="png", dpi=dpi, bbox_inches="tight"))


def _rgb(colour: str) -> np.ndarray:
    """``#RRGGBB`` as three floats in [0, 1]."""
    return np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])


def _finish(figure: Figure, save: str | os.PathLike[str] | None) -> Figure:
    if save is not None:
        save_figure(figure, save)
    return figure


# --------------------------------------------------------------------------- volumes in RAS
def _array(volume: Any) -> np.ndarray:
    """A 3D numpy array from a numpy array, a tensor (channel of size 1 dropped) or a nibabel image."""
    if hasattr(volume, "dataobj"):
        volume = np.asanyarray(volume.dataobj)
    elif hasattr(volume, "detach"):
        volume = volume.detach().cpu().numpy()
    array = np.asarray(volume)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def to_ras(volume: Any, affine: np.ndarray | None = None,
           spacing: Sequence[float] | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The volume with its axes turned to R, A, S (by the affine's nearest axes) and its voxel size.

    Without an affine the volume is taken to be in RAS already, with ``spacing`` (default 1 mm).
    """
    from nibabel.affines import voxel_sizes
    from nibabel.orientations import apply_orientation, io_orientation

    array = _array(volume)
    if affine is None:
        return array, tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0)))  # type: ignore[return-value]
    affine = np.asarray(affine, dtype=float)
    orientation = io_orientation(affine)
    sizes = voxel_sizes(affine)
    ras_spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(orientation):
        ras_spacing[int(target)] = float(sizes[axis])
    return apply_orientation(array, orientation), tuple(ras_spacing)  # type: ignore[return-value]


def _plane(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A 2D slice of a RAS volume, ready for ``imshow(origin="lower")`` in the radiological convention."""
    if plane == "axial":
        return volume[:, :, index].T[:, ::-1]      # rows: P->A (up), columns: R->L
    if plane == "coronal":
        return volume[:, index, :].T[:, ::-1]      # rows: I->S (up), columns: R->L
    return volume[index, :, :].T[:, ::-1]          # sagittal: rows: I->S (up), columns: A->P


_SIDES = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}


def _aspect(plane: str, spacing: Sequence[float]) -> float:
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[plane]


def _label_sides(ax: Any, plane: str) -> None:
    left, right, top, bottom = _SIDES[plane]
    style = {"color": "white", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.set_xticks([])
    ax.set_yticks([])


def centre_of(mask: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """The voxel at the centroid of ``mask`` (the volume's centre when the mask is empty or missing)."""
    if mask is not None and mask.any():  # from per-axis counts: no coordinate list for a large mask
        counts = [mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64) for axis in range(3)]
        return tuple(int(round(float((np.arange(len(c)) * c).sum() / c.sum()))) for c in counts)  # type: ignore
    return tuple(s // 2 for s in shape)  # type: ignore[return-value]


def _outline(ax: Any, mask2d: np.ndarray, colour: str, style: str = "solid", width: float = 1.4) -> None:
    if mask2d.any():
        ax.contour(mask2d.astype(float), levels=[0.5], colors=[colour], linewidths=width, linestyles=style)


def _show(ax: Any, slice2d: np.ndarray, plane: str, spacing: Sequence[float], window: Sequence[float]) -> None:
    ax.imshow(slice2d, cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
              aspect=_aspect(plane, spacing), interpolation="nearest")
    ax.set_facecolor("black")


# --------------------------------------------------------------------------- figures of a volume
def three_plane(image: Any, mask: Any | None = None, reference: Any | None = None, affine: np.ndarray | None = None,
                spacing: Sequence[float] | None = None, centre: Sequence[int] | None = None,
                window: Sequence[float] = CT_WINDOW, title: str | None = None,
                save: str | os.PathLike[str] | None = None) -> Figure:
    """Axial, coronal and sagittal slices through ``centre`` (default: the mask's centroid), mask outlined.

    ``mask`` is drawn in orange, an optional ``reference`` in dashed blue. Arrays share one grid;
    with ``affine`` they are turned to RAS first.
    """
    volume, voxel = to_ras(image, affine, spacing)
    masks = [(to_ras(m, affine, spacing)[0] > 0.5) if m is not None else None for m in (mask, reference)]
    centre = tuple(centre) if centre is not None else centre_of(masks[0] if masks[0] is not None else masks[1],
                                                                 volume.shape)
    figure = new_figure(12, 4.4)
    axes = figure.subplots(1, 3)
    for ax, plane in zip(axes, PLANES, strict=True):
        index = int(np.clip(centre[_AXIS[plane]], 0, volume.shape[_AXIS[plane]] - 1))
        _show(ax, _plane(volume, plane, index), plane, voxel, window)
        if masks[1] is not None:
            _outline(ax, _plane(masks[1], plane, index), COLOURS["reference"], "dashed")
        if masks[0] is not None:
            _outline(ax, _plane(masks[0], plane, index), COLOURS["mask"])
        _label_sides(ax, plane)
        ax.set_title(f"{plane} (slice {index})", fontsize=10)
    if title:
        figure.suptitle(title)
    return _finish(figure, save)


def error_map(image: Any, pred: Any, ref: Any, affine: np.ndarray | None = None,
              spacing: Sequence[float] | None = None, window: Sequence[float] = CT_WINDOW,
              title: str | None = None, save: str | os.PathLike[str] | None = None) -> Figure:
    """Prediction against reference on the slices with the most errors: false positives in
    vermilion, false negatives in blue, agreement in green."""
    from matplotlib.patches import Patch

    volume, voxel = to_ras(image, affine, spacing)
    predicted = to_ras(pred, affine, spacing)[0] > 0.5
    truth = to_ras(ref, affine, spacing)[0] > 0.5
    false_positive, false_negative = predicted & ~truth, ~predicted & truth
    errors = false_positive | false_negative
    voxel_ml = float(np.prod(voxel)) / 1000
    colours = {name: _rgb(COLOURS[name]) for name in ("tp", "fp", "fn")}
    figure = new_figure(12, 4.8)
    axes = figure.subplots(1, 3)
    for ax, plane in zip(axes, PLANES, strict=True):
        axis = _AXIS[plane]
        others = tuple(a for a in range(3) if a != axis)
        counts = errors.sum(axis=others) if errors.any() else (predicted | truth).sum(axis=others)
        index = int(np.argmax(counts)) if counts.any() else volume.shape[axis] // 2
        _show(ax, _plane(volume, plane, index), plane, voxel, window)
        layer = np.zeros((*_plane(volume, plane, index).shape, 4))
        for name, region, alpha in (("tp", predicted & truth, 0.35), ("fp", false_positive, 0.85),
                                    ("fn", false_negative, 0.85)):
            section = _plane(region, plane, index)
            layer[section, :3] = colours[name]
            layer[section, 3] = alpha
        ax.imshow(layer, origin="lower", aspect=_aspect(plane, voxel), interpolation="nearest")
        _label_sides(ax, plane)
        ax.set_title(f"{plane} (slice {index})", fontsize=10)
    fp_ml, fn_ml = false_positive.sum() * voxel_ml, false_negative.sum() * voxel_ml
    figure.legend(handles=[Patch(color=COLOURS["tp"], label="agree (TP)"),
                           Patch(color=COLOURS["fp"], label=f"false positive {fp_ml:.1f} mL"),
                           Patch(color=COLOURS["fn"], label=f"false negative {fn_ml:.1f} mL")],
                  loc="outside lower center", ncol=3, frameon=False)
    figure.suptitle(title or "prediction vs reference")
    return _finish(figure, save)


def montage(image: Any, mask: Any | None = None, reference: Any | None = None, affine: np.ndarray | None = None,
            spacing: Sequence[float] | None = None, slices: int = 12, columns: int = 6,
            window: Sequence[float] = CT_WINDOW, title: str | None = None,
            save: str | os.PathLike[str] | None = None) -> Figure:
    """Axial slices evenly spaced through the spleen (the mask's, else the reference's, top-to-bottom extent)."""
    volume, voxel = to_ras(image, affine, spacing)
    masks = [(to_ras(m, affine, spacing)[0] > 0.5) if m is not None else None for m in (mask, reference)]
    guide = next((m for m in masks if m is not None and m.any()), None)
    if guide is not None:
        levels = np.nonzero(guide.any(axis=(0, 1)))[0]
        low, high = int(levels.min()), int(levels.max())
    else:
        low, high = 0, volume.shape[2] - 1
    chosen = np.unique(np.linspace(high, low, num=max(1, slices)).round().astype(int))[::-1]
    rows = int(np.ceil(len(chosen) / columns))
    figure = new_figure(2.2 * min(columns, len(chosen)), 2.3 * rows + 0.4)
    axes = np.atleast_1d(figure.subplots(rows, min(columns, len(chosen)), squeeze=False)).ravel()
    for ax, index in zip(axes, chosen, strict=False):
        _show(ax, _plane(volume, "axial", index), "axial", voxel, window)
        if masks[1] is not None:
            _outline(ax, _plane(masks[1], "axial", index), COLOURS["reference"], "dashed", 1.0)
        if masks[0] is not None:
            _outline(ax, _plane(masks[0], "axial", index), COLOURS["mask"], width=1.0)
        ax.set_title(f"slice {index}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(chosen):]:
        ax.set_axis_off()
    figure.suptitle(title or "axial slices through the spleen (superior first; patient's right on the left)")
    return _finish(figure, save)


def maximum_intensity_projection(image: Any, mask: Any | None = None, affine: np.ndarray | None = None,
                                 spacing: Sequence[float] | None = None, window: Sequence[float] = (-200.0, 800.0),
                                 title: str | None = None, save: str | os.PathLike[str] | None = None) -> Figure:
    """Coronal and sagittal maximum-intensity projections with the mask's silhouette outlined:
    the static stand-in for a 3D view."""
    volume, voxel = to_ras(image, affine, spacing)
    outline = to_ras(mask, affine, spacing)[0] > 0.5 if mask is not None else None
    figure = new_figure(9, 4.8)
    axes = figure.subplots(1, 2)
    for ax, plane in zip(axes, ("coronal", "sagittal"), strict=True):
        axis = _AXIS[plane]
        projection = np.expand_dims(volume.max(axis=axis), axis)
        _show(ax, _plane(projection, plane, 0), plane, voxel, window)
        if outline is not None:
            _outline(ax, _plane(np.expand_dims(outline.any(axis=axis), axis), plane, 0), COLOURS["mask"])
        _label_sides(ax, plane)
        ax.set_title(f"{plane} maximum-intensity projection", fontsize=10)
    figure.suptitle(title or "3D overview (static): bone and contrast are brightest; spleen outlined")
    return _finish(figure, save)


def show_3d(image: Any, mask: Any | None = None, affine: np.ndarray | None = None,
            spacing: Sequence[float] | None = None, renderer: str = "slices", **kwargs: Any) -> Any:
    """An interactive view in a live Jupyter session, else (papermill, CI, scripts) a static projection figure.

    ``renderer="slices"`` (the default) is the offline :class:`SliceViewer` (three planes, sliders, a
    mask toggle), which works in JupyterLab, Binder and Colab without internet. ``renderer="itk"`` asks
    for itkwidgets' 3D rendering (``pip install 'spleenkit[viewer]'``; it loads its viewer from the
    internet), with the slice viewer when itkwidgets cannot be imported. Nothing interactive starts unless
    :func:`spleenkit.environment.is_interactive` is True: a widget in a headless run waits for a front end.
    """
    if renderer not in ("slices", "itk"):
        raise BadInputError(f"renderer {renderer!r}: use 'slices' (offline, the default) or 'itk' (itkwidgets)")
    volume, voxel = to_ras(image, affine, spacing)
    outline = None if mask is None else (to_ras(mask, affine, spacing)[0] > 0.5).astype(np.uint8)
    if not environment.is_interactive():
        return maximum_intensity_projection(volume, outline, spacing=voxel)
    if renderer == "itk":
        try:
            from itkwidgets import view
        except ImportError:
            log.info("itkwidgets is not installed (pip install 'spleenkit[viewer]'); showing the slice viewer")
        else:
            # itkwidgets reads arrays in z, y, x order; a spatial image also carries the voxel size
            options: dict[str, Any] = {"image": np.ascontiguousarray(volume.transpose(2, 1, 0).astype(np.float32))}
            if outline is not None:
                options["label_image"] = np.ascontiguousarray(outline.transpose(2, 1, 0))
            try:
                from spatial_image import to_spatial_image
            except ImportError:
                pass
            else:
                scale = {"z": voxel[2], "y": voxel[1], "x": voxel[0]}
                options = {key: to_spatial_image(value, dims=("z", "y", "x"), scale=scale)
                           for key, value in options.items()}
            return view(**options, **kwargs)
        kwargs = {}  # itkwidgets' options mean nothing to the slice viewer
    return slice_viewer(volume, outline, spacing=voxel, **kwargs)


# --------------------------------------------------------------------------- figures of runs and metrics
def _read_run_metrics(source: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The epochs of a run (:func:`spleenkit.runs.read_metrics`); a run with none yet is an error for a figure."""
    records = read_metrics(source)
    if not records:
        path = Path(source) / METRICS_NAME if Path(source).is_dir() else Path(source)
        raise BadInputError("no epochs in metrics.jsonl (has the run trained an epoch yet?)", path)
    return records


def training_curves(source: str | os.PathLike[str] | Iterable[Mapping[str, Any]], title: str | None = None,
                    save: str | os.PathLike[str] | None = None) -> Figure:
    """Loss and validation Dice per epoch (and the learning rate when it changes) from ``metrics.jsonl``."""
    records = _read_run_metrics(source) if isinstance(source, (str, os.PathLike)) else list(source)

    def series(key: str) -> tuple[list[float], list[float]]:
        pairs = [(r.get("epoch", i + 1), r.get(key)) for i, r in enumerate(records)]
        pairs = [(float(e), float(v)) for e, v in pairs if v is not None]
        return [e for e, _ in pairs], [v for _, v in pairs]

    learning_rates = series("lr")[1]
    show_lr = len(set(learning_rates)) > 1
    figure = new_figure(11 if show_lr else 8.5, 3.6)
    axes = figure.subplots(1, 3 if show_lr else 2)
    epochs, losses = series("loss")
    axes[0].plot(epochs, losses, marker=".", color=COLOURS["fn"])
    axes[0].set(xlabel="epoch", ylabel="training loss", title="loss")
    val_epochs, dice = series("val_dice")
    axes[1].plot(val_epochs, dice, marker="o", color=COLOURS["tp"])
    if dice:
        best = int(np.argmax(dice))
        axes[1].annotate(f"best {dice[best]:.3f}", (val_epochs[best], dice[best]), textcoords="offset points",
                         xytext=(0, -14), ha="center", fontsize=8)
    axes[1].set(xlabel="epoch", ylabel="validation Dice", title="validation Dice", ylim=(0, 1))
    if show_lr:
        lr_epochs, rates = series("lr")
        axes[2].plot(lr_epochs, rates, color=COLOURS["mask"])
        axes[2].set(xlabel="epoch", ylabel="learning rate", title="learning rate", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    return _finish(figure, save)


_METRIC_LABELS = {"dice": "Dice", "hd95_mm": "HD95 (mm)", "hd_mm": "Hausdorff (mm)", "assd_mm": "ASSD (mm)",
                  "volume_error_ml": "volume error (mL)", "volume_error_percent": "volume error (%)",
                  "pred_volume_ml": "predicted volume (mL)", "ref_volume_ml": "reference volume (mL)"}


def per_case_metrics(rows: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
                     metrics: Sequence[str] = ("dice", "hd95_mm", "assd_mm", "volume_error_ml"),
                     title: str | None = None, save: str | os.PathLike[str] | None = None) -> Figure:
    """One panel per metric, one column per case (sorted by original-space Dice), one marker per space."""
    if isinstance(rows, (str, os.PathLike)):
        rows = read_rows_csv(rows)
    rows = list(rows)
    spaces = list(dict.fromkeys(str(r.get("space", "original")) for r in rows))
    cases = list(dict.fromkeys(str(r["case"]) for r in rows))
    lookup = {(str(r["case"]), str(r.get("space", "original"))): r for r in rows}
    key_space = "original" if "original" in spaces else spaces[0]

    def value(case: str, space: str, metric: str) -> float:
        found = lookup.get((case, space), {}).get(metric)
        return float("nan") if found is None else float(found)

    cases.sort(key=lambda c: value(c, key_space, "dice"))
    figure = new_figure(max(6.0, 2.6 * len(metrics)), 3.6)
    axes = np.atleast_1d(figure.subplots(1, len(metrics)))
    positions = np.arange(len(cases))
    for ax, metric in zip(axes, metrics, strict=True):
        for offset, space in zip(np.linspace(-0.12, 0.12, len(spaces)), spaces, strict=True):
            ax.plot(positions + offset, [value(c, space, metric) for c in cases], "o", label=space,
                    color=COLOURS.get(space, None), markerfacecolor="white" if space == "resampled" else None)
        ax.set_xticks(positions, cases, rotation=60, ha="right", fontsize=7)
        ax.set_title(_METRIC_LABELS.get(metric, metric), fontsize=10)
        if metric == "dice":
            ax.set_ylim(min(0.0, np.nanmin([value(c, s, metric) for c in cases for s in spaces] or [0])), 1.0)
        if metric.startswith("volume_error"):
            ax.axhline(0, color="black", linewidth=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="space", title_fontsize=8)
    figure.suptitle(title or f"per-case metrics ({len(cases)} cases, worst Dice on the left)")
    return _finish(figure, save)


def illustrate_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0),
                       title: str | None = None, save: str | os.PathLike[str] | None = None) -> Figure:
    """Pictures of what Dice, HD95 and ASSD measure, on two 2D masks (a slice or a drawn example).

    Left: overlap (Dice = 2·|A∩B| / (|A|+|B|)). Middle: every boundary point of each mask coloured
    by its distance to the other mask's boundary. Right: the histogram of those distances with
    their mean (ASSD) and the 95th percentile per direction (HD95 is the larger of the two).
    """
    from matplotlib.patches import Patch
    from scipy import ndimage

    a, b = np.asarray(pred) > 0.5, np.asarray(ref) > 0.5
    scores = mask_metrics(a, b, spacing)
    spacing = [float(s) for s in spacing]
    if (a | b).any():  # show the neighbourhood of the masks, not the whole slice
        low = np.maximum(np.argwhere(a | b).min(axis=0) - 6, 0)
        high = np.argwhere(a | b).max(axis=0) + 7
        a, b = a[low[0]:high[0], low[1]:high[1]], b[low[0]:high[0], low[1]:high[1]]

    def boundary(mask: np.ndarray) -> np.ndarray:
        return mask ^ ndimage.binary_erosion(mask)

    edge_a, edge_b = boundary(a), boundary(b)
    to_b = ndimage.distance_transform_edt(~edge_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~edge_a, sampling=spacing)
    d_ab, d_ba = to_b[edge_a], to_a[edge_b]
    figure = new_figure(13, 4.3)
    axes = figure.subplots(1, 3)
    overlap = np.zeros((*a.shape, 3)) + 1.0
    for colour, region in ((COLOURS["tp"], a & b), (COLOURS["fp"], a & ~b), (COLOURS["fn"], ~a & b)):
        overlap[region] = _rgb(colour)
    aspect = spacing[0] / spacing[1]
    axes[0].imshow(overlap.transpose(1, 0, 2), origin="lower", aspect=aspect, interpolation="nearest")
    axes[0].set_title(f"Dice = 2·|A∩B| / (|A|+|B|) = {scores['dice']:.3f}", fontsize=10)
    axes[0].legend(handles=[Patch(color=COLOURS["tp"], label="A∩B (both)"),
                            Patch(color=COLOURS["fp"], label="only A (prediction)"),
                            Patch(color=COLOURS["fn"], label="only B (reference)")], fontsize=7,
                   loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=3, frameon=False)
    axes[1].imshow(np.zeros(a.shape).T, cmap="gray_r", origin="lower", aspect=aspect)
    points = [np.argwhere(edge_a), np.argwhere(edge_b)]
    limit = max(float(d_ab.max(initial=0)), float(d_ba.max(initial=0)), 1e-6)
    for coordinates, distances, marker in ((points[0], d_ab, "o"), (points[1], d_ba, "s")):
        shown = axes[1].scatter(coordinates[:, 0], coordinates[:, 1], c=distances, cmap="viridis", vmin=0,
                                vmax=limit, s=9, marker=marker)
    figure.colorbar(shown, ax=axes[1], label="distance to the other boundary (mm)", shrink=0.8)
    axes[1].set_title("boundary points: o = A, □ = B", fontsize=10)
    everything = np.concatenate([d_ab, d_ba])
    axes[2].hist([d_ab, d_ba], bins=25, stacked=True, color=[COLOURS["fp"], COLOURS["fn"]],
                 label=["A → B", "B → A"])
    axes[2].axvline(float(everything.mean()) if everything.size else 0, color="black",
                    label=f"ASSD (mean of all) = {scores['assd_mm'] or 0:.2f} mm")
    hd95 = max(np.percentile(d_ab, 95) if d_ab.size else 0, np.percentile(d_ba, 95) if d_ba.size else 0)
    axes[2].axvline(float(hd95), color="black", linestyle="--",
                    label=f"HD95 (larger 95th percentile) = {scores['hd95_mm'] or 0:.2f} mm")
    axes[2].axvline(float(everything.max(initial=0)), color="grey", linestyle=":",
                    label=f"Hausdorff (max) = {scores['hd_mm'] or 0:.2f} mm")
    axes[2].set(xlabel="boundary distance (mm)", ylabel="boundary points")
    axes[2].legend(fontsize=7)
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(title or "what the metrics measure")
    return _finish(figure, save)


# --------------------------------------------------------------------------- intensities (used by notebook 01)
def intensity_histogram(image: Any, mask: Any, window: Sequence[float] | None = None, body_above: float = -500.0,
                        hu_range: Sequence[float] = (-300.0, 700.0), bins: int = 100, title: str | None = None,
                        save: str | os.PathLike[str] | None = None) -> Figure:
    """HU histograms of the spleen and of the rest of the body (air below ``body_above`` left out), as densities.

    With ``window`` (a preset's ``intensity_range``) the window is shaded: the voxels it keeps are
    the ones the network sees with contrast; everything outside is clipped to 0 or 1.
    """
    volume = _array(image).astype(np.float32)
    spleen = _array(mask) > 0.5
    body = (volume > body_above) & ~spleen
    figure = new_figure(8, 3.6)
    ax = figure.subplots()
    for values, colour, label in ((volume[body], "#555555", "rest of the body"),
                                  (volume[spleen], COLOURS["mask"], "spleen")):
        if values.size:
            ax.hist(values, bins=bins, range=tuple(hu_range), density=True, histtype="stepfilled", alpha=0.45,
                    color=colour, label=f"{label}: median {np.median(values):.0f} HU")
    if window is not None:
        ax.axvspan(float(window[0]), float(window[1]), color=COLOURS["reference"], alpha=0.15,
                   label=f"intensity window {window[0]:g}..{window[1]:g} HU")
    ax.set(xlabel="Hounsfield units (HU)", ylabel="fraction of voxels (density)", xlim=tuple(hu_range))
    ax.legend(fontsize=8)
    ax.set_title(title or "intensities: spleen against the rest of the body", fontsize=10)
    return _finish(figure, save)


def example_masks_2d(size: int = 64, shift: int = 3, island: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Two drawn 2D masks for teaching: a reference ellipse and a prediction shifted by ``shift``
    pixels, with a small false-positive ``island`` far away (Hausdorff jumps, HD95 and ASSD barely move)."""
    y, x = np.mgrid[0:size, 0:size]
    reference = ((x - size * 0.45) / (size * 0.28)) ** 2 + ((y - size * 0.5) / (size * 0.2)) ** 2 < 1
    prediction = ((x - size * 0.45 - shift) / (size * 0.27)) ** 2 + ((y - size * 0.5 + 1) / (size * 0.21)) ** 2 < 1
    if island:
        prediction |= ((x - size * 0.88) ** 2 + (y - size * 0.82) ** 2) < (size * 0.02) ** 2
    return prediction.T.copy(), reference.T.copy()


# --------------------------------------------------------------------------- several processes
def data_parallel_diagram(processes: int = 2, save: str | os.PathLike[str] | None = None) -> Figure:
    """How data-parallel training works: each process trains a copy of the UNet on its share of the
    cases, DDP averages the gradients (all-reduce), every copy takes the same step, rank 0 writes."""
    from matplotlib.patches import FancyBboxPatch

    processes = max(1, int(processes))
    shown = min(processes, 4)
    rows = [1.25 * (shown - 1 - i) for i in range(shown)]  # centre heights, rank 0 at the top
    low, high = -0.4, rows[0] + 0.4
    middle = (low + high) / 2
    figure = new_figure(10, 1.2 + 1.05 * shown)
    ax = figure.subplots()
    ax.set_axis_off()
    ax.set(xlim=(-0.05, 9.35), ylim=(low - 0.1, high + 0.45))

    def box(x: float, y: float, w: float, h: float, text: str, colour: str, size: int = 8) -> None:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04,rounding_size=0.08",
                                    facecolor=(*_rgb(colour), 0.25), edgecolor=colour, linewidth=1.2))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)

    def arrow(x0: float, y0: float, x1: float, y1: float) -> None:
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "#444444", "lw": 1})

    box(0.0, middle - 0.45, 1.3, 0.9, "training\ncases", "#999999")
    box(6.4, low, 1.1, high - low, "all-reduce:\naverage the\ngradients", COLOURS["reference"])
    for i, y in enumerate(rows):
        rank = processes - 1 if i == shown - 1 else i  # with many processes, the last row is the last rank
        label = f"rank {rank}" + ("\n(writes the run folder)" if rank == 0 else "")
        box(1.75, y - 0.3, 1.25, 0.6, f"share {rank + 1} of {processes}\n(its own cases)", COLOURS["mask"])
        box(3.3, y - 0.3, 1.35, 0.6, f"UNet copy\n{label}", COLOURS["tp"], 7)
        box(4.95, y - 0.3, 1.15, 0.6, "loss and\ngradients", COLOURS["fn"])
        box(7.85, y - 0.3, 1.35, 0.6, "the same update\non every copy", COLOURS["tp"])
        arrow(1.3, middle, 1.75, y)
        arrow(3.0, y, 3.3, y)
        arrow(4.65, y, 4.95, y)
        arrow(6.1, y, 6.4, y)
        arrow(7.5, y, 7.85, y)
    if shown < processes:
        ax.text(3.97, (rows[-2] + rows[-1]) / 2, f"... {processes - shown} more ...", ha="center", va="center",
                fontsize=8)
    ax.text(4.6, high + 0.4, f"{processes} processes (one per GPU, or CPU processes): global batch = "
            f"{processes} x the batch of one process", ha="center", va="top", fontsize=9)
    return _finish(figure, save)


def compare_runs(runs: Mapping[str, str | os.PathLike[str] | Iterable[Mapping[str, Any]]],
                 save: str | os.PathLike[str] | None = None) -> Figure:
    """Training loss and seconds per epoch of several runs side by side (e.g. 1 process against 2)."""
    palette = [COLOURS["fn"], COLOURS["mask"], COLOURS["tp"], COLOURS["fp"], COLOURS["reference"]]
    figure = new_figure(10, 3.6)
    loss_ax, time_ax = figure.subplots(1, 2)
    names = list(runs)
    for index, name in enumerate(names):
        source = runs[name]
        records = _read_run_metrics(source) if isinstance(source, (str, os.PathLike)) else list(source)
        epochs = [float(r.get("epoch", i + 1)) for i, r in enumerate(records)]
        colour = palette[index % len(palette)]
        loss_ax.plot(epochs, [float(r["loss"]) for r in records], marker=".", color=colour, label=name)
        seconds = [float(r.get("seconds", float("nan"))) for r in records]
        time_ax.bar(np.asarray(epochs) + (index - (len(names) - 1) / 2) * 0.8 / len(names), seconds,
                    width=0.8 / len(names), color=colour, label=name)
    from matplotlib.ticker import MaxNLocator

    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss per epoch")
    time_ax.set(xlabel="epoch", ylabel="seconds", title="time per epoch (training + validation)")
    for ax in (loss_ax, time_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _finish(figure, save)


# --------------------------------------------------------------------------- preprocessing and crops (notebook 02)
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def transform_steps(steps: Sequence[Mapping[str, Any]], save: str | os.PathLike[str] | None = None) -> Figure:
    """One axial slice through the spleen after each preprocessing step, drawn as the array is stored
    (first axis to the right, second up) with each edge named by the orientation codes; titled with the
    step, the shape, the voxel size and the orientation. ``steps`` as from ``transforms.trace_transforms``."""
    figure = new_figure(2.5 * len(steps), 3.6)
    axes = np.atleast_1d(figure.subplots(1, len(steps)))
    for number, (ax, step) in enumerate(zip(axes, steps, strict=True), start=1):
        image = _array(step["image"]).astype(np.float32)
        label = _array(step["label"]) > 0.5 if step.get("label") is not None else None
        index = centre_of(label, image.shape)[2]
        scaled = float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        window = (0.0, 1.0) if scaled else CT_WINDOW
        spacing = step.get("spacing", (1.0, 1.0, 1.0))
        ax.imshow(image[:, :, index].T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
                  aspect=float(spacing[1]) / float(spacing[0]), interpolation="nearest")
        if label is not None:
            _outline(ax, label[:, :, index].T, COLOURS["mask"], width=1.0)
        codes = str(step.get("orientation", "???"))
        style = {"color": "white", "fontsize": 8, "fontweight": "bold", "transform": ax.transAxes}
        ax.text(0.98, 0.5, codes[0], ha="right", va="center", **style)
        ax.text(0.02, 0.5, _OPPOSITE.get(codes[0], "?"), ha="left", va="center", **style)
        ax.text(0.5, 0.98, codes[1], ha="center", va="top", **style)
        ax.text(0.5, 0.02, _OPPOSITE.get(codes[1], "?"), ha="center", va="bottom", **style)
        ax.set_xticks([])
        ax.set_yticks([])
        shape = "x".join(str(s) for s in step.get("spatial_shape", image.shape))
        size = "x".join(f"{float(s):g}" for s in spacing)
        ax.set_title(f"{number}. {step.get('step', '')}\n{shape} voxels\n{size} mm, {codes}\n"
                     f"values {float(image.min()):.4g}..{float(image.max()):.4g}", fontsize=8)
    figure.suptitle("after each step: the slice through the spleen, as stored (window: HU until scaled, then 0..1)",
                    fontsize=10)
    return _finish(figure, save)


def crop_samples(samples: Sequence[Mapping[str, Any]], columns: int = 4,
                 save: str | os.PathLike[str] | None = None) -> Figure:
    """The middle axial slice of each training crop with the spleen outlined and its share of the crop:
    what RandCropByPosNegLabeld feeds the network. (A centre drawn near the border is moved inward so the
    crop fits the image, so the marked centre is not always the voxel that was drawn.)"""
    columns = max(1, min(columns, len(samples)))
    rows = int(np.ceil(len(samples) / columns))
    figure = new_figure(2.4 * columns, 2.5 * rows + 0.4)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, sample in zip(axes, samples, strict=False):
        image = _array(sample["image"]).astype(np.float32)
        label = _array(sample["label"]) > 0.5
        middle = tuple(s // 2 for s in label.shape)
        positive = bool(label[middle])
        ax.imshow(image[:, :, middle[2]].T, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
        _outline(ax, label[:, :, middle[2]].T, COLOURS["mask"], width=1.0)
        ax.plot([middle[0]], [middle[1]], marker="+", color=COLOURS["tp"] if positive else COLOURS["fp"], ms=9)
        share = 100.0 * float(label.mean())
        ax.set_title(f"spleen {share:.1f}% of the crop" + (" (centre in it)" if positive else ""), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(samples):]:
        ax.set_axis_off()
    figure.suptitle("training crops (+ marks the crop centre; spleen outlined)", fontsize=10)
    return _finish(figure, save)


# --------------------------------------------------------------------------- the offline interactive viewer
class SliceViewer:
    """Three planes of a CT with a slider for each and a toggle for the mask's outline, in a notebook.

    Built on ipywidgets (a slider, a checkbox and a PNG image) and the kit's :func:`three_plane` figure,
    so it needs nothing from the internet and works wherever ipywidgets does: JupyterLab, Binder, Colab,
    VS Code. Each change redraws the figure once (the sliders update on release). Show it by leaving it
    as a cell's last value; ``viewer.widget`` is the ipywidgets box.
    """

    def __init__(self, image: Any, mask: Any | None = None, affine: np.ndarray | None = None,
                 spacing: Sequence[float] | None = None, window: Sequence[float] = CT_WINDOW,
                 centre: Sequence[int] | None = None, title: str | None = None) -> None:
        import ipywidgets as widgets

        self.volume, self.voxel = to_ras(image, affine, spacing)
        self.mask = None if mask is None else to_ras(mask, affine, spacing)[0] > 0.5
        self.window = tuple(window)
        self.title = title
        start = tuple(centre) if centre is not None else centre_of(self.mask, self.volume.shape)
        self.sliders = {
            plane: widgets.IntSlider(value=int(np.clip(start[_AXIS[plane]], 0, self.volume.shape[_AXIS[plane]] - 1)),
                                     min=0, max=self.volume.shape[_AXIS[plane]] - 1, description=plane,
                                     continuous_update=False)
            for plane in PLANES}
        self.overlay = widgets.Checkbox(value=self.mask is not None, description="outline the spleen",
                                        disabled=self.mask is None)
        self.image = widgets.Image(format="png")
        for control in (*self.sliders.values(), self.overlay):
            control.observe(lambda _change: self.render(), names="value")
        self.widget = widgets.VBox([widgets.HBox(list(self.sliders.values())), self.overlay, self.image])
        self.render()

    @property
    def centre(self) -> tuple[int, int, int]:
        """The voxel (RAS order) the three planes go through: the sliders' values."""
        return tuple(self.sliders[plane].value for plane in ("sagittal", "coronal", "axial"))  # type: ignore

    def figure(self) -> Figure:
        """The three planes as the controls set them now."""
        outline = self.mask if self.overlay.value else None
        return three_plane(self.volume, outline, spacing=self.voxel, centre=self.centre, window=self.window,
                           title=self.title)

    def render(self) -> bytes:
        """Redraw the picture from the controls; returns the PNG shown."""
        png = self.figure()._repr_png_()
        self.image.value = png
        return png

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def slice_viewer(image: Any, mask: Any | None = None, affine: np.ndarray | None = None,
                 spacing: Sequence[float] | None = None, **kwargs: Any) -> SliceViewer:
    """The offline interactive viewer (:class:`SliceViewer`): three planes, a slider each, a mask-outline toggle."""
    return SliceViewer(image, mask, affine=affine, spacing=spacing, **kwargs)


def augmented_crops(crops: Mapping[str, Mapping[str, Any]], save: str | os.PathLike[str] | None = None) -> Figure:
    """One crop as each random transform leaves it: the sagittal slice through the spleen of the first crop
    (anterior to the right, superior up) with the spleen outlined and the intensity range in the title, on
    one 0..1 grey scale, so that flips and rotations show as moved anatomy and intensity changes as brighter
    or darker. (Augmentations that keep left and right keep that slice.)"""
    figure = new_figure(2.5 * len(crops), 3.0)
    axes = np.atleast_1d(figure.subplots(1, len(crops), squeeze=False)).ravel()
    first = _array(next(iter(crops.values()))["label"]) > 0.5
    middle = centre_of(first, first.shape)[0]
    for ax, (name, crop) in zip(axes, crops.items(), strict=True):
        image = _array(crop["image"]).astype(np.float32)
        label = _array(crop["label"]) > 0.5
        ax.imshow(image[middle].T, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
        _outline(ax, label[middle].T, COLOURS["mask"], width=1.0)
        ax.set_title(f"{name}\nvalues {image.min():.2f}..{image.max():.2f}", fontsize=8)
        ax.set_xlabel("A →", fontsize=7)
        ax.set_ylabel("S →", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle("one training crop through each augmentation (sagittal slice, spleen outlined)", fontsize=10)
    return _finish(figure, save)


def tensorboard_scalars(run_dir: str | os.PathLike[str], tag: str = "train_loss") -> list[float]:
    """The values a run wrote to TensorBoard under ``tag``, in step order (``train_loss``: one per
    iteration, as MONAI's TensorBoardStatsHandler writes it); empty when the run has none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(run_dir) / "tensorboard"
    found: dict[int, float] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})  # file by file: no folder watcher
        events.Reload()
        if tag in events.Tags().get("scalars", []):
            found.update({int(event.step): float(event.value) for event in events.Scalars(tag)})
    return [found[step] for step in sorted(found)]


# --------------------------------------------------------------------------- comparing run folders (07, 08)
def compare_learning_curves(runs: Mapping[str, str | os.PathLike[str] | Iterable[Mapping[str, Any]]],
                            title: str | None = None, save: str | os.PathLike[str] | None = None) -> Figure:
    """Training loss and validation Dice per epoch of several runs on shared axes (a recipe against a
    variant, fine-tuning against training from scratch); each run is a run folder or its records."""
    palette = [COLOURS["fn"], COLOURS["mask"], COLOURS["tp"], COLOURS["fp"], COLOURS["reference"], "#CC79A7"]
    figure = new_figure(10, 3.6)
    loss_ax, dice_ax = figure.subplots(1, 2)
    for index, (name, source) in enumerate(runs.items()):
        records = _read_run_metrics(source) if isinstance(source, (str, os.PathLike)) else list(source)
        colour = palette[index % len(palette)]
        epochs = [float(r.get("epoch", i + 1)) for i, r in enumerate(records)]
        loss_ax.plot(epochs, [float(r["loss"]) for r in records], marker=".", color=colour, label=name)
        validated = [(e, float(r["val_dice"])) for e, r in zip(epochs, records, strict=True)
                     if r.get("val_dice") is not None]
        if validated:
            dice_ax.plot(*zip(*validated, strict=True), marker="o", color=colour, label=name)
    from matplotlib.ticker import MaxNLocator

    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    dice_ax.set(xlabel="epoch", ylabel="validation Dice", title="validation Dice", ylim=(0, 1))
    for ax in (loss_ax, dice_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return _finish(figure, save)

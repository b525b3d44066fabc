"""Evaluation: sliding-window inference, post-processing, and metrics in two spaces.

A prediction is scored twice: in the *resampled* space the network works in (RAS, the preset's
voxel spacing), and in the *original* space of the image file, after ``Invertd`` has put the
prediction back on the original grid, against the original label file. The two differ because
resampling a label changes it; the original-space numbers are the ones to report.

Metrics use MONAI (Dice, ``HausdorffDistanceMetric(percentile=95)``,
``SurfaceDistanceMetric(symmetric=True)``) with the voxel spacing, so distances are in mm.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spleenkit.data.datalist import load_datalist, split_datalist
from spleenkit.devices import pick_device
from spleenkit.distributed import distributed_map
from spleenkit.errors import BadInputError
from spleenkit.images import case_name, read_binary_mask, read_nifti, same_grid, voxel_spacing, write_mask
from spleenkit.io import check_writable, write_json
from spleenkit.manifest import build_manifest, now, write_manifest, write_stopped_manifest
from spleenkit.metrics import mask_metrics, summarize, write_rows_csv
from spleenkit.model import recipe_for
from spleenkit.predict import original_space_mask, postprocessing, predict_logits, prepare_prediction
from spleenkit.presets import Preset, get_preset
from spleenkit.runs import EVALUATION_DIR, PREDICTIONS_DIR, output_folder
from spleenkit.transforms import validation_transforms

if TYPE_CHECKING:
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import Compose

    from spleenkit.distributed import DistributedContext

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- sliding window


# --------------------------------------------------------------------------- post-processing


# --------------------------------------------------------------------------- metrics


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


def select_cases(data_dir: str | os.PathLike[str], preset: Preset, split: str = "validation") -> list[dict[str, str]]:
    """The labelled cases to evaluate: the bundle's validation split (default), the training split, or all."""
    items = load_datalist(data_dir, "training")
    items = [item for item in items if "label" in item]
    if split == "all":
        return items
    if split not in ("validation", "training"):
        raise BadInputError(f"unknown split {split!r}; use validation, training or all")
    training, validation = split_datalist(items, preset.validation_cases)
    return validation if split == "validation" else training


def evaluate_case(network: torch.nn.Module, item: Mapping[str, str], preset: Preset, inferer: SlidingWindowInferer,
                  device: torch.device, amp: bool, largest_component: bool = False, fill_holes: bool = False,
                  preprocessing: Compose | None = None) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Score one labelled case in the resampled and the original space.

    Returns the two metric rows and the prediction on the original grid (uint8, the image file's voxel order).
    """
    name = case_name(item["image"])
    preprocessing = preprocessing or validation_transforms(preset)
    reference, reference_image = read_binary_mask(item["label"])

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
                 max_cases: int | None = None, distributed: DistributedContext | None = None,
                 force_preset: bool = False) -> EvaluationResult:
    """Evaluate ``model`` (a run's ``model.pt``) on a dataset split and write the results.

    Writes ``per_case.csv``, ``summary.json``, ``manifest.json`` and a per-case figure into
    ``out_dir`` (default ``RUN_DIR/evaluation``) and, with ``save_predictions``, each case's
    original-space mask into ``predictions/`` (``RUN_DIR/predictions``, or ``out_dir/predictions`` when
    ``out_dir`` is given). The recipe is the model's own (:func:`spleenkit.model.recipe_for`; another ``preset``
    that changes the masks needs ``force_preset``). The output folder is locked while it is written; both
    folders are checked writable before any work; an interrupted run (Ctrl-C, SIGTERM) records the cases it
    finished in the manifest. Under torchrun (``distributed``), the cases are shared among the ranks and rank 0
    writes everything.
    """
    if max_cases is not None and (isinstance(max_cases, bool) or max_cases < 1):
        raise BadInputError(f"--max-cases {max_cases}: evaluate at least 1 case (leave it out for all)")
    model = Path(model)
    run_dir = model.parent
    preset, recipe_source = recipe_for(model, preset, force_preset)
    out = Path(out_dir) if out_dir is not None else run_dir / EVALUATION_DIR
    predictions_dir = (out if out_dir is not None else run_dir) / PREDICTIONS_DIR
    device_ = pick_device(device) if distributed is None else distributed.device
    prediction = prepare_prediction(model, preset, device_, amp, overlap=overlap, sw_batch_size=sw_batch_size,
                                    blend=blend, stitch_device=stitch_device, largest_component=largest_component,
                                    fill_holes=fill_holes)
    cases = select_cases(data_dir, preset, split)
    if max_cases is not None:
        cases = cases[:max_cases]
    if not cases:
        raise BadInputError(f"no labelled cases in the {split} split", data_dir)
    settings = {**prediction.settings, "recipe_from": recipe_source, "data_dir": str(data_dir), "split": split}
    if distributed is not None:
        settings["processes"] = distributed.world_size
    with contextlib.ExitStack() as folders:
        if distributed is None or distributed.is_main:  # rank 0 writes: it holds the lock
            check_writable(folders.enter_context(output_folder(out, lock=True)))
            if save_predictions:
                check_writable(folders.enter_context(output_folder(predictions_dir)))
        return _evaluate_cases(cases, prediction, preset, settings, out, predictions_dir, save_predictions,
                               figures, distributed, largest_component, fill_holes)


def _evaluate_cases(cases: list[dict[str, str]], prediction: Any, preset: Preset, settings: dict[str, Any],
                    out: Path, predictions_dir: Path, save_predictions: bool, figures: bool,
                    distributed: DistributedContext | None, largest_component: bool,
                    fill_holes: bool) -> EvaluationResult:
    """The body of :func:`evaluate_run` once its folders are ready: score each case, write the results."""
    amp, network, inferer, device_ = prediction.amp, prediction.network, prediction.inferer, prediction.device
    preprocessing = validation_transforms(preset)
    started = now()
    log.info("evaluating %d %s case(s) with %s", len(cases), settings["split"],
             ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("model", "data_dir")))
    rows: list[dict[str, Any]] = []
    predictions: dict[str, Path] = {}

    def score(item: Mapping[str, str]) -> tuple[list[dict[str, Any]], np.ndarray]:
        return evaluate_case(network, item, preset, inferer, device_, amp, largest_component, fill_holes,
                             preprocessing)

    # one process: every case in turn; under torchrun: rank r scores cases r, r+N ... and rank 0 gets all
    try:
        for item, (case_rows, mask) in distributed_map(score, cases, distributed):
            rows.extend(case_rows)
            if save_predictions:
                name = case_rows[0]["case"]
                predictions[name] = write_mask(mask, item["image"], predictions_dir / f"{name}.nii.gz")
    except BaseException as error:
        if rows and (distributed is None or distributed.is_main):  # what finished is described
            done = list(dict.fromkeys(row["case"] for row in rows))
            write_stopped_manifest(out, error, build_manifest(
                settings, device=str(device_), started=started, finished=None, preset=preset.to_dict(),
                cases_done=done, predictions=[str(p) for p in predictions.values()],
                not_done=[case_name(c["image"]) for c in cases[len(done):]]))
        raise
    if distributed is not None and not distributed.is_main:  # rank 0 writes the results
        return EvaluationResult([], {}, out, out / "per_case.csv", out / "summary.json")
    summary = summarize(rows)
    csv_path = write_rows_csv(rows, out / "per_case.csv")
    summary_path = write_json(out / "summary.json", {"settings": settings, **summary})
    figure_paths = []
    if figures:
        from spleenkit.visualization import per_case_metrics, save_figure  # deferred: matplotlib, for figures only

        figure_paths.append(save_figure(per_case_metrics(rows), out / "per_case_metrics.png"))
    write_manifest(out, build_manifest(settings, device=str(device_), started=started, finished=now(),
                                       preset=preset.to_dict(), outputs=[csv_path.name, summary_path.name]))
    return EvaluationResult(rows, summary, out, csv_path, summary_path, predictions, figure_paths)

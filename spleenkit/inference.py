"""Inference: read CT volumes (NIfTI files or a DICOM series), predict, write masks on the input's grid.

A mask is only useful if it lands on the image it came from. So every mask is written with the
input's own header (same shape, same affine, bit for bit), read back and checked before it is
renamed into place; and the image's header is checked against the anatomy (the spine should be
posterior, the spleen on the patient's left) so that a mislabelled axis is reported, not mirrored
silently into the output.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spleenkit.data.checks import inspect_image, read_input
from spleenkit.devices import pick_device
from spleenkit.dicom_seg import SEG_SUFFIX, write_dicom_seg
from spleenkit.environment import peak_memory_mib
from spleenkit.errors import BadInputError
from spleenkit.images import (
    MASK_SUFFIX,
    InputVolume,
    load_volume,
    read_nifti,
    scan_inputs,
    voxel_spacing,
    write_mask,
)
from spleenkit.io import check_writable
from spleenkit.manifest import build_manifest, now, write_manifest, write_stopped_manifest
from spleenkit.model import recipe_for
from spleenkit.predict import predict_mask, prepare_prediction
from spleenkit.presets import Preset
from spleenkit.runs import output_folder

if TYPE_CHECKING:
    import nibabel as nib
    import torch

log = logging.getLogger(__name__)

OVERLAY_SUFFIX = "_overlay.png"


# --------------------------------------------------------------------------- reading inputs


# --------------------------------------------------------------------------- writing masks


# --------------------------------------------------------------------------- orientation check
def orientation_warnings(image: nib.spatialimages.SpatialImage, mask: np.ndarray | None = None,
                         name: str | None = None) -> list[str]:
    """Warnings when the header's axes disagree with the anatomy (empty when all is consistent).

    Checks, in the header's world coordinates (RAS mm): the spine (bone near the midline) should
    lie in the posterior half of the body; a predicted spleen should lie on the patient's left
    (negative x of the body's midline). A failed check means a flipped or mislabelled axis, such as
    MSD Task09 images whose voxels are stored LPS while the header says RAS (model-zoo issue 766).
    """
    from scipy import ndimage


    name = name or str(getattr(image, "get_filename", lambda: None)() or "the image")
    spacing = voxel_spacing(image.affine)
    steps = [max(1, int(round(4.0 / s))) for s in spacing]  # about 4 mm voxels are plenty here
    data = np.asanyarray(image.dataobj[:: steps[0], :: steps[1], :: steps[2]])
    data = data.reshape(data.shape[:3])
    affine = image.affine @ np.diag([*steps, 1])
    body = data > -300
    labels, count = ndimage.label(body)
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    body = labels == (1 + int(np.argmax(sizes)))
    voxel_ml = float(np.prod(voxel_spacing(affine))) / 1000
    if body.sum() * voxel_ml < 500:  # less than half a litre of tissue: not a body CT
        return []

    def world(indices: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        return indices @ matrix[:3, :3].T + matrix[:3, 3]

    body_xyz = world(np.argwhere(body).astype(float), affine)
    x_low, x_high = np.percentile(body_xyz[:, 0], [2, 98])
    y_low, y_high = np.percentile(body_xyz[:, 1], [2, 98])
    centre_x, half_width = (x_low + x_high) / 2, (x_high - x_low) / 2
    warnings_: list[str] = []
    bone = (data > 250) & body
    bone_xyz = world(np.argwhere(bone).astype(float), affine)
    bone_xyz = bone_xyz[np.abs(bone_xyz[:, 0] - centre_x) < 0.15 * half_width * 2]
    if len(bone_xyz) * voxel_ml > 20 and y_high - y_low > 50:
        position = (float(np.median(bone_xyz[:, 1])) - y_low) / (y_high - y_low)
        log.debug("%s: midline bone at %.2f of the body's posterior-anterior extent", name, position)
        if position > 0.6:
            warnings_.append(
                f"{name}: the spine lies on the side the header calls anterior (at {position:.0%} of the way from "
                "posterior to anterior): the header's anterior-posterior axis looks flipped, as in MSD Task09 "
                "images whose voxels are stored LPS while the header says RAS (MONAI model-zoo issue 766). "
                "The mask is written on the image's own grid, but the network saw the body turned front to back; "
                "check the image in a viewer and fix its header before trusting the result.")
    if mask is not None and mask.any():
        # the centroid from per-axis voxel counts: no list of coordinates for a large mask
        counts = [np.asarray(mask).sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
                  for axis in range(3)]
        total = float(counts[0].sum())
        centroid = np.array([(np.arange(len(c)) * c).sum() / total for c in counts])
        volume_ml = total * float(np.prod(spacing)) / 1000
        side = (float(world(centroid[None], image.affine)[0, 0]) - centre_x) / max(half_width, 1.0)
        log.debug("%s: spleen centroid at %.2f of the half-width from the midline (+ is right)", name, side)
        if volume_ml > 5 and side > 0.15:
            warnings_.append(
                f"{name}: the predicted spleen ({volume_ml:.0f} mL) lies on the patient's RIGHT according to the "
                f"header ({side:.0%} of the half-width right of the midline). Either the header's left-right axis "
                "is flipped or the prediction is wrong; look at the overlay before using this mask.")
    return warnings_


# --------------------------------------------------------------------------- prediction


@dataclass
class CaseOutput:
    """What inference wrote for one input volume."""

    name: str
    input: str
    mask: str
    overlay: str | None
    shape: list[int]
    spleen_volume_ml: float
    seconds: float
    warnings: list[str] = field(default_factory=list)
    segmentation: str | None = None  # the DICOM Segmentation written for a DICOM series input
    segmentation_not_written: str | None = None  # for a DICOM series input without one: why
    series: str | None = None  # a DICOM series input's SeriesInstanceUID
    derived: list[str] = field(default_factory=list)  # source values the DICOM Segmentation derived or filled


@dataclass
class InferenceResult:
    """All outputs of one :func:`infer` call, and the manifest describing them."""

    cases: list[CaseOutput]
    out_dir: Path
    manifest_path: Path
    peak_memory_mib: float


def check_inputs(volumes: Sequence[InputVolume], preset: Preset, force: bool = False) -> dict[str, list[str]]:
    """Run ``data check``'s own image checks (:func:`spleenkit.data.checks.inspect_image`) on every input before
    anything is written: a problem anywhere is refused, naming each file; intensities that do not look like CT
    are refused unless ``force``. Returns the warnings per input name (recorded in the manifest)."""
    problems: list[str] = []
    warnings_: dict[str, list[str]] = {}
    not_ct: list[str] = []
    for volume in volumes:
        try:
            if volume.kind == "nifti":
                read_nifti(volume.path)  # the header first: its messages are the clearest
            image, data = read_input(volume.path, volume.series_uid)
        except BadInputError as error:
            problems.append(str(error))
            continue
        found = inspect_image(image, data, preset)
        del image, data
        problems += [f"{volume.path}: {message}" for message in found.problems]
        warnings_[volume.name] = list(found.warnings)
        if found.not_ct:
            not_ct.append(f"{volume.path}: {found.not_ct}")
    if problems:
        raise BadInputError(problems[0] if len(problems) == 1 else
                            f"{len(problems)} input(s) cannot be segmented: " + "; ".join(problems))
    if not_ct and not force:
        raise BadInputError("; ".join(not_ct) + ". The model was trained on CT: pass force=True / --force to "
                            "segment it anyway (the warning is recorded in the manifest)")
    for lines in warnings_.values():
        for line in lines:
            log.warning(line)
    return warnings_


#: How many skipped folder entries are named one a line; the rest are counted (the manifest lists them all).
SKIPPED_SHOWN = 10


def _report_skipped(input: str | os.PathLike[str], skipped: Sequence[str]) -> None:
    """Name the entries of an input folder that are not segmented, without flooding the log for a busy folder."""
    for entry in skipped[:SKIPPED_SHOWN]:
        log.warning("%s: skipped %s", input, entry)
    if len(skipped) > SKIPPED_SHOWN:
        log.warning("%s: skipped %d more entries (manifest.json lists every one)", input,
                    len(skipped) - SKIPPED_SHOWN)


def infer(model: str | os.PathLike[str], input: str | os.PathLike[str], out_dir: str | os.PathLike[str],
          preset: Preset | str | None = None, device: str = "auto", amp: bool | None = None,
          largest_component: bool = False, fill_holes: bool = False, overlap: float | None = None,
          sw_batch_size: int | None = None, blend: str = "constant", stitch_device: str = "cpu",
          overlay: bool = True, force: bool = False, force_preset: bool = False) -> InferenceResult:
    """Segment the spleen in every volume under ``input`` and write masks, overlays and a manifest.

    For each input ``NAME`` the output folder gets ``NAME_spleen.nii.gz`` (uint8, the input's
    exact shape and affine) and ``NAME_overlay.png``; for a DICOM series also ``NAME_spleen_seg.dcm``, a DICOM
    Segmentation referencing the series' instances; ``manifest.json`` lists them with the settings, timings,
    peak memory, any warnings (orientation, input, DICOM Segmentation) and the folder entries skipped.
    The recipe is the model's own (:func:`spleenkit.model.recipe_for`: carried in model.pt, else named by its
    run manifest, else seed with a warning); a ``preset`` whose preprocessing or network differs from it is
    refused unless ``force_preset``.

    Before anything is written every input gets ``data check``'s checks (:func:`check_inputs`; ``force``
    segments images whose values do not look like CT) and the model's weights must be finite. The output
    folder is locked while it is written (:class:`~spleenkit.runs.RunLock`: a second ``infer`` into it stops,
    naming the first). If a case fails or the run is interrupted (Ctrl-C or SIGTERM), the masks already
    written stay and the manifest lists them.
    """
    model = Path(model)
    preset, recipe_source = recipe_for(model, preset, force_preset)  # a missing or broken model stops first
    volumes, skipped = scan_inputs(input)
    _report_skipped(input, skipped)
    input_warnings = check_inputs(volumes, preset, force)
    device_ = pick_device(device)
    prediction = prepare_prediction(model, preset, device_, amp, overlap=overlap, sw_batch_size=sw_batch_size,
                                    blend=blend, stitch_device=stitch_device, largest_component=largest_component,
                                    fill_holes=fill_holes)
    amp, network, inferer = prediction.amp, prediction.network, prediction.inferer
    settings = {**prediction.settings, "recipe_from": recipe_source, "input": str(input), "force": force}
    started = now()
    cases: list[CaseOutput] = []
    with output_folder(out_dir, lock=True) as out:
        check_writable(out)
        try:
            for volume in volumes:
                cases.append(_infer_one(volume, out, network, preset, inferer, device_, amp, largest_component,
                                        fill_holes, overlay, input_warnings.get(volume.name, []), voxel_spacing))
        except BaseException as error:
            if cases:  # what finished is described, and why the rest is missing
                write_stopped_manifest(out, error, build_manifest(
                    settings, device=str(device_), started=started, finished=None, preset=preset.to_dict(),
                    cases=[asdict(c) for c in cases], skipped=skipped,
                    not_done=[v.name for v in volumes[len(cases):]]))
            raise
        peak = peak_memory_mib()
        manifest = build_manifest(settings, device=str(device_), started=started, finished=now(),
                                  preset=preset.to_dict(), peak_rss_mib=peak, cases=[asdict(c) for c in cases],
                                  skipped=skipped)
        manifest_path = write_manifest(out, manifest)
    return InferenceResult(cases, out, manifest_path, peak)


def _infer_one(volume: InputVolume, out: Path, network: torch.nn.Module, preset: Preset, inferer: Any,
               device_: torch.device, amp: bool, largest_component: bool, fill_holes: bool, overlay: bool,
               input_warnings: list[str], voxel_spacing: Any) -> CaseOutput:
    """Segment one input and write its mask (and overlay)."""
    begun = time.perf_counter()
    image = load_volume(volume)
    with tempfile.TemporaryDirectory(prefix="spleenkit-") as scratch:
        if volume.kind == "dicom":
            image_path = Path(scratch) / f"{volume.name}.nii.gz"
            image.to_filename(image_path)
        else:
            image_path = volume.path
        mask = predict_mask(network, image_path, preset, inferer, device_, amp, largest_component, fill_holes)
    warnings_ = orientation_warnings(image, mask, name=str(volume.path))
    for warning in warnings_:
        log.warning(warning)
    mask_path = write_mask(mask, image, out / f"{volume.name}{MASK_SUFFIX}")
    segmentation, not_written, derived = None, None, []
    if volume.kind == "dicom":  # and a DICOM Segmentation of the series, for viewers that read DICOM

        try:
            written = write_dicom_seg(mask, image.affine, volume.path, out / f"{volume.name}{SEG_SUFFIX}",
                                      volume.series_uid)
            segmentation, derived = str(written.path), written.derived
        except BadInputError as error:  # the mask is right and written: a missing SEG is a warning, not a failure
            not_written = str(error)
        except Exception as error:  # noqa: BLE001 - idem, whatever highdicom or pydicom raise
            not_written = f"{type(error).__name__}: {error}".splitlines()[0]
        for line in derived:
            log.info("%s: DICOM Segmentation: %s", volume.name, line)
        if not_written:
            warnings_.append(f"{volume.name}: no DICOM Segmentation written: {not_written}")
            log.warning(warnings_[-1])
    overlay_path = None
    if overlay:
        from spleenkit.visualization import save_figure, three_plane  # deferred: matplotlib, for overlays only

        figure = three_plane(np.asanyarray(image.dataobj).reshape(image.shape[:3]), mask, affine=image.affine,
                             title=f"{volume.name}: predicted spleen")
        overlay_path = str(save_figure(figure, out / f"{volume.name}{OVERLAY_SUFFIX}"))
    volume_ml = float(mask.sum()) * float(np.prod(voxel_spacing(image.affine))) / 1000
    seconds = round(time.perf_counter() - begun, 2)
    log.info("%s: spleen %.1f mL -> %s (%.1f s)", volume.name, volume_ml, mask_path, seconds)
    return CaseOutput(volume.name, str(volume.path), str(mask_path), overlay_path, list(mask.shape),
                      round(volume_ml, 2), seconds, warnings_ + input_warnings, segmentation, not_written,
                      volume.series_uid, derived)

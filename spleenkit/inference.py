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

from spleenkit.environment import peak_memory_mib
from spleenkit.errors import BadInputError
from spleenkit.io import write_with
from spleenkit.presets import Preset, get_preset

if TYPE_CHECKING:
    import nibabel as nib
    import torch

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MASK_SUFFIX = "_spleen.nii.gz"
OVERLAY_SUFFIX = "_overlay.png"
#: Slices whose spacing differs from the series' usual step by more than this fraction are a gap.
SLICE_GAP_TOLERANCE = 0.1


# --------------------------------------------------------------------------- reading inputs
def is_nifti(path: str | os.PathLike[str]) -> bool:
    """True for a ``.nii`` or ``.nii.gz`` file name."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def stem(path: str | os.PathLike[str]) -> str:
    """The file name without ``.nii``/``.nii.gz`` (a folder keeps its name)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_3d(shape: Sequence[int], path: str | os.PathLike[str]) -> None:
    spatial = list(shape[:3])
    extra = list(shape[3:])
    if len(shape) < 3 or any(s < 2 for s in spatial):
        raise BadInputError(f"a 2D image (shape {tuple(shape)}); spleen segmentation needs a 3D CT volume", path)
    if any(s != 1 for s in extra):
        raise BadInputError(f"a {len(shape)}D image (shape {tuple(shape)}); give one 3D CT volume", path)


def read_nifti(path: str | os.PathLike[str]) -> nib.spatialimages.SpatialImage:
    """Open a 3D NIfTI file (header only); a missing, corrupt, non-NIfTI or 2D file is a BadInputError."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise BadInputError("file not found", path)
    if not path.is_file():
        raise BadInputError("not a file", path)
    if not is_nifti(path):
        raise BadInputError("not a NIfTI file (.nii or .nii.gz) or a DICOM folder", path)
    try:
        image = nib.load(path)
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise BadInputError(f"not a readable NIfTI image ({type(error).__name__}: {error})".splitlines()[0],
                            path) from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadInputError(f"not a NIfTI image ({type(image).__name__})", path)
    _check_3d(image.shape, path)
    return image


def _is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as stream:
            head = stream.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() == ".dcm"


@dataclass
class InputVolume:
    """One volume to segment: a NIfTI file, or a folder holding one DICOM series."""

    path: Path
    kind: str  # "nifti" or "dicom"

    @property
    def name(self) -> str:
        return stem(self.path)


def find_inputs(path: str | os.PathLike[str]) -> list[InputVolume]:
    """The volumes under ``path``: a NIfTI file, or a folder of NIfTI files and/or DICOM series (the folder's
    own DICOM files, and each subfolder holding DICOM files); see :func:`scan_inputs` for what is skipped."""
    return scan_inputs(path)[0]


def scan_inputs(path: str | os.PathLike[str]) -> tuple[list[InputVolume], list[str]]:
    """The volumes under ``path`` and, for a folder, a line per entry that is skipped and why, so that
    nothing in the folder is left out silently. Every NIfTI file and every DICOM series is an input."""
    path = Path(path)
    if not path.exists():
        raise BadInputError("input not found", path)
    if path.is_file():
        if is_nifti(path):
            return [InputVolume(path, "nifti")], []
        if _is_dicom_file(path):
            raise BadInputError("a single DICOM file; give the folder holding the whole series", path)
        raise BadInputError("not a NIfTI file (.nii or .nii.gz) or a DICOM folder", path)
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    volumes = [InputVolume(p, "nifti") for p in files if is_nifti(p) and not p.name.endswith(MASK_SUFFIX)]
    skipped = [f"{p.name} (a spleen mask this kit wrote)" for p in files if p.name.endswith(MASK_SUFFIX)]
    dicom_files = [p for p in files if not is_nifti(p) and _is_dicom_file(p)]
    if dicom_files:
        volumes.append(InputVolume(path, "dicom"))
    skipped += [f"{p.name} (not a NIfTI or DICOM file)" for p in files if not is_nifti(p) and p not in dicom_files]
    for folder in (p for p in entries if p.is_dir()):
        inside = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        if any(_is_dicom_file(p) for p in inside):
            volumes.append(InputVolume(folder, "dicom"))
        else:
            skipped.append(f"{folder.name}/ (a folder without DICOM files)")
    if not volumes:
        if not entries:
            raise BadInputError("the folder is empty: no NIfTI files or DICOM series to segment", path)
        raise BadInputError(f"no NIfTI files or DICOM series among its {len(entries)} entries", path)
    names = [volume.name for volume in volumes]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise BadInputError(f"two inputs would write the same mask {twice[0]}{MASK_SUFFIX}: rename one", path)
    return volumes, skipped


def dicom_image_headers(folder: str | os.PathLike[str]) -> dict[str, list[tuple[Path, Any]]]:
    """The headers (no pixel data) of the DICOM images in ``folder``, by SeriesInstanceUID, in file-name order."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers: dict[str, list[tuple[Path, Any]]] = {}
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        if "ImagePositionPatient" not in header or "SeriesInstanceUID" not in header:
            continue  # DICOMDIR, reports and other non-image objects
        headers.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
    return headers


def read_dicom_series(folder: str | os.PathLike[str]) -> nib.Nifti1Image:
    """Read a folder holding exactly one DICOM series into a NIfTI image (RAS affine from the DICOM geometry).

    Two series, missing slices (a gap in the slice positions), uneven spacing, two slices at one
    position, or a multi-frame file are errors naming the folder, not guesses.
    """
    import nibabel as nib
    import pydicom

    folder = Path(folder)
    headers = dicom_image_headers(folder)
    if not headers:
        raise BadInputError("no DICOM images with a position (ImagePositionPatient) found", folder)
    if len(headers) > 1:
        listed = "; ".join(f"{uid} ({getattr(items[0][1], 'SeriesDescription', '') or 'no description'}, "
                           f"{len(items)} file(s))" for uid, items in headers.items())
        raise BadInputError(f"holds {len(headers)} DICOM series, give a folder with one: {listed}", folder)
    items = next(iter(headers.values()))
    first = items[0][1]
    if int(getattr(first, "NumberOfFrames", 1) or 1) > 1:
        raise BadInputError("multi-frame (enhanced) DICOM is not supported; convert it to NIfTI first", items[0][0])
    orientation = np.array(first.ImageOrientationPatient, dtype=float)
    for path, header in items:
        if not np.allclose(np.array(header.ImageOrientationPatient, dtype=float), orientation, atol=1e-4):
            raise BadInputError("slices of the series have different orientations", path)
        if (header.Rows, header.Columns) != (first.Rows, first.Columns):
            raise BadInputError("slices of the series have different sizes", path)
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    positions = [float(np.dot(np.array(h.ImagePositionPatient, dtype=float), normal)) for _, h in items]
    order = np.argsort(positions)
    items = [items[i] for i in order]
    positions = [positions[i] for i in order]
    if len(items) < 2:
        raise BadInputError("the DICOM series has a single slice: a 2D image; spleen segmentation needs a 3D volume",
                            folder)
    steps = np.diff(positions)
    if np.any(steps < 1e-3):
        index = int(np.argmin(steps))
        raise BadInputError(f"two slices at the same position ({positions[index]:.2f} mm: "
                            f"{items[index][0].name} and {items[index + 1][0].name}); more than one volume?", folder)
    usual = float(np.median(steps))
    for index, step in enumerate(steps):
        if step > 1.5 * usual:
            missing = round(step / usual) - 1
            raise BadInputError(f"missing slices: a gap of {step:.2f} mm between {items[index][0].name} and "
                                f"{items[index + 1][0].name} where the series steps {usual:.2f} mm "
                                f"(about {missing} slice(s) missing)", folder)
        if abs(step - usual) > SLICE_GAP_TOLERANCE * usual:
            raise BadInputError(f"uneven slice spacing: {step:.2f} mm between {items[index][0].name} and "
                                f"{items[index + 1][0].name}, {usual:.2f} mm elsewhere", folder)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.array(items[0][1].ImagePositionPatient, dtype=float)
    last = np.array(items[-1][1].ImagePositionPatient, dtype=float)
    affine = np.eye(4)
    affine[:3, 0] = row_direction * column_spacing   # array axis 0: along a row (the column index)
    affine[:3, 1] = column_direction * row_spacing   # array axis 1: down a column (the row index)
    affine[:3, 2] = (last - origin) / (len(items) - 1)
    affine[:3, 3] = origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # DICOM's LPS -> NIfTI's RAS
    affine = affine.astype(np.float32).astype(np.float64)  # what a NIfTI header can hold, so the grid round-trips
    slices = []
    for path, _ in items:
        try:
            dataset = pydicom.dcmread(path)
            pixels = dataset.pixel_array
        except Exception as error:  # noqa: BLE001 - compressed data without a decoder, truncated files...
            raise BadInputError(f"cannot decode the pixel data ({type(error).__name__}: {error})".splitlines()[0],
                                path) from error
        slope = float(getattr(dataset, "RescaleSlope", 1) or 1)
        intercept = float(getattr(dataset, "RescaleIntercept", 0) or 0)
        slices.append((pixels.astype(np.float32) * slope + intercept).T)
    volume = np.stack(slices, axis=-1)
    if np.all(np.mod(volume, 1) == 0) and volume.min() >= -32768 and volume.max() <= 32767:
        volume = volume.astype(np.int16)
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm", "sec")
    return image


def load_volume(volume: InputVolume) -> nib.spatialimages.SpatialImage:
    """The input as a NIfTI image (a DICOM series is converted in memory)."""
    if volume.kind == "dicom":
        return read_dicom_series(volume.path)
    return read_nifti(volume.path)


# --------------------------------------------------------------------------- writing masks
def write_mask(mask: np.ndarray, reference: str | os.PathLike[str] | nib.spatialimages.SpatialImage,
               path: str | os.PathLike[str]) -> Path:
    """Write a 0/1 uint8 mask with ``reference``'s exact header (shape, affine, qform/sform codes).

    The file is written to a temporary name, read back, its shape and affine compared with the
    reference's for *equality*, and only then renamed into place.
    """
    import nibabel as nib

    reference = read_nifti(reference) if isinstance(reference, (str, os.PathLike)) else reference
    path = Path(path)
    mask = np.asarray(mask)
    if mask.shape != tuple(reference.shape[:3]):
        raise BadInputError(f"mask shape {mask.shape} differs from the image's {tuple(reference.shape[:3])}", path)
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    header["cal_min"], header["cal_max"] = 0, 1
    header["descrip"] = b"spleenkit spleen mask (1 = spleen)"
    image = type(reference)((mask > 0).astype(np.uint8), None, header)

    def same_grid(temporary: Path) -> None:
        written = nib.load(temporary)
        if written.shape != tuple(reference.shape[:3]) or not np.array_equal(written.affine, reference.affine):
            raise BadInputError("internal error: the written mask's grid differs from the image's", path)

    return write_with(path, image.to_filename, check=same_grid)


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

    from spleenkit.evaluation import voxel_spacing

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
def predict_mask(network: torch.nn.Module, image_path: str | os.PathLike[str], preset: Preset | str,
                 inferer: Any, device: torch.device | str = "cpu", amp: bool = True,
                 largest_component: bool = False, fill_holes: bool = False) -> np.ndarray:
    """Predict one NIfTI file; returns a uint8 0/1 mask in the file's own voxel order and shape.

    Preprocess (RAS, preset spacing, window) -> sliding window -> softmax -> back onto the file's
    grid (``Invertd``, or slab-wise resampling for large images) -> argmax -> options.
    """
    from spleenkit.evaluation import original_space_mask, predict_logits
    from spleenkit.transforms import inference_transforms

    image = read_nifti(image_path)
    preprocessing = inference_transforms(get_preset(preset))
    try:
        data = preprocessing({"image": str(image_path)})
    except Exception as error:  # noqa: BLE001 - MONAI wraps reader failures in RuntimeError
        raise BadInputError(f"cannot preprocess ({_preprocessing_error(error)})", image_path) from error
    logits = predict_logits(network, data["image"], inferer, device, amp)
    resampled = data.pop("image")
    del data
    return original_space_mask(logits, resampled, preprocessing, image.affine, image.shape, largest_component,
                               fill_holes)


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


@dataclass
class InferenceResult:
    """All outputs of one :func:`infer` call, and the manifest describing them."""

    cases: list[CaseOutput]
    out_dir: Path
    manifest_path: Path
    peak_memory_mib: float


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` and prove a file can be written in it, before any work is done."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise BadInputError(f"the output folder is not writable ({error.strerror or error})", folder) from error
    return folder


def check_inputs(volumes: Sequence[InputVolume], preset: Preset | str, force: bool = False) -> dict[str, list[str]]:
    """Run ``data check``'s own image checks (:func:`spleenkit.data.checks.inspect_image`) on every input before
    anything is written: a problem anywhere is refused, naming each file; intensities that do not look like CT
    are refused unless ``force``. Returns the warnings per input name (recorded in the manifest)."""
    from spleenkit.data.checks import inspect_image, read_input

    problems: list[str] = []
    warnings_: dict[str, list[str]] = {}
    not_ct: list[str] = []
    for volume in volumes:
        try:
            if volume.kind == "nifti":
                read_nifti(volume.path)  # the header first: its messages are the clearest
            image, data = read_input(volume.path)
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


def _preprocessing_error(error: BaseException) -> str:
    """The innermost cause of a MONAI transform failure ("applying transform <LoadImaged ...>" says nothing)."""
    while error.__cause__ is not None or (error.__context__ is not None and "applying transform" in str(error)):
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def infer(model: str | os.PathLike[str], input: str | os.PathLike[str], out_dir: str | os.PathLike[str],
          preset: Preset | str | None = None, device: str = "auto", amp: bool | None = None,
          largest_component: bool = False, fill_holes: bool = False, overlap: float | None = None,
          sw_batch_size: int | None = None, blend: str = "constant", stitch_device: str = "cpu",
          overlay: bool = True, force: bool = False) -> InferenceResult:
    """Segment the spleen in every volume under ``input`` and write masks, overlays and a manifest.

    For each input ``NAME`` the output folder gets ``NAME_spleen.nii.gz`` (uint8, the input's
    exact shape and affine) and ``NAME_overlay.png``; for a DICOM series also ``NAME_spleen_seg.dcm``, a DICOM
    Segmentation referencing the series' instances; ``manifest.json`` lists them with the settings, timings,
    peak memory, any warnings (orientation, input, DICOM Segmentation) and the folder entries skipped.
    The preset defaults to the one in the model's run folder (else "seed").

    Before anything is written every input gets ``data check``'s checks (:func:`check_inputs`; ``force``
    segments images whose values do not look like CT) and the model's weights must be finite. If a case
    fails or the run is interrupted, the masks already written stay and the manifest lists them.
    """
    from spleenkit.devices import pick_device
    from spleenkit.evaluation import inference_amp, inference_network, make_inferer, run_preset, voxel_spacing
    from spleenkit.manifest import build_manifest, now, write_manifest
    from spleenkit.model import check_finite_weights, load_model
    from spleenkit.runs import output_folder

    model = Path(model)
    volumes, skipped = scan_inputs(input)
    for entry in skipped:
        log.warning("%s: skipped %s", input, entry)
    preset = run_preset(model.parent) if preset is None else get_preset(preset)
    input_warnings = check_inputs(volumes, preset, force)
    device_ = pick_device(device)
    amp = inference_amp(preset, device_, amp)
    network = load_model(model, preset, device_)
    check_finite_weights(network, model)
    network = inference_network(network, device_, preset.channels_last)
    inferer = make_inferer(preset, overlap, sw_batch_size, blend, device_, stitch_device)
    settings = {"model": str(model), "input": str(input), "preset": preset.name, "device": str(device_), "amp": amp,
                "roi_size": list(preset.validation_roi_size), "overlap": inferer.overlap,
                "sw_batch_size": inferer.sw_batch_size, "blend": blend, "stitch_device": stitch_device,
                "largest_component": largest_component, "fill_holes": fill_holes, "force": force}
    started = now()
    cases: list[CaseOutput] = []
    with output_folder(out_dir) as out:
        check_writable(out)
        try:
            for volume in volumes:
                cases.append(_infer_one(volume, out, network, preset, inferer, device_, amp, largest_component,
                                        fill_holes, overlay, input_warnings.get(volume.name, []), voxel_spacing))
        except BaseException as error:
            if cases:  # what finished is described, and why the rest is missing
                reason = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error) or type(error).__name__
                write_manifest(out, build_manifest(
                    settings, device=str(device_), started=started, finished=None, preset=preset.to_dict(),
                    cases=[asdict(c) for c in cases], skipped=skipped, stopped=reason,
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
    segmentation = None
    if volume.kind == "dicom":  # and a DICOM Segmentation of the series, for viewers that read DICOM
        from spleenkit.dicom_seg import SEG_SUFFIX, write_dicom_seg

        try:
            segmentation = str(write_dicom_seg(mask, image.affine, volume.path, out / f"{volume.name}{SEG_SUFFIX}"))
        except BadInputError as error:
            warnings_.append(f"{volume.name}: no DICOM Segmentation written: {error}")
            log.warning(warnings_[-1])
    overlay_path = None
    if overlay:
        from spleenkit.visualization import save_figure, three_plane

        figure = three_plane(np.asanyarray(image.dataobj).reshape(image.shape[:3]), mask, affine=image.affine,
                             title=f"{volume.name}: predicted spleen")
        overlay_path = str(save_figure(figure, out / f"{volume.name}{OVERLAY_SUFFIX}"))
    volume_ml = float(mask.sum()) * float(np.prod(voxel_spacing(image.affine))) / 1000
    seconds = round(time.perf_counter() - begun, 2)
    log.info("%s: spleen %.1f mL -> %s (%.1f s)", volume.name, volume_ml, mask_path, seconds)
    return CaseOutput(volume.name, str(volume.path), str(mask_path), overlay_path, list(mask.shape),
                      round(volume_ml, 2), seconds, warnings_ + input_warnings, segmentation)

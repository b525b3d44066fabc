"""Reading and writing images: NIfTI files and DICOM series in, masks out, and the geometry they share.

The one NIfTI reader (:func:`read_nifti`) and the one DICOM series reader (:func:`read_dicom_series`) of
the kit: data checks, training, evaluation, inference and the figures all read through them, so a broken
file gets the same clear message everywhere. A mask is written with its image's own header and checked
on disk before it replaces anything (:func:`write_mask`, through :mod:`spleenkit.io`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spleenkit.errors import BadInputError
from spleenkit.io import write_with

if TYPE_CHECKING:
    import nibabel as nib

log = logging.getLogger(__name__)


NIFTI_SUFFIXES = (".nii.gz", ".nii")


MASK_SUFFIX = "_spleen.nii.gz"


#: Slices whose spacing differs from the series' usual step by more than this fraction are a gap.
SLICE_GAP_TOLERANCE = 0.1


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


def read_nifti(path: str | os.PathLike[str], *, require_3d: bool = True) -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file (header only): the kit's one NIfTI reader. A missing, corrupt or non-NIfTI file (and,
    unless ``require_3d`` is False, one that is not 3D) is a BadInputError naming the file."""
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
    check_claimed_size(image, path)
    if require_3d:
        _check_3d(image.shape, path)
    return image


#: The most a gzip stream can expand (deflate's limit is about 1032:1); a header claiming more lies.
MAX_GZIP_RATIO = 1100
#: Reading a volume holds its stored voxels plus a float32 copy (what the transforms make); refuse beyond this
#: share of the machine's memory.
READ_MEMORY_SHARE = 0.8


def check_claimed_size(image: nib.spatialimages.SpatialImage, path: str | os.PathLike[str]) -> None:
    """Before any voxel is read: refuse a voxel type that is not one number per voxel (RGB, complex), a header
    whose claimed size the file cannot hold (uncompressed: shorter than the header says; gzip: beyond what
    deflate can expand to), and a volume whose reading would not fit in this machine's memory."""
    from spleenkit.environment import total_memory_gib

    path = Path(path)
    dtype = image.header.get_data_dtype()
    if dtype.fields is not None or dtype.kind in "cV":
        kind = "an RGB (colour)" if dtype.fields is not None else f"a {dtype.name}"
        raise BadInputError(f"{kind} image; a CT volume holds one number (Hounsfield units) per voxel", path)
    shape = tuple(int(n) for n in image.header.get_data_shape())
    voxels = int(np.prod(shape, dtype=np.float64)) if shape else 0
    claimed = voxels * dtype.itemsize
    size = path.stat().st_size
    described = f"the header claims {' x '.join(map(str, shape))} voxels of {dtype.name} ({_size(claimed)})"
    if str(path).lower().endswith(".gz"):
        if claimed > MAX_GZIP_RATIO * size + 2**16:
            raise BadInputError(f"{described}, more than a gzip file of {_size(size)} can hold: a broken header or a "
                                "truncated file", path)
    elif claimed + int(image.header.get_data_offset()) > size:
        raise BadInputError(f"{described}, but the file holds {_size(size)}: truncated", path)
    memory = total_memory_gib()
    needed = voxels * (dtype.itemsize + 4)
    if memory is not None and needed > READ_MEMORY_SHARE * memory * 2**30:
        raise BadInputError(f"{described}; reading it needs about {_size(needed)}, more than this machine's "
                            f"memory ({memory:.1f} GiB) allows", path)


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


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


#: Two grids are "the same" when their shapes are equal and their affines agree to this tolerance (mm).
GRID_TOLERANCE = 1e-4


def as_binary_mask(mask: Any, name: str) -> np.ndarray:
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

    image = read_nifti(path)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # noqa: BLE001 - any decoding failure is the file's fault
        raise BadInputError(f"cannot read the voxel data ({error})", path) from error
    data = data.reshape(data.shape[:3]) if data.ndim > 3 and all(s == 1 for s in data.shape[3:]) else data
    try:
        return as_binary_mask(data, "mask"), image
    except BadInputError as error:
        raise BadInputError(str(error), path) from None

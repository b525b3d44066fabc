"""Reading and writing images: NIfTI files and DICOM series in, masks out, and the geometry they share.

The one NIfTI reader (:func:`read_nifti`) and the one DICOM series reader (:func:`read_dicom_series`) of
the kit: data checks, training, evaluation, inference and the figures all read through them, so a broken
file gets the same clear message everywhere. A mask is written with its image's own header and checked
on disk before it replaces anything (:func:`write_mask`, through :mod:`spleenkit.io`).
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spleenkit import __version__
from spleenkit.environment import total_memory_gib
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


def case_name(path: str | os.PathLike[str]) -> str:
    """A case's name: the file name without ``.nii``/``.nii.gz`` (``case_007`` for ``.../case_007.nii.gz``; a DICOM
    series folder keeps its name)."""
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


# --------------------------------------------------------------------------- DICOM series in
#: The SOP Class of a DICOMDIR: an index of the files on a medium, not an image.
MEDIA_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"
#: Secondary Capture SOP Classes (screenshots, scanned documents, a scanner's dose report) start with this.
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
#: Millimetres by which a slice may lie off the line through the first and last slices of its series.
SLICE_LINE_TOLERANCE = 0.05


def _looks_like_a_bare_data_set(head: bytes) -> bool:
    """True for a DICOM data set stored without the 128-byte preamble and file meta (old PACS exports): it starts
    with a little-endian group 0002 or 0008 element, explicit VR (two capitals) or implicit (a short length)."""
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x00FF:
        return False
    if head[4:6].isalpha() and head[4:6].isupper():
        return True
    return struct.unpack("<I", head[4:8])[0] < 0x1000


def _is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as stream:
            head = stream.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() == ".dcm" or _looks_like_a_bare_data_set(head)


@dataclass
class InputVolume:
    """One volume to segment: a NIfTI file, or one DICOM series in a folder (``series_uid`` names it when the
    folder holds several, and ``label`` then tells their masks apart)."""

    path: Path
    kind: str  # "nifti" or "dicom"
    series_uid: str | None = None
    label: str | None = None

    @property
    def name(self) -> str:
        return f"{case_name(self.path)}_{self.label}" if self.label else case_name(self.path)


def find_inputs(path: str | os.PathLike[str]) -> list[InputVolume]:
    """The volumes under ``path``: a NIfTI file, or a folder of NIfTI files and/or DICOM series (the folder's
    own DICOM files, and each subfolder holding DICOM files); see :func:`scan_inputs` for what is skipped."""
    return scan_inputs(path)[0]


def _dicom_volumes(folder: Path, prefix: str) -> tuple[list[InputVolume], list[str], DicomFolder]:
    """The DICOM series of ``folder`` that are volumes, a line per DICOM file or series that is not, and what the
    folder was found to hold."""
    found = scan_dicom_folder(folder)
    skipped = [f"{prefix}{entry}" for entry in found.skipped]
    if len(found.series) <= 1:  # one series (or none): the reader says what is wrong with it, if anything
        return [InputVolume(folder, "dicom", uid) for uid in found.series], skipped, found
    volumes = []
    labels = found.labels()
    for uid, slices in sorted(found.series.items(), key=lambda item: _series_order(item[1][0].header, item[0])):
        if len(slices) < 2:
            skipped.append(f"{prefix}{slices[0].label} ({found.describe(uid)}: a single image, not a volume)")
        else:
            volumes.append(InputVolume(folder, "dicom", uid, labels[uid]))
    return volumes, skipped, found


def _some(lines: Sequence[str], shown: int = 3) -> str:
    """The first lines joined, and how many more: a reason that stays one readable line."""
    more = f"; and {len(lines) - shown} more" if len(lines) > shown else ""
    return "; ".join(lines[:shown]) + more


def _series_order(header: Any, uid: str) -> tuple[int, str]:
    try:
        return int(header.get("SeriesNumber", "") or 0), uid
    except (TypeError, ValueError):
        return 0, uid


def scan_inputs(path: str | os.PathLike[str]) -> tuple[list[InputVolume], list[str]]:
    """The volumes under ``path`` and, for a folder, a line per entry that is skipped and why, so that
    nothing in the folder is left out silently. Every NIfTI file and every DICOM series is an input; a
    folder holding several DICOM series gives one input per series (masks ``FOLDER_seriesN``), and DICOM
    files that are not slices of a volume (a DICOMDIR, a localizer, a dose report) are named and skipped.
    A DICOM file that cannot be read is an error naming it.

    DICOM series are looked for in the folder's own files and in each subfolder (:func:`scan_dicom_folder`): a
    DICOMDIR (a CD, DVD or PACS media export; given itself, it stands for its folder) brings in every image it
    lists, however deep, as its folder's series; a subfolder without DICOM files of its own is searched
    :data:`NESTED_LEVELS` levels down, so that files up to 4 levels below the input are found (deeper is named,
    not searched: a bounded search keeps a mistaken ``--input`` quick and its report short).
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError("input not found", path)
    if path.is_file():
        if is_nifti(path):
            return [InputVolume(path, "nifti")], []
        if not _is_dicom_file(path):
            raise BadInputError("not a NIfTI file (.nii or .nii.gz) or a DICOM folder", path)
        if not _is_dicomdir(path):
            raise BadInputError("a single DICOM file; give the folder holding the whole series", path)
        path = path.parent
    entries = _entries(path)
    files = [p for p in entries if p.is_file()]
    volumes = [InputVolume(p, "nifti") for p in files if is_nifti(p) and not p.name.endswith(MASK_SUFFIX)]
    skipped = [f"{p.name} (a spleen mask this kit wrote)" for p in files if p.name.endswith(MASK_SUFFIX)]
    dicom_files = [p for p in files if not is_nifti(p) and _is_dicom_file(p)]
    read_through_dicomdir: frozenset[str] = frozenset()
    if dicom_files:
        found, why, scanned = _dicom_volumes(path, "")
        volumes += found
        skipped += why
        read_through_dicomdir = scanned.listed
    skipped += [f"{p.name} (not a NIfTI or DICOM file)" for p in files if not is_nifti(p) and p not in dicom_files]
    for folder in (p for p in entries if p.is_dir() and p.name not in read_through_dicomdir):
        found, why, scanned = _dicom_volumes(folder, f"{folder.name}/")
        inner = [p for p in _entries(folder) if p.is_dir()]
        if not scanned.files:
            deeper = (f"; {len(scanned.deeper)} folder(s) deeper are not searched, such as {folder.name}/"
                      f"{scanned.deeper[0]}/" if scanned.deeper else "")
            skipped.append(f"{folder.name}/ (a folder without DICOM files" + (
                f", nor any in its subfolders {NESTED_LEVELS} levels down{deeper})" if inner else ")"))
            continue
        volumes += found
        skipped += why + [f"{folder.name}/{p.name} (not a DICOM file)" for p in _entries(folder)
                          if p.is_file() and not _is_dicom_file(p)]
        if scanned.source != "subfolders":  # a folder of DICOM files: what lies below it is not its series
            why_not = ("its DICOMDIR lists nothing in it: not read" if scanned.source == "dicomdir" else
                       "in a folder of DICOM files: not searched")
            skipped += [f"{folder.name}/{p.name}/ ({why_not})" for p in inner if p.name not in scanned.listed]
        if not found:
            skipped.append(f"{folder.name}/ (no DICOM series of images in it)")
    if not volumes:
        if not entries:
            raise BadInputError("the folder is empty: no NIfTI files or DICOM series to segment", path)
        raise BadInputError(f"no NIfTI files or DICOM series among its {len(entries)} entries"
                            + (f" (skipped: {_some(skipped)})" if skipped else ""), path)
    names = [volume.name for volume in volumes]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise BadInputError(f"two inputs would write the same mask {twice[0]}{MASK_SUFFIX}: rename one", path)
    return volumes, skipped


def _is_dicomdir(path: Path) -> bool:
    try:
        header = _read_dicom_header(path)
    except BadInputError:
        return False
    return "DirectoryRecordSequence" in header or _sop_class(header) == MEDIA_DIRECTORY_STORAGE


@dataclass
class DicomSlice:
    """One slice of a DICOM series: a single-frame instance, or one frame (``frame``, 0-based) of a multi-frame
    (enhanced) image, with the geometry and rescale that DICOM gives it."""

    path: Path
    header: Any  # the pydicom data set, without its pixel data
    frame: int | None
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    rows: int
    columns: int
    slope: float = 1.0
    intercept: float = 0.0
    shown: str | None = None  # the file's path below the folder scanned, where it lies deeper than the folder

    @property
    def label(self) -> str:
        name = self.shown or self.path.name
        return name if self.frame is None else f"{name} (frame {self.frame + 1})"


@dataclass
class DicomFolder:
    """What one folder's DICOM files hold: the slices of each series (by SeriesInstanceUID, in file-name order),
    and a line per file that is not a slice of a volume, with why. ``source`` says where the files came from
    (:func:`scan_dicom_folder`): ``"own"`` the folder's own files, ``"dicomdir"`` also those its DICOMDIR lists
    (``listed``: the names of its subfolders holding them), ``"subfolders"`` its subfolders' files."""

    folder: Path
    series: dict[str, list[DicomSlice]]
    skipped: list[str]
    files: int = 0  # DICOM files read
    source: str = "own"
    listed: frozenset[str] = frozenset()
    deeper: tuple[str, ...] = ()  # the folders below the levels searched (source "subfolders")

    def describe(self, uid: str) -> str:
        return _describe_series(self.series[uid][0].header, uid)

    def labels(self) -> dict[str, str]:
        """A short distinct label per series, for the names of their masks: ``seriesN`` by SeriesNumber,
        else the end of the SeriesInstanceUID."""
        numbers = {uid: str(slices[0].header.get("SeriesNumber", "") or "") for uid, slices in self.series.items()}
        if all(numbers.values()) and len(set(numbers.values())) == len(numbers):
            return {uid: f"series{number}" for uid, number in numbers.items()}
        return {uid: f"series{uid.replace('.', '')[-8:]}" for uid in self.series}

    def pick(self, series_uid: str | None = None) -> list[DicomSlice]:
        """The slices of ``series_uid``, or of the folder's only series."""
        if series_uid is not None:
            if series_uid not in self.series:
                raise BadInputError(f"no DICOM series {series_uid} here", self.folder)
            return self.series[series_uid]
        if not self.series:
            why = f" (skipped: {_some(self.skipped)})" if self.skipped else ""
            raise BadInputError(f"no DICOM images with a position (ImagePositionPatient) found{why}", self.folder)
        if len(self.series) > 1:
            listed = "; ".join(f"{uid} ({s[0].header.get('SeriesDescription', '') or 'no description'}, "
                               f"{len(s)} image(s))" for uid, s in self.series.items())
            raise BadInputError(f"holds {len(self.series)} DICOM series, give a folder with one: {listed}",
                                self.folder)
        return next(iter(self.series.values()))


def _read_dicom_header(path: Path) -> Any:
    """A DICOM file's data set without its pixel data (files without a preamble or file meta too)."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings on odd values; what matters is checked below
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as error:  # noqa: BLE001 - pydicom raises many types for a broken file
        raise BadInputError(f"an unreadable DICOM file ({type(error).__name__}: {error})".splitlines()[0],
                            path) from error


def _sop_class(header: Any) -> str:
    """The SOP Class UID of the data set, or, where an anonymiser emptied it, of the file meta."""
    value = str(header.get("SOPClassUID", "") or "")
    meta = getattr(header, "file_meta", None)
    return value or str((meta.get("MediaStorageSOPClassUID", "") if meta is not None else "") or "")


def _not_a_slice(header: Any) -> str | None:
    """Why a readable DICOM data set is not a slice of a CT volume, or None when it is an image to stack."""
    from pydicom.uid import UID

    sop_class = _sop_class(header)
    if sop_class == MEDIA_DIRECTORY_STORAGE or "DirectoryRecordSequence" in header:
        return "a DICOMDIR: the index of an export, not an image"
    if str(header.get("Modality", "")).upper() in ("SEG", "RTSTRUCT", "SR", "PR", "KO", "REG"):
        return f"a {header.Modality} object, not an image to segment"
    image_type = header.get("ImageType") or []
    image_type = [str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)]
    if "LOCALIZER" in image_type:
        return "a localizer (scout) image, not a slice of the volume"
    if "Rows" not in header:
        name = UID(sop_class).name if sop_class else ""
        if sop_class and "Image" not in name and name != sop_class:
            return f"a {name} object, not an image"
        return None  # an image without its image attributes: named as truncated by the caller
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX) and not header.get("ImagePositionPatient"):
        return "a secondary capture without a position (a screenshot or dose report), not a slice of the volume"
    return None


def _describe_series(header: Any, uid: str) -> str:
    """``series 3 (Abdomen 5.0 I30f)``: a series as a user finds it in a viewer (a DICOMDIR's SERIES record works)."""
    number = header.get("SeriesNumber")
    text = header.get("SeriesDescription") or "no description"
    return f"series {number if number not in (None, '') else uid} ({text})"


def _first(item: Any, shared: Any, sequence: str, attribute: str) -> Any:
    for source in (item, shared):
        if source is not None and sequence in source and len(source[sequence].value) \
                and attribute in source[sequence].value[0]:
            return source[sequence].value[0][attribute].value
    return None


def _slices_of(path: Path, header: Any) -> list[DicomSlice]:
    """The slices a DICOM image file holds: itself, or each frame of a multi-frame (enhanced) image."""
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in header:
        shared = header.SharedFunctionalGroupsSequence[0] if header.get("SharedFunctionalGroupsSequence") else None
        slices = []
        for index, item in enumerate(header.PerFrameFunctionalGroupsSequence):
            values = {}
            for sequence, attribute in (("PlanePositionSequence", "ImagePositionPatient"),
                                        ("PlaneOrientationSequence", "ImageOrientationPatient"),
                                        ("PixelMeasuresSequence", "PixelSpacing")):
                values[attribute] = _first(item, shared, sequence, attribute)
                if values[attribute] is None:
                    raise BadInputError(f"frame {index + 1} of the multi-frame image has no {attribute} "
                                        f"({sequence}): it cannot be placed in space", path)
            slope = _first(item, shared, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _first(item, shared, "PixelValueTransformationSequence", "RescaleIntercept")
            slices.append(_dicom_slice(path, header, index, values["ImagePositionPatient"],
                                       values["ImageOrientationPatient"], values["PixelSpacing"], slope, intercept))
        return slices
    if frames > 1:
        raise BadInputError(f"a multi-frame image ({frames} frames) without per-frame positions "
                            "(PerFrameFunctionalGroupsSequence): it cannot be stacked into a volume", path)
    for attribute in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if not header.get(attribute):
            raise BadInputError(f"the image has no {attribute}: it cannot be placed in space (a series for "
                                "segmentation needs ImagePositionPatient, ImageOrientationPatient and PixelSpacing "
                                "in every slice)", path)
    return [_dicom_slice(path, header, None, header.ImagePositionPatient, header.ImageOrientationPatient,
                         header.PixelSpacing, header.get("RescaleSlope"), header.get("RescaleIntercept"))]


def _dicom_slice(path: Path, header: Any, frame: int | None, position: Any, orientation: Any, spacing: Any,
                 slope: Any, intercept: Any) -> DicomSlice:
    where = path if frame is None else f"{path} (frame {frame + 1})"
    try:
        position_, orientation_ = np.array(position, dtype=float), np.array(orientation, dtype=float)
        spacing_ = tuple(float(v) for v in spacing)
        rows, columns = int(header.Rows), int(header.Columns)
        slope_ = 1.0 if slope in (None, "") else float(slope)
        intercept_ = 0.0 if intercept in (None, "") else float(intercept)
    except (AttributeError, TypeError, ValueError) as error:
        raise BadInputError(f"unusable geometry or rescale values ({type(error).__name__}: {error})"
                            .splitlines()[0], where) from error
    if position_.shape != (3,) or orientation_.shape != (6,) or len(spacing_) != 2 or min(spacing_) <= 0 \
            or not (np.all(np.isfinite(position_)) and np.all(np.isfinite(orientation_))):
        raise BadInputError(f"unusable geometry: ImagePositionPatient {list(position)}, ImageOrientationPatient "
                            f"{list(orientation)}, PixelSpacing {list(spacing)}", where)
    return DicomSlice(path, header, frame, position_, orientation_, spacing_, rows, columns, slope_ or 1.0,
                      intercept_)


def _entries(folder: Path) -> list[Path]:
    """A folder's entries in name order, without hidden ones."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _shown(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


class _Reading:
    """The headers read for one folder's series so far: the slices by series, what was skipped and why, and which
    files and SOP instances were read (a DICOMDIR's record is found by either)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.series: dict[str, list[DicomSlice]] = {}
        self.skipped: list[str] = []
        self.paths: set[Path] = set()  # the files read
        self.named: set[Path] = set()  # the files not read, named in ``skipped``
        self.instances: set[str] = set()
        self.indexes: list[tuple[Path, Any]] = []  # the DICOMDIRs read, with their data sets

    def read(self, path: Path, shown: str) -> None:
        resolved = path.resolve()
        if resolved in self.paths:
            return
        self.paths.add(resolved)
        header = _read_dicom_header(path)
        meta = getattr(header, "file_meta", None)
        instance = str(header.get("SOPInstanceUID", "") or (meta.get("MediaStorageSOPInstanceUID", "")
                                                           if meta is not None else "") or "")
        if instance:
            self.instances.add(instance)
        why = _not_a_slice(header)
        if why:
            self.skipped.append(f"{shown} ({why})")
            if "DirectoryRecordSequence" in header:
                self.indexes.append((path, header))
            return
        if "Rows" not in header:
            raise BadInputError("an unreadable or truncated DICOM file: no image attributes (Rows, Columns) could "
                                "be read", path)
        uid = str(header.get("SeriesInstanceUID", "") or "")
        if not uid:
            raise BadInputError("the image has no SeriesInstanceUID: it cannot be told apart from other series",
                                path)
        slices = _slices_of(path, header)
        if shown != path.name:
            for item in slices:
                item.shown = shown
        self.series.setdefault(uid, []).extend(slices)


def _dicomdir_records(header: Any) -> list[tuple[Any, tuple[Any, ...]]]:
    """The directory records of a DICOMDIR that are in use, each with its ancestors (PATIENT, STUDY, SERIES), by
    the offsets that link them (pydicom's FileSet follows the same links, but it drops a record whose file is
    missing with only a warning and matches file names by case; here a missing file is named, and a CD mounted
    on Linux may show its upper-case names in lower case)."""
    records = {int(record.seq_item_tell): record for record in header.DirectoryRecordSequence}
    found: list[tuple[Any, tuple[Any, ...]]] = []
    seen: set[int] = set()

    def walk(offset: int, parents: tuple[Any, ...]) -> None:
        while offset:
            if offset not in records or offset in seen:
                raise ValueError(f"a record offset ({offset}) that leads to no record, or back to one")
            seen.add(offset)
            record = records[offset]
            if record.get("RecordInUseFlag", 0xFFFF) != 0:  # 0: a record marked deleted
                found.append((record, parents))
                walk(int(record.get("OffsetOfReferencedLowerLevelDirectoryEntity") or 0), (*parents, record))
            offset = int(record.get("OffsetOfTheNextDirectoryRecord") or 0)

    walk(int(header.get("OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity") or 0), ())
    return found


def _on_disk(folder: Path, parts: Sequence[str], listings: dict[Path, dict[str, list[Path]]]) -> Path | None:
    """The file ``parts`` (a ReferencedFileID) names below ``folder``, each name matched exactly or else regardless
    of case (a unique match); None when there is none."""
    here = folder
    for part in parts:
        there = here / part
        if not there.exists():
            if here not in listings:
                listings[here] = {}
                for entry in (here.iterdir() if here.is_dir() else ()):
                    listings[here].setdefault(entry.name.lower(), []).append(entry)
            matches = listings[here].get(part.lower(), [])
            if len(matches) != 1:
                return None
            there = matches[0]
        here = there
    return here if here.is_file() else None


def _read_dicomdir(reading: _Reading, path: Path, header: Any) -> set[str]:
    """Read the images a DICOMDIR lists, at any depth below its folder, into ``reading``; name each listed file that
    is missing (a missing image makes its series incomplete: skipped, never stacked with a gap or cut short).
    Returns the names of the scanned folder's subfolders that hold listed files."""
    folder, root, index = reading.folder, path.parent, _shown(path, reading.folder)
    try:
        records = _dicomdir_records(header)
    except (AttributeError, KeyError, TypeError, ValueError, RecursionError) as error:
        reading.skipped.append(f"{index} (a DICOMDIR whose records cannot be followed "
                               f"({type(error).__name__}: {error}); the files beside it are read)".splitlines()[0])
        return set()
    listings: dict[Path, dict[str, list[Path]]] = {}
    listed: list[tuple[Path, str]] = []
    missing: list[tuple[str, Any, Any]] = []
    tops: set[str] = set()
    for record, parents in records:
        value = record.get("ReferencedFileID")
        if not value:
            continue
        parts = [str(value)] if isinstance(value, str) else [str(part) for part in value]
        if any(part in ("", ".", "..") or "/" in part or "\\" in part for part in parts):
            reading.skipped.append(f"{'/'.join(parts)} (listed in {index} outside its folder: not read)")
            continue
        name = _shown(root / "/".join(parts), folder)
        found = _on_disk(root, parts, listings)
        below = Path(_shown(found, folder) if found is not None else name).parts
        if len(below) > 1:
            tops.add(below[0].lower())
        if found is None:
            series = next((p for p in reversed(parents) if p.get("DirectoryRecordType") == "SERIES"), None)
            missing.append((name, record, series))
        else:
            listed.append((found, _shown(found, folder)))
    for found, shown in sorted(listed, key=lambda item: item[1]):
        if _is_dicom_file(found):
            reading.read(found, shown)
        else:
            reading.skipped.append(f"{shown} (listed in {index}, but not a DICOM file)")
            reading.named.add(found.resolve())
    known = reading.paths | reading.named
    for inner in sorted({found.parent for found, _ in listed} - {folder, root}):  # what was added after the burn
        for entry in _entries(inner):
            if entry.is_file() and entry.resolve() not in known:
                reading.skipped.append(f"{_shown(entry, folder)} (not listed in {index}: not read)")
                reading.named.add(entry.resolve())
    incomplete: dict[str, list[tuple[str, Any]]] = {}
    for name, record, series in missing:
        if str(record.get("ReferencedSOPInstanceUIDInFile", "") or "") in reading.instances:
            continue  # the instance was read under another name (a DICOMDIR beside the images it indexes)
        kind = str(record.get("DirectoryRecordType", "") or "")
        uid = str(series.get("SeriesInstanceUID", "") or "") if series is not None else ""
        if kind == "IMAGE" and uid:
            incomplete.setdefault(uid, []).append((name, series))
        else:
            reading.skipped.append(f"{name} (listed in {index}{' as ' + kind if kind else ''}, but missing)")
    for uid, files in incomplete.items():
        present = reading.series.pop(uid, None)
        what = _describe_series(present[0].header if present else files[0][1], uid)
        more = (f"; {len(files) - 1} more of its files {'is' if len(files) == 2 else 'are'} missing too"
                if len(files) > 1 else "")
        reading.skipped.append(f"{files[0][0]} (listed in {index}, but missing: {what} is incomplete and not "
                               f"segmented{more})")
    return {entry.name for entry in _entries(folder) if entry.is_dir() and entry.name.lower() in tops}


#: Folder levels searched below a folder that holds no DICOM file of its own. The input folder's subfolders are
#: scanned this way, so files lie at most 4 levels below the input, as DICOM/PATIENT/STUDY/SERIES/IMAGE.
NESTED_LEVELS = 3


def _nested_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The files in ``folder``'s subfolders down to :data:`NESTED_LEVELS` levels, and the folders below those."""
    files: list[Path] = []
    level = [entry for entry in _entries(folder) if entry.is_dir()]
    for _ in range(NESTED_LEVELS):
        below: list[Path] = []
        for inner in level:
            for entry in _entries(inner):
                if entry.is_dir():
                    below.append(entry)
                elif entry.is_file():
                    files.append(entry)
        level = below
    return files, level


def scan_dicom_folder(folder: str | os.PathLike[str]) -> DicomFolder:
    """Read the headers (no pixel data) of a folder's DICOM files and sort their slices into series.

    The folder's files are its own; where it holds a DICOMDIR (a CD, DVD or PACS media export), also every file
    the DICOMDIR lists, however deep; where it holds no DICOM file at all, the files in its subfolders down to
    :data:`NESTED_LEVELS` levels (an export without its DICOMDIR, PATIENT/STUDY/SERIES/IMAGE). DICOM files that
    are not slices of a volume (a DICOMDIR, a localizer, a secondary capture, a SEG or report), a series with a
    file its DICOMDIR lists but that is missing, and files or folders that are not read are skipped with a line
    saying why. A file that looks like DICOM but cannot be read, or an image without the geometry a volume needs
    (ImagePositionPatient, ImageOrientationPatient, PixelSpacing), is an error naming the file: it is never
    left out silently.
    """
    folder = Path(folder)
    reading = _Reading(folder)
    own = [p for p in _entries(folder) if p.is_file() and not is_nifti(p) and _is_dicom_file(p)]
    for path in own:
        reading.read(path, path.name)
    source, listed, deeper = "own", set(), []
    for path, header in list(reading.indexes):
        source = "dicomdir"
        listed |= _read_dicomdir(reading, path, header)
    if not own:
        source = "subfolders"
        files, deeper = _nested_files(folder)
        for path in files:
            if not is_nifti(path) and _is_dicom_file(path):
                reading.read(path, _shown(path, folder))
            else:
                reading.skipped.append(f"{_shown(path, folder)} (not a DICOM file)")
                reading.named.add(path.resolve())
        for path, header in list(reading.indexes):  # a DICOMDIR found below lists its images, however deep
            _read_dicomdir(reading, path, header)
        read = [path.parent for path in reading.paths]
        deeper = [inner for inner in deeper if not any(inner.resolve() in (p, *p.parents) for p in read)]
        if not reading.paths:  # nothing DICOM below either: the caller names the folder in one line
            reading.skipped = []
        else:
            reading.skipped += [f"{_shown(inner, folder)}/ (deeper than {NESTED_LEVELS} levels below {folder.name}/: "
                                "not searched)" for inner in deeper]
    return DicomFolder(folder, reading.series, reading.skipped, len(reading.paths), source, frozenset(listed),
                       tuple(_shown(inner, folder) for inner in deeper))


def check_series(slices: Sequence[DicomSlice], folder: str | os.PathLike[str]) -> list[DicomSlice]:
    """The slices of one series in the order of their position along the slice normal, once they are proved to
    make one regular volume: one orientation, one pixel spacing and one size; no two at a position, no gap,
    even spacing, all on one line. Otherwise an error names the slice and what is wrong."""
    folder = Path(folder)
    if not slices:
        raise BadInputError("no DICOM images with a position (ImagePositionPatient) found", folder)
    first = slices[0]
    for item in slices[1:]:
        if not np.allclose(item.orientation, first.orientation, atol=1e-4):
            raise BadInputError(f"its orientation (ImageOrientationPatient {np.round(item.orientation, 4).tolist()}) "
                                f"differs from that of {first.label} ({np.round(first.orientation, 4).tolist()}): "
                                "slices of one series must share it", item.path)
        if not np.allclose(item.pixel_spacing, first.pixel_spacing, rtol=0, atol=1e-4):
            raise BadInputError(f"its PixelSpacing ({item.pixel_spacing[0]:g} x {item.pixel_spacing[1]:g} mm) "
                                f"differs from that of {first.label} ({first.pixel_spacing[0]:g} x "
                                f"{first.pixel_spacing[1]:g} mm): slices of one series must share it", item.path)
        if (item.rows, item.columns) != (first.rows, first.columns):
            raise BadInputError(f"its size ({item.rows} x {item.columns} pixels) differs from that of {first.label} "
                                f"({first.rows} x {first.columns}): slices of one series must share it", item.path)
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    positions = np.array([float(np.dot(item.position, normal)) for item in slices])
    order = np.argsort(positions, kind="stable")
    ordered = [slices[i] for i in order]
    positions = positions[order]
    if len(ordered) < 2:
        raise BadInputError("the DICOM series has a single slice: a 2D image; spleen segmentation needs a 3D volume",
                            folder)
    steps = np.diff(positions)
    if np.any(steps < 1e-3):
        index = int(np.argmin(steps))
        raise BadInputError(f"two slices at the same position ({positions[index]:.2f} mm: "
                            f"{ordered[index].label} and {ordered[index + 1].label}); more than one volume?", folder)
    usual = float(np.median(steps))
    for index, step in enumerate(steps):
        if step > 1.5 * usual:
            missing = round(step / usual) - 1
            raise BadInputError(f"missing slices: a gap of {step:.2f} mm between {ordered[index].label} and "
                                f"{ordered[index + 1].label} where the series steps {usual:.2f} mm "
                                f"(about {missing} slice(s) missing)", folder)
        if abs(step - usual) > SLICE_GAP_TOLERANCE * usual:
            raise BadInputError(f"uneven slice spacing: {step:.2f} mm between {ordered[index].label} and "
                                f"{ordered[index + 1].label}, {usual:.2f} mm elsewhere", folder)
    start, end = ordered[0].position, ordered[-1].position
    for index, item in enumerate(ordered):
        expected = start + (end - start) * index / (len(ordered) - 1)
        if np.linalg.norm(item.position - expected) > SLICE_LINE_TOLERANCE + 0.01 * usual:
            raise BadInputError(f"the slice at {np.round(item.position, 2).tolist()} mm lies "
                                f"{np.linalg.norm(item.position - expected):.2f} mm off the line through the "
                                "series' first and last slices: not one regular volume", item.path)
    return ordered


def dicom_series_slices(folder: str | os.PathLike[str], series_uid: str | None = None) -> list[DicomSlice]:
    """The checked slices of the series ``series_uid`` (or of the folder's only series), ordered along the
    slice normal: the order of the volume's third axis."""
    found = scan_dicom_folder(folder)
    for entry in found.skipped:
        log.debug("%s: skipped %s", folder, entry)
    return check_series(found.pick(series_uid), folder)


def _decode(path: Path) -> np.ndarray:
    """The stored pixel values of a DICOM file, (frames, rows, columns) or (rows, columns)."""
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(path, force=True)
            meta = dataset.file_meta
            if "TransferSyntaxUID" not in meta:  # no file meta: as the data set itself was encoded
                implicit, little = dataset.original_encoding
                meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
            return dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - compressed data without a decoder, truncated files...
        raise BadInputError(f"cannot decode the pixel data ({type(error).__name__}: {error})".splitlines()[0],
                            path) from error


def dicom_affine(slices: Sequence[DicomSlice]) -> np.ndarray:
    """The NIfTI (RAS) affine of ordered slices (:func:`check_series`): array axis 0 along a row (the column
    index), axis 1 down a column (the row index), axis 2 through the slices; float32-exact, as a header holds."""
    first, last = slices[0], slices[-1]
    row_direction, column_direction = first.orientation[:3], first.orientation[3:]
    row_spacing, column_spacing = first.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = row_direction * column_spacing
    affine[:3, 1] = column_direction * row_spacing
    affine[:3, 2] = (last.position - first.position) / (len(slices) - 1)
    affine[:3, 3] = first.position
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # DICOM's LPS -> NIfTI's RAS
    return affine.astype(np.float32).astype(np.float64)


def read_dicom_series(folder: str | os.PathLike[str], series_uid: str | None = None) -> nib.Nifti1Image:
    """Read one DICOM series (``series_uid``, or the folder's only one) into a NIfTI image (RAS affine from the
    DICOM geometry, values rescaled to HU by each slice's RescaleSlope/Intercept).

    Slices are single-frame files in any order and encoding (compressed, Implicit VR, big endian, without
    file meta) or the frames of one multi-frame (enhanced) image. Two series (without ``series_uid``), slices
    that disagree on orientation, pixel spacing or size, a gap, uneven spacing, two slices at one position or a
    file that cannot be read or decoded are errors naming the folder or file, not guesses.
    """
    import nibabel as nib

    folder = Path(folder)
    slices = dicom_series_slices(folder, series_uid)
    decoded: dict[Path, np.ndarray] = {}
    planes = []
    for item in slices:
        if item.path not in decoded:
            decoded = {item.path: _decode(item.path)}  # a multi-frame file is decoded once for its frames
        pixels = decoded[item.path]
        if item.frame is not None:
            pixels = pixels.reshape(-1, item.rows, item.columns)[item.frame]
        if pixels.shape != (item.rows, item.columns):
            raise BadInputError(f"pixel data of shape {pixels.shape} where Rows x Columns is {item.rows} x "
                                f"{item.columns}", item.path)
        planes.append((pixels.astype(np.float32) * item.slope + item.intercept).T)
    volume = np.stack(planes, axis=-1)
    if np.all(np.mod(volume, 1) == 0) and volume.min() >= -32768 and volume.max() <= 32767:
        volume = volume.astype(np.int16)
    image = nib.Nifti1Image(volume, dicom_affine(slices))
    image.header.set_xyzt_units("mm", "sec")
    return image


def write_dicom_series(image: nib.spatialimages.SpatialImage, folder: str | os.PathLike[str], *,
                       description: str = "CT (written by spleenkit)") -> Path:
    """Write a CT volume as a DICOM series, one CT Image file per slice along its third axis (for teaching:
    what a scanner would export, so that the DICOM path of ``infer`` can be tried without patient data).

    Values are stored as signed 16-bit HU (rounded); geometry, study, series and frame-of-reference UIDs are
    what a reader needs. ``folder`` must not exist or be empty. :func:`read_dicom_series` reads it back on the
    image's own grid when its third axis runs along the slice normal, as an axial stack does.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise BadInputError("the folder for the DICOM series exists and is not empty", folder)
    _check_3d(image.shape, getattr(image, "get_filename", lambda: None)() or folder)
    volume = np.rint(np.asanyarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3]))
    if volume.min() < -32768 or volume.max() > 32767 or not np.all(np.isfinite(volume)):
        raise BadInputError("values outside the signed 16-bit range of CT pixels", folder)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(image.affine, dtype=float)
    column_spacing, row_spacing, _ = voxel_spacing(lps)
    orientation = [*(lps[:3, 0] / column_spacing), *(lps[:3, 1] / row_spacing)]
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    for index in range(volume.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality, ds.Manufacturer, ds.SoftwareVersions = "CT", "spleenkit", __version__
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Spleenkit", "spleenkit", "", "O"
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "", "", "1", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 1, index + 1, description
        ds.ImageType, ds.PositionReferenceIndicator = ["DERIVED", "PRIMARY", "AXIAL"], ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, :3] @ [0, 0, index] + lps[:3, 3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.PixelSpacing = [f"{row_spacing:.8g}", f"{column_spacing:.8g}"]
        ds.SliceThickness = f"{voxel_spacing(lps)[2]:.8g}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(volume[:, :, index].T.astype(np.int16)).tobytes()
        write_with(folder / f"slice_{index + 1:04d}.dcm",
                   lambda temporary, ds=ds: ds.save_as(temporary, enforce_file_format=True))
    return folder


def load_volume(volume: InputVolume) -> nib.spatialimages.SpatialImage:
    """The input as a NIfTI image (a DICOM series is converted in memory)."""
    if volume.kind == "dicom":
        return read_dicom_series(volume.path, volume.series_uid)
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

"""DICOM Segmentation: the mask predicted for a DICOM series, as a DICOM SEG object (highdicom).

A radiologist's viewer (3D Slicer, OHIF, a PACS) shows a DICOM Segmentation over the CT it came from:
the object references the source series and, frame by frame, the source instance (slice) it covers.
Each frame is found from its source slice's ImagePositionPatient on the mask's grid (never from file
order), so a frame cannot land on the wrong slice. What a SEG must copy from its source and an export left
out is derived where DICOM allows it (and listed), otherwise no SEG is written and the reason is given.
:func:`read_back_with_dcmqi` reads a SEG with dcmqi, the converter 3D Slicer uses, onto a mask's grid.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spleenkit import __version__
from spleenkit.errors import BadInputError, NoSegmentation
from spleenkit.images import read_nifti, scan_dicom_folder
from spleenkit.io import write_with

if TYPE_CHECKING:
    import nibabel as nib

    from spleenkit.images import DicomSlice

#: The file written beside ``NAME_spleen.nii.gz`` for a DICOM series input.
SEG_SUFFIX = "_spleen_seg.dcm"
#: Patient and study attributes a SEG copies from its source that DICOM lets be empty (type 2); anonymised
#: exports often drop them, so a missing one is copied as empty.
EMPTY_IF_MISSING = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber")
#: Voxels by which an instance's position may miss a slice of the mask's grid (float32 affine rounding).
POSITION_TOLERANCE = 0.05


@dataclass
class DicomSegmentation:
    """A DICOM Segmentation written: its file, and a line per source value it had to derive or fill in."""

    path: Path
    derived: list[str] = field(default_factory=list)


def slice_index(position: Any, affine: np.ndarray, where: Any = None) -> int:
    """The index along the mask's third axis of the slice whose first pixel is at ``position`` (a header with
    ImagePositionPatient, or the LPS position itself)."""
    where = where if where is not None else getattr(position, "filename", None)
    lps = np.array(getattr(position, "ImagePositionPatient", position), dtype=float)
    voxel = np.linalg.inv(affine) @ np.array([-lps[0], -lps[1], lps[2], 1.0])  # DICOM's LPS -> NIfTI's RAS
    index = int(round(voxel[2]))
    if np.any(np.abs(voxel[:3] - [0, 0, index]) > POSITION_TOLERANCE):
        raise BadInputError(f"the slice at {lps.round(2).tolist()} mm is not on the mask's grid "
                            f"(voxel {voxel[:3].round(2).tolist()})", where)
    return index


def frames_for_instances(mask: np.ndarray, affine: np.ndarray, sources: Sequence[Any]) -> np.ndarray:
    """The mask's slices as SEG frames (rows, columns), one per source slice (a header, or a
    :class:`spleenkit.images.DicomSlice`), in the order of ``sources``.

    ``mask`` is in the series' NIfTI geometry (``affine``, as spleenkit.images.read_dicom_series builds it):
    voxel (i, j, k) is column i, row j of slice k.
    """
    indices = [slice_index(getattr(source, "position", source), affine, getattr(source, "path", None))
               for source in sources]
    if sorted(indices) != list(range(mask.shape[2])):
        raise BadInputError(f"the series' {len(sources)} instances do not cover the mask's {mask.shape[2]} slices "
                            "once each")
    return np.stack([np.asarray(mask[:, :, index]).T for index in indices]).astype(np.uint8)


def _prepared_sources(slices: Sequence[DicomSlice]) -> tuple[dict[Path, Any], list[str]]:
    """Copies of the source headers holding what highdicom copies into a SEG, and a line per value derived
    (SOP Class and Instance UIDs from the file meta, SliceThickness from the slice spacing) or filled in
    empty (type 2 patient and study attributes). :class:`NoSegmentation` when something cannot be derived."""
    headers: dict[Path, Any] = {}
    for item in slices:
        if item.path not in headers:
            headers[item.path] = copy.deepcopy(item.header)
    files = list(headers)
    if len(files) > 1 and any(item.frame is not None for item in slices):
        raise NoSegmentation("the series is split over several multi-frame images; highdicom makes a "
                             "Segmentation of one multi-frame image or of single-frame images", files[0])
    derived: list[str] = []
    first = headers[files[0]]
    for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                  ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        taken = 0
        for path, header in headers.items():
            if str(header.get(keyword, "") or ""):
                continue
            meta = getattr(header, "file_meta", None)
            value = str((meta.get(meta_keyword, "") if meta is not None else "") or "")
            if not value:
                raise NoSegmentation(f"{keyword} is {'empty' if keyword in header else 'missing'} and the file has "
                                     f"no file meta ({meta_keyword}) to take it from: a Segmentation must "
                                     "reference its source by it", path)
            setattr(header, keyword, value)
            taken += 1
        if taken:
            from pydicom.uid import UID

            shown = f" ({UID(first.SOPClassUID).name})" if keyword == "SOPClassUID" else ""
            derived.append(f"{keyword}: empty or missing in {taken} of {len(headers)} file(s); taken from their "
                           f"file meta ({meta_keyword}){shown}")
    for keyword, why in (("StudyInstanceUID", "a Segmentation joins its source's study"),
                         ("FrameOfReferenceUID", "a Segmentation places its frames in the source's frame of "
                                                 "reference")):
        for path, header in headers.items():
            if not str(header.get(keyword, "") or ""):
                raise NoSegmentation(f"the source has no {keyword} ({why}; it cannot be derived)", path)
    emptied = sorted({name for header in headers.values() for name in EMPTY_IF_MISSING if name not in header})
    for header in headers.values():
        for name in EMPTY_IF_MISSING:
            if name not in header:
                setattr(header, name, "")
    if emptied:
        derived.append(f"{', '.join(emptied)}: missing in the source; written empty (DICOM lets them be empty)")
    if slices[0].frame is None and any(not header.get("SliceThickness") for header in headers.values()):
        ordered = sorted(float(np.dot(item.position, np.cross(item.orientation[:3], item.orientation[3:])))
                         for item in slices)
        step = float(np.median(np.diff(ordered))) if len(ordered) > 1 else 1.0
        for header in headers.values():
            if not header.get("SliceThickness"):
                header.SliceThickness = f"{step:.6g}"
        derived.append(f"SliceThickness: missing in the source; the spacing between slices ({step:.6g} mm) is "
                       "written instead")
    return headers, derived


def write_dicom_seg(mask: np.ndarray, affine: np.ndarray, series: str | os.PathLike[str],
                    path: str | os.PathLike[str], series_uid: str | None = None) -> DicomSegmentation:
    """Write ``mask`` (0/1, the NIfTI geometry of the series ``series_uid`` in folder ``series``, or of its only
    series) as a binary DICOM Segmentation of that series.

    The SEG is a new series in the source's study, with one frame per source slice that shows spleen
    (every slice when none does) and one segment, the spleen (SNOMED CT 78961009), found automatically
    by the kit's UNet. A source of single-frame instances or one multi-frame (enhanced) image works. What the
    source lacks and DICOM lets be derived is derived and listed in the result; otherwise
    :class:`NoSegmentation` says what is missing, and nothing is written.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    slices = scan_dicom_folder(series).pick(series_uid)  # file (and frame) order: the order highdicom expects
    prepared, derived = _prepared_sources(slices)
    sources = list(prepared.values())
    frames = frames_for_instances(mask, affine, slices)
    algorithm = hd.AlgorithmIdentificationSequence(name="spleenkit UNet", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    spleen = hd.seg.SegmentDescription(
        segment_number=1, segment_label="spleen", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Spleen, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=hd.UID(), tracking_id="spleen")
    try:
        source_series_number = int(sources[0].get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        source_series_number = 0
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[spleen], series_instance_uid=hd.UID(), series_number=source_series_number + 1000,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="spleenkit",
            manufacturer_model_name="spleenkit", software_versions=__version__, device_serial_number="none",
            series_description="spleen (spleenkit)", content_label="SPLEEN",
            omit_empty_frames=bool(frames.any()))
    except (AttributeError, KeyError, ValueError, TypeError) as error:  # the source lacks what a SEG must copy
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        raise NoSegmentation(f"highdicom cannot make a DICOM Segmentation of this series ({message})",
                             slices[0].path) from error

    def key(source: Any) -> tuple[str, int]:
        return str(source.ReferencedSOPInstanceUID), int(source.get("ReferencedFrameNumber", 0) or 0)

    expected = {(str(prepared[item.path].SOPInstanceUID), 0 if item.frame is None else item.frame + 1): frame
                for item, frame in zip(slices, frames, strict=True)}

    def check(written: Path) -> None:  # read back: each frame (highdicom orders them) shows its source slice
        back = hd.seg.segread(written)
        for frame, groups in zip(back.pixel_array.reshape(-1, *frames.shape[1:]),
                                 back.PerFrameFunctionalGroupsSequence, strict=True):
            source = key(groups.DerivationImageSequence[0].SourceImageSequence[0])
            if not np.array_equal(frame, expected.pop(source)):
                raise RuntimeError(f"internal error: the DICOM Segmentation's frame of {source} differs from the mask")
        if any(frame.any() for frame in expected.values()):
            raise RuntimeError("internal error: the DICOM Segmentation lacks a frame that shows spleen")

    written = write_with(path, lambda temporary: seg.save_as(temporary), check=check)
    return DicomSegmentation(written, derived)


# --------------------------------------------------------------------------- read back by dcmqi
def dcmqi_converter() -> str | None:
    """The path of dcmqi's ``segimage2itkimage`` (``pip install dcmqi``), or None when it is not installed."""
    try:
        import dcmqi
    except ImportError:
        return shutil.which("segimage2itkimage")
    try:
        return str(dcmqi._lookup("segimage2itkimage"))
    except (AttributeError, FileNotFoundError):
        return shutil.which("segimage2itkimage")


def read_back_with_dcmqi(seg: str | os.PathLike[str], reference: nib.spatialimages.SpatialImage,
                         timeout: float = 300) -> np.ndarray:
    """A DICOM Segmentation as dcmqi reads it (``segimage2itkimage``, the converter 3D Slicer uses), put on
    ``reference``'s voxel grid (a mask or image the kit wrote): 1 where any segment is, 0 elsewhere.

    Each voxel of dcmqi's output lands on the reference voxel at its position (the nearest, within a hundredth
    of a voxel, else an error): no interpolation. Raises :class:`ModuleNotFoundError` when dcmqi is not
    installed, :class:`BadInputError` when dcmqi cannot read the file.
    """
    converter = dcmqi_converter()
    if converter is None:
        raise ModuleNotFoundError("dcmqi is not installed (pip install dcmqi): it reads DICOM SEG as 3D Slicer does",
                                  name="dcmqi")
    seg = Path(seg)
    with tempfile.TemporaryDirectory(prefix="spleenkit-dcmqi-") as scratch:
        done = subprocess.run([converter, "--inputDICOM", str(seg), "--outputDirectory", scratch, "-t", "nifti",
                               "--prefix", "segment"], capture_output=True, text=True, timeout=timeout)
        outputs = sorted(Path(scratch).glob("segment-*.nii*"))
        if done.returncode != 0 or not outputs:
            last = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[-1]
            raise BadInputError(f"dcmqi's segimage2itkimage cannot read it ({last})", seg)
        result = np.zeros(reference.shape[:3], dtype=np.uint8)
        for output in outputs:
            image = read_nifti(output)
            data = np.asanyarray(image.dataobj).reshape(image.shape[:3])
            to_reference = np.linalg.inv(reference.affine) @ image.affine
            indices = np.argwhere(data > 0).T
            mapped = to_reference[:3, :3] @ indices + to_reference[:3, 3:]
            nearest = np.rint(mapped).astype(int)
            if indices.size and (np.abs(mapped - nearest).max() > 0.01 or nearest.min() < 0
                                 or np.any(nearest.max(axis=1) >= np.array(reference.shape[:3]))):
                raise BadInputError("dcmqi places the segment off the reference's voxel grid", seg)
            result[tuple(nearest)] = 1
    return result

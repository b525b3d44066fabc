"""DICOM Segmentation: the mask predicted for a DICOM series, as a DICOM SEG object (highdicom).

A radiologist's viewer (3D Slicer, OHIF, a PACS) shows a DICOM Segmentation over the CT it came from:
the object references the source series and, frame by frame, the source instance (slice) it covers.
Each frame is found from its instance's ImagePositionPatient on the mask's grid (never from file
order), so a frame cannot land on the wrong slice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spleenkit import __version__
from spleenkit.errors import BadInputError
from spleenkit.images import dicom_image_headers
from spleenkit.io import write_with

#: The file written beside ``NAME_spleen.nii.gz`` for a DICOM series input.
SEG_SUFFIX = "_spleen_seg.dcm"
#: Patient and study attributes a SEG copies from its source that DICOM lets be empty (type 2); anonymised
#: exports often drop them, so a missing one is copied as empty.
EMPTY_IF_MISSING = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber")
#: Voxels by which an instance's position may miss a slice of the mask's grid (float32 affine rounding).
POSITION_TOLERANCE = 0.05


def slice_index(header: Any, affine: np.ndarray) -> int:
    """The index along the mask's third axis of the slice whose first pixel is at ``header``'s position."""
    lps = np.array(header.ImagePositionPatient, dtype=float)
    voxel = np.linalg.inv(affine) @ np.array([-lps[0], -lps[1], lps[2], 1.0])  # DICOM's LPS -> NIfTI's RAS
    index = int(round(voxel[2]))
    if np.any(np.abs(voxel[:3] - [0, 0, index]) > POSITION_TOLERANCE):
        raise BadInputError(f"the slice at {lps.round(2).tolist()} mm is not on the mask's grid "
                            f"(voxel {voxel[:3].round(2).tolist()})", getattr(header, "filename", None))
    return index


def frames_for_instances(mask: np.ndarray, affine: np.ndarray, headers: Sequence[Any]) -> np.ndarray:
    """The mask's slices as SEG frames (rows, columns), one per source instance, in the order of ``headers``.

    ``mask`` is in the series' NIfTI geometry (``affine``, as spleenkit.inference.read_dicom_series
    builds it): voxel (i, j, k) is column i, row j of slice k.
    """
    indices = [slice_index(header, affine) for header in headers]
    if sorted(indices) != list(range(mask.shape[2])):
        raise BadInputError(f"the series' {len(headers)} instances do not cover the mask's {mask.shape[2]} slices "
                            "once each")
    return np.stack([np.asarray(mask[:, :, index]).T for index in indices]).astype(np.uint8)


def write_dicom_seg(mask: np.ndarray, affine: np.ndarray, series: str | os.PathLike[str],
                    path: str | os.PathLike[str]) -> Path:
    """Write ``mask`` (0/1, the NIfTI geometry of the series in folder ``series``) as a binary DICOM
    Segmentation of that series.

    The SEG is a new series in the source's study, with one frame per source instance that shows spleen
    (every instance when none does) and one segment, the spleen (SNOMED CT 78961009), found automatically
    by the kit's UNet.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    found = dicom_image_headers(series)
    if len(found) != 1:
        raise BadInputError(f"expected one DICOM series, found {len(found)}", series)
    headers = [header for _, header in next(iter(found.values()))]
    for header in headers:
        for name in EMPTY_IF_MISSING:
            if name not in header:
                setattr(header, name, "")
    frames = frames_for_instances(mask, affine, headers)
    algorithm = hd.AlgorithmIdentificationSequence(name="spleenkit UNet", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    spleen = hd.seg.SegmentDescription(
        segment_number=1, segment_label="spleen", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Spleen, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=hd.UID(), tracking_id="spleen")
    source_series_number = int(getattr(headers[0], "SeriesNumber", 0) or 0)
    try:
        seg = hd.seg.Segmentation(
            source_images=list(headers), pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[spleen], series_instance_uid=hd.UID(), series_number=source_series_number + 1000,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="spleenkit",
            manufacturer_model_name="spleenkit", software_versions=__version__, device_serial_number="none",
            series_description="spleen (spleenkit)", omit_empty_frames=bool(frames.any()))
    except (AttributeError, ValueError, TypeError) as error:  # the source lacks what a SEG must copy from it
        raise BadInputError(f"cannot make a DICOM Segmentation of this series ({error})",
                            getattr(headers[0], "filename", None)) from error

    expected = {str(header.SOPInstanceUID): frame for header, frame in zip(headers, frames, strict=True)}

    def check(written: Path) -> None:  # read back: each frame (highdicom orders them) shows its instance's slice
        back = hd.seg.segread(written)
        for frame, groups in zip(back.pixel_array.reshape(-1, *frames.shape[1:]),
                                 back.PerFrameFunctionalGroupsSequence, strict=True):
            source = str(groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            if not np.array_equal(frame, expected.pop(source)):
                raise RuntimeError(f"internal error: the DICOM Segmentation's frame of {source} differs from the mask")
        if any(frame.any() for frame in expected.values()):
            raise RuntimeError("internal error: the DICOM Segmentation lacks a frame that shows spleen")

    return write_with(path, lambda temporary: seg.save_as(temporary), check=check)

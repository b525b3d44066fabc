"""Real-looking CT series for the DICOM tests, and the quirks that hospital and archive exports have.

Not a test module: the DICOM tests import it. A series is built as pydicom datasets with the headers a
Siemens or GE scanner writes (a body-like phantom: air, fat, soft tissue, liver, a contrast-enhanced spleen
on the patient's left, the spine behind), then a quirk changes the datasets or the way they are saved. The
geometry is known here, independently of the kit's reader: :func:`expected_affine` is what a correct reader
must produce.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

#: Where the stand-in prediction of the tests finds "spleen": the phantom's spleen is 125 HU, liver 60 HU,
#: soft tissue 40 HU and bone 700 HU (noise is at most 12 HU).
SPLEEN_HU = (95, 200)


@dataclass
class Geometry:
    """A stack of axial slices (LPS mm): rows x columns pixels of ``pixel_spacing`` (row, column) mm, slices
    ``step`` mm apart along the normal of ``orientation``, the first slice's first pixel at ``origin``."""

    rows: int = 60  # not square: a reader that swaps rows and columns shows
    columns: int = 64
    slices: int = 12
    pixel_spacing: tuple[float, float] = (5.46875, 5.46875)
    step: float = 5.0
    origin: tuple[float, float, float] = (-172.265625, -305.265625, -420.0)
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    def position(self, index: int) -> np.ndarray:
        return np.asarray(self.origin, dtype=float) + index * self.step * self.normal


def expected_affine(geometry: Geometry) -> np.ndarray:
    """The NIfTI (RAS) affine of the volume: array axis 0 along a row (the column index), axis 1 down a column
    (the row index), axis 2 through the slices in the order of increasing position along the normal."""
    row_direction, column_direction = np.asarray(geometry.orientation[:3]), np.asarray(geometry.orientation[3:])
    lps = np.eye(4)
    lps[:3, 0] = row_direction * geometry.pixel_spacing[1]
    lps[:3, 1] = column_direction * geometry.pixel_spacing[0]
    lps[:3, 2] = geometry.normal * geometry.step
    lps[:3, 3] = geometry.position(0)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def phantom_slices(geometry: Geometry, seed: int = 0) -> np.ndarray:
    """Hounsfield units, (slices, rows, columns), slice 0 at ``geometry.origin``: a body in air (skin of fat,
    soft tissue, the liver on the patient's right, the spleen on the left in the middle slices, the spine)."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:geometry.rows, 0:geometry.columns].astype(float)
    y, x = (rows + 0.5) / geometry.rows - 0.5, (columns + 0.5) / geometry.columns - 0.5  # x: to the left
    body = (x / 0.42) ** 2 + (y / 0.32) ** 2 < 1
    inner = (x / 0.38) ** 2 + (y / 0.28) ** 2 < 1
    liver = ((x + 0.18) / 0.17) ** 2 + ((y + 0.02) / 0.16) ** 2 < 1
    spine = (x / 0.06) ** 2 + ((y - 0.2) / 0.06) ** 2 < 1
    volume = np.full((geometry.slices, geometry.rows, geometry.columns), -1000, dtype=np.int16)
    for index in range(geometry.slices):
        middle = abs(index - (geometry.slices - 1) / 2) / geometry.slices  # 0 in the middle slice
        radius = 0.13 * np.sqrt(max(0.0, 1 - (middle / 0.35) ** 2))
        spleen = ((x - 0.22) / max(radius, 1e-6)) ** 2 + ((y - 0.08) / max(radius * 0.8, 1e-6)) ** 2 < 1
        hu = np.where(body, -100, -1000)
        hu = np.where(inner, 40, hu)
        hu = np.where(inner & liver, 60, hu)
        hu = np.where(inner & spleen, 125, hu)
        hu = np.where(spine, 700, hu)
        noise = rng.integers(-12, 13, hu.shape)
        volume[index] = np.where(body, hu + noise, hu)
    return volume


VENDORS = {
    "siemens": dict(Manufacturer="SIEMENS", ManufacturerModelName="SOMATOM Definition AS+", StationName="CTAWP73",
                    ConvolutionKernel=["I30f", "3"], SeriesDescription="Abdomen 5.0 I30f 3 PV",
                    ProtocolName="Abdomen_PV", BitsStored=12, PixelRepresentation=0, RescaleIntercept=-1024),
    "ge": dict(Manufacturer="GE MEDICAL SYSTEMS", ManufacturerModelName="LightSpeed VCT", StationName="ct99",
               ConvolutionKernel="STANDARD", SeriesDescription="5mm Std ABD", ProtocolName="5.1 ABDOMEN",
               BitsStored=16, PixelRepresentation=1, RescaleIntercept=-1024),
}


@dataclass
class Series:
    """A series as datasets (file meta attached), with the truth it was made from."""

    datasets: list[Dataset]
    geometry: Geometry
    hounsfield: np.ndarray  # (slices, rows, columns) in the order of the geometry's positions
    names: list[str] = field(default_factory=list)  # file names; slice_0001.dcm ... by default


def ct_series(vendor: str = "siemens", geometry: Geometry | None = None, *, seed: int = 0,
              descending: bool = True, study: Dataset | None = None, series_number: int = 3,
              hounsfield: np.ndarray | None = None) -> Series:
    """One axial CT series as a scanner exports it; ``descending``: instance 1 is the head end (highest
    position) and the numbers run towards the feet, as Siemens and GE number an abdominal scan."""
    geometry = geometry or Geometry()
    hounsfield = phantom_slices(geometry, seed) if hounsfield is None else hounsfield
    headers = VENDORS[vendor]
    study_uid = study.StudyInstanceUID if study is not None else generate_uid()
    series_uid, frame_of_reference = generate_uid(), (study.FrameOfReferenceUID if study is not None
                                                      else generate_uid())
    order = range(geometry.slices - 1, -1, -1) if descending else range(geometry.slices)
    datasets = []
    for number, index in enumerate(order, start=1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20190412"
        ds.StudyTime, ds.SeriesTime, ds.AcquisitionTime, ds.ContentTime = "101500", "102012", "102031.84", "102031"
        ds.AccessionNumber, ds.Modality = "A12345678", "CT"
        ds.Manufacturer, ds.InstitutionName = headers["Manufacturer"], "Anonymous Hospital"
        ds.ReferringPhysicianName, ds.StationName = "", headers["StationName"]
        ds.StudyDescription, ds.SeriesDescription = "CT ABDOMEN WITH CONTRAST", headers["SeriesDescription"]
        ds.ManufacturerModelName = headers["ManufacturerModelName"]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Anon^Patient", "ANON0042", "", "F"
        ds.PatientAge = "054Y"
        ds.BodyPartExamined, ds.SliceThickness, ds.KVP = "ABDOMEN", f"{geometry.step:g}", "120"
        ds.ProtocolName, ds.ConvolutionKernel = headers["ProtocolName"], headers["ConvolutionKernel"]
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = "1", series_number, 1, number
        position = geometry.position(index)
        ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
        ds.ImageOrientationPatient = [f"{v:g}" for v in geometry.orientation]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.SliceLocation = f"{float(np.dot(position, geometry.normal)):.6g}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = geometry.rows, geometry.columns
        ds.PixelSpacing = [f"{v:.8g}" for v in geometry.pixel_spacing]
        ds.BitsAllocated, ds.BitsStored = 16, headers["BitsStored"]
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, headers["PixelRepresentation"]
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = headers["RescaleIntercept"], 1, "HU"
        set_pixels(ds, hounsfield[index])
        datasets.append(ds)
    names = [f"slice_{n:04d}.dcm" for n in range(1, len(datasets) + 1)]
    return Series(datasets, geometry, hounsfield, names)


def set_pixels(ds: Dataset, hounsfield: np.ndarray) -> None:
    """Store HU through the dataset's own RescaleSlope/Intercept and PixelRepresentation (native encoding)."""
    stored = np.rint((hounsfield.astype(float) - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
    dtype = np.int16 if int(ds.PixelRepresentation) == 1 else np.uint16
    info = np.iinfo(dtype)
    assert stored.min() >= info.min and stored.max() <= info.max, "HU out of the stored range"
    ds.PixelData = stored.astype(dtype).tobytes()


def save(series: Series, folder: Path, *, syntax: str = ExplicitVRLittleEndian, file_meta: bool = True) -> Path:
    """Write the series' datasets to ``folder`` (one file each, named ``series.names``). ``file_meta`` False:
    no preamble and no file meta (Implicit VR Little Endian), as some old PACS exports."""
    folder.mkdir(parents=True, exist_ok=True)
    for ds, name in zip(series.datasets, series.names, strict=True):
        if not file_meta:
            bare = Dataset(ds)  # the data set only
            bare.save_as(folder / name, implicit_vr=True, little_endian=True, enforce_file_format=False)
            continue
        ds.file_meta.TransferSyntaxUID = syntax
        if syntax == ExplicitVRBigEndian:
            ds.PixelData = np.frombuffer(ds.PixelData, dtype=f"<{pixel_code(ds)}").astype(f">{pixel_code(ds)}") \
                .tobytes()
            ds.save_as(folder / name, implicit_vr=False, little_endian=False)
            continue
        ds.save_as(folder / name, enforce_file_format=True)
    return folder


def pixel_code(ds: Dataset) -> str:
    return "i2" if int(ds.PixelRepresentation) == 1 else "u2"


def compress(series: Series, syntax: str) -> Series:
    """The series with its pixel data compressed (losslessly): RLE, JPEG-LS and JPEG 2000 by pydicom (with
    pyjpegls and pylibjpeg-openjpeg), JPEG lossless process 14 by GDCM (pydicom cannot encode it)."""
    for ds in series.datasets:
        if syntax == JPEGLosslessSV1:
            ds.PixelData = gdcm_jpeg_lossless(ds)
            ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        else:
            ds.compress(syntax)
    return series


def gdcm_jpeg_lossless(ds: Dataset) -> bytes:
    """The encapsulated JPEG lossless (process 14, selection value 1) pixel data of ``ds``, encoded by GDCM."""
    import tempfile

    import gdcm

    with tempfile.TemporaryDirectory() as scratch:
        source, target = Path(scratch) / "in.dcm", Path(scratch) / "out.dcm"
        ds.save_as(source, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        assert reader.Read(), source
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change(), "GDCM could not compress to JPEG lossless"
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(str(target))
        assert writer.Write(), target
        return pydicom.dcmread(target).PixelData


COMPRESSIONS = {"rle": RLELossless, "jpeg_ls": JPEGLSLossless, "jpeg_2000": JPEG2000Lossless,
                "jpeg_lossless": JPEGLosslessSV1}


# --------------------------------------------------------------------------- quirks
def each(series: Series, change: Callable[[Dataset], None]) -> Series:
    for ds in series.datasets:
        change(ds)
    return series


def delete(*names: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for name in names:
            if name in ds:
                delattr(ds, name)
    return change


def rescaled(series: Series, slope: float, intercept: float, pixel_representation: int) -> Series:
    """The same HU stored through another slope, intercept and sign of the stored values."""
    for ds, index in zip(series.datasets, slice_indices(series), strict=True):
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = pixel_representation, 16, 15
        set_pixels(ds, np.rint(series.hounsfield[index] / slope) * slope)
    return series


def padded(series: Series, padding: int) -> Series:
    """Outside the scanner's circular field of view the stored value is ``padding`` (PixelPaddingValue), as GE
    (-2000) and Siemens/Toshiba (-3024 stored with intercept 0) export."""
    geometry = series.geometry
    rows, columns = np.mgrid[0:geometry.rows, 0:geometry.columns]
    outside = ((rows - geometry.rows / 2 + 0.5) ** 2 + (columns - geometry.columns / 2 + 0.5) ** 2
               > (0.49 * geometry.rows) ** 2)
    for ds, index in zip(series.datasets, slice_indices(series), strict=True):
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
        ds.PixelPaddingValue = padding
        stored = np.rint(series.hounsfield[index] - float(ds.RescaleIntercept)).astype(np.int16)
        stored[outside] = padding
        ds.PixelData = stored.tobytes()
        series.hounsfield[index][outside] = padding + float(ds.RescaleIntercept)
    return series


def slice_indices(series: Series) -> list[int]:
    """For each dataset, the index of its slice in the geometry (0 = lowest position)."""
    origin, normal = np.asarray(series.geometry.origin), series.geometry.normal
    return [int(round(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float) - origin, normal)
                      / series.geometry.step)) for ds in series.datasets]


def from_volume(volume: np.ndarray, affine: np.ndarray, vendor: str = "siemens", **options: object) -> Series:
    """A series of a volume given in NIfTI voxel order with its RAS affine (axial slices along its third axis)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    column_spacing, row_spacing, step = (float(np.linalg.norm(lps[:3, axis])) for axis in range(3))
    orientation = (*(lps[:3, 0] / column_spacing), *(lps[:3, 1] / row_spacing))
    geometry = Geometry(rows=volume.shape[1], columns=volume.shape[0], slices=volume.shape[2],
                        pixel_spacing=(row_spacing, column_spacing), step=step, origin=tuple(lps[:3, 3]),
                        orientation=orientation)
    assert np.allclose(geometry.normal * step, lps[:3, 2]), "slices must run along the normal of the orientation"
    return ct_series(vendor, geometry, hounsfield=np.asarray(volume).transpose(2, 1, 0), **options)


def shuffled_names(series: Series, seed: int = 3) -> Series:
    """File names as some archives write them: no suffix, no order (the instance number is not in the name)."""
    rng = random.Random(seed)
    series.names = [f"{rng.getrandbits(40):010X}" for _ in series.datasets]
    rng.shuffle(series.datasets)
    return series


def write_dicomdir(folder: Path) -> Path:
    """A DICOMDIR indexing the folder's images, as a CD or archive export puts beside them."""
    from pydicom.fileset import FileSet

    files = sorted(p for p in folder.iterdir() if p.is_file())
    staging = folder.parent / f"{folder.name}.fileset"
    fileset = FileSet()
    for path in files:
        fileset.add(pydicom.dcmread(path))
    fileset.write(staging)
    (staging / "DICOMDIR").replace(folder / "DICOMDIR")
    import shutil

    shutil.rmtree(staging)
    return folder / "DICOMDIR"


def media_export(root: Path, datasets: Sequence[Dataset]) -> Path:
    """The datasets as a CD, DVD or PACS media export holds them, written by pydicom's FileSet as a disc burner
    writes a File-set: a DICOMDIR at ``root`` and each instance four levels down in PATIENT/STUDY/SERIES folders,
    upper-case 8-character names without suffix (``PT000000/ST000000/SE000000/IM000000``, series and images in
    the order given)."""
    from pydicom.fileset import FileSet

    fileset = FileSet()
    for ds in datasets:
        fileset.add(ds)
    fileset.write(root)
    return root / "DICOMDIR"


def lower_cased(root: Path) -> Path:
    """Every name below ``root`` in lower case, as Linux shows a CD whose ISO 9660 names are upper case (the
    DICOMDIR still names them in upper case)."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        path.rename(path.with_name(path.name.lower()))
    return root


def localizer(series: Series) -> Dataset:
    """A lateral scout (topogram) of the same study: one image, ImageType LOCALIZER, its own series."""
    template = series.datasets[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for name in ("SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "Modality", "Manufacturer",
                 "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                 "FrameOfReferenceUID", "ReferringPhysicianName"):
        setattr(ds, name, getattr(template, name))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER", "CT_SOM5 TOP"]
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), 1, 1
    ds.SeriesDescription = "Topogram  0.6  T20s"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = ["-250", "0", "-150"], ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing, ds.SliceThickness = ["1", "1"], "0.6"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", 48, 40
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.full((48, 40), 1000, np.uint16).tobytes()
    return ds


def dose_report(series: Series) -> Dataset:
    """The scanner's dose report of the series' study: a secondary capture in its own series (999), without a
    position."""
    report = localizer(series)
    report.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    report.SeriesInstanceUID, report.SeriesNumber, report.SeriesDescription = generate_uid(), 999, "Dose Report"
    for name in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(report, name)
    return report


def enhanced(series: Series) -> Dataset:
    """The series as one multi-frame Enhanced CT image (highdicom's legacy conversion, given the Enhanced CT
    SOP class), frames in the series' file order."""
    import highdicom as hd

    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=series.datasets, series_instance_uid=generate_uid(), series_number=series.datasets[0]
        .SeriesNumber, sop_instance_uid=generate_uid(), instance_number=1)
    return image


def save_datasets(datasets: Sequence[Dataset], folder: Path, names: Sequence[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for ds, name in zip(datasets, names, strict=True):
        ds.save_as(folder / name, enforce_file_format=True)
    return folder

"""DICOM in and out: compressed series decode to the uncompressed volume, and a DICOM series' mask is also
written as a DICOM Segmentation whose frames land on their source slices."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import from_volume, gdcm_jpeg_lossless
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

import spleenkit.inference
from spleenkit.dicom_seg import SEG_SUFFIX, read_back_with_dcmqi, write_dicom_seg
from spleenkit.errors import BadInputError
from spleenkit.images import read_dicom_series
from spleenkit.inference import infer

HU_LEVEL = 150  # the stand-in prediction: voxels brighter than this
# the transfer syntax, and the plugin of the core install that decodes it (the dev install adds gdcm and
# pyjpegls, which pydicom might otherwise prefer)
CORE_DECODER = {RLELossless: "pydicom", JPEGLSLossless: "pylibjpeg", JPEG2000Lossless: "pylibjpeg",
                JPEGLosslessSV1: "pylibjpeg"}


def write_dicom_series(folder: Path, volume: np.ndarray, affine: np.ndarray) -> Path:
    """The volume (NIfTI order, RAS affine) as an uncompressed series, one file per slice."""
    series = from_volume(volume, affine)
    for ds, name in zip(series.datasets, series.names, strict=True):
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / name, enforce_file_format=True)
    return folder


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """A small CT-like volume (HU, NIfTI voxel order) with a bright off-centre blob, and an oblique-free LPS-stored
    affine whose slices run from feet to head; 4.5 mm columns, so that it spans one quick-preset window (inference
    refuses an image smaller than a window on every axis)."""
    shape = (48, 40, 9)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    blob = ((grid[0] - 30) / 9) ** 2 + ((grid[1] - 15) / 7) ** 2 + ((grid[2] - 5) / 3) ** 2 < 1
    noise = np.random.default_rng(7).integers(-40, 40, shape)
    volume = np.where(blob, 250, 40) + noise
    volume[:4] = -1000  # air
    volume[:, :, 0] += 900  # something bright in the first slice only: a mislaid frame shows
    affine = np.array([[-4.5, 0, 0, 170.0], [0, -0.8, 0, 140.0], [0, 0, 2.5, -310.0], [0, 0, 0, 1]])
    return volume.astype(np.int16), affine


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom as an uncompressed DICOM series with what a scanner's export has (frame of reference, numbers)."""
    volume, affine = phantom()
    return write_dicom_series(tmp_path_factory.mktemp("dicom") / "series", volume, affine)


def compressed_copy(series: Path, folder: Path, syntax: pydicom.uid.UID) -> Path:
    folder.mkdir()
    for path in sorted(series.iterdir()):
        dataset = pydicom.dcmread(path)
        if syntax == JPEGLosslessSV1:  # which pydicom cannot encode: GDCM
            dataset.PixelData = gdcm_jpeg_lossless(dataset)
            dataset.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        else:  # pydicom's own RLE encoder, pyjpegls (JPEG-LS), pylibjpeg-openjpeg (JPEG 2000)
            dataset.compress(syntax)
        dataset.save_as(folder / path.name)
    return folder


@pytest.mark.parametrize("syntax", list(CORE_DECODER), ids=lambda uid: uid.keyword)
def test_compressed_series_decode_to_the_uncompressed_volume(series: Path, tmp_path: Path,
                                                             syntax: pydicom.uid.UID) -> None:
    compressed = compressed_copy(series, tmp_path / "compressed", syntax)
    plain = read_dicom_series(series)
    image = read_dicom_series(compressed)
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(plain.dataobj))
    assert image.get_data_dtype() == plain.get_data_dtype() and np.array_equal(image.affine, plain.affine)
    for path in sorted(compressed.iterdir()):
        dataset = pydicom.dcmread(path)
        assert dataset.file_meta.TransferSyntaxUID == syntax, f"{path.name} was not compressed"
        assert len(dataset.PixelData) < dataset.Rows * dataset.Columns * 2
        # the core install's decoder on its own, not one that only the dev tools bring
        decoded = pydicom.pixels.pixel_array(path, decoding_plugin=CORE_DECODER[syntax])
        assert np.array_equal(decoded, pydicom.dcmread(series / path.name).pixel_array)


def test_a_series_without_a_decoder_is_named(series: Path, tmp_path: Path) -> None:
    # MPEG-2: a compression pydicom has no decoder for (the bytes are RLE's; nothing gets as far as reading them)
    compressed = compressed_copy(series, tmp_path / "jpeg_xl", RLELossless)
    for path in compressed.iterdir():
        dataset = pydicom.dcmread(path)
        dataset.file_meta.TransferSyntaxUID = MPEG2MPML
        dataset.save_as(path)
    with pytest.raises(BadInputError, match="cannot decode the pixel data") as raised:
        read_dicom_series(compressed)
    assert str(compressed) in str(raised.value) and "MPEG2" in str(raised.value)


# --------------------------------------------------------------------------- DICOM Segmentation
def threshold_mask(image: nib.spatialimages.SpatialImage) -> np.ndarray:
    return (np.asarray(image.dataobj) > HU_LEVEL).astype(np.uint8)


def test_infer_writes_a_dicom_seg_whose_frames_land_on_their_source_slices(
        series: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import highdicom as hd

    # a prediction known in advance, different on every slice: the bright voxels of the image it is given
    monkeypatch.setattr(spleenkit.inference, "predict_mask", lambda network, image_path, *args, **kwargs:
                        threshold_mask(nib.load(image_path)))
    result = infer(tiny_model, series, tmp_path / "out", amp=False, overlay=False)
    (case,) = result.cases
    assert case.segmentation == str(tmp_path / "out" / f"series{SEG_SUFFIX}")
    mask = nib.load(case.mask)
    nifti = np.asarray(mask.dataobj)
    assert 0 < nifti.sum() < nifti.size and np.array_equal(nifti, threshold_mask(read_dicom_series(series)))

    seg = hd.seg.segread(case.segmentation)
    sources = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(p) for p in sorted(series.iterdir()))}
    first = next(iter(sources.values()))
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID and seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    (referenced_series,) = seg.ReferencedSeriesSequence
    assert referenced_series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced_series.ReferencedInstanceSequence} == set(sources)
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Spleen"

    # each frame: its source instance and position, and its pixels are that instance's own bright pixels; only
    # the slices that show no spleen have no frame
    def bright(source: pydicom.Dataset) -> np.ndarray:
        return (source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept) > HU_LEVEL)

    frames = seg.pixel_array.reshape(-1, first.Rows, first.Columns)
    covered = set()
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = str(groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        source = sources[uid]
        position = groups.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(v) for v in position], [float(v) for v in source.ImagePositionPatient], atol=1e-3)
        assert np.array_equal(frame, bright(source).astype(np.uint8)), f"frame of {uid} shows another slice"
        covered.add(uid)
    assert covered == {uid for uid, source in sources.items() if bright(source).any()}
    assert 0 < len(covered) < len(sources)

    # and as a volume, in highdicom's own geometry, the SEG equals the NIfTI mask voxel for voxel
    volume = seg.get_volume(combine_segments=True)
    lps_to_nifti = np.linalg.inv(mask.affine) @ np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    indices = np.indices(volume.spatial_shape).reshape(3, -1)
    mapped = np.rint(lps_to_nifti[:3, :3] @ indices + lps_to_nifti[:3, 3:]).astype(int)
    assert np.allclose(lps_to_nifti[:3, :3] @ indices + lps_to_nifti[:3, 3:], mapped, atol=1e-3)
    assert np.array_equal(volume.array.reshape(-1), nifti[tuple(mapped)])


def test_a_series_a_seg_cannot_describe_still_gets_its_mask(series: Path, tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no_frame_of_reference"
    folder.mkdir()
    for path in sorted(series.iterdir()):
        dataset = pydicom.dcmread(path)
        del dataset.FrameOfReferenceUID
        dataset.save_as(folder / path.name)
    result = infer(tiny_model, folder, tmp_path / "out", amp=False, overlay=False)
    (case,) = result.cases
    assert Path(case.mask).is_file() and case.segmentation is None
    assert "has no FrameOfReferenceUID" in case.segmentation_not_written
    assert any("no DICOM Segmentation written" in w and "FrameOfReferenceUID" in w for w in case.warnings)
    assert not list((tmp_path / "out").glob(f"*{SEG_SUFFIX}*"))


def test_a_mask_on_another_grid_is_refused(series: Path, tmp_path: Path) -> None:
    image = read_dicom_series(series)
    mask = threshold_mask(image)
    shifted = image.affine.copy()
    shifted[:3, 3] += shifted[:3, 2] * 0.5  # half a slice off: no instance lies on a slice of this grid
    with pytest.raises(BadInputError, match="not on the mask's grid"):
        write_dicom_seg(mask, shifted, series, tmp_path / "seg.dcm")
    with pytest.raises(BadInputError, match="do not cover the mask's 10 slices"):
        write_dicom_seg(np.concatenate([mask, mask[:, :, :1]], axis=2), image.affine, series, tmp_path / "seg.dcm")
    assert not list(tmp_path.iterdir())


def test_an_empty_mask_still_makes_a_seg_with_a_frame_per_instance(series: Path, tmp_path: Path) -> None:
    import highdicom as hd

    image = read_dicom_series(series)
    path = write_dicom_seg(np.zeros(image.shape, np.uint8), image.affine, series, tmp_path / "seg.dcm").path
    seg = hd.seg.segread(path)
    assert int(seg.NumberOfFrames) == len(list(series.iterdir())) and not seg.pixel_array.any()
    back = read_back_with_dcmqi(path, image)  # and 3D Slicer's converter reads it as an empty segment
    assert back.shape == image.shape and not back.any()


# --------------------------------------------------------------------------- the kit's own series writer
def test_the_kit_writes_a_series_that_readers_place_on_the_image_grid(tmp_path: Path) -> None:
    """write_dicom_series (notebook 06 makes its DICOM input with it): read back by the kit and by SimpleITK
    (GDCM), the volume and its grid are the image's."""
    import SimpleITK as sitk

    from spleenkit.images import write_dicom_series

    volume, affine = phantom()
    image = nib.Nifti1Image(volume, affine)
    folder = write_dicom_series(image, tmp_path / "written")
    back = read_dicom_series(folder)
    assert np.array_equal(np.asarray(back.dataobj), volume) and np.allclose(back.affine, affine, atol=1e-4)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    itk = reader.Execute()
    assert np.array_equal(sitk.GetArrayFromImage(itk).transpose(2, 1, 0), volume)
    direction = np.array(itk.GetDirection()).reshape(3, 3) * np.array(itk.GetSpacing())
    assert np.allclose(np.diag([-1, -1, 1]) @ direction, affine[:3, :3], atol=1e-4)
    assert np.allclose(np.diag([-1, -1, 1]) @ np.array(itk.GetOrigin()), affine[:3, 3], atol=1e-4)
    with pytest.raises(BadInputError, match="exists and is not empty"):
        write_dicom_series(image, folder)

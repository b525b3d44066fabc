"""DICOM as hospitals and archives export it: a corpus of real-looking CT series with the quirks real exports
have. Every series that can be segmented is, with its mask on exactly the series' grid and a DICOM SEG that
dcmqi (the converter 3D Slicer uses) reads back voxel for voxel equal to the mask; where no SEG can be made the
mask is still written and the reason is given; a series that cannot be read right is refused in one line
naming the file. The series come from tests/dicom_series.py, which knows their geometry independently of the
kit's reader."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dicom_series as g
import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.processing import resample_from_to
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEG2000Lossless

import spleenkit.inference
from spleenkit.cli import main
from spleenkit.dicom_seg import SEG_SUFFIX, dcmqi_converter, read_back_with_dcmqi
from spleenkit.errors import BadInputError
from spleenkit.images import read_dicom_series, scan_inputs

ENHANCED_CT, LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"
REPO = Path(__file__).resolve().parents[1]


def spleen_of(hounsfield: np.ndarray) -> np.ndarray:
    """The stand-in prediction: voxels in the spleen's HU range (as any array of HU)."""
    low, high = g.SPLEEN_HU
    return ((hounsfield > low) & (hounsfield < high)).astype(np.uint8)


def truth_mask(series: g.Series) -> np.ndarray:
    """The expected mask in the NIfTI order of the kit (column, row, slice by increasing position)."""
    return spleen_of(series.hounsfield).transpose(2, 1, 0)


# --------------------------------------------------------------------------- the corpus
def write(series: g.Series, folder: Path, **options: object) -> g.Series:
    g.save(series, folder, **options)
    return series


def siemens_tidy(folder: Path) -> g.Series:
    return write(g.ct_series(), folder)


def ge_signed_padding_2000(folder: Path) -> g.Series:
    return write(g.padded(g.ct_series("ge"), -2000), folder)


def padding_3024_intercept_0(folder: Path) -> g.Series:
    return write(g.padded(g.rescaled(g.ct_series(), 1, 0, 1), -3024), folder)


def slope_half_intercept_1000_unsigned(folder: Path) -> g.Series:
    return write(g.rescaled(g.ct_series(), 0.5, -1000, 0), folder)


def signed_hu_no_intercept(folder: Path) -> g.Series:
    return write(g.rescaled(g.ct_series("ge"), 1, 0, 1), folder)


def sop_class_empty_jpeg_2000(folder: Path) -> g.Series:
    """The reported series: JPEG 2000 lossless, the anonymiser emptied SOPClassUID (the file meta keeps it)."""
    series = g.each(g.compress(g.ct_series(), JPEG2000Lossless), lambda ds: setattr(ds, "SOPClassUID", ""))
    return write(series, folder, syntax=JPEG2000Lossless)


def sop_class_missing(folder: Path) -> g.Series:
    return write(g.each(g.ct_series(), g.delete("SOPClassUID")), folder)


def no_file_meta_no_preamble(folder: Path) -> g.Series:
    series = g.ct_series("ge")
    series.names = [f"IM{n:05d}" for n in range(len(series.datasets))]
    return write(series, folder, file_meta=False)


def implicit_vr_little_endian(folder: Path) -> g.Series:
    return write(g.ct_series(), folder, syntax=ImplicitVRLittleEndian)


def explicit_vr_big_endian(folder: Path) -> g.Series:
    return write(g.ct_series("ge"), folder, syntax=ExplicitVRBigEndian)


def shuffled_names_no_suffix(folder: Path) -> g.Series:
    return write(g.shuffled_names(g.ct_series()), folder)


def dicomdir_beside(folder: Path) -> g.Series:
    series = write(g.ct_series(), folder)
    g.write_dicomdir(folder)
    return series


def identifiers_missing(folder: Path) -> g.Series:
    return write(g.each(g.ct_series(), g.delete("PatientID", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                                                "StudyDate", "StudyTime", "PatientName", "PatientBirthDate",
                                                "PatientSex")), folder)


def slice_thickness_missing(folder: Path) -> g.Series:
    return write(g.each(g.ct_series(), g.delete("SliceThickness")), folder)


def positions_ascending(folder: Path) -> g.Series:
    """Instance 1 at the feet: file order along the positions (the default series runs head to feet)."""
    return write(g.ct_series(descending=False), folder)


def compressed(name: str) -> Callable[[Path], g.Series]:
    def build(folder: Path) -> g.Series:
        syntax = g.COMPRESSIONS[name]
        return write(g.compress(g.ct_series(), syntax), folder, syntax=syntax)
    build.__name__ = name
    return build


def legacy_converted_enhanced_ct(folder: Path) -> g.Series:
    """One multi-frame image: the series converted by highdicom (Legacy Converted Enhanced CT), frames head to
    feet, the rescale in the shared functional groups."""
    series = g.ct_series()
    folder.mkdir(parents=True)
    g.enhanced(series).save_as(folder / "enhanced.dcm", enforce_file_format=True)
    return series


def enhanced_ct(folder: Path) -> g.Series:
    """The same multi-frame image filed under the Enhanced CT Image SOP Class, with no file suffix."""
    series = g.ct_series()
    image = g.enhanced(series)
    image.SOPClassUID = image.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    folder.mkdir(parents=True)
    image.save_as(folder / "IM_0001", enforce_file_format=True)
    return series


def localizer_and_dose_report(folder: Path) -> g.Series:
    """The axial series beside a scout of its study and the scanner's dose report (a secondary capture)."""
    series = write(g.ct_series(), folder)
    scout = g.localizer(series)
    scout.save_as(folder / "scout.dcm", enforce_file_format=True)
    g.dose_report(series).save_as(folder / "dose_report.dcm", enforce_file_format=True)
    (folder / "README.TXT").write_text("Exported by the archive.\n")
    return series


def two_series(folder: Path) -> dict[str, g.Series]:
    """Two reconstructions of one study in one folder (series 3 and 4): each is segmented, as FOLDER_seriesN."""
    first = write(g.ct_series(), folder)
    second = g.ct_series("siemens", g.Geometry(slices=10, step=6.0), study=first.datasets[0], series_number=4, seed=1)
    second.names = [f"b_{n:04d}.dcm" for n in range(len(second.datasets))]
    return {"series3": first, "series4": write(second, folder)}


def frame_of_reference_missing(folder: Path) -> g.Series:
    return write(g.each(g.ct_series(), g.delete("FrameOfReferenceUID")), folder)


def sop_class_empty_without_file_meta(folder: Path) -> g.Series:
    series = g.each(g.ct_series(), lambda ds: setattr(ds, "SOPClassUID", ""))
    return write(series, folder, file_meta=False)


def media_export(folder: Path) -> g.Series:
    """A CD or DVD export: the DICOMDIR at the top, the axial series and its scout four folders down, a README and
    the viewer the disc starts beside them."""
    series = g.ct_series()
    g.media_export(folder, [*series.datasets, g.localizer(series)])
    (folder / "README.TXT").write_text("Images of the examination, with a viewer.\n")
    (folder / "VIEWER").mkdir()
    (folder / "VIEWER" / "VIEWER.EXE").write_bytes(b"MZ" + bytes(510))
    return series


def media_export_lower_case(folder: Path) -> g.Series:
    """The disc as Linux mounts it: every name in lower case, the DICOMDIR's records still in upper case."""
    series = g.ct_series("ge")
    g.media_export(folder, series.datasets)
    g.lower_cased(folder)
    return series


def media_export_without_dicomdir(folder: Path) -> g.Series:
    """The disc's folders copied without their DICOMDIR: the images are found three levels below the folder."""
    series = g.ct_series()
    g.media_export(folder, [*series.datasets, g.localizer(series)]).unlink()
    return series


def media_export_incomplete(folder: Path) -> g.Series:
    """Two series on the disc, one file of the second lost in the copy (its head-end slice, which no gap would
    show): the first is segmented, the second named as incomplete."""
    first = g.ct_series()
    second = g.ct_series("ge", g.Geometry(slices=10, step=6.0), study=first.datasets[0], series_number=4, seed=1)
    g.media_export(folder, [*first.datasets, *second.datasets])
    lost = folder / "PT000000" / "ST000000" / "SE000001" / "IM000000"
    assert (pydicom.dcmread(lost).SeriesNumber, pydicom.dcmread(lost).InstanceNumber) == (4, 1)
    lost.unlink()
    return first


MEDIA = [media_export, media_export_lower_case, media_export_without_dicomdir, media_export_incomplete]
SEGMENTED = [siemens_tidy, ge_signed_padding_2000, padding_3024_intercept_0, slope_half_intercept_1000_unsigned,
             signed_hu_no_intercept, sop_class_empty_jpeg_2000, sop_class_missing, no_file_meta_no_preamble,
             implicit_vr_little_endian, explicit_vr_big_endian, shuffled_names_no_suffix, dicomdir_beside,
             identifiers_missing, slice_thickness_missing, positions_ascending, *map(compressed, g.COMPRESSIONS),
             legacy_converted_enhanced_ct, enhanced_ct, localizer_and_dose_report, two_series, *MEDIA]
#: The masks that come with a SEG (a folder of two series gives two).
WITH_SEG = [b.__name__ for b in SEGMENTED if b is not two_series] + ["two_series_series3", "two_series_series4"]
#: What each case's SEG had to derive or fill in (a line of the manifest's "derived" holds each text).
DERIVED = {"sop_class_empty_jpeg_2000": ["SOPClassUID: empty or missing in 12 of 12 file(s); taken from their file "
                                         "meta (MediaStorageSOPClassUID) (CT Image Storage)"],
           "sop_class_missing": ["SOPClassUID: empty or missing in 12 of 12 file(s)"],
           "identifiers_missing": ["AccessionNumber, PatientBirthDate, PatientID, PatientName, PatientSex, "
                                   "ReferringPhysicianName, StudyDate, StudyID, StudyTime: missing in the source; "
                                   "written empty"],
           "slice_thickness_missing": ["SliceThickness: missing in the source; the spacing between slices (5 mm)"]}
#: Cases whose mask is written but whose SEG cannot be: the reason given.
NO_SEG = {frame_of_reference_missing: "the source has no FrameOfReferenceUID",
          sop_class_empty_without_file_meta: "SOPClassUID is empty and the file has no file meta "
                                             "(MediaStorageSOPClassUID) to take it from"}
#: What the kit names as skipped in each case's folder.
SKIPPED = {"dicomdir_beside": ["dicomdir_beside/DICOMDIR (a DICOMDIR: the index of an export, not an image)"],
           "localizer_and_dose_report": [
               "localizer_and_dose_report/dose_report.dcm (a secondary capture without a position (a screenshot or "
               "dose report), not a slice of the volume)",
               "localizer_and_dose_report/scout.dcm (a localizer (scout) image, not a slice of the volume)",
               "localizer_and_dose_report/README.TXT (not a DICOM file)"],
           "media_export": [
               "media_export/DICOMDIR (a DICOMDIR: the index of an export, not an image)",
               "media_export/PT000000/ST000000/SE000001/IM000000 (a localizer (scout) image, not a slice of the "
               "volume)",
               "media_export/README.TXT (not a DICOM file)",
               "media_export/VIEWER/ (its DICOMDIR lists nothing in it: not read)"],
           "media_export_lower_case": [
               "media_export_lower_case/dicomdir (a DICOMDIR: the index of an export, not an image)"],
           "media_export_without_dicomdir": [
               "media_export_without_dicomdir/PT000000/ST000000/SE000001/IM000000 (a localizer (scout) image, not a "
               "slice of the volume)"],
           "media_export_incomplete": [
               "media_export_incomplete/DICOMDIR (a DICOMDIR: the index of an export, not an image)",
               "media_export_incomplete/PT000000/ST000000/SE000001/IM000000 (listed in DICOMDIR, but missing: "
               "series 4 (5mm Std ABD) is incomplete and not segmented)"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, g.Series]]:
    """One folder holding every case that gets a mask, one subfolder each."""
    root = tmp_path_factory.mktemp("corpus") / "exports"
    truth = {}
    for build in [*SEGMENTED, *NO_SEG]:
        made = build(root / build.__name__)
        truth.update({f"{build.__name__}_{label}": series for label, series in made.items()}
                     if isinstance(made, dict) else {build.__name__: made})
    return root, truth


@pytest.fixture(scope="module")
def inferred(corpus: tuple[Path, dict[str, g.Series]], tiny_model: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict]:
    """``spleenkit infer`` on the whole corpus, the network replaced by the stand-in (spleen where the HU are the
    phantom spleen's): exit status, what it printed, and the manifest."""
    import contextlib
    import io

    root, _ = corpus
    out = tmp_path_factory.mktemp("inferred") / "out"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(spleenkit.inference, "predict_mask", lambda network, image_path, *args, **kwargs:
                      spleen_of(np.asarray(nib.load(image_path).dataobj)))
        status = main(["infer", "--model", str(tiny_model), "--input", str(root), "--out", str(out),
                       "--no-overlay", "--no-amp"])
    return status, printed.getvalue(), json.loads((out / "manifest.json").read_text())


def case_named(manifest: dict, name: str) -> dict:
    (case,) = [c for c in manifest["cases"] if c["name"] == name]
    return case


def test_the_corpus_is_segmented_with_exit_status_0_and_names_what_it_skipped(inferred: tuple[int, str, dict]) -> None:
    status, printed, manifest = inferred
    assert status == 0
    assert sorted(c["name"] for c in manifest["cases"]) == sorted([*WITH_SEG, *(b.__name__ for b in NO_SEG)])
    assert sorted(manifest["skipped"]) == sorted(line for lines in SKIPPED.values() for line in lines)
    assert "Traceback" not in printed


@pytest.mark.parametrize("name", [*WITH_SEG, *(b.__name__ for b in NO_SEG)])
def test_each_mask_is_on_exactly_the_series_grid_and_shows_its_spleen(
        name: str, corpus: tuple[Path, dict[str, g.Series]], inferred: tuple[int, str, dict]) -> None:
    series = corpus[1][name]
    case = case_named(inferred[2], name)
    mask = nib.load(case["mask"])
    geometry = series.geometry
    assert mask.shape == (geometry.columns, geometry.rows, geometry.slices)
    assert np.allclose(mask.affine, g.expected_affine(geometry), atol=1e-4)
    data = np.asarray(mask.dataobj)
    expected = truth_mask(series)
    assert expected.any() and np.array_equal(data, expected), f"{name}: the mask is not the series' spleen"


@pytest.mark.parametrize("name", WITH_SEG)
def test_a_seg_is_written_and_what_it_derived_is_in_the_manifest(name: str, inferred: tuple[int, str, dict]) -> None:
    status, printed, manifest = inferred
    case = case_named(manifest, name)
    assert case["segmentation"] and Path(case["segmentation"]).is_file(), case["warnings"]
    assert case["segmentation_not_written"] is None
    assert case["series"], "the manifest names the series"
    for line in DERIVED.get(name, []):
        assert any(line in derived for derived in case["derived"]), (line, case["derived"])
    if name not in DERIVED:
        assert case["derived"] == [], case["derived"]
    assert f"{name}: {case['segmentation']} (DICOM Segmentation of the series)" in printed


@pytest.mark.parametrize("build", list(NO_SEG), ids=lambda b: b.__name__)
def test_without_a_seg_the_mask_is_written_and_one_line_says_why(build: Callable, inferred: tuple[int, str, dict]
                                                                 ) -> None:
    status, printed, manifest = inferred
    case = case_named(manifest, build.__name__)
    assert status == 0 and Path(case["mask"]).is_file() and case["segmentation"] is None
    assert NO_SEG[build] in case["segmentation_not_written"]
    (line,) = [line for line in printed.splitlines() if line.startswith(f"{build.__name__}: no DICOM Segmentation")]
    assert NO_SEG[build] in line and str(Path(case["input"]).name) in line
    assert any(NO_SEG[build] in warning for warning in case["warnings"])
    assert not list(Path(case["mask"]).parent.glob(f"{build.__name__}{SEG_SUFFIX}*"))


def first_file(root: Path, name: str) -> Path:
    return sorted(p for p in (root / name).iterdir() if p.name not in ("DICOMDIR", "README.TXT"))[0]


def test_each_case_carries_its_quirk_on_disk(corpus: tuple[Path, dict[str, g.Series]]) -> None:
    """A corpus case proves nothing unless its files really have the quirk it is named for."""
    root = corpus[0]

    def read(name: str) -> pydicom.Dataset:
        return pydicom.dcmread(first_file(root, name), force=True)

    for name, syntax in [("implicit_vr_little_endian", ImplicitVRLittleEndian),
                         ("explicit_vr_big_endian", ExplicitVRBigEndian),
                         *((name, uid) for name, uid in g.COMPRESSIONS.items()),
                         ("sop_class_empty_jpeg_2000", JPEG2000Lossless)]:
        assert read(name).file_meta.TransferSyntaxUID == syntax, name
    bare = first_file(root, "no_file_meta_no_preamble")
    assert bare.suffix == "" and bare.read_bytes()[128:132] != b"DICM" and bare.read_bytes()[:2] == b"\x08\x00"
    assert "TransferSyntaxUID" not in read("no_file_meta_no_preamble").file_meta
    assert read("sop_class_empty_jpeg_2000").SOPClassUID == "" and read("sop_class_empty_jpeg_2000").file_meta \
        .MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert "SOPClassUID" not in read("sop_class_missing")
    assert read("sop_class_empty_without_file_meta").SOPClassUID == "" \
        and not read("sop_class_empty_without_file_meta").file_meta
    for name, keywords in [("identifiers_missing", ("PatientID", "StudyID", "AccessionNumber", "StudyDate")),
                           ("slice_thickness_missing", ("SliceThickness",)),
                           ("frame_of_reference_missing", ("FrameOfReferenceUID",))]:
        assert not any(keyword in read(name) for keyword in keywords), name
    assert all(p.suffix == "" for p in (root / "shuffled_names_no_suffix").iterdir())
    numbers = [int(pydicom.dcmread(p).InstanceNumber) for p in sorted((root / "shuffled_names_no_suffix").iterdir())]
    assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)
    assert pydicom.dcmread(root / "dicomdir_beside" / "DICOMDIR").DirectoryRecordSequence
    for name, padding in (("ge_signed_padding_2000", -2000), ("padding_3024_intercept_0", -3024)):
        ds = read(name)
        assert ds.PixelPaddingValue == padding and ds.PixelRepresentation == 1 and ds.pixel_array[0, 0] == padding
    half = read("slope_half_intercept_1000_unsigned")
    assert (float(half.RescaleSlope), float(half.RescaleIntercept), half.PixelRepresentation) == (0.5, -1000, 0)
    for name, sop_class in (("enhanced_ct", ENHANCED_CT), ("legacy_converted_enhanced_ct", LEGACY_ENHANCED_CT)):
        ds = read(name)
        assert ds.SOPClassUID == sop_class and int(ds.NumberOfFrames) == 12 and len(list((root / name).iterdir())) == 1


@pytest.mark.parametrize("name", [*WITH_SEG, *(b.__name__ for b in NO_SEG)])
def test_each_series_decodes_to_the_hounsfield_units_it_stores(
        name: str, corpus: tuple[Path, dict[str, g.Series]], inferred: tuple[int, str, dict]) -> None:
    case = case_named(inferred[2], name)
    image = read_dicom_series(case["input"], case["series"])
    assert np.array_equal(np.asarray(image.dataobj), corpus[1][name].hounsfield.transpose(2, 1, 0))


# --------------------------------------------------------------------------- read back by dcmqi
def dcmqi_segments(seg: Path, scratch: Path) -> list[nib.Nifti1Image]:
    """The segments of a DICOM SEG as dcmqi's segimage2itkimage writes them (NIfTI, one per segment)."""
    scratch.mkdir(parents=True)
    done = subprocess.run([dcmqi_converter(), "--inputDICOM", str(seg), "--outputDirectory", str(scratch),
                           "-t", "nifti", "-p", "segment"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return [nib.load(path) for path in sorted(scratch.glob("segment-*.nii.gz"))]


def test_dcmqi_is_installed_with_its_converter() -> None:
    import dcmqi

    assert dcmqi.__version__ and dcmqi_converter() and Path(dcmqi_converter()).is_file()


@pytest.mark.parametrize("name", WITH_SEG)
def test_dcmqi_reads_every_seg_back_voxel_for_voxel_equal_to_the_mask(
        name: str, inferred: tuple[int, str, dict], tmp_path: Path) -> None:
    case = case_named(inferred[2], name)
    mask = nib.load(case["mask"])
    expected = np.asarray(mask.dataobj)
    (segment,) = dcmqi_segments(Path(case["segmentation"]), tmp_path / "dcmqi")
    # dcmqi's own grid (the frames' extent) onto the mask's, nearest neighbour: nibabel's resampling, not the kit's
    on_mask_grid = np.asarray(resample_from_to(segment, mask, order=0).dataobj)
    assert int(np.count_nonzero(on_mask_grid != expected)) == 0
    assert expected.sum() > 0
    # and the kit's helper (the notebook's) agrees with it
    assert np.array_equal(read_back_with_dcmqi(case["segmentation"], mask), expected)


def test_read_back_without_dcmqi_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import spleenkit.dicom_seg

    monkeypatch.setattr(spleenkit.dicom_seg, "dcmqi_converter", lambda: None)
    with pytest.raises(ModuleNotFoundError, match="pip install dcmqi"):
        read_back_with_dcmqi(tmp_path / "seg.dcm", nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)))


def test_dcmqi_refusing_a_file_is_one_line_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "not_a_seg.dcm"
    write(g.ct_series(), tmp_path / "ct")
    shutil.copy(sorted((tmp_path / "ct").iterdir())[0], bad)
    with pytest.raises(BadInputError, match="segimage2itkimage cannot read it") as raised:
        read_back_with_dcmqi(bad, nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)))
    assert str(bad) in str(raised.value) and "\n" not in str(raised.value)


# --------------------------------------------------------------------------- the reported case, end to end
def infer_command(source: Path, model: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """``spleenkit infer`` in a child process, as a user runs it: exit 0 and no traceback asserted."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "spleenkit", "infer", "--input", str(source), "--model", str(model),
                           "--out", str(out), "--no-overlay"],
                          capture_output=True, text=True, timeout=600, env=environment, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


def test_the_reported_series_through_the_command_with_the_tiny_model(tiny_model: Path, tmp_path: Path) -> None:
    """The anonymised JPEG 2000 series whose empty SOPClassUID made highdicom raise KeyError: '' after the mask
    was written: now exit 0, the SEG written and read back by dcmqi, what was derived in the manifest."""
    folder = tmp_path / "Anon_Abdomen"
    sop_class_empty_jpeg_2000(folder)
    infer_command(folder, tiny_model, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (case,) = manifest["cases"]
    assert case["segmentation"] == str(tmp_path / "out" / f"Anon_Abdomen{SEG_SUFFIX}")
    assert any("SOPClassUID" in line and "file meta" in line for line in case["derived"])
    mask = nib.load(case["mask"])
    assert np.array_equal(read_back_with_dcmqi(case["segmentation"], mask), np.asarray(mask.dataobj))


# --------------------------------------------------------------------------- refused, in one line
def spacing_disagrees(folder: Path) -> str:
    series = g.ct_series()
    series.datasets[5].PixelSpacing = ["5.0", "5.0"]
    write(series, folder)
    return series.names[5]


def orientation_disagrees(folder: Path) -> str:
    series = g.ct_series()
    series.datasets[7].ImageOrientationPatient = ["1", "0", "0", "0", "0.984808", "-0.173648"]
    write(series, folder)
    return series.names[7]


def size_disagrees(folder: Path) -> str:
    series = g.ct_series()
    ds = series.datasets[2]
    ds.Rows = 56
    ds.PixelData = ds.PixelData[: 56 * 64 * 2]
    write(series, folder)
    return series.names[2]


def truncated_pixel_data(folder: Path) -> str:
    series = write(g.ct_series(), folder)
    last = folder / series.names[-1]
    last.write_bytes(last.read_bytes()[:-3000])
    return series.names[-1]


def truncated_header(folder: Path) -> str:
    series = write(g.ct_series(), folder)
    last = folder / series.names[-1]
    last.write_bytes(last.read_bytes()[:700])
    return series.names[-1]


def not_dicom_but_named_dcm(folder: Path) -> str:
    write(g.ct_series(), folder)
    (folder / "slice_0013.dcm").write_bytes(b"<html><body>502 Bad Gateway</body></html>\n")
    return "slice_0013.dcm"


def pixel_spacing_missing(folder: Path) -> str:
    series = write(g.each(g.ct_series(), g.delete("PixelSpacing")), folder)
    return series.names[0]


def orientation_missing(folder: Path) -> str:
    series = write(g.each(g.ct_series(), g.delete("ImageOrientationPatient")), folder)
    return series.names[0]


def position_off_the_line(folder: Path) -> str:
    series = g.ct_series()
    position = [float(v) for v in series.datasets[4].ImagePositionPatient]
    series.datasets[4].ImagePositionPatient = [f"{position[0] + 3:g}", f"{position[1]:g}", f"{position[2]:g}"]
    write(series, folder)
    return series.names[4]


def position_missing_in_one_slice(folder: Path) -> str:
    series = g.ct_series()
    del series.datasets[-1].ImagePositionPatient  # the last slice: leaving it out would go unnoticed
    write(series, folder)
    return series.names[-1]


def multi_frame_without_positions(folder: Path) -> str:
    """A multi-frame CT without per-frame functional groups: the frames' positions are unknown."""
    series = g.ct_series()
    ds = series.datasets[0]
    ds.NumberOfFrames = len(series.datasets)
    ds.PixelData = b"".join(d.PixelData for d in series.datasets)
    write(g.Series([ds], series.geometry, series.hounsfield, ["multiframe.dcm"]), folder)
    return "multiframe.dcm"


#: Refused cases: the message (held to the README's DICOM section by a test below).
REFUSED = {spacing_disagrees: "its PixelSpacing (5 x 5 mm) differs from that of",
           orientation_disagrees: "its orientation (ImageOrientationPatient",
           size_disagrees: "its size (56 x 64 pixels) differs from that of",
           truncated_pixel_data: "cannot decode the pixel data (ValueError: The number of bytes of pixel data is "
                                 "less than expected",
           truncated_header: "an unreadable or truncated DICOM file",
           not_dicom_but_named_dcm: "an unreadable or truncated DICOM file",
           pixel_spacing_missing: "the image has no PixelSpacing: it cannot be placed in space",
           orientation_missing: "the image has no ImageOrientationPatient: it cannot be placed in space",
           position_off_the_line: "off the line through the series' first and last slices",
           position_missing_in_one_slice: "the image has no ImagePositionPatient: it cannot be placed in space",
           multi_frame_without_positions: "a multi-frame image (12 frames) without per-frame positions"}


@pytest.mark.parametrize("build", list(REFUSED), ids=lambda b: b.__name__)
def test_a_series_that_cannot_be_read_right_is_refused_in_one_line_naming_the_file(
        build: Callable[[Path], str], tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "series"
    culprit = build(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(BadInputError) as raised:
        read_dicom_series(folder)
    assert REFUSED[build] in str(raised.value) and str(folder / culprit) in str(raised.value)
    capsys.readouterr()
    assert main(["infer", "--model", str(tiny_model), "--input", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith("spleenkit: error: ") and str(folder / culprit) in line and REFUSED[build] in line, err
    assert not (tmp_path / "out").exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_folder_of_two_series_is_one_input_per_series_and_one_series_needs_no_choice(tmp_path: Path) -> None:
    two_series(tmp_path / "study")
    volumes, skipped = scan_inputs(tmp_path / "study")
    assert [v.name for v in volumes] == ["study_series3", "study_series4"] and skipped == []
    with pytest.raises(BadInputError, match="holds 2 DICOM series, give a folder with one"):
        read_dicom_series(tmp_path / "study")  # data check and the bundle read a folder as one series
    assert read_dicom_series(tmp_path / "study", volumes[1].series_uid).shape == (64, 60, 10)


def test_a_localizer_alone_is_named_not_segmented(tmp_path: Path) -> None:
    folder = tmp_path / "scout_only"
    folder.mkdir()
    g.localizer(g.ct_series()).save_as(folder / "IM0001", enforce_file_format=True)
    with pytest.raises(BadInputError, match=r"no NIfTI files or DICOM series among its 1 entries \(skipped: IM0001 "
                                            r"\(a localizer \(scout\) image"):
        scan_inputs(folder)


def test_the_generator_writes_what_it_claims() -> None:
    """The corpus is only as good as its generator: quirks land where they are meant to."""
    series = g.ct_series()
    assert [int(ds.InstanceNumber) for ds in series.datasets] == list(range(1, 13))
    z = [float(ds.ImagePositionPatient[2]) for ds in series.datasets]
    assert z == sorted(z, reverse=True), "a scanner numbers an abdomen head to feet"
    decoded = series.datasets[0].pixel_array * 1.0 + float(series.datasets[0].RescaleIntercept)
    assert np.array_equal(decoded, series.hounsfield[-1])
    spleen = truth_mask(series)
    assert spleen.sum() > 50 and 2 < np.flatnonzero(spleen.any(axis=(0, 1))).size < 12, "in the middle slices only"
    assert np.argwhere(spleen)[:, 0].min() > g.Geometry().columns // 2, "on the patient's left (LPS +x)"


# --------------------------------------------------------------------------- media exports: a DICOMDIR, images deep
def test_each_media_export_is_laid_out_as_a_disc_is(corpus: tuple[Path, dict[str, g.Series]]) -> None:
    """pydicom's own File-set reader (not the kit's) sees the discs as their names say."""
    import warnings

    from pydicom.fileset import FileSet

    root = corpus[0]
    disc = FileSet(root / "media_export" / "DICOMDIR")
    paths = [Path(instance.path).relative_to(root / "media_export") for instance in disc]
    assert len(paths) == 13 and all(len(path.parts) == 4 for path in paths)
    assert all(part.isupper() and len(part) == 8 and "." not in part for path in paths for part in path.parts)
    lower = root / "media_export_lower_case"
    assert all(path.name == path.name.lower() for path in lower.rglob("*"))
    assert pydicom.dcmread(lower / "dicomdir").DirectoryRecordSequence[-1].ReferencedFileID[0] == "PT000000"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(FileSet(lower / "dicomdir")) == 0, "pydicom matches names by case: none of them"
        incomplete = FileSet(root / "media_export_incomplete" / "DICOMDIR")
    assert len(incomplete) == 21, "one of the 22 files the DICOMDIR lists is gone"
    without = root / "media_export_without_dicomdir"
    assert not list(without.rglob("DICOMDIR")) and len(list(without.rglob("IM*"))) == 13


def export_of_two_series(folder: Path) -> dict[str, g.Series]:
    """A disc with series 3 and 4 of one study, the scout and the dose report, as a PACS burns it."""
    first = g.ct_series()
    second = g.ct_series("ge", g.Geometry(slices=10, step=6.0), study=first.datasets[0], series_number=4, seed=1)
    g.media_export(folder, [g.localizer(first), *first.datasets, *second.datasets, g.dose_report(first)])
    return {"series3": first, "series4": second}


def test_a_media_export_through_the_command_from_its_root(tiny_model: Path, tmp_path: Path) -> None:
    """``infer --input`` the disc's root: each series of the DICOMDIR is an input, on exactly the grid the
    generator made, and its SEG read back by dcmqi equals its mask; what is not a volume is named."""
    disc = tmp_path / "CD_2019"
    truth = export_of_two_series(disc)
    infer_command(disc, tiny_model, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [case["name"] for case in manifest["cases"]] == ["CD_2019_series3", "CD_2019_series4"]
    assert manifest["skipped"] == [
        "DICOMDIR (a DICOMDIR: the index of an export, not an image)",
        "PT000000/ST000000/SE000000/IM000000 (a localizer (scout) image, not a slice of the volume)",
        "PT000000/ST000000/SE000003/IM000000 (a secondary capture without a position (a screenshot or dose report), "
        "not a slice of the volume)"]
    for case in manifest["cases"]:
        geometry = truth[case["name"].rsplit("_", 1)[1]].geometry
        mask = nib.load(case["mask"])
        assert mask.shape == (geometry.columns, geometry.rows, geometry.slices)
        assert np.allclose(mask.affine, g.expected_affine(geometry), atol=1e-4)
        (segment,) = dcmqi_segments(Path(case["segmentation"]), tmp_path / f"dcmqi_{case['name']}")
        on_mask_grid = np.asarray(resample_from_to(segment, mask, order=0).dataobj)
        assert int(np.count_nonzero(on_mask_grid != np.asarray(mask.dataobj))) == 0
    given_the_dicomdir, _ = scan_inputs(disc / "DICOMDIR")  # a DICOMDIR given itself stands for its folder
    assert [volume.name for volume in given_the_dicomdir] == ["CD_2019_series3", "CD_2019_series4"]


def test_a_disc_with_a_lost_file_is_refused_in_one_line_naming_it(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disc = tmp_path / "CD"
    g.media_export(disc, g.ct_series().datasets)
    (disc / "PT000000" / "ST000000" / "SE000000" / "IM000005").unlink()
    assert main(["infer", "--model", str(tiny_model), "--input", str(disc), "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"spleenkit: error: {disc}: ") and "PT000000/ST000000/SE000000/IM000005 (listed in " \
        "DICOMDIR, but missing: series 3 (Abdomen 5.0 I30f 3 PV) is incomplete and not segmented)" in line, line
    assert not (tmp_path / "out").exists()


def test_a_dicomdir_that_cannot_be_followed_is_named_and_the_images_beside_it_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    write(g.ct_series(), folder)
    index = g.write_dicomdir(folder)
    broken = pydicom.dcmread(index)
    broken.DirectoryRecordSequence[0].OffsetOfTheNextDirectoryRecord = 6  # the same length: no offset moves
    broken.save_as(index)
    volumes, skipped = scan_inputs(folder)
    assert [volume.name for volume in volumes] == ["series"]
    assert skipped == ["DICOMDIR (a DICOMDIR: the index of an export, not an image)",
                       "DICOMDIR (a DICOMDIR whose records cannot be followed (ValueError: a record offset (6) that "
                       "leads to no record, or back to one); the files beside it are read)"]


def test_a_dicomdir_naming_a_file_outside_its_folder_is_not_followed(tmp_path: Path) -> None:
    disc = tmp_path / "CD"
    g.media_export(disc, g.ct_series().datasets)
    index = pydicom.dcmread(disc / "DICOMDIR")
    with pytest.warns(UserWarning, match="Invalid value for VR CS"):  # pydicom knows it is no DICOM name
        index.DirectoryRecordSequence[-1].ReferencedFileID = ["..", "..", "..", "..", "IM000011"]  # the last record:
    index.save_as(disc / "DICOMDIR")  # no record's offset moves
    volumes, skipped = scan_inputs(disc)
    assert not (tmp_path.parent / "IM000011").exists() and [volume.name for volume in volumes] == ["CD"]
    assert skipped == ["DICOMDIR (a DICOMDIR: the index of an export, not an image)",
                       "../../../../IM000011 (listed in DICOMDIR outside its folder: not read)",
                       "PT000000/ST000000/SE000000/IM000011 (not listed in DICOMDIR: not read)"]


def archive_without_dicomdir(root: Path) -> None:
    """Series folders as archives and viewers export them without a DICOMDIR, some deeper than the search goes."""
    g.save(g.ct_series(), root / "Patient_A" / "Study_1" / "Series_3")
    (root / "Patient_A" / "Study_1" / "report.pdf").write_bytes(b"%PDF-1.4\n")
    (root / "Patient_A" / "Study_1" / "Series_3" / "thumbs" / "small").mkdir(parents=True)
    g.save(g.ct_series(), root / "DICOM" / "PAT1" / "STU1" / "SER1" / "IMG")
    g.save(g.ct_series(), root / "flat")
    g.save(g.ct_series(), root / "flat" / "old")
    (root / "Notes" / "2019").mkdir(parents=True)
    (root / "Notes" / "2019" / "notes.txt").write_text("a note")


def test_without_a_dicomdir_series_are_found_up_to_four_levels_below_the_input_and_deeper_is_named(
        tmp_path: Path) -> None:
    root = tmp_path / "archive"
    archive_without_dicomdir(root)
    volumes, skipped = scan_inputs(root)
    assert [volume.name for volume in volumes] == ["Patient_A", "flat"]
    assert skipped == [
        "DICOM/ (a folder without DICOM files, nor any in its subfolders 3 levels down; 1 folder(s) deeper are not "
        "searched, such as DICOM/PAT1/STU1/SER1/IMG/)",
        "Notes/ (a folder without DICOM files, nor any in its subfolders 3 levels down)",
        "Patient_A/Study_1/report.pdf (not a DICOM file)",
        "Patient_A/Study_1/Series_3/thumbs/small/ (deeper than 3 levels below Patient_A/: not searched)",
        "flat/old/ (in a folder of DICOM files: not searched)"]
    assert read_dicom_series(root / "Patient_A").shape == (64, 60, 12)


# --------------------------------------------------------------------------- the README holds the messages
def test_the_readme_dicom_section_quotes_messages_the_kit_prints(inferred: tuple[int, str, dict],
                                                                  tmp_path: Path) -> None:
    """Every message the README's DICOM section quotes is printed by some case: the corpus' manifest and output,
    and the refusals, run again here."""
    _, printed, manifest = inferred
    produced = [printed, *manifest["skipped"]]
    for case in manifest["cases"]:
        produced += [*case["derived"], case["segmentation_not_written"] or ""]
    for build in REFUSED:
        build(tmp_path / build.__name__)
        with pytest.raises(BadInputError) as raised:
            read_dicom_series(tmp_path / build.__name__)
        produced.append(str(raised.value))
    two_series(tmp_path / "two")
    with pytest.raises(BadInputError) as raised:
        read_dicom_series(tmp_path / "two")
    produced.append(str(raised.value))
    single = tmp_path / "with_one_image_series"
    two_series(single)
    for path in sorted(single.glob("b_*"))[1:]:
        path.unlink()
    produced += scan_inputs(single)[1]
    archive_without_dicomdir(tmp_path / "archive")
    produced += scan_inputs(tmp_path / "archive")[1]
    text = (REPO / "README.md").read_text()
    section = text.split("## DICOM in, DICOM SEG out", 1)[1].split("\n## ", 1)[0]
    quoted = [span for span in re.findall(r"`([^`]*)`", section) if len(span) >= 24 and " " in span]
    messages = [q for q in quoted if not q.startswith(("spleenkit ", "NAME: "))]
    assert len(messages) >= 15, messages
    for message in messages:
        assert any(message in p for p in produced), f"README quotes {message!r}, which no case prints"
    assert ": no DICOM Segmentation: " in printed

"""Inference: masks land exactly on the input's grid, DICOM is read right, bad input is refused cleanly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import TINY, write_dicom_series

from spleenkit.cli import main
from spleenkit.errors import BadInputError
from spleenkit.images import find_inputs, read_dicom_series, read_nifti, write_mask
from spleenkit.inference import infer, orientation_warnings
from spleenkit.model import atomic_save, build_unet
from spleenkit.predict import make_inferer, predict_mask
from spleenkit.presets import get_preset

FINE = get_preset("quick")  # 3 mm: for the threshold stand-in, which costs nothing per window
HU_LEVEL = 100.0  # contrast-enhanced organs and bone lie above it


class ThresholdNet(torch.nn.Module):
    """A stand-in network whose answer is known in advance: spleen wherever the CT exceeds HU_LEVEL.

    Whatever the preprocessing and inversion do, its mask must coincide with thresholding the
    original file directly; a mirrored or shifted mask would not.
    """

    def __init__(self, preset=FINE) -> None:
        super().__init__()
        low, high = preset.intensity_range
        self.level = (HU_LEVEL - low) / (high - low)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.level - x, x - self.level], dim=1) * 40


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def flip_axis(image: nib.Nifti1Image, axis: int) -> nib.Nifti1Image:
    """The same anatomy stored with ``axis`` reversed: voxels flipped AND the affine changed to match."""
    data = np.flip(np.asarray(image.dataobj), axis=axis).copy()
    affine = image.affine.copy()
    corner = np.zeros(3)
    corner[axis] = image.shape[axis] - 1
    affine[:3, 3] = affine[:3, :3] @ corner + affine[:3, 3]
    affine[:3, axis] *= -1
    return nib.Nifti1Image(data, affine)


def assert_same_grid(mask_path: Path, image: nib.spatialimages.SpatialImage) -> None:
    mask = nib.load(mask_path)
    assert mask.shape == image.shape[:3]
    assert np.array_equal(mask.affine, image.affine)  # equal, not close
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


# --------------------------------------------------------------------------- geometry
def test_round_trip_on_the_real_ct_keeps_the_grid_exactly(example_ct_dir: Path, tiny_model: Path,
                                                          tmp_path: Path) -> None:
    result = infer(tiny_model, example_ct_dir / "ct.nii.gz", tmp_path / "out", amp=False)
    image = nib.load(example_ct_dir / "ct.nii.gz")
    case = result.cases[0]
    assert_same_grid(Path(case.mask), image)
    written = nib.load(case.mask)
    for code in ("sform_code", "qform_code"):
        assert written.header[code] == image.header[code]
    assert Path(case.overlay).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["cases"][0]["mask"] == case.mask and manifest["peak_rss_mib"] > 0
    assert manifest["parameters"]["preset"] == "quick"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct_overlay.png", "ct_spleen.nii.gz",
                                                                    "manifest.json"]


def test_masks_follow_the_anatomy_when_an_axis_is_stored_flipped(example_ct_dir: Path, tmp_path: Path) -> None:
    ct = nib.load(example_ct_dir / "ct.nii.gz")
    flipped = flip_axis(flip_axis(ct, 0), 2)   # x and z reversed on disk, the same patient in the world
    flipped.to_filename(tmp_path / "flipped.nii.gz")
    network, inferer = ThresholdNet(), make_inferer(FINE)
    mask = predict_mask(network, tmp_path / "flipped.nii.gz", FINE, inferer, amp=False)
    truth = np.asarray(flipped.dataobj) > HU_LEVEL
    assert mask.shape == flipped.shape
    assert dice(mask > 0, truth) > 0.9
    assert dice(mask > 0, truth[::-1]) < 0.5  # a mirrored mask would be caught
    path = write_mask(mask, flipped, tmp_path / "flipped_spleen.nii.gz")
    assert_same_grid(path, nib.load(tmp_path / "flipped.nii.gz"))


def test_round_trip_on_a_synthetic_case_stored_lps(synthetic_dataset: Path, tiny_model: Path,
                                                   tmp_path: Path) -> None:
    images = sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))
    stored_flipped = [p for p in images if nib.aff2axcodes(nib.load(p).affine)[:2] == ("L", "P")]
    assert stored_flipped, "the synthetic set should hold a case with flipped in-plane axes"
    result = infer(tiny_model, stored_flipped[0], tmp_path / "out", amp=False, overlay=False)
    assert_same_grid(Path(result.cases[0].mask), nib.load(stored_flipped[0]))
    mask = predict_mask(ThresholdNet(), stored_flipped[0], FINE, make_inferer(FINE), amp=False)
    assert dice(mask > 0, np.asarray(nib.load(stored_flipped[0]).dataobj) > HU_LEVEL) > 0.8


def test_qform_only_headers_are_preserved(example_ct_dir: Path, tmp_path: Path) -> None:
    ct = nib.load(example_ct_dir / "ct.nii.gz")
    qform_only = nib.Nifti1Image(np.asarray(ct.dataobj)[:40, :40, :30], None)
    qform_only.set_qform(ct.affine, code=1)
    qform_only.set_sform(None, code=0)
    qform_only.to_filename(tmp_path / "q.nii.gz")
    reread = nib.load(tmp_path / "q.nii.gz")
    path = write_mask(np.ones(reread.shape, np.uint8), reread, tmp_path / "q_spleen.nii.gz")
    assert_same_grid(path, reread)
    assert nib.load(path).header["sform_code"] == 0 and nib.load(path).header["qform_code"] == 1


@pytest.mark.parametrize("flipped", [False, True], ids=["as stored", "x and z flipped"])
def test_slab_resampling_for_large_images_equals_invertd(example_ct_dir: Path, tmp_path: Path, flipped: bool) -> None:
    from spleenkit.predict import original_space_mask, predict_logits
    from spleenkit.transforms import inference_transforms

    image = nib.load(example_ct_dir / "ct.nii.gz")
    if flipped:
        image = flip_axis(flip_axis(image, 0), 2)
    image.to_filename(tmp_path / "ct.nii.gz")
    recipe = get_preset("quick", spacing=(4.0, 2.5, 3.5))  # anisotropic, coarser than the image
    preprocessing = inference_transforms(recipe)
    data = preprocessing({"image": str(tmp_path / "ct.nii.gz")})
    logits = predict_logits(ThresholdNet(recipe), data["image"], make_inferer(recipe), amp=False)
    for options in ({}, {"largest_component": True, "fill_holes": True}):
        bundle_way = original_space_mask(logits, data["image"], preprocessing, image.affine, image.shape, **options)
        in_slabs = original_space_mask(logits, data["image"], preprocessing, image.affine, image.shape,
                                       max_invert_voxels=0, **options)
        assert bundle_way.shape == in_slabs.shape == image.shape
        # equal but for rounding where the probabilities tie exactly at 0.5 (saturated softmax)
        assert (bundle_way != in_slabs).sum() <= 1e-3 * bundle_way.sum()
        assert dice(in_slabs > 0, np.asarray(image.dataobj) > HU_LEVEL) > 0.85


# --------------------------------------------------------------------------- DICOM
@pytest.fixture(scope="module")
def dicom_ct(example_ct_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real example CT written as a DICOM series (one file per axial slice)."""
    ct = nib.load(example_ct_dir / "ct.nii.gz")
    volume = np.asarray(ct.dataobj).clip(-1024, 3000)
    return write_dicom_series(tmp_path_factory.mktemp("dicom") / "series", volume, ct.affine)


def test_dicom_series_matches_simpleitk_and_the_source(dicom_ct: Path, example_ct_dir: Path) -> None:
    import SimpleITK as sitk

    image = read_dicom_series(dicom_ct)
    ct = nib.load(example_ct_dir / "ct.nii.gz")
    assert image.shape == ct.shape
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(ct.dataobj).clip(-1024, 3000))
    assert np.allclose(image.affine, ct.affine, atol=1e-4)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_ct)))
    reference = reader.Execute()
    assert np.array_equal(np.asarray(image.dataobj), sitk.GetArrayFromImage(reference).transpose(2, 1, 0))
    direction = np.array(reference.GetDirection()).reshape(3, 3) * np.array(reference.GetSpacing())
    sitk_affine = np.eye(4)
    sitk_affine[:3, :3], sitk_affine[:3, 3] = direction, reference.GetOrigin()
    assert np.allclose(image.affine, np.diag([-1, -1, 1, 1]) @ sitk_affine, atol=1e-4)


def test_infer_on_a_dicom_folder_writes_the_series_grid(dicom_ct: Path, tiny_model: Path, tmp_path: Path) -> None:
    result = infer(tiny_model, dicom_ct, tmp_path / "out", amp=False, overlay=False)
    assert [c.name for c in result.cases] == ["series"]
    assert_same_grid(Path(result.cases[0].mask), read_dicom_series(dicom_ct))


def test_dicom_folder_with_two_series_is_refused(tmp_path: Path) -> None:
    volume = np.zeros((8, 8, 4), dtype=np.int16)
    write_dicom_series(tmp_path / "two", volume, np.diag([1.0, 1.0, 2.0, 1.0]), prefix="a")
    write_dicom_series(tmp_path / "two", volume[:, :, :3] + 5, np.diag([1.0, 1.0, 2.0, 1.0]), prefix="b")
    with pytest.raises(BadInputError, match="2 DICOM series"):
        read_dicom_series(tmp_path / "two")


def test_dicom_folder_with_missing_slices_is_refused(tmp_path: Path) -> None:
    volume = np.zeros((8, 8, 10), dtype=np.int16)
    write_dicom_series(tmp_path / "gap", volume, np.diag([1.0, 1.0, 2.5, 1.0]), skip=(4, 5))
    with pytest.raises(BadInputError, match=r"missing slices.*7\.50 mm.*2\.50 mm.*about 2 slice"):
        read_dicom_series(tmp_path / "gap")
    write_dicom_series(tmp_path / "single", volume[:, :, :1], np.eye(4))
    with pytest.raises(BadInputError, match="single slice: a 2D image"):
        read_dicom_series(tmp_path / "single")


# --------------------------------------------------------------------------- bad input
def test_corrupt_and_non_image_files_are_refused(tmp_path: Path, tiny_model: Path) -> None:
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    with pytest.raises(BadInputError, match=r"corrupt\.nii\.gz: not a readable NIfTI"):
        infer(tiny_model, corrupt, tmp_path / "out")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(BadInputError, match=r"notes\.txt: not a NIfTI file"):
        infer(tiny_model, notes, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_empty_folder_and_2d_images_are_refused(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="empty"):
        find_inputs(tmp_path / "empty")
    (tmp_path / "mixed").mkdir()
    for name in ("scan.nii.gz", "scan_spleen.nii.gz", "notes.txt"):
        (tmp_path / "mixed" / name).write_bytes(b"")
    assert [v.name for v in find_inputs(tmp_path / "mixed")] == ["scan"]  # our own masks are not inputs
    nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)).to_filename(tmp_path / "flat.nii.gz")
    with pytest.raises(BadInputError, match=r"flat\.nii\.gz: a 2D image"):
        read_nifti(tmp_path / "flat.nii.gz")
    nib.Nifti1Image(np.zeros((64, 64, 1), np.int16), np.eye(4)).to_filename(tmp_path / "slab.nii.gz")
    assert main(["infer", "--model", str(tiny_model), "--input", str(tmp_path / "slab.nii.gz"),
                 "--out", str(tmp_path / "out")]) == 2


def test_unwritable_output_folder_is_refused_before_any_work(example_ct_dir: Path, tiny_model: Path,
                                                             tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("occupied")
    with pytest.raises(BadInputError, match="output folder is not writable"):
        infer(tiny_model, example_ct_dir / "ct.nii.gz", blocker / "out")
    with pytest.raises(BadInputError, match="output folder is not writable"):
        infer(tiny_model, example_ct_dir / "ct.nii.gz", blocker)


def test_missing_or_mismatched_checkpoints_are_named(example_ct_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"nope\.pt: checkpoint not found"):
        infer(tmp_path / "nope.pt", example_ct_dir / "ct.nii.gz", tmp_path / "out")
    atomic_save(build_unet(TINY).state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(BadInputError, match=r"tiny\.pt: the model was trained with the quick recipe .* changes its "
                                            r"masks: spacing: \[6\.0, 6\.0, 6\.0\] -> \[1\.5, 1\.5, 2\.0\]"):
        infer(tmp_path / "tiny.pt", example_ct_dir / "ct.nii.gz", tmp_path / "out", preset="seed")
    with pytest.raises(BadInputError, match=r"tiny\.pt: checkpoint does not match"):
        infer(tmp_path / "tiny.pt", example_ct_dir / "ct.nii.gz", tmp_path / "out", preset="seed", force_preset=True)
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_a_failed_write_leaves_nothing_behind(example_ct_dir: Path, tmp_path: Path) -> None:
    ct = nib.load(example_ct_dir / "ct.nii.gz")
    with pytest.raises(BadInputError, match="mask shape"):
        write_mask(np.zeros((3, 3, 3), np.uint8), ct, tmp_path / "bad.nii.gz")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- orientation
def test_orientation_check_flags_a_header_that_lies(example_ct_dir: Path) -> None:
    ct = nib.load(example_ct_dir / "ct.nii.gz")
    spleen = np.asarray(nib.load(example_ct_dir / "spleen_a.nii.gz").dataobj)
    assert orientation_warnings(ct, spleen) == []
    # correctly stored flips are fine: the header still says where the patient is
    assert orientation_warnings(flip_axis(flip_axis(ct, 0), 1), spleen[::-1, ::-1]) == []
    # MSD Task09 style: voxels rotated (x and y reversed) but the header left unchanged
    lying = nib.Nifti1Image(np.asarray(ct.dataobj)[::-1, ::-1].copy(), ct.affine)
    messages = orientation_warnings(lying, spleen[::-1, ::-1], name="lying.nii.gz")
    assert len(messages) == 2
    assert "anterior-posterior axis looks flipped" in messages[0] and "model-zoo issue 766" in messages[0]
    assert "patient's RIGHT" in messages[1]
    # only left-right mislabelled: the spine is fine, the spleen is on the wrong side
    mirrored = nib.Nifti1Image(np.asarray(ct.dataobj)[::-1].copy(), ct.affine)
    assert [m for m in orientation_warnings(mirrored, spleen[::-1]) if "RIGHT" in m]
    assert not [m for m in orientation_warnings(mirrored, spleen[::-1]) if "anterior" in m]


def test_infer_warns_and_records_a_suspicious_header(example_ct_dir: Path, tiny_model: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    ct = nib.load(example_ct_dir / "ct.nii.gz")
    nib.Nifti1Image(np.asarray(ct.dataobj)[::-1, ::-1].copy(), ct.affine).to_filename(tmp_path / "lying.nii.gz")
    with caplog.at_level(logging.WARNING, logger="spleenkit.inference"):
        result = infer(tiny_model, tmp_path / "lying.nii.gz", tmp_path / "out", amp=False, overlay=False)
    assert any("anterior-posterior axis looks flipped" in r.getMessage() for r in caplog.records)
    manifest = json.loads(result.manifest_path.read_text())
    assert any("anterior-posterior" in w for w in manifest["cases"][0]["warnings"])
    assert_same_grid(Path(result.cases[0].mask), nib.load(tmp_path / "lying.nii.gz"))


def test_infer_command_on_a_folder(synthetic_dataset: Path, tiny_model: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["infer", "--model", str(tiny_model), "--input", str(synthetic_dataset / "imagesTs"),
                 "--out", str(tmp_path / "out"), "--no-amp", "--largest-component"])
    assert code == 0
    printed = capsys.readouterr().out
    for image in sorted((synthetic_dataset / "imagesTs").glob("*.nii.gz")):
        name = image.name[: -len(".nii.gz")]
        assert f"{name}_spleen.nii.gz" in printed
        assert_same_grid(tmp_path / "out" / f"{name}_spleen.nii.gz", nib.load(image))
        assert (tmp_path / "out" / f"{name}_overlay.png").is_file()
    assert "peak memory" in printed


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="elsewhere the peak is ru_maxrss, inherited")
def test_peak_memory_is_this_programs_own() -> None:
    """A command started from a large process (a notebook kernel) reports its own peak, not the parent's."""
    import subprocess
    import sys

    from spleenkit.environment import peak_memory_mib

    ballast = np.ones(400 * 2**20, dtype=np.uint8)  # 400 MiB resident in this process
    assert peak_memory_mib() >= 400
    child = subprocess.run([sys.executable, "-c", "from spleenkit.environment import peak_memory_mib; "
                            "print(peak_memory_mib())"], capture_output=True, text=True, check=True)
    assert float(child.stdout) < 300, child.stdout
    del ballast


def test_a_missing_model_stops_before_the_input_folder_is_read_and_a_busy_folder_is_summarised(
        synthetic_dataset: Path, tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "scan.nii.gz").symlink_to(synthetic_dataset / "imagesTs" / sorted(
        p.name for p in (synthetic_dataset / "imagesTs").iterdir())[0])
    for n in range(14):
        (busy / f"notes_{n:02d}.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="spleenkit.inference"):
        with pytest.raises(BadInputError, match=r"nope\.pt: checkpoint not found"):
            infer(tmp_path / "nope.pt", busy, tmp_path / "out")
    assert not [r for r in caplog.records if "skipped" in r.getMessage()]  # the folder was never listed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spleenkit.inference"):
        result = infer(tiny_model, busy, tmp_path / "out", overlay=False)
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 11 and lines[-1].endswith("skipped 4 more entries (manifest.json lists every one)")
    assert len(json.loads(result.manifest_path.read_text())["skipped"]) == 14

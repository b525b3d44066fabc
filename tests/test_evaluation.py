"""Evaluation: metrics checked against independent implementations, grids and labels checked, runs written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import TINY, write_untrained_run
from scipy import ndimage

from spleenkit.cli import main
from spleenkit.errors import BadInputError
from spleenkit.evaluation import evaluate_run, label_round_trip
from spleenkit.metrics import compare_mask_files, format_summary, mask_metrics, read_rows_csv, summarize
from spleenkit.predict import keep_largest_component, make_inferer, postprocessing
from spleenkit.presets import get_preset
from spleenkit.runs import run_preset

# untrained and coarse: enough to run every step quickly on a CPU
ONE_HELD_OUT = TINY.replace(validation_cases=1)  # one validation case: a whole-run evaluation in seconds


def scipy_surface_metrics(a: np.ndarray, b: np.ndarray, spacing) -> dict[str, float]:
    """HD95, Hausdorff and ASSD written independently of MONAI: boundary voxels by erosion,
    exact Euclidean distance transforms with the voxel spacing."""
    edge_a = a ^ ndimage.binary_erosion(a)
    edge_b = b ^ ndimage.binary_erosion(b)
    a_to_b = ndimage.distance_transform_edt(~edge_b, sampling=spacing)[edge_a]
    b_to_a = ndimage.distance_transform_edt(~edge_a, sampling=spacing)[edge_b]
    return {"hd95_mm": max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)),
            "hd_mm": max(a_to_b.max(), b_to_a.max()),
            "assd_mm": np.concatenate([a_to_b, b_to_a]).mean()}


# --------------------------------------------------------------------------- metrics
def test_real_mask_pair_matches_simpleitk_and_scipy(example_ct_dir: Path) -> None:
    import SimpleITK as sitk

    a_path, b_path = example_ct_dir / "spleen_a.nii.gz", example_ct_dir / "spleen_b.nii.gz"
    result = compare_mask_files(a_path, b_path)

    a = np.asarray(nib.load(a_path).dataobj) > 0
    b = np.asarray(nib.load(b_path).dataobj) > 0
    spacing = nib.load(a_path).header.get_zooms()[:3]
    independent = scipy_surface_metrics(a, b, spacing)
    for name, value in independent.items():
        assert result[name] == pytest.approx(value, abs=1e-4), name

    sitk_a = sitk.Cast(sitk.ReadImage(str(a_path)), sitk.sitkUInt8)
    sitk_b = sitk.Cast(sitk.ReadImage(str(b_path)), sitk.sitkUInt8)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(sitk_a, sitk_b)
    assert result["dice"] == pytest.approx(overlap.GetDiceCoefficient(), abs=1e-6)
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(sitk_a, sitk_b)
    assert result["hd_mm"] == pytest.approx(hausdorff.GetHausdorffDistance(), abs=1e-4)

    voxel_ml = float(np.prod(spacing)) / 1000
    assert result["pred_volume_ml"] == pytest.approx(a.sum() * voxel_ml)
    assert result["ref_volume_ml"] == pytest.approx(b.sum() * voxel_ml)
    # the two real masks (TotalSegmentator v2 fast vs v1) agree closely: what the README reports
    assert result["dice"] == pytest.approx(0.9797, abs=1e-4)
    assert result["hd95_mm"] == pytest.approx(3.0, abs=1e-4)


def test_distances_equal_monais_metric_classes(example_ct_dir: Path) -> None:
    from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric

    a = np.asarray(nib.load(example_ct_dir / "spleen_a.nii.gz").dataobj) > 0
    b = np.roll(np.asarray(nib.load(example_ct_dir / "spleen_b.nii.gz").dataobj) > 0, 2, axis=2)
    spacing = (3.0, 2.0, 1.5)
    ours = mask_metrics(a, b, spacing)
    y_pred, y = torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float()
    expected = {
        "hd95_mm": HausdorffDistanceMetric(include_background=True, percentile=95)(y_pred, y, spacing=spacing),
        "hd_mm": HausdorffDistanceMetric(include_background=True)(y_pred, y, spacing=spacing),
        "assd_mm": SurfaceDistanceMetric(include_background=True, symmetric=True)(y_pred, y, spacing=spacing),
    }
    for name, value in expected.items():
        assert ours[name] == pytest.approx(float(value[0, 0]), abs=1e-4), name


def test_anisotropic_spacing_is_applied_per_axis() -> None:
    grid = np.indices((40, 36, 24)).astype(float)
    spacing = (0.7, 0.9, 2.5)
    physical = [g * s for g, s in zip(grid, spacing, strict=True)]
    centre = np.array([14.0, 16.0, 30.0])
    a = sum((p - c) ** 2 for p, c in zip(physical, centre, strict=True)) < 9.0**2
    b = sum((p - c) ** 2 for p, c in zip(physical, centre + [3.0, 0.0, 5.0], strict=True)) < 8.0**2
    result = mask_metrics(a, b, spacing)
    independent = scipy_surface_metrics(a, b, spacing)
    for name, value in independent.items():
        assert result[name] == pytest.approx(value, abs=1e-4), name
    # the same masks measured with the axes' spacings swapped give different distances
    assert mask_metrics(a, b, spacing[::-1])["hd95_mm"] != pytest.approx(result["hd95_mm"], abs=1e-3)
    assert result["dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_empty_masks_have_defined_dice_and_undefined_distances() -> None:
    empty = np.zeros((8, 8, 8), dtype=np.uint8)
    blob = empty.copy()
    blob[2:5, 2:5, 2:5] = 1
    both_empty = mask_metrics(empty, empty, (1, 1, 1))
    assert both_empty["dice"] == 1.0 and both_empty["hd95_mm"] == 0.0 and both_empty["assd_mm"] == 0.0
    missed = mask_metrics(empty, blob, (1, 1, 1))
    assert missed["dice"] == 0.0
    assert missed["hd95_mm"] is None and missed["assd_mm"] is None
    assert missed["volume_error_percent"] == pytest.approx(-100.0)


def test_mask_metrics_rejects_labels_other_than_0_and_1() -> None:
    labels = np.zeros((6, 6, 6))
    labels[1:3, 1:3, 1:3] = 2
    with pytest.raises(BadInputError, match="0 and 1.*2"):
        mask_metrics(labels, labels > 0, (1, 1, 1))


# --------------------------------------------------------------------------- evaluate-masks
def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.Nifti1Image(data, affine).to_filename(path)
    return path


def test_evaluate_masks_rejects_different_grids(example_ct_dir: Path, tmp_path: Path) -> None:
    reference = nib.load(example_ct_dir / "spleen_a.nii.gz")
    data = np.asarray(reference.dataobj)
    moved = reference.affine.copy()
    moved[0, 3] += 0.01  # a hundredth of a millimetre
    with pytest.raises(BadInputError, match="grid differs.*affines differ"):
        compare_mask_files(_save(data, moved, tmp_path / "moved.nii.gz"), example_ct_dir / "spleen_a.nii.gz")
    with pytest.raises(BadInputError, match="grid differs.*shape"):
        compare_mask_files(_save(data[:-1], reference.affine, tmp_path / "cropped.nii.gz"),
                           example_ct_dir / "spleen_a.nii.gz")
    nearly = reference.affine.copy()
    nearly[0, 3] += 1e-6  # float noise is the same grid
    same = compare_mask_files(_save(data, nearly, tmp_path / "nearly.nii.gz"), example_ct_dir / "spleen_a.nii.gz")
    assert same["dice"] == 1.0
    # the command line turns the error into one line and exit status 2
    assert main(["evaluate-masks", str(tmp_path / "moved.nii.gz"), str(example_ct_dir / "spleen_a.nii.gz")]) == 2


def test_evaluate_masks_rejects_non_binary_masks(example_ct_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    reference = nib.load(example_ct_dir / "spleen_a.nii.gz")
    labels = np.asarray(reference.dataobj).astype(np.uint8) * 3
    bad = _save(labels, reference.affine, tmp_path / "multilabel.nii.gz")
    with pytest.raises(BadInputError, match=r"multilabel\.nii\.gz.*only the labels 0 and 1"):
        compare_mask_files(bad, example_ct_dir / "spleen_a.nii.gz")
    probabilities = _save(np.asarray(reference.dataobj) * 0.5, reference.affine, tmp_path / "soft.nii.gz")
    assert main(["evaluate-masks", str(probabilities), str(example_ct_dir / "spleen_a.nii.gz")]) == 2
    assert "soft.nii.gz" in capsys.readouterr().err


def test_evaluate_masks_command_prints_json(example_ct_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate-masks", str(example_ct_dir / "spleen_a.nii.gz"), str(example_ct_dir / "spleen_b.nii.gz")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dice"] == pytest.approx(0.9797, abs=1e-4)
    assert result["spacing_mm"] == [3.0, 3.0, 3.0]


# --------------------------------------------------------------------------- summaries and post-processing
def test_summarize_reports_mean_sd_median_and_worst_case() -> None:
    rows = [{"case": "a", "space": "original", "dice": 0.9, "hd95_mm": 4.0, "volume_error_ml": -10.0},
            {"case": "b", "space": "original", "dice": 0.7, "hd95_mm": None, "volume_error_ml": 30.0},
            {"case": "c", "space": "original", "dice": 0.8, "hd95_mm": 9.0, "volume_error_ml": 5.0}]
    summary = summarize(rows)["original"]
    assert summary["cases"] == 3
    assert summary["dice"]["mean"] == pytest.approx(0.8)
    assert summary["dice"]["sd"] == pytest.approx(0.1)
    assert summary["dice"]["median"] == pytest.approx(0.8)
    assert summary["dice"]["worst"] == {"case": "b", "value": 0.7}
    assert summary["hd95_mm"]["worst"] == {"case": "c", "value": 9.0}
    assert summary["hd95_mm"]["undefined"] == 1 and summary["hd95_mm"]["n"] == 2
    assert summary["volume_error_ml"]["worst"]["case"] == "b"
    table = format_summary(summarize(rows))
    assert "0.800 ± 0.100" in table and "[1 undefined]" in table


def test_postprocessing_keeps_largest_component_and_fills_holes() -> None:
    foreground = torch.zeros(16, 16, 16)
    foreground[2:10, 2:10, 2:10] = 1
    foreground[5, 5, 5] = 0          # a hole
    foreground[13:15, 13:15, 13:15] = 1  # a small island
    logits = torch.stack([-foreground, foreground])
    plain = postprocessing()({"pred": logits})["pred"]
    assert plain.shape == (1, 16, 16, 16) and plain.sum() == foreground.sum()
    cleaned = postprocessing(largest_component=True, fill_holes=True)({"pred": logits})["pred"]
    assert cleaned[0, 14, 14, 14] == 0 and cleaned[0, 5, 5, 5] == 1
    assert cleaned.sum() == 8**3
    onehot = postprocessing(to_onehot=2)({"pred": logits})["pred"]
    assert onehot.shape == (2, 16, 16, 16)


def test_keep_largest_component_drops_islands() -> None:
    mask = np.zeros((12, 12, 12), dtype=np.uint8)
    mask[1:6, 1:6, 1:6] = 1
    mask[9:11, 9:11, 9:11] = 1
    kept = keep_largest_component(mask)
    assert kept.dtype == np.uint8 and kept.sum() == 125 and kept[10, 10, 10] == 0
    assert mask.sum() == 125 + 8  # the input is left as it was


def test_label_round_trip_shows_what_resampling_costs(example_ct_dir: Path) -> None:
    item = {"image": str(example_ct_dir / "ct.nii.gz"), "label": str(example_ct_dir / "spleen_a.nii.gz")}
    coarse = label_round_trip(item, get_preset("quick", spacing=(6.0, 6.0, 6.0)))  # 3 mm -> 6 mm -> 3 mm
    assert 0.8 < coarse["dice"] < 0.99
    assert coarse["ref_volume_ml"] == pytest.approx(compare_mask_files(item["label"], item["label"])["ref_volume_ml"])
    assert label_round_trip(item, "quick")["dice"] == 1.0  # 3 mm to 3 mm loses nothing


def test_make_inferer_takes_the_preset_and_checks_options() -> None:
    inferer = make_inferer("seed", blend="gaussian")
    assert tuple(inferer.roi_size) == (96, 96, 96)
    assert inferer.sw_batch_size == 4 and inferer.overlap == 0.5 and inferer.mode == "gaussian"
    assert str(inferer.device) == "cpu"
    for bad, named in (({"blend": "median"}, "blend mode 'median'"), ({"stitch_device": "gpu"}, "stitch device"),
                       ({"overlap": 1.0}, "sliding_window_overlap=1.0: expected"),
                       ({"sw_batch_size": 0}, "sliding_window_batch_size=0: expected")):
        with pytest.raises(BadInputError, match=named):
            make_inferer("seed", **bad)


# --------------------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding untrained tiny-UNet weights and a manifest naming the tiny preset."""
    return write_untrained_run(tmp_path_factory.mktemp("run"), ONE_HELD_OUT).parent


def test_run_preset_is_read_back_from_the_manifest(tiny_run: Path, tmp_path: Path) -> None:
    assert run_preset(tiny_run) == ONE_HELD_OUT
    assert run_preset(tmp_path).name == "seed"


def test_evaluate_run_writes_consistent_results(tiny_run: Path, synthetic_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "evaluation"
    result = evaluate_run(tiny_run / "model.pt", synthetic_dataset, out_dir=out, amp=False, largest_component=True)
    assert [p.name for p in sorted(out.iterdir())] == ["manifest.json", "per_case.csv", "per_case_metrics.png",
                                                        "predictions", "summary.json"]
    assert all(path.parent == out / "predictions" for path in result.prediction_paths.values())  # --out honoured
    rows = read_rows_csv(result.csv_path)
    assert len(rows) == 2 * ONE_HELD_OUT.validation_cases
    assert {row["space"] for row in rows} == {"resampled", "original"}
    summary = json.loads(result.summary_path.read_text())
    assert summary["settings"]["preset"] == "quick" and summary["settings"]["largest_component"] is True
    assert summary["original"]["cases"] == ONE_HELD_OUT.validation_cases
    for case, prediction in result.prediction_paths.items():
        image_path = synthetic_dataset / "imagesTr" / f"{case}.nii.gz"
        label_path = synthetic_dataset / "labelsTr" / f"{case}.nii.gz"
        image, saved, label = nib.load(image_path), nib.load(prediction), nib.load(label_path)
        assert saved.shape == image.shape and np.array_equal(saved.affine, image.affine)
        original = next(r for r in rows if r["case"] == case and r["space"] == "original")
        voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000
        # original-space volumes are those of the original label file and of the saved prediction
        assert original["ref_volume_ml"] == pytest.approx(np.asarray(label.dataobj).sum() * voxel_ml, rel=1e-5)
        assert original["pred_volume_ml"] == pytest.approx(np.asarray(saved.dataobj).sum() * voxel_ml, rel=1e-5,
                                                           abs=1e-6)


def test_evaluate_command_uses_the_runs_preset(tiny_run: Path, synthetic_dataset: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", "--model", str(tiny_run / "model.pt"), "--data", str(synthetic_dataset),
                 "--out", str(tmp_path / "ev"), "--no-amp", "--max-cases", "1", "--no-save-predictions",
                 "--blend", "gaussian"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dice" in printed and "original" in printed and "resampled" in printed
    with (tmp_path / "ev" / "per_case.csv").open() as stream:
        assert len(list(csv.DictReader(stream))) == 2
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["settings"]["blend"] == "gaussian"


def test_evaluate_refuses_a_missing_checkpoint(synthetic_dataset: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing" / "model.pt"
    assert main(["evaluate", "--model", str(missing), "--data", str(synthetic_dataset), "--out",
                 str(tmp_path / "ev")]) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize("permutation, flips",
                         [((0, 1, 2), (1, 1, 1)), ((2, 0, 1), (-1, 1, -1)), ((1, 2, 0), (1, -1, 1))])
def test_separable_resampling_equals_spatial_resample(permutation, flips) -> None:
    """The fast path for axis-aligned grids gives MONAI's SpatialResample result (float32 rounding)."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from spleenkit.predict import _axis_aligned, _separable_linear

    generator = torch.Generator().manual_seed(0)
    source_affine = np.diag([1.5, 1.5, 2.0, 1.0])
    source_affine[:3, 3] = [-30.0, 12.0, 5.0]
    source = MetaTensor(torch.rand(1, 20, 18, 11, generator=generator), affine=torch.as_tensor(source_affine))
    # an original grid of finer, flipped and permuted voxels reaching past the source (border padding)
    linear = np.zeros((3, 3))
    for column, (axis, sign, size) in enumerate(zip(permutation, flips, (0.7, 0.9, 1.3), strict=True)):
        linear[axis, column] = sign * size
    original_affine = np.eye(4)
    original_affine[:3, :3] = linear
    original_affine[:3, 3] = source_affine[:3, 3] + [4.0, -3.0, 2.5]
    to_source = np.linalg.inv(source_affine) @ original_affine
    axes = _axis_aligned(to_source)
    assert axes == list(permutation)
    shape = (31, 26, 24)
    expected = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float64)(
        source, dst_affine=torch.as_tensor(original_affine), spatial_size=shape)[0]
    for start, stop in ((0, 24), (5, 13)):
        got = _separable_linear(source[0].as_tensor(), to_source, axes, shape, start, stop)
        assert tuple(got.shape) == (31, 26, stop - start)
        assert torch.allclose(got, expected[:, :, start:stop].float(), atol=1e-5), (start, stop)


def test_oblique_grids_are_not_taken_for_axis_aligned() -> None:
    from spleenkit.predict import _axis_aligned

    angle = np.deg2rad(10)
    rotated = np.eye(4)
    rotated[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    assert _axis_aligned(rotated) is None
    assert _axis_aligned(np.diag([2.0, -1.0, 0.5, 1.0])) == [0, 1, 2]


def test_oblique_original_grid_is_resampled_by_spatial_resample() -> None:
    """A prediction whose grid is rotated against the original one goes back through SpatialResample."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from spleenkit.predict import original_space_mask

    generator = torch.Generator().manual_seed(1)
    logits = MetaTensor(torch.randn(2, 16, 14, 10, generator=generator), affine=torch.diag(torch.tensor(
        [1.5, 1.5, 2.0, 1.0], dtype=torch.float64)))
    angle = np.deg2rad(10)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    affine[:3, :3] *= 1.2
    shape = (18, 15, 14)
    mask = original_space_mask(logits, logits[:1], None, affine, shape, max_invert_voxels=0)
    foreground = torch.softmax(logits, dim=0)[1:2]
    expected = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float64)(
        foreground, dst_affine=torch.as_tensor(affine), spatial_size=shape)[0].numpy() > 0.5
    assert mask.shape == shape and mask.any() and (mask == expected).all()

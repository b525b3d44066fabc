"""`spleenkit data check` and the loaders: every kind of bad input is named with its file and reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleenkit.cli import main
from spleenkit.data.checks import check_dataset, read_volume
from spleenkit.data.datalist import load_datalist
from spleenkit.errors import BadInputError


@pytest.fixture
def dataset(synthetic_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the session's synthetic dataset, to break."""
    return Path(shutil.copytree(synthetic_dataset, tmp_path / "data"))


def _replace(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    reference = nib.load(path)
    nib.save(nib.Nifti1Image(data, reference.affine if affine is None else affine), path)


def _only_problem(dataset: Path, fragment: str) -> str:
    report = check_dataset(dataset)
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    problem = str(report.problems[0])
    assert fragment in problem, problem
    return problem


def test_good_dataset_passes_with_a_table(synthetic_dataset: Path, capsys) -> None:
    report = check_dataset(synthetic_dataset)
    assert report.ok and not report.warnings
    assert [c.case for c in report.cases] == [f"spleen_{n}" for n in range(1, 8)]
    first = report.cases[0]
    assert len(first.shape) == 3 and first.orientation in {"RAS", "LPS", "LAS"}
    assert first.hu_min == -1024 and 80 < first.spleen_ml < 450
    assert report.cases[-1].section == "test" and report.cases[-1].spleen_ml is None
    assert main(["data", "check", str(synthetic_dataset)]) == 0
    out = capsys.readouterr().out
    for column in ("case", "shape", "spacing_mm", "orientation", "hu_range", "spleen_ml"):
        assert column in out
    assert "spleen_1" in out and "7 case(s) checked: 0 bad file(s)" in out


def test_missing_dataset_json(dataset: Path) -> None:
    (dataset / "dataset.json").unlink()
    _only_problem(dataset, "dataset.json: missing")
    with pytest.raises(BadInputError, match="dataset.json"):
        load_datalist(dataset)


def test_invalid_dataset_json(dataset: Path) -> None:
    (dataset / "dataset.json").write_text("{not json")
    _only_problem(dataset, "not valid JSON")


def test_missing_listed_file(dataset: Path) -> None:
    (dataset / "labelsTr" / "spleen_2.nii.gz").unlink()
    problem = _only_problem(dataset, "listed in dataset.json but missing")
    assert "labelsTr/spleen_2.nii.gz" in problem
    with pytest.raises(BadInputError, match="spleen_2.nii.gz"):
        load_datalist(dataset)


def test_truncated_file(dataset: Path) -> None:
    path = dataset / "imagesTr" / "spleen_3.nii.gz"
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    problem = _only_problem(dataset, "truncated or corrupt")
    assert "imagesTr/spleen_3.nii.gz" in problem
    with pytest.raises(BadInputError, match="truncated"):
        read_volume(path)


def test_corrupt_file(dataset: Path) -> None:
    path = dataset / "labelsTr" / "spleen_1.nii.gz"
    path.write_bytes(b"this is not a NIfTI file" * 10)
    _only_problem(dataset, "labelsTr/spleen_1.nii.gz: not a readable NIfTI image")


def test_shape_mismatch(dataset: Path) -> None:
    label = dataset / "labelsTr" / "spleen_2.nii.gz"
    data = np.asanyarray(nib.load(label).dataobj)
    _replace(label, np.ascontiguousarray(data[:-2]))
    _only_problem(dataset, "differs from the image's")


def test_affine_mismatch(dataset: Path) -> None:
    label = dataset / "labelsTr" / "spleen_4.nii.gz"
    reference = nib.load(label)
    shifted = reference.affine.copy()
    shifted[:3, 3] += 7.5
    _replace(label, np.asanyarray(reference.dataobj), shifted)
    problem = _only_problem(dataset, "affine differs from the image's")
    assert "spleen_4" in problem and "origin" in problem


def test_label_values_outside_zero_one(dataset: Path) -> None:
    label = dataset / "labelsTr" / "spleen_5.nii.gz"
    data = np.asanyarray(nib.load(label).dataobj).copy()
    data[0, 0, 0], data[1, 0, 0] = 2, 255
    _replace(label, data)
    _only_problem(dataset, "label values must be 0 or 1; found 2, 255")


@pytest.mark.parametrize("shape, dims", [((64, 64), "2D"), ((16, 16, 8, 2), "4D")])
def test_image_not_3d(dataset: Path, shape: tuple[int, ...], dims: str) -> None:
    image = dataset / "imagesTr" / "spleen_1.nii.gz"
    _replace(image, np.zeros(shape, dtype=np.int16))
    report = check_dataset(dataset)
    messages = [str(p) for p in report.problems]
    assert any(f"imagesTr/spleen_1.nii.gz: is {dims}" in m and "3D CT volume" in m for m in messages), messages


def test_nan_in_an_image(dataset: Path) -> None:
    image = dataset / "imagesTr" / "spleen_6.nii.gz"
    data = np.asanyarray(nib.load(image).dataobj).astype(np.float32)
    data[3, 3, 3] = np.nan
    data[4, 4, 4] = np.nan
    _replace(image, data)
    _only_problem(dataset, "imagesTr/spleen_6.nii.gz: holds 2 NaN or infinite voxel(s)")


def test_empty_mask_is_only_a_warning(dataset: Path, capsys) -> None:
    label = dataset / "labelsTr" / "spleen_3.nii.gz"
    _replace(label, np.zeros(nib.load(label).shape, dtype=np.uint8))
    report = check_dataset(dataset)
    assert report.ok
    assert [str(w) for w in report.warnings] == [f"{label}: the spleen mask is empty"]
    assert main(["data", "check", str(dataset)]) == 0
    assert "warning:" in capsys.readouterr().err


def test_every_problem_is_reported_not_just_the_first(dataset: Path, capsys) -> None:
    (dataset / "imagesTr" / "spleen_1.nii.gz").write_bytes(b"garbage")
    (dataset / "labelsTr" / "spleen_2.nii.gz").unlink()
    label = dataset / "labelsTr" / "spleen_4.nii.gz"
    data = np.asanyarray(nib.load(label).dataobj).copy()
    data[0, 0, 0] = 3
    _replace(label, data)
    description = json.loads((dataset / "dataset.json").read_text())
    description["test"].append("./imagesTs/spleen_99.nii.gz")
    (dataset / "dataset.json").write_text(json.dumps(description))
    report = check_dataset(dataset)
    bad = sorted(Path(p.path).relative_to(dataset).as_posix() for p in report.problems)
    assert bad == ["imagesTr/spleen_1.nii.gz", "imagesTs/spleen_99.nii.gz", "labelsTr/spleen_2.nii.gz",
                   "labelsTr/spleen_4.nii.gz"]
    assert [c.ok for c in report.cases].count(False) == 4
    assert main(["data", "check", str(dataset)]) == 1
    captured = capsys.readouterr()
    for name in bad:
        assert name in captured.err
    assert "BAD" in captured.out and "4 bad file(s)" in captured.out
    with pytest.raises(BadInputError, match="4 problem"):
        report.raise_if_bad()


def test_check_of_a_missing_folder(tmp_path: Path) -> None:
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 1

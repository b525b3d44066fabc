"""The synthetic phantoms: MSD layout, realistic values and variety, consistent orientation, determinism."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleenkit.data.datalist import load_datalist
from spleenkit.data.synthetic import (
    DEFAULT_MATRIX,
    MAX_SCAN_LENGTH_MM,
    PHASES,
    SPLEEN_VOLUME_ML,
    draw_body,
    draw_slice_spacing,
    draw_tissues,
    field_of_view,
    render_case,
    write_synthetic_dataset,
)
from spleenkit.errors import BadInputError

MSD_KEYS = {"name", "description", "reference", "licence", "release", "tensorImageSize", "modality", "labels",
            "numTraining", "numTest", "training", "test"}


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_matches_msd(synthetic_dataset: Path) -> None:
    description = json.loads((synthetic_dataset / "dataset.json").read_text())
    assert set(description) == MSD_KEYS
    assert description["labels"] == {"0": "background", "1": "spleen"}
    assert description["modality"] == {"0": "CT"}
    assert description["numTraining"] == 6 and description["numTest"] == 1
    assert description["training"][0] == {"image": "./imagesTr/spleen_1.nii.gz", "label": "./labelsTr/spleen_1.nii.gz"}
    assert description["test"] == ["./imagesTs/spleen_7.nii.gz"]
    assert sorted(p.name for p in (synthetic_dataset / "imagesTr").iterdir()) == sorted(
        f"spleen_{n}.nii.gz" for n in range(1, 7))
    assert len(load_datalist(synthetic_dataset)) == 6
    assert not [p for p in synthetic_dataset.parent.iterdir() if p.name.startswith(".")], "temporary files left"


def test_images_and_labels_are_consistent(synthetic_dataset: Path) -> None:
    orientations = set()
    for record in load_datalist(synthetic_dataset):
        image, label = nib.load(record["image"]), nib.load(record["label"])
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert image.shape == label.shape and np.allclose(image.affine, label.affine)
        assert image.header.get_sform(coded=True)[1] == 1 and image.header.get_qform(coded=True)[1] == 1
        orientations.add("".join(nib.aff2axcodes(image.affine)))
        values = np.asarray(label.dataobj)
        assert set(np.unique(values)) == {0, 1}
        hu = np.asarray(image.dataobj)
        assert hu.min() >= -1024 and hu.max() > 300  # air and bone
        # the spleen is soft tissue: somewhere between non-contrast and arterial enhancement
        assert -20 <= float(np.median(hu[values == 1])) <= 260
    assert {"RAS", "LPS"} <= orientations, "some cases must be stored with flipped axes"


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "LAS"])
def test_anatomy_is_right_in_world_space(orientation: str) -> None:
    """Whatever the voxel order, the spleen lies on the patient's left (RAS x < 0 of the body centre) and behind."""
    image, label, geometry = render_case(seed=3, case=1, matrix=64, slice_spacing=5.0, orientation=orientation)
    assert "".join(nib.aff2axcodes(geometry.affine)) == orientation
    body = nib.affines.apply_affine(geometry.affine, np.argwhere(image[..., ::3] > -300) * [1, 1, 3]).mean(axis=0)
    spleen = nib.affines.apply_affine(geometry.affine, np.argwhere(label > 0)).mean(axis=0)
    assert spleen[0] < body[0] - 40  # left
    assert spleen[1] < body[1] + 20  # not in front
    volume_ml = label.sum() * np.prod(geometry.spacing) / 1000
    assert SPLEEN_VOLUME_ML[0] * 0.8 < volume_ml < SPLEEN_VOLUME_ML[1]


def test_same_anatomy_whatever_the_voxel_order() -> None:
    ras = render_case(seed=5, case=2, matrix=48, slice_spacing=5.0, orientation="RAS")
    lps = render_case(seed=5, case=2, matrix=48, slice_spacing=5.0, orientation="LPS")
    canonical = [nib.as_closest_canonical(nib.Nifti1Image(c[1], c[2].affine)) for c in (ras, lps)]
    assert np.allclose(canonical[0].affine, canonical[1].affine, atol=1e-4)
    assert np.array_equal(np.asarray(canonical[0].dataobj), np.asarray(canonical[1].dataobj))


def test_default_grid_is_msd_like() -> None:
    """512 in-plane gives MSD's 0.6-0.9 mm voxels over the trunk (the default 256 twice that); the anatomy does
    not depend on the grid."""
    inplane = []
    for case in range(40):
        rng = np.random.default_rng(case)
        inplane.append(field_of_view(rng, draw_body(rng, 3.0)) / 512)
    assert 0.6 <= min(inplane) and max(inplane) <= 0.98 and max(inplane) - min(inplane) > 0.2
    assert DEFAULT_MATRIX == 256
    _, fine, geometry = render_case(seed=0, case=1, matrix=128, slice_spacing=5.0)
    _, coarse, coarse_geometry = render_case(seed=0, case=1, matrix=64, slice_spacing=5.0)
    assert geometry.spacing[0] == geometry.spacing[1]
    assert np.isclose(2 * geometry.spacing[0], coarse_geometry.spacing[0])
    fine_ml = fine.sum() * np.prod(geometry.spacing) / 1000
    coarse_ml = coarse.sum() * np.prod(coarse_geometry.spacing) / 1000
    assert abs(fine_ml - coarse_ml) < 0.1 * fine_ml


def test_the_cases_vary_like_real_abdominal_scans() -> None:
    """Slice spacing, scan range (upper abdomen only or down to the pelvis), arms, phase and patient size vary."""
    spacings, cases = set(), []
    for case in range(1, 41):  # the draws render_case makes, without painting
        spacing = draw_slice_spacing(np.random.default_rng(np.random.SeedSequence([2, case, 2])))
        spacings.add(spacing)
        rng = np.random.default_rng(np.random.SeedSequence([2, case, 1]))
        cases.append((draw_body(rng, spacing), draw_tissues(rng)))
    _, _, geometry = render_case(seed=2, case=1, matrix=16)
    assert geometry.spacing[2] == draw_slice_spacing(np.random.default_rng(np.random.SeedSequence([2, 1, 2])))
    assert min(spacings) <= 2.0 and max(spacings) >= 6.0
    assert {int(hu["phase"]) for _, hu in cases} == set(range(len(PHASES)))
    pelvis = [body.s_bottom < body.hip for body, _ in cases]
    assert 0 < sum(pelvis) < len(cases), "some scans reach the pelvis, others stop in the upper abdomen"
    assert 0 < sum(body.arm_r > 0 for body, _ in cases) < len(cases), "arms raised in some scans, down in others"
    assert 0 < sum(body.s_top < body.dome for body, _ in cases) < len(cases), "some scans start below the lungs"
    lengths = [body.s_top - body.s_bottom for body, _ in cases]
    assert max(lengths) <= MAX_SCAN_LENGTH_MM and min(lengths) < 250, "from short upper-abdomen scans to MSD's longest"
    widths = [2 * body.half_w for body, _ in cases]
    assert max(widths) - min(widths) > 60
    spleen_hu = [hu["spleen"] for _, hu in cases]
    assert min(spleen_hu) < 60 and max(spleen_hu) > 100, "non-contrast and enhanced spleens"


def test_the_label_is_the_spleen_beside_the_ribs_and_the_pelvis_is_drawn() -> None:
    """The label lies left, posterolateral, against the ribs; a scan reaching the pelvis shows the hip bones."""
    from scipy.ndimage import binary_dilation

    for case in range(1, 4):
        image, label, geometry = render_case(seed=4, case=case, matrix=96, slice_spacing=3.0, orientation="RAS")
        spleen = label.astype(bool)
        # RAS: index 0 runs to the patient's right, so the spleen (left) has low indices
        body = np.argwhere(image[:, :, image.shape[2] // 2] > -300).mean(axis=0)
        centre = np.argwhere(spleen).mean(axis=0)
        assert centre[0] < body[0] - 30 / geometry.spacing[0], "left of the midline"
        # ribs (bone) within 12 mm outside the spleen, on its lateral side
        reach = max(1, int(round(12 / geometry.spacing[0])))
        shell = binary_dilation(spleen, iterations=reach) & ~spleen
        lateral = np.zeros_like(spleen)
        lateral[: int(centre[0])] = True
        assert np.count_nonzero(shell & lateral & (image > 350)) > 0, f"case {case}: no rib beside the spleen"
        rng = np.random.default_rng(np.random.SeedSequence([4, case, 1]))
        drawn = draw_body(rng, 3.0)
        if drawn.s_bottom < drawn.hip - 20:  # the femoral heads are in view: dense bone low in the scan
            low = image[:, :, : max(1, int((drawn.hip - drawn.s_bottom) / 3.0))]
            assert np.count_nonzero(low > 350) > 50


def test_a_default_case_is_drawn_in_seconds() -> None:
    """The default dataset (14 cases at 256 x 256) must stay well within a minute on two cores."""
    started = time.process_time()
    image, label, geometry = render_case(seed=0, case=2)
    seconds = time.process_time() - started
    assert geometry.shape[:2] == (DEFAULT_MATRIX, DEFAULT_MATRIX) and label.any()
    assert seconds < 10, f"{seconds:.1f} s of CPU for one case"


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    first = write_synthetic_dataset(tmp_path / "a", cases=2, test_cases=1, seed=7, matrix=40, slice_spacing=5.0)
    second = write_synthetic_dataset(tmp_path / "b", cases=2, test_cases=1, seed=7, matrix=40, slice_spacing=5.0,
                                     workers=3)  # threads do not change the files
    other = write_synthetic_dataset(tmp_path / "c", cases=2, test_cases=1, seed=8, matrix=40, slice_spacing=5.0)
    assert _tree_digest(first) == _tree_digest(second)
    assert _tree_digest(first)["imagesTr/spleen_1.nii.gz"] != _tree_digest(other)["imagesTr/spleen_1.nii.gz"]


def test_rerun_is_a_no_op_and_other_content_is_refused(tmp_path: Path) -> None:
    out = write_synthetic_dataset(tmp_path / "d", cases=1, test_cases=0, matrix=32, slice_spacing=5.0)
    stamp = (out / "dataset.json").stat().st_mtime_ns
    write_synthetic_dataset(out, cases=1, test_cases=0, matrix=32, slice_spacing=5.0)
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(BadInputError, match="another synthetic dataset"):
        write_synthetic_dataset(out, cases=2, test_cases=0, matrix=32, slice_spacing=5.0)
    write_synthetic_dataset(out, cases=2, test_cases=0, matrix=32, slice_spacing=5.0, overwrite=True)
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2


def test_overwrite_never_deletes_foreign_files(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    with pytest.raises(BadInputError, match="refusing to replace"):
        write_synthetic_dataset(folder, cases=1, test_cases=0, matrix=32, slice_spacing=5.0, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_unwritable_output_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(BadInputError, match="cannot write") as caught:
        write_synthetic_dataset(blocker / "out", cases=1, test_cases=0, matrix=32)
    assert str(blocker) in str(caught.value)
    if os.geteuid() != 0:  # permissions do not stop root
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(BadInputError, match="cannot write"):
                write_synthetic_dataset(locked / "out", cases=1, test_cases=0, matrix=32)
            assert list(locked.iterdir()) == []
        finally:
            locked.chmod(0o700)


def test_gzip_headers_carry_no_time_or_name(synthetic_dataset: Path) -> None:
    """Byte-identical reruns need a zero mtime and no file name in every gzip header."""
    for path in synthetic_dataset.rglob("*.nii.gz"):
        header = path.read_bytes()[:10]
        assert header[:3] == b"\x1f\x8b\x08" and header[3] & 0x08 == 0, path  # deflate, no FNAME
        assert header[4:8] == b"\x00\x00\x00\x00", path  # mtime 0


def test_cli_synth(tmp_path: Path, capsys) -> None:
    from spleenkit.cli import main

    args = ["data", "synth", "--out", str(tmp_path / "s"), "--cases", "1", "--test-cases", "0", "--matrix", "32",
            "--slice-spacing", "5"]
    assert main(args) == 0
    assert "synthetic dataset:" in capsys.readouterr().out
    assert main(args) == 0  # the same set again: nothing to do
    assert main([*args[:-4], "--seed", "4", "--matrix", "32"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*args[:-4], "--seed", "4", "--matrix", "32", "--force"]) == 0


def test_every_function_is_at_most_80_lines() -> None:
    """The phantom is drawn by short painters over a body description, not by one long function."""
    import ast

    import spleenkit.data.synthetic as synthetic

    tree = ast.parse(Path(synthetic.__file__).read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    lengths = {node.name: node.end_lineno - min([node.lineno, *(d.lineno for d in node.decorator_list)]) + 1
               for node in functions}
    assert "render_case" in lengths and len(lengths) > 20
    assert {name: n for name, n in lengths.items() if n > 80} == {}

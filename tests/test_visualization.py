"""Figures: built without pyplot, saved as PNG, oriented like a viewer; the 3D viewer only when interactive."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from matplotlib.figure import Figure

from spleenkit import environment, visualization
from spleenkit.metrics import mask_metrics, write_rows_csv

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small RAS volume: a body, a bright 'spine' posterior, a spleen on the patient's left, a shifted guess."""
    shape = (40, 36, 24)
    x, y, z = np.indices(shape)
    image = np.full(shape, -1000.0)
    image[((x - 20) / 17) ** 2 + ((y - 18) / 14) ** 2 < 1] = 40.0
    image[(abs(x - 20) < 3) & (abs(y - 8) < 3)] = 700.0
    spleen = ((x - 9) / 5) ** 2 + ((y - 20) / 6) ** 2 + ((z - 14) / 6) ** 2 < 1
    image[spleen] = 110.0
    guess = np.roll(spleen, 2, axis=0)
    return image, spleen.astype(np.uint8), guess.astype(np.uint8)


def test_figures_return_figures_and_save_pngs(phantom, tmp_path: Path) -> None:
    image, spleen, guess = phantom
    spacing = (2.0, 2.0, 3.0)
    figures = {
        "three_plane": visualization.three_plane(image, guess, reference=spleen, spacing=spacing, title="t"),
        "error_map": visualization.error_map(image, guess, spleen, spacing=spacing),
        "montage": visualization.montage(image, guess, reference=spleen, spacing=spacing, slices=5, columns=3),
        "mip": visualization.maximum_intensity_projection(image, spleen, spacing=spacing),
        "illustration": visualization.illustrate_metrics(guess[:, :, 14], spleen[:, :, 14], spacing[:2]),
    }
    for name, figure in figures.items():
        assert isinstance(figure, Figure), name
        path = visualization.save_figure(figure, tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.png" for n in figures)  # no temporaries
    assert figures["three_plane"]._repr_png_()[:8] == PNG  # what a notebook shows


def test_error_map_counts_false_positives_and_negatives(phantom) -> None:
    image, spleen, guess = phantom
    figure = visualization.error_map(image, guess, spleen, spacing=(1.0, 1.0, 1.0))
    labels = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    false_positive = (guess.astype(bool) & ~spleen.astype(bool)).sum() / 1000
    false_negative = (~guess.astype(bool) & spleen.astype(bool)).sum() / 1000
    assert f"false positive {false_positive:.1f} mL" in labels
    assert f"false negative {false_negative:.1f} mL" in labels


def test_illustration_shows_the_kits_own_numbers(phantom) -> None:
    _, spleen, guess = phantom
    a, b = guess[:, :, 14], spleen[:, :, 14]
    figure = visualization.illustrate_metrics(a, b, (2.0, 2.0))
    scores = mask_metrics(a, b, (2.0, 2.0))
    texts = [t.get_text() for ax in figure.axes for t in [ax.title, *(ax.get_legend().get_texts()
                                                                      if ax.get_legend() else [])]]
    assert any(f"{scores['dice']:.3f}" in t for t in texts)
    assert any(f"HD95 (larger 95th percentile) = {scores['hd95_mm']:.2f} mm" in t for t in texts)
    assert any(f"ASSD (mean of all) = {scores['assd_mm']:.2f} mm" in t for t in texts)


def test_a_flipped_file_is_shown_like_the_original(example_ct_dir: Path) -> None:
    ct = nib.load(example_ct_dir / "ct.nii.gz")
    data = np.asarray(ct.dataobj)
    affine = ct.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ [data.shape[0] - 1, 0, data.shape[2] - 1] + affine[:3, 3]
    affine[:3, [0, 2]] *= -1
    reference, reference_spacing = visualization.to_ras(data, ct.affine)
    turned, spacing = visualization.to_ras(data[::-1, :, ::-1], affine)
    assert np.array_equal(reference, turned) and spacing == reference_spacing == (3.0, 3.0, 3.0)
    # radiological convention: the patient's left (low x in RAS) is on the right of an axial picture
    plane = visualization._plane(reference, "axial", 60)
    assert np.array_equal(plane[:, -1], reference[0, :, 60])


def test_training_curves_and_per_case_metrics_read_run_files(tmp_path: Path) -> None:
    epochs = [{"epoch": e, "loss": 1.0 / e, "val_dice": (0.1 * e if e % 2 == 0 else None), "lr": 1e-3 / e,
               "seconds": 1.0} for e in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))
    figure = visualization.training_curves(tmp_path, save=tmp_path / "curves.png")
    assert len(figure.axes) == 3  # the learning rate changes, so it gets a panel
    dice_line = figure.axes[1].get_lines()[0]
    assert list(dice_line.get_xdata()) == [2.0, 4.0, 6.0]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG

    rows = [{"case": c, "space": s, "dice": d, "hd95_mm": 5.0, "assd_mm": 1.0, "volume_error_ml": 3.0}
            for c, d in (("a", 0.9), ("b", 0.5)) for s in ("resampled", "original")]
    csv_path = write_rows_csv(rows, tmp_path / "per_case.csv")
    figure = visualization.per_case_metrics(csv_path)
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["b", "a"]  # worst first


def test_3d_view_is_skipped_when_not_interactive(phantom, monkeypatch: pytest.MonkeyPatch) -> None:
    image, spleen, _ = phantom
    calls: list[str] = []
    fake = types.ModuleType("itkwidgets")
    fake.view = lambda **kwargs: calls.append("view")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "itkwidgets", fake)
    real_import = builtins.__import__

    def guarded_import(name, *args, **kwargs):
        if name.split(".")[0] == "itkwidgets":
            calls.append("import")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded_import)
    monkeypatch.setattr(environment, "is_interactive", lambda: False)
    result = visualization.show_3d(image, spleen, spacing=(2.0, 2.0, 3.0))
    assert isinstance(result, Figure)
    assert calls == []  # itkwidgets was neither imported nor called

    monkeypatch.setattr(environment, "is_interactive", lambda: True)
    received: dict = {}
    fake.view = lambda **kwargs: received.update(kwargs) or "viewer"  # type: ignore[attr-defined]
    assert visualization.show_3d(image, spleen, spacing=(2.0, 2.0, 3.0), renderer="itk") == "viewer"
    assert calls == ["import"]  # only when asked for: the default is the offline slice viewer (tests/test_viewer.py)
    assert received["label_image"].shape == spleen.shape[::-1]  # z, y, x for itk


def test_importing_the_module_chooses_no_backend() -> None:
    code = ("import sys, matplotlib; before = matplotlib.rcParams._get_backend_or_none(); "
            "import spleenkit.visualization; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
            "assert matplotlib.rcParams._get_backend_or_none() == before, 'backend changed'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)

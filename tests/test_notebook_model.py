"""Notebooks 05 and 06 find notebook 03's model, or fall back to a stand-in and say so in a visible banner."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

import spleenkit
from spleenkit.lessons import STAND_IN_FOLDER, notebook_model, stand_in_banner


def test_the_real_model_is_used_when_notebook_03_left_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "model.pt").write_bytes(b"weights")
    monkeypatch.setattr("spleenkit.training.train", lambda *a, **k: pytest.fail("trained although 03's model exists"))
    found = notebook_model(tmp_path, "training", tmp_path / "data")
    assert found.path == tmp_path / "training" / "model.pt"
    assert not found.stand_in and found.banner == ""


def test_a_missing_model_trains_a_stand_in_beside_it_once_and_says_so(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_train(data_dir: Path, run_dir: Path, preset: str, **options: object) -> None:
        calls.append((Path(run_dir), preset, options["epochs"]))
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "model.pt").write_bytes(b"weights")

    monkeypatch.setattr("spleenkit.training.train", fake_train)
    first = notebook_model(tmp_path, "training", tmp_path / "data", "quick", 2, "cpu")
    second = notebook_model(tmp_path, "training", tmp_path / "data", "quick", 2, "cpu")  # the next notebook
    assert calls == [(tmp_path / STAND_IN_FOLDER, "quick", 2)], "one stand-in, trained once, never into 03's folder"
    assert not (tmp_path / "training").exists()
    assert first == second and first.stand_in and first.path == tmp_path / STAND_IN_FOLDER / "model.pt"
    assert str(tmp_path / "training" / "model.pt") in first.banner and "2 epoch(s)" in first.banner


def test_the_banner_is_markdown_that_says_how_to_get_the_real_model() -> None:
    text = stand_in_banner("runs/quick/training/model.pt", "runs/quick/stand-in/model.pt", 2, colab=False)
    assert all(line.startswith(">") for line in text.splitlines()), "a block quote, rendered by Markdown"
    assert "**" in text and "stand-in" in text and "03_training.ipynb" in text
    assert "`runs/quick/training/model.pt`" in text and "Google Drive" not in text


def test_on_colab_the_banner_says_why_and_points_at_drive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    text = stand_in_banner("training/model.pt", "stand-in/model.pt", 2)
    assert "own runtime" in text and "Google Drive" in text and "colab_setup()" in text and "drive=False" in text


def test_notebooks_reach_both_through_the_package_root() -> None:
    assert spleenkit.notebook_model is notebook_model and spleenkit.stand_in_banner is stand_in_banner


def notebook_code(name: str) -> str:
    import nbformat

    cells = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / name, as_version=4).cells
    return "\n".join(cell.source for cell in cells if cell.cell_type == "code")


@pytest.mark.parametrize("name", ["05_evaluation.ipynb", "06_inference_visualization.ipynb"])
def test_notebooks_05_and_06_show_the_banner_as_markdown(name: str) -> None:
    code = notebook_code(name)
    assert "notebook_model(runs_dir, run_name, data_dir" in code
    assert "display(Markdown(model.banner))" in code, "a stand-in is announced in rendered Markdown, not printed"
    assert "train(data_dir, run_dir" not in code, "no notebook trains a stand-in into 03's run folder"

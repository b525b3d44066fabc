"""The student copies committed in student/: generated from the instructor copies (a stale copy fails here, as the
README's benchmark table is held), without solutions, and with badges that open the student copy, not the solutions."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import nbformat
import pytest

from spleenkit.course import STUDENT_FOLDER, build_student_copies, student_badges
from spleenkit.notebooks import GITHUB_REF, GITHUB_REPOSITORY, badges_markdown, list_notebooks

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = list_notebooks(REPO / "notebooks")
STUDENT = REPO / STUDENT_FOLDER
REGENERATE = f"spleenkit course student --out {STUDENT_FOLDER} --force"


def test_the_committed_student_copies_are_the_generated_ones(tmp_path: Path) -> None:
    build_student_copies(tmp_path / STUDENT_FOLDER)
    stale = [path.name for path in NOTEBOOKS
             if not (STUDENT / path.name).is_file()
             or (STUDENT / path.name).read_bytes() != (tmp_path / STUDENT_FOLDER / path.name).read_bytes()]
    assert not stale, f"student copies missing or stale: {stale}; regenerate them with `{REGENERATE}`"
    extra = sorted(path.name for path in STUDENT.glob("*.ipynb") if path.name not in {p.name for p in NOTEBOOKS})
    assert not extra, f"{STUDENT_FOLDER}/ holds copies of notebooks that no longer exist: {extra}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_a_student_copys_badges_open_the_student_copy(path: Path) -> None:
    student = nbformat.read(STUDENT / path.name, as_version=4)
    where = f"{STUDENT_FOLDER}/{path.name}"
    first = student.cells[0].source
    assert f"https://colab.research.google.com/github/{GITHUB_REPOSITORY}/blob/{GITHUB_REF}/{where})" in first
    assert f"https://mybinder.org/v2/gh/{GITHUB_REPOSITORY}/{GITHUB_REF}?labpath={quote(where, safe='')})" in first
    text = "\n".join(cell.source for cell in student.cells)
    assert f"/notebooks/{path.name}" not in text and f"notebooks%2F{path.name}" not in text, "a link to the solutions"


def test_badges_are_rewritten_only_where_the_instructor_badges_are() -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell(f"# 01 · Data\n\n{badges_markdown('01_data.ipynb')}\n\ntext")]
    assert student_badges(notebook, "01_data.ipynb")
    assert notebook.cells[0].source == f"# 01 · Data\n\n{badges_markdown('01_data.ipynb', 'student')}\n\ntext"
    assert not student_badges(notebook, "01_data.ipynb")  # nothing left to rewrite
    assert not student_badges(notebook, "02_other.ipynb")

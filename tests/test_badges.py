"""Badges from one setting: the GitHub repository and ref that every Colab and Binder badge opens and that Colab's
first cell installs from are ``[tool.spleenkit]`` in pyproject.toml; ``spleenkit course badges`` points them all at a
fork, whose student copies' badges then open its own student copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

from spleenkit.cli import main
from spleenkit.course import home_addresses
from spleenkit.notebooks import (
    CourseHome,
    badges_markdown,
    colab_install,
    course_home,
    list_notebooks,
    setup_cell_source,
)

REPO = Path(__file__).resolve().parents[1]


def _texts(root: Path) -> dict[str, str]:
    """Every file that names the course's home: the instructor and student copies (their cells) and the README."""
    texts = {"README.md": (root / "README.md").read_text()}
    for folder in ("notebooks", "student"):
        for path in list_notebooks(root / folder):
            cells = nbformat.read(path, as_version=4).cells
            texts[f"{folder}/{path.name}"] = "\n".join(cell.source for cell in cells)
    return texts


def _held_to(root: Path, home: CourseHome) -> list[str]:
    """Addresses in the course's files that do not point at ``home``, and notebooks whose badges or setup cell are not
    exactly what the kit writes for ``home`` (a student copy's badges open the student copy)."""
    wrong = []
    for name, text in _texts(root).items():
        addresses = home_addresses(text)
        if not addresses:
            wrong.append(f"{name}: no badge or Colab install at all")
        wrong += [f"{name}: {address}" for address in addresses
                  if f"/{home.repository}/" not in address.replace("@", "/") + "/" or home.ref not in address]
    for folder in ("notebooks", "student"):
        for path in list_notebooks(root / folder):
            cells = nbformat.read(path, as_version=4).cells
            if badges_markdown(path.name, folder, home) not in cells[0].source:
                wrong.append(f"{folder}/{path.name}: first cell lacks badges_markdown({path.name!r}, {folder!r})")
            if setup_cell_source(home) not in [cell.source for cell in cells if cell.cell_type == "code"][:1]:
                wrong.append(f"{folder}/{path.name}: the first code cell is not the setup cell for {home}")
    return wrong


def test_the_setting_is_read_from_pyproject() -> None:
    home = course_home(REPO)
    text = (REPO / "pyproject.toml").read_text()
    assert f'repository = "{home.repository}"' in text and f'ref = "{home.ref}"' in text
    assert colab_install(home) == f"spleenkit[export] @ git+https://github.com/{home.repository}@{home.ref}"


def test_every_badge_and_colab_install_points_at_the_one_setting() -> None:
    wrong = _held_to(REPO, course_home(REPO))
    assert not wrong, "run `spleenkit course badges` (and regenerate the student copies):\n" + "\n".join(wrong)


@pytest.fixture
def fork(tmp_path: Path) -> Path:
    """A copy of what a fork's course consists of: pyproject.toml, README.md, the instructor and student copies."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    for folder in ("notebooks", "student"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return tmp_path


def test_a_fork_points_every_badge_at_itself_with_one_command(fork: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    before = _texts(fork)
    monkeypatch.chdir(fork / "notebooks")
    assert main(["course", "badges", "--repo", "alice/spleen-course", "--ref", "main"]) == 0
    assert "github.com/alice/spleen-course at main" in capsys.readouterr().out
    home = CourseHome("alice/spleen-course", "main")
    assert course_home(fork) == home
    assert not _held_to(fork, home)
    student = nbformat.read(fork / "student" / "03_training.ipynb", as_version=4).cells[0].source
    assert "https://colab.research.google.com/github/alice/spleen-course/blob/main/student/03_training.ipynb" in student
    assert "https://mybinder.org/v2/gh/alice/spleen-course/main?labpath=student%2F03_training.ipynb" in student
    # nothing but the addresses changed
    upstream = course_home(REPO)
    for name, text in _texts(fork).items():
        back = text.replace("alice/spleen-course", upstream.repository).replace("/main/", f"/{upstream.ref}/") \
            .replace("/main?", f"/{upstream.ref}?").replace("@main", f"@{upstream.ref}")
        assert back == before[name], name
    # a second run changes nothing; the ref alone can change later (a release tag)
    assert main(["course", "badges"]) == 0 and "(0 file(s) changed)" in capsys.readouterr().out
    assert main(["course", "badges", "--ref", "v2.0"]) == 0
    assert not _held_to(fork, CourseHome("alice/spleen-course", "v2.0"))


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--repo", "alice", "--repo alice: not a GitHub repository; write it as OWNER/NAME"),
    ("--ref", "feature/x", "--ref feature/x: use a tag, a branch without '/' or a commit"),
])
def test_a_bad_repository_or_ref_is_refused_in_one_line_and_changes_nothing(
        fork: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], option: str, value: str,
        message: str) -> None:
    before = _texts(fork)
    monkeypatch.chdir(fork)
    assert main(["course", "badges", option, value]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("spleenkit: error: ") and message in error and "\n" not in error
    assert _texts(fork) == before


def test_the_readme_tells_a_forking_instructor_the_one_command() -> None:
    readme = (REPO / "README.md").read_text()
    assert "spleenkit course badges --repo OWNER/NAME --ref" in readme

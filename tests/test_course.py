"""Teaching material: the exercise checkers, the exercises in every notebook, and student copies without solutions.

That the instructor copies pass every check under papermill is asserted where the notebooks run anyway
(tests/test_notebooks.py::test_every_notebook_runs_under_the_quick_profile), so nothing runs twice.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import nbformat
import numpy as np
import pytest

from spleenkit.cli import main
from spleenkit.course import (
    ANSWER_TAG,
    CHECK_TAG,
    SOLUTION_TAG,
    STUB_COMMENT,
    assigned_names,
    build_student_copies,
    check_course,
    exercise_problems,
    find_exercises,
    student_notebook,
)
from spleenkit.environment import colab_setup
from spleenkit.errors import BadInputError
from spleenkit.exercises import (
    EXERCISES,
    RESULTS_ENV,
    STRICT_ENV,
    ExerciseFailed,
    check,
    read_results,
    sliding_window_count,
)
from spleenkit.notebooks import badges_markdown, list_notebooks, run_notebooks

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = list_notebooks(REPO / "notebooks")
IDS = [path.stem for path in NOTEBOOKS]


pytestmark = pytest.mark.usefixtures("lenient")  # checks as a student meets them (conftest.py)


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


# --------------------------------------------------------------------------- the checkers
@pytest.fixture
def cube() -> tuple[np.ndarray, tuple[float, float, float]]:
    mask = np.zeros((20, 20, 20), bool)
    mask[5:15, 5:15, 5:15] = True  # 1000 voxels of 2 x 2 x 3 mm = 12 mL
    return mask, (2.0, 2.0, 3.0)


def test_a_right_answer_is_correct_and_says_what_it_means(cube: tuple) -> None:
    mask, spacing = cube
    verdict = check("01-volume", 12.0, mask=mask, spacing=spacing)
    assert verdict and verdict.status == "correct"
    assert "12.0 mL" in repr(verdict) and repr(verdict).startswith("Exercise 01-volume (spleen volume): correct!")


@pytest.mark.parametrize("answer, hint", [(12000.0, "mm³"), (1000, "number of voxels"), (7.5, "Count the voxels"),
                                          ("twelve", "expected a volume in mL"), ([1, 2], "expected a volume in mL")])
def test_a_wrong_answer_gets_a_hint_that_fits_the_mistake(cube: tuple, answer: object, hint: str) -> None:
    mask, spacing = cube
    verdict = check("01-volume", answer, mask=mask, spacing=spacing)
    assert not verdict and verdict.status == "wrong"
    assert hint in verdict.message


@pytest.mark.parametrize("stub", [None, ..., (None, None), [None], {"a": None}])
def test_a_student_stub_is_not_answered_yet_and_does_not_raise(stub: object) -> None:
    verdict = check("01-split", stub, cases=12, validation_cases=3)
    assert verdict.status == "unanswered" and not verdict
    assert "n_training" in verdict.message  # the exercise's own hint


def test_strict_mode_raises_on_wrong_and_missing_answers_but_not_on_right_or_skipped(
        monkeypatch: pytest.MonkeyPatch, cube: tuple) -> None:
    mask, spacing = cube
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(ExerciseFailed, match="01-volume .*not answered yet"):
        check("01-volume", None, mask=mask, spacing=spacing)
    with pytest.raises(ExerciseFailed, match="mm³"):
        check("01-volume", 12000, mask=mask, spacing=spacing)
    assert check("01-volume", 12, mask=mask, spacing=spacing)
    skipped = check("01-split", (-8, 9), cases=1, validation_cases=9)  # the one-case example dataset
    assert skipped.status == "skipped" and "too few to split" in skipped.message


def test_verdicts_are_recorded_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cube: tuple) -> None:
    mask, spacing = cube
    results = tmp_path / "deep" / "exercises.jsonl"
    monkeypatch.setenv(RESULTS_ENV, str(results))
    check("01-volume", None, mask=mask, spacing=spacing)
    check("01-volume", 12, mask=mask, spacing=spacing)
    assert [(v.exercise, v.status) for v in read_results(results)] == [("01-volume", "unanswered"),
                                                                       ("01-volume", "correct")]
    assert read_results(tmp_path / "missing.jsonl") == []
    results.write_text("not json\n")
    with pytest.raises(BadInputError, match="line 1"):
        read_results(results)


def test_a_mistake_of_the_notebook_author_raises() -> None:
    with pytest.raises(BadInputError, match="no exercise '01-nope'"):
        check("01-nope", 1)
    with pytest.raises(BadInputError, match="wrong keywords"):
        check("01-volume", 1, mask=np.ones(3))  # spacing missing


def test_split_hints_and_skips() -> None:
    assert check("01-split", (9, 3), cases=12, validation_cases=3)
    assert "swapped" in check("01-split", (3, 9), cases=12, validation_cases=3).message
    assert check("01-split", (32, 9), cases=41, validation_cases=9)


def test_window_fraction_checker() -> None:
    image = np.array([-100, 0, 50, 100, 200, 164, -57])
    mask = np.ones(7, bool)
    assert check("01-window", 5 / 7, image=image, mask=mask, window=(-57, 164))  # both bounds included
    assert "outside" in check("01-window", 2 / 7, image=image, mask=mask, window=(-57, 164)).message
    assert "percentage" in check("01-window", 500 / 7, image=image, mask=mask, window=(-57, 164)).message


def test_preprocessing_checkers_catch_the_usual_slips() -> None:
    shape = dict(spatial_shape=(85, 85, 63), stored_shape=(256, 256, 38), stored_spacing=(1.0, 1.0, 5.0),
                 target_spacing=(3.0, 3.0, 3.0))
    assert check("02-resampled-shape", (85, 86, 63), **shape)  # Spacingd's rounding
    assert check("02-resampled-shape", (63, 85, 85), **shape)  # axes reordered by Orientationd
    assert "before resampling" in check("02-resampled-shape", (256, 256, 38), **shape).message
    assert "upside down" in check("02-resampled-shape", (768, 768, 23), **shape).message
    cache = dict(cases=41, shape=(512, 512, 100), spacing=(0.8, 0.8, 2.5), target_spacing=(1.5, 1.5, 2.0))
    expected = 41 * (512 * 0.8 / 1.5) ** 2 * 125 * 8 / 2**30
    assert check("02-cache-gib", expected, **cache)
    assert "label" in check("02-cache-gib", expected / 2, **cache).message
    assert "4 bytes" in check("02-cache-gib", expected / 8, **cache).message


def test_volume_error_sign() -> None:
    prediction = np.ones((10, 10, 10), bool)
    reference = np.zeros((10, 10, 10), bool)
    reference[:5] = True
    assert check("05-volume-error", 0.5, prediction=prediction, reference=reference, spacing=(1, 1, 1))
    assert "reversed" in check("05-volume-error", -0.5, prediction=prediction, reference=reference,
                               spacing=(1, 1, 1)).message


def test_sliding_window_count_matches_the_arithmetic() -> None:
    # roi 32 at overlap 0.5 moves 16 voxels: 0, 16, 32 -> 3 windows per axis of 64; no overlap -> 2
    assert sliding_window_count((64, 64, 64), (32, 32, 32), 0.5) == 27
    assert sliding_window_count((64, 64, 64), (32, 32, 32), 0.0) == 8
    # 70 voxels: 0, 16, 32 and a last window shifted back to 38 -> 4 along that axis
    assert sliding_window_count((70, 64, 32), (32, 32, 32), 0.5) == 4 * 3 * 1
    assert check("06-windows", 27, image_shape=(64, 64, 64), roi_size=(32, 32, 32), overlap=0.5)
    assert not check("06-windows", 8, image_shape=(64, 64, 64), roi_size=(32, 32, 32), overlap=0.5)


def test_distributed_sampler_share() -> None:
    cases = [f"spleen_{i}" for i in range(9)]
    answer = ["spleen_1", "spleen_3", "spleen_5", "spleen_7"]
    assert check("04-sampler", answer, cases=cases, processes=2, rank=1)
    assert check("04-sampler", [1, 3, 5, 7], cases=cases, processes=2, rank=1)  # positions do too
    assert "padded" in check("04-sampler", [*answer, "spleen_0"], cases=cases, processes=2, rank=1).message
    assert "like cards" in check("04-sampler", cases[5:], cases=cases, processes=2, rank=1).message


def test_centre_in_millimetres() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[2:4, 4:6, 6:8] = True  # mean index (2.5, 4.5, 6.5)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = (-10, 0, 5)
    assert check("06-centre-mm", (-5.0, 9.0, 24.5), mask=mask, affine=affine)
    assert "voxel indices" in check("06-centre-mm", (2.5, 4.5, 6.5), mask=mask, affine=affine).message


# --------------------------------------------------------------------------- the exercises in the notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_lesson_has_two_to_four_exercises_with_a_solution_and_a_check(path: Path) -> None:
    problems = exercise_problems(path)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_every_checker_is_used_by_a_notebook() -> None:
    used = {item.exercise_id for path in NOTEBOOKS for item in find_exercises(read(path))}
    assert set(EXERCISES) - used == set(), "checkers no notebook calls: drop them or add the exercise"


def test_structure_problems_are_named() -> None:
    notebook = nbformat.v4.new_notebook()
    cells = [nbformat.v4.new_markdown_cell("## Exercise 1 · Volume"),
             nbformat.v4.new_code_cell("volume = 12"),
             nbformat.v4.new_code_cell('check("02-volume", volume)'),
             nbformat.v4.new_markdown_cell("## Exercise 2 · Later"),
             nbformat.v4.new_code_cell("answer = 1\nhelper = 2"),
             nbformat.v4.new_code_cell('check("01-volume", answer)'),
             nbformat.v4.new_markdown_cell("## Summary"),
             nbformat.v4.new_code_cell("print(helper)")]
    cells[1].metadata.tags = [SOLUTION_TAG]
    cells[4].metadata.tags = [SOLUTION_TAG]
    cells[5].metadata.tags = [CHECK_TAG]
    notebook.cells = cells
    text = "\n".join(exercise_problems(Path("01_x.ipynb"), notebook))
    assert "0 cells tagged 'check'" in text  # exercise 1's check cell is not tagged
    assert "reads 'helper', which only the solution in cell 4 defines" in text


def test_answer_names_include_assignments_inside_blocks() -> None:
    source = "import torch\nwith torch.no_grad():\n    a = 1\nif True:\n    b, (c, *d) = 1, (2, 3)\nx += 1"
    assert assigned_names(source) == ["a", "b", "c", "d", "x"]
    assert assigned_names("%pip install nothing\ny = 2") == ["y"]


def test_course_outline_has_both_plans_and_a_measured_quick_time_for_every_notebook() -> None:
    text = (REPO / "notebooks" / "README.md").read_text()
    for heading in ("## Prerequisites", "## Half-day workshop", "## Two-day course", "### Full profile (estimates"):
        assert heading in text
    measured = text.split("### Quick profile (measured)")[1].split("###")[0]
    for path in NOTEBOOKS:
        rows = [line for line in measured.splitlines() if path.name in line]
        assert rows and re.search(r"\|\s*\d+(\.\d+)?\s*s\s*\|", rows[0]), f"no measured quick time for {path.name}"


# --------------------------------------------------------------------------- student copies
def _solution_lines(notebook: nbformat.NotebookNode) -> set[str]:
    """Lines only the solution cells hold (a line that also appears in the lesson or the task is no leak)."""
    elsewhere = "\n".join(cell.source for cell in notebook.cells if SOLUTION_TAG not in cell.metadata.get("tags", []))
    lines = {line.strip() for cell in notebook.cells if SOLUTION_TAG in cell.metadata.get("tags", [])
             for line in cell.source.splitlines()}
    return {line for line in lines if line and line not in elsewhere and not re.fullmatch(r"\w+ = None", line)}


def test_student_copies_hold_no_solution_and_no_output(tmp_path: Path) -> None:
    assert main(["course", "student", "--out", str(tmp_path / "notebooks")]) == 0
    for path in NOTEBOOKS:
        instructor = read(path)
        student = read(tmp_path / "notebooks" / path.name)
        text = json.dumps(student)
        leaks = [line for line in _solution_lines(instructor) if line in text]
        assert not leaks, f"{path.name}: the student copy still holds solution lines {leaks}"
        assert not [cell for cell in student.cells if SOLUTION_TAG in cell.metadata.get("tags", [])]
        assert all(not cell.get("outputs") and cell.get("execution_count") is None
                   for cell in student.cells if cell.cell_type == "code")
        assert len(student.cells) == len(instructor.cells)
        for item in find_exercises(instructor):
            (solution,) = item.solutions
            stub = student.cells[solution]
            assert stub.metadata.tags == [ANSWER_TAG]
            assert stub.source == "\n".join([STUB_COMMENT, *(f"{name} = None" for name in item.answer_names)])
            (check_cell,) = item.checks
            assert student.cells[check_cell].source == instructor.cells[check_cell].source
        for index, (mine, theirs) in enumerate(zip(instructor.cells, student.cells, strict=True)):
            if index == 0:  # the badges open the student copy (tests/test_student_copies.py), the rest stays
                mine_source = mine.source.replace(badges_markdown(path.name), badges_markdown(path.name, "student"))
                assert theirs.source == mine_source != mine.source
            elif SOLUTION_TAG not in mine.metadata.get("tags", []):
                assert mine.source == theirs.source, f"{path.name} cell {index} changed in the student copy"


def test_student_copies_never_overwrite_work_or_the_instructor_copies(tmp_path: Path) -> None:
    build_student_copies(tmp_path, only=["01"])
    (tmp_path / "01_data.ipynb").write_text("a student's work")
    with pytest.raises(BadInputError, match="exists"):
        build_student_copies(tmp_path, only=["01"])
    assert (tmp_path / "01_data.ipynb").read_text() == "a student's work"
    assert main(["course", "student", "--out", str(tmp_path), "--only", "1"]) == 2
    build_student_copies(tmp_path, only=["01"], force=True)
    assert read(tmp_path / "01_data.ipynb").cells
    with pytest.raises(BadInputError, match="instructor copies"):
        build_student_copies(REPO / "notebooks")


# --------------------------------------------------------------------------- Colab
def _stand_in_colab(monkeypatch: pytest.MonkeyPatch, mount: object) -> list[str]:
    """A ``google.colab`` module as Colab has it: ``output`` (the widget manager) and ``drive`` (Google Drive)."""
    calls: list[str] = []
    google, colab = types.ModuleType("google"), types.ModuleType("google.colab")
    colab.output = types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append("widgets"))
    colab.drive = types.SimpleNamespace(mount=lambda folder: calls.append("drive") or mount(folder))
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    return calls


def _colab_drive(folder: str) -> None:
    Path(folder, "MyDrive").mkdir(parents=True, exist_ok=True)  # what Colab's mount shows: "My Drive"


@pytest.fixture
def quiet_progress() -> object:
    """colab_setup turns on the notebook's progress lines: take the handler off again after the test."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), logging.getLogger("spleenkit").level
    yield
    root.handlers[:] = handlers
    logging.getLogger("spleenkit").setLevel(level)


def test_colab_keeps_data_and_runs_on_google_drive_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, quiet_progress: object
) -> None:
    monkeypatch.chdir(tmp_path)
    off_colab = colab_setup(str(tmp_path / "workspace"), mount_point=str(tmp_path / "drive"))
    assert not off_colab and off_colab.workspace is None and Path.cwd() == tmp_path  # not Colab: nothing
    assert not (tmp_path / "drive").exists()
    calls = _stand_in_colab(monkeypatch, _colab_drive)
    with caplog.at_level("INFO", logger="spleenkit.environment"):
        setup = colab_setup(str(tmp_path / "workspace"), mount_point=str(tmp_path / "drive"))
    course = tmp_path / "drive" / "MyDrive" / "spleenkit"
    assert setup and setup.drive and setup.workspace == str(course)
    # every notebook's ../data and ../runs land in one Drive folder: 05 and 06, each in its own runtime, find 03's model
    assert Path.cwd() == course / "notebooks"
    assert (setup.data_dir, setup.runs_dir) == (str(course / "data"), str(course / "runs"))
    assert Path("../runs").resolve() == course / "runs"
    assert calls == ["drive", "widgets"]
    assert f"data in {course / 'data'} and runs in {course / 'runs'} (on Google Drive" in caplog.text
    assert "Change runtime type > GPU" in caplog.text  # this machine has no GPU


def test_colab_without_drive_or_when_drive_is_refused_works_in_the_runtime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, quiet_progress: object
) -> None:
    monkeypatch.chdir(tmp_path)
    calls = _stand_in_colab(monkeypatch, _colab_drive)
    setup = colab_setup(str(tmp_path / "workspace"), drive=False, mount_point=str(tmp_path / "drive"))
    assert setup and not setup.drive and calls == ["widgets"]
    assert Path.cwd() == tmp_path / "workspace" / "notebooks"  # so ../data and ../runs land in the workspace

    def refuse(folder: str) -> None:
        raise ValueError("mount failed")

    _stand_in_colab(monkeypatch, refuse)
    with caplog.at_level("WARNING", logger="spleenkit.environment"):
        setup = colab_setup(str(tmp_path / "elsewhere"), mount_point=str(tmp_path / "drive"))
    assert setup and not setup.drive and Path.cwd() == tmp_path / "elsewhere" / "notebooks"
    assert "Google Drive could not be mounted (ValueError: mount failed)" in caplog.text
    assert "lost when it ends" in caplog.text


# --------------------------------------------------------------------------- the course check, end to end (tiny)
LESSON = [
    ("code", "side = 4", ["parameters"]),
    ("markdown", "## Exercise 1 · Volume", []),
    ("code", "import numpy as np\nmask = np.ones((side, side, side), bool)", []),
    ("code", "my_ml = mask.sum() * 8 / 1000", [SOLUTION_TAG]),
    ("code", "from spleenkit.exercises import check\n\ncheck('01-volume', my_ml, mask=mask, spacing=(2, 2, 2))",
     [CHECK_TAG]),
    ("markdown", "## Exercise 2 · Split", []),
    ("code", "n_validation = 3\nn_training = 12 - n_validation", [SOLUTION_TAG]),
    ("code", "check('01-split', (n_training, n_validation), cases=12, validation_cases=3)", [CHECK_TAG]),
    ("markdown", "## Summary", []),
    ("code", "print('the lesson goes on')", []),
]


def _lesson_repo(tmp_path: Path) -> Path:
    (tmp_path / "notebooks" / "profiles").mkdir(parents=True)
    (tmp_path / "notebooks" / "profiles" / "quick.yaml").write_text("shared: {}\n")
    notebook = nbformat.v4.new_notebook()
    notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source, tags in LESSON:
        cell = nbformat.v4.new_code_cell(source) if kind == "code" else nbformat.v4.new_markdown_cell(source)
        cell.metadata.tags = tags
        notebook.cells.append(cell)
    nbformat.write(notebook, tmp_path / "notebooks" / "01_lesson.ipynb")
    return tmp_path


@pytest.mark.notebooks
def test_course_check_passes_the_instructor_copy_and_strict_mode_fails_a_student_copy(tmp_path: Path) -> None:
    repo = _lesson_repo(tmp_path / "instructor")
    result = check_course(repo=repo, out_dir=tmp_path / "checked")
    assert result.ok, result.summary.failures
    assert [(row["exercise"], row["status"]) for row in result.rows] == [("01-volume", "correct"),
                                                                         ("01-split", "correct")]

    student_repo = _lesson_repo(tmp_path / "student")
    path = student_repo / "notebooks" / "01_lesson.ipynb"
    nbformat.write(student_notebook(read(path)), path)
    assert read(path).cells[3].source == f"{STUB_COMMENT}\nmy_ml = None"
    summary = run_notebooks(repo=student_repo, out_dir=tmp_path / "strict")  # the runner is strict
    assert not summary.ok and "ExerciseFailed" in summary.failures[0].error
    assert "01-volume (spleen volume): not answered yet" in summary.failures[0].error


@pytest.mark.notebooks
def test_a_student_copy_runs_to_the_end_with_hints(tmp_path: Path) -> None:
    import papermill

    from spleenkit.notebooks import this_python_kernel

    repo = _lesson_repo(tmp_path)
    path = repo / "notebooks" / "01_lesson.ipynb"
    nbformat.write(student_notebook(read(path)), path)
    with this_python_kernel() as kernel:
        papermill.execute_notebook(str(path), str(tmp_path / "out.ipynb"), kernel_name=kernel, progress_bar=False)
    outputs = [output for cell in read(tmp_path / "out.ipynb").cells if cell.cell_type == "code"
               for output in cell.outputs]
    shown = "\n".join(output.get("text", "") or output.get("data", {}).get("text/plain", "") for output in outputs)
    assert shown.count("not answered yet") == 2 and "the lesson goes on" in shown
    assert not [output for output in outputs if output.output_type == "error"]


# --------------------------------------------------------------------------- the troubleshooting page
TROUBLES = {  # section heading -> (words the kit prints, the file that prints them): the page quotes the real thing
    "The cache does not fit in memory": ("the cache may not fit in memory; lower the cache rate",
                                         "training/engines.py"),
    "bfloat16 on a CPU: the fallback warning and the float32 message": ("bfloat16 Conv3d gradients are wrong",
                                                                       "training/precision.py"),
    '"not a synthetic dataset made by spleenkit"': ("not a synthetic dataset made by spleenkit",
                                                    "data/synthetic.py"),
    "No GPU on Colab": ("for full-scale training choose Runtime > Change runtime type > GPU", "environment.py"),
    "A stand-in model was trained": ("does not exist (notebook 03 not run): training a stand-in", "lessons.py"),
    "Everything is slow on my CPU": (None, None),
    "The orientation warning on MSD headers": ("MONAI model-zoo issue 766", "inference.py"),
}


def test_the_troubleshooting_page_answers_each_trap_with_the_message_the_kit_prints() -> None:
    page = (REPO / "docs" / "troubleshooting.md").read_text()
    for heading, (words, where) in TROUBLES.items():
        assert f"\n## {heading}\n" in page, f"docs/troubleshooting.md lacks the section {heading!r}"
        anchor = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        assert f"](#{anchor})" in page, f"the contents do not link {heading!r}"
        if words:
            section = page.split(f"\n## {heading}\n")[1].split("\n## ")[0]
            assert words in section, f"{heading!r} does not quote {words!r}"
            assert words in (REPO / "spleenkit" / where).read_text(), f"{where} no longer prints {words!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_each_summary_links_the_troubleshooting_page(path: Path) -> None:
    cells = read(path).cells
    start = next(i for i, c in enumerate(cells)
                 if c.cell_type == "markdown" and re.search(r"^#+\s*Summary", c.source, re.M))
    text = "\n".join(c.source for c in cells[start:] if c.cell_type == "markdown")
    assert "](../docs/troubleshooting.md" in text, f"{path.name}: the summary does not link the troubleshooting page"
    assert (REPO / "docs" / "troubleshooting.md").is_file()

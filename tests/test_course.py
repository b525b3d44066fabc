"""Teaching material: the exercise checkers, the exercises in every notebook, and student copies without solutions.

That the instructor copies pass every check under papermill is asserted where the notebooks run anyway
(tests/test_notebooks.py::test_every_notebook_runs_under_the_quick_profile), so nothing runs twice.
"""

from __future__ import annotations

import copy
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
    INSTRUCTOR_TAG,
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
CACHE = dict(cases=41, shape=(512, 512, 100), spacing=(0.8, 0.8, 2.5), target_spacing=(1.5, 1.5, 2.0))
CACHE_GIB = 41 * (512 * 0.8 / 1.5) ** 2 * 125 * 8 / 2**30  # image and label as float32


def test_a_right_answer_is_correct_and_says_what_it_means() -> None:
    verdict = check("02-cache-gib", CACHE_GIB, **CACHE)
    assert verdict and verdict.status == "correct"
    assert "2.8 GiB" in repr(verdict)
    assert repr(verdict).startswith("Exercise 02-cache-gib (will the seed recipe's cache fit): correct!")


@pytest.mark.parametrize("answer, hint", [(CACHE_GIB / 2, "label too"), (CACHE_GIB / 8, "4 bytes"),
                                          (7.5, "Voxels per case"), ("twelve", "expected a size in GiB"),
                                          ([1, 2], "expected a size in GiB")])
def test_a_wrong_answer_gets_a_hint_that_fits_the_mistake(answer: object, hint: str) -> None:
    verdict = check("02-cache-gib", answer, **CACHE)
    assert not verdict and verdict.status == "wrong"
    assert hint in verdict.message


@pytest.mark.parametrize("stub", [None, ..., (None, None), [None], {"a": None}])
def test_a_student_stub_is_not_answered_yet_and_does_not_raise(stub: object) -> None:
    verdict = check("02-cache-gib", stub, **CACHE)
    assert verdict.status == "unanswered" and not verdict
    assert "my_gib" in verdict.message  # the exercise's own hint


def test_strict_mode_raises_on_wrong_and_missing_answers_but_not_on_right_or_skipped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(ExerciseFailed, match="02-cache-gib .*not answered yet"):
        check("02-cache-gib", None, **CACHE)
    with pytest.raises(ExerciseFailed, match="4 bytes"):
        check("02-cache-gib", CACHE_GIB / 8, **CACHE)
    assert check("02-cache-gib", CACHE_GIB, **CACHE)
    skipped = check("01-window", lambda item, window: {}, items=[], window=(-57, 164))  # a dataset without labels
    assert skipped.status == "skipped" and "no labelled case" in skipped.message


def test_verdicts_are_recorded_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    results = tmp_path / "deep" / "exercises.jsonl"
    monkeypatch.setenv(RESULTS_ENV, str(results))
    check("02-cache-gib", None, **CACHE)
    check("02-cache-gib", CACHE_GIB, **CACHE)
    assert [(v.exercise, v.status) for v in read_results(results)] == [("02-cache-gib", "unanswered"),
                                                                       ("02-cache-gib", "correct")]
    assert read_results(tmp_path / "missing.jsonl") == []
    results.write_text("not json\n")
    with pytest.raises(BadInputError, match="line 1"):
        read_results(results)


def test_the_course_table_shows_a_skipped_exercise_as_skipped(tmp_path: Path) -> None:
    from spleenkit.course import course_rows
    from spleenkit.exercises import Verdict

    path = tmp_path / "01_lesson.ipynb"
    nbformat.write(read(_lesson_repo(tmp_path / "repo") / "notebooks" / "01_lesson.ipynb"), path)
    skipped = Verdict("01-load-case", "load a case with MONAI", "skipped", "no labelled case")
    rows = course_rows([path], [skipped])
    assert [(row["exercise"], row["status"]) for row in rows] == [("01-volume", "not run"),
                                                                  ("01-load-case", "skipped")]


def test_a_mistake_of_the_notebook_author_raises() -> None:
    with pytest.raises(BadInputError, match="no exercise '01-nope'"):
        check("01-nope", 1)
    with pytest.raises(BadInputError, match="wrong keywords"):
        check("02-cache-gib", 1, cases=41)  # shape and the spacings missing


def test_sliding_window_count_matches_the_arithmetic() -> None:
    # roi 32 at overlap 0.5 moves 16 voxels: 0, 16, 32 -> 3 windows per axis of 64; no overlap -> 2
    assert sliding_window_count((64, 64, 64), (32, 32, 32), 0.5) == 27
    assert sliding_window_count((64, 64, 64), (32, 32, 32), 0.0) == 8
    # 70 voxels: 0, 16, 32 and a last window shifted back to 38 -> 4 along that axis
    assert sliding_window_count((70, 64, 32), (32, 32, 32), 0.5) == 4 * 3 * 1


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


def test_a_prompt_needs_an_instructor_answer_and_the_answer_stays_out_of_student_copies() -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("## Exercise 1 · Steps\n\n**Predict** first, then compute."),
                      nbformat.v4.new_code_cell("def my_steps(recipe):\n    return 3"),
                      nbformat.v4.new_code_cell('check("01-volume", my_steps)'),
                      nbformat.v4.new_markdown_cell("## Exercise 2 · Why?\n\nWhy is it so?"),
                      nbformat.v4.new_code_cell("answer = 1"),
                      nbformat.v4.new_code_cell('check("01-window", answer)'),
                      nbformat.v4.new_code_cell("print('a code note')")]
    for index, tags in ((1, [SOLUTION_TAG]), (2, [CHECK_TAG]), (4, [SOLUTION_TAG]), (5, [CHECK_TAG]),
                        (6, [INSTRUCTOR_TAG])):
        notebook.cells[index].metadata.tags = tags
    text = "\n".join(exercise_problems(Path("01_x.ipynb"), notebook))
    assert "'Exercise 1 · Steps' (cell 0): the task asks to predict" in text
    assert "cell 6 is tagged 'instructor' but is code" in text
    assert find_exercises(notebook)[0].answer_names == ["my_steps"]  # a function is an answer too
    note = nbformat.v4.new_markdown_cell("Three, because ...")
    note.metadata.tags = [INSTRUCTOR_TAG]
    notebook.cells[6] = note
    notebook.cells.insert(3, copy.deepcopy(note))
    assert not exercise_problems(Path("01_x.ipynb"), notebook)
    student = student_notebook(notebook)
    assert [cell.source for cell in student.cells if "Three" in cell.source] == []
    assert student.cells[1].source == f"{STUB_COMMENT}\nmy_steps = None"


def _normal(text: str) -> str:
    """Code or prose without whitespace and with one kind of quote, so that a formatting change hides nothing."""
    return re.sub(r"\s+", "", text).replace("'", '"')


def _answer_fragments(source: str, names: list[str]) -> list[str]:
    """What of a solution cell gives its answer away when it appears elsewhere: the statements that bind an answer
    name and their values, and every statement of an answer function (each at least 30 characters, normalised)."""
    import ast

    from IPython.core.inputtransformer2 import TransformerManager

    fragments = []
    for statement in ast.parse(TransformerManager().transform_cell(source)).body:
        if isinstance(statement, (ast.Assign, ast.AnnAssign)):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            if {node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name)} & set(names):
                fragments += [ast.unparse(statement), ast.unparse(statement.value)]
        elif isinstance(statement, ast.FunctionDef) and statement.name in names:
            fragments += [ast.unparse(node) for node in ast.walk(statement)
                          if isinstance(node, (ast.Assign, ast.AugAssign, ast.Return, ast.With, ast.For, ast.Expr))]
    return [fragment for fragment in map(_normal, fragments) if len(fragment) >= 30]


def _opening(call_source: str) -> str | None:
    """``Name(a=1,b=2,c=3`` of a call with three or more keyword arguments: what prose would quote of it."""
    import ast

    try:
        node = ast.parse(call_source, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call) or len(node.keywords) < 3:
        return None
    name = node.func.attr if isinstance(node.func, ast.Attribute) else ast.unparse(node.func)
    return _normal(f"{name}(" + ",".join(ast.unparse(keyword) for keyword in node.keywords[:3]))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_solution_appears_outside_its_own_cell(path: Path) -> None:
    notebook = read(path)
    private = {i for i, cell in enumerate(notebook.cells)
               if {SOLUTION_TAG, INSTRUCTOR_TAG} & set(cell.metadata.get("tags", []))}
    elsewhere = {i: _normal(cell.source) for i, cell in enumerate(notebook.cells) if i not in private}
    prose = {i: text for i, text in elsewhere.items() if notebook.cells[i].cell_type == "markdown"}
    leaks = []
    for item in find_exercises(notebook):
        for index in item.solutions:
            source = notebook.cells[index].source
            for fragment in _answer_fragments(source, item.answer_names):
                leaks += [f"cell {i} repeats {fragment!r}" for i, text in elsewhere.items() if fragment in text]
                opening = _opening(fragment.split("=", 1)[-1]) if "=" in fragment else None
                leaks += [f"cell {i} quotes {opening!r}" for i, text in prose.items() if opening and opening in text]
    assert not leaks, f"{path.name}: a solution appears outside its cell: {sorted(set(leaks))}"


def test_the_leak_search_finds_a_solution_repeated_in_a_summary() -> None:
    solution = ('my_loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, squared_pred=True, '
                'batch=True)')
    fragments = _answer_fragments(solution, ["my_loss"])
    summary = _normal("- The loss is `DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, ...)`.")
    assert any(_opening(fragment) and _opening(fragment) in summary for fragment in fragments)
    body = "def my_f(x):\n    values = [v * 2 for v in x if v is not None]\n    return max(values)"
    assert _answer_fragments(body, ["my_f"]) == [_normal("values = [v * 2 for v in x if v is not None]")]


def test_two_thirds_of_the_exercises_write_code() -> None:
    used = [item.exercise_id for path in NOTEBOOKS for item in find_exercises(read(path))]
    kinds = [EXERCISES[exercise].kind for exercise in used]
    coded = sum(kind in ("function", "object") for kind in kinds)
    assert coded * 3 >= 2 * len(kinds), f"{coded} of {len(kinds)} exercises write code"
    for exercise in used:  # a function exercise refuses a value before it reads anything else
        if EXERCISES[exercise].kind == "function":
            with pytest.raises(Exception, match="expected a function"):
                EXERCISES[exercise].checker(42, **_no_context(exercise))


def _no_context(exercise: str) -> dict[str, object]:
    """The keywords a function exercise's checker needs before it looks at the answer: none of them is read first."""
    import inspect

    signature = inspect.signature(EXERCISES[exercise].checker)
    return {name: None for name, parameter in list(signature.parameters.items())[1:]
            if parameter.default is inspect.Parameter.empty}


def _headings(number: str) -> dict[int, str]:
    """A notebook's numbered section headings: {4: "The loss", ...}."""
    path = next(p for p in NOTEBOOKS if p.name.startswith(number))
    found = {}
    for cell in read(path).cells:
        if cell.cell_type == "markdown":
            for match in re.finditer(r"^#+\s*(\d+)\.\s*(.+)$", cell.source, re.MULTILINE):
                assert int(match.group(1)) not in found, f"{path.name}: two sections numbered {match.group(1)}"
                found[int(match.group(1))] = match.group(2).strip()
    return found


def _checker_texts() -> dict[str, list[str]]:
    """Every string a checker can show (its hint and the strings in its body), by exercise id."""
    import ast

    tree = ast.parse((REPO / "spleenkit" / "exercises.py").read_text(encoding="utf-8"))
    texts: dict[str, list[str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", "") == "exercise":
                exercise = decorator.args[0].value
                strings = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                strings += [n.value for n in ast.walk(decorator) if isinstance(n, ast.Constant)
                            and isinstance(n.value, str)]
                texts[exercise] = strings
    return texts


def test_every_section_a_hint_names_is_the_heading_it_means() -> None:
    texts = _checker_texts()
    assert "03-loss" in texts and any("section" in text for text in texts["03-loss"])
    named = 0
    for exercise, strings in texts.items():
        headings = _headings(exercise[:2])
        for text in strings:
            for match in re.finditer(r"section (\d+)(?: \(([^)]*)\))?", text):
                number, title = int(match.group(1)), match.group(2)
                assert title, f"{exercise}: {match.group(0)!r} does not say which heading it means: 'section N (Title)'"
                assert number in headings, f"{exercise}: there is no section {number} in notebook {exercise[:2]}"
                assert headings[number].lower().startswith(title.lower()), (
                    f"{exercise}: section {number} of notebook {exercise[:2]} is {headings[number]!r}, not {title!r}")
                named += 1
    assert named >= 3


def test_the_section_check_catches_the_old_hints() -> None:
    headings = _headings("03")
    assert headings[4].startswith("The loss") and not headings[3].lower().startswith("the loss")
    assert headings[6] == "The training loop" and not headings[4].startswith("Training")
    assert len(_headings("02")) == 7  # 1 to 7, none twice (two sections were numbered 6)


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
        notes = [cell.source for cell in instructor.cells if INSTRUCTOR_TAG in cell.metadata.get("tags", [])]
        sources = "\n".join(cell.source for cell in student.cells)
        assert not [note for note in notes if note in sources], f"{path.name}: an instructor's note is in the copy"
        kept = [index for index, cell in enumerate(instructor.cells)
                if INSTRUCTOR_TAG not in cell.metadata.get("tags", [])]
        assert len(student.cells) == len(kept) == len(instructor.cells) - len(notes)
        place = {index: position for position, index in enumerate(kept)}
        for item in find_exercises(instructor):
            (solution,) = item.solutions
            stub = student.cells[place[solution]]
            assert stub.metadata.tags == [ANSWER_TAG]
            assert stub.source == "\n".join([STUB_COMMENT, *(f"{name} = None" for name in item.answer_names)])
            (check_cell,) = item.checks
            assert student.cells[place[check_cell]].source == instructor.cells[check_cell].source
        for index, theirs in zip(kept, student.cells, strict=True):
            mine = instructor.cells[index]
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
    ("markdown", "## Exercise 1 · Volume\n\nWhy mL and not voxels?", []),
    ("code", "import numpy as np\nimport nibabel as nib", []),
    ("code", "def my_spleen_ml(item):\n    label = nib.load(item['label'])\n"
             "    voxels = (np.asanyarray(label.dataobj) > 0).sum()\n"
             "    return float(voxels * np.prod(label.header.get_zooms()[:3]) / 1000)", [SOLUTION_TAG]),
    ("code", "from spleenkit.exercises import check\n\ncheck('01-volume', my_spleen_ml)", [CHECK_TAG]),
    ("markdown", "Because voxels differ in size from scan to scan.", [INSTRUCTOR_TAG]),
    ("markdown", "## Exercise 2 · Shape", []),
    ("code", "def my_describe_case(item):\n    image = nib.load(item['image'])\n"
             "    return {'shape': (1, *image.shape), 'spacing': image.header.get_zooms()[:3]}", [SOLUTION_TAG]),
    ("code", "check('01-load-case', my_describe_case)", [CHECK_TAG]),
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
                                                                         ("01-load-case", "correct")]

    student_repo = _lesson_repo(tmp_path / "student")
    path = student_repo / "notebooks" / "01_lesson.ipynb"
    nbformat.write(student_notebook(read(path)), path)
    assert read(path).cells[3].source == f"{STUB_COMMENT}\nmy_spleen_ml = None"
    assert not [cell for cell in read(path).cells if "voxels differ in size" in cell.source]  # the note is gone
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
    assert "voxels differ in size" not in json.dumps(read(tmp_path / "out.ipynb"))  # the instructor's note
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

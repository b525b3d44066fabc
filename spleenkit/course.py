"""Teaching with the notebooks: find their exercises, build student copies, and check the instructor copies.

The numbered notebooks in ``notebooks/`` are the **instructor copies**. Each exercise there is:

1. a markdown cell with an ``## Exercise N · title`` heading: the task;
2. a code cell tagged ``solution``: the working answer, which assigns the answer's name(s) or defines the
   answer's function (``def my_...``);
3. a code cell tagged ``check``: ``check("NN-name", answer, ...)`` from :mod:`spleenkit.exercises`;
4. where the task asks the student to predict or to say why, a markdown cell tagged ``instructor`` with a
   short answer for the instructor.

A **student copy** (:func:`build_student_copies`, ``spleenkit course student --out DIR``) is the same
notebook with every solution cell replaced by a stub that sets the names the check cell reads to
``None`` (so the check says "not answered yet" instead of crashing, and the cells after it run),
tagged ``answer`` instead of ``solution``, without the cells tagged ``instructor``, with every output
removed, and with Colab and Binder badges that open the student copy. Solutions are written once, in the
instructor copy; the student copies committed in ``student/`` are generated from them (``spleenkit course
student --out student --force``), and a test fails when they are stale.

:func:`check_course` (``spleenkit course check``) runs the instructor copies with the papermill
runner, which sets strict mode and records every verdict, and reports each exercise's status.
"""

from __future__ import annotations

import ast
import copy
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spleenkit.errors import BadInputError
from spleenkit.exercises import EXERCISES, Verdict, read_results
from spleenkit.io import write_text
from spleenkit.notebooks import (
    EXERCISE_RESULTS_FILE,
    HOME_TABLE,
    CourseHome,
    badges_markdown,
    course_home,
    find_repo,
    home_table_span,
    list_notebooks,
    notebook_number,
    run_notebooks,
    select_notebooks,
    write_notebook,
)

SOLUTION_TAG = "solution"
CHECK_TAG = "check"
ANSWER_TAG = "answer"
INSTRUCTOR_TAG = "instructor"  # a markdown cell for the instructor only (the answer to a "predict" or "why?")
STUB_COMMENT = "# your code here"
EXERCISE_HEADING = re.compile(r"^#+\s*Exercise\b", re.MULTILINE)
HEADING = re.compile(r"^#+\s", re.MULTILINE)
CHECK_CALL = re.compile(r"""\bcheck\(\s*["'](?P<id>[^"']+)["']""")
# a task that asks the student to predict, or asks a question beyond "compute this": its answer is an instructor cell
PROMPT = re.compile(r"\bpredict\b|\bwhy\b|\?", re.IGNORECASE)
MIN_EXERCISES, MAX_EXERCISES = 2, 4
# The student copies committed in the repository: a folder beside notebooks/, so that the notebooks' relative
# paths (../data, ../runs) mean the same, and the student copies' badges open them there.
STUDENT_FOLDER = "student"


@dataclass
class ExerciseCells:
    """Where one exercise lives in a notebook: the indices of its task, solution and check cells."""

    heading: str
    task: int
    solutions: list[int] = field(default_factory=list)
    checks: list[int] = field(default_factory=list)
    exercise_id: str | None = None
    answer_names: list[str] = field(default_factory=list)
    instructor: list[int] = field(default_factory=list)


def _tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _python(source: str) -> ast.Module:
    """Parse a cell, IPython syntax (``%pip``, ``!ls``) included."""
    from IPython.core.inputtransformer2 import TransformerManager

    return ast.parse(TransformerManager().transform_cell(source))


def assigned_names(source: str, imports: bool = False) -> list[str]:
    """Names a cell binds at its own level by assignment, in order; with ``imports``, also by import, def and class.

    Loops and function bodies are left out: an answer is assigned at the cell's level (or in a
    ``with``/``if``/``try`` block there).
    """
    names: list[str] = []

    def collect(target: ast.AST) -> None:
        if isinstance(target, ast.Name):
            names.append(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                collect(element)
        elif isinstance(target, ast.Starred):
            collect(target.value)

    def visit(statements: list[ast.stmt]) -> None:
        for statement in statements:
            if isinstance(statement, ast.Assign):
                for target in statement.targets:
                    collect(target)
            elif isinstance(statement, (ast.AnnAssign, ast.AugAssign)):
                collect(statement.target)
            elif isinstance(statement, (ast.With, ast.If, ast.Try, ast.For, ast.While)):  # still the cell's level
                if imports and isinstance(statement, ast.For):
                    collect(statement.target)
                if imports and isinstance(statement, ast.With):
                    for item in statement.items:
                        if item.optional_vars is not None:
                            collect(item.optional_vars)
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(statement, block, []))
                for handler in getattr(statement, "handlers", []):
                    visit(handler.body)
            elif imports and isinstance(statement, (ast.Import, ast.ImportFrom)):
                names.extend(alias.asname or alias.name.split(".")[0] for alias in statement.names)
            elif imports and isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.append(statement.name)

    visit(_python(source).body)
    return list(dict.fromkeys(names))


def defined_functions(source: str) -> list[str]:
    """Names of the functions a cell defines at its own level (an answer may be a function: ``def my_...``)."""
    return [statement.name for statement in _python(source).body
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef))]


def read_names(source: str) -> set[str]:
    """Every name a cell reads."""
    return {node.id for node in ast.walk(_python(source)) if isinstance(node, ast.Name)
            and isinstance(node.ctx, ast.Load)}


def find_exercises(notebook: Any) -> list[ExerciseCells]:
    """The exercises of a notebook: each ``Exercise`` heading with the tagged cells up to the next heading."""
    exercises: list[ExerciseCells] = []
    current: ExerciseCells | None = None
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "markdown" and HEADING.search(cell.source):
            match = EXERCISE_HEADING.search(cell.source)
            current = None
            if match:
                line = cell.source[match.start():].splitlines()[0]
                current = ExerciseCells(heading=line.lstrip("#").strip(), task=index)
                exercises.append(current)
            continue
        if current is None:
            continue
        tags = _tags(cell)
        if INSTRUCTOR_TAG in tags:
            current.instructor.append(index)
        if cell.cell_type != "code":
            continue
        if SOLUTION_TAG in tags:
            current.solutions.append(index)
        if CHECK_TAG in tags:
            current.checks.append(index)
            found = CHECK_CALL.search(cell.source)
            current.exercise_id = found.group("id") if found else current.exercise_id
    for item in exercises:
        if item.solutions and item.checks:
            wanted = set().union(*(read_names(notebook.cells[i].source) for i in item.checks))
            assigned = [name for i in item.solutions for source in [notebook.cells[i].source]
                        for name in [*assigned_names(source), *defined_functions(source)]]
            item.answer_names = [name for name in dict.fromkeys(assigned) if name in wanted]
    return exercises


def exercise_problems(path: str | os.PathLike[str], notebook: Any | None = None) -> list[str]:
    """What is wrong with a notebook's exercises (empty when nothing): shape, tags, ids, names, leaks."""
    import nbformat

    path = Path(path)
    notebook = notebook if notebook is not None else nbformat.read(path, as_version=4)
    number = notebook_number(path)
    exercises = find_exercises(notebook)
    problems = []
    if not MIN_EXERCISES <= len(exercises) <= MAX_EXERCISES:
        problems.append(f"{len(exercises)} exercise(s); a lesson has {MIN_EXERCISES} to {MAX_EXERCISES}")
    seen: set[str] = set()
    for item in exercises:
        where = f"{item.heading!r} (cell {item.task})"
        if len(item.solutions) != 1:
            problems.append(f"{where}: {len(item.solutions)} cells tagged {SOLUTION_TAG!r}; expected one")
        if len(item.checks) != 1:
            problems.append(f"{where}: {len(item.checks)} cells tagged {CHECK_TAG!r}; expected one")
        if item.solutions and item.checks and max(item.solutions) > min(item.checks):
            problems.append(f"{where}: the check cell comes before the solution cell")
        if item.checks and item.exercise_id is None:
            problems.append(f"{where}: the check cell does not call check(\"{number}-...\", answer, ...)")
        if item.exercise_id is not None:
            if not item.exercise_id.startswith(f"{number}-"):
                problems.append(f"{where}: exercise id {item.exercise_id!r} does not start with {number}-")
            if item.exercise_id not in EXERCISES:
                problems.append(f"{where}: no checker registered for {item.exercise_id!r} in spleenkit.exercises")
            if item.exercise_id in seen:
                problems.append(f"{where}: exercise id {item.exercise_id!r} is used twice")
            seen.add(item.exercise_id)
        if item.solutions and item.checks and not item.answer_names:
            problems.append(f"{where}: the check cell reads no name that the solution cell assigns")
    for item in exercises:
        task = notebook.cells[item.task].source.split("\n", 1)[-1]
        if PROMPT.search(task) and not item.instructor:
            problems.append(f"{item.heading!r} (cell {item.task}): the task asks to predict or a question, and no "
                            f"cell tagged {INSTRUCTOR_TAG!r} answers it")
    for index, cell in enumerate(notebook.cells):
        if INSTRUCTOR_TAG in _tags(cell) and cell.cell_type != "markdown":
            problems.append(f"cell {index} is tagged {INSTRUCTOR_TAG!r} but is code: a student copy drops it, so "
                            "it must be a markdown note")
    tagged = {i for i, cell in enumerate(notebook.cells) if {SOLUTION_TAG, CHECK_TAG} & set(_tags(cell))}
    inside = {i for item in exercises for i in (*item.solutions, *item.checks)}
    for index in sorted(tagged - inside):
        problems.append(f"cell {index} is tagged {SOLUTION_TAG!r} or {CHECK_TAG!r} outside an exercise")
    problems += _later_uses(notebook, exercises)
    return problems


def _later_uses(notebook: Any, exercises: Sequence[ExerciseCells]) -> list[str]:
    """Cells that read a name only a solution defines: they would fail in a student copy.

    A check cell may read its answer names (the stub sets them to None), nothing else a solution
    defines (an import, a helper variable); the lesson's cells may read nothing a solution defines.
    """
    solution_cells = {i for item in exercises for i in item.solutions}
    stubbed = {i: set(item.answer_names) for item in exercises for i in item.checks}
    only_in_solutions: dict[str, int] = {}
    problems = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        bound = set(assigned_names(cell.source, imports=True))
        if index in solution_cells:
            for name in bound:
                only_in_solutions.setdefault(name, index)
            continue
        used = (read_names(cell.source) - bound - stubbed.get(index, set())) & set(only_in_solutions)
        for name in sorted(used):
            kind = "check" if index in stubbed else "lesson"
            problems.append(f"{kind} cell {index} reads {name!r}, which only the solution in cell "
                            f"{only_in_solutions[name]} defines: a student copy would fail there")
        for name in bound:
            only_in_solutions.pop(name, None)
    return problems


# --------------------------------------------------------------------------- student copies
def stub_source(names: Sequence[str]) -> str:
    """The student's cell: a comment to write code under, and each answer name set to None."""
    return "\n".join([STUB_COMMENT, *(f"{name} = None" for name in names)])


def student_badges(notebook: Any, name: str) -> bool:
    """Point a notebook's Colab and Binder badges (``name`` is its file name) at the committed student copy.

    The instructor copy's badges open ``notebooks/NAME``, which holds the solutions; a student copy's open
    ``student/NAME``. Returns False when the notebook carries no badges to rewrite.
    """
    instructor, student = badges_markdown(name), badges_markdown(name, folder=STUDENT_FOLDER)
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and instructor in cell.source:
            cell.source = cell.source.replace(instructor, student)
            return True
    return False


def student_notebook(notebook: Any, name: str | None = None) -> Any:
    """A student copy of an instructor notebook: solution cells become stubs, instructor notes and every output
    go; with the notebook's file ``name``, its badges open the student copy (:func:`student_badges`)."""
    student = copy.deepcopy(notebook)
    if name is not None:
        student_badges(student, name)
    for item in find_exercises(student):
        for index in item.solutions:
            cell = student.cells[index]
            cell.source = stub_source(item.answer_names or assigned_names(cell.source))
            cell.metadata["tags"] = [ANSWER_TAG if tag == SOLUTION_TAG else tag for tag in _tags(cell)]
    student.cells = [cell for cell in student.cells if INSTRUCTOR_TAG not in _tags(cell)]
    for key in ("papermill", "widgets"):
        student.metadata.pop(key, None)
    for cell in student.cells:
        for key in ("execution", "papermill", "collapsed", "scrolled", "ExecuteTime", "keep_output"):
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return student


def build_student_copies(out_dir: str | os.PathLike[str], notebook_dir: str | os.PathLike[str] | None = None,
                         only: Iterable[str | int] | None = None, force: bool = False) -> list[Path]:
    """Write student copies of the numbered notebooks into ``out_dir``; returns their paths.

    The notebooks read ``../data`` and ``../runs``, so give a folder one level below the data's parent
    (``course/notebooks`` puts the data in ``course/data``; the repository's own student copies are in
    ``student/``, regenerated with ``spleenkit course student --out student --force``). An existing copy
    is not overwritten (it may hold a student's work) unless ``force``.
    """
    import nbformat

    source_dir = Path(notebook_dir) if notebook_dir else find_repo() / "notebooks"
    out = Path(out_dir)
    if out.resolve() == source_dir.resolve():
        raise BadInputError(f"{out}: that is the instructor copies' folder; write the student copies elsewhere")
    notebooks = select_notebooks(list_notebooks(source_dir), only)
    if not notebooks:
        raise BadInputError(f"{source_dir}: no numbered notebooks (NN_short_name.ipynb)")
    existing = [out / path.name for path in notebooks if (out / path.name).exists()]
    if existing and not force:
        raise BadInputError(f"{existing[0]} exists (a student's work?); pass force=True / --force to overwrite "
                            f"{len(existing)} file(s)")
    for path in notebooks:
        problems = exercise_problems(path)
        if problems:
            raise BadInputError(f"{path}: cannot make a student copy: {'; '.join(problems)}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        student = student_notebook(nbformat.read(path, as_version=4), path.name)
        target = out / path.name
        write_notebook(student, target)
        written.append(target)
    return written


# --------------------------------------------------------------------------- where the badges point
_OWNER_NAME = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_REF = re.compile(r"^[A-Za-z0-9_.-]+$")
# every place a notebook or the README names the course's home: Colab and Binder badges, and Colab's install
_HOME_ADDRESSES = (
    (re.compile(r"https://colab\.research\.google\.com/github/[^/\s()]+/[^/\s()]+/blob/[^/\s()]+/"),
     "https://colab.research.google.com/github/{repository}/blob/{ref}/"),
    (re.compile(r"https://mybinder\.org/v2/gh/[^/\s()]+/[^/\s()]+/[^/?\s()]+\?"),
     "https://mybinder.org/v2/gh/{repository}/{ref}?"),
    (re.compile(r"git\+https://github\.com/[^/\s\"@]+/[^/\s\"@]+@[^\s\"]+"),
     "git+https://github.com/{repository}@{ref}"),
)


def home_addresses(text: str) -> list[str]:
    """Every Colab, Binder or GitHub-install address of the course's home in a text (what :func:`set_course_home`
    rewrites)."""
    return [match.group(0) for pattern, _ in _HOME_ADDRESSES for match in pattern.finditer(text)]


def _rewrite_home(text: str, repository: str, ref: str) -> str:
    for pattern, replacement in _HOME_ADDRESSES:
        text = pattern.sub(replacement.format(repository=repository, ref=ref), text)
    return text


def set_course_home(repository: str | None = None, ref: str | None = None,
                    repo: str | os.PathLike[str] | None = None) -> list[Path]:
    """Point the course at ``repository`` (OWNER/NAME on GitHub) and ``ref`` (a tag, branch or commit; either may be
    left as it is): ``[tool.spleenkit]`` in pyproject.toml, then every badge and Colab install line in the
    instructor copies, the student copies (``student/``) and the README. A fork runs this once
    (``spleenkit course badges --repo OWNER/NAME --ref main``), and its badges open its own copies. Returns the
    files changed (none when everything already points there)."""
    import nbformat

    root = Path(repo).resolve() if repo else find_repo()
    current = course_home(root)
    repository, ref = repository or current.repository, ref or current.ref
    if not _OWNER_NAME.match(repository):
        raise BadInputError(f"--repo {repository}: not a GitHub repository; write it as OWNER/NAME")
    if not _REF.match(ref):
        raise BadInputError(f"--ref {ref}: use a tag, a branch without '/' or a commit (letters, digits, . _ -)")
    changed = []
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    begin, end = home_table_span(text, pyproject)
    body = text[begin:end]
    for key, value in (("repository", repository), ("ref", ref)):
        body = re.sub(rf'^(\s*{key}\s*=\s*)"[^"]*"', lambda m, v=value: f'{m.group(1)}"{v}"', body,
                      flags=re.MULTILINE)
    if body != text[begin:end]:
        write_text(pyproject, text[:begin] + body + text[end:])
        changed.append(pyproject)
    if course_home(root) != CourseHome(repository, ref):
        raise BadInputError(f"{pyproject}: {HOME_TABLE} could not be rewritten to {repository}@{ref}")
    for folder in (root / "notebooks", root / STUDENT_FOLDER):
        for path in list_notebooks(folder):
            notebook = nbformat.read(path, as_version=4)
            before = [cell.source for cell in notebook.cells]
            for cell in notebook.cells:
                cell.source = _rewrite_home(cell.source, repository, ref)
            if [cell.source for cell in notebook.cells] != before:
                write_notebook(notebook, path)
                changed.append(path)
    readme = root / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        if (rewritten := _rewrite_home(text, repository, ref)) != text:
            write_text(readme, rewritten)
            changed.append(readme)
    return changed


# --------------------------------------------------------------------------- checking the instructor copies
def course_rows(notebooks: Sequence[Path], verdicts: Sequence[Verdict]) -> list[dict[str, str]]:
    """One row per exercise of ``notebooks``: its notebook, id, title and the last recorded status ("not run")."""
    import nbformat

    last = {verdict.exercise: verdict for verdict in verdicts}
    rows = []
    for path in notebooks:
        for item in find_exercises(nbformat.read(path, as_version=4)):
            verdict = last.get(item.exercise_id or "")
            title = EXERCISES[item.exercise_id].title if item.exercise_id in EXERCISES else item.heading
            rows.append({"notebook": path.name, "exercise": item.exercise_id or "?", "title": title,
                         "status": verdict.status if verdict is not None else "not run",  # a Verdict is true
                         "message": verdict.message if verdict is not None else ""})  # only when correct
    return rows


@dataclass
class CourseCheck:
    """The runner's summary of the instructor copies and one row per exercise."""

    summary: Any
    rows: list[dict[str, str]]

    @property
    def ok(self) -> bool:
        """True when every notebook ran and every exercise's check said correct."""
        return self.summary.ok and all(row["status"] == "correct" for row in self.rows)


def check_course(profile: str = "quick", only: Iterable[str | int] | None = None,
                 out_dir: str | os.PathLike[str] | None = None, repo: str | os.PathLike[str] | None = None,
                 overrides: dict[str, Any] | None = None) -> CourseCheck:
    """Run the instructor copies under a profile (strict exercises) and report every exercise's status."""
    repo_path = Path(repo).resolve() if repo else find_repo()
    summary = run_notebooks(profile=profile, only=only, out_dir=out_dir, repo=repo_path, overrides=overrides)
    notebooks = select_notebooks(list_notebooks(repo_path / "notebooks"), only)
    verdicts = read_results(Path(summary.output_dir) / EXERCISE_RESULTS_FILE)
    return CourseCheck(summary=summary, rows=course_rows(notebooks, verdicts))

"""The notebooks: consistent lessons, stripped for git, and runnable end to end by the papermill runner."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from urllib.parse import quote

import nbformat
import pytest

from spleenkit.cli import main
from spleenkit.course import course_rows
from spleenkit.errors import BadInputError
from spleenkit.exercises import read_results
from spleenkit.memory_cgroup import cgroup_unavailable
from spleenkit.notebooks import (
    EXERCISE_RESULTS_FILE,
    GITHUB_REF,
    GITHUB_REPOSITORY,
    KEEP_OUTPUT_TAG,
    NBVAL_CHECK_TAG,
    badges_markdown,
    binder_url,
    colab_url,
    course_home,
    format_table,
    keeps_output,
    list_notebooks,
    load_profile,
    notebook_parameters,
    notebooks_with_kept_outputs,
    require_ok,
    run_notebooks,
    select_notebooks,
    setup_cell_source,
    strip_notebooks,
    unkept_outputs,
)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
BINDER_LIMIT = "1800M"  # Binder's 2 GiB for the whole session, less its Jupyter server
PEAK_MIB = 1792  # 1.75 GiB: every notebook's kernel and children, with room below the limit
NOTEBOOKS = list_notebooks(NOTEBOOK_DIR)
IDS = [path.stem for path in NOTEBOOKS]


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


# --------------------------------------------------------------------------- the set
def test_notebooks_are_numbered_from_00_without_gaps() -> None:
    numbers = [int(path.name[:2]) for path in NOTEBOOKS]
    assert numbers[:2] == [0, 1], "the set starts with 00_welcome and 01_data"
    assert numbers == list(range(len(numbers))), f"numbers must be contiguous: {[p.name for p in NOTEBOOKS]}"
    stray = [p.name for p in NOTEBOOK_DIR.glob("*.ipynb") if p not in NOTEBOOKS]
    assert not stray, f"notebooks/ holds notebooks not named NN_short_name.ipynb: {stray}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_listed_in_the_readme_and_the_welcome_notebook(path: Path) -> None:
    assert path.name in (REPO / "README.md").read_text(), f"README.md's notebook list lacks {path.name}"
    assert path.name in (NOTEBOOK_DIR / "README.md").read_text(), f"the course outline lacks {path.name}"
    welcome = "\n".join(cell.source for cell in read(NOTEBOOK_DIR / "00_welcome.ipynb").cells)
    assert path.name in welcome, f"00_welcome.ipynb's notebook list lacks {path.name}"


# --------------------------------------------------------------------------- each lesson
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_first_cell_has_title_objectives_duration_and_badges(path: Path) -> None:
    first = read(path).cells[0]
    assert first.cell_type == "markdown"
    assert re.match(r"# \S", first.source), "the first cell starts with a '# Title' line"
    text = first.source.lower()
    assert "what you will learn" in text
    assert re.search(r"\d+\s*(minutes?|min|hours?)", text), "say how long the notebook takes"
    assert badges_markdown(path.name) in first.source, (
        f"the first cell must carry the Colab and Binder badges exactly as badges_markdown({path.name!r}) writes them")


def test_badges_and_the_colab_install_point_at_one_release_and_each_notebooks_own_path() -> None:
    assert (GITHUB_REPOSITORY, GITHUB_REF) == (course_home(REPO).repository, course_home(REPO).ref)  # one setting
    setup = setup_cell_source()
    # the lean core plus ONNX export: no JupyterLab server or test tools on Colab
    assert f'"spleenkit[export] @ git+https://github.com/{GITHUB_REPOSITORY}@{GITHUB_REF}"' in setup
    assert setup.index('if "google.colab" in sys.modules:') < setup.index("%pip install")  # only on Colab
    assert setup.rstrip().endswith("colab_setup()"), "the Colab logic lives in spleenkit.environment.colab_setup"
    for path in NOTEBOOKS:
        where = path.relative_to(REPO).as_posix()
        assert colab_url(path.name) == (f"https://colab.research.google.com/github/{GITHUB_REPOSITORY}/blob/"
                                        f"{GITHUB_REF}/{where}")
        assert binder_url(path.name) == (f"https://mybinder.org/v2/gh/{GITHUB_REPOSITORY}/{GITHUB_REF}"
                                         f"?labpath={quote(where, safe='')}")
    readme = (REPO / "README.md").read_text()
    assert colab_url("00_welcome.ipynb") in readme and binder_url("00_welcome.ipynb") in readme


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_setup_cell_then_exactly_one_parameters_cell(path: Path) -> None:
    cells = code_cells(read(path))
    assert cells[0].source == setup_cell_source(), "the first code cell is the shared setup cell (setup_cell_source())"
    tagged = [i for i, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one code cell tagged 'parameters', found {len(tagged)}"
    assert tagged[0] in (1, 2), "the parameters cell comes right after the setup (and imports) cells"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_code_names_no_cuda_and_touches_no_sys_path(path: Path) -> None:
    for index, cell in enumerate(read(path).cells):
        if cell.cell_type == "code":
            assert "cuda" not in cell.source.lower(), f"cell {index}: the package picks the device; no 'cuda' here"
        assert "sys.path" not in cell.source, f"cell {index}: the kit is installed; do not edit sys.path"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_lesson_shape_exercises_and_summary(path: Path) -> None:
    notebook = read(path)
    assert len(notebook.cells) <= 50, "keep a notebook under about 50 cells (instructor notes included)"
    headings = [line for cell in notebook.cells if cell.cell_type == "markdown"
                for line in cell.source.splitlines() if line.startswith("#")]
    exercises = [h for h in headings if re.match(r"#+\s*Exercise", h)]
    assert 2 <= len(exercises) <= 4, f"2 to 4 exercises with '## Exercise' headings, found {len(exercises)}"
    assert any(re.match(r"#+\s*Summary", h) for h in headings), "end with a '## Summary'"
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_without_outputs_except_kept_ones(path: Path) -> None:
    notebook = read(path)
    unkept = unkept_outputs(notebook)
    assert not unkept, (f"cells {unkept} hold outputs not marked to be kept: "
                        f"run `spleenkit notebooks strip {path.relative_to(REPO)}` before committing")
    for index, cell in enumerate(notebook.cells):
        if keeps_output(cell) and cell.get("outputs"):
            assert NBVAL_CHECK_TAG in cell.metadata.get("tags", []), (
                f"cell {index} keeps its output: tag it {NBVAL_CHECK_TAG!r} too, so that nbval compares it")
            assert all(output.output_type == "stream" or "image/png" not in output.get("data", {})
                       for output in cell.outputs), f"cell {index}: keep text outputs only (images differ by machine)"


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_profiles_give_every_notebook_only_parameters_it_declares(profile: str) -> None:
    settings = load_profile(profile, REPO)
    assert Path(settings["shared"]["data_dir"]).is_relative_to(REPO)
    for path in NOTEBOOKS:
        notebook_parameters(path, settings)  # raises BadInputError naming an undeclared parameter


def test_data_notebook_keeps_the_dataset_table_for_nbval() -> None:
    assert NOTEBOOK_DIR / "01_data.ipynb" in notebooks_with_kept_outputs(NOTEBOOK_DIR)


# --------------------------------------------------------------------------- the runner on tiny notebooks
def _tiny_repo(tmp_path: Path, cells: dict[str, list[str]], profile: str) -> Path:
    """A folder laid out like the repository, with one-line notebooks (first code cell tagged parameters)."""
    (tmp_path / "notebooks" / "profiles").mkdir(parents=True)
    (tmp_path / "notebooks" / "profiles" / "quick.yaml").write_text(profile)
    for name, sources in cells.items():
        notebook = nbformat.v4.new_notebook()
        notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
        notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
        notebook.cells[0].metadata.tags = ["parameters"]
        nbformat.write(notebook, tmp_path / "notebooks" / name)
    return tmp_path


REPORT = ("import os, sys, json\n"
          "print(json.dumps({'python': sys.executable, 'cwd': os.getcwd(), 'data_dir': data_dir, 'epochs': epochs,\n"
          "                  'noninteractive': os.environ.get('SPLEENKIT_NONINTERACTIVE')}))")
PROFILE = "shared:\n  data_dir: data/here\n  unused_dir: elsewhere\nnotebooks:\n  00:\n    epochs: 3\n"


def test_runner_uses_this_python_the_profile_and_notebooks_as_working_directory(tmp_path: Path) -> None:
    repo = _tiny_repo(tmp_path, {"00_first.ipynb": ["data_dir = '../data'\nepochs = 1", REPORT],
                                 "01_second.ipynb": ["data_dir = '../data'\nepochs = 1", REPORT]}, PROFILE)
    summary = run_notebooks("quick", repo=repo)
    require_ok(summary)
    assert [r.status for r in summary.results] == ["ok", "ok"]
    out = repo / "runs" / "quick" / "notebooks"
    reports = [json.loads(read(out / name).cells[-1].outputs[0].text)
               for name in ("00_first.ipynb", "01_second.ipynb")]
    assert Path(reports[0]["python"]).resolve() == Path(sys.executable).resolve()
    assert reports[0]["cwd"] == str(repo / "notebooks")
    assert reports[0]["data_dir"] == str(repo / "data" / "here")  # resolved against the repository
    assert reports[0]["noninteractive"] == "1"
    assert [r["epochs"] for r in reports] == [3, 1]  # per-notebook values go to that notebook only
    saved = json.loads((out / "summary.json").read_text())
    assert saved["ok"] and [n["notebook"] for n in saved["notebooks"]] == ["00_first.ipynb", "01_second.ipynb"]
    assert "unused_dir" not in saved["notebooks"][0]["parameters"]  # shared values only where declared
    assert "00_first.ipynb" in format_table(summary.results)


def test_runner_stops_at_a_failing_cell_and_shows_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    repo = _tiny_repo(tmp_path, {"00_ok.ipynb": ["x = 1"],
                                 "01_broken.ipynb": ["x = 1", "def lesson():\n    return 1 / 0\nlesson()"],
                                 "02_later.ipynb": ["x = 1"]}, "shared: {}\n")
    monkeypatch.chdir(repo / "notebooks")
    status = main(["notebooks", "run", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 1
    assert "01_broken.ipynb failed in cell 1" in captured.err
    assert "return 1 / 0" in captured.err and "ZeroDivisionError" in captured.err
    table = captured.out
    assert re.search(r"00_ok\.ipynb\s+ok", table) and re.search(r"01_broken\.ipynb\s+failed", table)
    assert re.search(r"02_later\.ipynb\s+not run", table)
    assert (tmp_path / "out" / "01_broken.ipynb").is_file(), "the executed copy with the error is kept"


def test_runner_selects_notebooks_and_rejects_unknown_names_and_parameters(tmp_path: Path) -> None:
    repo = _tiny_repo(tmp_path, {"00_a.ipynb": ["x = 1"], "01_b.ipynb": ["x = 1"]},
                      "notebooks:\n  01_b:\n    typo: 2\n")
    notebooks = list_notebooks(repo / "notebooks")
    assert select_notebooks(notebooks, [1]) == notebooks[1:]
    assert select_notebooks(notebooks, ["00_a.ipynb", "01"]) == notebooks
    with pytest.raises(BadInputError, match="no notebook numbered or named 7"):
        select_notebooks(notebooks, ["7"])
    with pytest.raises(BadInputError, match=r"01_b\.ipynb has no parameter\(s\) typo"):
        run_notebooks("quick", repo=repo)
    with pytest.raises(BadInputError, match="no such profile"):
        run_notebooks("nonexistent", repo=repo)


# --------------------------------------------------------------------------- stripping
def test_strip_removes_outputs_but_keeps_marked_cells(tmp_path: Path) -> None:
    notebook = nbformat.v4.new_notebook()
    plain = nbformat.v4.new_code_cell("print(1)", execution_count=1,
                                      outputs=[nbformat.v4.new_output("stream", name="stdout", text="1\n")])
    kept = nbformat.v4.new_code_cell("print(2)", execution_count=2,
                                     outputs=[nbformat.v4.new_output("stream", name="stdout", text="2\n")])
    kept.metadata.tags = [KEEP_OUTPUT_TAG, NBVAL_CHECK_TAG]
    by_flag = nbformat.v4.new_code_cell("print(3)", outputs=[nbformat.v4.new_output("stream", text="3\n")])
    by_flag.metadata.keep_output = True  # nbstripout's marker
    notebook.cells = [plain, kept, by_flag]
    path = tmp_path / "00_x.ipynb"
    nbformat.write(notebook, path)
    assert unkept_outputs(read(path)) == [0]

    assert strip_notebooks([path], check=True) == [path]
    assert unkept_outputs(read(path)) == [0], "--check changes nothing"
    assert main(["notebooks", "strip", str(path)]) == 0
    stripped = read(path)
    assert stripped.cells[0].outputs == [] and stripped.cells[0].execution_count is None
    assert stripped.cells[1].outputs[0].text == "2\n" and stripped.cells[2].outputs[0].text == "3\n"
    assert main(["notebooks", "strip", "--check", str(path)]) == 0


def test_data_notebook_reads_the_real_example_ct(example_ct_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLEENKIT_EXAMPLE_DIR", str(example_ct_dir))  # copied from there after its sha256 check
    summary = run_notebooks("quick", only=["01"], out_dir=tmp_path / "out", repo=REPO,
                            overrides={"source": "example", "example_dataset_dir": str(tmp_path / "example_dataset"),
                                       "example_dir": str(tmp_path / "example")})
    require_ok(summary)
    text = "\n".join(output.get("text", "") or output.get("data", {}).get("text/plain", "")  # printed or shown
                     for cell in code_cells(read(tmp_path / "out" / "01_data.ipynb")) for output in cell.outputs)
    assert "dataset (example)" in text and "(122, 101, 112) voxels of (3.0, 3.0, 3.0) mm" in text
    assert "too few to split" in text


# --------------------------------------------------------------------------- the whole set
@pytest.mark.slow
@pytest.mark.notebooks
def test_every_notebook_runs_under_the_quick_profile(tmp_path: Path) -> None:
    # Executed copies stay in $SPLEENKIT_NOTEBOOK_ARTIFACTS when set (scripts/test.sh sets runs/test), and
    # so do the run folders. The data are the profile's (data/synthetic, made by notebook 01 when missing),
    # the same folder nbval's run of 01 reads afterwards: the phantoms are made once per checkout.
    # Where the machine allows it (root, cgroup v1: CI), every kernel runs inside a memory cgroup of Binder's size,
    # so a notebook that would not fit there is killed and fails here.
    unavailable = cgroup_unavailable()
    if unavailable:
        warnings.warn(f"the notebooks ran without Binder's memory limit ({BINDER_LIMIT}): {unavailable}", stacklevel=1)
    artifacts = Path(os.environ.get("SPLEENKIT_NOTEBOOK_ARTIFACTS") or tmp_path)
    shutil.rmtree(artifacts, ignore_errors=True)
    summary = run_notebooks("quick", out_dir=artifacts / "notebooks", repo=REPO,
                            overrides={"runs_dir": str(artifacts / "runs")},
                            memory_limit=None if unavailable else BINDER_LIMIT)
    print(format_table(summary.results))
    require_ok(summary)
    assert [r.notebook for r in summary.results] == [p.name for p in NOTEBOOKS]
    if not unavailable:
        assert all(r.oom_kills == 0 for r in summary.results)
        over = {r.notebook: r.peak_mib for r in summary.results if r.peak_mib is not None and r.peak_mib > PEAK_MIB}
        assert not over, f"notebooks above {PEAK_MIB} MiB (kernel and children) inside Binder's limit: {over}"
    # the runner is strict about exercises (a wrong solution fails its notebook); also make sure every
    # exercise's check ran and said correct: the instructor copies teach what the student copies ask
    rows = course_rows(NOTEBOOKS, read_results(artifacts / "notebooks" / EXERCISE_RESULTS_FILE))
    not_correct = [f"{row['exercise']}: {row['status']} {row['message']}" for row in rows if row["status"] != "correct"]
    assert rows and not not_correct, "exercise checks that did not say correct:\n" + "\n".join(not_correct)

"""Progress a student sees while a long cell runs: the kit's log lines in the notebook's output, and the bundle's
commands streaming their output line by line while they run (not all at once at the end)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import spleenkit.bundle
from spleenkit.bundle import run_command
from spleenkit.environment import show_progress
from spleenkit.errors import SpleenkitError


@pytest.fixture
def progress() -> Iterator[logging.Handler]:
    root, kit = logging.getLogger(), logging.getLogger("spleenkit")
    handlers, level = list(root.handlers), kit.level
    handler = show_progress()
    yield handler
    root.handlers[:] = handlers
    kit.setLevel(level)


def test_the_kits_progress_reaches_the_output_and_monais_chatter_does_not(
        progress: logging.Handler, capsys: pytest.CaptureFixture[str]) -> None:
    logging.getLogger("spleenkit.training").info("epoch 3/12: loss 0.41")
    logging.getLogger("monai.engines").info("engine run starting")  # another library's information: left out
    logging.getLogger("monai.engines").warning("a warning from anyone")
    out = capsys.readouterr().out
    assert "epoch 3/12: loss 0.41" in out and "a warning from anyone" in out
    assert "engine run starting" not in out
    show_progress()  # a second call (a rerun setup cell) replaces the handler: no line twice
    logging.getLogger("spleenkit.evaluation").info("case 2 of 3")
    assert capsys.readouterr().out.count("case 2 of 3") == 1


# The stand-in for a bundle command prints a line, then waits until the caller has *seen* that line (the echo
# creates a flag file) before it finishes: without streaming it would wait until the timeout.
COMMAND = """
import pathlib, sys, time
flag = pathlib.Path(sys.argv[1])
print("epoch 1 done")
deadline = time.monotonic() + 20
while not flag.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
print("seen while running" if flag.exists() else "never seen")
sys.exit(int(sys.argv[2]))
"""


def _stand_in(monkeypatch: pytest.MonkeyPatch, flag: Path, status: int) -> None:
    monkeypatch.setattr(spleenkit.bundle, "bundle_command",
                        lambda command, overrides=None, processes=2: [sys.executable, "-c", COMMAND, str(flag),
                                                                      str(status)])


def test_run_command_streams_each_line_while_the_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = tmp_path / "seen"
    _stand_in(monkeypatch, flag, 0)
    seen: list[str] = []

    def echo(line: str) -> None:
        seen.append(line)
        flag.touch()

    output = run_command("train", bundle_dir=tmp_path, echo=echo, timeout=60)
    assert seen == ["epoch 1 done\n", "seen while running\n"]
    assert output == "epoch 1 done\nseen while running\n"


def test_run_command_echoes_to_the_cell_by_default_and_names_a_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    flag = tmp_path / "seen"
    flag.touch()
    _stand_in(monkeypatch, flag, 3)
    with pytest.raises(SpleenkitError, match=r"exit status 3\)(.|\n)*seen while running"):
        run_command("train", bundle_dir=tmp_path, timeout=60)
    assert "epoch 1 done" in capsys.readouterr().out


def test_run_command_stops_a_command_that_overruns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in(monkeypatch, tmp_path / "never", 0)
    with pytest.raises(SpleenkitError, match="took longer than 1 s"):
        run_command("train", bundle_dir=tmp_path, echo=False, timeout=1)


@pytest.mark.notebooks
def test_the_shared_setup_cell_makes_the_kits_lines_appear_under_a_cell_in_a_kernel(tmp_path: Path) -> None:
    import nbformat
    import papermill

    from spleenkit.notebooks import setup_cell_source, this_python_kernel

    notebook = nbformat.v4.new_notebook()
    notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(setup_cell_source()),
                      nbformat.v4.new_code_cell('import logging\n\nlogging.getLogger("spleenkit.training").info('
                                                '"epoch 1/2  loss 0.7")')]
    nbformat.write(notebook, tmp_path / "lesson.ipynb")
    with this_python_kernel() as kernel:
        papermill.execute_notebook(str(tmp_path / "lesson.ipynb"), str(tmp_path / "out.ipynb"), kernel_name=kernel,
                                   progress_bar=False)
    cells = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells
    shown = [output for output in cells[1].outputs if output.output_type == "stream"]
    assert [output.name for output in shown] == ["stdout"] and "epoch 1/2  loss 0.7" in shown[0].text
    assert not cells[0].outputs  # off Colab the setup cell is silent

"""Peak memory of a notebook: the kernel's whole process tree (torchrun's workers included), measured by the
runner, and the course outline's table of it, which keeps every notebook within Binder's 2 GiB."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from spleenkit.environment import PeakMemory, process_tree, process_tree_memory_mib
from spleenkit.notebooks import format_table, list_notebooks, run_notebooks

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = list_notebooks(REPO / "notebooks")
BINDER_MIB = 2048
MIB = 2**20

needs_proc = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux's /proc")

# A child that starts a grandchild; each fills `size` MiB (written, so the pages are resident), says
# "ready" and waits for its standard input to close.
HOLDER = """
import subprocess, sys
size = int(sys.argv[1])
block = bytearray(size << 20)
block[::4096] = b"x" * (len(block) // 4096)  # one byte a page: every page resident, no copy
child = None
if sys.argv[2] == "parent":
    child = subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[1], "child", ""],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
print("ready", flush=True)
sys.stdin.read()
if child:
    child.stdin.close()
    child.wait()
"""


def _hold(size_mib: int) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(size_mib), "parent", HOLDER],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def _release(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.close()
    process.wait(timeout=30)


@needs_proc
def test_a_child_and_a_grandchild_are_counted_and_the_measuring_process_is_not() -> None:
    with PeakMemory(include_root=False, interval_s=0.05) as idle:
        pass
    assert idle.peak_mib == 0  # no children: this (large) test process itself is left out
    holder = _hold(120)  # 120 MiB in the child, 120 MiB in the grandchild
    try:
        # rooted at the child: a sample of this process's tree could also catch a fork of pytest before its exec
        with PeakMemory(root=holder.pid, interval_s=0.05) as memory:
            tree = process_tree(holder.pid)
            assert len(tree) == 2 and tree[0] == holder.pid
            total, single = process_tree_memory_mib(holder.pid)
            assert 240 <= total < 240 + 2 * 60  # plus two small Python interpreters
            assert 120 <= single < 120 + 60
            assert 120 <= process_tree_memory_mib(holder.pid, include_root=False)[0] < 120 + 60  # the grandchild
    finally:
        _release(holder)
    assert 240 <= memory.peak_mib < 240 + 2 * 60
    assert memory.samples >= 2


@needs_proc
def test_a_spike_between_two_samples_is_still_seen() -> None:
    # the child fills 200 MiB and frees it before the sampler ever looks: its own high-water mark remains
    code = ("import sys\nblock = bytearray(200 << 20)\nblock[::4096] = b'x' * 51200\ndel block\n"
            "print('ready', flush=True)\nsys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        memory = PeakMemory(include_root=False, interval_s=10)
        memory.sample()
        assert process_tree_memory_mib(child.pid)[0] < 100  # freed: resident no more
        assert memory.peak_mib is not None and memory.peak_mib >= 200
    finally:
        _release(child)


@needs_proc
def test_a_copy_of_the_measuring_process_before_its_exec_is_not_a_kernel() -> None:
    # the runner starts each kernel with fork + exec: between the two the child shows the runner's own memory
    import os
    import time

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the copy: wait until measured, then leave without running pytest's clean-up
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        deadline = time.monotonic() + 10
        while pid not in process_tree(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pid in process_tree(os.getpid())
        assert process_tree_memory_mib(os.getpid(), include_root=False) == (0, 0)
    finally:
        os.close(write)
        os.waitpid(pid, 0)


def test_without_proc_nothing_is_measured(tmp_path: Path) -> None:
    with PeakMemory(proc=tmp_path / "no-proc") as memory:
        pass
    assert memory.peak_mib is None and memory.samples == 0


@needs_proc
@pytest.mark.notebooks
def test_the_runner_records_each_notebooks_peak(tmp_path: Path) -> None:
    (tmp_path / "notebooks" / "profiles").mkdir(parents=True)
    (tmp_path / "notebooks" / "profiles" / "quick.yaml").write_text("shared: {}\n")
    for name, size in (("00_small.ipynb", 0), ("01_large.ipynb", 300)):
        notebook = nbformat.v4.new_notebook()
        notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
        # every page resident, and held for a second: the runner samples every 0.2 s, and a kernel that exits at
        # once may end between two samples
        fill = f"import time\nblock = bytearray({size} << 20)\nblock[::4096] = b'x' * ({size} * 256)\ntime.sleep(1.0)"
        notebook.cells = [nbformat.v4.new_code_cell(fill)]
        nbformat.write(notebook, tmp_path / "notebooks" / name)
    summary = run_notebooks(repo=tmp_path, out_dir=tmp_path / "out")
    assert summary.ok
    small, large = (row["peak_mib"] for row in json.loads((tmp_path / "out" / "summary.json").read_text())["notebooks"])
    assert 20 < small < 400  # an IPython kernel
    assert large - small > 250
    table = format_table(summary.results)
    assert "peak MiB" in table.splitlines()[0] and f"{large:.0f}" in table


# --------------------------------------------------------------------------- the course outline's table
def _memory_rows() -> dict[str, float]:
    text = (REPO / "notebooks" / "README.md").read_text()
    assert "### Peak memory (measured)" in text, "the course outline lacks its memory table"
    section = text.split("### Peak memory (measured)")[1].split("\n#")[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*(\d\d_\w+\.ipynb)\s*\|\s*([\d.]+)\s*MiB\s*\|", line)
        if match:
            rows[match.group(1)] = float(match.group(2))
    return rows


def test_the_course_outline_gives_every_notebooks_peak_memory_within_binders_2_gib() -> None:
    rows = _memory_rows()
    missing = [path.name for path in NOTEBOOKS if path.name not in rows]
    assert not missing, f"no measured peak memory in notebooks/README.md for {missing}"
    over = {name: mib for name, mib in rows.items() if mib > BINDER_MIB}
    assert not over, f"above Binder's {BINDER_MIB} MiB: {over}"


# --------------------------------------------------------------------------- what the kit does to stay small
_HOLD_AND_FREE = """
import sys
from spleenkit.environment import release_free_memory

def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

blocks = [bytearray(64 * 1024) for _ in range(8000)]  # 500 MiB in small blocks, kept in the C heap when freed
keep = blocks[-1]
del blocks
before = rss_mib()
ran = release_free_memory()
print(ran, before - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_freed_heap_memory_goes_back_to_the_system() -> None:
    """After a cache fills, the freed temporaries are handed back: the process shrinks (by hundreds of MiB here)."""
    out = subprocess.run([sys.executable, "-c", _HOLD_AND_FREE], capture_output=True, text=True, check=True).stdout
    ran, released = out.split()
    assert ran == "True" and float(released) > 100, out


def test_the_process_count_is_found_without_loading_torch_on_a_machine_without_gpu() -> None:
    """A notebook kernel asking how many processes to launch must not load PyTorch (about 180 MB) to hear "2"."""
    code = "import sys\nfrom spleenkit.distributed import default_nproc\nprint(default_nproc(), 'torch' in sys.modules)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    if Path("/dev/nvidia0").exists():
        assert out.split()[1] == "True"  # a GPU machine asks torch how many
    else:
        assert out.split() == ["2", "False"], out

"""Peak memory of a notebook: the kernel's whole process tree (torchrun's workers included), measured by the
runner, and the course outline's table of it, which keeps every notebook within Binder's 2 GiB."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from spleenkit.environment import PeakMemory, process_tree, process_tree_memory_mib
from spleenkit.errors import BadInputError
from spleenkit.notebooks import format_table, list_notebooks, run_notebooks

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = list_notebooks(REPO / "notebooks")
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
PEAK_MIB = 1792  # 1.75 GiB: each notebook's kernel and children, inside Binder's 2 GiB less its server (1800 MiB)
RECORD = REPO / "notebooks" / "memory.json"


def _memory_rows() -> dict[str, tuple[float, float, float, int]]:
    """The course outline's table: notebook -> (peak, resident, charged, OOM kills)."""
    text = (REPO / "notebooks" / "README.md").read_text()
    assert "### Peak memory (measured)" in text, "the course outline lacks its memory table"
    section = text.split("### Peak memory (measured)")[1].split("\n#")[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*(\d\d_\w+\.ipynb)\s*\|\s*([\d.]+) MiB\s*\|\s*([\d.]+) MiB\s*\|\s*([\d.]+) MiB\s*\|"
                         r"\s*(\d+)\s*\|", line)
        if match:
            rows[match.group(1)] = (*(float(match.group(i)) for i in (2, 3, 4)), int(match.group(5)))
    return rows


def test_every_notebook_fits_in_binders_memory_as_measured_from_a_fresh_clone() -> None:
    """notebooks/memory.json is the runner's record of the run inside an 1800 MiB cgroup: every notebook ran, none
    was killed, and each peak is within 1.75 GiB."""
    record = json.loads(RECORD.read_text())
    assert record["memory_limit_mib"] == 1800 and record["profile"] == "quick"
    assert list(record["notebooks"]) == [path.name for path in NOTEBOOKS], "measure every notebook"
    for name, figures in record["notebooks"].items():
        assert figures["status"] == "ok" and figures["oom_kills"] == 0, name
        assert figures["peak_mib"] <= PEAK_MIB and figures["cgroup_resident_mib"] <= PEAK_MIB, (name, figures)
        assert figures["cgroup_max_usage_mib"] <= record["memory_limit_mib"], (name, figures)


def test_the_outline_and_the_troubleshooting_page_quote_that_measurement() -> None:
    record = json.loads(RECORD.read_text())
    rows = _memory_rows()
    assert set(rows) == set(record["notebooks"]), "the outline's table lists every measured notebook"
    for name, figures in record["notebooks"].items():
        measured = (round(figures["peak_mib"]), round(figures["cgroup_resident_mib"]),
                    round(figures["cgroup_max_usage_mib"]), figures["oom_kills"])
        assert rows[name] == measured, f"{name}: the outline says {rows[name]}, notebooks/memory.json {measured}"
    largest = round(max(figures["peak_mib"] for figures in record["notebooks"].values()))
    outline = (REPO / "notebooks" / "README.md").read_text()
    assert f"Measured on {record['measured']}" in outline and f"went above {largest} MiB" in outline
    troubleshooting = (REPO / "docs" / "troubleshooting.md").read_text()
    assert f"went above **{largest} MiB**" in troubleshooting and "1800 MiB memory cgroup" in troubleshooting


def test_the_record_is_what_the_runner_writes() -> None:
    """The committed record has the runner's own shape (spleenkit notebooks run --memory-record), not a hand copy's."""
    from spleenkit.notebooks import NotebookResult, RunSummary, memory_record

    made = memory_record(RunSummary("quick", "out", "python", [NotebookResult("00_x.ipynb", "ok")],
                                    memory_limit={"limit_mib": 1800.0, "applied": True, "reason": None}))
    record = json.loads(RECORD.read_text())
    assert set(record) == set(made)
    assert set(next(iter(record["notebooks"].values()))) == set(made["notebooks"]["00_x.ipynb"])


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


@pytest.mark.parametrize(("memory_gib", "set_here"), [(1.76, True), (3.9, True), (4.0, False), (24.0, False),
                                                     (None, False)])
def test_large_blocks_go_back_promptly_only_where_memory_is_small(memory_gib: float | None, set_here: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt return costs a CPU training step 1.6-1.8x its time, so it is set in a 2 GiB Binder session (or
    a CI run inside 1800 MiB), not on a machine with memory to spare, nor where the memory cannot be read."""
    from spleenkit import environment

    calls: list[tuple[int, int]] = []

    class Glibc:
        def mallopt(self, option: int, value: int) -> int:
            calls.append((option, value))
            return 1

    monkeypatch.setattr(environment, "_glibc", Glibc)
    monkeypatch.setattr(environment, "total_memory_gib", lambda: memory_gib)
    assert environment.return_large_blocks_promptly() is set_here
    assert calls == ([(-3, 64 * 1024)] if set_here else [])
    assert environment.return_large_blocks_promptly(below_gib=None) is True  # asked for always


def test_the_process_count_is_found_without_loading_torch_on_a_machine_without_gpu() -> None:
    """A notebook kernel asking how many processes to launch must not load PyTorch (about 180 MB) to hear "2"."""
    code = "import sys\nfrom spleenkit.distributed import default_nproc\nprint(default_nproc(), 'torch' in sys.modules)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    if Path("/dev/nvidia0").exists():
        assert out.split()[1] == "True"  # a GPU machine asks torch how many
    else:
        assert out.split() == ["2", "False"], out


# --------------------------------------------------------------------------- a memory limit as Binder enforces it
def test_memory_sizes_are_read_as_binary_units_and_nonsense_is_refused() -> None:
    from spleenkit.memory_cgroup import parse_size

    assert parse_size("1800M") == 1800 * MIB == parse_size("1800MiB") == parse_size("1800Mi")
    assert parse_size("1.75G") == int(1.75 * 2**30) and parse_size("2Gi") == 2**31 and parse_size(2**30) == 2**30
    for bad, message in (("12 parsecs", "not a memory size"), ("10M", "below 64 MiB"), ("", "not a memory size")):
        with pytest.raises(BadInputError, match=message):
            parse_size(bad)


def test_where_no_cgroup_can_be_made_the_reason_is_given(tmp_path: Path) -> None:
    from spleenkit.memory_cgroup import cgroup_unavailable

    assert "no cgroup v1 memory controller" in cgroup_unavailable(tmp_path)
    (tmp_path / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    tmp_path.chmod(0o555)
    try:
        if os.geteuid() != 0:  # root writes anywhere
            assert "not writable" in cgroup_unavailable(tmp_path)
    finally:
        tmp_path.chmod(0o755)


def test_the_memory_a_process_may_use_is_its_containers_limit(tmp_path: Path) -> None:
    """Binder's pod shows the whole machine in /proc/meminfo; its cgroup's limit is what the kit plans with."""
    from spleenkit.environment import _cgroup_limit_bytes

    v2 = tmp_path / "v2"
    (v2 / "pod" / "container").mkdir(parents=True)
    (v2 / "pod" / "memory.max").write_text(f"{2**31}\n")
    (v2 / "pod" / "container" / "memory.max").write_text("max\n")
    (tmp_path / "cgroup-v2").write_text("0::/pod/container\n")
    assert _cgroup_limit_bytes(tmp_path / "cgroup-v2", v2) == 2**31
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.stat").write_text(f"cache 0\nhierarchical_memory_limit {1800 * MIB}\n")
    (tmp_path / "cgroup-v1").write_text("4:memory:/job\n3:cpu:/\n")
    assert _cgroup_limit_bytes(tmp_path / "cgroup-v1", v1) == 1800 * MIB
    (v1 / "memory" / "job" / "memory.stat").write_text("hierarchical_memory_limit 9223372036854771712\n")
    assert _cgroup_limit_bytes(tmp_path / "cgroup-v1", v1) is None  # no limit


def _tiny_notebooks(root: Path, sizes: dict[str, int]) -> Path:
    (root / "notebooks" / "profiles").mkdir(parents=True)
    (root / "notebooks" / "profiles" / "quick.yaml").write_text("shared: {}\n")
    for name, size in sizes.items():
        notebook = nbformat.v4.new_notebook()
        notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
        notebook.cells = [nbformat.v4.new_code_cell(
            "import time\nfrom spleenkit.environment import total_memory_gib\nprint('limit seen', total_memory_gib())\n"
            f"block = bytearray({size} << 20)\nblock[::4096] = b'x' * ({size} * 256)\ntime.sleep(0.5)")]
        nbformat.write(notebook, root / "notebooks" / name)
    return root


@pytest.mark.notebooks
def test_each_kernel_runs_under_the_memory_limit_and_one_that_does_not_fit_is_killed(tmp_path: Path) -> None:
    from spleenkit.memory_cgroup import cgroup_unavailable

    reason = cgroup_unavailable()
    if reason:
        pytest.skip(f"no memory cgroup here: {reason}")
    repo = _tiny_notebooks(tmp_path, {"00_fits.ipynb": 100, "01_too_large.ipynb": 400, "02_after.ipynb": 50})
    summary = run_notebooks(repo=repo, out_dir=tmp_path / "out", memory_limit="300M", keep_going=True)
    fits, too_large, after = summary.results
    assert summary.memory_limit == {"limit_mib": 300.0, "applied": True, "reason": None}
    assert fits.status == "ok" and fits.oom_kills == 0 and 100 <= fits.cgroup_max_usage_mib < 300
    assert 100 <= fits.cgroup_resident_mib <= fits.cgroup_max_usage_mib  # the 100 MiB block, without file cache
    assert too_large.status == "failed" and too_large.oom_kills >= 1 and too_large.cgroup_max_usage_mib >= 299
    assert "killed for memory (OOM) at the limit of 300 MiB" in too_large.error
    assert after.status == "ok" and after.oom_kills == 0  # the group was emptied: the next notebook starts afresh
    executed = nbformat.read(tmp_path / "out" / "00_fits.ipynb", as_version=4)
    assert "limit seen 0.29" in executed.cells[0].outputs[0].text  # the kernel plans with the limit it is under
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["memory_limit"]["applied"] and saved["notebooks"][1]["oom_kills"] >= 1
    table = format_table(summary.results)
    assert "cgroup resident" in table.splitlines()[0] and "OOM" in table.splitlines()[0]
    assert not list(Path(__import__("spleenkit.memory_cgroup").memory_cgroup.own_memory_cgroup()).glob(
        f"spleenkit-{os.getpid()}-*")), "the cgroup is removed after the run"


@pytest.mark.notebooks
def test_where_the_limit_cannot_be_applied_the_notebooks_run_and_the_reason_is_printed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from spleenkit import memory_cgroup
    from spleenkit.cli import main

    monkeypatch.setattr(memory_cgroup, "CGROUP_V1_MEMORY", tmp_path / "no-cgroups")
    repo = _tiny_notebooks(tmp_path / "repo", {"00_small.ipynb": 10})
    monkeypatch.chdir(repo / "notebooks")
    assert main(["notebooks", "run", "--memory-limit", "1800M", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "memory limit of 1800 MiB not applied: no cgroup v1 memory controller" in err
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["memory_limit"]["applied"] is False and saved["notebooks"][0]["status"] == "ok"
    assert saved["notebooks"][0]["cgroup_max_usage_mib"] is None

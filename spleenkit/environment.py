"""What the kit runs on: versions, device, cores, memory, GPUs, whether this is Colab or a live session;
the setup every notebook does (Colab and Google Drive, progress lines); and the memory of a process tree."""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from spleenkit.devices import describe_device, describe_precision, pick_device


def package_versions() -> dict[str, str | None]:
    """Versions of python and the libraries a run depends on."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("spleenkit", "torch", "monai", "pytorch-ignite", "nibabel", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


#: Below this much memory (a Binder session's 2 GiB, a small laptop) the kit fills a cache one case at a time.
SMALL_MEMORY_GIB = 4.0
_UNLIMITED = 2**62  # cgroup v1 writes "no limit" as a number near 2**63


def _cgroup_limit_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"),
                        mount: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup and its parents (v2 ``memory.max``, v1 ``hierarchical_memory_limit``);
    None when there is none or it cannot be read. A container (Binder's pod) is limited this way, while /proc and
    sysconf still show the whole machine's memory."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: memory.max of the group and of each parent
            folder = mount / path.lstrip("/")
            while True:
                try:
                    value = (folder / "memory.max").read_text().strip()
                    if value != "max":
                        limits.append(int(value))
                except (OSError, ValueError):
                    pass
                if folder == mount or mount not in folder.parents:
                    break
                folder = folder.parent
        elif "memory" in controllers.split(","):  # cgroup v1: the limit of the group and its parents, in one line
            try:
                for stat in (mount / "memory" / path.lstrip("/") / "memory.stat").read_text().splitlines():
                    key, _, value = stat.partition(" ")
                    if key == "hierarchical_memory_limit":
                        limits.append(int(value))
            except (OSError, ValueError):
                pass
    limits = [limit for limit in limits if 0 < limit < _UNLIMITED]
    return min(limits) if limits else None


def total_memory_gib() -> float | None:
    """The memory this process may use, in GiB: the machine's, or its container's limit (a memory cgroup, as on
    Binder) where that is lower; None where neither can be read."""
    try:
        physical: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = None
    limit = _cgroup_limit_bytes() if sys.platform.startswith("linux") else None
    sizes = [size for size in (physical, limit) if size]
    return round(min(sizes) / 2**30, 2) if sizes else None


def _glibc() -> Any:
    """The C library when it is glibc (Linux), for its heap controls; None elsewhere (macOS, musl)."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both exist in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def release_free_memory() -> bool:
    """Free unreachable objects, then hand the memory freed temporaries left in the C heap back to the system
    (``gc.collect`` and glibc's ``malloc_trim``).

    MONAI's engines and handlers refer to each other, so a finished training (its network, optimiser and
    datasets) is freed only when Python's cycle collector next runs; and glibc keeps freed pages for reuse.
    Without this a notebook kernel holds hundreds of MB it no longer uses after a training, which count against
    a 2 GiB Binder session. True where the heap was trimmed (Linux with glibc); elsewhere only ``gc`` runs.
    """
    import gc

    gc.collect()
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


#: glibc's ``M_MMAP_THRESHOLD`` (``mallopt``), and the value the kit sets: blocks from 64 KiB up get pages of their own.
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES = -3, 64 * 1024


def return_large_blocks_promptly(below_gib: float | None = SMALL_MEMORY_GIB) -> bool:
    """Where memory is small (:func:`total_memory_gib` below ``below_gib``: a Binder session's 2 GiB), make every
    block of 64 KiB or more (each volume, crop and feature map) come straight from the system and go straight back
    when freed, in this process and from now on (glibc's ``mallopt(M_MMAP_THRESHOLD)``); ``below_gib=None``: always.

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB), after which volumes
    are carved out of the heap and their pages stay with the process: a training or a cache fill then holds
    200-400 MB more than it uses (measured on the quick recipe: peak 1053 against 849 MiB), enough to push a
    notebook over Binder's 2 GiB. The price is time: every feature map then costs a fresh mapping and its page
    faults, and a training step of the quick recipe on a CPU takes 1.6-1.8x as long (0.39-0.42 s against
    0.23-0.25 s), so where memory is plentiful glibc's default stays. The same setting is the environment variable
    ``MALLOC_MMAP_THRESHOLD_``. True where it was set (Linux with glibc, memory small).
    """
    if below_gib is not None:
        memory = total_memory_gib()
        if memory is None or memory >= below_gib:
            return False
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))


def peak_memory_mib() -> float:
    """This process's peak resident memory so far, in MiB.

    On Linux it is read from /proc/self/status (VmHWM), which starts afresh in every program:
    ``ru_maxrss``, the fallback elsewhere, keeps the high-water mark of the process that started
    this one, so a command run from a 1 GiB notebook kernel would report 1 GiB before doing anything.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def on_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


def is_interactive() -> bool:
    """True in a live Jupyter session; False under papermill, nbclient tests, scripts and CI.

    Heavy interactive widgets (the 3D viewer) are shown only when this is True: in a headless
    papermill run the cell after such a widget can wait forever for a front end.
    """
    if os.environ.get("SPLEENKIT_NONINTERACTIVE") or os.environ.get("CI") or os.environ.get("PAPERMILL_EXECUTION"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False
    # papermill and nbclient start kernels without a connected front end; Jupyter front ends set this
    return "JPY_SESSION_NAME" in os.environ or "VSCODE_PID" in os.environ or on_colab()


def environment_report() -> dict[str, Any]:
    """Versions, device, cores, memory, GPU count, the CPU's capability and the precision the kit will use
    for training and inference (with why), as shown by the welcome notebook and ``spleenkit info``."""
    device = pick_device("auto")
    precision = describe_precision(device)
    return {
        "versions": package_versions(),
        **describe_device(device),
        "memory_gib": total_memory_gib(),
        "colab": on_colab(),
        "cpu_capability": precision["cpu"]["label"],
        "training_precision": f"{precision['training']['dtype']}: {precision['training']['reason']}",
        "inference_precision": f"{precision['inference']['dtype']}: {precision['inference']['reason']}",
    }


COLAB_WORKSPACE = "/content/spleenkit"
DRIVE_MOUNT = "/content/drive"  # where Colab mounts Google Drive
DRIVE_FOLDER = "spleenkit"  # the course folder in "My Drive"


@dataclass(frozen=True)
class ColabSetup:
    """What :func:`colab_setup` did: on Colab or not, the workspace holding ``data/`` and ``runs/``, and
    whether that workspace is on Google Drive. True exactly on Colab, so ``if colab_setup():`` reads well."""

    colab: bool
    workspace: str | None = None
    drive: bool = False

    def __bool__(self) -> bool:
        return self.colab

    @property
    def data_dir(self) -> str | None:
        """Where the notebooks' ``../data`` points (None off Colab: the repository's ``data/``)."""
        return os.path.join(self.workspace, "data") if self.workspace else None

    @property
    def runs_dir(self) -> str | None:
        """Where the notebooks' ``../runs`` points (None off Colab: the repository's ``runs/``)."""
        return os.path.join(self.workspace, "runs") if self.workspace else None


def _mount_drive(mount_point: str) -> bool:
    """Mount Google Drive at ``mount_point`` (Colab asks the user to allow it); False when it cannot be mounted."""
    try:
        from google.colab import drive as google_drive  # type: ignore[import-not-found]

        google_drive.mount(mount_point)
    except Exception as error:  # noqa: BLE001 - refused, timed out or no Drive: the runtime's disk still works
        logging.getLogger(__name__).warning(
            "Colab: Google Drive could not be mounted (%s: %s); data and runs stay in this runtime and are lost "
            "when it ends, so a later notebook will not find this one's results", type(error).__name__, error)
        return False
    return os.path.isdir(os.path.join(mount_point, "MyDrive"))


def colab_setup(workspace: str = COLAB_WORKSPACE, drive: bool | None = None, drive_folder: str = DRIVE_FOLDER,
                mount_point: str = DRIVE_MOUNT) -> ColabSetup:
    """On Colab (after the notebook's setup cell installed the kit), make the notebooks' relative paths work.

    Colab opens a notebook in /content, outside any checkout, so ``../data`` and ``../runs`` would
    point at the file system root: this moves into ``<workspace>/notebooks``. Every Colab notebook
    runs in its own runtime, whose disk is wiped when it ends, so by default (``drive`` None or True)
    the workspace is a course folder on Google Drive (``My Drive/<drive_folder>``): the model 03 trains
    is where 05 and 06 look, in their own runtimes and on later days. ``drive=False`` keeps everything
    in ``workspace`` on the runtime's disk. It also turns on the widget manager the viewers need, shows
    the kit's progress messages (:func:`show_progress`) and says where data and runs go and when the
    runtime has no GPU. Anywhere else it does nothing. The result is true exactly on Colab.
    """
    if not on_colab():
        return ColabSetup(colab=False)
    show_progress()
    log = logging.getLogger(__name__)
    on_drive = drive is not False and _mount_drive(mount_point)
    if on_drive:
        workspace = os.path.join(mount_point, "MyDrive", drive_folder)
    folder = os.path.join(workspace, "notebooks")
    os.makedirs(folder, exist_ok=True)
    os.chdir(folder)
    try:
        from google.colab import output  # type: ignore[import-not-found]

        output.enable_custom_widget_manager()
    except (ImportError, AttributeError):
        pass
    where = "on Google Drive, kept between sessions" if on_drive else "on this runtime's disk, lost when it ends"
    log.info("Colab: data in %s and runs in %s (%s)", os.path.join(workspace, "data"),
             os.path.join(workspace, "runs"), where)
    device = pick_device("auto")  # what every notebook will use: the GPU when the runtime has one
    if device.type == "cpu":
        log.warning("Colab: no GPU in this runtime, so the kit computes on the CPU (the quick defaults are fine); "
                    "for full-scale training choose Runtime > Change runtime type > GPU, then run again")
    return ColabSetup(colab=True, workspace=workspace, drive=on_drive)


# --------------------------------------------------------------------------- progress in notebooks
PROGRESS_FORMAT = "%(asctime)s %(message)s"


class _NotebookStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever ``sys.stdout`` is when a record arrives (a kernel or pytest may swap it)."""

    marker = "spleenkit-progress"

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; the property always answers stdout
        pass


def _kit_info_or_any_warning(record: logging.LogRecord) -> bool:
    """The kit's own progress lines, and warnings or errors from anyone (MONAI's chatter stays out)."""
    return record.name == "spleenkit" or record.name.startswith("spleenkit.") or record.levelno >= logging.WARNING


def show_progress(level: int = logging.INFO) -> logging.Handler:
    """Show the kit's progress messages (epochs, evaluated cases, launched commands) in the notebook's output.

    Call it once in a notebook's setup cell: the kit logs with :mod:`logging`, which a Jupyter kernel
    does not display by default, so a long cell would sit silent. The lines go to standard output,
    where JupyterLab shows them as they come and ``spleenkit notebooks run --log-output`` (papermill)
    logs them. Calling it again replaces the handler instead of doubling every line. Returns the handler.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "marker", None) == _NotebookStreamHandler.marker:
            root.removeHandler(handler)
    handler = _NotebookStreamHandler()
    handler.setFormatter(logging.Formatter(PROGRESS_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_kit_info_or_any_warning)
    root.addHandler(handler)
    logging.getLogger("spleenkit").setLevel(level)
    return handler


# --------------------------------------------------------------------------- memory of a process tree
PROC = Path("/proc")


def _parent_of_every_process(proc: Path = PROC) -> dict[int, int]:
    """Process id -> parent process id, for every process visible in /proc."""
    parents = {}
    for entry in proc.glob("[0-9]*/stat"):
        try:
            text = entry.read_text()
        except OSError:  # the process ended while we looked
            continue
        # "pid (name) state ppid ...": the name may hold spaces and parentheses, so split after the last ')'
        fields = text[text.rindex(")") + 2:].split()
        parents[int(entry.parent.name)] = int(fields[1])
    return parents


def process_tree(root: int, proc: Path = PROC) -> list[int]:
    """``root`` and all its descendants (children, grandchildren, ...), root first."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parent_of_every_process(proc).items():
        children.setdefault(parent, []).append(pid)
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def _status_kib(pid: int, keys: tuple[str, ...], proc: Path = PROC) -> dict[str, int]:
    """Fields (in KiB) of /proc/PID/status, e.g. VmRSS and VmHWM; empty when the process is gone."""
    values = {}
    try:
        with open(proc / str(pid) / "status") as status:
            for line in status:
                name, _, rest = line.partition(":")
                if name in keys:
                    values[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return values


def _command_line(pid: int, proc: Path = PROC) -> bytes | None:
    """The raw command line of a process (None when it is gone)."""
    try:
        return (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None


def _rollup_kib(pid: int, proc: Path = PROC) -> dict[str, int]:
    """The fields of /proc/PID/smaps_rollup in KiB (Rss, Pss_Anon, Anonymous ...); empty when it cannot be read."""
    values = {}
    try:
        with open(proc / str(pid) / "smaps_rollup") as rollup:
            for line in rollup:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    values[parts[0].rstrip(":")] = int(parts[1])
    except (OSError, ValueError):
        return {}
    return values


def process_tree_memory_mib(root: int, include_root: bool = True, proc: Path = PROC) -> tuple[float, float]:
    """The memory of a process tree now: (its memory with every page counted once, the largest single peak RSS), MiB.

    Anonymous memory (heaps, tensors) is each process's proportional share (``Pss_Anon``: a page two processes
    share after a fork counts once in all); the file-backed pages in memory (PyTorch's libraries: 150 MiB and
    more) are counted in full, once, as those of the process that maps most of them (torchrun's workers map the
    same libraries). Not their PSS: that divides a library page among every process on the machine mapping it,
    so the same notebook measured beside other PyTorch processes (a developer's tests, a second notebook) looked
    60-130 MiB smaller than in a fresh container, where the notebook alone maps its libraries and a memory limit
    charges them in full. Each process's own peak (VmHWM) catches a spike between two samples. Processes that
    end while being read are skipped; without the root, so are copies of it that have not yet turned into the
    program they start (a fork before its exec shows the root's memory).
    """
    anonymous = largest_files = largest_peak = 0
    root_command = None if include_root else _command_line(root, proc)
    for pid in process_tree(root, proc):
        if pid == root and not include_root:
            continue
        if root_command is not None and _command_line(pid, proc) == root_command:
            continue
        status = _status_kib(pid, ("VmRSS", "VmHWM", "RssFile"), proc)
        if not status:
            continue
        rollup = _rollup_kib(pid, proc)
        if "Pss_Anon" in rollup:
            anonymous += rollup["Pss_Anon"] + rollup.get("Pss_Shmem", 0)
            files = rollup.get("Rss", 0) - rollup.get("Anonymous", 0) - rollup.get("Pss_Shmem", 0)
        else:  # no smaps_rollup (an old kernel): the resident set
            anonymous += status.get("VmRSS", 0) - status.get("RssFile", 0)
            files = status.get("RssFile", 0)
        largest_files = max(largest_files, files)
        largest_peak = max(largest_peak, status.get("VmHWM", 0))
    return round((anonymous + largest_files) / 1024, 1), round(largest_peak / 1024, 1)


class PeakMemory:
    """Sample a process tree's memory in a background thread while a block runs; ``peak_mib`` after it.

    ``with PeakMemory(include_root=False) as memory: run_a_notebook()`` measures the kernel this process
    starts and every process the kernel starts in turn (torchrun and its workers), not this process.
    The peak is the larger of the highest sampled sum (every page counted once, see
    :func:`process_tree_memory_mib`) and the highest single-process peak; None where /proc does not exist (macOS).
    """

    def __init__(self, root: int | None = None, include_root: bool = True, interval_s: float = 0.2,
                 proc: Path = PROC, also: Callable[[], None] | None = None) -> None:
        self.also = also  # called at every sample too (a memory cgroup noting its resident memory)
        self.root = os.getpid() if root is None else root
        self.include_root = include_root
        self.interval_s = interval_s
        self.proc = proc
        self.peak_mib: float | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spleenkit-peak-memory", daemon=True)

    def sample(self) -> None:
        """Take one sample now."""
        total, single = process_tree_memory_mib(self.root, self.include_root, self.proc)
        self.peak_mib = max(self.peak_mib or 0.0, total, single)
        if self.also is not None:
            self.also()
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if (self.proc / str(self.root)).is_dir():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.sample()  # whatever still runs now



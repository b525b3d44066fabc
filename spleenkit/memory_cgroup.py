"""Run processes under a memory limit the way Binder and containers enforce one: a Linux memory cgroup.

A cgroup (version 1 memory controller, ``/sys/fs/cgroup/memory``) charges every page its processes
bring into memory: their heaps, and the page cache of the files they read, write or map (the shared
libraries of PyTorch included). At the limit the kernel first reclaims page cache; when nothing more
can be reclaimed it kills a process of the group (an OOM kill), which is what a Binder session does to
a notebook kernel that grows past its 2 GiB.

:class:`MemoryCgroup` makes such a group, puts the processes that join it under the limit, and reads
back, for each window of time (one notebook), the kernel's own figures: the highest charge
(``memory.max_usage_in_bytes``), the charges that failed at the limit (``memory.failcnt``) and the OOM kills
(``memory.oom_control``), and, sampled, what it holds that it cannot drop like file cache. Between windows it
empties the group (``memory.force_empty``), and :func:`drop_cached_libraries` drops the cached pages of the
environment's libraries that no process maps, so the next window is charged for every library page it loads,
as a fresh container would be. A page is charged to the group that first brought it in: a library page that a
process outside the group maps (a developer's tests on the same environment) is not charged to it, so a
measurement made there is lower.

Creating a group needs root and a writable cgroup v1 memory hierarchy (as on CI machines and in many
containers); :func:`cgroup_unavailable` says why it cannot be used elsewhere (macOS, cgroup v2 only,
not root), and callers skip the limit with that reason.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spleenkit.errors import BadInputError

log = logging.getLogger(__name__)

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
MIB = 2**20
_UNITS = {"": 1, "b": 1, **{unit + tail: 2**(10 * power) for power, unit in ((1, "k"), (2, "m"), (3, "g"))
                            for tail in ("", "b", "i", "ib")}}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)

#: How a process joins a group before it becomes the program it runs: write its own id into the group's
#: ``cgroup.procs``, then exec. Used as ``python -c JOIN_AND_EXEC PROCS_FILE PROGRAM ARG...`` (a kernel spec's
#: argv): nothing of the kit is imported, so the joining process holds no memory of its own.
JOIN_AND_EXEC = ("import os, sys\n"
                 "with open(sys.argv[1], 'w') as procs:\n"
                 "    procs.write(str(os.getpid()))\n"
                 "os.execv(sys.argv[2], sys.argv[2:])")


def parse_size(text: str | int) -> int:
    """Bytes from ``1800M``, ``1.75G``, ``2GiB`` or a plain number of bytes; a clear error otherwise.

    Units are binary (``M``, ``MB`` and ``Mi`` all mean MiB), as Binder and Kubernetes state limits (``2Gi``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _SIZE.match(str(text))
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _UNITS:
            raise BadInputError(f"{text!r}: not a memory size; write it like 1800M, 1.75G or 2GiB")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size < 64 * MIB:
        raise BadInputError(f"{text!r}: a memory limit below 64 MiB cannot hold a Python process")
    return size


def cgroup_unavailable(root: Path | None = None) -> str | None:
    """Why a memory cgroup cannot be made under ``root`` (default :data:`CGROUP_V1_MEMORY`; None when it can): not
    Linux, no cgroup v1 memory controller (a machine with cgroup v2 only), or no permission to create groups."""
    root = CGROUP_V1_MEMORY if root is None else Path(root)
    if not sys.platform.startswith("linux"):
        return f"memory cgroups are Linux's; this is {sys.platform}"
    if not (root / "memory.limit_in_bytes").is_file():
        return f"no cgroup v1 memory controller at {root} (cgroup v2 only, or not mounted)"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (creating a memory cgroup needs root)"
    return None


def drop_cached_libraries(*folders: str | os.PathLike[str]) -> int:
    """Drop from memory the cached pages of the shared libraries (``*.so*``) under ``folders`` that no process maps now
    (``posix_fadvise(DONTNEED)``; nothing is deleted): the next process to load them reads them again and its cgroup
    is charged for them, as in a fresh container, and not the process that happened to read them first (pip, when
    it installed them). Pages another process maps stay where they are. Returns the number of files advised."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    advised = 0
    for folder in dict.fromkeys(Path(f).resolve() for f in folders):
        for path in folder.rglob("*.so*"):
            try:
                if not path.is_file():
                    continue
                descriptor = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
                advised += 1
            except OSError:
                pass
            finally:
                os.close(descriptor)
    return advised


@dataclass
class MemoryWindow:
    """What a memory cgroup saw in one window of time (one notebook), in MiB: the highest charge (heaps and the page
    cache of every file read, written or mapped: the Python modules imported, the data, the checkpoints written;
    at the limit the kernel reclaims that cache, so this figure can reach the limit harmlessly), the charges that
    failed at the limit (``memory.failcnt``), the highest resident memory the group could
    not give back without swapping or reloading (heaps, mapped libraries, shared memory: ``rss + mapped_file +
    shmem`` of ``memory.stat``, sampled; None when not sampled), and the processes killed for memory (OOM kills:
    what a Binder session does to a notebook that does not fit)."""

    limit_mib: float
    max_usage_mib: float
    failcnt: int
    oom_kills: int
    resident_mib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


def own_memory_cgroup(root: Path | None = None, proc_cgroup: Path = Path("/proc/self/cgroup")) -> Path:
    """The folder of this process's own memory cgroup under ``root`` (``root`` itself where it cannot be read):
    a new group goes below it, so that whatever limit and accounting this process is under still covers it."""
    root = CGROUP_V1_MEMORY if root is None else Path(root)
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                folder = root / path.lstrip("/")
                return folder if folder.is_dir() else root
    except (OSError, ValueError):
        pass
    return root


class MemoryCgroup:
    """A cgroup v1 memory group with a limit, for the processes that join it (and their children).

    ``with MemoryCgroup(parse_size("1800M")) as group:`` creates ``spleenkit-<id>`` with the limit, below this
    process's own memory cgroup (:func:`own_memory_cgroup`; ``root`` names another parent);
    a process joins by writing its id into ``group.procs_file`` (see :data:`JOIN_AND_EXEC`). Around each
    measured window call :meth:`start_window` (empties the group and resets its counters) and
    :meth:`end_window` (reads them). On exit the group is emptied and removed.
    """

    def __init__(self, limit_bytes: int, root: Path | None = None, name: str | None = None) -> None:
        self.limit_bytes = int(limit_bytes)
        self.root = own_memory_cgroup() if root is None else Path(root)
        self.path = self.root / (name or f"spleenkit-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._oom_kills_before = 0
        self._resident_peak: int | None = None

    @property
    def procs_file(self) -> Path:
        """The file a process writes its id into to join the group."""
        return self.path / "cgroup.procs"

    def _write(self, name: str, value: str | int) -> None:
        (self.path / name).write_text(str(value))

    def _read_int(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    def create(self) -> MemoryCgroup:
        """Make the group and set its limit; swap, where the machine has it, may not go beyond it either."""
        reason = cgroup_unavailable(self.root)
        if reason:
            raise BadInputError(f"{self.root}: cannot make a memory cgroup: {reason}")
        self.path.mkdir()
        try:
            self._write("memory.limit_in_bytes", self.limit_bytes)
            if (self.path / "memory.memsw.limit_in_bytes").exists():  # memory + swap: no escape into swap
                try:
                    self._write("memory.memsw.limit_in_bytes", self.limit_bytes)
                except OSError:  # swap accounting off: nothing to hold
                    pass
        except BaseException:
            self.path.rmdir()
            raise
        log.info("memory cgroup %s with a limit of %.0f MiB", self.path, self.limit_bytes / MIB)
        return self

    def tasks(self) -> list[int]:
        """The processes in the group now."""
        try:
            return [int(line) for line in self.procs_file.read_text().split()]
        except OSError:
            return []

    def oom_kills(self) -> int:
        """OOM kills in the group since it was made (``oom_kill`` of ``memory.oom_control``)."""
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def empty(self) -> bool:
        """Reclaim every page charged to the group (its page cache is dropped, written back first where dirty),
        so that the next window is charged for what it touches; only possible while no process is in it."""
        if self.tasks():
            return False
        try:
            self._write("memory.force_empty", 0)
        except OSError as error:
            log.warning("could not empty memory cgroup %s: %s", self.path, error)
            return False
        return True

    def resident_bytes(self) -> int:
        """Memory the group holds now that it cannot drop like file cache: anonymous memory, mapped files
        (libraries) and shared memory (``total_rss + total_mapped_file + total_shmem`` of ``memory.stat``)."""
        stat = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            stat[key] = int(value)
        return sum(stat.get(f"total_{key}", 0) for key in ("rss", "mapped_file", "shmem"))

    def sample(self) -> None:
        """Note the resident memory now (its highest value in the window is ``resident_mib``)."""
        try:
            resident = self.resident_bytes()
        except (OSError, ValueError):
            return
        self._resident_peak = max(self._resident_peak or 0, resident)

    def start_window(self) -> None:
        """Empty the group and reset its high-water mark and failure count: a new measured window starts."""
        self.empty()
        self._write("memory.max_usage_in_bytes", 0)
        self._write("memory.failcnt", 0)
        self._oom_kills_before = self.oom_kills()
        self._resident_peak = None

    def end_window(self) -> MemoryWindow:
        """The figures of the window since :meth:`start_window`."""
        return MemoryWindow(limit_mib=round(self.limit_bytes / MIB, 1),
                            max_usage_mib=round(self._read_int("memory.max_usage_in_bytes") / MIB, 1),
                            failcnt=self._read_int("memory.failcnt"),
                            oom_kills=self.oom_kills() - self._oom_kills_before,
                            resident_mib=None if self._resident_peak is None else round(self._resident_peak / MIB, 1))

    def remove(self) -> None:
        """Empty and remove the group; processes still in it are moved to the parent group first."""
        if not self.path.is_dir():
            return
        for pid in self.tasks():  # a kernel's stray child: out of the group, not killed
            try:
                (self.root / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass
        self.empty()
        try:
            self.path.rmdir()
        except OSError as error:
            log.warning("could not remove memory cgroup %s: %s", self.path, error)

    def __enter__(self) -> MemoryCgroup:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()

"""Running a child process the way a notebook needs it: its lines streamed as they come, the whole output kept,
and the child with every process it started stopped on a timeout or an interrupt (a stopped notebook cell must
not leave torchrun's workers or a bundle run behind).

The one runner for :func:`spleenkit.bundle.run_command` and :func:`spleenkit.distributed.launch_torchrun`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: ``echo`` of :func:`run_streaming`: True writes each line to ``sys.stdout``, a function receives each line,
#: False (or None) stays silent.
Echo = bool | Callable[[str], Any] | None


@dataclass(frozen=True)
class ChildResult:
    """How a child process ended: its exit status, everything it wrote, and whether it was stopped for taking
    longer than allowed."""

    args: list[str]
    returncode: int
    output: str
    timed_out: bool


def run_streaming(args: Sequence[str], *, cwd: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str] | None = None, timeout_s: float | None = None,
                  echo: Echo = True, grace_s: float = 15.0) -> ChildResult:
    """Run ``args`` in a new process group, stdout and stderr as one stream of lines, and wait for it.

    Each line is echoed as it comes (``echo``) and kept. After ``timeout_s`` seconds, or when this process is
    interrupted (KeyboardInterrupt in a notebook), the child's whole process group gets SIGTERM and, after
    ``grace_s``, SIGKILL; an interrupt is raised again once the group is stopped.
    """
    process = subprocess.Popen(list(args), cwd=cwd, env=None if env is None else dict(env), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    lines: list[str] = []
    show = (lambda line: sys.stdout.write(line)) if echo is True else (echo or None)
    reader = threading.Thread(target=_read_lines, args=(process, lines, show), daemon=True)
    reader.start()
    timed_out = False
    try:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_process_group(process, grace_s)
        reader.join(timeout=10)
    except BaseException:  # an interrupted notebook cell takes the child (and what it started) down too
        stop_process_group(process, grace_s)
        raise
    return ChildResult(list(args), process.returncode, "".join(lines), timed_out)


def _read_lines(process: subprocess.Popen[str], lines: list[str], echo: Callable[[str], Any] | None) -> None:
    """Collect (and echo) the child's output as it comes."""
    if process.stdout is None:
        return
    for line in process.stdout:
        lines.append(line)
        if echo is not None:
            echo(line)


def stop_process_group(process: subprocess.Popen[str], grace_s: float = 15.0) -> None:
    """SIGTERM the child's whole process group (torchrun forwards it to its workers), SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

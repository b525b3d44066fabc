"""Reading and writing files: the one atomic writer every file the kit writes goes through.

A file is written under a temporary name unique to the call in the target's folder, flushed to
disk (fsync), optionally checked, and only then renamed over the target, so a crash, a full disk
or a failed check never leaves a half-written file or replaces a good one. New files get the
normal permissions of the user's umask (0666 minus umask), as a plain ``open()`` would give.

A temporary name records its writer (host and process id), so the temporaries a killed process left
behind are recognised and removed by the next write to the same place; a fault of the disk (read-only,
full, no permission) is one :class:`~spleenkit.errors.BadInputError` naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from spleenkit.errors import BadInputError, os_error

log = logging.getLogger(__name__)

#: A temporary of an earlier version of the kit (no writer recorded) is stale after this many seconds.
UNTAGGED_STALE_AFTER_S = 3600.0
# ".NAME.<host>-<pid>-<12 hex>.tmp..." (this version) or ".NAME.<12 hex>.tmp..." / mkdtemp's 8 characters
_TAGGED = re.compile(r"(?P<host>[A-Za-z0-9]{1,16})-(?P<pid>\d+)-[0-9a-f]{12}\.(?:tmp|old)")
_UNTAGGED = re.compile(r"(?:[0-9a-f]{12}|[a-z0-9_]{8})\.(?:tmp|old)")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"


def temporary_name(path: str | os.PathLike[str], suffix: str = ".tmp") -> Path:
    """A fresh hidden name beside ``path`` (same folder, so the final rename is atomic) that records the
    writing host and process, so that :func:`clean_stale_temporaries` knows when its writer is gone."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}-{secrets.token_hex(6)}{suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def is_stale_temporary(candidate: Path, target: Path) -> bool:
    """True for a temporary file or folder of ``target`` whose writer is gone: written on this host by a process
    that no longer runs, or (untagged, by an earlier version) untouched for :data:`UNTAGGED_STALE_AFTER_S`."""
    prefix = f".{target.name}."
    if not candidate.name.startswith(prefix) or candidate.is_symlink():
        return False
    rest = candidate.name[len(prefix):]
    tagged = _TAGGED.match(rest)
    if tagged:
        return tagged["host"] == _host() and not _alive(int(tagged["pid"]))
    if _UNTAGGED.match(rest):
        try:
            return time.time() - candidate.stat().st_mtime > UNTAGGED_STALE_AFTER_S
        except OSError:
            return False
    return False


def clean_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed writes of ``path`` left beside it (hidden temporary files, staging folders, and the
    data files an exporter wrote next to them); return what was removed."""
    import glob

    path = Path(path)
    removed = []
    for candidate in path.parent.glob(glob.escape(f".{path.name}.") + "*"):
        if not is_stale_temporary(candidate, path):
            continue
        with contextlib.suppress(OSError):
            if candidate.is_dir():
                shutil.rmtree(candidate)
            else:
                candidate.unlink()
            removed.append(candidate)
    if removed:
        log.info("%s: removed %d temporary file(s) left by an earlier write that was killed", path, len(removed))
    return removed


# --------------------------------------------------------------------------- interrupts wait for a whole file
_held = 0  # writes in progress on the main thread
_pending: list[BaseException] = []


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold an interrupt delivered through :func:`interrupt` (the command line's Ctrl-C and SIGTERM) while a file
    is written, and raise it as soon as the write is over: a stop never tears a checkpoint or a mask in half."""
    global _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending:
            raise _pending.pop()


def interrupt(error: BaseException) -> None:
    """Raise ``error`` (KeyboardInterrupt, :class:`~spleenkit.errors.Terminated`) now, or, while a file is being
    written, when that write is over. Signal handlers call it."""
    if _held:
        _pending[:] = [error]
        return
    raise error


def _uninterrupted(function: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``function`` under :func:`held_interrupts`."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with held_interrupts():
            return function(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *,
                 check: Callable[[Path], None] | None = None, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on success fsync it, run ``check(temporary_path)`` and rename it
    over ``path``. On any error (the writer's or the check's) the temporary file is removed and ``path``
    keeps its old content. An interrupt waits until the write is over (:func:`held_interrupts`).

    ``mode`` is "wb" or "w" (text, UTF-8 unless ``encoding`` says otherwise). The folder is created.
    """
    with held_interrupts(), _atomic_write(path, mode, check=check, encoding=encoding) as stream:
        yield stream


@contextlib.contextmanager
def _atomic_write(path: str | os.PathLike[str], mode: str, *, check: Callable[[Path], None] | None,
                  encoding: str | None) -> Iterator[IO[Any]]:
    if mode not in {"w", "wb"}:
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    temporary = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path)
        # O_EXCL: a fresh file of our own; 0o666 minus the umask, like open() (mkstemp would give 0600)
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise os_error(error, path.parent, "cannot write here") from error
    try:
        text = mode == "w"
        with os.fdopen(handle, mode, encoding=(encoding or "utf-8") if text else None,
                       newline="" if text else None) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as error:  # a full or read-only disk while writing: the old file stays
        temporary.unlink(missing_ok=True)
        raise os_error(error, path, "cannot write") from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _replace_checked(temporary, path, check)


def _replace_checked(temporary: Path, path: Path, check: Callable[[Path], None] | None) -> None:
    """The last step of every write: run ``check`` on the flushed temporary file, rename it over ``path`` and
    make the rename durable; on a failed check the temporary file goes and ``path`` keeps its content."""
    try:
        if check is not None:
            check(temporary)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise os_error(error, path, "cannot write") from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """fsync a folder so that a rename in it survives a power cut (where the OS allows it)."""
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, check: Callable[[Path], None] | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); returns the path."""
    with atomic_write(path, "wb", check=check) as stream:
        stream.write(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, *, check: Callable[[Path], None] | None = None) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", check=check) as stream:
        stream.write(text)
    return Path(path)


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, so that every JSON reader accepts the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int = 2) -> Path:
    """Write ``data`` as JSON (insertion order, a final newline; NaN and infinity as null) atomically."""
    return write_text(path, json.dumps(json_safe(data), indent=indent, default=str, allow_nan=False) + "\n")


@_uninterrupted
def write_with(path: str | os.PathLike[str], writer: Callable[[Path], Any], *,
               check: Callable[[Path], None] | None = None) -> Path:
    """Atomically create ``path`` with a library that writes to a file name itself (nibabel, matplotlib,
    torch.onnx): ``writer(temporary_path)`` writes, ``check`` may inspect it, then it is renamed into place.

    The temporary name keeps ``path``'s suffixes (``.nii.gz``, ``.png``) so that such libraries pick the
    right format from it.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    temporary = temporary_name(path, f".tmp{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path)
    except OSError as error:
        raise os_error(error, path.parent, "cannot write here") from error
    try:
        writer(temporary)
        if not temporary.is_file():
            raise RuntimeError(f"the writer made no file for {path.name}")
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise os_error(error, path, "cannot write") from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _replace_checked(temporary, path, check)
    return path


@_uninterrupted
def write_with_companions(path: str | os.PathLike[str], writer: Callable[[Path], Any], *,
                          check: Callable[[Path], None] | None = None) -> list[Path]:
    """Atomically create ``path`` with a library that may write companion files beside it, named after it and
    referred to by name from inside it (ONNX's external weights, ``NAME.data``).

    ``writer(staging / NAME)`` writes into a private hidden folder beside ``path``; ``check`` runs on the file
    there; then each companion and last ``path`` itself are renamed into place, so ``path`` never refers to a
    companion that is not there yet. Returns the paths placed, ``path`` first. On failure nothing is replaced
    and the staging folder goes (a killed write's staging folder is removed by the next write).
    """
    path = Path(path)
    staging = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path)
        staging.mkdir(0o777)
    except OSError as error:
        raise os_error(error, path.parent, "cannot write here") from error
    try:
        main = staging / path.name
        writer(main)
        if not main.is_file():
            raise RuntimeError(f"the writer made no file for {path.name}")
        written = sorted(staging.iterdir(), key=lambda item: item != main)  # path first
        for item in written:
            with open(item, "rb+") as stream:
                os.fsync(stream.fileno())
        if check is not None:
            check(main)
        for item in reversed(written):  # companions first, the file that names them last
            os.replace(item, path.parent / item.name)
    except OSError as error:
        raise os_error(error, path, "cannot write") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _sync_folder(path.parent)
    return [path.parent / item.name for item in written]


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` and prove a file can be written in it, before any work is done."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BadInputError("the output folder is not writable: a file has its name", folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise os_error(error, folder, "the output folder is not writable") from error
    return folder

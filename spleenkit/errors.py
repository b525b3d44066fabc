"""The kit's exception types: errors a user can act on, each naming the file or value at fault.

:func:`user_error` is the one place that turns faults of the machine (a read-only or full disk, a
missing permission, memory running out) into such an error, so that every command ends them with the
same one line, ``spleenkit: error: <path>: <why>``.
"""

from __future__ import annotations

import errno
import os
from os import PathLike


class SpleenkitError(Exception):
    """Base class of every error the kit raises on purpose; the CLI prints it as one line."""


class BadInputError(SpleenkitError, ValueError):
    """Input the kit cannot use: a bad file, folder, option value or checkpoint.

    The message always names what is wrong; ``path`` holds the offending file when there is one.
    """

    def __init__(self, message: str, path: str | PathLike[str] | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ChecksumError(BadInputError):
    """A downloaded or given file whose checksum differs from the pinned one."""


class NoSegmentation(BadInputError):
    """The source series lacks something a DICOM Segmentation must copy from it and that cannot be derived."""


class NonFiniteTrainingError(SpleenkitError):
    """Training produced a NaN or infinite loss or weights; the message names the epoch and iteration."""


class DistributedRunError(SpleenkitError):
    """A multi-process job that ended with a non-zero exit; the message names the failing rank."""

    def __init__(self, message: str, returncode: int, output: str = "") -> None:
        self.returncode, self.output = returncode, output
        super().__init__(message)


class NotebookRunError(SpleenkitError):
    """A notebook failed under the runner; the message shows the failing cell and its traceback."""


class ExerciseFailed(SpleenkitError):
    """Strict mode: an answer was wrong or missing (in an instructor copy, a solution that no longer works)."""


class PretrainedUnavailableError(SpleenkitError):
    """The official weights could not be downloaded (offline, blocked, or the source is down)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``kill`` and ``timeout`` send), raised where SIGINT raises KeyboardInterrupt, so that every
    run stops the same way: what finished is kept and described."""


#: What each fault of the machine means for the user, by errno (others: the system's own words).
_OS_REASONS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EEXIST: "already exists",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EMFILE: "too many open files",
}


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none (``str(error)`` can be
    empty, e.g. for an empty file read by torch)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def os_error(error: OSError, path: str | PathLike[str] | None = None, doing: str = "") -> BadInputError:
    """An OSError as a one-line :class:`BadInputError` naming ``path`` (else the error's own file name)."""
    reason = _OS_REASONS.get(error.errno or -1) or error.strerror or first_line(error)
    target = path if path is not None else error.filename
    return BadInputError(f"{doing}{' (' + reason + ')' if doing else reason}",
                         None if target is None else os.fsdecode(target))


def user_error(error: BaseException) -> SpleenkitError | None:
    """The one-line error a user sees for ``error``: the kit's own errors as they are, an OSError naming its
    path and the reason (read-only, full disk, exists, permission ...), running out of memory; None for a
    fault that is a bug (the traceback is then the useful report)."""
    if isinstance(error, SpleenkitError):
        return error
    if isinstance(error, OSError):
        return os_error(error)
    out_of_memory = type(error).__name__ == "OutOfMemoryError" or (  # torch's, CUDA and CPU
        isinstance(error, RuntimeError) and "not enough memory" in str(error))
    if isinstance(error, MemoryError) or out_of_memory:
        detail = first_line(error)
        return SpleenkitError("out of memory" + ("" if detail == "MemoryError" else f" ({detail})")
                              + ": use smaller inputs, a smaller patch or cache rate, or a machine with more memory")
    return None

"""The kit's exception types: errors a user can act on, each naming the file or value at fault."""

from __future__ import annotations

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

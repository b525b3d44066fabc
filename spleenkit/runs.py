"""Run folders: their layout, a lock so that only one run writes a folder, and moving an earlier run aside.

A run folder is the contract between every step (see the README). Two runs writing one folder at
once would mix their metrics and overwrite each other's model, so a run holds an OS-level lock
(``fcntl.flock`` on ``run.lock``, which records the pid, host and start time) for as long as it
writes. The OS releases the lock when a process dies, so a lock file left by a killed run is
taken over with a warning; a live holder is named in the error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from spleenkit.errors import BadInputError, os_error
from spleenkit.io import check_writable
from spleenkit.manifest import read_manifest
from spleenkit.presets import Preset, get_preset

log = logging.getLogger(__name__)

MODEL_NAME = "model.pt"
CHECKPOINT_NAME = "checkpoint_last.pt"
METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = "run.lock"
EVALUATION_DIR = "evaluation"
PREDICTIONS_DIR = "predictions"
#: What a run writes; a fresh run moves these into ``previous-<time>/`` instead of overwriting them.
RUN_FILES = (METRICS_NAME, CHECKPOINT_NAME, MODEL_NAME, MANIFEST_NAME)
#: The folders of a run that describe its model; a fresh run moves them aside with its files (a new model beside
#: the old model's evaluation and predictions would be silently wrong).
RUN_FOLDERS = (TENSORBOARD_DIR, EVALUATION_DIR, PREDICTIONS_DIR)


# --------------------------------------------------------------------------- the lock
class RunLock:
    """An exclusive lock on a folder, held while a run writes it (use as a context manager).

    ``RunLock(folder).acquire()`` raises :class:`BadInputError` naming the holder (pid, host, start
    time) when another live process holds it.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._stream: IO[str] | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise naming who holds it."""
        import fcntl

        while True:
            try:
                stream = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
            except OSError as error:
                raise os_error(error, self.path, "cannot create the run lock") from error
            try:
                fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # no locks on this file system
                    log.warning("%s: cannot lock the run folder here (%s); make sure no other run writes it",
                                self.folder, error.strerror or error)
                    break
                holder = _read_holder(stream)
                stream.close()
                raise BadInputError(f"another run is writing this folder ({describe_holder(holder)}); wait for it "
                                    "to finish, or choose another --out", self.folder) from None
            # the file may have been removed (released) between open() and flock(): then lock the new one
            try:
                same = os.fstat(stream.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            stream.close()
        earlier = _read_holder(stream)
        if earlier:
            log.warning("%s: taking over a stale lock left by a run that ended without releasing it (%s)",
                        self.folder, describe_holder(earlier))
        stream.seek(0)
        stream.truncate()
        stream.write(json.dumps(holder_info()) + "\n")
        stream.flush()
        self._stream = stream
        return self

    def release(self) -> None:
        """Remove the lock file and let go of the lock."""
        if self._stream is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._stream.close()
        self._stream = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_info() -> dict[str, Any]:
    """What a lock records about the process holding it."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def _read_holder(stream: IO[str]) -> dict[str, Any]:
    stream.seek(0)
    try:
        holder = json.loads(stream.read() or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """'pid 123 on host h since 2026-...' from a lock's record (or 'an unknown process')."""
    if not holder:
        return "an unknown process"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"


def read_lock(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record of the run holding ``folder``'s lock, or None when no live process holds it."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as stream:
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(stream)  # type: ignore[arg-type]
        fcntl.flock(stream.fileno(), fcntl.LOCK_UN)
    return None


# --------------------------------------------------------------------------- the folder
def prepare_run_dir(run_dir: str | os.PathLike[str], resume: bool = False) -> Path:
    """Create the run folder and check it is writable.

    A fresh run in a folder that holds an earlier run moves that run's files into a
    ``previous-<time>`` subfolder, so that a repeated command never destroys a trained model.
    Call it while holding the folder's :class:`RunLock` (as :func:`spleenkit.training.train` does).
    """
    run_dir = check_writable(run_dir)
    for stale in run_dir.glob(".*.tmp"):  # left by a process killed while saving
        stale.unlink(missing_ok=True)
    if not resume:
        move_earlier_run_aside(run_dir)
    return run_dir


def move_earlier_run_aside(run_dir: str | os.PathLike[str]) -> Path | None:
    """Move an earlier run into ``previous-<time>/`` whole: its files (model, checkpoint, metrics, manifest) and
    folders (TensorBoard, evaluation, predictions); return that folder, or None when there was nothing to move."""
    run_dir = Path(run_dir)
    old = [run_dir / name for name in (*RUN_FILES, *RUN_FOLDERS) if (run_dir / name).exists()]
    if not old:
        return None
    keep = run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    suffix = 1
    while keep.exists():
        keep = keep.with_name(f"{keep.name.split('.')[0]}.{suffix}")
        suffix += 1
    keep.mkdir()
    for path in old:
        path.rename(keep / path.name)
    log.warning("%s held an earlier run: its files were moved to %s (pass resume=True / --resume to "
                "continue a run instead)", run_dir, keep)
    return keep


def resume_problems(run_dir: str | os.PathLike[str]) -> list[str]:
    """What a resume of ``run_dir`` lacks (empty when it can resume): a complete ``checkpoint_last.pt`` (the
    weights, optimiser and epoch to continue from) and a readable ``manifest.json`` naming the run's recipe
    (without it a changed recipe could not be noticed). Cheap: the checkpoint is not loaded here."""
    import zipfile

    run_dir = Path(run_dir)
    checkpoint, manifest = run_dir / CHECKPOINT_NAME, run_dir / MANIFEST_NAME
    problems = []
    if not checkpoint.is_file():
        problems.append(f"{checkpoint} is missing (no epoch was saved, or it was removed)")
    elif checkpoint.stat().st_size == 0 or not zipfile.is_zipfile(checkpoint):
        problems.append(f"{checkpoint} is corrupt or truncated (the run was killed while saving it?)")
    if not manifest.is_file():
        problems.append(f"{manifest} is missing, so the run's recipe is unknown")
    else:
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8")).get("parameters", {}).get("preset")
        except (OSError, ValueError, AttributeError) as error:
            problems.append(f"{manifest} is unreadable ({type(error).__name__}), so the run's recipe is unknown")
        else:
            if not isinstance(recorded, dict) or not recorded.get("name"):
                problems.append(f"{manifest} names no recipe")
    return problems


def decide_resume(run_dir: str | os.PathLike[str], resume: bool, start_afresh: bool = False) -> bool:
    """Whether a run continues the one in ``run_dir``. A resume needs a usable checkpoint and manifest
    (:func:`resume_problems`); without them it is refused, naming what is missing, unless ``start_afresh``:
    then the run starts from the first epoch and :func:`prepare_run_dir` moves the earlier run aside whole."""
    if not resume:
        return False
    problems = resume_problems(run_dir)
    if not problems:
        return True
    if not start_afresh:
        raise BadInputError(f"cannot resume: {'; '.join(problems)}. Pass --start-afresh (start_afresh=True) to "
                            "train from the first epoch (the earlier run is moved aside whole), or train into a new "
                            "--out", run_dir)
    log.warning("%s: nothing usable to resume (%s); starting afresh", run_dir, "; ".join(problems))
    return False


def holds_files(folder: str | os.PathLike[str], ignore: tuple[str, ...] = (LOCK_NAME,)) -> bool:
    """True when ``folder`` or a folder under it holds a file (other than ``ignore``)."""
    return any(path.is_file() and path.name not in ignore for path in Path(folder).rglob("*"))


@contextlib.contextmanager
def output_folder(folder: str | os.PathLike[str], *, lock: bool = False) -> Iterator[Path]:
    """Use ``folder`` for a command's output (optionally under a :class:`RunLock`); if the command fails
    and the folder did not exist before and holds no file, remove it: a failed run leaves no empty folder."""
    import shutil

    folder = Path(folder)
    created = None  # the outermost folder this call creates
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        created = candidate
    holder = None
    try:
        if lock:
            if folder.exists() and not folder.is_dir():
                raise BadInputError("the output folder is not writable: a file has its name", folder)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise os_error(error, folder, "the output folder is not writable") from error
            holder = RunLock(folder).acquire()
        yield folder
    except BaseException:
        if holder is not None:
            holder.release()
            holder = None
        if created is not None and created.is_dir() and not holds_files(created):
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        if holder is not None:
            holder.release()


def run_preset(run_dir: str | os.PathLike[str], fallback: Preset | str = "seed") -> Preset:
    """The preset a run was trained with, read from its manifest (``parameters.preset``), else ``fallback``."""
    recorded = recorded_preset(run_dir)
    return get_preset(fallback) if recorded is None else recorded


def recorded_preset(run_dir: str | os.PathLike[str]) -> Preset | None:
    """The preset a run folder's manifest records (``parameters.preset``), or None when there is no readable
    manifest naming one (a manifest naming a preset this version cannot rebuild: None, with a warning)."""
    try:
        parameters = read_manifest(run_dir).get("parameters", {})
        stored = parameters.get("preset") if isinstance(parameters, dict) else None
    except (OSError, ValueError, AttributeError):
        return None
    try:
        if isinstance(stored, str):
            return get_preset(stored)
        if isinstance(stored, dict) and stored.get("name"):
            return Preset.from_dict(stored)
    except BadInputError as error:
        log.warning("%s: the run's manifest names a preset that cannot be rebuilt (%s)", run_dir, error)
    return None


def read_metrics(source: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The epochs recorded in ``metrics.jsonl`` (given directly, or the run folder holding it); none yet: [].

    One policy for every reader: a torn last line (a run killed while writing it) is skipped with a
    warning; a line that is not JSON anywhere else means the file was damaged, an error naming the line.
    """
    path = Path(source)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                log.warning("%s: the last line is unfinished (a run stopped while writing it); skipped", path)
                continue
            raise BadInputError(f"line {number} is not JSON ({error.msg}): the file is damaged", path) from error
    return records


def summarize_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """One row describing a run folder, from its manifest and metrics: the recipe's main settings, where
    the weights started, the epochs, the best validation Dice and its epoch, the last loss and the time.

    Rows of several runs make the table that compares them (notebooks 07 and 08); a folder without a
    manifest is a :class:`~spleenkit.errors.BadInputError` naming it.
    """
    run_path = Path(run_dir)
    if not (run_path / "manifest.json").is_file():
        raise BadInputError("no manifest.json: not a run folder, or its training has not started", run_path)
    manifest = read_manifest(run_path)
    parameters = manifest.get("parameters", {})
    preset = parameters.get("preset", {})
    records = read_metrics(run_path)
    validated = [r for r in records if r.get("val_dice") is not None]
    best = max(validated, key=lambda r: r["val_dice"]) if validated else None
    patch = preset.get("patch_size")
    init = parameters.get("init_weights")
    return {
        "run": run_path.name,
        "preset": preset.get("name"),
        "patch": "x".join(str(int(n)) for n in patch) if patch else None,
        "loss": preset.get("loss"),
        "learning rate": preset.get("learning_rate"),
        "start": "random" if not init else f"{Path(init).parent.name}/{Path(init).name}",
        "epochs": len(records),
        "best val Dice": None if best is None else round(float(best["val_dice"]), 4),
        "best epoch": None if best is None else int(best["epoch"]),
        "last loss": round(float(records[-1]["loss"]), 4) if records else None,
        "seconds": round(float(records[-1].get("elapsed", 0.0)), 1) if records else None,
        "validation cases": len(manifest.get("dataset", {}).get("validation_cases", [])),
    }

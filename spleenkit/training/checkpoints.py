"""Checkpoints and resume: reading ``checkpoint_last.pt`` back and checking it, restoring a trainer from it,
and refusing to resume a run with another recipe (the differences listed) unless asked to.

The checkpoint itself is written at every epoch end by :class:`spleenkit.training.handlers.RunRecorder`, in the
format :data:`CHECKPOINT_FORMAT` names.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleenkit.distributed import broadcast_object, is_main_process, unwrap_model
from spleenkit.errors import BadInputError
from spleenkit.io import write_text
from spleenkit.manifest import read_manifest
from spleenkit.model import load_checkpoint
from spleenkit.presets import Preset
from spleenkit.runs import CHECKPOINT_NAME, METRICS_NAME, read_metrics

if TYPE_CHECKING:
    from monai.engines import SupervisedTrainer

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
#: Preset settings that may change when a run is resumed; any other change is refused (see check_resume_recipe).
RESUMABLE_SETTINGS = frozenset({"description", "epochs", "validation_interval", "cache_rate", "amp",
                                "sliding_window_batch_size", "channels_last", "extra"})
_CHECKPOINT_KEYS = ("format", "model", "optimizer", "scheduler", "scaler", "epoch", "iteration",
                    "best_metric", "best_metric_epoch")


def read_last_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``checkpoint_last.pt`` safely (weights_only) and check it is complete before anything is restored."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise BadInputError("not a training checkpoint (expected a dict)", path)
    missing = [key for key in _CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise BadInputError(f"incomplete training checkpoint: missing {', '.join(missing)}", path)
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise BadInputError(f"checkpoint format {checkpoint['format']} is not the supported {CHECKPOINT_FORMAT}",
                            path)
    return checkpoint


def restore_checkpoint(trainer: SupervisedTrainer, checkpoint: dict[str, Any],
                       path: str | os.PathLike[str] = CHECKPOINT_NAME) -> int:
    """Restore model, optimizer, scheduler, scaler, epoch, iteration and best metric; return the epoch.

    The network's keys and shapes are checked before any tensor is copied, so a mismatching
    checkpoint leaves the trainer untouched.
    """
    network = unwrap_model(trainer.network)
    own = network.state_dict()
    state = checkpoint["model"]
    if set(own) != set(state) or any(tuple(own[k].shape) != tuple(state[k].shape) for k in own):
        raise BadInputError("checkpoint weights do not match this preset's network", path)
    try:
        network.load_state_dict(state, strict=True)
        trainer.optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler = getattr(trainer, "scheduler", None)
        if scheduler is not None and checkpoint["scheduler"] is not None:
            total = getattr(scheduler, "T_max", None)
            scheduler.load_state_dict(checkpoint["scheduler"])
            if total is not None:  # a cosine schedule follows the (possibly new) number of epochs
                scheduler.T_max = total
        step = getattr(trainer, "training_step", None)
        if step is not None and checkpoint["scaler"]:
            step.scaler.load_state_dict(checkpoint["scaler"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise BadInputError(f"cannot restore the checkpoint ({str(error).splitlines()[0]})", path) from error
    epoch = int(checkpoint["epoch"])
    trainer.state.epoch = epoch
    trainer.state.iteration = int(checkpoint["iteration"])
    trainer.state.best_metric = float(checkpoint["best_metric"])
    trainer.state.best_metric_epoch = int(checkpoint["best_metric_epoch"])
    return epoch


def recipe_differences(old: dict[str, Any], new: Preset) -> list[str]:
    """The preset settings (other than :data:`RESUMABLE_SETTINGS`) that differ between a run's recorded
    preset (``manifest["parameters"]["preset"]``) and ``new``, as "name: old -> new" lines. A recorded preset is
    read through :meth:`Preset.from_dict` first, so a setting added since it was written counts with the value the
    run used, not as missing."""
    try:
        old = Preset.from_dict(old).to_dict()
    except BadInputError:  # damaged, or written by a newer version: compare what is there
        pass
    old = json.loads(json.dumps(old, default=str))
    current = json.loads(json.dumps(new.to_dict(), default=str))
    changes = []
    for key in sorted(set(old) | set(current)):
        if key in RESUMABLE_SETTINGS:
            continue
        if old.get(key) != current.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {current.get(key)!r}")
    return changes


def check_resume_recipe(run_dir: str | os.PathLike[str], preset: Preset, checkpoint: dict[str, Any],
                        anyway: bool = False) -> list[str]:
    """Refuse to resume a run with another recipe: a different preset, preprocessing, patch, network, loss or
    optimiser would train one model under two recipes, and ``infer`` would preprocess with the wrong one.

    Returns the differences (empty when none); with ``anyway`` they are logged and returned, not refused.
    """
    try:
        recorded = read_manifest(run_dir).get("parameters", {}).get("preset")
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, dict):
        changes = recipe_differences(recorded, preset)
    else:  # no manifest: the checkpoint still names its preset
        name = checkpoint.get("preset")
        changes = [] if name in (None, preset.name) else [f"name: {name!r} -> {preset.name!r}"]
    if changes and not anyway:
        listed = "\n  ".join(changes)
        raise BadInputError(f"cannot resume: this run was trained with another recipe; the differences:\n  {listed}"
                            "\nresume with the run's own settings, train into a new --out, or pass "
                            "--resume-anyway (resume_anyway=True) to continue regardless", run_dir)
    if changes:
        log.warning("resuming %s with a changed recipe (recorded in the manifest): %s", run_dir, "; ".join(changes))
    return changes


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Keep only metrics lines up to ``last_epoch`` (the checkpoint's), rewriting the file atomically."""
    kept = [record for record in read_metrics(run_dir) if record.get("epoch", 0) <= last_epoch]
    write_text(run_dir / METRICS_NAME, "".join(json.dumps(record) + "\n" for record in kept))


def resume_point(run_path: Path, preset: Preset, resume: bool,
                 resume_anyway: bool) -> tuple[dict[str, Any] | None, list[str]]:
    """The checkpoint to resume from (None: start afresh) and the recipe changes allowed on resume; rank 0
    reads and checks, every rank gets the same answer (and refuses alike)."""
    checkpoint = None
    checkpoint_path = run_path / CHECKPOINT_NAME
    if resume and is_main_process():
        if checkpoint_path.exists():
            checkpoint = read_last_checkpoint(checkpoint_path)
            if checkpoint["epoch"] >= preset.epochs:
                log.info("the checkpoint is at epoch %d of %d: nothing left to train", checkpoint["epoch"],
                         preset.epochs)
        else:
            log.warning("no %s in %s: nothing to resume, starting afresh", CHECKPOINT_NAME, run_path)
    recipe_changes: list[str] | BadInputError = []
    if checkpoint is not None:
        try:
            recipe_changes = check_resume_recipe(run_path, preset, checkpoint, anyway=resume_anyway)
        except BadInputError as error:
            recipe_changes = error
    recipe_changes = broadcast_object(recipe_changes)  # every rank refuses alike
    if isinstance(recipe_changes, BadInputError):
        raise recipe_changes
    return broadcast_object(checkpoint), recipe_changes  # every rank resumes from what rank 0 read

"""The handlers a training run attaches to its engines, each a small class with ``attach(engine)`` as MONAI's
handlers are: stop at the first non-finite loss or weights, validate and keep the best model, record the run
folder at every epoch end, and, beside them, the two a run on several processes adds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleenkit.distributed import (
    CRASH_RANK_VARIABLE,
    DistributedContext,
    broadcast_buffers,
    crash_requested,
    mean_over_ranks,
    unwrap_model,
)
from spleenkit.errors import NonFiniteTrainingError
from spleenkit.io import write_text
from spleenkit.model import atomic_save, non_finite_weights
from spleenkit.runs import CHECKPOINT_NAME, METRICS_NAME, read_metrics
from spleenkit.training.checkpoints import CHECKPOINT_FORMAT

if TYPE_CHECKING:
    import torch
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    from spleenkit.training.precision import TrainingStep

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- one process
class StopOnNonFinite:
    """Stop training at the first NaN or infinite loss (checked every iteration) or weights (checked at every
    epoch end, before validation and the checkpoint), so the last checkpoint and model.pt stay good."""

    def __init__(self, run_dir: str | os.PathLike[str] | None = None) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)

    def attach(self, engine: SupervisedTrainer) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.check_loss)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.check_weights)

    def _stop(self, engine: SupervisedTrainer, what: str) -> None:
        epoch, iteration = engine.state.epoch, engine.state.iteration
        kept = ""
        if self.run_dir is not None:
            kept = (f"; {self.run_dir / CHECKPOINT_NAME} (epoch {epoch - 1}) and model.pt are kept as they were"
                    if epoch > 1 else "; no checkpoint had been written yet")
        raise NonFiniteTrainingError(
            f"training stopped: {what} at epoch {epoch}, iteration {iteration}{kept}. The learning rate "
            f"({float(engine.optimizer.param_groups[0]['lr']):.3g}) may be too high, or the data holds NaN")

    def check_loss(self, engine: SupervisedTrainer) -> None:
        from monai.utils.enums import CommonKeys as Keys

        output = engine.state.output
        if isinstance(output, list):
            output = output[0]
        loss = float(output[Keys.LOSS])
        if not math.isfinite(loss):
            self._stop(engine, f"the loss is {loss}")

    def check_weights(self, engine: SupervisedTrainer) -> None:
        broken = non_finite_weights(engine.network)
        if broken:
            self._stop(engine, f"{len(broken)} weight tensor(s) hold NaN or infinity (e.g. {broken[0]})")


class ValidateAndKeepBest:
    """At the end of every ``interval``-th epoch (and the last): run the evaluator, record the Dice in
    ``trainer.state.val_dice`` and save the weights to ``model_path`` when it is the best so far."""

    def __init__(self, evaluator: SupervisedEvaluator, interval: int, model_path: str | os.PathLike[str] | None,
                 write: bool = True) -> None:
        self.evaluator, self.interval, self.write = evaluator, interval, write
        self.model_path = None if model_path is None else Path(model_path)

    def attach(self, engine: SupervisedTrainer) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.clear)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def clear(self, engine: SupervisedTrainer) -> None:
        engine.state.val_dice = None

    def due(self, engine: SupervisedTrainer) -> bool:
        epoch = engine.state.epoch
        return epoch % self.interval == 0 or epoch == engine.state.max_epochs

    def __call__(self, engine: SupervisedTrainer) -> None:
        if not self.due(engine):
            return
        self.evaluator.run(engine.state.epoch)
        dice = float(self.evaluator.state.metrics["val_mean_dice"])
        engine.state.val_dice = dice
        if engine.state.best_metric_epoch == -1 or dice > engine.state.best_metric:
            engine.state.best_metric, engine.state.best_metric_epoch = dice, engine.state.epoch
            if self.write and self.model_path is not None:
                broken = non_finite_weights(engine.network)  # (checked in memory: reading the file back costs more)
                if broken:
                    raise NonFiniteTrainingError(f"refusing to replace {self.model_path}: the weights hold NaN or "
                                                 f"infinity (e.g. {broken[0]}) at epoch {engine.state.epoch}")
                atomic_save(unwrap_model(engine.network).state_dict(), self.model_path)  # plain UNet keys, no DDP
                log.debug("new best validation Dice %.4f at epoch %d: saved %s", dice, engine.state.epoch,
                          self.model_path)


class RunRecorder:
    """Writes the run folder at every epoch end: a ``metrics.jsonl`` line, then ``checkpoint_last.pt``.

    The metrics line is written first, so after a crash the checkpoint is never ahead of the log;
    resuming drops log lines newer than the checkpoint.
    """

    def __init__(self, run_dir: str | os.PathLike[str], optimizer: torch.optim.Optimizer,
                 scheduler: Any = None, step: TrainingStep | None = None, *, writer: Any = None,
                 write: bool = True, extra: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.optimizer, self.scheduler, self.step = optimizer, scheduler, step
        self.writer, self.write, self.extra = writer, write, dict(extra or {})
        self.losses: list[float] = []
        self.epoch_start = time.perf_counter()
        self.run_start = time.perf_counter()
        self.elapsed_before = 0.0

    def attach(self, engine: SupervisedTrainer) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def started(self, engine: SupervisedTrainer) -> None:
        self.run_start = time.perf_counter()

    def epoch_started(self, engine: SupervisedTrainer) -> None:
        self.losses = []
        self.epoch_start = time.perf_counter()

    def iteration_completed(self, engine: SupervisedTrainer) -> None:
        from monai.utils.enums import CommonKeys as Keys

        output = engine.state.output
        if isinstance(output, list):  # decollated output repeats the loss in every item
            output = output[0]
        self.losses.append(float(output[Keys.LOSS]))

    def epoch_completed(self, engine: SupervisedTrainer) -> None:
        epoch = engine.state.epoch
        loss = sum(self.losses) / len(self.losses) if self.losses else float("nan")
        loss = mean_over_ranks(loss)  # the global batch's loss under torchrun (itself on one process)
        val_dice = getattr(engine.state, "val_dice", None)
        lr = float(self.optimizer.param_groups[0]["lr"])
        now = time.perf_counter()
        record = {
            "epoch": epoch,
            "loss": loss,
            "val_dice": val_dice,
            "lr": lr,
            "seconds": round(now - self.epoch_start, 3),
            "elapsed": round(self.elapsed_before + now - self.run_start, 3),
            "iteration": engine.state.iteration,
        }
        engine.state.last_record = record
        best = engine.state.best_metric if engine.state.best_metric_epoch != -1 else None
        log.info("epoch %d/%d  loss %.4f  val_dice %s  best %s  lr %.3g  %.1f s", epoch, engine.state.max_epochs,
                 loss, "-" if val_dice is None else f"{val_dice:.4f}",
                 "-" if best is None else f"{best:.4f} (epoch {engine.state.best_metric_epoch})", lr,
                 record["seconds"])
        if not self.write:
            return
        lines = [json.dumps(line) for line in read_metrics(self.run_dir)] + [json.dumps(record)]
        write_text(self.run_dir / METRICS_NAME, "\n".join(lines) + "\n")  # whole lines only, even after a crash
        if self.writer is not None:
            self.writer.add_scalar("epoch_loss", loss, epoch)
            self.writer.add_scalar("lr", lr, epoch)
            if val_dice is not None:
                self.writer.add_scalar("val_dice", val_dice, epoch)
        atomic_save(self.checkpoint(engine), self.run_dir / CHECKPOINT_NAME)  # weights checked by StopOnNonFinite

    def checkpoint(self, engine: SupervisedTrainer) -> dict[str, Any]:
        """Everything needed to resume after this epoch, as tensors and plain data only."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": unwrap_model(engine.network).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.step is None else self.step.scaler.state_dict(),
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "max_epochs": engine.state.max_epochs,
            "best_metric": float(engine.state.best_metric),
            "best_metric_epoch": int(engine.state.best_metric_epoch),
            "elapsed": float(engine.state.last_record["elapsed"]),
            **self.extra,
        }


# --------------------------------------------------------------------------- several processes
class CrashRank:
    """Testing aid: raise on the rank named by ``SPLEENKIT_CRASH_RANK`` at its first iteration."""

    def __init__(self, context: DistributedContext | None) -> None:
        self.context = context

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if crash_requested(self.context):
            engine.add_event_handler(Events.ITERATION_STARTED(once=1), self)

    def __call__(self, engine: Any = None) -> None:
        raise RuntimeError(f"deliberate crash of rank {self.context.rank} "
                           f"({CRASH_RANK_VARIABLE} is set; a testing aid)")


class SyncBuffersBeforeValidation:
    """Evaluator handler: at the start of each validation, give every rank rank 0's BN buffers."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        broadcast_buffers(self.network)


def training_handlers(context: DistributedContext | None) -> list[Any]:
    """Extra trainer handlers for a distributed run (the crash hook when asked for)."""
    return [] if context is None else [CrashRank(context)]


def validation_handlers(network: torch.nn.Module, context: DistributedContext | None) -> list[Any]:
    """Extra evaluator handlers for a distributed run (rank 0's BatchNorm buffers on every rank)."""
    return [] if context is None or context.world_size == 1 else [SyncBuffersBeforeValidation(network)]

"""Measurement helpers shared by both sides of the benchmark (timers and memory, never pipeline code).

Both the kit's side and the reference side attach the same :class:`StepTimer` to their ignite
trainer, so a step is timed the same way on both: wall time between the ends of consecutive
iterations (data loading, the step and any per-epoch handlers included) and, inside it, the time
from the network's forward call to the end of the iteration (forward, loss, backward, optimiser).
On CUDA the latter is measured with CUDA events, which gives the GPU-busy fraction.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any


def peak_memory() -> dict[str, float]:
    """Peak resident memory (MiB) of this process and of its largest finished child (loader workers)."""
    from spleenkit.environment import peak_memory_mib  # this program's own peak, not its parent's

    scale = 2**20 if sys.platform == "darwin" else 2**10
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale
    result = {"peak_rss_mib": peak_memory_mib(), "peak_rss_children_mib": round(children, 1)}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except ImportError:
        pass
    return result


def synchronize(device: Any) -> None:
    """Wait for queued GPU work so that a wall-clock reading means something."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Times the iterations of an ignite trainer; stops it after ``warmup + steps`` iterations.

    ``stop=False`` only records (the time-to-quality runs stop on their own).
    """

    def __init__(self, network: Any, device: Any, warmup: int = 1, steps: int | None = None,
                 started: float | None = None) -> None:
        import torch

        self.started = time.perf_counter() if started is None else started  # for the first epoch's time
        self.first_epoch_seconds: float | None = None
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.warmup, self.steps = warmup, steps
        self.wall: list[float] = []
        self.compute: list[float] = []
        self.gpu: list[float] = []
        self._last_end: float | None = None
        self._compute_start: float | None = None
        self._event: Any = None
        network.register_forward_pre_hook(self._forward_started)

    def attach(self, engine: Any) -> StepTimer:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        return self

    def _started(self, engine: Any) -> None:
        self._last_end = time.perf_counter()

    def _forward_started(self, module: Any, inputs: Any) -> None:
        if self._compute_start is not None or not module.training:
            return  # one mark per iteration (validation forwards are not training steps)
        if self.cuda:
            import torch

            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        self._compute_start = time.perf_counter()

    def _iteration_completed(self, engine: Any) -> None:
        import torch

        gpu_ms = None
        if self.cuda and self._event is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            gpu_ms = self._event.elapsed_time(end)
        now = time.perf_counter()
        if self._last_end is not None:
            self.wall.append(now - self._last_end)
            self.compute.append(now - (self._compute_start or now))
            if gpu_ms is not None:
                self.gpu.append(gpu_ms / 1000.0)
        self._last_end, self._compute_start, self._event = now, None, None
        if engine.state.iteration == engine.state.epoch_length and self.first_epoch_seconds is None:
            self.first_epoch_seconds = now - self.started  # the cache fill and the whole first epoch
        if self.steps is not None and len(self.wall) >= self.warmup + self.steps:
            engine.terminate()

    def summary(self) -> dict[str, Any]:
        """Median step time after the warm-up, steps per second, and the busy fractions."""
        wall, compute, gpu = (values[self.warmup:] for values in (self.wall, self.compute, self.gpu))
        if not wall:
            return {"step_seconds": [], "median_step_seconds": None, "steps_per_second": None}
        median = statistics.median(wall)
        result: dict[str, Any] = {
            "first_epoch_seconds": None if self.first_epoch_seconds is None else round(self.first_epoch_seconds, 3),
            "step_seconds": [round(v, 4) for v in wall],
            "warmup_step_seconds": [round(v, 4) for v in self.wall[: self.warmup]],
            "median_step_seconds": round(median, 4),
            "steps_per_second": round(1.0 / median, 5) if median > 0 else None,
            # share of each step spent from the forward call to the optimiser's update (the rest: data, handlers)
            "compute_fraction": round(sum(compute) / sum(wall), 4),
        }
        if gpu:
            result["gpu_busy_fraction"] = round(sum(gpu) / sum(wall), 4)
        return result


class QualityWatch:
    """Ends a time-to-quality run when validation Dice reaches ``target`` or the time cap passes.

    ``dice_of(engine)`` reads the latest validation Dice (None when the epoch had no validation).
    The clock starts at ``started`` (before the cache is filled) and counts everything a user waits for.
    """

    def __init__(self, started: float, target: float, cap_seconds: float, dice_of: Any) -> None:
        self.started, self.target, self.cap = started, target, cap_seconds
        self.dice_of = dice_of
        self.history: list[dict[str, Any]] = []
        self.reached_at: float | None = None
        self.reached_epoch: int | None = None

    def attach(self, engine: Any) -> QualityWatch:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check_cap)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        return self

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _check_cap(self, engine: Any) -> None:
        if self.elapsed() > self.cap:
            engine.terminate()

    def _epoch_completed(self, engine: Any) -> None:
        dice = self.dice_of(engine)
        elapsed = self.elapsed()
        self.history.append({"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                             "elapsed_seconds": round(elapsed, 2),
                             "val_dice": None if dice is None else round(float(dice), 4)})
        if dice is not None and dice >= self.target and self.reached_at is None:
            self.reached_at, self.reached_epoch = elapsed, engine.state.epoch
            engine.terminate()
        elif elapsed > self.cap:
            engine.terminate()

    def summary(self) -> dict[str, Any]:
        dices = [h["val_dice"] for h in self.history if h["val_dice"] is not None]
        return {
            "target_dice": self.target,
            "cap_seconds": self.cap,
            "reached": self.reached_at is not None,
            "seconds_to_target": None if self.reached_at is None else round(self.reached_at, 2),
            "epoch_reached": self.reached_epoch,
            "best_dice": max(dices) if dices else None,
            "epochs": self.history[-1]["epoch"] if self.history else 0,
            "iterations": self.history[-1]["iteration"] if self.history else 0,
            "seconds": round(self.elapsed(), 2),
            "history": self.history,
        }

"""Training with MONAI's engines, split the way MONAI splits them.

- :mod:`~spleenkit.training.run`: :func:`train`, one run from a dataset folder to a run folder, in named steps
- :mod:`~spleenkit.training.engines`: datasets and loaders, loss, optimiser and schedule, the evaluator and the
  trainer
- :mod:`~spleenkit.training.handlers`: what the engines do at their events (stop on NaN, validate and keep the
  best model, write the run folder; the handlers of a run on several processes)
- :mod:`~spleenkit.training.precision`: the precision a run trains in, and its mixed-precision step
- :mod:`~spleenkit.training.checkpoints`: reading and restoring checkpoints, resuming only with the run's recipe
- :mod:`~spleenkit.training.resources`: memory of a step and of the cache, checked before anything heavy starts
- :mod:`~spleenkit.training.timing`: a training step timed in float32 against mixed precision

The names below are the ones the notebooks' surface, the bundle configs and the benchmarks use.
"""

from spleenkit.training.checkpoints import (
    CHECKPOINT_FORMAT,
    RESUMABLE_SETTINGS,
    check_resume_recipe,
    read_last_checkpoint,
    recipe_differences,
    restore_checkpoint,
)
from spleenkit.training.engines import (
    Datasets,
    build_datasets,
    build_evaluator,
    build_loaders,
    build_trainer,
    epoch_level_schedule,
    make_loss,
    make_optimizer,
    make_scheduler,
    make_train_sampler,
)
from spleenkit.training.handlers import RunRecorder, StopOnNonFinite, ValidateAndKeepBest
from spleenkit.training.precision import (
    TrainingStep,
    make_iteration_update,
    mixed_precision_step,
    training_amp,
    training_precision,
    validation_precision,
)
from spleenkit.training.resources import (
    CacheEstimate,
    check_patch_fits,
    check_step_fits,
    default_num_workers,
    estimate_cache_memory,
    estimate_step_memory,
    resampled_shape,
)
from spleenkit.training.run import TrainingResult, train
from spleenkit.training.timing import measure_step_seconds

__all__ = [
    "CHECKPOINT_FORMAT", "CacheEstimate", "Datasets", "RESUMABLE_SETTINGS", "RunRecorder", "StopOnNonFinite",
    "TrainingResult", "TrainingStep", "ValidateAndKeepBest", "build_datasets", "build_evaluator", "build_loaders",
    "build_trainer", "check_patch_fits", "check_resume_recipe", "check_step_fits", "default_num_workers",
    "epoch_level_schedule", "estimate_cache_memory", "estimate_step_memory", "make_iteration_update", "make_loss",
    "make_optimizer", "make_scheduler", "make_train_sampler", "measure_step_seconds", "mixed_precision_step",
    "read_last_checkpoint", "recipe_differences", "resampled_shape", "restore_checkpoint", "train", "training_amp",
    "training_precision", "validation_precision",
]

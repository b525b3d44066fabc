"""The engines of a training run, built the way MONAI builds them: cached datasets and loaders, the loss, the
optimiser and its schedule, a ``SupervisedEvaluator`` and a ``SupervisedTrainer`` with the kit's handlers.

The pieces are public and small so that :func:`spleenkit.training.train`, a benchmark and a MONAI bundle config
can assemble the same trainer: the deterministic part of the chain is cached, the random crops run after the
cache; the trainer steps in mixed precision on every device (:mod:`spleenkit.training.precision`) and its
handlers (:mod:`spleenkit.training.handlers`) validate, keep the best model and write the run folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleenkit.data.datalist import Datalist
from spleenkit.devices import use_fast_layout
from spleenkit.distributed import is_main_process, train_sampler, unwrap_model
from spleenkit.environment import SMALL_MEMORY_GIB, release_free_memory, total_memory_gib
from spleenkit.errors import BadInputError
from spleenkit.predict import autocast_inferer, make_inferer
from spleenkit.presets import Preset, get_preset
from spleenkit.runs import MODEL_NAME
from spleenkit.training.handlers import RunRecorder, StopOnNonFinite, ValidateAndKeepBest
from spleenkit.training.precision import make_iteration_update, training_amp, validation_precision
from spleenkit.training.resources import (
    CacheEstimate,
    check_patch_fits,
    default_num_workers,
    estimate_cache_memory,
)
from spleenkit.transforms import training_transforms, validation_transforms

if TYPE_CHECKING:
    import torch
    from monai.data import CacheDataset
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

#: The loggers of the engines' own messages (``spleenkit train`` shows them with -v only).
TRAINER_LOGGER = "spleenkit.training.trainer"
EVALUATOR_LOGGER = "spleenkit.training.evaluator"


# --------------------------------------------------------------------------- data
@dataclass
class Datasets:
    """The training and validation CacheDatasets and the memory estimate made before filling them."""

    train: CacheDataset
    validation: CacheDataset
    estimate: CacheEstimate


def build_datasets(train_items: Datalist, validation_items: Datalist, preset: Preset, *,
                   cache_rate: float | None = None, num_workers: int | None = None,
                   progress: bool = False) -> Datasets:
    """CacheDatasets of the deterministic chain (the random crops run after the cache, on every draw).

    The RAM the cache will take is estimated from the headers and logged before filling starts;
    a warning suggests a cache rate when it would not fit in memory.
    """
    from monai.data import CacheDataset

    rate = preset.cache_rate if cache_rate is None else cache_rate
    workers = default_num_workers() if num_workers is None else max(1, num_workers)
    check_patch_fits(train_items, preset)
    estimate = estimate_cache_memory(train_items, preset, rate).combined(
        estimate_cache_memory(validation_items, preset, rate, padded=False))
    log.info("%s", estimate.describe())
    if estimate.available_bytes and estimate.total_bytes > estimate.available_bytes:
        suggestion = max(0.0, round(rate * 0.8 * estimate.available_bytes / estimate.total_bytes, 2))
        raise BadInputError(f"the cache cannot fit: {estimate.describe()}; lower the cache rate (e.g. "
                            f"cache_rate={suggestion} / --cache-rate {suggestion}) or the spacing")
    if not estimate.fits:
        suggestion = max(0.0, round(rate * 0.8 * estimate.available_bytes / estimate.total_bytes, 2))
        log.warning("the cache may not fit in memory; lower the cache rate (e.g. cache_rate=%s / --cache-rate %s)",
                    suggestion, suggestion)
    memory = total_memory_gib()
    if workers > 1 and memory is not None and memory < SMALL_MEMORY_GIB:
        # each thread resamples a whole original volume at once (hundreds of MB for a large one)
        log.info("filling the cache one case at a time: %.1f GiB of memory here", memory)
        workers = 1
    # copy_cache=False: the random crops never modify the cached volume in place, so no deep copy per draw
    train = CacheDataset(train_items, training_transforms(preset), cache_rate=rate, num_workers=workers,
                         progress=progress, copy_cache=False)
    validation = CacheDataset(validation_items, validation_transforms(preset), cache_rate=rate,
                              num_workers=workers, progress=progress, copy_cache=False)
    release_free_memory()  # the resampling's temporaries, freed but still held by the C heap
    return Datasets(train=train, validation=validation, estimate=estimate)


def make_train_sampler(dataset: Any, *, distributed: bool = False, seed: int = 0) -> Any:
    """The sampler of the training loader: None (the loader shuffles) for a single process, a
    DistributedSampler dealing each rank its share, reshuffled every epoch, under ``distributed``."""
    return train_sampler(dataset, seed=seed) if distributed else None


def build_loaders(datasets: Datasets, preset: Preset, *, num_workers: int | None = None,
                  distributed: bool = False) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders.

    A fully cached training set is read by MONAI's ThreadDataLoader (as :class:`TrainingLoader`, whose thread
    an interrupt stops too): the random crops run in a background thread while the network trains, with no
    worker processes to start. Uncached items are loaded from disk by ``num_workers`` processes.
    """
    from monai.data import DataLoader

    from spleenkit.training.loaders import TrainingLoader  # imports MONAI: not at ``import spleenkit``

    train_ds = datasets.train
    fully_cached = getattr(train_ds, "cache_num", 0) >= len(train_ds)
    workers = 0 if fully_cached else (default_num_workers() if num_workers is None else num_workers)
    sampler = make_train_sampler(train_ds, distributed=distributed, seed=preset.seed)
    train_loader = TrainingLoader(train_ds, batch_size=preset.batch_size, shuffle=sampler is None,
                                  sampler=sampler, num_workers=workers)
    validation_loader = DataLoader(datasets.validation, batch_size=1, shuffle=False, num_workers=0)
    return train_loader, validation_loader



# --------------------------------------------------------------------------- loss, optimiser, schedule
def make_loss(preset: Preset | str = "seed") -> torch.nn.Module:
    """DiceCELoss exactly as the bundle sets it, or the tutorial's DiceLoss; the background channel in the
    Dice or not as the preset says (``include_background``)."""
    from monai.losses import DiceCELoss, DiceLoss

    preset = get_preset(preset)
    if preset.loss == "dice_ce":
        return DiceCELoss(include_background=preset.include_background, to_onehot_y=True, softmax=True,
                          squared_pred=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=0.5,
                          lambda_ce=0.5)
    if preset.loss == "dice":
        return DiceLoss(include_background=preset.include_background, to_onehot_y=True, softmax=True)
    raise BadInputError(f"unknown loss {preset.loss!r}; use dice_ce or dice")


def make_optimizer(preset: Preset | str, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam (the seed) or MONAI's Novograd (bundle 0.5.9) at the preset's learning rate."""
    import torch

    preset = get_preset(preset)
    if preset.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=preset.learning_rate)
    if preset.optimizer == "novograd":
        from monai.optimizers import Novograd

        return Novograd(parameters, lr=preset.learning_rate)
    raise BadInputError(f"unknown optimizer {preset.optimizer!r}; use adam or novograd")


def epoch_level_schedule(preset: Preset | str) -> bool:
    """Whether the preset's schedule steps once per epoch (StepLR, as bundle 0.5.9's LrScheduleHandler does by
    default) rather than once per iteration (the cosine decay over every iteration)."""
    return get_preset(preset).scheduler == "step"


def make_scheduler(preset: Preset | str, optimizer: torch.optim.Optimizer,
                   total_iterations: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The preset's learning-rate schedule: none, StepLR (bundle 0.5.9; ``step_size`` in epochs, stepped once per
    epoch as there) or a cosine decay to zero over ``total_iterations``, stepped once per iteration."""
    import torch

    preset = get_preset(preset)
    if preset.scheduler in (None, "none"):
        return None
    if preset.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=preset.scheduler_step_size,
                                               gamma=preset.scheduler_gamma)
    if preset.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_iterations))
    raise BadInputError(f"unknown scheduler {preset.scheduler!r}; use none, step or cosine")


# --------------------------------------------------------------------------- the engines
def build_evaluator(network: torch.nn.Module, validation_loader: Iterable, preset: Preset,
                    device: torch.device, *, amp: bool | None = None,
                    handlers: Sequence[Any] = ()) -> SupervisedEvaluator:
    """SupervisedEvaluator: sliding window (preset roi, window batch, overlap) under autocast,
    softmax + argmax, MeanDice without background (the bundle's key metric ``val_mean_dice``)."""
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanDice, StatsHandler, from_engine
    from monai.transforms import Activationsd, AsDiscreted, Compose

    # the evaluator moves each case to the device; windows run there and the stitched volume stays there (the
    # bundle's validate#inferer: sw_device and device both @device)
    window = make_inferer(preset, device=device, stitch_device="auto")
    postprocessing = Compose([
        Activationsd(keys="pred", softmax=True),
        AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2),
    ])
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=validation_loader,
        network=network,
        inferer=autocast_inferer(window, device, validation_precision(preset, device, amp).enabled),
        postprocessing=postprocessing,
        key_val_metric={"val_mean_dice": MeanDice(include_background=False,
                                                  output_transform=from_engine(["pred", "label"]))},
        val_handlers=list(handlers),
        amp=False,  # autocast is applied by the inferer on every device
    )
    evaluator.logger = logging.getLogger(EVALUATOR_LOGGER)
    if evaluator.logger.isEnabledFor(logging.INFO):
        StatsHandler(iteration_log=False, name=None).attach(evaluator)
    return evaluator


def build_trainer(network: torch.nn.Module, train_loader: Iterable, evaluator: SupervisedEvaluator,
                  preset: Preset, device: torch.device, *, run_dir: str | os.PathLike[str] | None,
                  loss_function: Callable | None = None, optimizer: torch.optim.Optimizer | None = None,
                  scheduler: Any = None, amp: bool | None = None, epochs: int | None = None, progress: bool = False,
                  writer: Any = None, write: bool | None = None,
                  extra_handlers: Sequence[Any] = ()) -> SupervisedTrainer:
    """SupervisedTrainer with the kit's mixed-precision step and handlers: periodic validation keeping
    the best ``model.pt``, per-iteration LR schedule, StatsHandler, TensorBoard, progress bar and
    the run-folder recorder. Loss/optimizer default to the preset's; ``run_dir=None`` writes nothing.
    A plain ``network`` is put in the device's fast layout here; a DDP-wrapped one must be already
    (its gradient buckets follow the layout its weights had when it was wrapped)."""
    from monai.engines import SupervisedTrainer
    from monai.handlers import LrScheduleHandler, StatsHandler, TensorBoardStatsHandler
    from monai.utils.enums import CommonKeys as Keys

    if unwrap_model(network) is network:
        use_fast_layout(network, device, preset.channels_last)
    write = (run_dir is not None and is_main_process()) if write is None else write
    loss_function = make_loss(preset) if loss_function is None else loss_function
    optimizer = make_optimizer(preset, network.parameters()) if optimizer is None else optimizer
    step = make_iteration_update(device, training_amp(preset, device, amp))

    def loss_of(output: Any) -> float:
        return float(output[Keys.LOSS])

    handlers: list[Any] = [
        StopOnNonFinite(run_dir),  # first: before validation and the checkpoint see broken weights
        ValidateAndKeepBest(evaluator, preset.validation_interval,
                            None if run_dir is None else Path(run_dir) / MODEL_NAME, write=write),
    ]
    if scheduler is not None:
        handlers.append(LrScheduleHandler(scheduler, print_lr=False, epoch_level=epoch_level_schedule(preset)))
    if writer is not None:
        handlers.append(TensorBoardStatsHandler(summary_writer=writer, tag_name="train_loss",
                                                output_transform=loss_of, epoch_log=False))
    recorder = None
    if run_dir is not None:
        recorder = RunRecorder(run_dir, optimizer, scheduler, step, writer=writer, write=write,
                               extra={"preset": preset.name})
        handlers.append(recorder)
    handlers.extend(extra_handlers)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=preset.epochs if epochs is None else epochs,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss_function,
        iteration_update=step,
        train_handlers=handlers,
        amp=False,  # the kit's step handles mixed precision on every device
        decollate=False,
    )
    trainer.logger = logging.getLogger(TRAINER_LOGGER)
    if trainer.logger.isEnabledFor(logging.INFO):  # (StatsHandler warns when its logger is silenced)
        StatsHandler(iteration_log=not progress, epoch_log=False, tag_name="train_loss", output_transform=loss_of,
                     name=None).attach(trainer)
    # kept on the trainer for checkpoints and resume
    trainer.training_step = step
    trainer.scheduler = scheduler
    trainer.run_recorder = recorder
    if progress:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=True).attach(trainer, output_transform=lambda output: {"loss": loss_of(output)})
    return trainer

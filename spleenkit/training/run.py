"""``train``: one training run from a dataset folder to a filled run folder, in named steps.

Check the recipe and the machine (:mod:`spleenkit.training.resources`), take the run folder's lock, choose the
precision, split the labelled cases, find where to resume (:mod:`spleenkit.training.checkpoints`), build the
engines (:mod:`spleenkit.training.engines` with :mod:`spleenkit.training.handlers`), write the manifest, train,
record the result.

A run folder holds ``model.pt`` (best validation Dice, a plain state dict like the bundle's),
``checkpoint_last.pt`` (everything needed to resume, rewritten atomically at every epoch end),
``metrics.jsonl`` (one line per epoch), ``manifest.json`` and ``tensorboard/``; while a run writes
it, ``run.lock`` names the process (see :mod:`spleenkit.runs`, which holds the layout and the lock).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleenkit.data.checks import check_training_cases
from spleenkit.data.datalist import Datalist, dataset_fingerprint, load_datalist, split_datalist
from spleenkit.devices import Precision, amp_dtype, describe_device, pick_device, use_fast_layout
from spleenkit.distributed import (
    DistributedContext,
    check_sync_bn,
    describe_training,
    gather_objects,
    in_turn,
    is_main_process,
    scale_learning_rate,
    share_training_data,
    unwrap_model,
    workers_per_process,
    wrap_model,
)
from spleenkit.environment import (
    SMALL_MEMORY_GIB,
    peak_memory_mib,
    release_free_memory,
    return_large_blocks_promptly,
    total_memory_gib,
)
from spleenkit.errors import BadInputError, NonFiniteTrainingError
from spleenkit.manifest import build_manifest, now, read_manifest, write_manifest, write_stopped_manifest
from spleenkit.model import build_unet, load_weights
from spleenkit.presets import Preset, resolve_preset
from spleenkit.runs import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    MODEL_NAME,
    TENSORBOARD_DIR,
    decide_resume,
    output_folder,
    prepare_run_dir,
    read_metrics,
)
from spleenkit.training.checkpoints import restore_checkpoint, resume_point, truncate_metrics
from spleenkit.training.engines import (
    build_datasets,
    build_evaluator,
    build_loaders,
    build_trainer,
    make_optimizer,
    make_scheduler,
)
from spleenkit.training.handlers import training_handlers, validation_handlers
from spleenkit.training.precision import training_precision, validation_precision
from spleenkit.training.resources import CacheEstimate, check_step_fits, default_num_workers

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _labelled_split(data_dir: str | os.PathLike[str], preset: Preset) -> tuple[Datalist, Datalist]:
    items = load_datalist(data_dir, "training")
    unlabelled = [record["image"] for record in items if "label" not in record]
    if unlabelled:
        raise BadInputError(f"{len(unlabelled)} training case(s) have no label, e.g. {unlabelled[0]}",
                            Path(data_dir) / "dataset.json")
    train_items, validation_items = split_datalist(items, preset.validation_cases)
    check_training_cases(train_items, validation_items)  # data check's checks, before anything heavy
    return train_items, validation_items


@dataclass
class TrainingResult:
    """What a training run produced and where."""

    run_dir: Path
    model_path: Path
    checkpoint_path: Path
    metrics_path: Path
    best_dice: float | None
    best_epoch: int | None
    epochs: int
    seconds: float
    device: str
    amp_dtype: str | None
    preset: str
    resumed_from_epoch: int = 0
    cache_estimate: CacheEstimate | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> list[dict[str, Any]]:
        """The run's metrics.jsonl records."""
        return read_metrics(self.run_dir)


def train(data_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str], preset: Preset | str = "seed", *,
          epochs: int | None = None, device: str = "auto", amp: bool | None = None, resume: bool = False,
          seed: int | None = None, num_workers: int | None = None, cache_rate: float | None = None,
          progress: bool = True, distributed: DistributedContext | None = None, sync_bn: bool = False,
          scale_lr: str = "none", resume_anyway: bool = False, init_weights: str | os.PathLike[str] | None = None,
          start_afresh: bool = False, **preset_overrides: Any) -> TrainingResult:
    """Train the bundle's UNet on an MSD-layout dataset folder and fill ``run_dir``.

    Under torchrun, pass ``distributed=spleenkit.distributed.init_process_group()``: each rank trains
    on its share through DDP (``sync_bn``: SyncBatchNorm on GPUs; ``scale_lr``: "none" or "linear"),
    and only rank 0 writes the run folder.

    ``preset_overrides`` are any :class:`~spleenkit.presets.Preset` settings (``patch_size=64``,
    ``learning_rate=1e-3``, ``validation_interval=1`` ...; None: the recipe's own), applied with ``epochs``,
    ``amp``, ``seed`` and ``cache_rate`` through :func:`~spleenkit.presets.resolve_preset`. ``resume=True``
    continues from ``run_dir/checkpoint_last.pt`` (to the preset's or the given number of epochs); a recipe other
    than the run's is refused with the differences listed unless ``resume_anyway`` (recorded in the manifest); a
    resume without a usable checkpoint or manifest is refused unless ``start_afresh`` (see ``runs.decide_resume``).
    ``init_weights`` fine-tunes: the network starts from these weights (a kit run's ``model.pt`` or
    MONAI's released ``model.pt``, loaded strictly) instead of a random initialisation.

    Refused before anything heavy starts: a setting out of its range (checked at the recipe's door,
    :func:`~spleenkit.presets.resolve_preset`: a learning rate that is not a number in (0, 1], a patch beyond
    :data:`~spleenkit.presets.MAX_PATCH_SIDE` ...), a step (or a cache) that cannot fit in memory, a run folder
    another run holds (:class:`~spleenkit.runs.RunLock`). Training stops at the first NaN or infinite loss or weights
    (:class:`NonFiniteTrainingError`), keeping the last good checkpoint. A run that fails before writing
    any file leaves no empty folder behind.
    """
    started_at, started = now(), time.perf_counter()
    preset = resolve_preset(preset, flags={"epochs": epochs, "amp": amp, "seed": seed, "cache_rate": cache_rate,
                                           **preset_overrides})
    base_learning_rate = preset.learning_rate
    preset = scale_learning_rate(preset, 1 if distributed is None else distributed.world_size, scale_lr)
    torch_device = pick_device(device) if distributed is None else distributed.device
    if sync_bn:
        check_sync_bn(torch_device)
    check_step_fits(preset, torch_device)
    # memory: where it is small, large blocks go back to the system when freed; what earlier work left (a
    # notebook's other trainings) is freed before this one fills its cache, and this one's after it (see
    # spleenkit.environment)
    return_large_blocks_promptly()
    release_free_memory()
    try:
        with output_folder(run_dir, lock=is_main_process()):
            resume = decide_resume(run_dir, resume, start_afresh) if is_main_process() else resume
            return _train_in_folder(
                data_dir, run_dir, preset, torch_device, amp=amp, base_learning_rate=base_learning_rate,
                resume=resume, resume_anyway=resume_anyway, num_workers=num_workers, progress=progress,
                distributed=distributed, sync_bn=sync_bn, scale_lr=scale_lr, started_at=started_at, started=started,
                init_weights=init_weights)
    finally:
        release_free_memory()


def _train_in_folder(data_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str], preset: Preset,
                     torch_device: torch.device, *, amp: bool | None, base_learning_rate: float, resume: bool,
                     resume_anyway: bool, num_workers: int | None, progress: bool,
                     distributed: DistributedContext | None, sync_bn: bool, scale_lr: str, started_at: str,
                     started: float, init_weights: str | os.PathLike[str] | None = None) -> TrainingResult:
    """The body of :func:`train`, run while this process holds the run folder's lock: check the data, choose the
    precision, find where to resume, build the engines, write the manifest, train, record the result."""
    workers = workers_per_process(default_num_workers(), distributed) if num_workers is None else num_workers
    if workers < 0:
        raise BadInputError(f"number of workers must be 0 or more (got {workers})")
    train_items, validation_items = _labelled_split(data_dir, preset)  # the data are checked before anything else
    # float32 on a CPU without native bfloat16, or where its bfloat16 gradients are wrong; ``amp`` forces it
    precision = training_precision(preset, torch_device, amp)
    validation = validation_precision(preset, torch_device, amp)
    log.info("training precision: %s (%s)", precision.name, precision.reason)
    run_path = prepare_run_dir(run_dir, resume) if is_main_process() else Path(run_dir)
    checkpoint, recipe_changes = resume_point(run_path, preset, resume, resume_anyway)
    start_epoch = 0 if checkpoint is None else int(checkpoint["epoch"])
    engines = _build_engines(train_items, validation_items, preset, torch_device, run_path, start_epoch,
                             precision=precision, validation=validation, workers=workers,
                             progress=progress and is_main_process(), distributed=distributed, sync_bn=sync_bn,
                             init_weights=init_weights)
    if checkpoint is not None:
        restore_checkpoint(engines.trainer, checkpoint, run_path / CHECKPOINT_NAME)
        if is_main_process():
            truncate_metrics(run_path, start_epoch)
        if engines.trainer.run_recorder is not None:
            engines.trainer.run_recorder.elapsed_before = float(checkpoint.get("elapsed", 0.0))
        log.info("resuming from %s at epoch %d", run_path / CHECKPOINT_NAME, start_epoch)
    parameters = _training_parameters(
        data_dir, run_path, preset, torch_device, precision, validation, workers, resume, resume_anyway, init_weights,
        describe_training(distributed, preset, sync_bn=sync_bn, scale_lr=scale_lr,
                          base_learning_rate=base_learning_rate, share=engines.share))
    manifest = _training_manifest(parameters, run_path, torch_device, data_dir, train_items, validation_items,
                                  engines, started_at, start_epoch, checkpoint is not None, recipe_changes)
    if is_main_process():
        write_manifest(run_path, manifest)
    _run_trainer(engines, preset, start_epoch, manifest, run_path)
    return _record_result(engines, run_path, preset, torch_device, precision, start_epoch, started, manifest,
                          distributed)


@dataclass
class _Engines:
    """What :func:`_build_engines` made for one training run."""

    trainer: Any
    writer: Any
    share: Any
    estimate: CacheEstimate


def _build_engines(train_items: Datalist, validation_items: Datalist, preset: Preset, torch_device: torch.device,
                   run_path: Path, start_epoch: int, *, precision: Precision, validation: Precision, workers: int,
                   progress: bool, distributed: DistributedContext | None, sync_bn: bool,
                   init_weights: str | os.PathLike[str] | None = None) -> _Engines:
    """Cached datasets and loaders for this process's share, the UNet (fast layout, DDP), optimiser and schedule,
    the evaluator and the trainer with the run folder's handlers (TensorBoard on rank 0)."""
    from monai.handlers import TensorBoardStatsHandler
    from monai.utils import set_determinism

    set_determinism(seed=preset.seed + start_epoch)
    share = share_training_data(train_items, validation_items, distributed, preset.cache_rate, preset.seed)
    memory = total_memory_gib()
    # with little memory the processes of one machine fill their caches in turn: each fill peaks at a whole
    # original volume resampled, and two at once can take a notebook session past its limit
    datasets = in_turn(lambda: build_datasets(share.train_items, share.validation_items, preset,
                                              cache_rate=preset.cache_rate, num_workers=max(1, workers),
                                              progress=progress),
                       distributed, enabled=memory is not None and memory < SMALL_MEMORY_GIB)
    train_loader, validation_loader = build_loaders(datasets, preset, num_workers=workers,
                                                    distributed=distributed is not None and not share.partitioned)
    # the layout is set before DDP wraps the network (its gradient buckets follow the weights' layout)
    network = build_unet(preset)
    if init_weights is not None:
        load_weights(network, init_weights)  # strict: every tensor must find its place
    network = wrap_model(use_fast_layout(network.to(torch_device), torch_device, preset.channels_last),
                         distributed, sync_bn)
    optimizer = make_optimizer(preset, network.parameters())
    scheduler = make_scheduler(preset, optimizer, total_iterations=preset.epochs * len(train_loader))
    writer = None
    if is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_path / TENSORBOARD_DIR))
    evaluator_handlers: list[Any] = validation_handlers(network, distributed)
    if writer is not None:
        evaluator_handlers.append(TensorBoardStatsHandler(summary_writer=writer, iteration_log=False))
    evaluator = build_evaluator(unwrap_model(network), validation_loader, preset, torch_device,
                                amp=validation.enabled, handlers=evaluator_handlers)
    trainer = build_trainer(network, train_loader, evaluator, preset, torch_device, run_dir=run_path,
                            optimizer=optimizer, scheduler=scheduler, amp=precision.enabled, progress=progress,
                            writer=writer, write=is_main_process(), extra_handlers=training_handlers(distributed))
    return _Engines(trainer, writer, share, datasets.estimate)


def _training_parameters(data_dir: str | os.PathLike[str], run_path: Path, preset: Preset, torch_device: torch.device,
                         precision: Precision, validation: Precision, workers: int, resume: bool, resume_anyway: bool,
                         init_weights: str | os.PathLike[str] | None, distributed: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``parameters``: everything that decides what this run computes."""
    return {
        "data_dir": str(Path(data_dir).resolve()),
        "run_dir": str(run_path.resolve()),
        "preset": preset.to_dict(),
        "device": str(torch_device),
        "amp": preset.amp,
        "amp_dtype": str(amp_dtype(torch_device, precision.enabled)),
        "validation_amp_dtype": str(amp_dtype(torch_device, validation.enabled)),
        "precision": precision.as_dict(),
        "validation_precision": validation.as_dict(),
        "seed": preset.seed,
        "num_workers": workers,
        "cache_rate": preset.cache_rate,
        "resume": resume,
        "resume_anyway": resume_anyway,
        "init_weights": None if init_weights is None else str(Path(init_weights).resolve()),
        "distributed": distributed,
    }


def _training_manifest(parameters: dict[str, Any], run_path: Path, torch_device: torch.device,
                       data_dir: str | os.PathLike[str], train_items: Datalist, validation_items: Datalist,
                       engines: _Engines, started_at: str, start_epoch: int, resumed: bool,
                       recipe_changes: list[str]) -> dict[str, Any]:
    """The run's manifest as it starts: parameters, device, dataset and its fingerprint, earlier runs resumed."""
    previous_runs: list[Any] = []
    if resumed and (run_path / "manifest.json").is_file():
        try:
            old = read_manifest(run_path)
            previous_runs = old.get("previous_runs", []) + [{k: old.get(k) for k in ("started", "finished")}]
        except (OSError, json.JSONDecodeError):
            previous_runs = []
    fingerprint = dataset_fingerprint(train_items + validation_items)
    return build_manifest(
        parameters, device=str(torch_device), kind="training",
        device_info=describe_device(torch_device),
        dataset={"dir": str(Path(data_dir).resolve()), "fingerprint": fingerprint,
                 "train_cases": [Path(r["image"]).name for r in train_items],
                 "validation_cases": [Path(r["image"]).name for r in validation_items]},
        cache_estimate_gib=round(engines.estimate.gib, 3),
        started=started_at, finished=None, resumed_from_epoch=start_epoch, previous_runs=previous_runs,
        recipe_changes_on_resume=recipe_changes,
    )


def _run_trainer(engines: _Engines, preset: Preset, start_epoch: int, manifest: dict[str, Any],
                 run_path: Path) -> None:
    """Train to the preset's epochs; a non-finite stop is recorded in the manifest before it is raised."""
    try:
        if start_epoch < preset.epochs:
            engines.trainer.run()
    except NonFiniteTrainingError as error:
        if is_main_process():
            manifest.update(finished=now(), error=str(error))
            write_manifest(run_path, manifest)
        raise
    except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM: the manifest says the run stopped, and why
        if is_main_process():
            write_stopped_manifest(run_path, error, {**manifest, "finished": now()})
        raise
    finally:
        if engines.writer is not None:
            engines.writer.close()


def _record_result(engines: _Engines, run_path: Path, preset: Preset, torch_device: torch.device,
                   precision: Precision, start_epoch: int, started: float, manifest: dict[str, Any],
                   distributed: DistributedContext | None) -> TrainingResult:
    """The result of a finished run, also written into the manifest (with every rank's peak memory)."""
    state = engines.trainer.state
    best_epoch = state.best_metric_epoch if state.best_metric_epoch != -1 else None
    result = TrainingResult(
        run_dir=run_path,
        model_path=run_path / MODEL_NAME,
        checkpoint_path=run_path / CHECKPOINT_NAME,
        metrics_path=run_path / METRICS_NAME,
        best_dice=float(state.best_metric) if best_epoch is not None else None,
        best_epoch=best_epoch,
        epochs=int(state.epoch),
        seconds=round(time.perf_counter() - started, 2),
        device=str(torch_device),
        amp_dtype=None if precision.dtype is None else str(precision.dtype),
        preset=preset.name,
        resumed_from_epoch=start_epoch,
        cache_estimate=engines.estimate,
    )
    if distributed is not None:  # every rank takes part; rank 0 receives the list
        manifest["peak_memory_mib_per_rank"] = gather_objects(peak_memory_mib())
    if is_main_process():
        manifest.update(finished=now(), result={"best_dice": result.best_dice, "best_epoch": result.best_epoch,
                                                "epochs": result.epochs, "seconds": result.seconds,
                                                "model": MODEL_NAME})
        write_manifest(run_path, manifest)
    return result

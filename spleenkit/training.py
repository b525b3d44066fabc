"""Training: MONAI engines on ignite, mixed precision on every device, checkpoints, resume and the run folder.

The pieces are public and small so that the ``train`` function, a benchmark and a MONAI bundle
config can assemble the same trainer: :func:`build_datasets` and :func:`build_loaders` (cached
deterministic part, random crops after the cache), :func:`make_loss`, :func:`make_optimizer`,
:func:`make_scheduler`, :func:`mixed_precision_step` / :class:`TrainingStep` (one iteration in
float16 with a gradient scaler on CUDA, bfloat16 autocast on the CPU — ``monai.engines``' own
``amp=True`` is CUDA-only), :func:`build_evaluator`, :func:`build_trainer` and :func:`train`.

A run folder holds ``model.pt`` (best validation Dice, a plain state dict like the bundle's),
``checkpoint_last.pt`` (everything needed to resume, rewritten atomically at every epoch end),
``metrics.jsonl`` (one line per epoch), ``manifest.json`` and ``tensorboard/``; while a run writes
it, ``run.lock`` names the process (see :mod:`spleenkit.runs`, which holds the layout and the lock).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleenkit.data.datalist import Datalist, dataset_fingerprint, load_datalist, split_datalist
from spleenkit.distributed import is_main_process, mean_over_ranks, unwrap_model
from spleenkit.errors import BadInputError, SpleenkitError
from spleenkit.io import write_text
from spleenkit.predict import autocast_inferer, make_inferer
from spleenkit.presets import Preset, get_preset
from spleenkit.runs import (  # noqa: F401 - the run-folder layout, importable from here as before
    CHECKPOINT_NAME,
    METRICS_NAME,
    MODEL_NAME,
    TENSORBOARD_DIR,
    RunLock,
    output_folder,
    prepare_run_dir,
    read_metrics,
)

if TYPE_CHECKING:
    import torch
    from monai.data import CacheDataset
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from torch.utils.data import DataLoader

    from spleenkit.devices import Precision
    from spleenkit.distributed import DistributedContext

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
#: The largest patch side accepted (the UNet trains on crops; a whole resampled MSD image is about 340 voxels).
MAX_PATCH_SIDE = 512
#: Training memory per input voxel of one patch in float32: 167 bytes kept for the backward pass by the bundle's
#: UNet (measured with saved-tensor hooks), doubled for the gradients and the forward's passing maps.
ACTIVATION_BYTES_PER_VOXEL = 350
#: Preset settings that may change when a run is resumed; any other change is refused (see check_resume_recipe).
RESUMABLE_SETTINGS = frozenset({"description", "epochs", "validation_interval", "cache_rate", "amp",
                                "sliding_window_batch_size", "channels_last", "extra"})
_CHECKPOINT_KEYS = ("format", "model", "optimizer", "scheduler", "scaler", "epoch", "iteration",
                    "best_metric", "best_metric_epoch")


# --------------------------------------------------------------------------- presets and machines
def resolve_preset(preset: Preset | str = "seed", **overrides: Any) -> Preset:
    """The preset with overrides (``None`` values ignored); a new ``patch_size`` also sets the
    validation window when the preset had them equal (as the bundle does, 96^3 for both)."""
    base = get_preset(preset)
    overrides = {key: value for key, value in overrides.items() if value is not None}
    resolved = base.replace(**overrides) if overrides else base
    if ("patch_size" in overrides and "validation_roi_size" not in overrides
            and tuple(base.validation_roi_size) == tuple(base.patch_size)):
        resolved = resolved.replace(validation_roi_size=resolved.patch_size)
    if resolved.epochs < 1 or resolved.batch_size < 1 or resolved.validation_interval < 1:
        raise BadInputError(f"epochs, batch size and validation interval must be at least 1 (got {resolved.epochs}, "
                            f"{resolved.batch_size}, {resolved.validation_interval})")
    if not 0.0 <= resolved.cache_rate <= 1.0:
        raise BadInputError(f"cache rate must lie between 0 and 1 (got {resolved.cache_rate})")
    if min(resolved.patch_size) < 16:
        raise BadInputError(f"patch size {tuple(resolved.patch_size)} is too small for the UNet's four poolings "
                            "(use at least 16 voxels per side, a multiple of 16)")
    if resolved.norm == "instance" and math.prod(math.ceil(side / 16) for side in resolved.patch_size) < 2:
        raise BadInputError(f"patch size {tuple(resolved.patch_size)} leaves 1 voxel at the UNet's deepest level, "
                            "where instance norm has nothing to normalise over; use 32 voxels on at least one side, "
                            "or norm='batch'")
    for name in ("patch_size", "validation_roi_size"):
        size = tuple(getattr(resolved, name))
        if max(size) > MAX_PATCH_SIDE:
            raise BadInputError(f"{name.replace('_', ' ')} {size} is beyond {MAX_PATCH_SIDE} voxels per side; the "
                                "network trains on crops (the bundle uses 96)")
    rate = resolved.learning_rate
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not math.isfinite(rate) or not 0 < rate <= 1:
        raise BadInputError(f"learning rate {rate!r} must be a finite number between 0 and 1 (the bundle uses 1e-4)")
    return resolved


def estimate_step_memory(preset: Preset | str) -> int:
    """Bytes one training step needs for its activations: patches per batch x voxels per patch x
    :data:`ACTIVATION_BYTES_PER_VOXEL`, scaled by the network's width (float32, the upper bound)."""
    preset = get_preset(preset)
    patches = preset.batch_size * preset.num_samples
    width = preset.channels[0] / 16
    return int(patches * math.prod(preset.patch_size) * ACTIVATION_BYTES_PER_VOXEL * width)


def check_step_fits(preset: Preset | str, device: torch.device) -> None:
    """Refuse, before anything heavy starts, a patch whose training step cannot fit in the device's memory."""
    from spleenkit.environment import total_memory_gib

    preset = get_preset(preset)
    if device.type == "cuda":
        import torch

        available = torch.cuda.get_device_properties(device).total_memory
        where = f"{device}'s memory"
    else:
        memory = total_memory_gib()
        if memory is None:
            return
        available, where = int(memory * 2**30), "this machine's memory"
    needed = estimate_step_memory(preset)
    if needed > 0.9 * available:
        raise BadInputError(
            f"a training step with {preset.batch_size} x {preset.num_samples} patches of {tuple(preset.patch_size)} "
            f"needs about {needed / 2**30:.1f} GiB, more than {where} ({available / 2**30:.1f} GiB); use a smaller "
            "--patch or batch")


def default_num_workers() -> int:
    """The number of CPU cores this process may use (the default for caching and data loading)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- cache memory estimate
@dataclass
class CacheEstimate:
    """Memory the CacheDataset will take, estimated from the NIfTI headers before it is filled."""

    cases: int
    cached_cases: int
    total_bytes: int
    largest_shape: tuple[int, int, int]
    available_bytes: int | None = None

    @property
    def gib(self) -> float:
        """The estimate in GiB."""
        return self.total_bytes / 2**30

    @property
    def fits(self) -> bool:
        """False when the cache would take more than 80 % of the machine's memory."""
        return self.available_bytes is None or self.total_bytes <= 0.8 * self.available_bytes

    def combined(self, other: CacheEstimate) -> CacheEstimate:
        """The estimate for both caches together (training and validation)."""
        return CacheEstimate(
            cases=self.cases + other.cases, cached_cases=self.cached_cases + other.cached_cases,
            total_bytes=self.total_bytes + other.total_bytes,
            largest_shape=max(self.largest_shape, other.largest_shape, key=math.prod),
            available_bytes=self.available_bytes)

    def describe(self) -> str:
        """One line for logs and notebooks."""
        memory = f" of {self.available_bytes / 2**30:.1f} GiB" if self.available_bytes else ""
        return (f"caching {self.cached_cases}/{self.cases} cases needs about {self.gib:.2f} GiB{memory} "
                f"(largest resampled volume {self.largest_shape})")


def resampled_shape(path: str | os.PathLike[str], preset: Preset | str = "seed") -> tuple[int, int, int]:
    """The shape a volume gets after Orientationd + Spacingd, read from its header only (no voxels)."""
    import nibabel as nib
    import numpy as np

    from spleenkit.images import read_nifti

    preset = get_preset(preset)
    image = read_nifti(path)
    shape = np.asarray(image.shape[:3], dtype=float)
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=float)
    # axis i of the file becomes axis ornt[i, 0] after reorientation to RAS (the only orientation used)
    ornt = nib.orientations.io_orientation(image.affine)
    extent = np.zeros(3)
    for axis, (target, _) in enumerate(ornt):
        extent[int(target)] = shape[axis] * zooms[axis]
    return tuple(max(1, int(round(e / s))) for e, s in zip(extent, preset.spacing, strict=True))  # type: ignore[return-value]


def estimate_cache_memory(items: Datalist, preset: Preset | str = "seed", cache_rate: float | None = None,
                          keys: Sequence[str] = ("image", "label"), padded: bool | None = None) -> CacheEstimate:
    """Bytes the cached, resampled volumes take: voxels after resampling x 4 bytes (float32) x one
    channel per key (image and label), padded to the patch when ``padded`` (default: when the preset
    pads, as the training cache does; the validation cache is never padded)."""
    from spleenkit.environment import total_memory_gib

    preset = get_preset(preset)
    rate = preset.cache_rate if cache_rate is None else cache_rate
    cached = min(len(items), int(len(items) * rate))
    shapes = []
    for record in items:
        shape = resampled_shape(record["image"], preset)
        if preset.pad_to_patch if padded is None else padded:
            shape = tuple(max(s, p) for s, p in zip(shape, preset.patch_size, strict=True))
        shapes.append(shape)
    per_case = [math.prod(shape) * 4 * len(keys) for shape in shapes]
    memory = total_memory_gib()
    return CacheEstimate(
        cases=len(items),
        cached_cases=cached,
        total_bytes=sum(per_case[:cached]),
        largest_shape=max(shapes, key=math.prod) if shapes else (0, 0, 0),
        available_bytes=int(memory * 2**30) if memory else None,
    )


def check_patch_fits(items: Datalist, preset: Preset | str) -> None:
    """Without padding, every resampled image must hold a whole patch; say which one does not."""
    preset = get_preset(preset)
    if preset.pad_to_patch:
        return
    for record in items:
        shape = resampled_shape(record["image"], preset)
        if any(s < p for s, p in zip(shape, preset.patch_size, strict=True)):
            raise BadInputError(
                f"after resampling to {tuple(preset.spacing)} mm the image is {shape} voxels, smaller than the "
                f"patch {tuple(preset.patch_size)}; use a smaller patch or pad_to_patch=True", record["image"])


# --------------------------------------------------------------------------- data
@dataclass
class Datasets:
    """The training and validation CacheDatasets and the memory estimate made before filling them."""

    train: CacheDataset
    validation: CacheDataset
    estimate: CacheEstimate


def build_datasets(train_items: Datalist, validation_items: Datalist, preset: Preset | str = "seed", *,
                   cache_rate: float | None = None, num_workers: int | None = None,
                   progress: bool = False) -> Datasets:
    """CacheDatasets of the deterministic chain (the random crops run after the cache, on every draw).

    The RAM the cache will take is estimated from the headers and logged before filling starts;
    a warning suggests a cache rate when it would not fit in memory.
    """
    from monai.data import CacheDataset

    from spleenkit.environment import SMALL_MEMORY_GIB, release_free_memory, total_memory_gib
    from spleenkit.transforms import training_transforms, validation_transforms

    preset = get_preset(preset)
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
    if distributed:
        from spleenkit.distributed import train_sampler

        return train_sampler(dataset, seed=seed)
    return None


def build_loaders(datasets: Datasets, preset: Preset | str = "seed", *, num_workers: int | None = None,
                  distributed: bool = False) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders.

    A fully cached training set is read by a ThreadDataLoader: the random crops run in a background
    thread while the network trains, with no worker processes to start. Uncached items are loaded
    from disk by ``num_workers`` processes.
    """
    from monai.data import DataLoader, ThreadDataLoader

    preset = get_preset(preset)
    train_ds = datasets.train
    fully_cached = getattr(train_ds, "cache_num", 0) >= len(train_ds)
    workers = 0 if fully_cached else (default_num_workers() if num_workers is None else num_workers)
    sampler = make_train_sampler(train_ds, distributed=distributed, seed=preset.seed)
    train_loader = ThreadDataLoader(train_ds, batch_size=preset.batch_size, shuffle=sampler is None,
                                    sampler=sampler, num_workers=workers)
    validation_loader = DataLoader(datasets.validation, batch_size=1, shuffle=False, num_workers=0)
    return train_loader, validation_loader


# --------------------------------------------------------------------------- loss, optimiser, scheduler
def make_loss(preset: Preset | str = "seed") -> torch.nn.Module:
    """DiceCELoss exactly as the bundle sets it, or the tutorial's DiceLoss."""
    from monai.losses import DiceCELoss, DiceLoss

    preset = get_preset(preset)
    if preset.loss == "dice_ce":
        return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, squared_pred=True,
                          batch=True, smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=0.5, lambda_ce=0.5)
    if preset.loss == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True)
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


def make_scheduler(preset: Preset | str, optimizer: torch.optim.Optimizer,
                   total_iterations: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The preset's learning-rate schedule, stepped once per iteration: none, StepLR (bundle 0.5.9)
    or a cosine decay to zero over ``total_iterations``."""
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


# --------------------------------------------------------------------------- mixed precision
def mixed_precision_step(network: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         loss_function: Callable, optimizer: torch.optim.Optimizer,
                         scaler: torch.amp.GradScaler, device: torch.device, amp: bool,
                         set_to_none: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: forward under the device's autocast (float16 on CUDA, bfloat16 on CPU),
    loss in float32, backward through the gradient scaler (active only for float16). Returns (pred, loss)."""
    from spleenkit.devices import autocast

    network.train()
    optimizer.zero_grad(set_to_none=set_to_none)
    with autocast(device, amp):
        pred = network(inputs)
    loss = loss_function(pred.float(), targets).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return pred, loss.detach()


@functools.cache
def _bf16_weight_gradient_ok(shape: tuple[int, int, int]) -> bool:
    """Whether this PyTorch computes a Conv3d weight gradient on a ``shape`` feature map correctly under
    CPU bfloat16 autocast (compared with float32 on small random data; no global random state used)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(2, 4, *shape, generator=generator)
    weight0 = torch.rand(4, 4, 3, 3, 3, generator=generator) - 0.5
    # the kit trains channels-last on the CPU (devices.memory_format), where the error shows for other
    # shapes (e.g. 2x6x6): that layout is checked always; the default layout (slow to check, about 10 s
    # at 48^3 here) where the error is known to show, a side of 2 or less
    layouts = [torch.channels_last_3d] + ([torch.contiguous_format] if min(shape) <= 2 else [])
    for layout in layouts:
        gradients = []
        for dtype in (None, torch.bfloat16):
            weight = weight0.clone().contiguous(memory_format=layout).requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                output = torch.nn.functional.conv3d(inputs.contiguous(memory_format=layout), weight, padding=1)
            output.float().pow(2).sum().backward()
            gradients.append(weight.grad)
        reference, mixed = gradients
        error = float((mixed - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
        if not error < 0.05:  # bfloat16 itself is good to about 1 %
            return False
    return True


def cpu_bf16_training_ok(patch_size: Sequence[int], strides: Sequence[int] = (2, 2, 2, 2)) -> bool:
    """Whether bfloat16 training on this CPU gives correct gradients for the UNet's feature maps.

    PyTorch's oneDNN bfloat16 Conv3d weight gradient is wrong (errors of 50 % up to 1e36, not even
    reproducible) when the first spatial size of a feature map is 2, e.g. the bottom of the UNet
    for 32^3 patches; the kit checks the sizes it will use and trains in float32 where needed.
    """
    size = [int(d) for d in patch_size]
    shapes = {tuple(size)}
    for stride in strides:
        size = [max(1, -(-d // stride)) for d in size]
        shapes.add(tuple(size))
    return all(_bf16_weight_gradient_ok(shape) for shape in sorted(shapes))  # type: ignore[arg-type]


def training_precision(preset: Preset | str, device: torch.device, amp: bool | None = None) -> Precision:
    """The precision training runs in on ``device`` (see :func:`spleenkit.devices.choose_precision`): ``amp``
    when given, else the preset's (on: the fastest correct choice here). On a CPU, bfloat16 only where the CPU
    has it natively and its Conv3d gradients are right for the patch size (:func:`cpu_bf16_training_ok`)."""
    from spleenkit.devices import Precision, choose_precision

    preset = get_preset(preset)
    requested = amp if amp is not None else (None if preset.amp else False)
    choice = choose_precision(device, requested)
    if choice.enabled and device.type == "cpu" and not cpu_bf16_training_ok(preset.patch_size, preset.strides):
        log.warning("bfloat16 Conv3d gradients are wrong in this PyTorch on this CPU for patch %s (a feature map "
                    "2 voxels deep): training in float32 instead; patches of 48 or 64 avoid it",
                    tuple(preset.patch_size))
        reason = f"bfloat16 Conv3d gradients are wrong here for patch {tuple(preset.patch_size)}: float32"
        return Precision(None, reason, choice.capability)
    return choice


def validation_precision(preset: Preset | str, device: torch.device, amp: bool | None = None) -> Precision:
    """The precision of validation during training: the training choice without the gradient check (no
    backward pass), so a CPU without native bfloat16 validates in float32 too."""
    from spleenkit.devices import choose_precision

    preset = get_preset(preset)
    return choose_precision(device, amp if amp is not None else (None if preset.amp else False))


def training_amp(preset: Preset | str, device: torch.device, amp: bool | None = None) -> bool:
    """Whether training autocasts on ``device`` (the bundle configs' ``iteration_update`` asks this); see
    :func:`training_precision`."""
    return training_precision(preset, device, amp).enabled


class TrainingStep:
    """The ``iteration_update`` of a SupervisedTrainer: :func:`mixed_precision_step` on the batch.

    Holds the gradient scaler so that checkpoints can save and restore it.
    """

    def __init__(self, device: torch.device, amp: bool = True) -> None:
        from spleenkit.devices import amp_dtype, grad_scaler

        self.device = device
        self.amp = amp
        self.dtype = amp_dtype(device, amp)
        self.scaler = grad_scaler(device, amp)

    def __call__(self, engine: SupervisedTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        from monai.engines.utils import IterationEvents
        from monai.utils.enums import CommonKeys as Keys

        if batchdata is None:
            raise ValueError("the training loader gave no batch")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                               **engine.to_kwargs)[:2]
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        pred, loss = mixed_precision_step(engine.network, inputs, targets, engine.loss_function, engine.optimizer,
                                          self.scaler, self.device, self.amp, set_to_none=True)
        engine.state.output[Keys.PRED] = pred
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def make_iteration_update(device: torch.device, amp: bool = True) -> TrainingStep:
    """The mixed-precision iteration for ``SupervisedTrainer(iteration_update=...)`` (bundle configs use this)."""
    return TrainingStep(device, amp)


def measure_step_seconds(preset: Preset | str = "quick", device: str | torch.device = "auto", *, steps: int = 3,
                         warmup: int = 1, batch: dict[str, Any] | None = None, seed: int = 0,
                         include_slow: bool = False) -> dict[str, Any]:
    """Seconds per training step in float32 and in mixed precision, measured alternately in one run
    (so that other load on the machine hits both alike): the fastest of ``steps`` each (the least
    disturbed by other work; the medians are returned too), and their ratio.

    Where the kit would not use mixed precision because it is slower here (a CPU without native
    bfloat16, about 20x slower), the mixed variant is left out (``mixed_seconds`` None, ``skipped``
    says why) unless ``include_slow``. ``chosen`` is the precision training would use.

    Uses ``batch`` (a collated batch from the training loader) or a random one of the preset's size:
    ``batch_size x num_samples`` patches.
    """
    import statistics

    import torch

    from spleenkit.devices import amp_dtype, bfloat16_is_faster, grad_scaler, pick_device, use_fast_layout
    from spleenkit.model import build_unet

    preset = get_preset(preset)
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    chosen = training_precision(preset.replace(amp=True), torch_device)
    slow = torch_device.type == "cpu" and not bfloat16_is_faster()
    variants = [False] if slow and not include_slow else [False, True]
    generator = torch.Generator().manual_seed(seed)
    if batch is None:
        shape = (preset.batch_size * preset.num_samples, 1, *preset.patch_size)
        image = torch.rand(shape, generator=generator)
        label = (torch.rand(shape, generator=generator) > 0.8).float()
    else:
        image, label = batch["image"], batch["label"]
    image, label = image.to(torch_device), label.to(torch_device)
    torch.manual_seed(seed)
    network = use_fast_layout(build_unet(preset).to(torch_device), torch_device, preset.channels_last)  # as train()
    optimizer = make_optimizer(preset, network.parameters())
    loss_function = make_loss(preset)
    scalers = {False: grad_scaler(torch_device, False), True: grad_scaler(torch_device, True)}

    def one_step(amp: bool) -> float:
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
        start = time.perf_counter()
        mixed_precision_step(network, image, label, loss_function, optimizer, scalers[amp], torch_device, amp)
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
        return time.perf_counter() - start

    for _ in range(warmup):
        for amp in variants:
            one_step(amp)
    times: dict[bool, list[float]] = {amp: [] for amp in variants}
    for _ in range(steps):
        for amp in variants:
            times[amp].append(one_step(amp))
    fp32 = min(times[False])
    mixed = min(times[True]) if True in times else None
    return {"device": str(torch_device), "patches": int(image.shape[0]), "patch_size": tuple(image.shape[2:]),
            "float32_seconds": fp32, "mixed_seconds": mixed,
            "mixed_dtype": str(amp_dtype(torch_device, True)).removeprefix("torch."),
            "speedup": fp32 / mixed if mixed else None, "steps": steps,
            "float32_median_seconds": statistics.median(times[False]),
            "mixed_median_seconds": statistics.median(times[True]) if True in times else None,
            "chosen": chosen.name, "reason": chosen.reason, "capability": chosen.capability,
            "skipped": None if True in times else f"mixed precision not timed: {chosen.reason}"}


# --------------------------------------------------------------------------- engines
def build_evaluator(network: torch.nn.Module, validation_loader: Iterable, preset: Preset | str,
                    device: torch.device, *, amp: bool | None = None,
                    handlers: Sequence[Any] = ()) -> SupervisedEvaluator:
    """SupervisedEvaluator: sliding window (preset roi, window batch, overlap) under autocast,
    softmax + argmax, MeanDice without background (the bundle's key metric ``val_mean_dice``)."""
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanDice, StatsHandler, from_engine
    from monai.transforms import Activationsd, AsDiscreted, Compose

    preset = get_preset(preset)
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
    evaluator.logger = logging.getLogger(f"{__name__}.evaluator")
    if evaluator.logger.isEnabledFor(logging.INFO):
        StatsHandler(iteration_log=False, name=None).attach(evaluator)
    return evaluator


class NonFiniteTrainingError(SpleenkitError):
    """Training produced a NaN or infinite loss or weights; the message names the epoch and iteration."""


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
        from spleenkit.model import non_finite_weights

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
        from spleenkit.model import atomic_save, non_finite_weights

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
        from spleenkit.model import atomic_save

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


def build_trainer(network: torch.nn.Module, train_loader: Iterable, evaluator: SupervisedEvaluator,
                  preset: Preset | str, device: torch.device, *, run_dir: str | os.PathLike[str] | None,
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

    from spleenkit.devices import use_fast_layout

    preset = get_preset(preset)
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
        handlers.append(LrScheduleHandler(scheduler, print_lr=False, epoch_level=False))
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
    trainer.logger = logging.getLogger(f"{__name__}.trainer")
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


# --------------------------------------------------------------------------- checkpoints and resume
def read_last_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``checkpoint_last.pt`` safely (weights_only) and check it is complete before anything is restored."""
    from spleenkit.model import load_checkpoint

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
    preset (``manifest["parameters"]["preset"]``) and ``new``, as "name: old -> new" lines."""
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
    from spleenkit.manifest import read_manifest

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


def _truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Keep only metrics lines up to ``last_epoch`` (the checkpoint's), rewriting the file atomically."""
    kept = [record for record in read_metrics(run_dir) if record.get("epoch", 0) <= last_epoch]
    write_text(run_dir / METRICS_NAME, "".join(json.dumps(record) + "\n" for record in kept))


# --------------------------------------------------------------------------- run folder
def _labelled_split(data_dir: str | os.PathLike[str], preset: Preset) -> tuple[Datalist, Datalist]:
    items = load_datalist(data_dir, "training")
    unlabelled = [record["image"] for record in items if "label" not in record]
    if unlabelled:
        raise BadInputError(f"{len(unlabelled)} training case(s) have no label, e.g. {unlabelled[0]}",
                            Path(data_dir) / "dataset.json")
    return split_datalist(items, preset.validation_cases)


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
          **preset_overrides: Any) -> TrainingResult:
    """Train the bundle's UNet on an MSD-layout dataset folder and fill ``run_dir``.

    Under torchrun, pass ``distributed=spleenkit.distributed.init_process_group()``: each rank trains
    on its share through DDP (``sync_bn``: SyncBatchNorm on GPUs; ``scale_lr``: "none" or "linear"),
    and only rank 0 writes the run folder.

    ``preset_overrides`` are any :class:`~spleenkit.presets.Preset` settings (``patch_size=64``,
    ``learning_rate=1e-3``, ``validation_interval=1`` ...). ``resume=True`` continues from
    ``run_dir/checkpoint_last.pt`` (to the preset's or the given number of epochs); a recipe other than
    the run's is refused with the differences listed unless ``resume_anyway`` (recorded in the manifest).
    ``init_weights`` fine-tunes: the network starts from these weights (a kit run's ``model.pt`` or
    MONAI's released ``model.pt``, loaded strictly) instead of a random initialisation.

    Refused before anything heavy starts: a non-finite or absurd learning rate, a patch beyond
    :data:`MAX_PATCH_SIDE` or whose step (or the cache) cannot fit in memory, a run folder another run
    holds (:class:`~spleenkit.runs.RunLock`). Training stops at the first NaN or infinite loss or weights
    (:class:`NonFiniteTrainingError`), keeping the last good checkpoint. A run that fails before writing
    any file leaves no empty folder behind.
    """
    from spleenkit.devices import pick_device
    from spleenkit.distributed import check_sync_bn, scale_learning_rate
    from spleenkit.environment import release_free_memory, return_large_blocks_promptly
    from spleenkit.manifest import now

    started_at, started = now(), time.perf_counter()
    preset = resolve_preset(preset, epochs=epochs, amp=amp, seed=seed, cache_rate=cache_rate, **preset_overrides)
    base_learning_rate = preset.learning_rate
    preset = scale_learning_rate(preset, 1 if distributed is None else distributed.world_size, scale_lr)
    torch_device = pick_device(device) if distributed is None else distributed.device
    if sync_bn:
        check_sync_bn(torch_device)
    check_step_fits(preset, torch_device)
    # memory: large blocks go back to the system when freed, and what earlier work left (a notebook's other
    # trainings) is freed before this one fills its cache, and this one's after it (see spleenkit.environment)
    return_large_blocks_promptly()
    release_free_memory()
    try:
        with output_folder(run_dir, lock=is_main_process()):
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
    """The body of :func:`train`, run while this process holds the run folder's lock: choose the precision,
    find where to resume, build the engines, write the manifest, train, record the result."""
    from spleenkit.distributed import describe_training, workers_per_process
    from spleenkit.manifest import write_manifest

    # float32 on a CPU without native bfloat16, or where its bfloat16 gradients are wrong; ``amp`` forces it
    precision = training_precision(preset, torch_device, amp)
    validation = validation_precision(preset, torch_device, amp)
    log.info("training precision: %s (%s)", precision.name, precision.reason)
    workers = workers_per_process(default_num_workers(), distributed) if num_workers is None else num_workers
    if workers < 0:
        raise BadInputError(f"number of workers must be 0 or more (got {workers})")
    train_items, validation_items = _labelled_split(data_dir, preset)
    run_path = prepare_run_dir(run_dir, resume) if is_main_process() else Path(run_dir)
    checkpoint, recipe_changes = _resume_point(run_path, preset, resume, resume_anyway)
    start_epoch = 0 if checkpoint is None else int(checkpoint["epoch"])
    engines = _build_engines(train_items, validation_items, preset, torch_device, run_path, start_epoch,
                             precision=precision, validation=validation, workers=workers,
                             progress=progress and is_main_process(), distributed=distributed, sync_bn=sync_bn,
                             init_weights=init_weights)
    if checkpoint is not None:
        restore_checkpoint(engines.trainer, checkpoint, run_path / CHECKPOINT_NAME)
        if is_main_process():
            _truncate_metrics(run_path, start_epoch)
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


def _resume_point(run_path: Path, preset: Preset, resume: bool,
                  resume_anyway: bool) -> tuple[dict[str, Any] | None, list[str]]:
    """The checkpoint to resume from (None: start afresh) and the recipe changes allowed on resume; rank 0
    reads and checks, every rank gets the same answer (and refuses alike)."""
    from spleenkit.distributed import broadcast_object

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


def _build_engines(train_items: Datalist, validation_items: Datalist, preset: Preset, torch_device: torch.device,
                   run_path: Path, start_epoch: int, *, precision: Precision, validation: Precision, workers: int,
                   progress: bool, distributed: DistributedContext | None, sync_bn: bool,
                   init_weights: str | os.PathLike[str] | None = None) -> _Engines:
    """Cached datasets and loaders for this process's share, the UNet (fast layout, DDP), optimiser and schedule,
    the evaluator and the trainer with the run folder's handlers (TensorBoard on rank 0)."""
    from monai.handlers import TensorBoardStatsHandler
    from monai.utils import set_determinism

    from spleenkit.devices import use_fast_layout
    from spleenkit.distributed import in_turn, share_training_data, training_handlers, validation_handlers, wrap_model
    from spleenkit.environment import SMALL_MEMORY_GIB, total_memory_gib
    from spleenkit.model import build_unet, load_weights

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
    from spleenkit.devices import amp_dtype

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
    from spleenkit.devices import describe_device
    from spleenkit.manifest import build_manifest, read_manifest

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
    from spleenkit.manifest import now, write_manifest

    try:
        if start_epoch < preset.epochs:
            engines.trainer.run()
    except NonFiniteTrainingError as error:
        if is_main_process():
            manifest.update(finished=now(), error=str(error))
            write_manifest(run_path, manifest)
        raise
    finally:
        if engines.writer is not None:
            engines.writer.close()


def _record_result(engines: _Engines, run_path: Path, preset: Preset, torch_device: torch.device,
                   precision: Precision, start_epoch: int, started: float, manifest: dict[str, Any],
                   distributed: DistributedContext | None) -> TrainingResult:
    """The result of a finished run, also written into the manifest (with every rank's peak memory)."""
    from spleenkit.distributed import gather_objects
    from spleenkit.environment import peak_memory_mib
    from spleenkit.manifest import now, write_manifest

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

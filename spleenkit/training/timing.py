"""Timing a training step in float32 against mixed precision on this machine (notebook 03, the benchmarks)."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

from spleenkit.devices import amp_dtype, bfloat16_is_faster, grad_scaler, pick_device, use_fast_layout
from spleenkit.model import build_unet
from spleenkit.presets import Preset, get_preset
from spleenkit.training.engines import make_loss, make_optimizer
from spleenkit.training.precision import mixed_precision_step, training_precision

if TYPE_CHECKING:
    import torch


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
    import torch

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

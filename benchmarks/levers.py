"""What each speed lever is worth: one training step and one sliding-window batch, variant by variant.

Every variant runs in this one process on the same random batch and the same initial weights,
the variants taking turns (a, b, c, a, b, c ...) so that load on the machine hits them alike;
the report gives the median seconds and the speed-up over plain float32 (what the reference runs).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

from common import synchronize

#: name -> (mixed precision, channels-last, plain tensors instead of MetaTensor)
TRAINING_VARIANTS = {
    "float32 (the reference's step on a CPU)": (False, False, False),
    "float32 + channels-last": (False, True, False),
    "bfloat16 (the kit before)": (True, False, False),
    "bfloat16 + channels-last (the kit)": (True, True, False),
    "bfloat16 + channels-last + plain tensors, no MetaTensor (not kept)": (True, True, True),
}
#: name -> (mixed precision, channels-last, batch norm folded, inference_mode instead of no_grad)
INFERENCE_VARIANTS = {
    "float32 (the reference)": (False, False, False, False),
    "bfloat16 (the kit before)": (True, False, False, False),
    "float32 + channels-last": (False, True, False, False),
    "float32 + channels-last + folded BN (the kit on a CPU)": (False, True, True, False),
    "float32 + channels-last + folded BN + inference_mode (not kept)": (False, True, True, True),
    "bfloat16 + channels-last + folded BN (the kit with --amp)": (True, True, True, False),
}


def _timed(variants: dict[str, Any], run: Any, warmup: int, repeats: int, device: Any) -> dict[str, Any]:
    for name in variants:
        for _ in range(warmup):
            run(name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name in variants:
            synchronize(device)
            started = time.perf_counter()
            run(name)
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times[next(iter(variants))])
    return {name: {"seconds": [round(t, 4) for t in values], "median_seconds": round(statistics.median(values), 4),
                   "speedup": round(base / statistics.median(values), 3)} for name, values in times.items()}


def training(params: dict[str, Any]) -> dict[str, Any]:
    """One optimisation step (forward, DiceCE loss, backward, Adam) per variant."""
    import torch
    from monai.data import MetaTensor

    from spleenkit.devices import grad_scaler, pick_device
    from spleenkit.model import build_unet
    from spleenkit.training import make_loss, make_optimizer, mixed_precision_step

    device = pick_device(params["device"])
    size, batch = params["patch"], params["batch"]
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 1, size, size, size, generator=generator).to(device)
    label = (torch.rand(batch, 1, size, size, size, generator=generator) > 0.8).float().to(device)
    torch.manual_seed(0)
    base = build_unet("seed").to(device)
    loss = make_loss("seed")
    states = {}
    for name, (amp, channels_last, _) in TRAINING_VARIANTS.items():
        network = copy.deepcopy(base)
        if channels_last:
            network = network.to(memory_format=torch.channels_last_3d)
        states[name] = (network, make_optimizer("seed", network.parameters()), grad_scaler(device, amp))

    def run(name: str) -> None:
        amp, _, plain = TRAINING_VARIANTS[name]
        network, optimizer, scaler = states[name]
        inputs, targets = (image, label) if plain else (MetaTensor(image), MetaTensor(label))
        mixed_precision_step(network, inputs, targets, loss, optimizer, scaler, device, amp)

    results = _timed(TRAINING_VARIANTS, run, params["warmup"], params["repeats"], device)
    return {"patch": size, "batch": batch, "variants": results}


def inference(params: dict[str, Any]) -> dict[str, Any]:
    """One batch of sliding windows through the network (eval mode) per variant."""
    import torch

    from spleenkit.devices import autocast, pick_device
    from spleenkit.model import build_unet
    from spleenkit.predict import inference_network

    device = pick_device(params["device"])
    size, batch = params["roi"], params["batch"]
    windows = torch.rand(batch, 1, size, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    base = build_unet("seed").to(device).eval()
    with torch.no_grad():  # batch statistics that are not the identity, so folding has work to do
        for module in base.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    folded = inference_network(base, device)
    channels_last = copy.deepcopy(base).to(memory_format=torch.channels_last_3d)
    outputs: dict[str, Any] = {}

    def run(name: str) -> None:
        amp, last, fold, inference_mode = INFERENCE_VARIANTS[name]
        network = folded if fold else channels_last if last else base
        context = torch.inference_mode() if inference_mode else torch.no_grad()
        with context, autocast(device, amp):
            outputs[name] = network(windows).float()

    results = _timed(INFERENCE_VARIANTS, run, params["warmup"], params["repeats"], device)
    reference = outputs[next(iter(INFERENCE_VARIANTS))]
    for name, output in outputs.items():
        results[name]["max_abs_difference"] = float((output - reference).abs().max())
    return {"roi": size, "batch": batch, "variants": results}


TASKS = {"training": training, "inference": inference}

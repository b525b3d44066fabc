"""The kit's side: the same tasks done by spleenkit's own functions, as ``spleenkit train`` / ``infer`` do them.

Training is assembled from the public pieces that :func:`spleenkit.training.train` uses (cached
datasets, loaders, UNet, optimiser, schedule, evaluator, trainer with its run-folder recorder),
so that a timer can be attached; inference calls :func:`spleenkit.predict.predict_mask`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from common import QualityWatch, StepTimer, synchronize


def _parts(preset: Any, train_items: list[dict], validation_items: list[dict], device: Any, run_dir: Path,
           started: float) -> dict[str, Any]:
    from monai.utils import set_determinism

    from spleenkit.model import build_unet
    from spleenkit.training import (
        build_datasets,
        build_evaluator,
        build_loaders,
        build_trainer,
        default_num_workers,
        make_optimizer,
        make_scheduler,
    )

    set_determinism(seed=preset.seed)
    datasets = build_datasets(train_items, validation_items, preset, num_workers=default_num_workers())
    cache_seconds = time.perf_counter() - started
    train_loader, validation_loader = build_loaders(datasets, preset)
    network = build_unet(preset).to(device)
    optimizer = make_optimizer(preset, network.parameters())
    scheduler = make_scheduler(preset, optimizer, total_iterations=preset.epochs * len(train_loader))
    # amp=None: the precision the kit chooses for this device and preset (spleenkit.devices.choose_precision)
    evaluator = build_evaluator(network, validation_loader, preset, device, amp=None)
    trainer = build_trainer(network, train_loader, evaluator, preset, device, run_dir=run_dir, optimizer=optimizer,
                            scheduler=scheduler, amp=None, progress=False)
    return {"trainer": trainer, "network": network, "cache_seconds": cache_seconds, "cases": len(train_items)}


def _preset(params: dict[str, Any]) -> Any:
    from spleenkit.presets import resolve_preset

    return resolve_preset(params.get("preset", "seed"), params.get("overrides", {}))


def throughput(params: dict[str, Any]) -> dict[str, Any]:
    """Training steps per second of the kit's trainer (the seed recipe by default), no validation."""
    from spleenkit.devices import amp_dtype, pick_device
    from spleenkit.training import training_amp

    device = pick_device(params["device"])
    preset = _preset(params).replace(validation_interval=10**6)  # a throughput run never validates
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spleenkit-bench-") as run_dir:
        parts = _parts(preset, params["train_items"], [], device, Path(run_dir), started)
        timer = StepTimer(parts["network"], device, params["warmup"], params["steps"], started)
        timer.attach(parts["trainer"])
        parts["trainer"].run()
        synchronize(device)
    dtype = amp_dtype(device, training_amp(preset, device))  # what the trainer's step uses
    return {"settings": preset.to_dict(), "cache_fill_seconds": round(parts["cache_seconds"], 3),
            "cached_cases": parts["cases"],
            "preprocess_cases_per_second": round(parts["cases"] / parts["cache_seconds"], 4),
            "precision": "float32" if dtype is None else str(dtype).removeprefix("torch."), **timer.summary()}


def quality(params: dict[str, Any]) -> dict[str, Any]:
    """Train with a kit preset until validation Dice reaches the target or the cap passes."""
    from spleenkit.data.datalist import load_datalist, split_datalist
    from spleenkit.devices import pick_device

    device = pick_device(params["device"])
    preset = _preset(params)
    items = load_datalist(params["data_dir"])
    train_items, validation_items = split_datalist(items, preset.validation_cases)
    run_dir = Path(params["weights_out"]).parent
    started = time.perf_counter()
    parts = _parts(preset, train_items, validation_items, device, run_dir, started)
    watch = QualityWatch(started, params["target"], params["cap_seconds"],
                         lambda engine: getattr(engine.state, "val_dice", None)).attach(parts["trainer"])
    parts["trainer"].run()
    weights = run_dir / "model.pt"
    if weights.exists() and weights != Path(params["weights_out"]):
        weights.replace(params["weights_out"])
    return {"settings": preset.to_dict(), "cache_fill_seconds": round(parts["cache_seconds"], 3),
            "weights": params["weights_out"] if Path(params["weights_out"]).exists() else None, **watch.summary()}


def inference(params: dict[str, Any]) -> dict[str, Any]:
    """``spleenkit infer``'s prediction on one image (file to mask on its grid), with the seed preset."""
    import numpy as np

    import spleenkit.predict as prediction
    from spleenkit.devices import amp_dtype, pick_device
    from spleenkit.model import load_model
    from spleenkit.predict import inference_amp, inference_network, make_inferer, predict_mask

    device = pick_device(params["device"])
    preset = _preset(params)
    amp = inference_amp(preset, device, params.get("amp"))
    network = inference_network(load_model(params["weights"], preset, device), device)  # as `spleenkit infer`
    inferer = make_inferer(preset, device=device)
    window = {"seconds": 0.0}
    predict_logits = prediction.predict_logits

    def timed_logits(*args: Any, **kwargs: Any) -> Any:  # to report the sliding window's share
        begun = time.perf_counter()
        logits = predict_logits(*args, **kwargs)
        synchronize(device)
        window["seconds"] += time.perf_counter() - begun
        return logits

    prediction.predict_logits = timed_logits
    started = time.perf_counter()
    mask = predict_mask(network, params["image"], preset, inferer, device, amp)
    seconds = time.perf_counter() - started
    prediction.predict_logits = predict_logits
    np.save(params["mask_out"], mask)
    dtype = amp_dtype(device, amp)
    return {"settings": preset.to_dict(), "seconds": round(seconds, 3), "window_seconds": round(window["seconds"], 3),
            "precision": "float32" if dtype is None else str(dtype).removeprefix("torch."),
            "shape": list(mask.shape), "foreground_voxels": int(mask.sum())}


TASKS = {"throughput": throughput, "quality": quality, "inference": inference}

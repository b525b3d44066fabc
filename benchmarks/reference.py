"""The reference side: the spleen bundle's pipeline built the plain way, in MONAI only.

This mirrors MONAI model-zoo ``spleen_ct_segmentation/configs/train.json`` and ``inference.json``
object for object: CacheDataset (cache_rate 1.0, 4 workers, deep copy of each cached item per
draw, MONAI's default) + DataLoader (4 worker processes, shuffle), a SupervisedTrainer with
``amp=True`` (float16 on CUDA; on a CPU MONAI ignores it, so the step runs in float32),
``SimpleInferer``, the train post-processing and the ``Accuracy`` train metric, validation by a
SupervisedEvaluator with a 96^3 sliding window (batch 4, overlap 0.5) and MeanDice, and the best
model kept by CheckpointSaver. It deliberately uses none of the kit's pipeline functions: it is the
thing the kit is compared against.

Two changes, the same for any data that is not MSD: ``SpatialPadd`` to the patch before the crop
(the synthetic volumes can be a voxel shorter than the patch after resampling, where the bundle's
crops would come out uneven and fail to batch; a no-op otherwise), and the sizes (spacing, patch,
window, learning rate, validation interval, workers) are parameters so the time-to-quality run can
scale them to the synthetic data. The benchmark report states the values used.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from common import QualityWatch, StepTimer, synchronize

#: The bundle's values (train.json / inference.json).
BUNDLE = {
    "spacing": (1.5, 1.5, 2.0),
    "intensity_range": (-57.0, 164.0),
    "patch_size": (96, 96, 96),
    "num_samples": 4,
    "batch_size": 2,
    "learning_rate": 1e-4,
    "validation_interval": 5,
    "roi_size": (96, 96, 96),
    "sw_batch_size": 4,
    "overlap": 0.5,
    "num_workers": 4,
    "seed": 123,
}


def settings(**overrides: Any) -> dict[str, Any]:
    """The bundle's values with ``overrides`` (None values ignored)."""
    values = dict(BUNDLE)
    values.update({key: value for key, value in overrides.items() if value is not None})
    return values


def deterministic_transforms(s: dict[str, Any], keys: tuple[str, ...] = ("image", "label")) -> list:
    from monai.transforms import (
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    keys = list(keys)
    low, high = s["intensity_range"]
    return [
        LoadImaged(keys=keys),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=tuple(s["spacing"]), mode=["bilinear", "nearest"][: len(keys)]),
        ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys=keys),
    ]


def random_transforms(s: dict[str, Any]) -> list:
    from monai.transforms import RandCropByPosNegLabeld, SpatialPadd

    return [
        SpatialPadd(keys=["image", "label"], spatial_size=tuple(s["patch_size"])),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=tuple(s["patch_size"]),
                               pos=1, neg=1, num_samples=s["num_samples"], image_key="image", image_threshold=0),
    ]


def network() -> Any:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                num_res_units=2, norm="batch")


def loss() -> Any:
    from monai.losses import DiceCELoss

    return DiceCELoss(include_background=True, to_onehot_y=True, softmax=True, squared_pred=True, batch=True,
                      smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=0.5, lambda_ce=0.5)


def post_transforms() -> Any:
    from monai.transforms import Activationsd, AsDiscreted, Compose

    return Compose([Activationsd(keys="pred", softmax=True),
                    AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2)])


def build(train_items: list[dict], validation_items: list[dict], s: dict[str, Any], device: Any,
          ckpt_dir: str | None = None, max_epochs: int = 10**6) -> dict[str, Any]:
    """The bundle's trainer and evaluator (validation only when ``validation_items``)."""
    import ignite.metrics
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import CheckpointSaver, MeanDice, ValidationHandler, from_engine
    from monai.inferers import SimpleInferer, SlidingWindowInferer
    from monai.transforms import Compose
    from monai.utils import set_determinism

    set_determinism(seed=s["seed"])
    net = network().to(device)
    started = time.perf_counter()
    train_ds = CacheDataset(train_items, Compose(deterministic_transforms(s) + random_transforms(s)), cache_rate=1.0,
                            num_workers=s["num_workers"], progress=False)
    cache_seconds = time.perf_counter() - started
    train_loader = DataLoader(train_ds, batch_size=s["batch_size"], shuffle=True, num_workers=s["num_workers"])
    handlers: list[Any] = []
    evaluator = None
    validation_cache_seconds = 0.0
    if validation_items:
        started = time.perf_counter()
        val_ds = CacheDataset(validation_items, Compose(deterministic_transforms(s)), cache_rate=1.0,
                              progress=False)
        validation_cache_seconds = time.perf_counter() - started
        val_loader = DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=s["num_workers"])
        val_handlers: list[Any] = []
        if ckpt_dir is not None:
            val_handlers.append(CheckpointSaver(save_dir=ckpt_dir, save_dict={"model": net}, save_key_metric=True,
                                                key_metric_filename="model.pt"))
        evaluator = SupervisedEvaluator(
            device=device, val_data_loader=val_loader, network=net,
            inferer=SlidingWindowInferer(roi_size=tuple(s["roi_size"]), sw_batch_size=s["sw_batch_size"],
                                         overlap=s["overlap"]),
            postprocessing=post_transforms(),
            key_val_metric={"val_mean_dice": MeanDice(include_background=False,
                                                      output_transform=from_engine(["pred", "label"]))},
            additional_metrics={"val_accuracy": ignite.metrics.Accuracy(
                output_transform=from_engine(["pred", "label"]))},
            val_handlers=val_handlers, amp=True)
        handlers.append(ValidationHandler(validator=evaluator, epoch_level=True, interval=s["validation_interval"]))
    trainer = SupervisedTrainer(
        device=device, max_epochs=max_epochs, train_data_loader=train_loader, network=net, loss_function=loss(),
        optimizer=torch.optim.Adam(net.parameters(), lr=s["learning_rate"]), inferer=SimpleInferer(),
        postprocessing=post_transforms(),
        key_train_metric={"train_accuracy": ignite.metrics.Accuracy(
            output_transform=from_engine(["pred", "label"]))},
        train_handlers=handlers, amp=True)
    return {"trainer": trainer, "evaluator": evaluator, "network": net, "cache_seconds": cache_seconds,
            "validation_cache_seconds": validation_cache_seconds, "cases": len(train_items)}


def throughput(params: dict[str, Any]) -> dict[str, Any]:
    """Training steps per second of the bundle's trainer (no validation), after ``warmup`` steps."""
    import torch

    device = torch.device(params["device"])
    s = settings(**params.get("settings", {}))
    started = time.perf_counter()
    parts = build(params["train_items"], [], s, device)
    timer = StepTimer(parts["network"], device, params["warmup"], params["steps"], started).attach(parts["trainer"])
    parts["trainer"].run()
    synchronize(device)
    return {"settings": _jsonable(s), "cache_fill_seconds": round(parts["cache_seconds"], 3),
            "cached_cases": parts["cases"],
            "preprocess_cases_per_second": round(parts["cases"] / parts["cache_seconds"], 4),
            "precision": "float16" if device.type == "cuda" else "float32", **timer.summary()}


def quality(params: dict[str, Any]) -> dict[str, Any]:
    """Train with the bundle's recipe until validation Dice reaches the target or the cap passes."""
    import torch

    device = torch.device(params["device"])
    s = settings(**params.get("settings", {}))
    started = time.perf_counter()
    weights = Path(params["weights_out"])
    weights.parent.mkdir(parents=True, exist_ok=True)
    parts = build(params["train_items"], params["validation_items"], s, device, ckpt_dir=str(weights.parent))
    evaluator = parts["evaluator"]
    seen = {"epoch": 0}

    def dice_of(engine: Any) -> float | None:
        if evaluator.state.epoch == seen["epoch"] or not evaluator.state.metrics:
            return None
        seen["epoch"] = evaluator.state.epoch
        return float(evaluator.state.metrics["val_mean_dice"])

    watch = QualityWatch(started, params["target"], params["cap_seconds"], dice_of).attach(parts["trainer"])
    parts["trainer"].run()
    saved = weights.parent / "model.pt"
    if saved.exists() and saved != weights:
        saved.replace(weights)
    return {"settings": _jsonable(s), "cache_fill_seconds": round(parts["cache_seconds"], 3),
            "validation_cache_seconds": round(parts["validation_cache_seconds"], 3),
            "weights": str(weights) if weights.exists() else None, **watch.summary()}


def inference(params: dict[str, Any]) -> dict[str, Any]:
    """inference.json on one image: preprocessing, sliding window (float32), softmax, Invertd, argmax.

    Times the path from file to mask on the original grid (the bundle's SaveImaged is left out).
    """
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd

    device = torch.device(params["device"])
    s = settings(**params.get("settings", {}))
    net = network().to(device)
    net.load_state_dict(torch.load(params["weights"], map_location=device, weights_only=True))
    net.eval()
    preprocessing = Compose(deterministic_transforms(s, keys=("image",)))
    postprocessing = Compose([
        Activationsd(keys="pred", softmax=True),
        Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted(keys="pred", argmax=True),
    ])
    started = time.perf_counter()
    data = preprocessing({"image": params["image"]})
    preprocessed = time.perf_counter()
    with torch.no_grad():  # what SupervisedEvaluator's eval mode does; amp=True is float32 on a CPU
        data["pred"] = sliding_window_inference(data["image"][None].to(device), tuple(s["roi_size"]),
                                                s["sw_batch_size"], net, overlap=s["overlap"])[0]
    synchronize(device)
    windowed = time.perf_counter()
    mask = postprocessing(data)["pred"]
    mask = np.asarray(mask[0].cpu().numpy() > 0.5, dtype=np.uint8)
    finished = time.perf_counter()
    np.save(params["mask_out"], mask)
    return {"settings": _jsonable(s), "seconds": round(finished - started, 3),
            "preprocess_seconds": round(preprocessed - started, 3), "window_seconds": round(windowed - preprocessed, 3),
            "postprocess_seconds": round(finished - windowed, 3), "precision": "float32",
            "shape": list(mask.shape), "foreground_voxels": int(mask.sum())}


def _jsonable(s: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}


TASKS = {"throughput": throughput, "quality": quality, "inference": inference}

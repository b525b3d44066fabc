"""The bundle's UNet, and saving and loading its weights safely, with the recipe they were trained with.

The network is built exactly as spleen_ct_segmentation's ``network_def`` so that official
weights load with strict key matching. Checkpoints are read with ``weights_only=True`` and
written atomically (a temporary file renamed into place), so a crash never leaves half a file.

A network built here carries its recipe: its state dict's metadata (``state_dict._metadata``, which
``torch.save`` keeps and which ``load_state_dict``, MONAI's ``CheckpointLoader`` and ``ckpt_export``
ignore) holds the preset under :data:`RECIPE_KEY`. So a ``model.pt`` stays a plain state dict the bundle
loads, and a copy taken out of its run folder still says how to preprocess for it (:func:`model_recipe`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleenkit.errors import BadInputError, first_line
from spleenkit.io import atomic_write
from spleenkit.presets import Preset, get_preset
from spleenkit.runs import recorded_preset

if TYPE_CHECKING:
    import torch

BUNDLE_PARAMETER_COUNT = 4_808_917
#: The entry of a state dict's metadata that holds the recipe of the network it came from.
RECIPE_KEY = "spleenkit_recipe"
#: Recipe settings that change the masks a model gives (preprocessing and network): a ``--preset`` that differs
#: from the model's own in one of them is refused unless forced.
MASK_SETTINGS = ("spacing", "orientation", "intensity_range", "channels", "strides", "num_res_units", "norm")


def build_unet(preset: Preset | str = "seed") -> torch.nn.Module:
    """The bundle's 3D UNet: 1 -> 2 channels, 16-32-64-128-256, strides 2, 2 residual units, batch norm."""
    from monai.networks.nets import UNet

    preset = get_preset(preset)
    network = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=tuple(preset.channels),
        strides=tuple(preset.strides),
        num_res_units=preset.num_res_units,
        norm=preset.norm,
    )
    carry_recipe(network, preset)
    return network


def carry_recipe(network: torch.nn.Module, preset: Preset) -> torch.nn.Module:
    """Make every state dict of ``network`` carry ``preset`` in its metadata (see the module's note), so that
    the weights saved from it (model.pt, checkpoints) say which recipe they need."""
    import json

    recipe = json.loads(json.dumps(preset.to_dict(), default=str))

    def record(module: Any, state_dict: Any, prefix: str, local_metadata: dict[str, Any]) -> None:
        local_metadata[RECIPE_KEY] = recipe

    register = getattr(network, "register_state_dict_post_hook", None) or network._register_state_dict_hook
    register(record)
    return network


def stored_recipe(checkpoint: Any) -> dict[str, Any] | None:
    """The recipe a loaded checkpoint carries (a bare state dict or ``{"model": ...}``), or None."""
    state = checkpoint.get("model") if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"),
                                                                                   dict) else checkpoint
    metadata = getattr(state, "_metadata", None)
    if not isinstance(metadata, dict):
        return None
    for entry in metadata.values():  # the root module's entry (""), or "module" for a DDP wrapper's weights
        if isinstance(entry, dict) and isinstance(entry.get(RECIPE_KEY), dict):
            return entry[RECIPE_KEY]
    return None


def model_recipe(path: str | os.PathLike[str]) -> tuple[Preset | None, str]:
    """The recipe of the weights in ``path`` and where it was found: carried inside the file, else recorded by
    the run manifest beside it (runs of earlier versions); ``(None, "none")`` when neither says."""
    path = Path(path)
    stored = stored_recipe(load_checkpoint(path))
    if stored is not None:
        try:
            return Preset.from_dict(stored), "the model file"
        except BadInputError as error:
            raise BadInputError(f"the recipe stored with the weights cannot be rebuilt ({error})", path) from error
    recorded = recorded_preset(path.parent)
    return (recorded, "the run manifest beside it") if recorded is not None else (None, "none")


def recipe_differences(recipe: Preset, other: Preset, settings: Sequence[str] = MASK_SETTINGS) -> list[str]:
    """``setting: recipe's -> other's`` for each of ``settings`` where the two differ."""
    import json

    mine, theirs = (json.loads(json.dumps(p.to_dict(), default=str)) for p in (recipe, other))
    return [f"{key}: {mine.get(key)!r} -> {theirs.get(key)!r}" for key in settings if mine.get(key) != theirs.get(key)]


def recipe_for(model: str | os.PathLike[str], preset: Preset | str | None = None,
               force: bool = False) -> tuple[Preset, str]:
    """The recipe to run ``model`` with, and where it came from. Without ``preset``: the model's own
    (:func:`model_recipe`), else the seed recipe, said in a warning. With ``preset``: that one, but one whose
    preprocessing or network (:data:`MASK_SETTINGS`) differs from the model's own is refused unless ``force``,
    as it would give other masks without a word."""
    import logging

    log = logging.getLogger(__name__)
    own, source = model_recipe(model)
    if preset is None:
        if own is not None:
            return own, source
        assumed = get_preset("seed")
        log.warning("%s carries no recipe and no run manifest beside it names one: assuming the %s recipe (%s mm "
                    "voxels, %s, window %g..%g HU, %s norm); pass --preset to choose another", model, assumed.name,
                    "x".join(f"{s:g}" for s in assumed.spacing), assumed.orientation, *assumed.intensity_range,
                    assumed.norm)
        return assumed, "assumed (seed)"
    chosen = get_preset(preset)
    differences = [] if own is None else recipe_differences(own, chosen)
    if differences and not force:
        raise BadInputError(f"the model was trained with the {own.name} recipe (found in {source}), and --preset "  # type: ignore[union-attr]
                            f"{chosen.name} changes its masks: {'; '.join(differences)}. Leave out --preset to use "
                            "the model's own, or pass --force-preset (force_preset=True) to use it anyway", model)
    if differences:
        log.warning("%s: using --preset %s although the model's recipe differs (%s)", model, chosen.name,
                    "; ".join(differences))
    return chosen, "--preset" if own is None else f"--preset (the model's own in {source})"


def count_parameters(network: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def atomic_save(obj: Any, path: str | os.PathLike[str], *, check: Callable[[Path], None] | None = None) -> Path:
    """``torch.save`` through the kit's one atomic writer (:func:`spleenkit.io.atomic_write`); ``check`` (e.g.
    :func:`check_saved_weights`) inspects the written file before it replaces an earlier one."""
    import torch

    with atomic_write(path, "wb", check=check) as stream:
        torch.save(obj, stream)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint with ``weights_only=True``; a missing, truncated or unsafe file is a clear error."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise BadInputError("checkpoint not found" if not path.exists() else "not a file", path)
    if path.stat().st_size == 0:
        raise BadInputError("empty file (0 bytes): a save that never finished? Use another copy of the model", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise BadInputError(
            f"refusing to load: the checkpoint holds objects other than tensors and plain data ({first_line(error)})",
            path,
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise BadInputError(f"corrupt or truncated checkpoint ({first_line(error)})", path) from error
    except Exception as error:  # noqa: BLE001 - a text or other non-checkpoint file fails deep in the unpickler
        raise BadInputError(f"not a PyTorch checkpoint (a model.pt written by torch.save); reading it failed with "
                            f"{type(error).__name__}", path) from error


def non_finite_weights(network: torch.nn.Module) -> list[str]:
    """Names of the floating-point weights and buffers holding NaN or infinity (empty when all are finite)."""
    return _non_finite(getattr(network, "module", network).state_dict())  # (a DDP wrapper's network)


def _non_finite(state: dict[str, Any]) -> list[str]:
    import torch

    return [name for name, tensor in state.items() if isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def check_finite_weights(network: torch.nn.Module, source: str | os.PathLike[str] | None = None) -> None:
    """Refuse a network whose weights hold NaN or infinity (a diverged training): its masks would be empty
    and its exports meaningless."""
    broken = non_finite_weights(network)
    if broken:
        raise BadInputError(f"the model's weights hold NaN or infinity ({len(broken)} tensor(s), e.g. {broken[0]}): "
                            "a diverged training? Use an earlier model.pt", source)


def check_saved_weights(path: str | os.PathLike[str]) -> None:
    """The file reads back safely (weights_only) and its weights are finite: the check a model.pt or a
    checkpoint passes before it replaces the previous one."""
    broken = _non_finite(extract_state_dict(load_checkpoint(path), path))
    if broken:
        raise BadInputError(f"refusing to save weights holding NaN or infinity (e.g. {broken[0]})", path)


def extract_state_dict(checkpoint: Any, path: str | os.PathLike[str] = "checkpoint") -> dict[str, torch.Tensor]:
    """The network weights in a checkpoint: a bare state dict (the bundle's model.pt) or ``{"model": ...}``."""
    if isinstance(checkpoint, dict) and "model" in checkpoint and isinstance(checkpoint["model"], dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise BadInputError("the checkpoint holds no network weights", path)
    # weights saved from a DistributedDataParallel wrapper carry a "module." prefix
    if all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    return checkpoint


def load_weights(network: torch.nn.Module, path: str | os.PathLike[str]) -> torch.nn.Module:
    """Load weights into ``network`` strictly; mismatched keys or shapes are listed in the error."""
    state = extract_state_dict(load_checkpoint(path), path)
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        def short(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        parts = [f"{label}: {short(keys)}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong_shape)) if keys]
        raise BadInputError("checkpoint does not match the network (another architecture?); " + "; ".join(parts), path)
    network.load_state_dict(state, strict=True)
    return network


def load_model(path: str | os.PathLike[str], preset: Preset | str = "seed",
               device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the preset's UNet, load ``path`` into it strictly, move it to ``device`` and set eval mode."""
    network = load_weights(build_unet(preset), path)
    return network.to(device).eval()


def feature_map_sizes(patch_sizes: Sequence[int] = (96, 64), preset: Preset | str = "seed") -> list[dict[str, Any]]:
    """One row per UNet level: its channels and the side of its feature maps for each patch side.

    Each stride-2 level halves the side (rounding up); the decoder doubles it back and joins it with
    the encoder's map of that level, so a side that is not a multiple of 2**levels (16 for the bundle)
    does not come back to its own size and the join fails. A side of 2 at the bottom is the size whose
    bfloat16 weight gradients PyTorch's CPU kernels get wrong (see ``training.cpu_bf16_training_ok``).
    """
    preset = get_preset(preset)
    strides = [*(int(s) for s in preset.strides), 1]  # the first level already has stride 2; the bottom 1
    rows: list[dict[str, Any]] = []
    sides = [int(p) for p in patch_sizes]
    for level, (channels, stride) in enumerate(zip(preset.channels, strides, strict=True), start=1):
        sides = [-(-side // stride) for side in sides]
        row: dict[str, Any] = {"level": level, "channels": int(channels)}
        row.update({f"{patch}³ patch": f"{side}³" for patch, side in zip(patch_sizes, sides, strict=True)})
        rows.append(row)
    return rows

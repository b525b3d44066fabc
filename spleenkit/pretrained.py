"""MONAI's released spleen_ct_segmentation weights: fetching the bundle and loading its model.pt safely.

The released bundle is downloaded with ``monai.bundle.download`` (so every source MONAI knows
works: monaihosting, github, ngc, or a plain URL). Its ``models/model.pt`` is a bare UNet state
dict; :func:`load_pretrained` reads it with ``weights_only=True`` and loads it into the kit's UNet
with strict key matching, so any difference of architecture is reported, never silently skipped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spleenkit.errors import BadInputError, PretrainedUnavailableError
from spleenkit.model import build_unet, count_parameters, load_weights, recipe_for
from spleenkit.presets import Preset

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

BUNDLE_NAME = "spleen_ct_segmentation"
# the release the kit's "bundle-0.5.9" preset reproduces; any later release has the same network
PRETRAINED_VERSION = "0.5.9"
SOURCES = ("monaihosting", "github", "ngc")
GITHUB_REPO = "Project-MONAI/model-zoo/hosting_storage_v1"
WEIGHTS = Path("models") / "model.pt"


def download_instructions(bundle_dir: str | os.PathLike[str], version: str = PRETRAINED_VERSION) -> str:
    """How to get the official bundle by hand, and where to put it so the kit finds it."""
    target = Path(bundle_dir) / BUNDLE_NAME
    zip_name = f"{BUNDLE_NAME}_v{version}.zip"
    owner, repo, tag = GITHUB_REPO.split("/")
    return (
        f"On a machine with internet access, either run\n"
        f"    python -m monai.bundle download --name {BUNDLE_NAME} --version {version} --bundle_dir {bundle_dir}\n"
        f"or download https://github.com/{owner}/{repo}/releases/download/{tag}/{zip_name}\n"
        f"(also at https://huggingface.co/MONAI/{BUNDLE_NAME}) and unzip it into {bundle_dir}.\n"
        f"The weights must end up at {target / WEIGHTS}; then run\n"
        f"    spleenkit pretrained load {target}"
    )


def fetch_pretrained(bundle_dir: str | os.PathLike[str] = "pretrained", version: str | None = PRETRAINED_VERSION,
                     sources: tuple[str, ...] = SOURCES, url: str | None = None) -> Path:
    """Download the released bundle into ``bundle_dir`` and return the folder holding its ``models/model.pt``.

    Tries ``url`` if given, else each of ``sources`` in turn. Already-present weights are reused.
    Raises :class:`PretrainedUnavailableError` with download instructions when every try fails.
    """
    from monai.bundle import download

    bundle_dir = Path(bundle_dir)
    target = bundle_dir / BUNDLE_NAME
    if (target / WEIGHTS).is_file():
        logger.info("official weights already present at %s", target / WEIGHTS)
        return target
    bundle_dir.mkdir(parents=True, exist_ok=True)
    attempts = [("url", dict(url=url))] if url else [(source, dict(source=source)) for source in sources]
    failures = []
    for label, how in attempts:
        kwargs = dict(name=BUNDLE_NAME, bundle_dir=str(bundle_dir), progress=False, **how)
        if label == "github":
            kwargs["repo"] = GITHUB_REPO
        if version and not url:
            kwargs["version"] = version
        try:
            download(**kwargs)
        except Exception as error:  # network errors come in many types (URLError, HTTPError, OSError, ValueError...)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            logger.info("download from %s failed: %s", label, message)
            failures.append(f"{label}: {message}")
            continue
        if (target / WEIGHTS).is_file():
            return target
        failures.append(f"{label}: the download holds no {BUNDLE_NAME}/{WEIGHTS.as_posix()}")
    raise PretrainedUnavailableError(
        f"could not download the official {BUNDLE_NAME} weights ({'; '.join(failures)}).\n"
        + download_instructions(bundle_dir, version or PRETRAINED_VERSION)
    )


def find_weights(path: str | os.PathLike[str]) -> Path:
    """The ``model.pt`` meant by ``path``: the file itself, a bundle folder, or a folder holding the bundle."""
    path = Path(path)
    for candidate in (path, path / WEIGHTS, path / BUNDLE_NAME / WEIGHTS, path / "model.pt"):
        if candidate.is_file():
            return candidate
    raise BadInputError(
        f"no official weights here (looked for {WEIGHTS.as_posix()}); fetch them with "
        f"`spleenkit pretrained fetch --dir {path}` or by hand:\n" + download_instructions(path),
        path,
    )


@dataclass(frozen=True)
class PretrainedInfo:
    """What :func:`load_pretrained` loaded: the file and the size of the network."""

    weights: Path
    parameters: int
    tensors: int


def load_pretrained(path: str | os.PathLike[str], preset: Preset | str | None = None,
                    device: torch.device | str = "cpu", force_preset: bool = False
                    ) -> tuple[torch.nn.Module, PretrainedInfo]:
    """Load the official (or any bundle-format) ``model.pt`` into the kit's UNet, strictly, in eval mode.

    The network is the weights' own recipe's where they carry one (a kit run's model.pt), else ``preset``, else
    the seed recipe (the bundle's, which the official weights need), said in a warning
    (:func:`spleenkit.model.recipe_for`)."""
    weights = find_weights(path)
    recipe, _ = recipe_for(weights, preset, force_preset)
    network = load_weights(build_unet(recipe), weights).to(device).eval()
    info = PretrainedInfo(weights=weights, parameters=count_parameters(network),
                          tensors=len(network.state_dict()))
    logger.info("loaded %s: %d parameters in %d tensors", weights, info.parameters, info.tensors)
    return network, info

"""Exporting a trained UNet for deployment: TorchScript (always) and ONNX (when the exporter is installed).

The TorchScript file is written with ``monai.data.save_net_with_metadata``, so it carries the
bundle's metadata like the ``models/model.ts`` that ``python -m monai.bundle ckpt_export`` makes.
:func:`parity` runs the eager and the exported model on the same input and returns the largest
difference, which the tests (and ``spleenkit export``) hold under :data:`TOLERANCE`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleenkit.errors import BadInputError, SpleenkitError, first_line
from spleenkit.io import write_with, write_with_companions
from spleenkit.model import RECIPE_KEY, check_finite_weights, load_model, recipe_for
from spleenkit.presets import Preset

if TYPE_CHECKING:
    import numpy as np
    import torch

logger = logging.getLogger(__name__)

# largest absolute difference of the logits allowed between the eager and the exported network
# (float32 on the CPU; TorchScript runs the same kernels, ONNX Runtime its own)
TOLERANCE = 1e-4
# a patch the UNet accepts (each side divisible by 16, the product of its strides)
SAMPLE_SHAPE = (1, 1, 64, 64, 64)


def onnx_available() -> bool:
    """True when ``torch.onnx.export`` can write a file here (it needs the onnx and onnxscript packages)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript"))


def parity_check(network: torch.nn.Module, kind: str = "export",
                 differences: dict[str, float] | None = None) -> Callable[[Path], None]:
    """A ``check=`` callback for :mod:`spleenkit.io`: the written file must match ``network`` within TOLERANCE
    (the difference is stored in ``differences[kind]`` when given)."""
    def check(path: Path) -> None:
        difference = parity(network, path)
        if differences is not None:
            differences[kind] = difference
        if difference > TOLERANCE:
            raise SpleenkitError(f"the {kind} differs from the eager model by {difference:.2e} (more than "
                                 f"{TOLERANCE:.0e}); nothing was replaced")
    return check


def export_torchscript(network: torch.nn.Module, out: str | os.PathLike[str],
                       metadata: dict[str, Any] | None = None,
                       check: Callable[[Path], None] | None = None) -> Path:
    """Script ``network`` and save it with ``metadata`` (e.g. the bundle's metadata.json) inside the file.

    ``check(temporary_path)`` runs on the written file before it replaces ``out`` (see :func:`parity_check`).
    """
    import torch
    from monai.data import save_net_with_metadata

    network = network.eval()
    scripted = torch.jit.script(network)
    return write_with(out, lambda path: save_net_with_metadata(scripted, str(path), include_config_vals=False,
                                                               meta_values=metadata or {}), check=check)


def export_onnx(network: torch.nn.Module, out: str | os.PathLike[str],
                sample_shape: tuple[int, ...] = SAMPLE_SHAPE,
                check: Callable[[Path], None] | None = None, recipe: dict[str, Any] | None = None) -> Path:
    """Export ``network`` to ONNX with any batch size and any spatial size divisible by 16 (``check`` as for
    :func:`export_torchscript`); ``recipe`` goes into the model's metadata (:data:`RECIPE_KEY`), which marks the
    file as the kit's export.

    Weights below :data:`ONNX_EMBED_LIMIT` are embedded, so the file is whole on its own; larger ones go into
    ``NAME.data`` beside it (ONNX's 2 GB limit), named after the final file and placed first. Either way the
    export is copied into another folder and loaded there with ONNX Runtime (and ``check``ed) before it replaces
    anything: a file that depends on anything but its own named companion is refused.
    """
    if not onnx_available():
        raise SpleenkitError("ONNX export needs the onnx and onnxscript packages: pip install 'spleenkit[export]'")
    import inspect

    import torch

    network = network.eval()
    sample = torch.zeros(sample_shape)
    spatial = torch.export.Dim.AUTO
    dynamic = {"x": {0: torch.export.Dim("batch", max=1024), 2: spatial, 3: spatial, 4: spatial}}
    external = parameter_bytes(network) > ONNX_EMBED_LIMIT
    options = {"external_data": external} if "external_data" in inspect.signature(torch.onnx.export).parameters \
        else {}

    def write(path: Path) -> None:
        torch.onnx.export(network, (sample,), str(path), dynamo=True, input_names=["image"], output_names=["pred"],
                          dynamic_shapes=dynamic, verbose=False, **options)
        mark_onnx(path, recipe)

    def check_elsewhere(path: Path) -> None:  # what a user's copy of the file (and its named companion) gets
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory(prefix="spleenkit-onnx-") as elsewhere:
            copy = Path(elsewhere) / path.name
            shutil.copyfile(path, copy)
            companion = path.with_name(path.name + ".data")
            if companion.is_file():
                shutil.copyfile(companion, copy.with_name(companion.name))
            try:
                if check is not None:
                    check(copy)
                else:
                    _onnx_session(copy)
            except SpleenkitError:
                raise
            except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types
                raise SpleenkitError(f"the ONNX export does not load on its own ({first_line(error)}); nothing was "
                                     "replaced") from error

    with _quiet_exporter():
        return write_with_companions(out, write, check=check_elsewhere)[0]


#: Weights up to this size are embedded in the ONNX file (protobuf's limit is 2 GiB for the whole file).
ONNX_EMBED_LIMIT = 1_800_000_000


def parameter_bytes(network: torch.nn.Module) -> int:
    """Bytes of the network's weights and buffers."""
    return sum(t.numel() * t.element_size() for t in (*network.parameters(), *network.buffers()))


def _onnx_session(path: str | os.PathLike[str]) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the ONNX exporter's progress lines and optimiser log (kept at warning level and above)."""
    import warnings

    names = ("onnx_ir", "onnxscript", "torch.onnx", "torch.onnx._internal.exporter._registration")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def load_exported(path: str | os.PathLike[str]) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A TorchScript file written by :func:`export_torchscript` or ``ckpt_export``, with its metadata."""
    from monai.data import load_net_with_metadata

    path = Path(path)
    if not path.is_file():
        raise BadInputError("exported model not found", path)
    module, metadata, _ = load_net_with_metadata(str(path), map_location="cpu")
    return module.eval(), metadata


def run_exported(path: str | os.PathLike[str], image: torch.Tensor) -> np.ndarray:
    """Run an exported ``.ts`` or ``.onnx`` model on ``image`` on the CPU and return the logits."""
    import torch

    path = Path(path)
    if path.suffix == ".onnx":
        session = _onnx_session(path)
        return session.run(None, {session.get_inputs()[0].name: image.numpy()})[0]
    module, _ = load_exported(path)
    with torch.no_grad():
        return module(image).numpy()


def parity(network: torch.nn.Module, exported: str | os.PathLike[str], sample_shape: tuple[int, ...] = SAMPLE_SHAPE,
           seed: int = 0) -> float:
    """Largest absolute difference between ``network`` and the exported model on one random input."""
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(sample_shape, generator=generator)
    with torch.no_grad():
        expected = network.eval()(image).numpy()
    if not np.isfinite(expected).all():
        raise SpleenkitError("the model itself outputs NaN or infinity: its weights are broken (a diverged "
                             "training?), so there is nothing to compare the export with")
    difference = float(np.abs(run_exported(exported, image) - expected).max())
    return difference if math.isfinite(difference) else math.inf


def export_model(model: str | os.PathLike[str], out: str | os.PathLike[str], preset: Preset | str | None = None,
                 onnx: bool = False, metadata_file: str | os.PathLike[str] | None = None,
                 check: bool = True, force_preset: bool = False) -> dict[str, Any]:
    """Export the weights in ``model`` (a model.pt) to TorchScript at ``out`` (and ONNX beside it).

    The network is the model's own recipe's (:func:`spleenkit.model.recipe_for`: carried in model.pt, else its run
    manifest, else seed with a warning; another ``preset`` that changes the masks needs ``force_preset``), and the
    recipe goes into the metadata of each file (``spleenkit_recipe``). Loads strictly with ``weights_only=True`` and
    refuses NaN or infinite weights; an existing ``out`` that is not the kit's own export (:func:`is_kit_export`:
    another tool's model, a user's notes) is refused, never overwritten; with ``check`` each exported file is run
    against the eager network *before* it replaces an earlier export, and a difference above :data:`TOLERANCE` is
    an error that leaves the earlier file as it was. Returns a summary.
    """
    out = Path(out)
    if out.is_dir():
        raise BadInputError("is a folder; give the file to write, e.g. model.ts", out)
    onnx_out = out.with_suffix(".onnx")
    if onnx and onnx_out == out:
        raise BadInputError("--out names the TorchScript file (model.ts); the ONNX file goes beside it as .onnx", out)
    for target, kind in ((out, "torchscript"), *(((onnx_out, "onnx"),) if onnx else ())):
        refuse_non_export(target, kind)
    recipe, _ = recipe_for(model, preset, force_preset)
    network = load_model(model, recipe)
    check_finite_weights(network, model)
    metadata: dict[str, Any] = {}
    if metadata_file:
        try:
            metadata = json.loads(Path(metadata_file).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise BadInputError(f"cannot read the metadata ({error})", metadata_file) from error
        if not isinstance(metadata, dict):
            raise BadInputError("the metadata must be one JSON object (as a bundle's metadata.json is)", metadata_file)
    metadata = {**metadata, RECIPE_KEY: recipe.to_dict()}
    differences: dict[str, float] = {}

    def checked(kind: str) -> Callable[[Path], None] | None:
        return parity_check(network, kind, differences) if check else None

    written = {"torchscript": export_torchscript(network, out, metadata, check=checked("torchscript"))}
    if onnx:
        written["onnx"] = export_onnx(network, onnx_out, check=checked("onnx"), recipe=recipe.to_dict())
    summary: dict[str, Any] = {kind: str(path) for kind, path in written.items()}
    for kind, difference in differences.items():
        summary[f"{kind}_max_abs_difference"] = difference
    summary["tolerance"] = TOLERANCE
    summary["preset"] = recipe.name
    return summary


def mark_onnx(path: Path, recipe: dict[str, Any] | None) -> None:
    """Store ``recipe`` in the ONNX model's metadata_props under :data:`RECIPE_KEY` (external weights untouched)."""
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {RECIPE_KEY: json.dumps(recipe or {}, sort_keys=True)})
    onnx.save_model(model, str(path))


def is_kit_export(path: str | os.PathLike[str], kind: str = "torchscript") -> bool:
    """True when ``path`` is a model export written by the kit: a TorchScript archive or an ONNX model whose
    metadata holds the recipe (:data:`RECIPE_KEY`). Reads the metadata only, not the weights."""
    import zipfile

    path = Path(path)
    if kind == "torchscript":
        try:
            with zipfile.ZipFile(path) as archive:
                names = [name for name in archive.namelist() if name.endswith("/extra/metadata.json")]
                return bool(names) and RECIPE_KEY in json.loads(archive.read(names[0]) or b"{}")
        except (zipfile.BadZipFile, OSError, ValueError, TypeError):
            return False
    try:
        import onnx

        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a protobuf ONNX model
        return False
    return any(prop.key == RECIPE_KEY for prop in model.metadata_props)


def refuse_non_export(path: str | os.PathLike[str], kind: str = "torchscript") -> None:
    """Refuse to overwrite an existing ``path`` that is not the kit's own model export (:func:`is_kit_export`):
    ``--out notes.txt`` must not replace the notes, nor ``--out model.ts`` a model another tool exported."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_file():
        raise BadInputError("exists and is not a file; give the file to write", path)
    if not is_kit_export(path, kind):
        what = "TorchScript" if kind == "torchscript" else "ONNX"
        raise BadInputError(f"exists and is not a spleenkit {what} export (the kit's recipe is not in its "
                            "metadata); refusing to overwrite it: choose another --out, or move the file away", path)

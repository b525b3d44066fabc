"""The kit as a MONAI bundle: the small functions the configs in ``bundle/configs`` call, and running them.

The bundle keeps the keys of MONAI's spleen_ct_segmentation (``train#trainer``, ``validate#evaluator``,
``network_def``, ``dataset_dir`` ...) so its users' commands and overrides work unchanged, but every
piece is built by the kit (``$spleenkit.transforms.deterministic_transforms(@recipe)``,
``spleenkit.bundle.build_network`` ...), so the pipeline is written once, in the package.

Also here: checking command-line overrides (MONAI silently adds a mistyped key; the kit refuses
it and suggests the right one), a checkpoint check with a clear message, the metadata schema check
and ``verify_net_in_out``. The multi-GPU configs open the process group with
``spleenkit.distributed.init_process_group`` (NCCL between GPUs, gloo between CPU processes).
"""

from __future__ import annotations

import ast
import difflib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleenkit.errors import BadInputError
from spleenkit.presets import Preset, get_preset

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# arguments of `python -m monai.bundle run` itself (not config overrides)
RUN_ARGUMENTS = frozenset({"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking",
                           "args_file", "workflow_name", "workflow_type", "properties_path"})
# the seed's commands, as (run id, config files, needs torchrun)
COMMANDS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "train": ("training", ("train.json",), False),
    "train-multi-gpu": ("training", ("train.json", "multi_gpu_train.json"), True),
    "evaluate": ("evaluating", ("train.json", "evaluate.json"), False),
    "evaluate-multi-gpu": ("evaluating", ("train.json", "evaluate.json", "multi_gpu_evaluate.json"), True),
    "infer": ("evaluating", ("inference.json",), False),
}


# --------------------------------------------------------------------------- where the bundle is
def bundle_source() -> Path:
    """The bundle folder: $SPLEENKIT_BUNDLE_DIR, ``bundle/`` of the kit's checkout, or the installed copy."""
    import site
    import sysconfig

    installed = [Path(base) / "share" / "spleenkit" / "bundle"
                 for base in (sysconfig.get_path("data"), sys.prefix, site.USER_BASE) if base]
    candidates = [os.environ.get("SPLEENKIT_BUNDLE_DIR"), Path(__file__).resolve().parents[1] / "bundle", *installed]
    for candidate in candidates:
        if candidate and (Path(candidate) / "configs" / "metadata.json").is_file():
            return Path(candidate)
    raise BadInputError("the bundle folder was not found: set SPLEENKIT_BUNDLE_DIR to the kit's bundle/ folder "
                        "(it is in the kit's source repository)")


def bundle_command(command: str, bundle_dir: str | os.PathLike[str] | None = None,
                   overrides: Mapping[str, Any] | None = None, processes: int = 2) -> list[str]:
    """The argument list of one of the seed's commands (see :data:`COMMANDS`), with ``--key value`` overrides.

    Run it with the bundle folder as the working directory, exactly as the bundle's README says.
    """
    if command not in COMMANDS:
        raise BadInputError(f"unknown bundle command {command!r}; choose one of {', '.join(COMMANDS)}")
    run_id, configs, distributed = COMMANDS[command]
    config_file = f"configs/{configs[0]}" if len(configs) == 1 else repr([f"configs/{c}" for c in configs])
    config_file = config_file.replace(" ", "").replace('"', "'")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                 f"--nproc_per_node={processes}"] if distributed else [sys.executable])
    args = launcher + ["-m", "monai.bundle", "run", run_id, "--meta_file", "configs/metadata.json",
                       "--config_file", config_file, "--logging_file", "configs/logging.conf"]
    for key, value in (overrides or {}).items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))]
    return args


def run_command(command: str, overrides: Mapping[str, Any] | None = None,
                bundle_dir: str | os.PathLike[str] | None = None, processes: int = 2,
                timeout: float | None = None) -> str:
    """Run one of the seed's commands in a new process from the bundle folder; return its output.

    Each line the command prints is written to ``sys.stdout`` as it comes (a notebook cell shows the
    bundle's log live instead of sitting silent for minutes). A failure raises
    :class:`~spleenkit.errors.SpleenkitError` with the command and the last lines of its output (the
    notebooks and tests show the bundle working exactly as its users run it); a timeout or an
    interrupt stops the command and its child processes.
    """
    import subprocess
    import threading

    from spleenkit.distributed import _read_lines, _stop
    from spleenkit.errors import SpleenkitError

    folder = Path(bundle_dir) if bundle_dir else bundle_source()
    args = bundle_command(command, overrides=overrides, processes=processes)
    environment = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore"),
                   "PYTHONUNBUFFERED": "1"}
    logger.info("running in %s: %s", folder, format_command(args))
    process = subprocess.Popen(args, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1, env=environment, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(process, lines, sys.stdout.write), daemon=True)
    reader.start()
    try:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as error:
            _stop(process)
            raise SpleenkitError(f"the bundle command {command!r} took longer than {timeout} s") from error
        reader.join(timeout=10)
    except BaseException:  # an interrupted notebook cell: stop the command too
        _stop(process)
        raise
    output = "".join(lines)
    if process.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        raise SpleenkitError(f"the bundle command failed (exit status {process.returncode}):\n"
                             f"{format_command(args)}\n...\n{tail}")
    return output


def format_command(args: Sequence[str]) -> str:
    """A :func:`bundle_command` as one would type it (``python -m ...`` / ``torchrun ...``, README quoting)."""
    import shlex

    args = list(args)
    if args[:3] == [sys.executable, "-m", "torch.distributed.run"]:
        args = ["torchrun"] + args[3:]
    elif args[:1] == [sys.executable]:
        args = ["python"] + args[1:]
    quoted = []
    for arg in args:
        if arg and all(c.isalnum() or c in "-_./=:#,@%+" for c in arg):
            quoted.append(arg)
        elif '"' not in arg and "$" not in arg and "`" not in arg and "\\" not in arg:
            quoted.append(f'"{arg}"')
        else:
            quoted.append(shlex.quote(arg))
    return " ".join(quoted)


# --------------------------------------------------------------------------- pieces the configs build
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _plain(value: Any) -> Any:
    """Command-line values as Python data: fire leaves ``false`` or ``none`` as strings."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        if lowered in {"none", "null"}:
            return None
    return value


def recipe(preset: Preset | str = "seed", **overrides: Any) -> Preset:
    """The recipe the bundle runs: the preset with the bundle's top-level settings applied.

    The same resolution as ``spleenkit train`` (``training.resolve_preset``: checked values, the
    validation window following a new patch size); ``--amp false`` from the command line means False.
    """
    from spleenkit.training import resolve_preset

    return resolve_preset(preset, **{key: _plain(value) for key, value in overrides.items()})


def record_run(ckpt_dir: str | os.PathLike[str], preset: Preset, dataset_dir: str | os.PathLike[str],
               device: torch.device | str | None = None) -> Path | None:
    """Write ``manifest.json`` beside the bundle's model.pt (rank 0 only), with the recipe it trains.

    That makes ``models/`` a kit run folder: ``spleenkit evaluate --model models/model.pt`` reads the
    recipe from it, so the kit preprocesses exactly as the bundle did.
    """
    from spleenkit.distributed import rank
    from spleenkit.manifest import build_manifest, now, write_manifest

    if rank() != 0:
        return None
    parameters = {"preset": preset.to_dict(), "data_dir": str(Path(dataset_dir).resolve()),
                  "device": None if device is None else str(device)}
    return write_manifest(ckpt_dir, build_manifest(parameters, device=parameters["device"], kind="bundle training",
                                                   started=now(), finished=None))


def build_network(preset: Preset | str = "seed", **settings: Any) -> torch.nn.Module:
    """The kit's UNet; keyword settings (``channels``, ``num_res_units``, ``norm`` ...) override the preset's."""
    from spleenkit.model import build_unet

    return build_unet(get_preset(preset, **settings))


def split_cases(images: Sequence[str], labels: Sequence[str], validation_cases: int) -> tuple[list[dict[str, str]],
                                                                                             list[dict[str, str]]]:
    """The bundle's split of paired image/label lists: the last ``validation_cases`` by name for validation."""
    from spleenkit.data.datalist import split_datalist

    if len(images) != len(labels):
        raise BadInputError(f"{len(images)} images but {len(labels)} labels in the dataset")
    items = [{"image": str(i), "label": str(label)} for i, label in zip(images, labels, strict=True)]
    return split_datalist(items, int(validation_cases))


def unlabelled_images(dataset_dir: str | os.PathLike[str]) -> list[str]:
    """The unlabelled images of a dataset (dataset.json's ``test`` list, else ``imagesTs/*.nii.gz``), sorted."""
    from spleenkit.data.datalist import load_datalist

    folder = Path(dataset_dir)
    if (folder / "dataset.json").is_file():
        try:
            return [item["image"] for item in load_datalist(folder, "test")]
        except BadInputError as error:
            if "has no 'test' list" not in str(error):
                raise
    images = sorted(str(p) for p in (folder / "imagesTs").glob("*.nii.gz"))
    if not images:
        raise BadInputError("no images to segment: neither a 'test' list in dataset.json nor imagesTs/*.nii.gz",
                            folder)
    return images


def checked_weights(path: str | os.PathLike[str], network: torch.nn.Module | None = None) -> str:
    """Return ``path`` after checking it is a loadable model.pt that fits ``network``; else a clear error.

    Used as the ``load_path`` of the bundle's CheckpointLoader: a missing file names the commands
    that make one, and another architecture lists the missing and unexpected keys.
    """
    import copy

    from spleenkit.model import extract_state_dict, load_checkpoint, load_weights

    path = Path(path)
    if not path.is_file():
        error = BadInputError(
            "no trained model here. Train one first (python -m monai.bundle run training ...), "
            "or get the official weights with `spleenkit pretrained fetch` and pass --bundle_root "
            "(or --ckpt_dir) pointing at the folder that holds models/model.pt", path)
        logger.error("%s", error)
        raise error
    try:
        if network is None:
            extract_state_dict(load_checkpoint(path), path)
        else:
            load_weights(copy.deepcopy(getattr(network, "module", network)).cpu(), path)
    except BadInputError as error:
        logger.error("%s", error)
        raise
    return str(path)


class OriginalLabeld:
    """Replace each item's resampled label by its label file as stored, one-hot with ``to_onehot`` channels.

    Used after ``Invertd`` in the bundle's evaluation, so the prediction on the image's own grid is
    scored against the original label (as ``spleenkit evaluate`` does), not a resampled-and-back copy.
    """

    def __init__(self, keys: str | Sequence[str] = "label", to_onehot: int = 2, reference: str = "pred") -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.to_onehot, self.reference = to_onehot, reference

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        from spleenkit.evaluation import read_binary_mask

        item = dict(data)
        for key in self.keys:
            source = getattr(item[key], "meta", {}).get("filename_or_obj")
            if not source:
                raise BadInputError(f"the {key!r} of this item does not say which file it came from")
            mask, _ = read_binary_mask(source)
            label = torch.as_tensor(mask, dtype=torch.long)
            onehot = torch.nn.functional.one_hot(label, self.to_onehot).movedim(-1, 0).float().contiguous()
            reference = item.get(self.reference)
            if isinstance(reference, torch.Tensor):
                if tuple(reference.shape[1:]) != tuple(onehot.shape[1:]):
                    raise BadInputError(f"the label is {tuple(onehot.shape[1:])} voxels but the prediction on the "
                                        f"image's grid is {tuple(reference.shape[1:])}", source)
                onehot = onehot.to(reference.device)
            item[key] = onehot
        return item


# --------------------------------------------------------------------------- distributed
def device_ids(device: torch.device | str) -> list[torch.device] | None:
    """``device_ids`` for DistributedDataParallel: the GPU of this process, or None on the CPU."""
    import torch

    device = torch.device(device)
    return [device] if device.type == "cuda" else None


# --------------------------------------------------------------------------- overrides
def _all_ids(config: Any, prefix: str = "") -> list[str]:
    ids = []
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    for key, value in items:
        name = f"{prefix}#{key}" if prefix else str(key)
        ids.append(name)
        ids.extend(_all_ids(value, name))
    return ids


def _lookup(config: Any, parts: Sequence[str]) -> tuple[bool, Any]:
    for part in parts:
        if isinstance(config, dict) and part in config:
            config = config[part]
        elif isinstance(config, list) and part.lstrip("-").isdigit() and -len(config) <= int(part) < len(config):
            config = config[int(part)]
        else:
            return False, None
    return True, config


def _parameters(target: str) -> list[str] | None:
    """Keyword names a ``_target_`` accepts, or None when it takes any (``**kwargs``) or cannot be found."""
    import inspect
    import pydoc

    from monai.bundle.config_item import ComponentLocator

    module = ComponentLocator().get_component_module_name(target) if "." not in target else None
    if isinstance(module, list):
        module = module[0] if module else None
    component = pydoc.locate(f"{module}.{target}" if module else target)
    if component is None:
        return None
    try:
        signature = inspect.signature(component)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return [name for name, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def override_problems(config: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    """The overrides in ``keys`` that name nothing in ``config``, each with a suggestion.

    A key is accepted when it exists, or when it adds an argument that a component (a dict with
    ``_target_``) accepts, which is how bundle users pass extra arguments. Anything else would be
    silently added by MONAI and ignored (or fail later, far from the cause), so it is reported.
    """
    problems = []
    known = None
    for key in keys:
        key = key.replace("::", "#")
        if key in RUN_ARGUMENTS or key.startswith("_meta_"):
            continue
        parts = key.split("#")
        found, _ = _lookup(config, parts)
        if found:
            continue
        parent_found, parent = _lookup(config, parts[:-1])
        candidates: list[str] = []
        if parent_found and len(parts) > 1 and isinstance(parent, dict) and isinstance(parent.get("_target_"), str):
            accepted = _parameters(parent["_target_"])
            if accepted is None or parts[-1] in accepted or parts[-1].startswith("_"):
                continue
            parent_id = "#".join(parts[:-1])
            candidates = [f"{parent_id}#{name}" for name in accepted]
        if not candidates:
            known = known if known is not None else _all_ids(config)
            candidates = known
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
        problems.append(f"--{key} names no key of the bundle's configs{hint}")
    return problems


def _config_files(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = ast.literal_eval(value)
        except (SyntaxError, ValueError) as error:
            raise BadInputError(f"cannot read --config_file {value!r} ({error})") from error
        return [str(v) for v in parsed]
    return [v for v in value.split(",") if v] if "," in value and not Path(value).is_file() else [value]


def parse_command_line(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``python -m monai.bundle run ...`` arguments into run arguments and override keys."""
    arguments: dict[str, str] = {}
    overrides: list[str] = []
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not token.startswith("--") or token == "--":
            continue
        key, has_value, value = token[2:].partition("=")
        if not has_value and index < len(tokens) and not tokens[index].startswith("--"):
            value = tokens[index]
            index += 1
        if key in RUN_ARGUMENTS:
            arguments[key] = value
        else:
            overrides.append(key)
    return arguments, overrides


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """Refuse command-line overrides that name no config key (MONAI would add and ignore them).

    Called first in the bundle's ``initialize``; acts only when the process was started as
    ``python -m monai.bundle run ...`` (directly or under torchrun).
    """
    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if not argv or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py") or "run" not in argv[1:2]:
        return
    arguments, overrides = parse_command_line(argv[1:])
    if not overrides or "config_file" not in arguments:
        return
    files = _config_files(arguments["config_file"])
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        return  # MONAI itself reports a missing config file
    problems = override_problems(ConfigParser.load_config_files(files), overrides)
    if problems:
        error = BadInputError("; ".join(problems))
        logger.error("%s", error)
        raise error


def run(command: str, bundle_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> None:
    """Run one of the seed's single-process commands in this process, after checking the overrides.

    ``command`` is a key of :data:`COMMANDS` ("train", "evaluate", "infer"); ``overrides`` are
    config ids and values, e.g. ``dataset_dir=...``, ``epochs=1``, ``bundle_root=...``.
    """
    from monai.bundle import ConfigParser
    from monai.bundle import run as monai_run

    if command not in COMMANDS or COMMANDS[command][2]:
        single = [name for name, (_, _, distributed) in COMMANDS.items() if not distributed]
        raise BadInputError(f"unknown bundle command {command!r} here; choose one of {', '.join(single)} "
                            "(the multi-GPU ones run under torchrun: see bundle_command)")
    run_id, configs, _ = COMMANDS[command]
    root = Path(bundle_dir) if bundle_dir else bundle_source()
    files = [str(root / "configs" / name) for name in configs]
    problems = override_problems(ConfigParser.load_config_files(files), list(overrides))
    if problems:
        raise BadInputError("; ".join(problems))
    overrides.setdefault("bundle_root", str(root))
    monai_run(run_id=run_id, meta_file=str(root / "configs" / "metadata.json"), config_file=files,
              logging_file=str(root / "configs" / "logging.conf"), **overrides)


# --------------------------------------------------------------------------- metadata
def validate_metadata(metadata: str | os.PathLike[str] | Mapping[str, Any],
                      schema: str | os.PathLike[str] | Mapping[str, Any]) -> None:
    """Check a bundle's metadata against a JSON schema (offline; MONAI's verify_metadata downloads it)."""
    import jsonschema

    def read(value: Any, what: str) -> Any:
        if isinstance(value, Mapping):
            return value
        try:
            return json.loads(Path(value).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise BadInputError(f"cannot read the {what} ({error})", value) from error

    meta = read(metadata, "metadata")
    try:
        jsonschema.validate(instance=meta, schema=read(schema, "schema"))
    except jsonschema.ValidationError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "the top level"
        raise BadInputError(f"metadata does not follow the bundle schema at {where}: {error.message}",
                            None if isinstance(metadata, Mapping) else metadata) from error


def verify_network(bundle_dir: str | os.PathLike[str] | None = None, config: str = "inference.json",
                   device: str = "cpu") -> None:
    """Run ``monai.bundle.verify_net_in_out`` on the bundle's network with its metadata's input/output format."""
    from monai.bundle import verify_net_in_out

    root = Path(bundle_dir) if bundle_dir else bundle_source()
    verify_net_in_out(net_id="network_def", meta_file=str(root / "configs" / "metadata.json"),
                      config_file=str(root / "configs" / config), device=device)

"""The kit as a MONAI bundle: the small functions the configs in ``bundle/configs`` call, and running them.

The configs spell out MONAI's spleen_ct_segmentation (release 0.5.9) id for id: ``network_def`` is a
``UNet`` with its arguments, ``train#deterministic_transforms`` the list of MONAI transforms,
``validate#inferer`` a ``SlidingWindowInferer`` and so on, so every override its users write
(``--train#random_transforms#0#spatial_size``, ``--inferer#roi_size``) works. Their values come
from the kit's preset, and the kit's ``recipe`` is read back from those ids; a test builds the
package's pipeline for the same preset and proves the two equal, so they cannot drift apart.

Also here: the optimiser and schedule factories (the preset picks Adam or Novograd, StepLR or a cosine
decay), checking command-line overrides (MONAI silently adds a mistyped key; the kit refuses it and
suggests the right one), a checkpoint check with a clear message and ``verify_net_in_out``. The
multi-GPU configs open the process group with ``init_process_group`` (NCCL between GPUs, gloo between
CPU processes).

**The configs' one face.** The configs reach the package only as ``spleenkit.bundle.<name>``: the
functions and classes defined here, and the names of :data:`FACE`, which this module hands out from
where they live (looked up on first use). Moving a function inside the package changes a line of
:data:`FACE`, never a config; a test checks that the configs use no other path into the package.
"""

from __future__ import annotations

import ast
import difflib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleenkit import lazy_attribute
from spleenkit.data.datalist import load_datalist, split_datalist
from spleenkit.distributed import rank
from spleenkit.errors import BadInputError, SpleenkitError
from spleenkit.manifest import build_manifest, now, write_manifest
from spleenkit.model import build_unet, extract_state_dict, load_checkpoint, load_weights
from spleenkit.presets import Preset, get_preset, resolve_preset
from spleenkit.processes import run_streaming

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# arguments of `python -m monai.bundle run` itself (not config overrides)
RUN_ARGUMENTS = frozenset({"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking",
                           "args_file", "workflow_name", "workflow_type", "properties_path"})
# what the configs call that lives elsewhere in the package: name -> its module (see the module docstring)
FACE: dict[str, str] = {
    "load_datalist": "spleenkit.data.datalist",
    "pick_device": "spleenkit.devices",
    "use_fast_layout": "spleenkit.devices",
    "init_process_group": "spleenkit.distributed",
    "destroy_process_group": "spleenkit.distributed",
    "autocast_inferer": "spleenkit.predict",
    "inference_amp": "spleenkit.predict",
    "get_preset": "spleenkit.presets",
    "default_num_workers": "spleenkit.training",
    "epoch_level_schedule": "spleenkit.training",
    "make_iteration_update": "spleenkit.training",
    "training_amp": "spleenkit.training",
    "validation_precision": "spleenkit.training",
}
# the seed's commands, as (run id, config files, needs torchrun)
COMMANDS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "train": ("training", ("train.json",), False),
    "train-multi-gpu": ("training", ("train.json", "multi_gpu_train.json"), True),
    "evaluate": ("evaluating", ("train.json", "evaluate.json"), False),
    "evaluate-multi-gpu": ("evaluating", ("train.json", "evaluate.json", "multi_gpu_evaluate.json"), True),
    "infer": ("evaluating", ("inference.json",), False),
}


def __getattr__(name: str) -> Any:
    """A name of :data:`FACE`: import its module on first use and return the object (PEP 562)."""
    return lazy_attribute(FACE, globals(), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *FACE})


# --------------------------------------------------------------------------- where the bundle is
def bundle_source() -> Path:
    """The bundle folder: $SPLEENKIT_BUNDLE_DIR, ``bundle/`` of the kit's checkout, or the installed copy
    (``spleenkit/_bundle``: pyproject.toml installs the checkout's bundle/ there as package data)."""
    here = Path(__file__).resolve().parent
    candidates = [os.environ.get("SPLEENKIT_BUNDLE_DIR"), here.parent / "bundle", here / "_bundle"]
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
                timeout: float | None = None, echo: bool | Callable[[str], Any] = True) -> str:
    """Run one of the seed's commands in a new process from the bundle folder; return its output.

    The output is streamed line by line while the command runs (``echo``: True writes each line to
    ``sys.stdout``, so a notebook cell and papermill's log show it live, as with
    :func:`~spleenkit.distributed.launch_torchrun`; a function receives each line; False stays silent).
    A failure raises :class:`~spleenkit.errors.SpleenkitError` with the command and the last lines of
    its output (the notebooks and tests show the bundle working exactly as its users run it); after
    ``timeout`` seconds the command and every process it started are stopped.
    """
    folder = Path(bundle_dir) if bundle_dir else bundle_source()
    args = bundle_command(command, overrides=overrides, processes=processes)
    environment = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore"),
                   "PYTHONUNBUFFERED": "1"}  # lines as they are written, not when a buffer fills
    logger.info("running in %s: %s", folder, format_command(args))
    child = run_streaming(args, cwd=folder, env=environment, timeout_s=timeout, echo=echo)
    if child.timed_out:
        raise SpleenkitError(f"the bundle command {command!r} took longer than {timeout} s")
    if child.returncode != 0:
        tail = "\n".join(child.output.splitlines()[-40:])
        raise SpleenkitError(f"the bundle command failed (exit status {child.returncode}):\n"
                             f"{format_command(args)}\n...\n{tail}")
    return child.output


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
def recipe(preset: Preset | str = "seed", **overrides: Any) -> Preset:
    """The recipe the bundle runs: the preset with the values of the bundle's ids applied, through the kit's one
    door for settings (:func:`spleenkit.presets.resolve_preset`: ``--amp false`` from the command line means False,
    ``--epochs ten`` is refused naming the value). Presets whose loss or transform chain the configs do not spell
    out (the tutorial's DiceLoss and CropForegroundd) are refused.
    """
    resolved = resolve_preset(preset, overrides)
    unsupported = ["DiceLoss"] * (resolved.loss != "dice_ce") + ["CropForegroundd"] * resolved.crop_foreground
    if unsupported:
        raise BadInputError(f"preset {resolved.name!r} uses {' and '.join(unsupported)}; the bundle's configs spell "
                            "out spleen_ct_segmentation's DiceCELoss and transform chain. Train it with "
                            f"`spleenkit train --preset {resolved.name}`")
    _check_network(resolved)
    return resolved


def _check_network(preset: Preset) -> None:
    """Build the recipe's UNet without memory (on torch's meta device): network_def's arguments that MONAI's UNet
    refuses stop the run here with one line naming them, before anything else is built."""
    import torch

    try:
        with torch.device("meta"):
            build_unet(preset)
    except Exception as error:  # MONAI's own message for its UNet, whatever the exception type
        raise BadInputError(f"network_def (channels {list(preset.channels)}, strides {list(preset.strides)}, "
                            f"num_res_units {preset.num_res_units}, norm {preset.norm!r}) is not a UNet MONAI "
                            f"builds: {' '.join(str(error).split())}") from error


def optimizer_factory(preset: Preset) -> Callable[..., torch.optim.Optimizer]:
    """The ``_target_`` of the bundle's ``optimizer``: called with ``params`` and ``lr``, it builds the
    preset's optimiser (Adam or Novograd) with :func:`spleenkit.training.make_optimizer`."""
    from spleenkit.training import make_optimizer  # deferred: the CLI reads COMMANDS here at start-up

    def build(params: Iterable[torch.nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        return make_optimizer(get_preset(preset, learning_rate=lr), params)

    return build


def scheduler_factory(preset: Preset, total_iterations: int = 1) -> Callable[..., Any]:
    """The ``_target_`` of the bundle's ``lr_scheduler``: called with ``optimizer`` (and StepLR's
    ``step_size`` and ``gamma``), it builds the preset's schedule with
    :func:`spleenkit.training.make_scheduler`: None, StepLR or a cosine decay over ``total_iterations``."""
    from spleenkit.training import make_scheduler  # deferred: the CLI reads COMMANDS here at start-up

    def build(optimizer: torch.optim.Optimizer, step_size: int | None = None, gamma: float | None = None) -> Any:
        schedule = get_preset(preset, scheduler_step_size=step_size, scheduler_gamma=gamma)
        return make_scheduler(schedule, optimizer, total_iterations)

    return build


def record_run(ckpt_dir: str | os.PathLike[str], preset: Preset, dataset_dir: str | os.PathLike[str],
               device: torch.device | str | None = None, trainer: Any = None) -> Path | None:
    """Write ``manifest.json`` beside the bundle's model.pt (rank 0 only), with the recipe it trains.

    That makes ``models/`` a kit run folder: ``spleenkit evaluate --model models/model.pt`` reads the
    recipe from it, so the kit preprocesses exactly as the bundle did. Given the ``trainer``, the manifest is
    written when it starts training, so a start that fails (a missing dataset, a bad value) leaves none.
    """
    if rank() != 0:
        return None
    parameters = {"preset": preset.to_dict(), "data_dir": str(Path(dataset_dir).resolve()),
                  "device": None if device is None else str(device)}

    def write(*_: Any) -> Path:
        return write_manifest(ckpt_dir, build_manifest(parameters, device=parameters["device"],
                                                       kind="bundle training", started=now(), finished=None))

    if trainer is None:
        return write()
    from ignite.engine import Events

    trainer.add_event_handler(Events.STARTED, write)
    return None


class FinalValidation:
    """Validate once more at the end of training when the last epoch was not validated (``epochs`` not a
    multiple of ``val_interval``), as ``spleenkit train`` does: every training of at least one epoch then
    leaves the best model, ``models/model.pt``, through the validation handlers' CheckpointSaver.

    An extra handler beside MONAI's ``ValidationHandler`` (``train#handlers#1``, unchanged): attached after
    it, it runs the validator only if the validator has not run for this epoch.
    """

    def __init__(self, validator: Any) -> None:
        self.validator = validator

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        epoch = engine.state.epoch
        if epoch == engine.state.max_epochs and self.validator.state.epoch != epoch:
            self.validator.run(epoch)


def split_cases(images: Sequence[str], labels: Sequence[str], validation_cases: int) -> tuple[list[dict[str, str]],
                                                                                             list[dict[str, str]]]:
    """The bundle's split of paired image/label lists: the last ``validation_cases`` by name for validation
    (as the original's ``images[:-9]``: fewer training than validation cases is a warning here, not a refusal)."""
    if len(images) != len(labels):
        raise BadInputError(f"{len(images)} images but {len(labels)} labels in the dataset")
    items = [{"image": str(i), "label": str(label)} for i, label in zip(images, labels, strict=True)]
    return split_datalist(items, int(validation_cases), warn_small_training=True)


def unlabelled_images(dataset_dir: str | os.PathLike[str]) -> list[str]:
    """The unlabelled images of a dataset (dataset.json's ``test`` list, else ``imagesTs/*.nii.gz``), sorted."""
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
    """Replace each item's label by its label file as stored, one-hot with ``to_onehot`` channels.

    Used after ``Invertd`` in the bundle's evaluation, so the prediction on the image's own grid is
    scored against the original label (as ``spleenkit evaluate`` does), not a resampled-and-back copy.
    ``Invertd`` gives an inverted label the image's metadata, so the label file is found from the
    image's file through ``datalist`` (items with ``image_key`` and the label keys) when it is given.
    """

    def __init__(self, keys: str | Sequence[str] = "label", to_onehot: int = 2, reference: str = "pred",
                 datalist: Sequence[Mapping[str, Any]] | None = None, image_key: str = "image") -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.to_onehot, self.reference, self.image_key = to_onehot, reference, image_key
        self.files = {key: {_same_file(item[image_key]): str(item[key]) for item in datalist or []}
                      for key in self.keys}

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        from spleenkit.images import read_binary_mask  # deferred: numpy, not at the CLI's start-up

        item = dict(data)
        for key in self.keys:
            if self.files[key]:
                image = getattr(item.get(self.image_key), "meta", {}).get("filename_or_obj")
                source = self.files[key].get(_same_file(image)) if image else None
                if not source:
                    raise BadInputError(f"the image {image!r} of this item is not in the datalist given for {key!r}")
            else:
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


def _same_file(path: Any) -> str:
    return str(Path(str(path)).resolve())


# --------------------------------------------------------------------------- distributed
def distributed_data_parallel(module: torch.nn.Module, device_ids: Sequence[Any] | None = None,
                              **options: Any) -> torch.nn.Module:
    """DistributedDataParallel as the multi-GPU configs set it (``device_ids: ["@device"]``), on a CPU too:
    CPU devices are left out of ``device_ids``, which DDP takes for GPU modules only."""
    import torch

    gpus = [device for device in device_ids or [] if torch.device(device).type == "cuda"]
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=gpus or None, **options)


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


def _is_component(config: Any) -> bool:
    return isinstance(config, dict) and isinstance(config.get("_target_"), str)


def _accepted(config: Mapping[str, Any], parts: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether an override id names something or a new argument of a component; if not, the arguments
    that component accepts (as ids), when the id's parent is one."""
    found, _ = _lookup(config, parts)
    if found:
        return True, []
    parent_found, parent = _lookup(config, parts[:-1])
    if parent_found and len(parts) > 1 and _is_component(parent):
        accepted = _parameters(parent["_target_"])
        if accepted is None or parts[-1] in accepted or parts[-1].startswith("_"):
            return True, []
        parent_id = "#".join(parts[:-1])
        return False, [f"{parent_id}#{name}" for name in accepted]
    return False, []


def _respelled(config: Mapping[str, Any], parts: Sequence[str]) -> str | None:
    """The id with its first unknown part replaced by the closest key at that depth, when that names
    something (``train#handler#3#_disabled_`` -> ``train#handlers#3#_disabled_``)."""
    node: Any = config
    for index, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            close = difflib.get_close_matches(part, [str(key) for key in node], n=1, cutoff=0.6)
            if not close:
                return None
            fixed = [*parts[:index], close[0], *parts[index + 1:]]
            return "#".join(fixed) if _accepted(config, fixed)[0] else None
        else:
            return None
    return None


def override_problems(config: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    """The overrides in ``keys`` that name nothing in ``config``, each with a suggestion.

    A key is accepted when it exists, or when it adds an argument that a component (a dict with
    ``_target_``) accepts, which is how bundle users pass extra arguments. Anything else would be
    silently added by MONAI and ignored (or fail later, far from the cause), so it is reported. The
    suggestion corrects the first misspelt part of a nested id, else names the closest ids.
    """
    problems = []
    known = None
    for key in keys:
        key = key.replace("::", "#")
        if key in RUN_ARGUMENTS or key.startswith("_meta_"):
            continue
        parts = key.split("#")
        accepted, candidates = _accepted(config, parts)
        if accepted:
            continue
        respelled = _respelled(config, parts)
        if respelled is not None:
            close = [respelled]
        else:
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
    ``python -m monai.bundle run ...`` (directly or under torchrun), and then also makes a failure's last
    line the kit's one-line message (:func:`report_last`).
    """
    from monai.bundle import ConfigParser

    this_process = argv is None
    argv = list(sys.argv if argv is None else argv)
    if not argv or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py") or "run" not in argv[1:2]:
        return
    if this_process:
        report_last(sys)
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


def check_recipe(config_files: Sequence[str], overrides: Mapping[str, Any]) -> None:
    """Build the configs' ``recipe`` with ``overrides`` applied, so that a value the kit's door refuses
    (``--epochs ten``) is refused here in one line naming it, not deep in a traceback of MONAI's."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files(list(config_files)))
    if "recipe" not in parser.config:
        return
    parser.update(dict(overrides))
    try:
        parser.get_parsed_content("recipe")
    except Exception as error:  # noqa: BLE001 - MONAI wraps the kit's refusal; anything else MONAI reports itself
        found = kit_error(error)
        if found is not None:
            raise found from None
def kit_error(error: BaseException | None) -> SpleenkitError | None:
    """The kit's own error in an exception's chain: MONAI's config parser wraps what a config's callable raises
    in ``RuntimeError("Failed to evaluate ...")`` (one wrapper per config item on the way), so the kit's
    message sits in the middle of the traceback. None when the chain holds none."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SpleenkitError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def last_line(error: BaseException) -> str:
    """The line that ends a failed bundle run: the kit's message, or the deepest cause MONAI wrapped."""
    found = kit_error(error)
    if found is not None:
        return f"spleenkit: error: {found}"
    root, seen = error, set()
    while (root.__cause__ or root.__context__) is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__ or root.__context__
    message = " ".join(str(root).split())
    return f"spleenkit: error: the bundle stopped: {type(root).__name__}: {message}"


def report_last(system: Any) -> None:
    """Make an uncaught exception's traceback end with :func:`last_line` (``python -m monai.bundle run`` prints
    the whole traceback, which a bundle cannot prevent; its last line then says what is wrong)."""
    previous = system.excepthook
    if getattr(previous, "spleenkit_last_line", False):
        return

    def hook(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
        previous(kind, error, traceback)
        if not isinstance(error, KeyboardInterrupt):
            print(last_line(error), file=system.stderr, flush=True)

    hook.spleenkit_last_line = True  # type: ignore[attr-defined]
    system.excepthook = hook


# MONAI's warnings that say nothing about the kit's own bundle: configs are code (it cannot know whose they are),
# and the original metadata's "optional_packages_version", kept as model-zoo writes it
_OWN_BUNDLE_NOTICES = (r"parsing config_file .*any `\"_target_\"` value in it is resolved",
                       r"Detected deprecated name 'optional_packages_version'")


def run(command: str, bundle_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> None:
    """Run one of the seed's single-process commands in this process, after checking the overrides.

    ``command`` is a key of :data:`COMMANDS` ("train", "evaluate", "infer"); ``overrides`` are
    config ids and values, e.g. ``dataset_dir=...``, ``epochs=1``, ``bundle_root=...``. On the kit's own bundle
    (no ``bundle_dir``), MONAI's notices about configs it cannot vouch for are left out; on a ``bundle_dir`` they
    stay.
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
    check_recipe(files, overrides)
    try:
        with warnings.catch_warnings():
            if bundle_dir is None:  # the kit's own configs, just checked: MONAI's notices on configs it cannot
                for notice in _OWN_BUNDLE_NOTICES:  # vouch for do not apply to them
                    warnings.filterwarnings("ignore", message=notice, category=UserWarning)
            monai_run(run_id=run_id, meta_file=str(root / "configs" / "metadata.json"), config_file=files,
                      logging_file=str(root / "configs" / "logging.conf"), **overrides)
    except Exception as error:
        found = kit_error(error)
        if found is None:
            raise
        raise found from None  # the kit's one-line message, not MONAI's wrappers around it


# --------------------------------------------------------------------------- metadata
def verify_network(bundle_dir: str | os.PathLike[str] | None = None, config: str = "inference.json",
                   device: str = "cpu") -> None:
    """Run ``monai.bundle.verify_net_in_out`` on the bundle's network with its metadata's input/output format."""
    from monai.bundle import verify_net_in_out

    root = Path(bundle_dir) if bundle_dir else bundle_source()
    verify_net_in_out(net_id="network_def", meta_file=str(root / "configs" / "metadata.json"),
                      config_file=str(root / "configs" / config), device=device)

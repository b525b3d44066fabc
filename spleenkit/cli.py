"""The ``spleenkit`` command: parses arguments and calls the package's functions.

Thin on purpose. Only argparse and the standard library are imported at start-up; each
command imports the module it needs inside its handler, so ``spleenkit --help`` stays fast.
A :class:`~spleenkit.errors.SpleenkitError`, and a fault of the machine (read-only or full disk, no
memory: :func:`spleenkit.errors.user_error`), becomes one line on stderr and exit status 2; SIGTERM stops a
command as Ctrl-C does.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence

from spleenkit import __version__
from spleenkit.errors import BadInputError, SpleenkitError, Terminated, user_error
from spleenkit.presets import PRESETS, parse_value, recipe_names, resolve_preset

Handler = Callable[[argparse.Namespace], int | None]


def _command(subparsers: argparse._SubParsersAction, name: str, handler: Handler, help_text: str,
             **kwargs: object) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text, **kwargs)
    parser.set_defaults(handler=handler)
    return parser


def parse_setting(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` of every command's ``--set``, one rule for all: the name, and the value as text. What reads
    it reads the text by one rule too: a recipe setting by its kind at the recipe's door
    (:func:`spleenkit.presets.resolve_preset`), anything else by :func:`spleenkit.presets.parse_value`."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise BadInputError(f"--set takes NAME=VALUE (got {text!r})")
    return name.strip(), raw.strip()


def _settings(items: Sequence[str] | None) -> dict[str, str]:
    """All ``--set`` items as a dict (a name given twice: the last wins, as on a command line)."""
    return dict(parse_setting(item) for item in items or [])


def _command_group(subparsers: argparse._SubParsersAction, name: str, help_text: str,
                   description: str) -> argparse._SubParsersAction:
    """A command with commands of its own (``spleenkit NAME COMMAND``); alone it prints its help."""
    group = subparsers.add_parser(name, help=help_text, description=description)
    group.set_defaults(handler=lambda _args: group.print_help())
    return group.add_subparsers(title=f"{name} commands", metavar="COMMAND")


# --------------------------------------------------------------------------- info, presets
def _info(args: argparse.Namespace) -> int:
    import json

    from spleenkit.environment import environment_report

    print(json.dumps(environment_report(), indent=2))
    return 0


def _presets(args: argparse.Namespace) -> int:
    for preset in PRESETS.values():
        print(f"{preset.name:14s} {preset.description}")
    return 0


def _add_general_commands(subparsers: argparse._SubParsersAction) -> None:
    _command(subparsers, "info", _info, "Print versions, device, cores, memory, GPUs, the CPU's capability and "
                                        "the precision for training and inference, as JSON.")
    _command(subparsers, "presets", _presets, "List the training recipes.")


# --------------------------------------------------------------------------- notebooks
def _notebooks_run(args: argparse.Namespace) -> int:
    from spleenkit.notebooks import format_table, run_notebooks

    if not args.verbose:
        logging.getLogger("papermill").setLevel(logging.WARNING)
    overrides = _settings(args.set)
    summary = run_notebooks(profile=args.profile, only=args.only, out_dir=args.out, overrides=overrides,
                            kernel_name=args.kernel, keep_going=args.keep_going, log_output=args.log_output,
                            memory_limit=args.memory_limit)
    if summary.memory_limit and not summary.memory_limit["applied"]:
        print(f"memory limit of {summary.memory_limit['limit_mib']:.0f} MiB not applied: "
              f"{summary.memory_limit['reason']}", file=sys.stderr)
    if args.memory_record:
        from spleenkit.io import write_json
        from spleenkit.notebooks import memory_record

        write_json(args.memory_record, memory_record(summary))
    for failure in summary.failures:
        print(f"\n{failure.error}\n", file=sys.stderr)
    print(format_table(summary.results))
    print(f"executed notebooks and summary.json: {summary.output_dir}")
    return 0 if summary.ok else 1


def _notebooks_list(args: argparse.Namespace) -> int:
    from spleenkit.notebooks import find_repo, list_notebooks, notebook_title, notebooks_with_kept_outputs

    folder = find_repo() / "notebooks"
    notebooks = notebooks_with_kept_outputs(folder) if args.kept else list_notebooks(folder)
    width = max((len(path.name) for path in notebooks), default=0)
    for path in notebooks:
        print(path if args.paths else f"{path.name:{width}s}  {notebook_title(path)}")
    return 0


def _notebooks_strip(args: argparse.Namespace) -> int:
    from spleenkit.notebooks import find_repo, list_notebooks, strip_notebooks

    paths = args.paths or list_notebooks(find_repo() / "notebooks")
    changed = strip_notebooks(paths, check=args.check)
    for path in changed:
        print(f"{'has outputs to strip' if args.check else 'stripped'}: {path}")
    return 1 if args.check and changed else 0


def _notebooks_refresh(args: argparse.Namespace) -> int:
    from spleenkit.notebooks import find_repo, list_notebooks, refresh_kept_outputs, select_notebooks

    if not args.verbose:
        logging.getLogger("papermill").setLevel(logging.WARNING)
    for path in select_notebooks(list_notebooks(find_repo() / "notebooks"), args.notebooks):
        cells = refresh_kept_outputs(path)
        print(f"{path.name}: stored the outputs of cell(s) {', '.join(map(str, cells)) or 'none (no kept cells)'}")
    return 0


def _add_notebook_commands(subparsers: argparse._SubParsersAction) -> None:
    commands = _command_group(subparsers, "notebooks", "Run the numbered notebooks with papermill; strip outputs.",
                              "Run, list and strip the numbered notebooks.")
    run = _command(commands, "run", _notebooks_run,
                   "Execute the numbered notebooks in order with papermill under a profile; print notebook / "
                   "status / seconds; exit 1 with the failing cell's traceback when one fails.")
    run.add_argument("--profile", default="quick",
                     help="quick (CPU, synthetic data, minutes) or full (GPU, MSD data), or a YAML file")
    run.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks (numbers or names)")
    run.add_argument("--out", help="folder for the executed copies (default runs/<profile>/notebooks)")
    run.add_argument("--set", action="append", metavar="NAME=VALUE",
                     help="override a shared parameter such as data_dir (repeatable)")
    run.add_argument("--kernel", help="Jupyter kernel name (default: a kernel running this Python)")
    run.add_argument("--keep-going", action="store_true", help="run the later notebooks after a failure")
    run.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the log")
    run.add_argument("--memory-limit", metavar="SIZE",
                     help="run each kernel and its children in a Linux memory cgroup with this limit, as Binder "
                          "does (1800M: Binder's 2 GiB less its Jupyter server); records the cgroup's highest "
                          "charge and OOM kills per notebook; needs root and cgroup v1, else skipped with the reason")
    run.add_argument("--memory-record", metavar="FILE",
                     help="also write each notebook's peak memory, cgroup charge and OOM kills, the CPU and the date "
                          "to FILE (JSON; notebooks/memory.json is the course outline's measurement)")
    listing = _command(commands, "list", _notebooks_list, "List the numbered notebooks and their titles.")
    listing.add_argument("--kept", action="store_true", help="only the notebooks with kept (nbval-compared) outputs")
    listing.add_argument("--paths", action="store_true", help="print paths only")
    strip = _command(commands, "strip", _notebooks_strip,
                     "Remove outputs from notebooks, except cells tagged keep_output (before committing).")
    strip.add_argument("paths", nargs="*", help="notebook files (default: every numbered notebook)")
    strip.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook holds outputs")
    refresh = _command(commands, "refresh", _notebooks_refresh,
                       "Re-execute notebooks with their default parameters and store the new outputs of their "
                       "keep_output cells (the ones nbval compares); everything else stays stripped.")
    refresh.add_argument("notebooks", nargs="+", metavar="NN", help="notebooks to refresh (numbers or names)")


# --------------------------------------------------------------------------- data
def _data_synth(args: argparse.Namespace) -> int:
    import time

    from spleenkit.data.synthetic import write_synthetic_dataset

    started = time.perf_counter()
    out = write_synthetic_dataset(args.out, cases=args.cases, seed=args.seed, test_cases=args.test_cases,
                                  matrix=args.matrix, slice_spacing=args.slice_spacing, overwrite=args.force,
                                  workers=args.workers)
    print(f"synthetic dataset: {out} ({time.perf_counter() - started:.1f} s)")
    return 0


def _data_download(args: argparse.Namespace) -> int:
    from spleenkit.data import download

    progress = not args.quiet
    if args.source == "msd":
        if args.md5 and args.no_verify:
            raise SpleenkitError("give --md5 or --no-verify, not both")
        if args.url and not (args.md5 or args.no_verify):
            raise SpleenkitError("--url needs the mirror's --md5 (32 hexadecimal digits), or --no-verify to download "
                                 "it without a checksum")
        md5 = None if args.no_verify else download.check_md5(args.md5) if args.md5 else download.MSD_SPLEEN_MD5
        dataset = download.download_msd(args.root or "data", url=args.url or download.MSD_SPLEEN_URL, md5=md5,
                                        keep_archive=not args.remove_archive, progress=progress)
        print(f"MSD Task09 Spleen: {dataset}")
    else:
        folder = download.download_example(args.root or "data/totalseg-example", local=args.local, progress=progress)
        print(f"example CT and spleen masks: {folder}")
        if args.as_dataset:
            dataset = download.example_as_msd(folder, args.as_dataset)
            print(f"example as an MSD-layout dataset: {dataset}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from spleenkit.data.checks import check_dataset

    report = check_dataset(args.dataset)
    if report.cases:
        print(report.table())
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    bad = {p.path for p in report.problems}
    print(f"{len(report.cases)} case(s) checked: {len(bad)} bad file(s), {len(report.warnings)} warning(s)")
    return 0 if report.ok else 1


def _add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    commands = _command_group(subparsers, "data", "Make, download and check datasets in the MSD Task09 layout.",
                              "Make, download and check datasets in the MSD Task09 layout.")
    synth = _command(commands, "synth", _data_synth,
                     "Write synthetic abdominal CT phantoms with spleen labels (imagesTr/, labelsTr/, imagesTs/, "
                     "dataset.json); the same seed gives identical files.")
    synth.add_argument("--out", required=True, help="dataset folder to create")
    synth.add_argument("--cases", type=int, default=12, help="labelled cases (default 12)")
    synth.add_argument("--test-cases", type=int, default=2, help="unlabelled test cases (default 2)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--matrix", type=int, default=256,
                       help="in-plane voxels: 256 gives 1.2-1.8 mm voxels, 512 MSD's 0.6-0.9 mm (default 256)")
    synth.add_argument("--slice-spacing", type=float, default=None,
                       help="slice spacing in mm for every case (default: drawn from 1.5-8 mm like MSD)")
    synth.add_argument("--workers", type=int, default=None,
                       help="threads drawing cases (default: the CPU count, at most 4; same files either way)")
    synth.add_argument("--force", action="store_true", help="replace a folder holding another synthetic dataset")

    download = _command(commands, "download", _data_download,
                        "Download MSD Task09 Spleen (md5-verified, resumable, safely extracted) or the real "
                        "example CT with its two spleen masks (sha256-verified). Does nothing when already done.")
    download.add_argument("source", choices=["msd", "example"], help="what to download")
    download.add_argument("--root", help="folder to put it in (default: data for MSD, which makes "
                                         "data/Task09_Spleen; data/totalseg-example for the example)")
    download.add_argument("--url", help="MSD: another address for Task09_Spleen.tar (a mirror)")
    download.add_argument("--md5", help="MSD: the md5 to expect from --url (required with --url)")
    download.add_argument("--no-verify", action="store_true",
                          help="MSD: download --url without a checksum (when the mirror publishes none)")
    download.add_argument("--remove-archive", action="store_true", help="MSD: delete the .tar after extraction")
    download.add_argument("--local", help="example: use this folder's verified copy instead of downloading "
                                          "(default $SPLEENKIT_EXAMPLE_DIR when set)")
    download.add_argument("--as-dataset", metavar="DIR",
                          help="example: also write an MSD-layout folder with the CT as one labelled case")
    download.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    check = _command(commands, "check", _data_check,
                     "Validate a dataset folder: print case, shape, spacing, orientation, HU range and spleen "
                     "volume; exit 1 naming every bad file and why.")
    check.add_argument("dataset", help="dataset folder holding dataset.json")


# --------------------------------------------------------------------------- several processes (torchrun)
def _distributed_options(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """--distributed and its settings, for commands that torchrun can run as several processes."""
    from spleenkit.distributed import DEFAULT_TIMEOUT_S  # (standard library only: cheap)

    group = parser.add_argument_group(
        "several processes", "Launch with `torchrun --nproc_per_node=N -m spleenkit ... --distributed` "
        "(see docs/multi_node.md); rank 0 writes every file.")
    group.add_argument("--distributed", action="store_true",
                       help="run as one process of a torchrun job: NCCL between GPUs, gloo between CPU processes")
    group.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                       help=f"a rank that stops answering fails the job after this many seconds "
                            f"(default {DEFAULT_TIMEOUT_S})")
    if training:
        group.add_argument("--sync-bn", action="store_true",
                           help="SyncBatchNorm: batch statistics over all GPUs (CUDA only)")
        group.add_argument("--scale-lr", choices=("none", "linear"), default="none",
                           help="learning rate for N processes: none keeps the preset's (as the bundle does), "
                                "linear multiplies it by N (default none)")


def _process_group(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The torchrun process group for ``--distributed`` (destroyed on exit), else a context yielding None."""
    if not getattr(args, "distributed", False):
        if getattr(args, "sync_bn", False):
            raise SpleenkitError("--sync-bn needs --distributed (several processes under torchrun)")
        return contextlib.nullcontext()
    from spleenkit.distributed import process_group

    return process_group(device=args.device, timeout_s=args.timeout_s)


# --------------------------------------------------------------------------- evaluation and inference
def _force_preset_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force-preset", action="store_true",
                        help="use --preset even where its spacing, orientation, window or network differ from the "
                             "recipe the model was trained with (refused otherwise: the masks would change)")


def _window_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by evaluate and infer: preset, device, precision, sliding window, post-processing."""
    parser.add_argument("--preset", help=f"recipe for preprocessing and the window: {recipe_names()} (default: the "
                                         "model's own, carried in model.pt or named by its run manifest; else seed, "
                                         "with a warning)")
    _force_preset_option(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision: float16 on CUDA, bfloat16 on the CPU (default: the preset's on CUDA; "
                             "off on the CPU, where float32 gives the bundle's exact masks; on a CPU without "
                             "native bfloat16 --amp warns that it is slower)")
    parser.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1) (default: the preset's)")
    parser.add_argument("--sw-batch", type=int, help="windows per forward pass (default: the preset's)")
    parser.add_argument("--blend", choices=("constant", "gaussian"), default="constant",
                        help="how overlapping windows are blended (default constant, as the bundle)")
    parser.add_argument("--stitch-device", choices=("cpu", "auto"), default="cpu",
                        help="where the stitched volume lives: cpu keeps GPU memory bounded (default cpu)")
    parser.add_argument("--largest-component", action="store_true", help="keep only the largest connected component")
    parser.add_argument("--fill-holes", action="store_true", help="fill holes inside the predicted spleen")


def _evaluate(args: argparse.Namespace) -> int:
    from spleenkit.evaluation import evaluate_run
    from spleenkit.metrics import format_summary

    with _process_group(args) as context:
        result = evaluate_run(args.model, args.data, out_dir=args.out, preset=args.preset, split=args.split,
                              device=args.device, amp=args.amp, overlap=args.overlap, sw_batch_size=args.sw_batch,
                              blend=args.blend, stitch_device=args.stitch_device,
                              largest_component=args.largest_component, fill_holes=args.fill_holes,
                              save_predictions=args.save_predictions, max_cases=args.max_cases, distributed=context,
                              force_preset=args.force_preset)
    if context is not None and not context.is_main:
        return 0
    print(format_summary(result.summary))
    print(f"per-case metrics: {result.csv_path}")
    print(f"summary: {result.summary_path}")
    return 0


def _evaluate_masks(args: argparse.Namespace) -> int:
    import json

    from spleenkit.metrics import compare_mask_files

    print(json.dumps(compare_mask_files(args.prediction, args.reference), indent=2))
    return 0


def _infer(args: argparse.Namespace) -> int:
    from spleenkit.inference import infer

    result = infer(args.model, args.input, args.out, preset=args.preset, device=args.device, amp=args.amp,
                   largest_component=args.largest_component, fill_holes=args.fill_holes, overlap=args.overlap,
                   sw_batch_size=args.sw_batch, blend=args.blend, stitch_device=args.stitch_device,
                   overlay=args.overlay, force=args.force, force_preset=args.force_preset)
    for case in result.cases:
        print(f"{case.name}: {case.mask} (spleen {case.spleen_volume_ml:.1f} mL, {case.seconds:.1f} s)"
              + (f" - {len(case.warnings)} warning(s), see above" if case.warnings else ""))
        if case.segmentation:
            print(f"{case.name}: {case.segmentation} (DICOM Segmentation of the series)")
        elif case.segmentation_not_written:
            print(f"{case.name}: no DICOM Segmentation: {case.segmentation_not_written}")
    print(f"manifest: {result.manifest_path} (peak memory {result.peak_memory_mib:.0f} MiB)")
    return 0


def _add_evaluation_commands(subparsers: argparse._SubParsersAction) -> None:
    evaluate = _command(subparsers, "evaluate", _evaluate,
                        "Evaluate a trained model on a dataset split: Dice, HD95, ASSD and volumes per case, in the "
                        "resampled and the original image space; writes RUN_DIR/evaluation/.")
    evaluate.add_argument("--model", required=True, help="the run's model.pt")
    evaluate.add_argument("--data", required=True, help="dataset folder in the MSD layout")
    evaluate.add_argument("--out", help="output folder, predictions in OUT/predictions (default RUN_DIR/evaluation, "
                                        "predictions in RUN_DIR/predictions)")
    evaluate.add_argument("--split", choices=("validation", "training", "all"), default="validation",
                          help="which labelled cases (default validation: the bundle's split)")
    evaluate.add_argument("--max-cases", type=int, help="evaluate only the first N cases of the split")
    evaluate.add_argument("--save-predictions", action=argparse.BooleanOptionalAction, default=True,
                          help="write each original-space prediction to predictions/ (default yes)")
    _window_options(evaluate)
    _distributed_options(evaluate)
    masks = _command(subparsers, "evaluate-masks", _evaluate_masks,
                     "Compare two 0/1 mask files on the same grid; print Dice, HD95, Hausdorff, ASSD (mm) and "
                     "volumes (mL) as JSON. Different grids are an error, not resampled.")
    masks.add_argument("prediction", help="mask file to score (NIfTI)")
    masks.add_argument("reference", help="reference mask file on the same grid (NIfTI)")
    infer = _command(subparsers, "infer", _infer,
                     "Segment the spleen in a NIfTI file, a folder of them, DICOM series or a DICOMDIR's export; "
                     "writes NAME_spleen.nii.gz on the input's exact grid, an overlay PNG and a manifest.")
    infer.add_argument("--model", required=True, help="model.pt (a run's, or the bundle's weights)")
    infer.add_argument("--input", required=True, help="NIfTI file, or a folder of NIfTI files and DICOM series (a "
                                                      "CD/DVD export with its DICOMDIR too)")
    infer.add_argument("--out", required=True, help="output folder")
    infer.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True,
                       help="write an overlay PNG per input (default yes)")
    infer.add_argument("--force", action="store_true",
                       help="segment images whose values do not look like CT in HU (an MR image?); the warning is "
                            "recorded in the manifest")
    _window_options(infer)


# --------------------------------------------------------------------------- bundle, official weights, export
def _bundle_path(args: argparse.Namespace) -> int:
    from spleenkit.bundle import bundle_source

    print(bundle_source())
    return 0


def _bundle_command(args: argparse.Namespace) -> int:
    import shlex

    from spleenkit.bundle import bundle_command, bundle_source, format_command

    folder = bundle_source()
    command = bundle_command(args.name, overrides=_settings(args.set),
                             processes=args.processes)
    print(f"cd {shlex.quote(str(folder))} && {format_command(command)}")
    return 0


def _bundle_run(args: argparse.Namespace) -> int:
    from spleenkit.bundle import run

    run(args.name, bundle_dir=args.bundle_dir, **{key: parse_value(text) for key, text in _settings(args.set).items()})
    return 0


def _pretrained_fetch(args: argparse.Namespace) -> int:
    from spleenkit.pretrained import SOURCES, fetch_pretrained

    folder = fetch_pretrained(args.dir, version=args.version, sources=tuple(args.source or SOURCES), url=args.url)
    print(f"official weights: {folder / 'models' / 'model.pt'}")
    return 0


def _pretrained_load(args: argparse.Namespace) -> int:
    from spleenkit.pretrained import load_pretrained

    _, info = load_pretrained(args.path, preset=args.preset, force_preset=args.force_preset)
    print(f"{info.weights}: loaded into the kit's UNet with strict key matching "
          f"({info.parameters:,} parameters in {info.tensors} tensors)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from spleenkit.export import export_model

    summary = export_model(args.model, args.out, preset=args.preset, onnx=args.onnx, metadata_file=args.metadata,
                           check=args.check, force_preset=args.force_preset)
    for kind in ("torchscript", "onnx"):
        if kind in summary:
            difference = summary.get(f"{kind}_max_abs_difference")
            checked = "" if difference is None else \
                f" (largest difference from the eager model {difference:.1e}, tolerance {summary['tolerance']:.0e})"
            print(f"{kind}: {summary[kind]}{checked}")
    return 0


def _add_bundle_commands(subparsers: argparse._SubParsersAction) -> None:
    from spleenkit.bundle import COMMANDS  # light: no torch or MONAI at import

    single_process = [name for name, (_, _, distributed) in COMMANDS.items() if not distributed]

    commands = _command_group(subparsers, "bundle", "The MONAI bundle (bundle/): where it is, its commands, run them.",
                              "The kit as a MONAI bundle with spleen_ct_segmentation's keys.")
    _command(commands, "path", _bundle_path, "Print the bundle folder.")
    command = _command(commands, "command", _bundle_command,
                       "Print one of the bundle's commands (as its README gives them) with overrides.")
    command.add_argument("name", choices=list(COMMANDS), help="which command")
    command.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="config override such as dataset_dir=/data/Task09_Spleen or epochs=1 (repeatable)")
    command.add_argument("--processes", type=int, default=2, help="processes for the multi-GPU commands (default 2)")
    run = _command(commands, "run", _bundle_run,
                   "Run a single-process bundle command here; overrides naming no config key are refused.")
    run.add_argument("name", choices=single_process, help="which command")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="config override such as dataset_dir=/data/Task09_Spleen or epochs=1 (repeatable)")
    run.add_argument("--bundle-dir", help="bundle folder (default: the kit's bundle/)")

    weights = _command_group(subparsers, "pretrained",
                             "Fetch and load MONAI's released spleen_ct_segmentation weights.",
                             "MONAI's released spleen_ct_segmentation weights.")
    fetch = _command(weights, "fetch", _pretrained_fetch,
                     "Download the released bundle with monai.bundle.download (offline: say how to get it by hand).")
    fetch.add_argument("--dir", default="pretrained", help="folder to put the bundle in (default ./pretrained)")
    fetch.add_argument("--version", default="0.5.9", help="bundle release (default 0.5.9)")
    fetch.add_argument("--source", action="append", choices=("monaihosting", "github", "ngc", "huggingface_hub"),
                       help="where to download from, tried in order (default monaihosting, github, ngc)")
    fetch.add_argument("--url", help="download the bundle zip from this address instead (a mirror)")
    load = _command(weights, "load", _pretrained_load,
                    "Load a bundle's models/model.pt into the kit's UNet (weights only, strict keys); print its size.")
    load.add_argument("path", help="model.pt, the bundle folder, or the folder holding it")
    load.add_argument("--preset", help=f"recipe whose network to build: {recipe_names()} (default: the one the "
                                       "weights carry, else seed)")
    _force_preset_option(load)

    export = _command(subparsers, "export", _export,
                      "Export a model.pt to TorchScript (with the bundle metadata inside) and optionally ONNX; "
                      "checks the exported model against the eager one.")
    export.add_argument("--model", required=True, help="model.pt to export")
    export.add_argument("--out", required=True, help="TorchScript file to write (model.ts); ONNX goes beside it")
    export.add_argument("--onnx", action="store_true", help="also write an ONNX file (needs onnx and onnxscript)")
    export.add_argument("--preset", help=f"recipe whose network to build: {recipe_names()} (default: the model's "
                                         "own, carried in model.pt or named by its run manifest; else seed)")
    _force_preset_option(export)
    export.add_argument("--metadata", help="metadata JSON to store in the TorchScript file (default: none)")
    export.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare the exported model with the eager one on a random patch (default yes)")


# --------------------------------------------------------------------------- training
def _train(args: argparse.Namespace) -> int:
    from spleenkit.training import train
    from spleenkit.training.engines import EVALUATOR_LOGGER, TRAINER_LOGGER

    if not args.verbose:  # the epoch summary line says it all; the engines' own messages need -v
        for name in (TRAINER_LOGGER, EVALUATOR_LOGGER):
            logging.getLogger(name).setLevel(logging.WARNING)
    # the recipe's one door: --set and the flags meet there (a name given both ways is refused)
    preset = resolve_preset(args.preset, _settings(args.set), flags={
        "epochs": args.epochs, "amp": args.amp, "seed": args.seed, "cache_rate": args.cache_rate,
        "patch_size": args.patch, "validation_interval": args.val_interval, "learning_rate": args.lr})
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    with _process_group(args) as context:
        result = train(args.data, args.out, preset, device=args.device, amp=args.amp, resume=args.resume,
                       resume_anyway=args.resume_anyway, start_afresh=args.start_afresh, num_workers=args.workers,
                       progress=progress, distributed=context, sync_bn=args.sync_bn, scale_lr=args.scale_lr)
    if context is not None and not context.is_main:
        return 0
    dice = ("none (no validation ran)" if result.best_dice is None
            else f"{result.best_dice:.4f} at epoch {result.best_epoch}")
    print(f"trained {result.epochs} epoch(s) in {result.seconds / 60:.1f} min on {result.device}; "
          f"best validation Dice {dice}")
    print(f"model: {result.model_path}")
    print(f"run folder: {result.run_dir} (metrics.jsonl, checkpoint_last.pt, manifest.json, tensorboard/)")
    return 0


def _add_training_commands(subparsers: argparse._SubParsersAction) -> None:
    train = _command(subparsers, "train", _train,
                     "Train the bundle's UNet on a dataset folder; writes model.pt (best validation Dice), "
                     "checkpoint_last.pt, metrics.jsonl, manifest.json and tensorboard/ into the run folder.")
    train.add_argument("--data", required=True, help="dataset folder in the MSD layout (dataset.json)")
    train.add_argument("--out", required=True, help="run folder to write")
    train.add_argument("--preset", default="seed", help=f"recipe: {recipe_names()} (default seed)")
    train.add_argument("--epochs", type=int, help="number of epochs (default: the preset's)")
    train.add_argument("--patch", type=int, nargs="+", metavar="N",
                       help="training patch (and validation window) size: N or X Y Z (default: the preset's)")
    train.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="mixed precision: float16 on CUDA, bfloat16 on a CPU with native bfloat16 (default: "
                            "the fastest correct choice here; float32 on a CPU without native bfloat16, where "
                            "--amp forces bfloat16 with a warning that it is slower)")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint_last.pt")
    train.add_argument("--resume-anyway", action="store_true",
                       help="with --resume: continue even though the preset or its settings differ from the run's "
                            "(the differences are recorded in the manifest)")
    train.add_argument("--start-afresh", action="store_true",
                       help="with --resume: where nothing usable is left to resume (no complete checkpoint_last.pt, "
                            "or no readable manifest.json), train from the first epoch instead of refusing; the "
                            "earlier run is moved into previous-<time>/ whole")
    train.add_argument("--seed", type=int, help="random seed (default: the preset's, 123)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    train.add_argument("--workers", type=int, help="threads filling the cache and loader workers (default: all cores)")
    train.add_argument("--cache-rate", type=float, help="fraction of cases kept in memory (default: the preset's)")
    train.add_argument("--val-interval", type=int, help="validate every N epochs (default: the preset's)")
    train.add_argument("--lr", type=float, help="learning rate (default: the preset's)")
    train.add_argument("--set", action="append", metavar="NAME=VALUE",
                       help="any other preset setting, e.g. --set spacing=2,2,2 --set scheduler=none "
                            "(repeatable; `spleenkit presets` lists the recipes)")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar (default: on in a terminal)")
    _distributed_options(train, training=True)


# --------------------------------------------------------------------------- course
def _course_student(args: argparse.Namespace) -> int:
    from spleenkit.course import build_student_copies

    written = build_student_copies(args.out, only=args.only, force=args.force)
    for path in written:
        print(f"student copy: {path}")
    print(f"{len(written)} notebook(s) without solutions or outputs in {args.out}")
    return 0


def _course_check(args: argparse.Namespace) -> int:
    from spleenkit.course import check_course
    from spleenkit.notebooks import format_table, text_table

    if not args.verbose:
        logging.getLogger("papermill").setLevel(logging.WARNING)
    overrides = _settings(args.set)
    result = check_course(profile=args.profile, only=args.only, out_dir=args.out, overrides=overrides)
    for failure in result.summary.failures:
        print(f"\n{failure.error}\n", file=sys.stderr)
    print(format_table(result.summary.results), end="\n\n")
    print(text_table(result.rows, ["notebook", "exercise", "status", "title"]))
    passed = sum(row["status"] == "correct" for row in result.rows)
    print(f"\n{passed} of {len(result.rows)} exercise checks correct; executed copies in {result.summary.output_dir}")
    return 0 if result.ok else 1


def _course_list(args: argparse.Namespace) -> int:
    import nbformat

    from spleenkit.course import find_exercises
    from spleenkit.exercises import EXERCISES
    from spleenkit.notebooks import find_repo, list_notebooks

    for path in list_notebooks(find_repo() / "notebooks"):
        print(path.name)
        for item in find_exercises(nbformat.read(path, as_version=4)):
            known = EXERCISES.get(item.exercise_id or "")
            print(f"    {item.exercise_id or '?':24s} {known.title if known else item.heading}")
    return 0


def _course_badges(args: argparse.Namespace) -> int:
    from spleenkit.course import set_course_home
    from spleenkit.notebooks import course_home, find_repo

    changed = set_course_home(args.repo, args.ref)
    home = course_home()
    for path in changed:
        print(f"rewritten: {path.relative_to(find_repo())}")
    print(f"badges and Colab installs point at github.com/{home.repository} at {home.ref} "
          f"({len(changed)} file(s) changed); commit them, and push {home.ref} to that repository")
    return 0


def _add_course_commands(subparsers: argparse._SubParsersAction) -> None:
    commands = _command_group(subparsers, "course", "Teach with the notebooks: student copies, exercise checks.",
                              "Build student copies of the notebooks and check the instructor copies.")
    student = _command(commands, "student", _course_student,
                       "Write student copies of the notebooks: every solution cell becomes a '# your code here' "
                       "stub (answers set to None, which the checks answer with a hint), and no outputs.")
    student.add_argument("--out", required=True,
                         help="folder for the copies; they read ../data and ../runs, so name it .../notebooks")
    student.add_argument("--only", nargs="+", metavar="NN", help="only these notebooks (numbers or names)")
    student.add_argument("--force", action="store_true", help="overwrite copies that exist (a student's work!)")
    check = _command(commands, "check", _course_check,
                     "Run the instructor copies with papermill in strict mode and list every exercise check; "
                     "exit 1 unless all notebooks ran and every check said correct.")
    check.add_argument("--profile", default="quick", help="quick (CPU, minutes) or full (GPU), or a YAML file")
    check.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks (numbers or names)")
    check.add_argument("--out", help="folder for the executed copies (default runs/<profile>/notebooks)")
    check.add_argument("--set", action="append", metavar="NAME=VALUE",
                       help="override a shared parameter such as data_dir (repeatable)")
    _command(commands, "list", _course_list, "List the exercises of every notebook.")
    badges = _command(commands, "badges", _course_badges,
                      "Point every Colab and Binder badge and Colab's install at a GitHub repository and ref "
                      "(a fork's): [tool.spleenkit] in pyproject.toml, the instructor and student copies, the README.")
    badges.add_argument("--repo", metavar="OWNER/NAME", help="the GitHub repository (default: the current one)")
    badges.add_argument("--ref", help="a tag, branch or commit, e.g. main or v1.0 (default: the current one)")


# --------------------------------------------------------------------------- command groups
# Each concern adds its commands in a function of its own below; keep the heavy imports
# inside the handlers.

def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (cheap: imports nothing heavy)."""
    parser = argparse.ArgumentParser(
        prog="spleenkit",
        description="3D spleen segmentation in CT with MONAI: data, training, evaluation, inference, notebooks.",
    )
    parser.add_argument("--version", action="version", version=f"spleenkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in _COMMAND_GROUPS:
        add(subparsers)
    return parser


_COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_general_commands, _add_notebook_commands, _add_data_commands, _add_evaluation_commands,
    _add_bundle_commands, _add_training_commands, _add_course_commands]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m spleenkit``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        with _sigterm_as_interrupt():
            return int(handler(args) or 0)
    except KeyboardInterrupt as error:  # SIGINT, and SIGTERM alike: what finished is kept and described
        terminated = isinstance(error, Terminated)
        print(f"spleenkit: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as error:
        known = user_error(error)  # the one mapping of the kit's errors, OSError and memory to one line
        if known is None:
            raise
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"spleenkit: error: {known}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM (``kill``, ``timeout``, a batch system) stop a command as Ctrl-C does, with
    :class:`~spleenkit.errors.Terminated`, so that infer, evaluate and train record what they finished; both
    wait for a file being written to be whole (:func:`spleenkit.io.interrupt`)."""
    import signal
    import threading

    from spleenkit.io import interrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        interrupt(Terminated("terminated by SIGTERM"))

    def keyboard(signum: int, frame: object) -> None:
        interrupt(KeyboardInterrupt())

    previous = {number: signal.signal(number, handler)
                for number, handler in ((signal.SIGTERM, terminate), (signal.SIGINT, keyboard))}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side benchmark: spleenkit against the spleen bundle's pipeline built the plain MONAI way.

    python benchmarks/run_benchmark.py [--quick] [--out benchmarks/results] [--device cpu|cuda]

Measures, on the same data and machine in one run, each side in its own process and the sides
alternating (kit, reference, reference, kit ...) so that drift and other load hit both:

1. training throughput (steps of batch 2 x 4 crops of 96^3, the seed recipe) and peak memory;
2. time to quality: minutes of training until validation Dice >= 0.90 on the synthetic data;
3. cache fill (first epoch) time and preprocessing throughput;
4. sliding-window inference on the real example CT and a 512x512x~100 synthetic case: seconds,
   peak memory and the agreement (Dice) of the two sides' masks;
5. start-up time of ``spleenkit --help`` and ``spleenkit presets``.

Writes ``benchmark.json``, ``benchmark.md`` (the table) and ``benchmark.png`` into ``--out``.
``--quick`` shrinks everything (tiny data, small patches, short caps) into a smoke test of a few
minutes: its numbers say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402  (a sibling module of this script)

SIDES = ("kit", "reference")
PARTS = ("startup", "levers", "training", "quality", "inference")


# --------------------------------------------------------------------------- configuration
#: The quick recipe's settings the time-to-quality runs change: the bundle's network (batch norm, where the quick
#: recipe normalises per patch), so that the kit's weights also load into the bundle's inference for the inference
#: comparison, and validation every epoch, as the reference side validates, so that both see the target as soon.
BUNDLE_NETWORK: dict[str, Any] = {"norm": "batch", "validation_interval": 1}


def configuration(quick: bool) -> dict[str, Any]:
    """Sizes of every part; ``quick`` is a smoke test (tiny data and patches)."""
    if quick:
        return {
            "data": {"cases": 5, "matrix": 64, "test_cases": 0},
            "big_case": {"matrix": 96, "slice_spacing": 6.0},
            "training": {"cases": 2, "rounds": 1, "warmup": 1, "steps": 1,
                         "overrides": {"spacing": [6.0, 6.0, 6.0], "patch_size": [48, 48, 48], "num_samples": 2}},
            "quality": {"target": 0.90, "cap_seconds": 25, "kit_preset": "quick",
                        "kit_overrides": {"spacing": [6.0, 6.0, 6.0], "patch_size": [32, 32, 32],
                                          "validation_cases": 1, **BUNDLE_NETWORK},
                        "reference": {"spacing": [6.0, 6.0, 6.0], "patch_size": [32, 32, 32], "roi_size": [32, 32, 32],
                                      "validation_interval": 1, "num_workers": 2}},
            "inference": {"rounds": 1, "images": 1,  # the example CT only (fewer processes to start)
                          "overrides": {"spacing": [6.0, 6.0, 6.0], "patch_size": [32, 32, 32]},
                          "reference": {"spacing": [6.0, 6.0, 6.0], "roi_size": [32, 32, 32]}},
            "startup": {"repeats": 1},
            "levers": {"training": {"patch": 48, "batch": 1, "warmup": 1, "repeats": 1},
                       "inference": {"roi": 32, "batch": 1, "warmup": 1, "repeats": 1}},
        }
    return {
        # `spleenkit data synth` defaults
        "data": {"cases": 12, "matrix": 256, "test_cases": 2},
        "big_case": {"matrix": 512, "slice_spacing": 2.0},
        # the seed recipe at full size: 1.5 x 1.5 x 2 mm, 96^3 x 4 crops, batch 2
        "training": {"cases": 8, "rounds": 2, "warmup": 1, "steps": 3, "overrides": {}},  # 1 + 3 steps: an epoch
        "quality": {
            "target": 0.90, "cap_seconds": 420, "kit_preset": "quick", "kit_overrides": BUNDLE_NETWORK,
            # the bundle's recipe (Adam 1e-4, DiceCE, 4 crops, batch 2, sliding window 0.5 / 4, 4 workers)
            # scaled to what a CPU can train in minutes: the kit's quick voxels and patch, validation every epoch
            "reference": {"spacing": [3.0, 3.0, 3.0], "patch_size": [64, 64, 64], "roi_size": [64, 64, 64],
                          "validation_interval": 1},
        },
        "inference": {"rounds": 2, "overrides": {}, "reference": {}},
        "startup": {"repeats": 5},
        # one step / one window batch per variant, in one process, variants taking turns
        "levers": {"training": {"patch": 96, "batch": 2, "warmup": 1, "repeats": 3},
                   "inference": {"roi": 96, "batch": 4, "warmup": 1, "repeats": 3}},
    }


# --------------------------------------------------------------------------- machine
def machine(device: str) -> dict[str, Any]:
    """Facts about this machine for the report: CPU model, cores, memory, load, versions."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    info: dict[str, Any] = {"cpu": model, "cores": cores, "torch": torch.__version__,
                            "python": platform.python_version(), "platform": platform.platform(),
                            "device": device, "torch_threads": torch.get_num_threads()}
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from spleenkit.devices import describe_precision

    precision = describe_precision(device)  # AVX2 / AVX512 / AVX512_BF16 / AMX_BF16, and what the kit picks there
    info["cpu_capability"] = precision["cpu"]["label"]
    info["training_precision"] = precision["training"]["dtype"]
    info["inference_precision"] = precision["inference"]["dtype"]
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- data
def prepare_data(work: Path, config: dict[str, Any], data_dir: str | None, log: Any) -> dict[str, Any]:
    """The synthetic dataset (made unless given), a large synthetic case and the example CT."""
    from spleenkit.data.datalist import load_datalist
    from spleenkit.data.synthetic import nifti_bytes, render_case, write_synthetic_dataset

    if data_dir is None:
        started = time.perf_counter()
        data = write_synthetic_dataset(work / "synthetic", cases=config["data"]["cases"],
                                       matrix=config["data"]["matrix"], test_cases=config["data"]["test_cases"],
                                       workers=2)
        log(f"synthetic dataset ready in {time.perf_counter() - started:.0f} s: {data}")
    else:
        data = Path(data_dir)
    big = work / f"synthetic_{config['big_case']['matrix']}.nii.gz"
    if not big.exists():
        image, _, geometry = render_case(7, 99, config["big_case"]["matrix"], config["big_case"]["slice_spacing"])
        big.write_bytes(nifti_bytes(image, geometry.affine))
    import nibabel as nib

    images = {f"synthetic {'x'.join(map(str, nib.load(big).shape))}": str(big)}
    example_dir = Path(os.environ.get("SPLEENKIT_EXAMPLE_DIR") or REPO.parent / "shared" / "data" / "totalseg-example")
    if (example_dir / "ct.nii.gz").is_file():
        images = {f"example CT {'x'.join(map(str, nib.load(example_dir / 'ct.nii.gz').shape))}":
                  str(example_dir / "ct.nii.gz"), **images}
    else:
        log(f"no example CT in {example_dir}: inference runs on the synthetic case only")
    return {"data_dir": str(data), "items": load_datalist(data), "images": images}


# --------------------------------------------------------------------------- running the sides
def run_side(side: str, task: str, params: dict[str, Any], work: Path, log: Any) -> dict[str, Any]:
    """One task of one side in a fresh Python process; returns its JSON result (or the error)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=work, delete=False) as stream:
        json.dump(params, stream)
        params_path = stream.name
    result_path = params_path.replace(".json", ".result.json")
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, str(HERE / "worker.py"), side, task, params_path, result_path],
                               capture_output=True, text=True, cwd=str(HERE))
    wall = time.perf_counter() - started
    Path(params_path).unlink(missing_ok=True)
    if completed.returncode != 0 or not Path(result_path).exists():
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-15:]
        log(f"  {side} {task} FAILED after {wall:.0f} s:\n    " + "\n    ".join(tail))
        return {"side": side, "task": task, "error": "\n".join(tail), "wall_seconds": round(wall, 2)}
    result = json.loads(Path(result_path).read_text())
    Path(result_path).unlink(missing_ok=True)
    result["wall_seconds"] = round(wall, 2)
    return result


def alternate(rounds: int) -> list[tuple[int, str]]:
    """(round, side) in the order kit, reference, reference, kit, kit, reference ..."""
    order = []
    for number in range(rounds):
        sides = SIDES if number % 2 == 0 else tuple(reversed(SIDES))
        order.extend((number, side) for side in sides)
    return order


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None and "error" not in run]
    return round(statistics.median(values), 4) if values else None


def part_training(env: dict[str, Any], config: dict[str, Any], device: str, work: Path, log: Any) -> dict[str, Any]:
    c = config["training"]
    items = env["items"][: c["cases"]]
    overrides = c["overrides"]
    reference_settings = {k: v for k, v in overrides.items() if k in ("spacing", "patch_size", "num_samples")}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for number, side in alternate(c["rounds"]):
        params = {"device": device, "train_items": items, "warmup": c["warmup"], "steps": c["steps"]}
        if side == "kit":
            params.update(preset="seed", overrides=overrides)
        else:
            params["settings"] = reference_settings
        result = run_side(side, "throughput", params, work, log)
        result["round"] = number
        runs[side].append(result)
        log(f"  round {number + 1} {side:9s}: {result.get('median_step_seconds')} s/step, cache fill "
            f"{result.get('cache_fill_seconds')} s, peak {result.get('peak_rss_mib')} MiB")
    summary = {side: {key: median_of(runs[side], key) for key in
                      ("median_step_seconds", "steps_per_second", "cache_fill_seconds", "preprocess_cases_per_second",
                       "first_epoch_seconds", "peak_rss_mib", "peak_rss_children_mib", "compute_fraction",
                       "gpu_busy_fraction", "peak_cuda_mib")} for side in SIDES}
    for side in SIDES:
        patches = 2 * 4 if not overrides else 2 * overrides.get("num_samples", 4)
        if summary[side]["steps_per_second"]:
            summary[side]["patches_per_second"] = round(summary[side]["steps_per_second"] * patches, 4)
    return {"cases": len(items), "settings": {"kit": "seed preset" + (f" with {overrides}" if overrides else ""),
                                              "reference": reference_settings or "bundle train.json"},
            "runs": runs, "median": summary,
            "ratio": {"throughput": report.ratio(summary["kit"]["steps_per_second"],
                                                 summary["reference"]["steps_per_second"]),
                      "cache_fill": report.ratio(summary["reference"]["cache_fill_seconds"],
                                                 summary["kit"]["cache_fill_seconds"]),
                      "first_epoch": report.ratio(summary["reference"]["first_epoch_seconds"],
                                                  summary["kit"]["first_epoch_seconds"]),
                      "peak_memory": report.ratio(summary["kit"]["peak_rss_mib"],
                                                  summary["reference"]["peak_rss_mib"])}}


def part_quality(env: dict[str, Any], config: dict[str, Any], device: str, work: Path, log: Any) -> dict[str, Any]:
    from spleenkit.data.datalist import split_datalist
    from spleenkit.presets import get_preset

    c = config["quality"]
    kit_preset = get_preset(c["kit_preset"], **c["kit_overrides"])
    train_items, validation_items = split_datalist(env["items"], kit_preset.validation_cases)
    results = {}
    for side in SIDES:
        weights = work / f"quality_{side}" / f"{side}_model.pt"
        params: dict[str, Any] = {"device": device, "target": c["target"], "cap_seconds": c["cap_seconds"],
                                  "weights_out": str(weights)}
        if side == "kit":
            params.update(preset=c["kit_preset"], overrides=c["kit_overrides"], data_dir=env["data_dir"])
        else:
            params.update(settings=c["reference"], train_items=train_items, validation_items=validation_items)
        result = run_side(side, "quality", params, work, log)
        results[side] = result
        reached = result.get("seconds_to_target")
        log(f"  {side:9s}: " + (f"Dice {c['target']} after {reached / 60:.1f} min" if reached else
                                f"not reached in {c['cap_seconds'] / 60:.1f} min (best {result.get('best_dice')})"))
    kit_s, ref_s = results["kit"].get("seconds_to_target"), results["reference"].get("seconds_to_target")
    kit_settings = f"preset {c['kit_preset']}" + (f" with {c['kit_overrides']}" if c["kit_overrides"] else "")
    return {"target": c["target"], "cap_seconds": c["cap_seconds"], "train_cases": len(train_items),
            "validation_cases": len(validation_items), "settings": {"kit": kit_settings, "reference": c["reference"]},
            "runs": results, "ratio": {"time_to_target": report.ratio(ref_s, kit_s) if kit_s and ref_s else None}}


def part_inference(env: dict[str, Any], config: dict[str, Any], device: str, work: Path, weights: str,
                   log: Any) -> dict[str, Any]:
    import numpy as np

    c = config["inference"]
    images: dict[str, Any] = {}
    for name, path in list(env["images"].items())[: c.get("images")]:
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        masks: dict[str, Path] = {}
        for number, side in alternate(c["rounds"]):
            mask_out = work / f"mask_{side}_{len(images)}_{number}.npy"
            mask_out.unlink(missing_ok=True)  # never read a mask left by an earlier run
            params: dict[str, Any] = {"device": device, "image": path, "weights": weights, "mask_out": str(mask_out)}
            if side == "kit":
                params.update(preset="seed", overrides=c["overrides"])
            else:
                params["settings"] = c["reference"]
            result = run_side(side, "inference", params, work, log)
            result["round"] = number
            runs[side].append(result)
            if mask_out.exists():
                masks.setdefault(side, mask_out)
            log(f"  {name} round {number + 1} {side:9s}: {result.get('seconds')} s "
                f"(window {result.get('window_seconds')} s), peak {result.get('peak_rss_mib')} MiB")
        agreement = None
        if len(masks) == 2:
            kit_mask, reference_mask = np.load(masks["kit"]), np.load(masks["reference"])
            agreement = report.mask_agreement(kit_mask, reference_mask)
        # the kit with mixed precision forced on (bfloat16 on a CPU): how fast, and how far from float32
        mask_out = work / f"mask_mixed_{len(images)}.npy"
        mask_out.unlink(missing_ok=True)
        mixed = run_side("kit", "inference", {"device": device, "image": path, "weights": weights,
                                              "mask_out": str(mask_out), "preset": "seed", "overrides": c["overrides"],
                                              "amp": True}, work, log)
        if mask_out.exists() and "reference" in masks:
            mixed["agreement"] = report.mask_agreement(np.load(mask_out), np.load(masks["reference"]))
        log(f"  {name} kit, mixed precision forced: {mixed.get('seconds')} s, agreement "
            f"{(mixed.get('agreement') or {}).get('dice')}")
        summary = {side: {key: median_of(runs[side], key) for key in
                          ("seconds", "window_seconds", "peak_rss_mib", "peak_cuda_mib", "foreground_voxels")}
                   for side in SIDES}
        images[name] = {"path_name": Path(path).name, "runs": runs, "median": summary, "agreement": agreement,
                        "kit_mixed_precision": mixed,
                        "ratio": {"speed": report.ratio(summary["reference"]["seconds"], summary["kit"]["seconds"]),
                                  "peak_memory": report.ratio(summary["kit"]["peak_rss_mib"],
                                                              summary["reference"]["peak_rss_mib"])}}
    return {"weights": Path(weights).name, "settings": {"kit": "seed preset, spleenkit infer defaults" +
                                                        (f" with {c['overrides']}" if c["overrides"] else ""),
                                                        "reference": c["reference"] or "bundle inference.json"},
            "images": images}


def part_startup(config: dict[str, Any], log: Any) -> dict[str, Any]:
    """Wall time of the console script (help, a no-op command) and of importing MONAI, for scale."""
    script = shutil.which("spleenkit", path=str(Path(sys.executable).parent)) or shutil.which("spleenkit")
    base = [script] if script else [sys.executable, "-m", "spleenkit"]
    commands = {"spleenkit --help": base + ["--help"], "spleenkit presets": base + ["presets"],
                "python -c 'import monai'": [sys.executable, "-c", "import monai"]}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(config["startup"]["repeats"]):
        for name, command in commands.items():
            started = time.perf_counter()
            subprocess.run(command, capture_output=True, check=True)
            times[name].append(time.perf_counter() - started)
    result = {name: {"seconds": [round(t, 3) for t in values], "median_seconds": round(statistics.median(values), 3)}
              for name, values in times.items()}
    for name, entry in result.items():
        log(f"  {name}: {entry['median_seconds']} s")
    return result


def part_levers(config: dict[str, Any], device: str, work: Path, log: Any) -> dict[str, Any]:
    """Each speed lever alone: a training step and a sliding-window batch per variant, in one process."""
    result = {}
    for task in ("training", "inference"):
        params = {"device": device, **config["levers"][task]}
        result[task] = run_side("levers", task, params, work, log)
        for name, entry in result[task].get("variants", {}).items():
            log(f"  {task:9s} {name:55s} {entry['median_seconds']:7.3f} s  {entry['speedup']:.2f}x")
    return result


def fallback_weights(work: Path) -> str:
    """Untrained bundle UNet weights (seeded) for when no training run produced a model."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
               num_res_units=2, norm="batch")
    path = work / "untrained_model.pt"
    torch.save(net.state_dict(), path)
    return str(path)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in a few minutes")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for benchmark.json/.md/.png")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--work", default=None, help="scratch folder (default runs/benchmark[-quick])")
    parser.add_argument("--data", default=None, help="an existing synthetic dataset folder to use")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    parser.add_argument("--weights", help="model.pt for the inference part (default: the kit's time-to-quality model)")
    parser.add_argument("--cap-minutes", type=float, help="time-to-quality cap per side (default 7, quick 0.4)")
    parser.add_argument("--rounds", type=int, help="alternating rounds for training and inference")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = configuration(args.quick)
    if args.cap_minutes:
        config["quality"]["cap_seconds"] = args.cap_minutes * 60
    if args.rounds:
        config["training"]["rounds"] = config["inference"]["rounds"] = args.rounds
    work = Path(args.work or REPO / "runs" / ("benchmark-quick" if args.quick else "benchmark")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    results: dict[str, Any] = {"mode": "quick" if args.quick else "full", "machine": machine(args.device),
                               "load_average_start": load_average(), "config": config, "parts": {}}
    log(f"machine: {results['machine']['cpu']} ({results['machine']['cpu_capability']}), "
        f"{results['machine']['cores']} cores, torch "
        f"{results['machine']['torch']}; load average {results['load_average_start']}")
    env = prepare_data(work, config, args.data, log)
    if "startup" in args.parts:
        log("start-up")
        results["parts"]["startup"] = part_startup(config, log)
    if "levers" in args.parts:
        log("levers, one at a time (variants alternating in one process)")
        results["parts"]["levers"] = part_levers(config, args.device, work, log)
    if "training" in args.parts:
        log("training throughput (alternating sides)")
        results["parts"]["training"] = part_training(env, config, args.device, work, log)
    weights = str(Path(args.weights).absolute()) if args.weights else None  # (workers run in benchmarks/)
    if "quality" in args.parts:
        log("time to quality")
        results["parts"]["quality"] = part_quality(env, config, args.device, work, log)
        weights = weights or results["parts"]["quality"]["runs"]["kit"].get("weights")
    if "inference" in args.parts:
        log("sliding-window inference (alternating sides)")
        weights = weights or fallback_weights(work)
        results["parts"]["inference"] = part_inference(env, config, args.device, work, weights, log)
    results["load_average_end"] = load_average()
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["goals"] = report.goals(results)
    paths = report.write(results, out)
    log("wrote " + ", ".join(str(p) for p in paths))
    print(report.markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

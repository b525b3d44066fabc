"""Does a model trained only on phantoms find a real spleen? The quick recipe against the real example CT.

    python benchmarks/real_ct_from_phantoms.py [--out benchmarks/results] [--epochs N] [--threads 2]

1. writes the default synthetic dataset (12 labelled + 2 test phantoms, seed 0), timed;
2. trains the ``quick`` recipe on it on the CPU (wall and CPU time of the training);
3. segments the real example CT (read from ``$SPLEENKIT_EXAMPLE_DIR`` or downloaded) with the kit's
   ``infer`` and compares the mask with ``spleen_a`` (and ``spleen_b``) with ``compare_mask_files``:
   Dice, HD95 and the volume error.

The real CT is only ever the test: nothing is trained or tuned on it. Writes
``real_ct_from_phantoms.json`` into ``--out``, with the CPU kind, thread count and machine load, since
the times depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def cpu_kind() -> dict[str, Any]:
    """The processor's model name and its AVX flags (they decide bfloat16 and oneDNN's speed)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return {"model": model.group(1).strip() if model else platform.processor(),
            "avx": sorted(set(re.findall(r"\bavx[^ \n]*", text))), "logical_cpus": os.cpu_count()}


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(step: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, float]]:
    """Run ``step`` and return its result with its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = step(*args, **kwargs)
    return result, {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1)}


def run(work: Path, epochs: int | None, threads: int, seed: int, data: Path | None = None,
        training_seed: int | None = None) -> dict[str, Any]:
    """Generate, train, segment and measure; return the results as JSON-friendly data."""
    import torch

    from spleenkit.data.datalist import load_datalist
    from spleenkit.data.download import download_example
    from spleenkit.data.synthetic import write_synthetic_dataset
    from spleenkit.inference import infer
    from spleenkit.metrics import compare_mask_files
    from spleenkit.presets import get_preset
    from spleenkit.runs import read_metrics
    from spleenkit.training import train

    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    example = download_example(work / "example", progress=False)
    if data is None:
        data, data_time = timed(write_synthetic_dataset, work / "synthetic", seed=seed, workers=threads)  # 12 + 2
    else:  # a dataset written before (its generation is not timed here)
        data_time = {"wall_s": None, "cpu_s": None, "folder": str(data)}
    preset = get_preset("quick", seed=training_seed)
    result, train_time = timed(train, data, work / "run", preset, epochs=epochs, device="cpu", progress=False)
    inference, infer_time = timed(infer, result.model_path, example / "ct.nii.gz", work / "prediction",
                                  device="cpu", overlay=False, largest_component=True)
    raw = infer(result.model_path, example / "ct.nii.gz", work / "prediction-raw", device="cpu", overlay=False)
    metrics = {ref: compare_mask_files(inference.cases[0].mask, example / f"{ref}.nii.gz")
               for ref in ("spleen_a", "spleen_b")}
    metrics["raw"] = compare_mask_files(raw.cases[0].mask, example / "spleen_a.nii.gz")
    for values in metrics.values():  # file names only: the work folder is temporary
        values["prediction"], values["reference"] = Path(values["prediction"]).name, Path(values["reference"]).name
    history = read_metrics(result.run_dir)
    return {
        "what": "quick recipe trained only on the default phantoms, tested on the real example CT",
        "reference": "spleen_a (TotalSegmentator v2 --fast prediction); spleen_b for comparison",
        "postprocessing": "the largest connected component (infer's largest_component, MONAI's "
                          "KeepLargestConnectedComponentd); real_ct_without_postprocessing has the raw mask",
        "real_ct": metrics["spleen_a"],
        "real_ct_vs_spleen_b": metrics["spleen_b"],
        "real_ct_without_postprocessing": metrics["raw"],
        "training": {"preset": preset.name, "epochs": result.epochs, "best_validation_dice": result.best_dice,
                     "best_epoch": result.best_epoch, "device": result.device, "amp_dtype": result.amp_dtype,
                     "seed": preset.seed, **train_time,
                     "validation_dice_by_epoch": {r["epoch"]: round(r["val_dice"], 4) for r in history
                                                  if r.get("val_dice") is not None}},
        "dataset": {"cases": len(load_datalist(data)), "seed": seed, **data_time},
        "inference": infer_time,
        "machine": {"cpu": cpu_kind(), "torch_threads": threads, "load_average_before": load_before,
                    "load_average_after": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__, "shared": load_before[0] > threads},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the quick preset's)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and the generator")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--training-seed", type=int, default=None, help="seed of the training (default: the preset's)")
    parser.add_argument("--work", type=Path, default=None, help="keep the data, run and prediction here")
    parser.add_argument("--data", type=Path, default=None, help="use this synthetic dataset instead of writing one")
    args = parser.parse_args(argv)
    from spleenkit.io import write_json

    with tempfile.TemporaryDirectory(prefix="real-ct-") as scratch:
        results = run(args.work or Path(scratch), args.epochs, args.threads, args.seed, args.data, args.training_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "real_ct_from_phantoms.json", results)
    real = results["real_ct"]
    sys.stdout.write(f"real CT vs spleen_a: {json.dumps(real)}\ntraining: {results['training']['wall_s']} s wall, "
                     f"{results['training']['cpu_s']} s CPU\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

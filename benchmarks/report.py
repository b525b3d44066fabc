"""The benchmark's report: goals, the markdown table, the plot and the files.

    python benchmarks/report.py benchmarks/results/benchmark.json [--readme README.md]

re-renders the table and plot from a results file and, with ``--readme``, puts the table into the
README between its benchmark markers (so the README always shows a committed run, never a hand copy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GOALS = {
    "training_throughput_ratio": 2.0,   # kit steps/s over the reference's, equal settings
    "inference_speed_ratio": 2.0,       # reference seconds over the kit's, per image
    "inference_agreement_dice": 0.999,  # Dice between the two sides' masks
    "kit_minutes_to_dice": 5.0,         # the kit reaches validation Dice 0.90 within this
    "help_seconds": 1.0,                # `spleenkit --help`
}
FILES = ("benchmark.json", "benchmark.md", "benchmark.png")
README_MARKERS = ("<!-- benchmark table: python benchmarks/report.py benchmarks/results/benchmark.json --readme "
                  "README.md -->", "<!-- end of benchmark table -->")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator rounded, or None when either is missing or zero."""
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def mask_agreement(a: Any, b: Any) -> dict[str, Any]:
    """Dice between two 0/1 masks of one grid (1.0 when both are empty) and the voxels that differ."""
    import numpy as np

    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    if a.shape != b.shape:
        return {"dice": None, "note": f"shapes differ: {a.shape} vs {b.shape}"}
    total = int(a.sum()) + int(b.sum())
    dice = 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
    return {"dice": round(dice, 6), "differing_voxels": int((a ^ b).sum()), "kit_voxels": int(a.sum()),
            "reference_voxels": int(b.sum())}


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with the measured value and whether it was met (None when not measured)."""
    parts = results.get("parts", {})
    rows: list[dict[str, Any]] = []

    def add(goal: str, target: str, value: Any, met: bool | None) -> None:
        rows.append({"goal": goal, "target": target, "measured": value, "met": met})

    training = parts.get("training")
    if training:
        value = training["ratio"]["throughput"]
        add("training throughput, kit / reference", f">= {GOALS['training_throughput_ratio']}x", value,
            None if value is None else value >= GOALS["training_throughput_ratio"])
    inference = parts.get("inference")
    if inference:
        for name, entry in inference["images"].items():
            value = entry["ratio"]["speed"]
            add(f"inference speed on {name}, kit / reference", f">= {GOALS['inference_speed_ratio']}x", value,
                None if value is None else value >= GOALS["inference_speed_ratio"])
            dice = (entry.get("agreement") or {}).get("dice")
            add(f"mask agreement on {name} (Dice)", f">= {GOALS['inference_agreement_dice']}", dice,
                None if dice is None else dice >= GOALS["inference_agreement_dice"])
    quality = parts.get("quality")
    if quality:
        kit = quality["runs"]["kit"]
        seconds = kit.get("seconds_to_target")
        add(f"kit reaches validation Dice {quality['target']}", f"<= {GOALS['kit_minutes_to_dice']:g} min",
            None if seconds is None else round(seconds / 60, 2),
            seconds is not None and seconds <= 60 * GOALS["kit_minutes_to_dice"])
    startup = parts.get("startup")
    if startup:
        value = startup["spleenkit --help"]["median_seconds"]
        add("`spleenkit --help`", f"< {GOALS['help_seconds']:g} s", value, value < GOALS["help_seconds"])
    return rows


def _fmt(value: Any, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _minutes(run: dict[str, Any], cap: float) -> str:
    if "error" in run:
        return "failed"
    seconds = run.get("seconds_to_target")
    if seconds is None:
        best = run.get("best_dice")
        return f"not reached in {cap / 60:.1f} min (best Dice {_fmt(best, 3)})"
    return f"{seconds / 60:.2f} min (epoch {run.get('epoch_reached')})"


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown section: machine, one table side by side, goals."""
    m = results["machine"]
    parts = results["parts"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('memory_gib', '?')} GiB; torch {m['torch']}, "
        f"MONAI {m.get('monai', '?')}, Python {m['python']}; device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + (f"; CPU capability {m['cpu_capability']} (the kit trains in {m.get('training_precision')} there)"
           if m.get("cpu_capability") else "") + ".",
        f"Load average (1, 5, 15 min) at start {results.get('load_average_start')}, at end "
        f"{results.get('load_average_end')}; whole run {results.get('seconds', 0) / 60:.1f} min"
        + (" — QUICK MODE: a smoke test, the numbers mean nothing." if results.get("mode") == "quick" else "."),
        "",
        "| measure | kit | reference | kit vs reference |",
        "|---|---|---|---|",
    ]
    training = parts.get("training")
    if training:
        k, r = training["median"]["kit"], training["median"]["reference"]
        lines += [
            f"| training steps/s (batch 2 × 4 crops), median of {len(training['runs']['kit'])} runs | "
            f"{_fmt(k['steps_per_second'], 4)} ({_fmt(k['median_step_seconds'], 1)} s/step) | "
            f"{_fmt(r['steps_per_second'], 4)} ({_fmt(r['median_step_seconds'], 1)} s/step) | "
            f"**{_fmt(training['ratio']['throughput'])}×** |",
            f"| share of a step in forward→update (rest: data, handlers) | {_fmt(k['compute_fraction'])} | "
            f"{_fmt(r['compute_fraction'])} | |",
            f"| training peak memory, MiB (main process; largest loader worker) | {_fmt(k['peak_rss_mib'], 0)} "
            f"({_fmt(k['peak_rss_children_mib'], 0)}) | {_fmt(r['peak_rss_mib'], 0)} "
            f"({_fmt(r['peak_rss_children_mib'], 0)}) | {_fmt(training['ratio']['peak_memory'])}× |",
            f"| cache fill of {training['cases']} cases, s | {_fmt(k['cache_fill_seconds'], 1)} | "
            f"{_fmt(r['cache_fill_seconds'], 1)} | {_fmt(training['ratio']['cache_fill'])}× faster |",
            f"| preprocessing, cases/s | {_fmt(k['preprocess_cases_per_second'], 2)} | "
            f"{_fmt(r['preprocess_cases_per_second'], 2)} | |",
            f"| first epoch incl. cache fill, s | {_fmt(k['first_epoch_seconds'], 1)} | "
            f"{_fmt(r['first_epoch_seconds'], 1)} | {_fmt(training['ratio']['first_epoch'])}× faster |",
        ]
        if k.get("gpu_busy_fraction") is not None or r.get("gpu_busy_fraction") is not None:
            lines.append(f"| GPU-busy fraction of a step | {_fmt(k.get('gpu_busy_fraction'))} | "
                         f"{_fmt(r.get('gpu_busy_fraction'))} | |")
    quality = parts.get("quality")
    if quality:
        k, r = quality["runs"]["kit"], quality["runs"]["reference"]
        ratio_text = f"{_fmt(quality['ratio']['time_to_target'])}× sooner" if quality["ratio"]["time_to_target"] else ""
        if not ratio_text and k.get("seconds_to_target") and not r.get("seconds_to_target"):
            ratio_text = f"> {quality['cap_seconds'] / k['seconds_to_target']:.1f}× sooner"
        lines.append(f"| time to validation Dice ≥ {quality['target']} ({quality['train_cases']} train / "
                     f"{quality['validation_cases']} validation synthetic cases) | "
                     f"{_minutes(k, quality['cap_seconds'])} | {_minutes(r, quality['cap_seconds'])} | {ratio_text} |")
    inference = parts.get("inference")
    if inference:
        for name, entry in inference["images"].items():
            k, r = entry["median"]["kit"], entry["median"]["reference"]
            agreement = entry.get("agreement") or {}
            lines += [
                f"| inference on {name}, s (sliding window alone) | {_fmt(k['seconds'], 1)} "
                f"({_fmt(k['window_seconds'], 1)}) | {_fmt(r['seconds'], 1)} ({_fmt(r['window_seconds'], 1)}) | "
                f"**{_fmt(entry['ratio']['speed'])}×** |",
                f"| inference peak memory on {name}, MiB | {_fmt(k['peak_rss_mib'], 0)} | "
                f"{_fmt(r['peak_rss_mib'], 0)} | {_fmt(entry['ratio']['peak_memory'])}× |",
                f"| mask agreement on {name}: Dice (differing voxels of {_fmt(agreement.get('reference_voxels'))}) | "
                f"{_fmt(agreement.get('dice'), 5)} ({_fmt(agreement.get('differing_voxels'))}) | | |",
            ]
    startup = parts.get("startup")
    if startup:
        for name, entry in startup.items():
            lines.append(f"| `{name}`, s | {_fmt(entry['median_seconds'], 2)} | | |")
    if inference:
        for name, entry in inference["images"].items():
            mixed = entry.get("kit_mixed_precision") or {}
            if "seconds" in mixed:
                lines.append(f"| kit with mixed precision forced ({mixed.get('precision')}) on {name}: s; Dice with "
                             f"the reference's mask | {_fmt(mixed['seconds'], 1)}; "
                             f"{_fmt((mixed.get('agreement') or {}).get('dice'), 5)} | | |")
    levers = parts.get("levers")
    if levers:
        lines += ["", "Each lever alone (one process, variants taking turns; speed-up over plain float32):", "",
                  "| lever | seconds (median) | speed-up | max abs. logit difference |", "|---|---|---|---|"]
        for task, title in (("training", "training step"), ("inference", "window batch")):
            entry = levers.get(task) or {}
            size = entry.get("patch") or entry.get("roi")
            for name, variant in entry.get("variants", {}).items():
                difference = variant.get("max_abs_difference")
                lines.append(f"| {title} ({entry.get('batch')} × {size}³): {name} | "
                             f"{_fmt(variant['median_seconds'], 3)} | {_fmt(variant['speedup'])}× | "
                             f"{'' if difference is None else f'{difference:.1e}'} |")
    lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
    for row in results.get("goals", []):
        met = {True: "yes", False: "**no**", None: "–"}[row["met"]]
        lines.append(f"| {row['goal']} | {row['target']} | {_fmt(row['measured'], 3)} | {met} |")
    settings = []
    if training:
        settings.append(f"training: kit {training['settings']['kit']}; reference {training['settings']['reference']}")
    if quality:
        settings.append(f"time to quality: kit {quality['settings']['kit']}; reference = bundle recipe with "
                        f"{quality['settings']['reference']}")
    if inference:
        settings.append(f"inference: kit {inference['settings']['kit']}; reference "
                        f"{inference['settings']['reference']}; weights {inference['weights']}")
    if settings:
        lines += ["", "Settings: " + " | ".join(settings)]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    """Four panels: training throughput, time to quality, inference time, start-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"kit": "#1b9e77", "reference": "#7570b3"}
    parts = results["parts"]
    figure, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    ax = axes[0]
    training = parts.get("training")
    if training:
        values = [training["median"][s]["steps_per_second"] or 0 for s in colours]
        ax.bar(list(colours), values, color=list(colours.values()))
        ax.set_title(f"training: {_fmt(training['ratio']['throughput'])}× steps/s")
        ax.set_ylabel("steps per second")
    ax = axes[1]
    quality = parts.get("quality")
    if quality:
        for side, colour in colours.items():
            history = [h for h in quality["runs"][side].get("history", []) if h["val_dice"] is not None]
            ax.plot([h["elapsed_seconds"] / 60 for h in history], [h["val_dice"] for h in history], "o-", ms=3,
                    color=colour, label=side)
        ax.axhline(quality["target"], color="grey", ls="--", lw=1)
        ax.set_xlabel("minutes")
        ax.set_ylabel("validation Dice")
        ax.set_ylim(0, 1)
        ax.set_title("time to quality")
        ax.legend(loc="lower right", fontsize=8)
    ax = axes[2]
    inference = parts.get("inference")
    if inference:
        names = list(inference["images"])
        width = 0.38
        for offset, (side, colour) in zip((-width / 2, width / 2), colours.items(), strict=True):
            values = [inference["images"][n]["median"][side]["seconds"] or 0 for n in names]
            ax.bar([i + offset for i in range(len(names))], values, width, color=colour, label=side)
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
        ax.set_ylabel("seconds per image")
        ax.set_title("sliding-window inference")
        ax.legend(fontsize=8)
    ax = axes[3]
    startup = parts.get("startup")
    if startup:
        names = list(startup)
        ax.barh(names, [startup[n]["median_seconds"] for n in names], color="#d95f02")
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("seconds")
        ax.set_title("start-up")
    figure.suptitle(f"spleenkit vs the bundle's plain pipeline — {results['machine']['cpu']}, "
                    f"{results['machine']['cores']} cores, {results['machine']['device']}", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=72)
    plt.close(figure)
    return path


REPO = Path(__file__).resolve().parents[1]


def portable(value: Any, repo: Path = REPO) -> Any:
    """``value`` with every absolute path made relative to the repository (or cut to its file name
    when outside it), so that committed results say nothing about the machine's folders."""
    if isinstance(value, dict):
        return {key: portable(item, repo) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item, repo) for item in value]
    if isinstance(value, str) and value.startswith("/") and "\n" not in value:
        path = Path(value)
        return str(path.relative_to(repo)) if path.is_relative_to(repo) else path.name
    return value


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """benchmark.json, benchmark.md and benchmark.png in ``out`` (paths in the JSON made portable)."""
    out.mkdir(parents=True, exist_ok=True)
    results = portable(results)
    json_path, md_path, png_path = (out / name for name in FILES)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text("# Benchmark: spleenkit vs the bundle's plain MONAI pipeline\n\n" + markdown(results))
    plot(results, png_path)
    return [json_path, md_path, png_path]


def update_readme(results: dict[str, Any], readme: Path) -> Path:
    """Replace the table between the README's benchmark markers with ``results``' table."""
    text = readme.read_text()
    begin, end = README_MARKERS
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{readme}: needs one line {begin!r} and, after it, one line {end!r}")
    head, rest = text.split(begin)
    tail = rest.split(end)[1]
    readme.write_text(f"{head}{begin}\n{markdown(results).rstrip()}\n{end}{tail}")
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Re-render the benchmark's table and plot from its JSON.")
    parser.add_argument("results", type=Path, help="a benchmark.json")
    parser.add_argument("--readme", type=Path, help="also put the table into this README")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    for path in write(results, args.results.parent):
        print(f"wrote {path}")
    if args.readme:
        print(f"wrote {update_readme(results, args.readme)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The side-by-side benchmark: its quick mode runs end to end and writes well-formed results.

Timings are for the report, never pass/fail: these tests check structure and the few numbers
that do not depend on the machine (mask agreement, the alternation order, the goals' logic).
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def _module(name: str):
    """Import a module from benchmarks/ (a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_mask_agreement_and_ratio() -> None:
    report = _module("report")
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    b = a.copy()
    assert report.mask_agreement(a, b)["dice"] == 1.0  # two empty masks agree
    a[:2] = 1
    b[:1] = 1
    agreement = report.mask_agreement(a, b)
    assert agreement["dice"] == pytest.approx(2 * 16 / (32 + 16))
    assert agreement["differing_voxels"] == 16
    assert report.mask_agreement(a, b[:3])["dice"] is None
    assert report.ratio(6.0, 3.0) == 2.0
    assert report.ratio(None, 3.0) is None and report.ratio(1.0, 0.0) is None


def test_sides_alternate() -> None:
    run = _module("run_benchmark")
    assert run.alternate(3) == [(0, "kit"), (0, "reference"), (1, "reference"), (1, "kit"), (2, "kit"),
                                (2, "reference")]


def test_goals_judge_the_measurements() -> None:
    report = _module("report")
    results = {"parts": {
        "training": {"ratio": {"throughput": 2.5}},
        "quality": {"target": 0.9, "runs": {"kit": {"seconds_to_target": 400.0}}},
        "startup": {"spleenkit --help": {"median_seconds": 0.4}},
        "inference": {"images": {"ct": {"ratio": {"speed": 1.5}, "agreement": {"dice": 0.9995}}}},
    }}
    met = {row["goal"]: row["met"] for row in report.goals(results)}
    assert met["training throughput, kit / reference"] is True
    assert met["inference speed on ct, kit / reference"] is False
    assert met["mask agreement on ct (Dice)"] is True
    assert met["kit reaches validation Dice 0.9"] is False  # 6.7 min > 5 min
    assert met["`spleenkit --help`"] is True


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path: Path, synthetic_dataset: Path, example_ct_dir: Path) -> None:
    out = tmp_path / "results"
    environment = {**os.environ, "SPLEENKIT_EXAMPLE_DIR": str(example_ct_dir)}
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run_benchmark.py"), "--quick", "--out", str(out),
         "--work", str(tmp_path / "work"), "--data", str(synthetic_dataset)],
        capture_output=True, text=True, env=environment, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]
    results = json.loads((out / "benchmark.json").read_text())

    assert results["mode"] == "quick"
    assert {"cpu", "cores", "torch", "device"} <= set(results["machine"])
    parts = results["parts"]
    assert set(parts) == {"startup", "levers", "training", "quality", "inference"}
    for task in ("training", "inference"):
        variants = parts["levers"][task]["variants"]
        assert len(variants) >= 5 and all(v["median_seconds"] > 0 and v["speedup"] > 0 for v in variants.values())
        assert next(iter(variants.values()))["speedup"] == 1.0  # the first variant is the baseline
    # folding batch norm and changing the layout leave the float32 logits as they were (rounding aside)
    assert parts["levers"]["inference"]["variants"]["float32 + channels-last + folded BN (the kit on a CPU)"][
        "max_abs_difference"] < 1e-3
    # every side ran without error, in its own process, and reported its peak memory
    training = parts["training"]
    for side in ("kit", "reference"):
        for run in training["runs"][side]:
            assert "error" not in run, run
            assert run["peak_rss_mib"] > 0 and run["steps_per_second"] > 0
            assert len(run["step_seconds"]) == results["config"]["training"]["steps"]
        assert training["median"][side]["cache_fill_seconds"] > 0
    assert training["ratio"]["throughput"] > 0
    # the kit trains in what it chooses for this CPU (bfloat16 only where it is native), and says which CPU that was
    assert results["machine"]["cpu_capability"] and results["machine"]["training_precision"] in {"bfloat16", "float32"}
    assert training["runs"]["kit"][0]["precision"] == results["machine"]["training_precision"]
    assert training["runs"]["reference"][0]["precision"] == "float32"  # amp=True does nothing on a CPU

    quality = parts["quality"]
    for side in ("kit", "reference"):
        run = quality["runs"][side]
        assert "error" not in run, run
        assert run["reached"] == (run["seconds_to_target"] is not None)
        assert run["seconds"] <= quality["cap_seconds"] + 120  # the cap stops a run (within an epoch)

    inference = parts["inference"]
    assert any(name.startswith("example CT") for name in inference["images"])
    for entry in inference["images"].values():
        for side in ("kit", "reference"):
            assert all("error" not in run for run in entry["runs"][side]), entry["runs"][side]
            assert entry["median"][side]["seconds"] > 0
        agreement = entry["agreement"]
        assert 0.0 <= agreement["dice"] <= 1.0
        assert entry["kit_mixed_precision"]["precision"] == "bfloat16"
        assert 0.0 <= entry["kit_mixed_precision"]["agreement"]["dice"] <= 1.0
        assert agreement["kit_voxels"] + agreement["reference_voxels"] >= agreement["differing_voxels"]

    assert parts["startup"]["spleenkit --help"]["median_seconds"] > 0
    goals = {row["goal"] for row in results["goals"]}
    assert "`spleenkit --help`" in goals and "training throughput, kit / reference" in goals

    table = (out / "benchmark.md").read_text()
    assert "| measure | kit | reference | kit vs reference |" in table and "QUICK MODE" in table
    png = (out / "benchmark.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000
    width, height = struct.unpack(">II", png[16:24])
    assert width > height > 100


def test_readme_shows_the_committed_full_run(tmp_path: Path) -> None:
    """README's table is the one rendered from benchmarks/results (a full run, not the quick smoke test)."""
    report = _module("report")
    results = json.loads((BENCHMARKS / "results" / "benchmark.json").read_text())
    assert results["mode"] != "quick"

    def strings(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    assert not [text for text in strings(results) if text.startswith("/")]  # no folders of the machine it ran on
    assert report.portable({"a": [str(REPO / "runs" / "m.pt"), "/elsewhere/x.pt", "7 s"]}) == \
        {"a": ["runs/m.pt", "x.pt", "7 s"]}
    assert {"training", "quality", "inference", "startup"} <= set(results["parts"])
    readme = (REPO / "README.md").read_text()
    begin, end = report.README_MARKERS
    shown = readme.split(begin)[1].split(end)[0].strip()
    assert shown == report.markdown(results).strip()
    # the updater rewrites only its block and refuses a README without the markers
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace(shown, "stale table"))
    report.update_readme(results, copy)
    assert copy.read_text() == readme
    copy.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="README.md"):
        report.update_readme(results, copy)


def test_real_ct_benchmark_trains_on_phantoms_and_scores_the_real_ct(synthetic_dataset: Path, example_ct_dir: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The phantoms-to-real-CT measurement end to end on a small dataset and one epoch: the JSON holds the
    real CT's metrics against both reference masks, the training's times and the machine it ran on."""
    monkeypatch.setenv("SPLEENKIT_EXAMPLE_DIR", str(example_ct_dir))
    benchmark = _module("real_ct_from_phantoms")
    assert benchmark.main(["--data", str(synthetic_dataset), "--epochs", "1", "--threads", "2",
                           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results")]) == 0
    results = json.loads((tmp_path / "results" / "real_ct_from_phantoms.json").read_text())
    for key in ("real_ct", "real_ct_vs_spleen_b"):
        metrics = results[key]
        assert 0.0 <= metrics["dice"] <= 1.0 and metrics["ref_volume_ml"] > 200, metrics
        assert metrics["reference"].startswith("spleen_") and "/" not in metrics["prediction"]
    assert results["training"]["epochs"] == 1 and results["training"]["wall_s"] > 0
    assert results["machine"]["cpu"]["avx"] and results["dataset"]["folder"] == str(synthetic_dataset)
    assert {"real_ct_without_postprocessing", "postprocessing"} <= set(results)


@pytest.mark.slow
def test_the_quick_recipe_trained_on_phantoms_finds_the_real_spleen(example_ct_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The kit's offline promise, end to end: the default phantoms, the quick recipe in full on the CPU, then the
    real CT (never trained on). Its spleen is found: Dice 0.81 where this was measured, 0.00 with the phantoms and
    recipe before; the bar leaves room for another CPU's rounding (float32 where bfloat16 is not native)."""
    monkeypatch.setenv("SPLEENKIT_EXAMPLE_DIR", str(example_ct_dir))
    benchmark = _module("real_ct_from_phantoms")
    assert benchmark.main(["--threads", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results")]) == 0
    results = json.loads((tmp_path / "results" / "real_ct_from_phantoms.json").read_text())
    real = results["real_ct"]
    assert real["dice"] >= 0.75 and real["hd95_mm"] < 40, real
    assert abs(real["volume_error_percent"]) < 40, real
    assert results["dataset"]["cases"] == 12 and results["training"]["epochs"] == 100


def test_the_real_ct_result_is_quoted_as_measured() -> None:
    """The README and notebook 06 quote the committed measurement, not an older one."""
    import nbformat

    results = json.loads((BENCHMARKS / "results" / "real_ct_from_phantoms.json").read_text())
    real, training = results["real_ct"], results["training"]
    quoted = [f"Dice {real['dice']:.2f}", f"{training['wall_s']:.0f} s", f"HD95 {real['hd95_mm']:.0f} mm",
              f"{real['pred_volume_ml']:.0f} mL"]
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Phantoms and a real CT"):]
    notebook = nbformat.read(REPO / "notebooks" / "06_inference_visualization.ipynb", as_version=4)
    cell = next(c.source for c in notebook.cells if "real_ct_from_phantoms" in c.source)
    for text in quoted:
        assert text in section, f"README: {text!r} not quoted"
        assert text in cell, f"notebook 06: {text!r} not quoted"

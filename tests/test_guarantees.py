"""Nothing lost, nothing silently wrong, round two: resume and run folders, training on checked data only, models
that carry their recipe, the files the kit writes, one-line errors and signals. Each refusal is checked for its
message, its exit status 2 and that nothing of the user's changed (every file hashed before and after)."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import HOLD_LOCK, TINY, TRAIN, ct_like, error_of

from spleenkit.cli import main
from spleenkit.errors import BadInputError
from spleenkit.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones included): equal before and after means untouched."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of one epoch of the tiny recipe: checkpoint, model, metrics, manifest."""
    from spleenkit.training import train

    return train(synthetic_dataset, tmp_path_factory.mktemp("trained") / "run", "quick", epochs=1, **TRAIN).run_dir


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--preset", "quick", "--epochs", "1", "--patch", "48",
            "--set", "spacing=6,6,6", "--set", "validation_cases=2", "--set", "num_samples=1", "--set",
            "batch_size=2", "--set", "sliding_window_overlap=0.25", "--set", "validation_interval=1",
            "--seed", "7", "--workers", "1", "--no-progress", *extra]


# --------------------------------------------------------------------------- resume and run folders
def _no_checkpoint(run: Path) -> None:
    (run / "checkpoint_last.pt").unlink()


def _empty_checkpoint(run: Path) -> None:  # a kill -9 during the first save (before the atomic writer)
    (run / "checkpoint_last.pt").write_bytes(b"")


def _truncated_checkpoint(run: Path) -> None:
    checkpoint = run / "checkpoint_last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:4096])


def _no_manifest(run: Path) -> None:
    (run / "manifest.json").unlink()


def _unreadable_manifest(run: Path) -> None:
    (run / "manifest.json").write_text('{"parameters": {"preset": ')


def _manifest_without_recipe(run: Path) -> None:
    (run / "manifest.json").write_text(json.dumps({"parameters": {}}))


@pytest.mark.parametrize(("damage", "named"), [
    (_no_checkpoint, "checkpoint_last.pt is missing"),
    (_empty_checkpoint, "checkpoint_last.pt is corrupt or truncated"),
    (_truncated_checkpoint, "checkpoint_last.pt is corrupt or truncated"),
    (_no_manifest, "manifest.json is missing, so the run's recipe is unknown"),
    (_unreadable_manifest, "manifest.json is unreadable"),
    (_manifest_without_recipe, "manifest.json names no recipe"),
])
def test_a_resume_without_a_usable_checkpoint_or_manifest_is_refused_naming_it(
        damage: Callable[[Path], None], named: str, trained_run: Path, synthetic_dataset: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    damage(run)
    before = digests(run)
    # a changed recipe would have gone through silently without the manifest: now nothing starts
    assert main([*train_args(synthetic_dataset, run, "--resume"), "--set", "spacing=4,4,4"]) == 2
    line = error_of(capsys)
    assert f"{run}: cannot resume: " in line and named in line and "--start-afresh" in line
    assert digests(run) == before and not list(run.glob("previous-*"))


def test_start_afresh_moves_the_earlier_run_aside_whole(trained_run: Path, synthetic_dataset: Path,
                                                        tmp_path: Path) -> None:
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    (run / "checkpoint_last.pt").unlink()  # nothing to resume
    for folder, name in (("evaluation", "summary.json"), ("predictions", "spleen_5.nii.gz")):
        (run / folder).mkdir()
        (run / folder / name).write_text(f"the earlier model's {folder}")
    before = digests(run)
    assert main(train_args(synthetic_dataset, run, "--resume", "--start-afresh")) == 0
    kept = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(kept) == 1
    assert digests(kept[0]) == before  # the whole earlier run, evaluation and predictions included, byte for byte
    assert not (run / "evaluation").exists() and not (run / "predictions").exists()
    assert [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1]
    assert read_manifest(run)["parameters"]["resume"] is False


def test_a_fresh_run_moves_evaluation_and_predictions_aside_with_the_model(tmp_path: Path) -> None:
    from spleenkit.runs import prepare_run_dir

    (tmp_path / "model.pt").write_bytes(b"earlier weights")
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "per_case.csv").write_text("case,dice\n")
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "a.nii.gz").write_bytes(b"mask")
    (tmp_path / "notes.txt").write_text("mine")  # not the run's: stays where it is
    prepare_run_dir(tmp_path)
    (kept,) = tmp_path.glob("previous-*")
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        "evaluation/per_case.csv", "model.pt", "predictions/a.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", kept.name]


@pytest.mark.parametrize("command", ["infer", "evaluate"])
def test_infer_and_evaluate_lock_their_output_folder(command: str, tiny_model: Path, synthetic_dataset: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "spleen_7_spleen.nii.gz").write_bytes(b"the first run's mask")
    before = digests(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = (["infer", "--input", str(synthetic_dataset / "imagesTs")] if command == "infer"
                else ["evaluate", "--data", str(synthetic_dataset), "--max-cases", "1"])
        assert main([*args, "--model", str(tiny_model), "--out", str(out), "--no-amp"]) == 2
        line = error_of(capsys)
        assert f"{out}: another run is writing this folder (pid {holder.pid} on host" in line
        assert {k: v for k, v in digests(out).items() if k != "run.lock"} == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)


# --------------------------------------------------------------------------- training reads only checked data
def _relabel(case: int, change: Callable[[np.ndarray], np.ndarray], dtype: type = np.uint8) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        path = data / "labelsTr" / f"spleen_{case}.nii.gz"
        image = nib.load(path)
        nib.Nifti1Image(change(np.asanyarray(image.dataobj)).astype(dtype), image.affine).to_filename(path)
    return damage


def _listing(change: Callable[[list[dict[str, str]]], None]) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        description = json.loads((data / "dataset.json").read_text())
        change(description["training"])
        (data / "dataset.json").write_text(json.dumps(description))
    return damage


def _copy_label(source: int, target: int) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        shutil.copyfile(data / "labelsTr" / f"spleen_{source}.nii.gz", data / "labelsTr" / f"spleen_{target}.nii.gz")
    return damage


def _shift_label(case: int, mm: float) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        path = data / "labelsTr" / f"spleen_{case}.nii.gz"
        image = nib.load(path)
        affine = image.affine.copy()
        affine[0, 3] += mm
        nib.Nifti1Image(np.asanyarray(image.dataobj), affine).to_filename(path)
    return damage


def _empty_labels(data: Path) -> None:
    for path in (data / "labelsTr").glob("*.nii.gz"):
        image = nib.load(path)
        nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine).to_filename(path)


TRAINING_DATA_FAULTS = {
    "labels 0/255": (_relabel(2, lambda a: a * 255), "labelsTr/spleen_2.nii.gz",
                     "label values must be 0 or 1; found 255"),
    "labels 0/1/2": (_relabel(3, lambda a: np.where(a > 0, 2, a) + (np.arange(a.shape[0]) == 0)[:, None, None]),
                     "labelsTr/spleen_3.nii.gz", "label values must be 0 or 1; found 2"),
    "labels 0/0.5": (_relabel(2, lambda a: a * 0.5, np.float32), "labelsTr/spleen_2.nii.gz", "found 0.5"),
    "NaN in a label": (_relabel(4, lambda a: np.where(a > 0, np.nan, 0.0), np.float32), "labelsTr/spleen_4.nii.gz",
                       "holds NaN or infinite values"),
    "a label that is its image": (_listing(lambda items: items[1].update(label=items[1]["image"])),
                                  "imagesTr/spleen_2.nii.gz", "the label is the image itself (dataset.json names the "
                                                              "same file as image and label) (training case spleen_2)"),
    "another case's label (copied)": (_copy_label(1, 2), "labelsTr/spleen_2.nii.gz", "differs from the image's"),
    "another case's label (named)": (_listing(lambda items: items[1].update(label=items[0]["label"])),
                                     "labelsTr/spleen_1.nii.gz", "listed twice: as the label of training case spleen_1 "
                                                                 "and as the label of training case spleen_2"),
    "every label empty": (_empty_labels, "labelsTr", "every training label is empty"),
    "a label shifted 60 mm": (_shift_label(2, 60.0), "labelsTr/spleen_2.nii.gz", "affine differs from the image's"),
    "an entry listed twice": (_listing(lambda items: items.append(dict(items[0]))), "imagesTr/spleen_1.nii.gz",
                              "listed twice: as the image of training case spleen_1"),
    "an entry listed twice, across the split": (_listing(lambda items: items.append(dict(items[4]))),
                                                "imagesTr/spleen_5.nii.gz", "as the image of training case spleen_5 "
                                                                            "and as the image of validation case"),
}


@pytest.mark.parametrize("fault", list(TRAINING_DATA_FAULTS))
def test_training_refuses_what_data_check_rejects_naming_the_case_and_the_rule(
        fault: str, synthetic_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    damage, path, rule = TRAINING_DATA_FAULTS[fault]
    data = Path(shutil.copytree(synthetic_dataset, tmp_path / "data"))
    damage(data)
    before = digests(data)
    run = tmp_path / "runs" / "r"
    assert main(train_args(data, run)) == 2
    line = error_of(capsys)
    assert f"spleenkit: error: {data / path}: " in line and rule in line, line
    assert "training reads only checked data" in line
    assert digests(data) == before
    assert not (tmp_path / "runs").exists()  # no folder, no manifest left by a failed start


def test_empty_validation_labels_alone_are_refused_too(synthetic_dataset: Path, tmp_path: Path) -> None:
    from spleenkit.data.checks import check_training_cases
    from spleenkit.data.datalist import load_datalist, split_datalist

    data = Path(shutil.copytree(synthetic_dataset, tmp_path / "data"))
    for case in (5, 6):
        _relabel(case, np.zeros_like)(data)
    train_items, validation_items = split_datalist(load_datalist(data), 2)
    with pytest.raises(BadInputError, match="every validation label is empty .*validation Dice would be undefined"):
        check_training_cases(train_items, validation_items)
    report = check_training_cases(train_items[:2], train_items[2:])  # the same checker passes good cases
    assert len(report.cases) == 4 and report.ok


def test_data_check_uses_the_same_rules(synthetic_dataset: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = Path(shutil.copytree(synthetic_dataset, tmp_path / "data"))
    _listing(lambda items: (items[1].update(label=items[1]["image"]), items.append(dict(items[0]))))(data)
    assert main(["data", "check", str(data)]) == 1
    err = capsys.readouterr().err
    assert "spleen_2.nii.gz: the label is the image itself" in err and "spleen_1.nii.gz: listed twice" in err
    assert err.count("the label is the image itself") == 1


# --------------------------------------------------------------------------- a model carries its recipe
def test_a_model_copied_out_of_its_run_keeps_its_recipe(tiny_model: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "elsewhere" / "model.pt"
    copy.parent.mkdir()
    shutil.copyfile(tiny_model, copy)  # no manifest beside it
    ct = ct_like(tmp_path / "ct.nii.gz")
    assert main(["infer", "--model", str(copy), "--input", str(ct), "--out", str(tmp_path / "out"), "--no-amp",
                 "--no-overlay"]) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["preset"]["spacing"] == [6.0, 6.0, 6.0] and manifest["preset"]["channels"][0] == 4
    assert manifest["parameters"]["recipe_from"] == "the model file"


def test_a_preset_that_changes_the_masks_is_refused_unless_forced(tiny_model: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from spleenkit.inference import infer

    ct = ct_like(tmp_path / "ct.nii.gz")
    before = digests(tmp_path)
    assert main(["infer", "--model", str(tiny_model), "--input", str(ct), "--out", str(tmp_path / "out"),
                 "--preset", "quick"]) == 2
    line = error_of(capsys)
    assert f"{tiny_model}: the model was trained with the quick recipe (found in the model file)" in line
    assert "spacing: [6.0, 6.0, 6.0] -> [3.0, 3.0, 3.0]" in line and "--force-preset" in line
    assert digests(tmp_path) == before and not (tmp_path / "out").exists()
    for setting in ({"spacing": (5.0, 5.0, 5.0)}, {"orientation": "LPS"}, {"intensity_range": (-100.0, 200.0)}):
        with pytest.raises(BadInputError, match=f"changes its masks: {next(iter(setting))}"):
            infer(tiny_model, ct, tmp_path / "out", preset=TINY.replace(**setting))
    # a setting that does not change the masks is taken as given; forced, a changed one too (and recorded)
    result = infer(tiny_model, ct, tmp_path / "ok", preset=TINY.replace(sliding_window_batch_size=2), amp=False,
                   overlay=False)
    assert read_manifest(result.out_dir)["parameters"]["sw_batch_size"] == 2
    forced = infer(tiny_model, ct, tmp_path / "forced", preset=TINY.replace(spacing=(5.0, 5.0, 5.0)),
                   force_preset=True, amp=False, overlay=False)
    assert read_manifest(forced.out_dir)["preset"]["spacing"] == [5.0, 5.0, 5.0]


def test_without_a_recipe_the_assumed_one_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from spleenkit.model import atomic_save, build_unet, recipe_for

    bare = atomic_save(dict(build_unet("seed").state_dict()), tmp_path / "model.pt")  # a plain dict: no metadata
    with caplog.at_level("WARNING", logger="spleenkit.model"):
        preset, source = recipe_for(bare)
    assert preset.name == "seed" and source == "assumed (seed)"
    assert "carries no recipe and no run manifest beside it names one: assuming the seed recipe (1.5x1.5x2 mm" in \
        caplog.text


def test_the_bundle_loaders_still_read_a_model_that_carries_its_recipe(tiny_model: Path, tmp_path: Path) -> None:
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader
    from monai.networks.nets import UNet
    from monai.networks.utils import copy_model_state

    from spleenkit.model import load_checkpoint, stored_recipe

    assert stored_recipe(load_checkpoint(tiny_model))["spacing"] == [6.0, 6.0, 6.0]
    network = UNet(3, 1, 2, channels=TINY.channels, strides=TINY.strides, num_res_units=TINY.num_res_units,
                   norm=TINY.norm)  # the bundle's network_def, built by MONAI alone
    CheckpointLoader(str(tiny_model), {"model": network}, strict=True)(Engine(lambda engine, batch: None))
    expected = torch.load(tiny_model, weights_only=True)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in expected.items())
    other = UNet(3, 1, 2, channels=TINY.channels, strides=TINY.strides, num_res_units=TINY.num_res_units,
                 norm=TINY.norm)
    _, updated, unchanged = copy_model_state(other, expected)  # how ckpt_export loads a model.pt
    assert len(updated) == len(expected) and not unchanged


def test_export_and_pretrained_load_take_the_models_recipe(tiny_model: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from spleenkit.export import load_exported

    assert main(["export", "--model", str(tiny_model), "--out", str(tmp_path / "model.ts")]) == 0  # quick recipe
    _, metadata = load_exported(tmp_path / "model.ts")
    assert metadata["spleenkit_recipe"]["spacing"] == [6.0, 6.0, 6.0]
    assert main(["pretrained", "load", str(tiny_model)]) == 0
    assert "loaded into the kit's UNet with strict key matching" in capsys.readouterr().out


# --------------------------------------------------------------------------- the files the kit writes
@pytest.fixture(scope="module")
def onnx_ready() -> None:
    from spleenkit.export import onnx_available

    if not onnx_available():
        pytest.fail("ONNX export needs onnx and onnxscript (the export extra)")


def test_onnx_export_is_one_file_that_loads_anywhere(onnx_ready: None, tiny_model: Path, tmp_path: Path) -> None:
    from spleenkit.export import parity
    from spleenkit.model import load_model

    out = tmp_path / "exports"
    for _ in range(2):  # a re-export leaves nothing more behind
        assert main(["export", "--model", str(tiny_model), "--out", str(out / "m.ts"), "--onnx"]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.ts"]
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    shutil.copyfile(out / "m.onnx", elsewhere / "m.onnx")  # the file alone, in another folder
    assert parity(load_model(tiny_model, TINY), elsewhere / "m.onnx") < 1e-4


def test_large_onnx_weights_go_into_a_named_file_beside_it(onnx_ready: None, tiny_model: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from spleenkit import export
    from spleenkit.model import load_model

    monkeypatch.setattr(export, "ONNX_EMBED_LIMIT", 0)  # as a model over 2 GB would
    out = Path(export.export_model(tiny_model, tmp_path / "out" / "m.ts", onnx=True)["onnx"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data", "m.ts"]
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    for name in ("m.onnx", "m.onnx.data"):
        shutil.copyfile(out.parent / name, elsewhere / name)
    assert export.parity(load_model(tiny_model, TINY), elsewhere / "m.onnx") < 1e-4


def another_tools_export(target: Path) -> None:
    """A model exported by another tool: a TorchScript archive (as ``ckpt_export`` writes one, with metadata) or an
    ONNX model, neither carrying the kit's recipe."""
    import torch
    from monai.data import save_net_with_metadata

    network = torch.nn.Conv3d(1, 2, 1)
    if target.suffix == ".ts":
        save_net_with_metadata(torch.jit.script(network), str(target), include_config_vals=False,
                               meta_values={"version": "0.5.9"})
    else:
        torch.onnx.export(network, (torch.zeros(1, 1, 4, 4, 4),), str(target), dynamo=True)


@pytest.mark.parametrize("name", ["notes.txt", "model.ts", "model.onnx", "other-tool/model.ts",
                                  "other-tool/model.onnx"])
def test_export_never_overwrites_a_file_that_is_not_the_kits_export(name: str, tiny_model: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / name
    if name.startswith("other-tool/"):
        target.parent.mkdir()
        another_tools_export(target)
    else:
        target.write_text("my notes, not a model")
    before = digests(tmp_path)
    out = target.with_suffix(".ts") if target.suffix == ".onnx" else target
    assert main(["export", "--model", str(tiny_model), "--out", str(out), "--onnx"]) == 2
    line = error_of(capsys)
    assert f"{target}: exists and is not a spleenkit" in line and "refusing to overwrite it" in line
    assert digests(tmp_path) == before


def test_export_replaces_its_own_export_and_marks_both_files(onnx_ready: None, tiny_model: Path,
                                                             tmp_path: Path) -> None:
    from spleenkit.export import is_kit_export

    out = tmp_path / "model.ts"
    for _ in range(2):
        assert main(["export", "--model", str(tiny_model), "--out", str(out), "--onnx"]) == 0
    assert is_kit_export(out, "torchscript") and is_kit_export(out.with_suffix(".onnx"), "onnx")


def test_export_refuses_metadata_that_is_not_one_object(tiny_model: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    metadata = tmp_path / "metadata.json"
    metadata.write_text("[1, 2]")
    assert main(["export", "--model", str(tiny_model), "--out", str(tmp_path / "m.ts"), "--metadata",
                 str(metadata)]) == 2
    assert f"{metadata}: the metadata must be one JSON object" in error_of(capsys)
    assert not (tmp_path / "m.ts").exists()


def test_synth_force_removes_only_what_the_generator_wrote(tmp_path: Path) -> None:
    from spleenkit.data.synthetic import write_synthetic_dataset

    options = {"test_cases": 1, "matrix": 32, "slice_spacing": 5.0}
    data = write_synthetic_dataset(tmp_path / "data", cases=2, **options)
    mine = {"runs/quick/model.pt": b"a run trained on it", "notes.txt": b"my notes",
            "imagesTr/my_own_case.nii.gz": b"a case of mine"}
    for name, payload in mine.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(payload)
    assert main(["data", "synth", "--out", str(data), "--cases", "3", "--test-cases", "0", "--matrix", "32",
                 "--slice-spacing", "5", "--force"]) == 0
    for name, payload in mine.items():
        assert (data / name).read_bytes() == payload, name
    assert not (data / "imagesTs" / "spleen_3.nii.gz").exists()  # the old set's test case went
    assert json.loads((data / "dataset.json").read_text())["numTraining"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["delete a label", "truncate an image", "delete dataset.json"])
def test_synth_repairs_a_damaged_set_with_the_same_bytes(damage: str, tmp_path: Path) -> None:
    from spleenkit.data.synthetic import write_synthetic_dataset

    options = {"cases": 2, "test_cases": 1, "matrix": 32, "slice_spacing": 5.0}
    data = write_synthetic_dataset(tmp_path / "data", **options)
    (data / "notes.txt").write_text("mine")
    whole = digests(data)
    if damage == "delete a label":
        (data / "labelsTr" / "spleen_2.nii.gz").unlink()
    elif damage == "truncate an image":
        path = data / "imagesTr" / "spleen_1.nii.gz"
        path.write_bytes(path.read_bytes()[:500])
    else:
        (data / "dataset.json").unlink()
    write_synthetic_dataset(data, **options)
    assert digests(data) == whole


def test_a_killed_writes_leftovers_are_removed_by_the_next_write_to_that_place(tmp_path: Path) -> None:
    from spleenkit.io import UNTAGGED_STALE_AFTER_S, _host, temporary_name, write_bytes

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "model.pt"
    killed = tmp_path / f".model.pt.{_host()}-{dead.pid}-0123456789ab.tmp"
    killed.write_bytes(b"half a checkpoint")
    live = temporary_name(target)  # this process: a write in progress, kept
    live.write_bytes(b"being written")
    old_onnx = tmp_path / ".model.pt.0123456789ab.tmp.onnx.data"  # an earlier version's hidden ONNX weights
    old_onnx.write_bytes(b"19 MB")
    recent = tmp_path / ".model.pt.ba9876543210.tmp"  # an earlier version's, maybe still being written
    recent.write_bytes(b"?")
    old = time.time() - UNTAGGED_STALE_AFTER_S - 60
    os.utime(old_onnx, (old, old))
    staging = tmp_path / f".data.{_host()}-{dead.pid}-0123456789ab.tmp"  # a killed synth's staging folder
    (staging / "imagesTr").mkdir(parents=True)
    (tmp_path / "notes.model.pt.tmp").write_text("not ours")
    write_bytes(target, b"weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, live.name, recent.name, staging.name, "notes.model.pt.tmp"])
    write_bytes(tmp_path / "data", b"")
    assert not staging.exists()


# --------------------------------------------------------------------------- one line for every fault
@pytest.fixture
def empty_model(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"")
    return tmp_path / "run" / "model.pt"


@pytest.mark.parametrize("command", ["infer", "evaluate", "export", "pretrained"])
def test_an_empty_model_file_is_one_line_everywhere(command: str, empty_model: Path, synthetic_dataset: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = {"infer": ["infer", "--model", str(empty_model), "--input", str(synthetic_dataset / "imagesTs"),
                      "--out", str(tmp_path / "out")],
            "evaluate": ["evaluate", "--model", str(empty_model), "--data", str(synthetic_dataset)],
            "export": ["export", "--model", str(empty_model), "--out", str(tmp_path / "m.ts")],
            "pretrained": ["pretrained", "load", str(empty_model)]}[command]
    before = digests(tmp_path)
    assert main(args) == 2
    assert error_of(capsys) == f"spleenkit: error: {empty_model}: empty file (0 bytes): a save that never " \
                               "finished? Use another copy of the model"
    assert digests(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("code", "why"), [(errno.ENOSPC, "no space left on the device"),
                                           (errno.EROFS, "the file system is read-only"),
                                           (errno.EACCES, "permission denied")])
def test_a_full_or_read_only_disk_is_one_line_and_keeps_the_old_file(
        code: int, why: str, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import spleenkit.io

    out = tmp_path / "model.ts"
    assert main(["export", "--model", str(tiny_model), "--out", str(out), "--no-check"]) == 0
    before = digests(tmp_path)

    def fail(descriptor: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(spleenkit.io.os, "fsync", fail)
    assert main(["export", "--model", str(tiny_model), "--out", str(out), "--no-check"]) == 2
    assert error_of(capsys) == f"spleenkit: error: {out}: cannot write ({why})"
    assert digests(tmp_path) == before  # the old export whole, no temporary left


def test_faults_of_the_machine_are_mapped_in_one_place(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import spleenkit.environment
    from spleenkit.errors import user_error

    assert str(user_error(FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "x")))) == \
        f"{tmp_path / 'x'}: already exists"
    assert user_error(ValueError("a bug")) is None  # a bug keeps its traceback
    assert "out of memory" in str(user_error(MemoryError()))
    for fault, expected in ((MemoryError(), "spleenkit: error: out of memory: use smaller inputs"),
                            (PermissionError(errno.EACCES, "Permission denied", "/data/x.nii.gz"),
                             "spleenkit: error: /data/x.nii.gz: permission denied")):
        def report(fault: BaseException = fault) -> dict:
            raise fault
        monkeypatch.setattr(spleenkit.environment, "environment_report", report)
        assert main(["info"]) == 2
        assert error_of(capsys).startswith(expected)


def _rgb(path: Path) -> Path:
    nib.Nifti1Image(np.zeros((20, 20, 20), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]), np.eye(4)).to_filename(path)
    return path


def _claims(path: Path, shape: tuple[int, int, int], compressed: bool = True) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    raw = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    return path


@pytest.mark.parametrize(("make", "why"), [
    (lambda d: _rgb(d / "rgb.nii.gz"), "an RGB (colour) image; a CT volume holds one number"),
    (lambda d: _claims(d / "huge.nii.gz", (3000, 3000, 1700)),
     "the header claims 3000 x 3000 x 1700 voxels of int16 (30.6 GB), more than a gzip file of"),
    (lambda d: _claims(d / "big.nii.gz", (1600, 1600, 800)), "(4.1 GB), more than a gzip file of"),
    (lambda d: _claims(d / "huge.nii", (3000, 3000, 1700), compressed=False),
     "but the file holds 352 bytes: truncated"),
])
def test_a_header_is_checked_before_any_voxel_is_read(make: Callable[[Path], Path], why: str, tiny_model: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import resource

    inputs = tmp_path / "in"
    inputs.mkdir()
    path = make(inputs)
    before = digests(tmp_path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["infer", "--model", str(tiny_model), "--input", str(path), "--out", str(tmp_path / "out")]) == 2
    line = error_of(capsys)
    assert line.startswith(f"spleenkit: error: {path}: ") and why in line, line
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 500_000  # KiB: nothing was read
    assert digests(tmp_path) == before and not (tmp_path / "out").exists()


def test_the_memory_estimate_refuses_what_this_machine_cannot_read(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import spleenkit.images
    from spleenkit.images import read_nifti

    path = tmp_path / "ct.nii"
    nib.Nifti1Image(np.zeros((64, 64, 64), np.int16), np.eye(4)).to_filename(path)
    monkeypatch.setattr(spleenkit.images, "total_memory_gib", lambda: 0.001)
    with pytest.raises(BadInputError, match=r"reading it needs about 1\.6 MB, more than this machine's memory"):
        read_nifti(path)


def test_notebooks_run_out_a_file_and_a_bad_profile_are_one_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    profile = tmp_path / "bad.yaml"
    profile.write_text("shared: [a\n  b: c\n")
    before = digests(tmp_path)
    assert main(["notebooks", "run", "--out", str(afile), "--only", "00"]) == 2
    assert error_of(capsys) == f"spleenkit: error: {afile}: the output folder is not writable: a file has its name"
    assert main(["notebooks", "run", "--profile", str(profile), "--only", "00"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"spleenkit: error: {profile}: not valid YAML (")
    assert "at line 2, column 4)" in err
    assert digests(tmp_path) == before


@pytest.fixture
def html_server() -> str:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            body = b"<!DOCTYPE html><html><body>Mirror moved</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/Task09_Spleen.tar"
    httpd.shutdown()


def test_an_msd_mirror_answering_with_a_web_page_is_one_line(html_server: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from spleenkit.data.download import safe_extract

    assert main(["data", "download", "msd", "--root", str(tmp_path / "data"), "--url", html_server, "--no-verify",
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"spleenkit: error: {html_server}: the address answers with a web page " \
                                   "(text/html), not the file; open it in a browser to find the file's own address"
    assert len([line for line in err.splitlines() if not line.endswith("(no md5 given)")]) == 1
    assert not (tmp_path / "data").exists()
    page = tmp_path / "Task09_Spleen.tar"  # saved by a browser or another tool
    page.write_bytes(b"<!DOCTYPE html>\n<html><body>Not found</body></html>")
    with pytest.raises(BadInputError, match=r"Task09_Spleen\.tar: not a tar archive but a web page \(HTML\)") as caught:
        safe_extract(page, tmp_path / "root", folder="Task09_Spleen")
    assert "\n" not in str(caught.value)


def test_evaluate_refuses_max_cases_below_one_and_honours_out(tiny_model: Path, synthetic_dataset: Path,
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(tiny_model.parent, tmp_path / "run"))
    (run / "predictions").write_text("a file where the predictions folder would go")
    before = digests(run)
    for bad in ("-1", "0"):
        assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(synthetic_dataset),
                     "--max-cases", bad]) == 2
        assert f"--max-cases {bad}: evaluate at least 1 case" in error_of(capsys)
    started = time.perf_counter()
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(synthetic_dataset), "--no-amp"]) == 2
    assert f"{run / 'predictions'}: the output folder is not writable" in error_of(capsys)
    assert time.perf_counter() - started < 30  # refused before any case is scored
    assert digests(run) == before and not (run / "evaluation").exists()
    out = tmp_path / "elsewhere"
    assert main(["evaluate", "--model", str(run / "model.pt"), "--data", str(synthetic_dataset), "--no-amp",
                 "--max-cases", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["spleen_4.nii.gz"]  # the first of 3
    assert digests(run) == before


# --------------------------------------------------------------------------- SIGTERM is Ctrl-C
SLOW_CHILD = textwrap.dedent("""
    import sys, time
    import spleenkit.{module} as module
    real = module.{function}
    calls = []
    def slow(*args, **kwargs):  # the second case waits, so a signal finds one case finished
        calls.append(1)
        if len(calls) == 2:
            print("one case done", flush=True)
            time.sleep(60)
        return real(*args, **kwargs)
    module.{function} = slow
    from spleenkit.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("command", ["infer", "evaluate"])
def test_sigterm_stops_infer_and_evaluate_like_ctrl_c(command: str, tiny_model: Path, synthetic_dataset: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    if command == "infer":
        inputs = tmp_path / "in"
        inputs.mkdir()
        for name in ("a", "b"):
            ct_like(inputs / f"{name}.nii.gz")
        code = SLOW_CHILD.format(module="inference", function="_infer_one")
        args = ["infer", "--input", str(inputs), "--no-overlay"]
    else:
        code = SLOW_CHILD.format(module="evaluation", function="evaluate_case")
        args = ["evaluate", "--data", str(synthetic_dataset)]
    child = subprocess.Popen([sys.executable, "-c", code, *args, "--model", str(tiny_model), "--out", str(out),
                              "--no-amp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert child.stdout.readline().strip() == "one case done", child.stderr.read()
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 143 and err.splitlines()[-1] == "spleenkit: terminated (SIGTERM)", err
    manifest = read_manifest(out)
    assert manifest["stopped"] == "terminated (SIGTERM)"
    done = manifest["cases"] if command == "infer" else manifest["cases_done"]
    assert len(done) == 1 and len(manifest["not_done"]) >= 1
    assert not (out / "run.lock").exists()


def test_sigterm_stops_training_like_ctrl_c(synthetic_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = train_args(synthetic_dataset, run)
    args[args.index("--epochs") + 1] = "50"
    child = subprocess.Popen([sys.executable, "-m", "spleenkit", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoint_last.pt").is_file():
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 143 and err.splitlines()[-1] == "spleenkit: terminated (SIGTERM)", err[-2000:]
    manifest = read_manifest(run)
    assert manifest["stopped"] == "terminated (SIGTERM)" and manifest["finished"]
    from spleenkit.training import read_last_checkpoint

    assert read_last_checkpoint(run / "checkpoint_last.pt")["epoch"] >= 1  # whole: a resume can go on from it
    assert not list(run.glob(".*.tmp")) and not (run / "run.lock").exists()

"""Training: the run folder, manifest, determinism, bf16 on the CPU, resume after SIGKILL, checkpoints, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAINING, describe

from spleenkit.errors import BadInputError
from spleenkit.presets import get_preset
from spleenkit.runs import CHECKPOINT_NAME, METRICS_NAME, MODEL_NAME, read_metrics
from spleenkit.training import TrainingResult, read_last_checkpoint, train, training_precision

TINY = TINY_TRAINING  # a training run in seconds (helpers.py)


def tiny_train(data: Path, run: Path, **kwargs: object) -> TrainingResult:
    options = {"epochs": 3, "validation_interval": 2, "seed": 7, "progress": False, "num_workers": 1, **TINY}
    options.update(kwargs)
    return train(data, run, "quick", **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainingResult:
    return tiny_train(synthetic_dataset, tmp_path_factory.mktemp("training") / "run")


def test_run_folder_holds_model_checkpoint_metrics_and_tensorboard(tiny_run: TrainingResult) -> None:
    from spleenkit.model import build_unet, load_checkpoint

    run = tiny_run.run_dir
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"epoch", "loss", "val_dice", "lr", "seconds"} <= set(records[0])
    assert records[0]["val_dice"] is None  # validation every 2 epochs, and at the last one
    assert records[1]["val_dice"] is not None and records[2]["val_dice"] is not None
    assert all(0.0 < r["loss"] < 2.0 and r["seconds"] > 0 for r in records)
    assert records[0]["lr"] > records[1]["lr"] > records[2]["lr"] >= 0.0  # cosine decay, stepped per iteration
    assert json.loads((run / METRICS_NAME).read_text().splitlines()[0])["val_dice"] is None  # null in the file

    best = max(r["val_dice"] for r in records if r["val_dice"] is not None)
    assert tiny_run.best_dice == pytest.approx(best)
    assert tiny_run.best_epoch in (2, 3) and tiny_run.epochs == 3
    expected = training_precision(get_preset("quick", **TINY), torch.device("cpu"))  # bfloat16 only where native
    assert tiny_run.amp_dtype == (None if expected.dtype is None else str(expected.dtype)) and tiny_run.device == "cpu"

    weights = load_checkpoint(tiny_run.model_path)  # a plain state dict, as the bundle's model.pt
    assert list(weights) == list(build_unet(get_preset("quick", **TINY)).state_dict())
    checkpoint = read_last_checkpoint(run / CHECKPOINT_NAME)
    assert checkpoint["epoch"] == 3 and checkpoint["iteration"] == 6
    assert checkpoint["best_metric"] == pytest.approx(best)
    assert {"model", "optimizer", "scheduler", "scaler"} <= set(checkpoint)
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(run.glob(".*.tmp"))


def test_manifest_records_versions_device_parameters_data_and_times(tiny_run: TrainingResult,
                                                                    synthetic_dataset: Path) -> None:
    from spleenkit.data.datalist import dataset_fingerprint, load_datalist
    from spleenkit.manifest import read_manifest

    manifest = read_manifest(tiny_run.run_dir)
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["monai"] and manifest["versions"]["spleenkit"]
    assert "git_commit" in manifest and manifest["device"] == "cpu"
    parameters = manifest["parameters"]
    assert parameters["preset"]["name"] == "quick" and parameters["preset"]["patch_size"] == [48, 48, 48]
    assert parameters["preset"]["validation_roi_size"] == [48, 48, 48]  # follows the patch
    expected = training_precision(get_preset("quick", **TINY), torch.device("cpu"))
    assert parameters["seed"] == 7 and parameters["amp_dtype"] == str(expected.dtype)
    assert manifest["parameters"]["precision"] == expected.as_dict()  # the dtype, the CPU's capability and why
    assert manifest["dataset"]["fingerprint"] == dataset_fingerprint(load_datalist(synthetic_dataset))
    assert len(manifest["dataset"]["validation_cases"]) == 2
    assert manifest["started"] <= manifest["finished"]
    assert manifest["result"]["best_dice"] == pytest.approx(tiny_run.best_dice)


def test_same_seed_gives_identical_losses(tiny_run: TrainingResult, synthetic_dataset: Path, tmp_path: Path) -> None:
    again = tiny_train(synthetic_dataset, tmp_path / "again")
    first, second = read_metrics(tiny_run.run_dir), read_metrics(again.run_dir)
    assert [r["loss"] for r in first] == [r["loss"] for r in second]
    assert [r["val_dice"] for r in first] == [r["val_dice"] for r in second]
    other = tiny_train(synthetic_dataset, tmp_path / "other", seed=8, epochs=1)
    assert read_metrics(other.run_dir)[0]["loss"] != first[0]["loss"]


@pytest.mark.parametrize("amp", [True, False])
def test_bfloat16_autocast_is_in_effect_on_the_cpu(synthetic_dataset: Path, amp: bool) -> None:
    """monai.engines' amp=True does nothing on a CPU: the kit's step and inferer must use bfloat16 there."""
    from spleenkit.data.datalist import load_datalist, split_datalist
    from spleenkit.devices import pick_device
    from spleenkit.model import build_unet
    from spleenkit.presets import resolve_preset
    from spleenkit.training import build_datasets, build_evaluator, build_loaders, build_trainer

    preset = resolve_preset("quick", TINY, flags={"epochs": 1})
    device = pick_device("cpu")
    train_items, validation_items = split_datalist(load_datalist(synthetic_dataset), preset.validation_cases)
    datasets = build_datasets(train_items, validation_items, preset, num_workers=1)
    train_loader, validation_loader = build_loaders(datasets, preset)
    network = build_unet(preset)
    evaluator = build_evaluator(network, validation_loader, preset, device, amp=amp)
    trainer = build_trainer(network, train_loader, evaluator, preset, device, run_dir=None, amp=amp)
    seen: dict[str, set[torch.dtype]] = {"train": set(), "eval": set()}

    def record(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        seen["train" if module.training else "eval"].add(output.dtype)

    first_convolution = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d))
    # build_trainer put the weights in oneDNN's layout on the CPU (the preset's channels_last)
    assert first_convolution.weight.is_contiguous(memory_format=torch.channels_last_3d)
    first_convolution.register_forward_hook(record)
    trainer.run()
    expected = torch.bfloat16 if amp else torch.float32
    assert seen == {"train": {expected}, "eval": {expected}}
    assert trainer.state.iteration == 2 and trainer.state.val_dice is not None
    assert all(p.dtype == torch.float32 for p in network.parameters())  # weights stay float32


@pytest.mark.slow
def test_resume_after_sigkill_loses_at_most_one_epoch(synthetic_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "killed"
    options = {"epochs": 40, "validation_interval": 1, "seed": 3, "progress": False, "num_workers": 1, **TINY}
    code = ("import sys; from spleenkit.training import train; "
            f"train(sys.argv[1], sys.argv[2], 'quick', **{options!r})")
    log = (tmp_path / "child.log").open("w")
    child = subprocess.Popen([sys.executable, "-c", code, str(synthetic_dataset), str(run)], stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while len(read_metrics(run)) < 2:
            assert child.poll() is None, (tmp_path / "child.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the child made no progress"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
        log.close()
    assert child.returncode == -signal.SIGKILL
    logged = len(read_metrics(run))
    saved = read_last_checkpoint(run / CHECKPOINT_NAME)["epoch"]
    assert saved >= logged - 1 >= 1  # the checkpoint is at most one epoch behind what was logged

    result = train(synthetic_dataset, run, "quick", resume=True, **{**options, "epochs": saved + 2})
    assert result.resumed_from_epoch == saved and result.epochs == saved + 2
    epochs = [r["epoch"] for r in read_metrics(run)]
    assert epochs == list(range(1, saved + 3))  # continued, nothing logged twice
    checkpoint = read_last_checkpoint(run / CHECKPOINT_NAME)
    assert checkpoint["epoch"] == saved + 2 and checkpoint["iteration"] == 2 * (saved + 2)
    assert not list(run.glob(".*.tmp"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["resumed_from_epoch"] == saved and manifest["parameters"]["resume"] is True


def test_truncated_checkpoint_is_refused_before_anything_is_loaded(tiny_run: TrainingResult, synthetic_dataset: Path,
                                                                   tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.run_dir, run)
    checkpoint = run / CHECKPOINT_NAME
    checkpoint.write_bytes(checkpoint.read_bytes()[:100_000])
    model_before = (run / MODEL_NAME).read_bytes()
    metrics_before = (run / METRICS_NAME).read_text()
    with pytest.raises(BadInputError, match="corrupt or truncated") as caught:
        tiny_train(synthetic_dataset, run, resume=True)
    assert str(checkpoint) in str(caught.value)
    assert (run / MODEL_NAME).read_bytes() == model_before
    assert (run / METRICS_NAME).read_text() == metrics_before


def test_incomplete_checkpoint_is_named(tmp_path: Path) -> None:
    from spleenkit.model import atomic_save

    path = atomic_save({"model": {}, "epoch": 3}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(BadInputError, match="incomplete training checkpoint: missing format, optimizer"):
        read_last_checkpoint(path)


def test_bad_input_is_explained(synthetic_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="dataset folder not found"):
        tiny_train(tmp_path / "nowhere", tmp_path / "run")
    with pytest.raises(BadInputError, match="unknown preset 'sed'"):
        train(synthetic_dataset, tmp_path / "run", "sed")
    with pytest.raises(BadInputError, match="unknown preset setting"):
        tiny_train(synthetic_dataset, tmp_path / "run", learning_rat=1e-3)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(BadInputError, match="output folder") as caught:
        tiny_train(synthetic_dataset, blocker / "run")
    assert str(blocker) in str(caught.value)
    with pytest.raises(BadInputError, match="smaller than the patch") as caught:
        tiny_train(synthetic_dataset, tmp_path / "run", patch_size=64, pad_to_patch=False)
    assert "imagesTr" in str(caught.value)
    with pytest.raises(BadInputError, match="cannot hold out"):
        tiny_train(synthetic_dataset, tmp_path / "run", validation_cases=6)
    assert not (tmp_path / "run" / METRICS_NAME).exists()


def test_cache_estimate_from_headers_matches_the_filled_cache(synthetic_dataset: Path) -> None:
    from spleenkit.data.datalist import load_datalist, split_datalist
    from spleenkit.presets import resolve_preset
    from spleenkit.training import build_datasets

    preset = resolve_preset("quick", TINY)
    train_items, validation_items = split_datalist(load_datalist(synthetic_dataset), 2)
    datasets = build_datasets(train_items, validation_items, preset, num_workers=1)
    cached = 0
    for dataset in (datasets.train, datasets.validation):
        for item in dataset._cache:
            cached += sum(item[key].numel() * item[key].element_size() for key in ("image", "label"))
    assert datasets.estimate.cached_cases == 6
    assert datasets.estimate.total_bytes == pytest.approx(cached, rel=0.1)
    assert "GiB" in datasets.estimate.describe()


def test_an_interrupt_while_the_loader_starts_its_thread_stops_the_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # MONAI's ThreadBuffer starts its thread before the try that stops it: a Ctrl-C or SIGTERM landing in
    # Thread.start left the thread running, and the process aborted at exit (status -6) after a clean stop
    import threading

    from monai.data import thread_buffer

    from spleenkit.training.loaders import TrainingLoader

    started: list[threading.Thread] = []

    class InterruptedAsItStarts(threading.Thread):
        def start(self) -> None:
            super().start()
            started.append(self)
            raise KeyboardInterrupt  # the signal, arriving while start() waits for the thread

    monkeypatch.setattr(thread_buffer, "Thread", InterruptedAsItStarts)
    loader = TrainingLoader([torch.full((1,), float(i)) for i in range(50)], batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        next(iter(loader))
    assert len(started) == 1 and not started[0].is_alive()

    monkeypatch.undo()  # with nothing interrupting, the batches, their order and repeats are the loader's
    assert [float(b) for b in TrainingLoader([torch.full((1,), float(i)) for i in range(3)], batch_size=1,
                                             repeats=2)] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]


def test_loss_optimizer_and_schedules_follow_the_preset() -> None:
    from monai.bundle import ConfigParser
    from monai.losses import DiceLoss
    from monai.optimizers import Novograd

    from spleenkit.presets import get_preset
    from spleenkit.training import epoch_level_schedule, make_loss, make_optimizer, make_scheduler

    bundle_loss = ConfigParser({"loss": {
        "_target_": "DiceCELoss", "include_background": True, "to_onehot_y": True, "softmax": True,
        "squared_pred": True, "batch": True, "smooth_nr": 0.00001, "smooth_dr": 0.00001, "lambda_dice": 0.5,
        "lambda_ce": 0.5}}).get_parsed_content("loss")
    assert describe(make_loss("seed")) == describe(bundle_loss)
    assert isinstance(make_loss("tutorial"), DiceLoss) and make_loss("tutorial").include_background
    assert not make_loss("quick").dice.include_background  # the kit's choice for its small-budget recipes

    weights = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer("bundle-0.5.9", weights), Novograd)
    adam = make_optimizer("seed", weights)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-4
    assert make_scheduler("seed", adam, 100) is None
    step = make_scheduler(get_preset("bundle-0.5.9", scheduler_step_size=3), make_optimizer("bundle-0.5.9", weights),
                          100)
    for _ in range(3):
        step.optimizer.step()
        step.step()
    assert step.get_last_lr()[0] == pytest.approx(2e-3 * 0.1)
    cosine = make_scheduler("fast", make_optimizer("fast", weights), 10)
    for _ in range(10):
        cosine.optimizer.step()
        cosine.step()
    assert cosine.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    # StepLR steps once per epoch (0.5.9's LrScheduleHandler default); the cosine decay once per iteration
    assert epoch_level_schedule("bundle-0.5.9") and not epoch_level_schedule("fast")


def test_step_timing_compares_float32_and_bfloat16() -> None:
    from spleenkit.presets import get_preset
    from spleenkit.training import measure_step_seconds

    quick = get_preset("quick", patch_size=32)  # instance norm needs more than 1 voxel at the deepest level
    timing = measure_step_seconds(quick, "cpu", steps=1, warmup=0, include_slow=True)
    assert timing["mixed_dtype"] == "bfloat16" and timing["patch_size"] == (32, 32, 32)
    assert timing["patches"] == quick.batch_size * quick.num_samples
    assert timing["float32_seconds"] > 0 and timing["mixed_seconds"] > 0 and timing["skipped"] is None


def test_cli_train_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spleenkit.cli import main

    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--patch", "32", "32"]) == 2
    assert "spleenkit: error: patch_size=32,32: expected 3 whole numbers" in capsys.readouterr().err


def test_cli_train_runs_and_prints_the_model(synthetic_dataset: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from spleenkit.cli import main

    run = tmp_path / "cli-run"
    code = main(["train", "--data", str(synthetic_dataset), "--out", str(run), "--preset", "quick", "--epochs", "1",
                 "--patch", "48", "--workers", "1", "--no-progress", "--lr", "0.002", "--seed", "5",
                 "--set", "spacing=6,6,6", "--set", "validation-cases=2", "--set", "scheduler=none",
                 "--set", "num_samples=1", "--set", "sliding_window_overlap=0.25"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"model: {run / MODEL_NAME}" in out and "best validation Dice" in out
    parameters = json.loads((run / "manifest.json").read_text())["parameters"]
    assert parameters["preset"]["learning_rate"] == 0.002 and parameters["seed"] == 5
    assert parameters["preset"]["spacing"] == [6, 6, 6] and parameters["preset"]["scheduler"] is None
    assert parameters["preset"]["validation_roi_size"] == [48, 48, 48]
    assert read_metrics(run)[0]["lr"] == 0.002  # no schedule: the rate stays
    assert main(["train", "--data", str(synthetic_dataset), "--out", str(run), "--set", "spacing"]) == 2
    assert "--set takes NAME=VALUE" in capsys.readouterr().err
    assert os.path.getsize(run / MODEL_NAME) > 1_000_000


def test_cpu_bfloat16_training_falls_back_where_its_gradients_are_wrong(monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    from spleenkit import devices, training
    from spleenkit.presets import get_preset

    cpu = torch.device("cpu")
    assert devices.bf16_weight_gradient_ok((4, 4, 4))  # the real check passes where bfloat16 is fine
    # a CPU with native bfloat16 (on one without, float32 is chosen before any gradient check: tests/test_precision.py)
    native = {"label": "AVX512_BF16", "instruction_set": "AVX512", "onednn_bfloat16": True, "native_bfloat16": True}
    monkeypatch.setattr("spleenkit.devices.cpu_capability", lambda: native)
    assert training.training_amp(get_preset("quick"), cpu) is True
    assert training.training_amp(get_preset("quick"), cpu, amp=False) is False
    # where the check fails (PyTorch's oneDNN kernel on a map 2 voxels deep) training falls back to float32
    monkeypatch.setattr(devices, "bf16_weight_gradient_ok", lambda shape: shape[0] != 2)
    with caplog.at_level("WARNING", logger="spleenkit.training"):
        assert training.training_amp(get_preset("quick", patch_size=32), cpu) is False
    assert "training in float32" in caplog.text
    assert training.training_amp(get_preset("quick", patch_size=48), cpu) is True
    assert training.training_amp(get_preset("quick", patch_size=32), torch.device("meta")) is True  # not a CPU


def test_a_fresh_run_keeps_the_earlier_runs_files(tmp_path: Path) -> None:
    """Training again into a run folder moves the earlier model aside instead of deleting it."""
    from spleenkit.runs import prepare_run_dir

    (tmp_path / "model.pt").write_bytes(b"earlier weights")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    prepare_run_dir(tmp_path)
    assert not (tmp_path / "model.pt").exists()
    kept = list(tmp_path.glob("previous-*/model.pt"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"earlier weights"
    assert (kept[0].parent / "metrics.jsonl").read_text() == '{"epoch": 1}\n'

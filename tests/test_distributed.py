"""Multi-process training and evaluation on the CPU with gloo: the same code torchrun runs with NCCL on GPUs.

The slow tests launch real torchrun jobs (2 processes, or 2 "machines" on 127.0.0.1) through
``spleenkit.distributed.launch_torchrun``; tests/distributed_worker.py records what every rank writes.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest

from spleenkit.distributed import (
    DistributedContext,
    DistributedRunError,
    failure_summary,
    free_port,
    launch_torchrun,
    scale_learning_rate,
    shard,
    share_training_data,
    torchrun_command,
    torchrun_environment,
)
from spleenkit.errors import BadInputError
from spleenkit.presets import get_preset

WORKER = Path(__file__).with_name("distributed_worker.py")
#: A tiny, fast recipe whose crops are deterministic: at 15 mm every phantom (at most 460 mm across and 420 mm
#: long) is smaller than the 32^3 patch, so each crop is the whole (padded) image whatever the random centre; and
#: without the quick recipe's augmentation, which each rank would draw from its own random stream.
TINY = {"preset": "quick", "spacing": [15, 15, 15], "patch_size": 32, "validation_cases": 2, "validation_interval": 1,
        "device": "cpu", "num_workers": 1, "augment_probability": 0.0}
#: ... and one whose loss decomposes exactly over processes (see test_loss_series_matches_single_process).
# the default layout: oneDNN's channels-last kernels block batch 1 and batch 2 differently, and the
# rounding that differs flips a few validation voxels (measured: Dice 0.07118 vs 0.07111)
EXACT = {**TINY, "amp": False, "cache_rate": 0.0, "norm": "instance", "loss": "dice", "epochs": 2,
         "channels_last": False}


def _context(rank: int = 0, world: int = 2) -> DistributedContext:
    import torch

    return DistributedContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world, node_rank=0,
                              backend="gloo", device=torch.device("cpu"))


def _torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-process 'job' inside this pytest process, as torchrun --nproc_per_node=1 would set it up."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)


# --------------------------------------------------------------------------- fast: no torchrun
def test_distributed_needs_torchrun_environment() -> None:
    with pytest.raises(BadInputError, match="torchrun"):
        torchrun_environment({"RANK": "0"})
    env = torchrun_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                "GROUP_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    assert (env["rank"], env["world_size"], env["local_rank"], env["node_rank"]) == (3, 4, 1, 1)
    assert env["master"] == "node0:29500"
    with pytest.raises(BadInputError, match="inconsistent"):
        torchrun_environment({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "a",
                              "MASTER_PORT": "1"})


def test_cli_distributed_options_fail_clearly_outside_torchrun(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from spleenkit.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--sync-bn"]) == 2
    assert "--sync-bn needs --distributed" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--distributed"]) == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sync_batchnorm_on_cpu_is_a_clear_error() -> None:
    from spleenkit.distributed import wrap_model
    from spleenkit.model import build_unet

    with pytest.raises(BadInputError, match="--sync-bn needs GPUs"):
        wrap_model(build_unet(get_preset("quick")), _context(), sync_bn=True)


def test_learning_rate_scaling() -> None:
    preset = get_preset("seed")
    assert scale_learning_rate(preset, 4, "none").learning_rate == preset.learning_rate
    assert scale_learning_rate(preset, 4, "linear").learning_rate == pytest.approx(4 * preset.learning_rate)
    assert scale_learning_rate(preset, 1, "linear").learning_rate == preset.learning_rate
    with pytest.raises(BadInputError, match="linear"):
        scale_learning_rate(preset, 2, "sqrt")


def test_shares_split_cases_like_monai_samplers() -> None:
    from monai.data import DistributedSampler

    cases = [{"image": f"case_{i}"} for i in range(5)]
    for world in (2, 3):
        parts = [shard(cases, _context(r, world)) for r in range(world)]
        assert sorted(c["image"] for part in parts for c in part) == sorted(c["image"] for c in cases)  # no duplicate
        for r, part in enumerate(parts):  # the same cases, in the same order, as the validation sampler
            sampler = DistributedSampler(cases, even_divisible=False, shuffle=False, num_replicas=world, rank=r)
            assert part == [cases[i] for i in sampler]
    padded = [shard(cases, _context(r, 2), even_divisible=True) for r in range(2)]
    assert [len(p) for p in padded] == [3, 3]  # equal iterations on every rank
    with pytest.raises(BadInputError, match="cannot be shared among 3"):
        shard(cases[:2], _context(0, 3))

    train_items, validation_items = cases[:4], cases[4:] + cases[:1]
    cached = [share_training_data(train_items, validation_items, _context(r, 2), cache_rate=1.0) for r in range(2)]
    assert all(s.partitioned and len(s.train_items) == 2 for s in cached)  # each rank caches half
    assert {c["image"] for s in cached for c in s.train_items} == {c["image"] for c in train_items}
    uncached = share_training_data(train_items, validation_items, _context(1, 2), cache_rate=0.0)
    assert not uncached.partitioned and uncached.train_items == train_items  # the sampler shares it
    assert uncached.validation_items == [validation_items[1]]


def test_torchrun_command_lines() -> None:
    one = torchrun_command(["train", "--data", "d", "--out", "r"], nproc=2)
    assert one[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=2"]
    assert "--standalone" in one
    assert one[-8:] == ["-m", "spleenkit", "train", "--data", "d", "--out", "r", "--distributed"]
    several = torchrun_command(["evaluate", "--distributed"], nproc=4, nnodes=2, node_rank=1,
                               rdzv_endpoint="node0:29400", rdzv_id="job7")
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=job7",
            "--node-rank=1"} <= set(several)
    assert "--standalone" not in several and several.count("--distributed") == 1
    with pytest.raises(BadInputError, match="rendezvous"):
        torchrun_command(["train"], nnodes=2)
    with pytest.raises(BadInputError, match="train"):
        torchrun_command(["infer"])


def test_failure_summary_names_the_rank() -> None:
    kit = "[rank 1] 10:00:00 ERROR spleenkit.distributed: rank 1 of 2 (node 0, local rank 1) failed: RuntimeError: boom"
    assert failure_summary(kit) == "rank 1 of 2 failed first: RuntimeError: boom"
    torchrun = "Root Cause (first observed failure):\n[0]:\n  rank      : 3 (local_rank: 1)\n  exitcode  : 1"
    assert failure_summary(torchrun).startswith("rank 3 (local rank 1) failed")


def test_one_process_group_in_this_process(monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    import torch.distributed as dist

    from spleenkit.distributed import (
        broadcast_object,
        distributed_map,
        gather_objects,
        mean_over_ranks,
        process_group,
    )

    _torchrun_variables(monkeypatch)
    with process_group(device="cpu", timeout_s=30) as context:
        assert (context.rank, context.world_size, context.backend, context.is_main) == (0, 1, "gloo", True)
        assert mean_over_ranks(2.5) == 2.5 and broadcast_object({"a": 1}) == {"a": 1} and gather_objects(3) == [3]
        assert list(distributed_map(lambda x: x * x, [1, 2, 3], context)) == [(1, 1), (2, 4), (3, 9)]
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="boom"), process_group(device="cpu", timeout_s=30):
        raise RuntimeError("boom")
    assert not dist.is_initialized()
    assert "rank 0 of 1 (node 0, local rank 0) failed: RuntimeError: boom" in caplog.text


# --------------------------------------------------------------------------- slow: real torchrun jobs
def _writes(audit_dir: Path, rank: int, under: Path) -> list[str]:
    """The paths under ``under`` that ``rank`` opened for writing, created, renamed or removed."""
    record = audit_dir / f"rank{rank}.json"
    assert record.is_file(), f"rank {rank} left no audit record"
    root = str(under.resolve())
    return [p for p in json.loads(record.read_text()) if p == root or p.startswith(root + os.sep)]


def _launch(args: list[str], audit_dir: Path, *, extra_env: dict[str, str] | None = None, **kwargs):
    audit_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AUDIT_DIR": str(audit_dir), **(extra_env or {})}
    return launch_torchrun(args, program=[str(WORKER)], env=env, timeout_s=kwargs.pop("timeout_s", 400),
                           echo=kwargs.pop("echo", False), **kwargs)


def _launch_two_machines(args: list[str], audit_dir: Path) -> list[object]:
    """Two torchrun launches (--nnodes=2, one process each) meeting at a c10d rendezvous on 127.0.0.1,
    as two machines would; returns each launch's CompletedProcess (or the error it raised)."""
    port = free_port()
    results: list[object] = [None, None]

    def node(rank: int) -> None:
        try:
            results[rank] = _launch(args, audit_dir, nproc=1, nnodes=2, node_rank=rank,
                                    rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id=f"loopback-{port}",
                                    local_addr="127.0.0.1")
        except Exception as error:  # noqa: BLE001 - reported by the caller
            results[rank] = error

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return results


@pytest.fixture(scope="module")
def two_node_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two 'machines' on 127.0.0.1 with one gloo process each, batch 1 per process, 2 epochs
    (uncached, so a DistributedSampler deals the cases afresh every epoch)."""
    root = tmp_path_factory.mktemp("two_nodes")
    run_dir = root / "runs" / "two"
    settings = {**EXACT, "data_dir": str(synthetic_dataset), "run_dir": str(run_dir), "batch_size": 1}
    started = time.perf_counter()
    results = _launch_two_machines(["train", json.dumps(settings)], root / "audit")
    return {"root": root, "run_dir": run_dir, "audit": root / "audit", "results": results,
            "seconds": time.perf_counter() - started}


@pytest.mark.slow
def test_two_machines_train_and_only_rank_0_writes(two_node_run: dict) -> None:
    from spleenkit.model import build_unet, load_checkpoint
    from spleenkit.runs import read_metrics

    for result in two_node_run["results"]:  # both launches (machines) finished cleanly
        assert getattr(result, "returncode", None) == 0, result
    run_dir: Path = two_node_run["run_dir"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_last.pt", "manifest.json", "metrics.jsonl",
                                                          "model.pt", "tensorboard"]
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # one writer: rank 0's
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]  # one line per epoch, not one per rank
    assert all(math.isfinite(r["loss"]) and r["val_dice"] is not None for r in records)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    shared = manifest["parameters"]["distributed"]
    assert (shared["world_size"], shared["nodes"], shared["backend"], shared["global_batch"]) == (2, 2, "gloo", 2)
    assert shared["training_share"].startswith("DistributedSampler")
    assert len(manifest["peak_memory_mib_per_rank"]) == 2
    # model.pt is a plain UNet state dict (no DDP "module." prefix) that loads strictly
    build_unet(get_preset("quick", norm="instance")).load_state_dict(load_checkpoint(run_dir / "model.pt"))
    assert _writes(two_node_run["audit"], 0, run_dir), "rank 0 should have written the run folder"
    assert _writes(two_node_run["audit"], 1, two_node_run["root"] / "runs") == []


@pytest.mark.slow
def test_loss_series_matches_single_process(two_node_run: dict, synthetic_dataset: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """2 processes x batch 1 follow the same loss series as 1 process x batch 2, within 1e-5.

    Why they can match: the DistributedSampler's seeded permutation deals the cases so that the
    single process's batch [p0, p1] is rank 0's p0 plus rank 1's p1; the crops are the whole
    (padded) phantom, so they do not depend on each rank's random stream; DiceLoss (batch=False)
    and cross-entropy are means over samples, so the mean of the ranks' gradients that DDP
    computes is the single process's gradient; and InstanceNorm normalises each sample alone.
    With BatchNorm (the bundle's) each rank would normalise over its own half of the batch, which
    changes the forward pass itself (only SyncBatchNorm, GPU-only, restores it), so no tight
    tolerance holds there. What remains is float32 rounding in a different summation order:
    measured differences are below 1e-7; 1e-5 leaves room for other CPUs' kernels.
    """
    import torch

    from spleenkit.distributed import process_group
    from spleenkit.runs import read_metrics
    from spleenkit.training import train

    _torchrun_variables(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run one thread each
    try:
        with process_group(device="cpu", timeout_s=60) as context:
            train(synthetic_dataset, tmp_path / "one", batch_size=2, distributed=context, progress=False,
                  **{k: v for k, v in EXACT.items()})
    finally:
        torch.set_num_threads(threads)
    one, two = read_metrics(tmp_path / "one"), read_metrics(two_node_run["run_dir"])
    assert len(one) == len(two) == EXACT["epochs"]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["val_dice"] == pytest.approx(a["val_dice"], abs=1e-5)  # validation gathered from both ranks
        assert b["lr"] == pytest.approx(a["lr"])
    assert one[0]["loss"] != pytest.approx(one[-1]["loss"], abs=1e-4)  # it did train


@pytest.mark.slow
def test_distributed_evaluation_equals_single_process(two_node_run: dict, synthetic_dataset: Path,
                                                      tmp_path: Path) -> None:
    import shutil

    import numpy as np
    import torch

    from spleenkit.evaluation import evaluate_run
    from spleenkit.images import read_nifti
    from spleenkit.metrics import read_rows_csv

    runs = {}
    for name in ("one", "two"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        for file in ("model.pt", "manifest.json"):
            shutil.copy(two_node_run["run_dir"] / file, runs[name] / file)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # 5 cases: rank 0 scores 3, rank 1 scores 2 (uneven, nothing padded)
        single = evaluate_run(runs["one"] / "model.pt", synthetic_dataset, split="all", max_cases=5, device="cpu",
                              figures=False)
    finally:
        torch.set_num_threads(threads)
    _launch(["cli", "evaluate", "--model", str(runs["two"] / "model.pt"), "--data", str(synthetic_dataset),
             "--split", "all", "--max-cases", "5", "--device", "cpu", "--distributed", "--timeout-s", "120"],
            tmp_path / "audit", nproc=2)
    rows = read_rows_csv(runs["two"] / "evaluation" / "per_case.csv")
    assert [(r["case"], r["space"]) for r in rows] == [(r["case"], r["space"]) for r in single.rows]
    for mine, theirs in zip(rows, single.rows, strict=True):
        for metric in ("dice", "hd95_mm", "assd_mm", "pred_volume_ml"):
            assert mine[metric] == pytest.approx(theirs[metric], abs=1e-6), (mine["case"], metric)
    summary = json.loads((runs["two"] / "evaluation" / "summary.json").read_text())
    assert summary["original"]["dice"]["mean"] == pytest.approx(single.summary["original"]["dice"]["mean"], abs=1e-6)
    assert summary["original"]["cases"] == 5
    for case, path in single.prediction_paths.items():  # rank 1's cases too, written by rank 0
        other = runs["two"] / "predictions" / path.name
        assert np.array_equal(np.asarray(read_nifti(other).dataobj), np.asarray(read_nifti(path).dataobj)), case
    assert _writes(tmp_path / "audit", 1, runs["two"]) == []


@pytest.mark.slow
def test_a_crashing_rank_ends_the_job(synthetic_dataset: Path, tmp_path: Path) -> None:
    """SPLEENKIT_CRASH_RANK=1 makes rank 1 raise at its first iteration (after each rank cached its half
    of the cases) while rank 0 waits for it in DDP's gradient all-reduce: torchrun must end the job."""
    seen: list[tuple[float, str]] = []
    args = ["cli", "train", "--data", str(synthetic_dataset), "--out", str(tmp_path / "run"), "--preset", "quick",
            "--patch", "32", "--epochs", "1", "--workers", "1", "--device", "cpu", "--distributed",
            "--timeout-s", "60"]
    with pytest.raises(DistributedRunError) as failure:
        _launch(args, tmp_path / "audit", nproc=2, extra_env={"SPLEENKIT_CRASH_RANK": "1"},
                echo=lambda line: seen.append((time.monotonic(), line)))
    ended = time.monotonic()
    assert failure.value.returncode != 0
    assert "rank 1" in str(failure.value), str(failure.value)
    crash = [t for t, line in seen if "deliberate crash of rank 1" in line]
    assert crash, failure.value.output[-3000:]
    assert ended - crash[0] < 45, "the surviving rank should be stopped promptly, not wait for a timeout"
    assert not (tmp_path / "run" / "model.pt").exists()


def test_figures_of_the_multi_gpu_notebook() -> None:
    from spleenkit.visualization import compare_runs, data_parallel_diagram

    def texts(figure) -> str:
        return " ".join(t.get_text() for ax in figure.axes for t in ax.texts)

    two, eight = texts(data_parallel_diagram(2)), texts(data_parallel_diagram(8))
    assert "share 2 of 2" in two and "rank 1" in two and "all-reduce" in two and "writes the run folder" in two
    assert "rank 7" in eight and "4 more" in eight and "share 5 of 8" not in eight  # 4 rows drawn, the rest named
    one = [{"epoch": 1, "loss": 0.9, "seconds": 10.0}, {"epoch": 2, "loss": 0.8, "seconds": 9.0}]
    two_runs = [{"epoch": 1, "loss": 0.95, "seconds": 6.0}, {"epoch": 2, "loss": 0.85, "seconds": 5.0}]
    figure = compare_runs({"one process": one, "2 processes": two_runs})
    loss_ax, time_ax = figure.axes
    assert [line.get_label() for line in loss_ax.lines] == ["one process", "2 processes"]
    assert sorted(round(p.get_height(), 1) for p in time_ax.patches) == [5.0, 6.0, 9.0, 10.0]

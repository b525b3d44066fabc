"""Nothing lost, nothing silently wrong: every hostile input or fault of the kit's checklist, with its message,
its exit status and proof that nothing was lost or left behind."""

from __future__ import annotations

import ast
import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import HOLD_LOCK, TINY, TRAIN, ct_like, error_of, write_dicom_series

from spleenkit.cli import main, parse_setting
from spleenkit.errors import BadInputError
from spleenkit.manifest import build_manifest, read_manifest, write_manifest
from spleenkit.model import atomic_save, build_unet

REPO = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: two equal trees prove nothing was touched."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seed_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained weights of the bundle's own UNet (the CLI's default preset)."""
    torch.manual_seed(0)
    return atomic_save(build_unet("seed").state_dict(), tmp_path_factory.mktemp("seed") / "model.pt")


def with_singular_affine(path: Path) -> Path:
    """Rewrite ``path`` with an sform whose second and third axes point the same way (and no qform)."""
    affine = np.diag([5.0, 5.0, 5.0, 1.0])
    affine[:3, 2] = affine[:3, 1]
    header = nib.Nifti1Header()
    header.set_sform(affine, code=1)
    nib.Nifti1Image(np.asarray(nib.load(path).dataobj), None, header).to_filename(path)
    return path


# --------------------------------------------------------------------------- data loss: MSD extraction
def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in entries:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _msd_entries(extra: list[tuple[str, bytes]] = ()) -> list[tuple[str, bytes]]:
    description = {"training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}], "test": []}
    return [("Task09_Spleen/dataset.json", json.dumps(description).encode()),
            ("Task09_Spleen/imagesTr/a.nii.gz", b"image"), ("Task09_Spleen/labelsTr/a.nii.gz", b"label"), *extra]


def _root_with_other_data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "synthetic").mkdir(parents=True)
    (root / "synthetic" / "dataset.json").write_text("a student's synthetic set")
    (root / "notes.txt").write_text("keep me")
    return root


def test_msd_archive_with_other_top_level_folders_touches_nothing(tmp_path: Path) -> None:
    from spleenkit.data.download import MSD_SPLEEN_FOLDER, safe_extract

    root = _root_with_other_data(tmp_path)
    before = tree(root)
    archive = tmp_path / "Task09_Spleen.tar"
    archive.write_bytes(_tar(_msd_entries([("synthetic/dataset.json", b"evil replacement")])))
    with pytest.raises(BadInputError, match=r"besides Task09_Spleen/ the archive holds 'synthetic'.*nothing was "
                                            r"extracted") as caught:
        safe_extract(archive, root, folder=MSD_SPLEEN_FOLDER)
    assert str(archive) in str(caught.value)
    assert tree(root) == before and sorted(p.name for p in root.iterdir()) == ["notes.txt", "synthetic"]


def test_msd_extraction_replaces_only_the_dataset_and_only_with_a_complete_one(tmp_path: Path) -> None:
    from spleenkit.data.download import MSD_SPLEEN_FOLDER, extracted_dataset_problems, safe_extract

    def complete(folder: Path) -> None:
        if extracted_dataset_problems(folder):
            raise BadInputError("incomplete, nothing was replaced: " + "; ".join(extracted_dataset_problems(folder)))

    root = _root_with_other_data(tmp_path)
    (root / MSD_SPLEEN_FOLDER).mkdir()
    (root / MSD_SPLEEN_FOLDER / "dataset.json").write_text("an earlier, incomplete extraction")
    before = tree(root)
    archive = root / f"{MSD_SPLEEN_FOLDER}.tar"
    # an archive whose dataset lacks a listed file: refused before it replaces anything
    archive.write_bytes(_tar(_msd_entries()[:-1]))
    with pytest.raises(BadInputError, match="incomplete, nothing was replaced.*labelsTr/a.nii.gz"):
        safe_extract(archive, root, folder=MSD_SPLEEN_FOLDER, check=complete)
    assert {k: v for k, v in tree(root).items() if not k.endswith(".tar")} == before
    # a complete one: only Task09_Spleen changes, and no staging folder is left
    archive.write_bytes(_tar(_msd_entries([("._Task09_Spleen", b"macOS metadata")])))
    placed = safe_extract(archive, root, folder=MSD_SPLEEN_FOLDER, check=complete)
    assert placed == [root.resolve() / MSD_SPLEEN_FOLDER]
    after = tree(root)
    assert {k: v for k, v in after.items() if not k.startswith(MSD_SPLEEN_FOLDER)} == {
        k: v for k, v in before.items() if not k.startswith(MSD_SPLEEN_FOLDER)}
    assert after[f"{MSD_SPLEEN_FOLDER}/imagesTr/a.nii.gz"] == b"image"
    assert sorted(p.name for p in root.iterdir()) == ["Task09_Spleen", "Task09_Spleen.tar", "notes.txt", "synthetic"]


def test_download_msd_checks_completeness_before_replacing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spleenkit.data import download

    root = _root_with_other_data(tmp_path)
    before = tree(root)
    payload = _tar(_msd_entries()[:-1])  # the label is listed but missing

    def fake_download(url: str, destination: Path, **kwargs: object) -> Path:
        Path(destination).write_bytes(payload)
        return Path(destination)

    monkeypatch.setattr(download, "download_file", fake_download)
    with pytest.raises(BadInputError, match="incomplete, nothing was replaced: .*labelsTr/a.nii.gz"):
        download.download_msd(root, url="https://mirror.example/Task09_Spleen.tar", md5=None, progress=False)
    assert {k: v for k, v in tree(root).items() if not k.endswith(".tar")} == before
    assert not (root / "Task09_Spleen").exists() and not list(root.glob(".extract-*"))


def test_download_msd_url_needs_an_md5_of_the_right_form(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from spleenkit.data import download

    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(download, "download_file", lambda url, dest, **kw: calls.append((url, kw.get("md5"))) or
                        (_ for _ in ()).throw(BadInputError("stop here")))
    base = ["data", "download", "msd", "--root", str(tmp_path / "data"), "--url", "https://mirror.example/x.tar", "-q"]
    assert main(base) == 2
    line = error_of(capsys)
    assert "--url needs the mirror's --md5" in line and "--no-verify" in line
    assert main([*base, "--md5", "12345"]) == 2
    assert "'12345' is not an md5 checksum (32 hexadecimal digits)" in error_of(capsys)
    assert calls == [], "nothing may be downloaded before the checksum is known to be usable"
    assert not (tmp_path / "data").exists()
    assert main([*base, "--md5", "A" * 32]) == 2 and calls[-1] == ("https://mirror.example/x.tar", "a" * 32)
    capsys.readouterr()
    assert main([*base, "--no-verify"]) == 2 and calls[-1] == ("https://mirror.example/x.tar", None)


# --------------------------------------------------------------------------- data loss: export
def test_export_never_replaces_a_good_file_with_a_bad_one(seed_model: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from spleenkit import export

    out = tmp_path / "model.ts"
    export.export_model(seed_model, out, check=False)
    good = out.read_bytes()
    state = torch.load(seed_model, weights_only=True)
    next(iter(v for v in state.values() if v.is_floating_point())).fill_(float("nan"))
    broken = atomic_save(state, tmp_path / "diverged.pt")
    assert main(["export", "--model", str(broken), "--out", str(out)]) == 2
    assert "weights hold NaN or infinity" in error_of(capsys)
    assert out.read_bytes() == good
    # an export that differs from the eager model is checked before the rename, so the old file stays
    monkeypatch.setattr(export, "parity", lambda network, path, **kwargs: 1.0)
    with pytest.raises(Exception, match="differs from the eager model by 1.00e\\+00.*nothing was replaced"):
        export.export_model(seed_model, out)
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverged.pt", "model.ts"]  # no temporary left


def test_export_out_under_an_existing_file_is_one_line(seed_model: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("occupied")
    assert main(["export", "--model", str(seed_model), "--out", str(blocker / "model.ts"), "--no-check"]) == 2
    line = error_of(capsys)
    assert "a-file" in line and "cannot write here" in line
    assert blocker.read_text() == "occupied"


def test_a_model_with_broken_weights_never_replaces_a_good_one(tiny_model: Path, tmp_path: Path) -> None:
    from spleenkit.model import check_saved_weights

    good = tmp_path / "model.pt"
    good.write_bytes(tiny_model.read_bytes())
    state = torch.load(tiny_model, weights_only=True)
    next(iter(v for v in state.values() if v.is_floating_point())).fill_(float("nan"))
    with pytest.raises(BadInputError, match="refusing to save weights holding NaN or infinity"):
        atomic_save(state, good, check=check_saved_weights)
    assert good.read_bytes() == tiny_model.read_bytes() and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


# --------------------------------------------------------------------------- files get normal permissions
def test_masks_overlays_manifests_and_exports_get_the_umask_permissions(tiny_model: Path, tmp_path: Path) -> None:
    from spleenkit.export import export_model
    from spleenkit.inference import infer

    previous = os.umask(0o022)
    try:
        result = infer(tiny_model, ct_like(tmp_path / "ct.nii.gz"), tmp_path / "out", amp=False)
        exported = Path(export_model(tiny_model, tmp_path / "model.ts", preset=TINY, check=False)["torchscript"])
    finally:
        os.umask(previous)
    case = result.cases[0]
    for path in (Path(case.mask), Path(case.overlay), result.manifest_path, exported):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# --------------------------------------------------------------------------- one writer
# single files are renamed into place only by spleenkit/io.py; these renames move folders or a verified download
ALLOWED_RENAMES = {
    ("spleenkit/data/download.py", "download_file"),  # the checksum-verified .part file of a resumable download
    ("spleenkit/data/download.py", "_swap_into_place"),  # the extracted dataset folder (staging)
    ("spleenkit/data/synthetic.py", "_move_into_place"),  # the generated dataset folder (staging)
}


def test_only_the_io_module_renames_single_files_into_place() -> None:
    found = set()
    for path in sorted((REPO / "spleenkit").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative == "spleenkit/io.py":
            continue
        tree_ = ast.parse(path.read_text())
        for function in ast.walk(tree_):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in {"replace", "rename"} and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "os"):
                    found.add((relative, function.name))
    assert found <= ALLOWED_RENAMES, sorted(found - ALLOWED_RENAMES)
    others = [p for p in (REPO / "spleenkit").rglob("*.py") if p.name != "io.py"]
    assert not [p.name for p in others if "mkstemp(" in p.read_text()]  # no hand-made temporary files either


# --------------------------------------------------------------------------- data loss: run-folder lock
def test_a_second_run_into_a_locked_folder_stops_naming_the_holder(synthetic_dataset: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from spleenkit.training import train

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"the first run's live model")
    before = tree(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BadInputError, match=f"another run is writing this folder \\(pid {holder.pid} on host"):
            train(synthetic_dataset, run, "quick", epochs=1, **TRAIN)
        assert main(["train", "--data", str(synthetic_dataset), "--out", str(run), "--preset", "quick"]) == 2
        assert f"pid {holder.pid}" in error_of(capsys)
        assert {k: v for k, v in tree(run).items() if k != "run.lock"} == before  # nothing moved aside or written
        assert not list(run.glob("previous-*"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)


def test_a_stale_lock_of_a_dead_run_is_taken_over_with_a_warning(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from spleenkit.runs import LOCK_NAME, RunLock, read_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "this-host", "started": "earlier"}))
    with caplog.at_level("WARNING", logger="spleenkit.runs"), RunLock(tmp_path):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert f"stale lock left by a run that ended without releasing it (pid {dead.pid}" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists() and read_lock(tmp_path) is None


# --------------------------------------------------------------------------- silently wrong: training
@pytest.fixture(scope="module")
def one_epoch_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spleenkit.training import train

    return train(synthetic_dataset, tmp_path_factory.mktemp("trained") / "run", "quick", epochs=1, **TRAIN).run_dir


def test_resume_with_another_recipe_is_refused_listing_the_differences(one_epoch_run: Path, synthetic_dataset: Path,
                                                                        tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from spleenkit.training import train

    run = Path(shutil.copytree(one_epoch_run, tmp_path / "run"))
    before = tree(run)
    other = {**TRAIN, "spacing": (5.0, 5.0, 5.0)}
    with pytest.raises(BadInputError, match="cannot resume: this run was trained with another recipe") as caught:
        train(synthetic_dataset, run, "fast", epochs=2, resume=True, **other)
    message = str(caught.value)
    assert "name: 'quick' -> 'fast'" in message and "spacing: [6.0, 6.0, 6.0] -> [5.0, 5.0, 5.0]" in message
    assert tree(run) == before  # the manifest still names the run's own recipe
    code = main(["train", "--data", str(synthetic_dataset), "--out", str(run), "--preset", "seed", "--resume",
                 "--epochs", "2", "--patch", "48", "--workers", "1", "--no-progress", "--set", "validation_cases=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "name: 'quick' -> 'seed'" in err and "--resume-anyway" in err
    assert tree(run) == before
    # a user who means it: accepted and recorded
    result = train(synthetic_dataset, run, "quick", epochs=2, resume=True, resume_anyway=True,
                   **{**TRAIN, "learning_rate": 5e-4})
    assert result.resumed_from_epoch == 1 and result.epochs == 2
    manifest = read_manifest(run)
    assert manifest["parameters"]["resume_anyway"] is True
    assert manifest["recipe_changes_on_resume"] == ["learning_rate: 0.001 -> 0.0005"]


def test_a_run_recorded_before_a_recipe_setting_existed_resumes(one_epoch_run: Path, synthetic_dataset: Path,
                                                                  tmp_path: Path) -> None:
    import json
    import shutil

    from spleenkit.training import train

    run = Path(shutil.copytree(one_epoch_run, tmp_path / "run"))
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["parameters"]["preset"]["include_background"]  # as a run of an earlier version records it
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = train(synthetic_dataset, run, "quick", epochs=2, resume=True, **TRAIN)
    assert result.resumed_from_epoch == 1 and result.epochs == 2
    assert read_manifest(run).get("recipe_changes_on_resume", []) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_a_learning_rate_that_is_not_a_finite_positive_number_is_refused_up_front(
        value: str, synthetic_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "runs" / "lr"
    assert main(["train", "--data", str(synthetic_dataset), "--out", str(run), "--lr", value]) == 2
    line = error_of(capsys)
    assert line == (f"spleenkit: error: learning_rate={float(value)!r}: expected a number above 0 and at most 1; the "
                    "bundle uses 1e-4"), line
    assert not (tmp_path / "runs").exists()  # no empty run folder left


def test_patch_beyond_the_bound_or_the_memory_is_refused_before_anything_heavy(
        synthetic_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from spleenkit import devices, environment

    probed: list[object] = []
    monkeypatch.setattr(devices, "bf16_weight_gradient_ok", lambda shape: probed.append(shape) or True)
    started = time.perf_counter()
    assert main(["train", "--data", str(synthetic_dataset), "--out", str(tmp_path / "big"), "--patch", "1000"]) == 2
    assert "patch_size=1000: expected 3 whole numbers from 16 to 512" in error_of(capsys)
    # within the bound but beyond this machine's memory (pretend it has 2 GiB)
    monkeypatch.setattr(environment, "total_memory_gib", lambda: 2.0)
    assert main(["train", "--data", str(synthetic_dataset), "--out", str(tmp_path / "big"), "--patch", "256"]) == 2
    line = error_of(capsys)
    assert "needs about" in line and "more than this machine's memory (2.0 GiB)" in line
    assert time.perf_counter() - started < 20 and probed == []  # no gradient probe, no cache, no network
    assert not (tmp_path / "big").exists()


def test_a_cache_beyond_memory_is_refused_with_a_suggested_rate(synthetic_dataset: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from spleenkit import environment
    from spleenkit.training import train

    monkeypatch.setattr(environment, "total_memory_gib", lambda: 0.001)
    monkeypatch.setattr("spleenkit.training.run.check_step_fits", lambda preset, device: None)
    monkeypatch.setattr("spleenkit.images.READ_MEMORY_SHARE", float("inf"))  # reading one case alone still fits
    with pytest.raises(BadInputError, match=r"the cache cannot fit: caching .* GiB of 0\.0 GiB.*--cache-rate 0\.\d+"):
        train(synthetic_dataset, tmp_path / "run", "quick", epochs=1, **TRAIN)
    assert not (tmp_path / "run").exists()


def test_training_stops_at_the_first_nan_loss_keeping_the_last_good_checkpoint(
        synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spleenkit import training
    from spleenkit.errors import NonFiniteTrainingError
    from spleenkit.runs import CHECKPOINT_NAME, read_metrics
    from spleenkit.training import engines, read_last_checkpoint

    real = engines.make_loss
    calls = {"n": 0}

    def failing_loss(preset: object) -> object:
        loss = real(preset)

        def call(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            value = loss(pred, target)
            return value * float("nan") if calls["n"] == 3 else value  # epoch 2's first iteration
        return call

    monkeypatch.setattr(engines, "make_loss", failing_loss)  # what build_trainer calls
    run = tmp_path / "run"
    with pytest.raises(NonFiniteTrainingError, match=r"training stopped: the loss is nan at epoch 2, iteration 3; "
                                                     r".*checkpoint_last.pt \(epoch 1\) and model.pt are kept"):
        training.train(synthetic_dataset, run, "quick", epochs=3, **TRAIN)
    assert read_last_checkpoint(run / CHECKPOINT_NAME)["epoch"] == 1
    assert [r["epoch"] for r in read_metrics(run)] == [1]
    model = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())
    manifest = read_manifest(run)
    assert "the loss is nan at epoch 2" in manifest["error"] and "result" not in manifest
    assert not (run / "run.lock").exists()


def test_non_finite_weights_stop_training_before_validation_and_the_checkpoint() -> None:
    from spleenkit.errors import NonFiniteTrainingError
    from spleenkit.training import StopOnNonFinite

    network = build_unet(TINY)
    with torch.no_grad():
        next(network.parameters()).fill_(float("inf"))
    engine = SimpleNamespace(network=network, state=SimpleNamespace(epoch=4, iteration=40),
                             optimizer=SimpleNamespace(param_groups=[{"lr": 10.0}]))
    with pytest.raises(NonFiniteTrainingError, match=r"weight tensor\(s\) hold NaN or infinity .* at epoch 4, "
                                                     r"iteration 40.*epoch 3\) and model.pt are kept"):
        StopOnNonFinite(Path("run")).check_weights(engine)


def test_the_best_model_is_never_replaced_by_broken_weights(tiny_model: Path, tmp_path: Path) -> None:
    from spleenkit.errors import NonFiniteTrainingError
    from spleenkit.training import ValidateAndKeepBest

    network = build_unet(TINY)
    with torch.no_grad():
        next(network.parameters()).fill_(float("nan"))
    model = tmp_path / "model.pt"
    model.write_bytes(tiny_model.read_bytes())
    evaluator = SimpleNamespace(run=lambda epoch: None, state=SimpleNamespace(metrics={"val_mean_dice": 0.9}))
    engine = SimpleNamespace(network=network, state=SimpleNamespace(epoch=2, max_epochs=2, best_metric=0.1,
                                                                    best_metric_epoch=1))
    with pytest.raises(NonFiniteTrainingError, match="refusing to replace .*model.pt: the weights hold NaN"):
        ValidateAndKeepBest(evaluator, 1, model)(engine)
    assert model.read_bytes() == tiny_model.read_bytes()


def test_inference_with_nan_weights_refuses_to_write_empty_masks(tiny_model: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.load(tiny_model, weights_only=True)
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
    (tmp_path / "run").mkdir()
    broken = atomic_save(state, tmp_path / "run" / "model.pt")
    write_manifest(tmp_path / "run", build_manifest({"preset": TINY.to_dict()}))
    image = ct_like(tmp_path / "ct.nii.gz")
    assert main(["infer", "--model", str(broken), "--input", str(image), "--out", str(tmp_path / "out")]) == 2
    assert "weights hold NaN or infinity" in error_of(capsys)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- silently wrong: inference inputs
def _bad_images(folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    nan = folder / "all_nan.nii.gz"
    nib.Nifti1Image(np.full((48, 48, 12), np.nan, np.float32), np.diag([5.0, 5.0, 5.0, 1.0])).to_filename(nan)
    zero = ct_like(folder / "zero_voxel.nii.gz")
    header_zero = nib.load(zero)
    image = nib.Nifti1Image(np.asarray(header_zero.dataobj), None)  # no sform: the pixdim is all there is
    image.header["pixdim"][1:4] = [0.0, 5.0, 5.0]
    image.to_filename(zero)
    tiny = folder / "five.nii.gz"
    nib.Nifti1Image(np.full((5, 5, 5), 40, np.int16), np.eye(4)).to_filename(tiny)
    singular = with_singular_affine(ct_like(folder / "singular.nii.gz"))
    return {
        "all_nan": (nan, "holds 27648 NaN or infinite voxel(s)"),
        "zero_voxel": (zero, "voxel size (pixdim) is 0 x 5 x 5 mm, outside 0.05..30 mm"),
        "five": (tiny, "covers only 5 x 5 x 5 mm, less than one sliding window"),
        "singular": (singular, "affine (the voxel-to-millimetre matrix) is singular"),
    }


def test_infer_refuses_what_data_check_rejects_with_the_same_words(tiny_model: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from spleenkit.data.checks import check_dataset

    cases = _bad_images(tmp_path / "dataset" / "imagesTs")
    (tmp_path / "dataset" / "dataset.json").write_text(json.dumps({
        "training": [], "test": [f"./imagesTs/{path.name}" for path, _ in cases.values()]}))
    report = check_dataset(tmp_path / "dataset")
    for name, (path, message) in cases.items():
        assert any(p.path == str(path) and message in p.message for p in report.problems), (name, report.problems)
        assert main(["infer", "--model", str(tiny_model), "--input", str(path), "--out", str(tmp_path / "out")]) == 2
        line = error_of(capsys)
        assert message in line and path.name in line, line
    assert main(["data", "check", str(tmp_path / "dataset")]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_image_that_is_not_ct_needs_force_and_is_recorded(tiny_model: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    mr = tmp_path / "mr.nii.gz"
    volume = np.asarray(nib.load(ct_like(tmp_path / "ct.nii.gz")).dataobj).astype(np.float32) + 1000  # 0..1120
    nib.Nifti1Image(volume, np.diag([5.0, 5.0, 5.0, 1.0])).to_filename(mr)
    out = tmp_path / "out"
    assert main(["infer", "--model", str(tiny_model), "--input", str(mr), "--out", str(out), "--no-overlay"]) == 2
    line = error_of(capsys)
    assert "do not look like CT in Hounsfield units" in line and "--force" in line and "mr.nii.gz" in line
    assert not out.exists()
    assert main(["infer", "--model", str(tiny_model), "--input", str(mr), "--out", str(out), "--no-overlay",
                 "--force", "--no-amp"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["force"] is True
    assert any("do not look like CT" in w for w in manifest["cases"][0]["warnings"])


def test_truncated_nifti_in_infer_is_explained_not_a_transform_repr(tiny_model: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = ct_like(tmp_path / "cut.nii.gz", shape=(96, 96, 40))
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    assert main(["infer", "--model", str(tiny_model), "--input", str(path), "--out", str(tmp_path / "out")]) == 2
    line = error_of(capsys)
    assert "cut.nii.gz: truncated or corrupt" in line and "applying transform" not in line and "object at" not in line


def test_preprocessing_failures_name_the_real_cause() -> None:
    from spleenkit.predict import _preprocessing_error

    try:
        try:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        except EOFError as inner:
            raise RuntimeError("applying transform <monai.transforms.io.dictionary.LoadImaged object at 0x7f>") \
                from inner
    except RuntimeError as error:
        assert _preprocessing_error(error) == "EOFError: Compressed file ended before the end-of-stream marker " \
                                              "was reached"


def test_a_folder_with_nifti_files_and_a_dicom_series_processes_both_and_names_what_it_skipped(
        tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from spleenkit.images import scan_inputs
    from spleenkit.inference import infer

    folder = tmp_path / "inputs"
    folder.mkdir()
    ct_like(folder / "scan.nii.gz")
    volume = np.asarray(nib.load(folder / "scan.nii.gz").dataobj)
    write_dicom_series(folder / "series", volume, np.diag([5.0, 5.0, 5.0, 1.0]))
    (folder / "notes.txt").write_text("a note")
    (folder / "empty").mkdir()
    volumes, skipped = scan_inputs(folder)
    assert [(v.name, v.kind) for v in volumes] == [("scan", "nifti"), ("series", "dicom")]
    assert skipped == ["notes.txt (not a NIfTI or DICOM file)", "empty/ (a folder without DICOM files)"]
    with caplog.at_level("WARNING", logger="spleenkit.inference"):
        result = infer(tiny_model, folder, tmp_path / "out", amp=False, overlay=False)
    assert [c.name for c in result.cases] == ["scan", "series"]
    assert "skipped notes.txt (not a NIfTI or DICOM file)" in caplog.text
    assert read_manifest(tmp_path / "out")["skipped"] == skipped


def test_an_interrupted_infer_keeps_its_masks_and_writes_a_manifest_for_them(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spleenkit import inference

    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("a", "b", "c"):
        ct_like(folder / f"{name}.nii.gz")
    real = inference._infer_one

    def stop_at_b(volume: inference.InputVolume, *args: object) -> inference.CaseOutput:
        if volume.name == "b":
            raise KeyboardInterrupt
        return real(volume, *args)

    monkeypatch.setattr(inference, "_infer_one", stop_at_b)
    with pytest.raises(KeyboardInterrupt):
        inference.infer(tiny_model, folder, tmp_path / "out", amp=False, overlay=False)
    manifest = read_manifest(tmp_path / "out")
    assert [c["name"] for c in manifest["cases"]] == ["a"] and Path(manifest["cases"][0]["mask"]).is_file()
    assert manifest["stopped"] == "interrupted" and manifest["not_done"] == ["b", "c"] and manifest["finished"] is None


# --------------------------------------------------------------------------- tracebacks become one line
def test_model_pointing_at_a_text_file_is_one_line_everywhere(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "model.pt"
    text.write_text("these are not weights\n" * 20)
    image = ct_like(tmp_path / "ct.nii.gz")
    for command in (["infer", "--model", str(text), "--input", str(image), "--out", str(tmp_path / "out")],
                    ["pretrained", "load", str(text)],
                    ["export", "--model", str(text), "--out", str(tmp_path / "model.ts")]):
        assert main(command) == 2, command
        line = error_of(capsys)
        assert f"{text}: not a PyTorch checkpoint" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "model.pt"]


def test_data_check_on_a_singular_affine_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "dataset" / "imagesTr"
    images.mkdir(parents=True)
    labels = tmp_path / "dataset" / "labelsTr"
    labels.mkdir()
    with_singular_affine(ct_like(images / "a.nii.gz"))
    label = nib.load(images / "a.nii.gz")
    nib.Nifti1Image(np.zeros(label.shape, np.uint8), None, label.header).to_filename(labels / "a.nii.gz")
    (tmp_path / "dataset" / "dataset.json").write_text(json.dumps({
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}], "test": []}))
    assert main(["data", "check", str(tmp_path / "dataset")]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "singular" in captured.err and "imagesTr/a.nii.gz" in captured.err


# --------------------------------------------------------------------------- dataset.json
@pytest.mark.parametrize("entry", ["../outside.nii.gz", "./imagesTr/../../outside.nii.gz", "/etc/outside.nii.gz"])
def test_dataset_json_paths_must_stay_inside_the_dataset(synthetic_dataset: Path, tmp_path: Path, entry: str) -> None:
    import shutil

    from spleenkit.data.checks import check_dataset
    from spleenkit.data.datalist import load_datalist

    dataset = Path(shutil.copytree(synthetic_dataset, tmp_path / "data"))
    ct_like(tmp_path / "outside.nii.gz")
    description = json.loads((dataset / "dataset.json").read_text())
    description["training"][0]["image"] = entry
    (dataset / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(BadInputError, match="lies outside the dataset folder"):
        load_datalist(dataset)
    report = check_dataset(dataset)
    assert [p.message for p in report.problems if "outside the dataset folder" in p.message], report.problems


def test_a_dicom_folder_in_dataset_json_is_read_not_called_missing(tmp_path: Path) -> None:
    from spleenkit.data.checks import check_dataset
    from spleenkit.data.datalist import load_datalist

    dataset = tmp_path / "dataset"
    volume = np.asarray(nib.load(ct_like(tmp_path / "ct.nii.gz")).dataobj)
    write_dicom_series(dataset / "imagesTs" / "case_1", volume, np.diag([5.0, 5.0, 5.0, 1.0]))
    (dataset / "dataset.json").write_text(json.dumps({"training": [], "test": ["./imagesTs/case_1"]}))
    report = check_dataset(dataset)
    assert report.ok, report.problems
    assert report.cases[0].shape == (48, 48, 12) and report.cases[0].hu_min == -1000
    (dataset / "dataset.json").write_text(json.dumps({"training": ["./imagesTs/case_1"], "test": []}))
    with pytest.raises(BadInputError, match="is a folder \\(a DICOM series\\?\\)"):
        load_datalist(dataset)


# --------------------------------------------------------------------------- --set, one parser
def test_one_set_parser_for_every_command() -> None:
    """``--set`` hands its text on; one rule reads text values (a recipe setting reads its own kind, the door's
    tests in test_presets.py), the same for notebook parameters and bundle overrides."""
    from spleenkit.presets import parse_value

    assert parse_setting("spacing=2,2,2") == ("spacing", "2,2,2")
    assert parse_setting(" train#trainer#max_epochs = 2 ") == ("train#trainer#max_epochs", "2")
    assert parse_value("2,2,2") == [2, 2, 2]
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3
    assert parse_value("false") is False and parse_value("no") is False and parse_value("on") is True
    assert parse_value("none") is None and parse_value("null") is None
    assert parse_value("../data/synthetic") == "../data/synthetic"
    assert parse_value("[1, 2]") == [1, 2] and parse_value('"3"') == "3"
    with pytest.raises(BadInputError, match="--set takes NAME=VALUE"):
        parse_setting("spacing")
    cli = (REPO / "spleenkit" / "cli.py").read_text()
    assert cli.count("parse_setting(") == 2  # its definition and _settings, which every --set goes through
    assert cli.count("_settings(args.set)") == 5  # notebooks run, bundle command and run, train, course check


def test_notebooks_run_refuses_a_name_no_notebook_declares(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "executed"
    assert main(["notebooks", "run", "--only", "01", "--out", str(out), "--set", "data_dri=elsewhere"]) == 2
    line = error_of(capsys)
    assert "--set data_dri: no notebook to run declares a parameter 'data_dri'; did you mean data_dir?" in line
    assert not out.exists()


# --------------------------------------------------------------------------- failed runs leave no empty folders
def test_failed_runs_leave_no_empty_output_folders(tmp_path: Path, tiny_model: Path) -> None:
    from spleenkit.inference import infer
    from spleenkit.training import train

    with pytest.raises(BadInputError, match="dataset folder not found"):
        train(tmp_path / "nowhere", tmp_path / "runs" / "deep" / "run", "quick", epochs=1, **TRAIN)
    assert not (tmp_path / "runs").exists()
    image = ct_like(tmp_path / "ct.nii.gz")
    with pytest.raises(BadInputError, match="checkpoint not found"):
        infer(tmp_path / "missing.pt", image, tmp_path / "masks" / "out")
    assert not (tmp_path / "masks").exists()


def test_a_patch_leaving_one_voxel_for_instance_norm_is_refused_by_name() -> None:
    """16^3 leaves the UNet's deepest level 1 voxel: instance norm (the quick recipe's) cannot train there, so the
    kit says so before any data is read; batch norm or one 32-voxel side is fine."""
    from spleenkit.presets import resolve_preset

    with pytest.raises(BadInputError, match=r"patch_size=16,16,16: leaves 1 voxel .*instance norm"):
        resolve_preset("quick", patch_size=16)
    assert resolve_preset("quick", patch_size=16, norm="batch").patch_size == (16, 16, 16)
    assert resolve_preset("quick", patch_size=(32, 16, 16)).patch_size == (32, 16, 16)

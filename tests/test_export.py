"""Export: TorchScript (the kit's and the bundle's ckpt_export) and ONNX give the eager model's output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spleenkit.bundle import bundle_source
from spleenkit.cli import main
from spleenkit.errors import BadInputError
from spleenkit.export import TOLERANCE, export_model, load_exported, parity, run_exported
from spleenkit.model import atomic_save, build_unet, load_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model.pt of the kit's UNet with random weights and non-trivial batch-norm statistics."""
    torch.manual_seed(1)
    network = build_unet("seed")
    network.train()
    with torch.no_grad():  # a few forward passes so the running mean/var differ from their initial values
        for _ in range(2):
            network(torch.rand(2, 1, 32, 32, 32))
    return atomic_save(network.state_dict(), tmp_path_factory.mktemp("export") / "model.pt")


def test_torchscript_matches_eager_and_carries_metadata(model_file: Path, tmp_path: Path) -> None:
    metadata = bundle_source() / "configs" / "metadata.json"
    summary = export_model(model_file, tmp_path / "model.ts", metadata_file=metadata)
    assert summary["torchscript_max_abs_difference"] <= TOLERANCE == 1e-4
    module, stored = load_exported(tmp_path / "model.ts")
    assert stored["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "spleen"}
    # another shape than the one checked during export, batch of two
    image = torch.rand(2, 1, 48, 32, 64)
    with torch.no_grad():
        expected = load_model(model_file)(image)
    assert float((torch.from_numpy(run_exported(tmp_path / "model.ts", image)) - expected).abs().max()) <= TOLERANCE


def test_onnx_matches_eager(model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--model", str(model_file), "--out", str(tmp_path / "model.ts"), "--onnx"]) == 0
    out = capsys.readouterr().out
    assert "torchscript:" in out and "onnx:" in out and "tolerance 1e-04" in out
    network = load_model(model_file)
    assert parity(network, tmp_path / "model.onnx", sample_shape=(2, 1, 32, 48, 64), seed=3) <= TOLERANCE


def test_export_refuses_broken_weights(model_file: Path, tmp_path: Path) -> None:
    from spleenkit.errors import SpleenkitError
    from spleenkit.model import load_checkpoint

    state = load_checkpoint(model_file)
    state["model.1.submodule.0.conv.unit0.conv.weight"][0, 0, 0, 0, 0] = float("nan")  # as a diverged training leaves
    broken = atomic_save(state, tmp_path / "broken.pt")
    good = export_model(model_file, tmp_path / "model.ts", check=False)["torchscript"]
    before = Path(good).read_bytes()
    with pytest.raises(SpleenkitError, match="weights hold NaN or infinity"):
        export_model(broken, tmp_path / "model.ts")
    assert Path(good).read_bytes() == before  # the earlier export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt", "model.ts"]


def test_export_refuses_another_architecture(tmp_path: Path) -> None:
    small = build_unet("seed").__class__(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16, 32, 64),
                                         strides=(2, 2, 2, 2), num_res_units=1)
    path = atomic_save(small.state_dict(), tmp_path / "model.pt")
    with pytest.raises(BadInputError, match="another architecture"):
        export_model(path, tmp_path / "model.ts")
    assert not (tmp_path / "model.ts").exists()


@pytest.mark.slow
def test_bundle_ckpt_export_matches_eager(model_file: Path, tmp_path: Path) -> None:
    """The seed's export command, run from the bundle folder, scripts the kit's network with the weights."""
    out = tmp_path / "model.ts"
    command = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(out),
               "--ckpt_file", str(model_file), "--meta_file", "configs/metadata.json",
               "--config_file", "configs/inference.json"]
    result = subprocess.run(command, cwd=bundle_source(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    module, metadata = load_exported(out)
    assert metadata["version"] == json.loads((bundle_source() / "configs" / "metadata.json").read_text())["version"]
    assert parity(load_model(model_file), out) <= TOLERANCE

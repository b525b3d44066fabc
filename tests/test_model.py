"""The bundle's UNet: parameter count, state-dict keys, and safe saving and loading of weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from spleenkit.errors import BadInputError
from spleenkit.model import (
    BUNDLE_PARAMETER_COUNT,
    atomic_save,
    build_unet,
    count_parameters,
    load_checkpoint,
    load_model,
    load_weights,
)

# network_def of the bundle's train.json (Project-MONAI/model-zoo, models/spleen_ct_segmentation).
BUNDLE_NETWORK_DEF = {
    "_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
    "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch",
}


@pytest.fixture(scope="module")
def bundle_network() -> torch.nn.Module:
    from monai.bundle import ConfigParser

    return ConfigParser({"network_def": BUNDLE_NETWORK_DEF}).get_parsed_content("network_def")


def test_parameter_count_is_the_bundles() -> None:
    assert count_parameters(build_unet("seed")) == BUNDLE_PARAMETER_COUNT == 4_808_917


def test_state_dict_keys_and_shapes_match_the_bundle_network(bundle_network: torch.nn.Module) -> None:
    ours = build_unet("seed").state_dict()
    theirs = bundle_network.state_dict()
    assert list(ours) == list(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert count_parameters(bundle_network) == BUNDLE_PARAMETER_COUNT


def test_every_preset_builds_the_same_network() -> None:
    """The bundle's network in every recipe; the quick one normalises per patch (instance norm, no weights of its
    own), so it has the same convolutions and none of the batch norms' weights and statistics."""
    from spleenkit.presets import PRESETS

    keys = list(build_unet("seed").state_dict())
    for name, preset in PRESETS.items():
        if preset.norm == "batch":
            assert list(build_unet(name).state_dict()) == keys, name
    assert PRESETS["quick"].norm == "instance"
    convolutions = [key for key in keys if ".adn.N." not in key]
    assert list(build_unet("quick").state_dict()) == convolutions


def test_bundle_weights_load_strictly_and_predict(tmp_path: Path, bundle_network: torch.nn.Module) -> None:
    path = atomic_save(bundle_network.state_dict(), tmp_path / "model.pt")
    model = load_model(path, "seed")
    assert not model.training
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 32, 32, 32))
    assert tuple(out.shape) == (1, 2, 32, 32, 32)


def test_wrong_architecture_is_named(tmp_path: Path) -> None:
    from spleenkit.presets import get_preset

    smaller = build_unet(get_preset("seed", channels=(8, 16, 32, 64, 128)))
    path = atomic_save(smaller.state_dict(), tmp_path / "small.pt")
    with pytest.raises(BadInputError, match="shape mismatch"):
        load_weights(build_unet("seed"), path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = atomic_save(build_unet("seed").state_dict(), tmp_path / "model.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError, match="corrupt or truncated") as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)


def test_failing_save_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = atomic_save({"weights": torch.ones(3)}, tmp_path / "checkpoint.pt")
    before = path.read_bytes()

    def broken_save(obj: object, stream: object, *args: object, **kwargs: object) -> None:
        stream.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(BadInputError, match="checkpoint.pt: cannot write \\(no space left on the device\\)") as caught:
        atomic_save({"weights": torch.zeros(3)}, path)
    assert isinstance(caught.value.__cause__, OSError)  # one line for the user, the cause kept
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left
    assert torch.equal(load_checkpoint(path)["weights"], torch.ones(3))


def test_saved_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = atomic_save({"x": torch.ones(1)}, tmp_path / "model.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_unsafe_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Path("x")}, path)  # a pickled object that is not plain data
    with pytest.raises(BadInputError, match="refusing to load"):
        load_checkpoint(path)

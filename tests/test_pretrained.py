"""Official weights: strict loading of bundle-format checkpoints, refusals, and fetching (from 127.0.0.1 only)."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from spleenkit.cli import main
from spleenkit.errors import BadInputError
from spleenkit.model import BUNDLE_PARAMETER_COUNT, build_unet
from spleenkit.pretrained import (
    BUNDLE_NAME,
    PretrainedUnavailableError,
    fetch_pretrained,
    find_weights,
    load_pretrained,
)

FIXTURES = Path(__file__).parent / "fixtures"


def official_network() -> torch.nn.Module:
    """The network the released bundle defines: its JSON ``network_def`` parsed by MONAI's ConfigParser."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(json.loads((FIXTURES / "official_network_def.json").read_text()))
    return parser.get_parsed_content("network_def")


def write_bundle(root: Path, state: dict) -> Path:
    """A folder laid out like the released bundle, holding ``state`` as models/model.pt."""
    bundle = root / BUNDLE_NAME
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.5.9"}))
    torch.save(state, bundle / "models" / "model.pt")
    return bundle


class Payload:
    """Not a tensor: a checkpoint holding this must be refused by weights_only loading."""

    def __init__(self) -> None:
        self.command = "anything at all"


def test_official_checkpoint_loads_strictly_and_computes_the_same(tmp_path: Path) -> None:
    torch.manual_seed(0)
    official = official_network().eval()
    bundle = write_bundle(tmp_path, official.state_dict())
    network, info = load_pretrained(bundle)
    assert info.parameters == BUNDLE_PARAMETER_COUNT == 4_808_917
    assert info.weights == bundle / "models" / "model.pt"
    image = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(network(image), official(image))


def test_cli_load_reports_the_parameter_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_bundle(tmp_path, official_network().state_dict())
    assert main(["pretrained", "load", str(tmp_path)]) == 0  # the folder holding the bundle is found too
    assert "4,808,917 parameters" in capsys.readouterr().out


def test_checkpoint_of_another_architecture_lists_the_keys(tmp_path: Path) -> None:
    from monai.networks.nets import BasicUNet

    other = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 16, 32, 4))
    bundle = write_bundle(tmp_path, other.state_dict())
    with pytest.raises(BadInputError) as caught:
        load_pretrained(bundle)
    message = str(caught.value)
    assert "another architecture" in message and "missing keys: model.0.conv" in message
    assert "unexpected keys: conv_0" in message and str(bundle / "models" / "model.pt") in message


def test_checkpoint_with_other_channels_reports_shapes(tmp_path: Path) -> None:
    narrower = build_unet("seed").__class__(spatial_dims=3, in_channels=1, out_channels=2,
                                           channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2),
                                           num_res_units=2, norm="batch")
    with pytest.raises(BadInputError, match="shape mismatch"):
        load_pretrained(write_bundle(tmp_path, narrower.state_dict()))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    state = dict(official_network().state_dict())
    state["extra"] = Payload()
    with pytest.raises(BadInputError, match="refusing to load"):
        load_pretrained(write_bundle(tmp_path, state))


def test_missing_weights_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(BadInputError) as caught:
        find_weights(tmp_path)
    assert "spleenkit pretrained fetch" in str(caught.value)
    assert "python -m monai.bundle download --name spleen_ct_segmentation" in str(caught.value)


@pytest.fixture
def bundle_server(tmp_path: Path):
    """An HTTP server on 127.0.0.1 serving a zip of a bundle-format folder, as the model zoo releases it."""
    source = tmp_path / "source"
    write_bundle(source, official_network().state_dict())
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / f"{BUNDLE_NAME}_v0.5.9.zip", "w") as archive:
        for path in sorted((source / BUNDLE_NAME).rglob("*")):
            archive.write(path, path.relative_to(source).as_posix())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{BUNDLE_NAME}_v0.5.9.zip"
    server.shutdown()
    server.server_close()


def test_fetch_downloads_and_extracts_the_bundle(tmp_path: Path, bundle_server: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "pretrained"
    assert main(["pretrained", "fetch", "--dir", str(target), "--url", bundle_server]) == 0
    weights = target / BUNDLE_NAME / "models" / "model.pt"
    assert f"official weights: {weights}" in capsys.readouterr().out
    _, info = load_pretrained(target)
    assert info.parameters == BUNDLE_PARAMETER_COUNT
    # a second fetch finds the weights and downloads nothing (no server address needed)
    assert fetch_pretrained(target, url="http://127.0.0.1:9/unused.zip") == target / BUNDLE_NAME


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_fetch_offline_explains_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{unused_port()}/{BUNDLE_NAME}_v0.5.9.zip"
    with pytest.raises(PretrainedUnavailableError):
        fetch_pretrained(tmp_path, url=url)
    assert main(["pretrained", "fetch", "--dir", str(tmp_path), "--url", url]) == 2
    message = capsys.readouterr().err
    assert "could not download the official spleen_ct_segmentation weights" in message
    assert "python -m monai.bundle download --name spleen_ct_segmentation --version 0.5.9" in message
    assert str(tmp_path / BUNDLE_NAME / "models" / "model.pt") in message
    assert not (tmp_path / BUNDLE_NAME).exists()

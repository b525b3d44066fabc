"""The transform chains: parity with the spleen_ct_segmentation bundle, and what they do to a case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import describe

from spleenkit.presets import get_preset
from spleenkit.transforms import (
    deterministic_transforms,
    inference_transforms,
    random_transforms,
    training_transforms,
    validation_transforms,
)

# The bundle's train.json (Project-MONAI/model-zoo, models/spleen_ct_segmentation/configs/train.json),
# sections train#deterministic_transforms and train#random_transforms, value for value.
BUNDLE_TRAIN = {
    "deterministic_transforms": [
        {"_target_": "LoadImaged", "keys": ["image", "label"]},
        {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"]},
        {"_target_": "Orientationd", "keys": ["image", "label"], "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [1.5, 1.5, 2.0],
         "mode": ["bilinear", "nearest"]},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0, "b_max": 1,
         "clip": True},
        {"_target_": "EnsureTyped", "keys": ["image", "label"]},
    ],
    "random_transforms": [
        {"_target_": "RandCropByPosNegLabeld", "keys": ["image", "label"], "label_key": "label",
         "spatial_size": [96, 96, 96], "pos": 1, "neg": 1, "num_samples": 4, "image_key": "image",
         "image_threshold": 0},
    ],
}


@pytest.fixture(scope="module")
def bundle_chain() -> list:
    from monai.bundle import ConfigParser

    parser = ConfigParser(BUNDLE_TRAIN)
    return parser.get_parsed_content("deterministic_transforms") + parser.get_parsed_content("random_transforms")


def test_seed_chain_matches_the_bundle_parameter_for_parameter(bundle_chain: list) -> None:
    ours = deterministic_transforms("seed") + random_transforms(get_preset("seed", pad_to_patch=False))
    assert [type(t).__name__ for t in ours] == [type(t).__name__ for t in bundle_chain]
    for mine, theirs in zip(ours, bundle_chain, strict=True):
        assert describe(mine) == describe(theirs), type(mine).__name__


def test_seed_chain_numbers_spelled_out() -> None:
    chain = deterministic_transforms("seed") + random_transforms(get_preset("seed", pad_to_patch=False))
    orientation, spacing, window, crop = chain[2], chain[3], chain[4], chain[6]
    assert orientation.ornt_transform.axcodes == "RAS"
    assert tuple(spacing.spacing_transform.pixdim) == (1.5, 1.5, 2.0)
    assert [str(m) for m in spacing.mode] == ["bilinear", "nearest"]
    scaler = window.scaler
    assert (scaler.a_min, scaler.a_max, scaler.b_min, scaler.b_max, scaler.clip) == (-57, 164, 0, 1, True)
    assert window.keys == ("image",)
    assert tuple(crop.cropper.spatial_size) == (96, 96, 96)
    assert (crop.cropper.pos_ratio, crop.cropper.num_samples, crop.cropper.image_threshold) == (0.5, 4, 0)
    assert (crop.label_key, crop.image_key) == ("label", "image")


def test_padding_is_the_only_step_added_to_the_bundle(bundle_chain: list) -> None:
    from monai.transforms import SpatialPadd

    chain = deterministic_transforms("seed") + random_transforms("seed")
    assert [type(t).__name__ for t in chain] == (
        [type(t).__name__ for t in bundle_chain[:6]] + ["SpatialPadd", "RandCropByPosNegLabeld"])
    pad = chain[6]
    assert isinstance(pad, SpatialPadd) and tuple(pad.padder.spatial_size) == (96, 96, 96)
    assert describe(chain[7]) == describe(bundle_chain[6])


def test_presets_change_only_their_own_numbers() -> None:
    quick = deterministic_transforms("quick")
    assert tuple(quick[3].spacing_transform.pixdim) == tuple(get_preset("quick").spacing)
    tutorial = [type(t).__name__ for t in deterministic_transforms("tutorial")]  # the tutorial's order
    assert tutorial == ["LoadImaged", "EnsureChannelFirstd", "ScaleIntensityRanged", "CropForegroundd", "Orientationd",
                        "Spacingd"]
    assert [type(t).__name__ for t in random_transforms("tutorial")] == ["RandCropByPosNegLabeld"]  # no padding
    inference = inference_transforms("seed").transforms
    assert [type(t).__name__ for t in inference] == [type(t).__name__ for t in deterministic_transforms("seed")]
    assert all(t.keys == ("image",) for t in inference)


def test_validation_chain_on_a_case(synthetic_dataset) -> None:
    from spleenkit.data.datalist import load_datalist

    case = load_datalist(synthetic_dataset)[0]
    out = validation_transforms("quick")(case)
    image, label = out["image"], out["label"]
    assert image.shape[0] == 1 and image.shape == label.shape
    spacing = np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0))
    np.testing.assert_allclose(spacing, get_preset("quick").spacing, rtol=1e-5)
    assert np.all(np.diag(np.asarray(image.affine))[:3] > 0)  # RAS: every axis increases to R, A, S
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert set(torch.unique(label).tolist()) <= {0.0, 1.0} and float(label.sum()) > 0


def test_training_chain_gives_the_patches(synthetic_dataset) -> None:
    from spleenkit.data.datalist import load_datalist

    preset = get_preset("quick", patch_size=32, num_samples=4)
    case = load_datalist(synthetic_dataset)[0]
    chain = training_transforms(preset)
    chain.set_random_state(seed=0)
    samples = chain(case)
    assert len(samples) == 4
    for sample in samples:
        assert tuple(sample["image"].shape) == (1, 32, 32, 32) == tuple(sample["label"].shape)
    # positive crops are centred on spleen voxels, so at least one patch holds spleen
    assert any(float(s["label"].sum()) > 0 for s in samples)


def test_small_images_are_padded_to_the_patch(synthetic_dataset) -> None:
    from spleenkit.data.datalist import load_datalist

    preset = get_preset("quick", spacing=(8.0, 8.0, 8.0), patch_size=64, num_samples=1)
    case = load_datalist(synthetic_dataset)[0]
    resampled = validation_transforms(preset)(case)["image"]
    assert min(resampled.shape[1:]) < 64
    sample = training_transforms(preset)(case)[0]
    assert tuple(sample["image"].shape) == (1, 64, 64, 64)


def test_trace_shows_each_step_and_the_figures_draw_it(synthetic_dataset) -> None:
    from spleenkit.data.datalist import load_datalist
    from spleenkit.transforms import trace_transforms
    from spleenkit.visualization import crop_samples, transform_steps

    case = load_datalist(synthetic_dataset)[0]
    steps = trace_transforms(case, "quick")
    assert [s["step"] for s in steps] == [type(t).__name__ for t in deterministic_transforms("quick")]
    assert steps[2]["orientation"] == "RAS" and steps[3]["spacing"] == (3.0, 3.0, 3.0)
    assert steps[3]["min"] < -500 and (steps[4]["min"], steps[4]["max"]) == (0.0, 1.0)
    assert len(steps[0]["shape"]) == 3 and len(steps[1]["shape"]) == 4  # channel first
    assert len(transform_steps(steps).axes) == len(steps)
    chain = training_transforms(get_preset("quick", patch_size=32, num_samples=3))
    assert len([ax for ax in crop_samples(chain(case), columns=2).axes if ax.has_data()]) == 3


def test_quick_augments_its_crops_with_monai_and_the_bundle_recipes_do_not(synthetic_dataset) -> None:
    """The quick recipe appends MONAI's random rotation/zoom, intensity and noise transforms; never a flip."""
    from spleenkit.data.datalist import load_datalist

    assert [type(t).__name__ for t in random_transforms("seed")] == ["SpatialPadd", "RandCropByPosNegLabeld"]
    quick = [type(t).__name__ for t in random_transforms("quick")]
    assert quick[:2] == ["SpatialPadd", "RandCropByPosNegLabeld"]
    assert {"RandAffined", "RandScaleIntensityd", "RandShiftIntensityd", "RandGaussianNoised"} <= set(quick)
    assert not [name for name in quick if "Flip" in name], "a left-right flip puts the spleen on the wrong side"
    preset = get_preset("quick", patch_size=32, num_samples=2, augment_probability=1.0)
    chain = training_transforms(preset)
    chain.set_random_state(seed=1)
    plain = training_transforms(get_preset(preset, augment_probability=0.0))
    plain.set_random_state(seed=1)
    case = load_datalist(synthetic_dataset)[0]
    augmented, crops = chain(case), plain(case)
    for sample, crop in zip(augmented, crops, strict=True):
        assert tuple(sample["image"].shape) == (1, 32, 32, 32)
        assert set(torch.unique(sample["label"]).tolist()) <= {0.0, 1.0}  # nearest keeps the label binary
        assert not torch.equal(sample["image"], crop["image"])

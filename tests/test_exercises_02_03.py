"""The write-the-code and predict exercises of notebooks 02 and 03: each check passes the solution and fails the
stub and the usual mistakes with a hint that names the mistake; and the package pieces those lessons show."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from spleenkit.exercises import check
from spleenkit.model import feature_map_sizes
from spleenkit.transforms import training_transforms

pytestmark = pytest.mark.usefixtures("lenient")  # checks as a student meets them (conftest.py)


# --------------------------------------------------------------------------- 02: the tutorial's chain
def _step(chain, name: str) -> int:
    return next(i for i, step in enumerate(chain.transforms) if type(step).__name__ == name)


def test_the_tutorial_chain_is_correct_and_a_stub_is_not_answered() -> None:
    assert check("02-chain", training_transforms("tutorial"), preset="tutorial")
    assert check("02-chain", None, preset="tutorial").status == "unanswered"


def test_the_chain_check_names_the_first_wrong_step_or_argument() -> None:
    from monai.transforms import Compose, CropForegroundd, Spacingd

    seed_chain = training_transforms("seed")  # the usual slip: the bundle's order, orienting before windowing
    verdict = check("02-chain", seed_chain, preset="tutorial")
    assert not verdict and "step 3 is Orientationd, expected ScaleIntensityRanged" in verdict.message

    reference = list(training_transforms("tutorial").transforms)
    late_crop = reference[:2] + reference[4:6] + reference[2:4] + reference[6:]  # windowed and cropped after resampling
    verdict = check("02-chain", Compose(late_crop), preset="tutorial")
    assert not verdict and "step 3 is Orientationd, expected ScaleIntensityRanged" in verdict.message

    quick_numbers = training_transforms("quick").transforms  # the tutorial's order with the lesson's numbers
    steps = [quick_numbers[0], quick_numbers[1], quick_numbers[4], reference[3], quick_numbers[2], quick_numbers[3],
             *reference[6:]]
    verdict = check("02-chain", Compose(steps), preset="tutorial")
    assert not verdict and "step 6 (Spacingd)" in verdict.message and "pixdim" in verdict.message

    steps = copy.deepcopy(reference)
    steps[_step(Compose(steps), "Spacingd")] = Spacingd(keys=["image", "label"], pixdim=(1.5, 1.5, 2.0),
                                                        mode="bilinear")  # the label interpolated
    verdict = check("02-chain", Compose(steps), preset="tutorial")
    assert not verdict and "mode" in verdict.message and "'nearest'" in verdict.message

    steps = copy.deepcopy(reference)  # the kit's earlier CropForegroundd: not the tutorial's argument
    steps[3] = CropForegroundd(keys=["image", "label"], source_key="image", allow_smaller=True)
    verdict = check("02-chain", Compose(steps), preset="tutorial")
    assert not verdict and "step 4 (CropForegroundd)" in verdict.message and "allow_smaller" in verdict.message

    padded = copy.deepcopy(reference)  # the bundle's extra steps are not the tutorial's
    verdict = check("02-chain", Compose(padded[:6] + list(training_transforms("seed").transforms[5:7]) + padded[6:]),
                    preset="tutorial")
    assert not verdict and "step 7 is EnsureTyped, expected RandCropByPosNegLabeld" in verdict.message

    assert "expected Compose" in check("02-chain", ["LoadImaged", "Spacingd"], preset="tutorial").message


# --------------------------------------------------------------------------- 02: a batch without spleen
@pytest.mark.parametrize("answer, hint", [(0, "independently"), (0.5, "one crop"), (1 - 1 / 256, "at least one"),
                                          (1 / 8, "power")])
def test_the_no_spleen_batch_check_catches_the_usual_slips(answer: float, hint: str) -> None:
    assert check("02-no-spleen-batch", 1 / 256, positive=1, negative=1, crops=8)
    verdict = check("02-no-spleen-batch", answer, positive=1, negative=1, crops=8)
    assert not verdict and hint in verdict.message


# --------------------------------------------------------------------------- 03: the network
def _unet(**changes: object) -> torch.nn.Module:
    from monai.networks.nets import UNet

    arguments = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                     strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    return UNet(**{**arguments, **changes})


def test_the_network_check_counts_the_bundle_weights_and_names_the_first_difference() -> None:
    verdict = check("03-network", _unet(), preset="seed")
    assert verdict and "4,808,917" in verdict.message
    assert check("03-network", None, preset="seed").status == "unanswered"
    instance = check("03-network", _unet(norm="instance"), preset="seed")  # MONAI's default normalisation
    assert not instance and "adn.N.weight" in instance.message
    one_output = check("03-network", _unet(out_channels=1), preset="seed")
    assert not one_output and "shape" in one_output.message
    no_residuals = check("03-network", _unet(num_res_units=0), preset="seed")
    assert not no_residuals and "weights" in no_residuals.message
    dropout = check("03-network", _unet(dropout=0.1), preset="seed")  # same weights, another setting
    assert not dropout and "dropout" in dropout.message
    assert "expected a network" in check("03-network", "UNet", preset="seed").message


# --------------------------------------------------------------------------- 03: the loss
def test_the_loss_check_names_the_first_setting_that_differs() -> None:
    from monai.losses import DiceCELoss, DiceLoss

    from spleenkit.training import make_loss

    assert check("03-loss", make_loss("seed"), preset="seed")
    assert check("03-loss", None, preset="seed").status == "unanswered"
    bundle = dict(include_background=True, to_onehot_y=True, softmax=True, squared_pred=True, batch=True,
                  smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=0.5, lambda_ce=0.5)
    assert check("03-loss", DiceCELoss(**bundle), preset="seed")  # release 0.5.9's train.json, argument for argument
    per_crop = check("03-loss", DiceCELoss(**{**bundle, "batch": False}), preset="seed")
    assert not per_crop and "batch is False, expected True" in per_crop.message
    background = check("03-loss", DiceCELoss(**{**bundle, "include_background": False}), preset="seed")
    assert not background and "include_background is False, expected True" in background.message
    assert check("03-loss", DiceCELoss(**{**bundle, "include_background": False}), preset="quick")  # its own choice
    dice_only = check("03-loss", DiceLoss(to_onehot_y=True, softmax=True), preset="seed")
    assert not dice_only and "DiceLoss, expected DiceCELoss" in dice_only.message


# --------------------------------------------------------------------------- 03: the training step
def _step_function(*, zero_grad: bool = True, update: bool = True, autocast: str = "precision",
                   scaler_use: str = "scaled", optimizer_steps: int = 1):
    """The solution's step, with a slip switched on by the arguments."""

    def step(network, inputs, labels, loss_function, optimizer, scaler, precision):
        network.train()
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)
        enabled = {"precision": precision.dtype is not None, "never": False, "always": True}[autocast]
        with torch.autocast(inputs.device.type, dtype=precision.dtype, enabled=enabled):
            logits = network(inputs)
        loss = loss_function(logits.float(), labels)
        if scaler_use == "scaled":
            scaler.scale(loss).backward()
        elif scaler_use == "scaled-unused":  # scale() called, the backward run on the unscaled loss
            scaler.scale(loss)
            loss.backward()
        else:
            loss.backward()
        if scaler_use == "none":
            optimizer.step()
        else:
            scaler.step(optimizer)
            if optimizer_steps == 2:
                optimizer.step()
            if update:
                scaler.update()
        return loss.item()

    return step


def test_the_training_step_check_passes_the_solution_and_tells_what_it_saw() -> None:
    verdict = check("03-train-step", _step_function(), preset="seed")
    assert verdict, verdict.message
    assert "bfloat16 autocast" in verdict.message and "scaler.scale" in verdict.message
    assert check("03-train-step", None, preset="seed").status == "unanswered"


@pytest.mark.parametrize("slip, hint", [
    ({"autocast": "never", "scaler_use": "none"}, "without that autocast"),  # was "correct" before
    ({"autocast": "never"}, "without that autocast"),
    ({"autocast": "always"}, "autocast was on anyway"),
    ({"scaler_use": "none"}, "never went through the gradient scaler"),
    ({"scaler_use": "scaled-unused"}, "ran on the unscaled loss"),
    ({"optimizer_steps": 2}, "stepped 2 times"),
    ({"update": False}, "scaler.update()"),
    ({"zero_grad": False}, "zero_grad"),
])
def test_the_training_step_check_sees_what_the_step_does(slip: dict, hint: str) -> None:
    verdict = check("03-train-step", _step_function(**slip), preset="seed")
    assert not verdict and hint in verdict.message, verdict.message


def test_the_training_step_check_names_the_crash_and_the_line() -> None:
    def skeleton(network, inputs, labels, loss_function, optimizer, scaler, precision):
        network.train()
        ...
        return loss.item()  # noqa: F821 - the task's skeleton, run before it is filled in

    verdict = check("03-train-step", skeleton, preset="seed")  # raised NameError out of the check cell before
    assert not verdict and "NameError: name 'loss' is not defined" in verdict.message
    assert "return loss.item()" in verdict.message
    crashing = check("03-train-step", lambda network, inputs: 0.0, preset="seed")
    assert not crashing and "TypeError" in crashing.message


def test_the_probe_works_whatever_precision_this_cpu_trains_in() -> None:
    from spleenkit.devices import choose_precision

    here = choose_precision("cpu", None)  # bfloat16 where the CPU has it natively, else float32: either way
    assert here.dtype in (None, torch.bfloat16)
    assert check("03-train-step", _step_function(), preset="quick")  # the check forces both dtypes itself


# --------------------------------------------------------------------------- what the lessons show
def test_feature_map_sizes_follow_the_unet_and_show_the_two_voxel_level() -> None:
    from spleenkit.model import build_unet

    rows = feature_map_sizes((96, 64, 32), "seed")
    assert [row["96³ patch"] for row in rows] == ["48³", "24³", "12³", "6³", "6³"]
    assert rows[-1]["32³ patch"] == "2³" and rows[-1]["channels"] == 256
    sizes: set[int] = set()
    network = build_unet("seed")
    hooks = [module.register_forward_hook(lambda module, inputs, output: sizes.add(int(output.shape[2])))
             for module in network.modules() if isinstance(module, torch.nn.Conv3d)]
    with torch.no_grad():
        network.eval()(torch.zeros(1, 1, 32, 32, 32))
    for hook in hooks:
        hook.remove()
    assert {int(row["32³ patch"].rstrip("³")) for row in rows} == sizes - {32}


def test_tensorboard_scalars_reads_back_what_a_summary_writer_wrote(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from spleenkit.visualization import tensorboard_scalars

    with SummaryWriter(log_dir=str(tmp_path / "tensorboard")) as writer:
        for step, value in ((2, 0.5), (1, 0.75), (3, 0.25)):
            writer.add_scalar("train_loss", value, step)
    assert tensorboard_scalars(tmp_path, "train_loss") == [0.75, 0.5, 0.25]
    assert tensorboard_scalars(tmp_path, "val_dice") == []
    assert tensorboard_scalars(tmp_path / "missing") == []


def test_a_chain_that_has_run_still_equals_a_fresh_one(synthetic_dataset: Path) -> None:
    from spleenkit.compare import compare_transforms
    from spleenkit.data import load_datalist

    used = training_transforms("quick")
    used(load_datalist(synthetic_dataset)[0])
    assert compare_transforms(used, training_transforms("quick"))


def test_the_augmentation_figure_shows_one_panel_per_transform() -> None:
    from spleenkit.visualization import augmented_crops

    label = torch.zeros(1, 16, 16, 16)
    label[:, 10:14, 4:8, 4:8] = 1  # off the middle: the panels cut through it, not through the middle
    crop = {"image": torch.rand(1, 16, 16, 16), "label": label}
    flipped = {"image": crop["image"].flip(-1), "label": label.flip(-1)}
    figure = augmented_crops({"the crop": crop, "RandFlipd": flipped})
    assert len(figure.axes) == 2 and figure.axes[1].get_title().startswith("RandFlipd")
    assert figure.axes[0].lines or figure.axes[0].collections  # the spleen outline is drawn on the slice


# --------------------------------------------------------------------------- 03: the best epoch
def best_epoch(records):
    validated = [record for record in records if record["val_dice"] is not None]
    return max(validated, key=lambda record: record["val_dice"])["epoch"]


def test_the_best_epoch_check_knows_the_last_the_lowest_loss_and_the_position_slips() -> None:
    metrics = [{"epoch": 1, "loss": 0.9, "val_dice": 0.2}, {"epoch": 2, "loss": 0.7, "val_dice": None},
               {"epoch": 3, "loss": 0.6, "val_dice": 0.8}, {"epoch": 4, "loss": 0.5, "val_dice": 0.7}]
    verdict = check("03-best-epoch", best_epoch, metrics=metrics)
    assert verdict and "epoch 3 of this run" in verdict.message
    assert check("03-best-epoch", None, metrics=metrics).status == "unanswered"
    assert not check("03-best-epoch", 3, metrics=metrics)  # the number read off the table: not a function
    last = check("03-best-epoch", lambda records: records[-1]["epoch"], metrics=metrics)
    assert not last and "last epoch is not always the best" in last.message
    lowest = check("03-best-epoch", lambda records: min(records, key=lambda r: r["loss"])["epoch"], metrics=metrics)
    assert not lowest and "last epoch" in lowest.message  # in the first run the lowest loss is the last epoch
    by_loss = check("03-best-epoch", lambda records: min(records[:-1], key=lambda r: r["loss"])["epoch"])
    assert not by_loss
    position = check("03-best-epoch", lambda records: records.index(max(
        (r for r in records if r["val_dice"] is not None), key=lambda r: r["val_dice"])))
    assert not position and "position in the list" in position.message
    dice = check("03-best-epoch", lambda records: max(r["val_dice"] for r in records if r["val_dice"] is not None))
    assert not dice and "looks like a Dice" in dice.message
    unskipped = check("03-best-epoch", lambda records: max(records, key=lambda r: r["val_dice"])["epoch"])
    assert not unskipped and "TypeError" in unskipped.message and "None" in unskipped.message

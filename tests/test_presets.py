"""The recipes' one door: every setting typed as text (``--set``, a notebook parameter, a bundle override) or
stored in a manifest is read by its kind and checked at ``resolve_preset``; a bad value is one line naming the
setting, the value and what it accepts, through the command line, the notebook runner and the bundle alike."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from spleenkit import bundle
from spleenkit.cli import build_parser, main
from spleenkit.data.datalist import split_datalist
from spleenkit.errors import BadInputError
from spleenkit.notebooks import check_recipe_parameters, read_overrides
from spleenkit.presets import FIELDS, PRESETS, Preset, get_preset, resolve_preset, setting_of

# per setting: a value typed as text that the seed recipe takes, what it reads as, and text it must refuse
# (None: every text is fine). Values differ from the seed's own, so a setting that is dropped shows.
TYPED: dict[str, tuple[str, Any, str | None]] = {
    "name": ("mine", "mine", ""),
    "description": ("my own recipe", "my own recipe", None),
    "spacing": ("2,2,3", (2.0, 2.0, 3.0), "0,1,1"),
    "intensity_range": ("[-100, 200]", (-100.0, 200.0), "200,-100"),
    "orientation": ("lps", "LPS", "RAX"),
    "crop_foreground": ("yes", True, "maybe"),
    "pad_to_patch": ("off", False, "2"),
    "patch_size": ("48", (48, 48, 48), "32,32"),
    "num_samples": ("2", 2, "two"),
    "positive": ("2", 2, "-1"),
    "negative": ("0", 0, "1.5"),
    "augment_probability": ("0.25", 0.25, "1.5"),
    "rotate_degrees": ("15", 15.0, "ten"),
    "scale_range": ("0.2", 0.2, "1"),
    "intensity_scale": ("0.05", 0.05, "-0.1"),
    "intensity_shift": ("0.05", 0.05, "nan"),
    "noise_std": ("0.01", 0.01, "inf"),
    "channels": ("8,16,32,64,128", (8, 16, 32, 64, 128), "16"),
    "strides": ("[1, 2, 2, 2]", (1, 2, 2, 2), "2,2"),
    "num_res_units": ("1", 1, "-1"),
    "norm": ("INSTANCE", "instance", "layer"),
    "loss": ("dice", "dice", "focal"),
    "include_background": ("no", False, "maybe"),
    "optimizer": ("novograd", "novograd", "sgd"),
    "learning_rate": ("1e-3", 1e-3, "0"),
    "scheduler": ("cosine", "cosine", "cubic"),
    "scheduler_step_size": ("100", 100, "0"),
    "scheduler_gamma": ("0.5", 0.5, "2"),
    "batch_size": ("4", 4, "0"),
    "epochs": ("1", 1, "ten"),
    "amp": ("no", False, "sometimes"),
    "seed": ("7", 7, "-1"),
    "validation_interval": ("2", 2, "0"),
    "validation_roi_size": ("64,64,48", (64, 64, 48), "1000"),
    "sliding_window_batch_size": ("8", 8, "0"),
    "sliding_window_overlap": ("0.25", 0.25, "1"),
    "validation_cases": ("2", 2, "abc"),
    "cache_rate": ("0.5", 0.5, "2"),
    "channels_last": ("false", False, "fast"),
    "extra": ('{"note": "mine"}', {"note": "mine"}, "[1]"),
}
def fake_train(given: list[Preset]) -> Any:
    """Stands in for ``spleenkit.training.train``: keeps the recipe the command line resolved, trains nothing."""
    def train(data: Path, out: Path, preset: Preset, **options: Any) -> SimpleNamespace:
        given.append(preset)
        return SimpleNamespace(best_dice=None, epochs=0, seconds=0.0, device="cpu", model_path=Path(out) / "model.pt",
                               run_dir=Path(out))
    return train


# the bundle's configs spell out DiceCELoss and the bundle's chain: it refuses these two on purpose
BUNDLE_REFUSES = {"loss": "DiceLoss", "crop_foreground": "CropForegroundd"}


def test_every_setting_declares_what_it_accepts_and_the_walk_covers_them_all() -> None:
    assert set(TYPED) == set(FIELDS), f"settings without a case here: {sorted(set(FIELDS) - set(TYPED))}"
    for name in FIELDS:
        field = next(f for f in dataclasses.fields(Preset) if f.name == name)
        assert "setting" in field.metadata, f"{name} declares no Setting"
        assert setting_of(name).accepted(), name


@pytest.mark.parametrize("name", sorted(TYPED))
def test_a_setting_typed_as_text_reads_as_its_kind_and_a_bad_one_is_refused_in_one_line(name: str) -> None:
    text, value, bad = TYPED[name]
    assert getattr(resolve_preset("seed", {name: text}), name) == value
    assert getattr(resolve_preset("seed", {name.replace("_", "-"): text}), name) == value  # --set validation-cases=2
    if name not in ("name", "description", "extra"):  # a manifest names its recipe; these three are labels
        stored = resolve_preset("seed", {name: text}).to_dict()  # a run manifest's preset comes back the same
        assert getattr(Preset.from_dict(stored), name) == value
    if bad is None:
        return
    with pytest.raises(BadInputError) as refused:
        resolve_preset("seed", {name: bad})
    message = str(refused.value)
    assert message.startswith(f"{name}={bad}: expected ") and "\n" not in message, message
    if name not in ("name", "description", "extra"):
        with pytest.raises(BadInputError, match=f"^{name}="):
            Preset.from_dict({**get_preset("seed").to_dict(), name: bad})  # a damaged manifest


@pytest.mark.parametrize("name", sorted(TYPED))
def test_the_command_line_reads_every_setting_at_the_door(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    text, value, bad = TYPED[name]
    given: list[Preset] = []
    monkeypatch.setattr("spleenkit.training.train", fake_train(given))
    arguments = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*arguments, "--set", f"{name}={text}"]) == 0
    assert getattr(given[0], name) == value
    if bad is not None:
        assert main([*arguments, "--set", f"{name}={bad}"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith(f"spleenkit: error: {name}={bad}: expected "), err
        assert err.count("\n") == 1, err
    assert len(given) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(TYPED))
def test_notebook_parameters_and_the_bundle_read_every_setting_at_the_same_door(name: str) -> None:
    text, value, bad = TYPED[name]
    check_recipe_parameters(read_overrides({name: text}))  # `notebooks run --set NAME=TEXT`, and profiles
    if name in BUNDLE_REFUSES:
        with pytest.raises(BadInputError, match=BUNDLE_REFUSES[name]):
            bundle.recipe("seed", **{name: text})
    else:
        assert getattr(bundle.recipe("seed", **{name: text}), name) == value
    if bad is None:
        return
    if name not in ("name", "positive"):  # parse_value reads "" and "-1" as they are; the door refuses them anyway
        with pytest.raises(BadInputError, match=f"^{name}="):
            check_recipe_parameters(read_overrides({name: bad}))
    with pytest.raises(BadInputError, match=f"^{re.escape(name + '=' + bad)}: expected "):
        bundle.recipe("seed", **{name: bad})


def test_a_flag_and_a_setting_meet_at_the_door(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    given: list[Preset] = []
    monkeypatch.setattr("spleenkit.training.train", fake_train(given))
    arguments = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*arguments, "--set", "epochs=1", "--preset", "quick"]) == 0  # once a traceback: two epochs
    assert given[-1].epochs == 1 and given[-1].name == "quick"
    assert main([*arguments, "--set", "amp=no"]) == 0 and given[-1].amp is False  # once the truthy text 'no'
    assert main([*arguments, "--epochs", "3", "--set", "epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "spleenkit: error: epochs=1: epochs is also given as a flag (epochs=3); give it once" in err
    assert main([*arguments, "--lr", "1e-3", "--set", "learning-rate=2e-3"]) == 2
    assert "learning_rate=2e-3: learning_rate is also given as a flag (learning_rate=0.001)" in capsys.readouterr().err
    assert main([*arguments, "--set", "epoch=3"]) == 2
    assert "spleenkit: error: epoch=3: unknown preset setting; did you mean epochs?" in capsys.readouterr().err
    assert main([*arguments, "--preset", "quik"]) == 2
    assert "unknown preset 'quik'; choose one of seed, bundle-0.5.9, tutorial, fast, quick" in capsys.readouterr().err
    assert len(given) == 2


def test_a_new_patch_carries_the_window_along_where_the_recipe_had_them_equal() -> None:
    assert resolve_preset("quick", {"patch_size": "48"}).validation_roi_size == (48, 48, 48)
    assert get_preset("quick", patch_size=48).validation_roi_size == (48, 48, 48)  # the lookup: the same door
    assert resolve_preset("tutorial", {"patch_size": "64"}).validation_roi_size == (160, 160, 160)  # 96 vs 160
    given = resolve_preset("quick", {"patch_size": "48", "validation_roi_size": "64"})
    assert given.patch_size == (48, 48, 48) and given.validation_roi_size == (64, 64, 64)


def test_none_leaves_a_setting_at_the_recipes_value_except_where_none_is_a_value() -> None:
    assert resolve_preset("fast", {"epochs": "none"}).epochs == 300  # a notebook's `epochs = None`
    assert resolve_preset("fast", {"scheduler": "none"}).scheduler is None
    assert resolve_preset("fast", flags={"scheduler": None}).scheduler == "cosine"  # a flag left out
    assert Preset.from_dict(get_preset("seed").to_dict()).scheduler is None


def test_settings_that_do_not_fit_together_are_refused_naming_one() -> None:
    with pytest.raises(BadInputError, match=r"^strides=2,2,2,2: expected 2 strides, one between each pair of the 3"):
        resolve_preset("seed", {"channels": "16,32,64"})
    with pytest.raises(BadInputError, match="^positive=0: positive and negative crops cannot both be 0"):
        resolve_preset("seed", {"positive": 0, "negative": 0})


def test_every_amp_reading_is_one_rule() -> None:
    seed, tutorial = get_preset("seed"), get_preset("tutorial")
    assert seed.precision_request() is None and tutorial.precision_request() is False  # on: where it helps
    assert seed.precision_request(False) is False and tutorial.precision_request(True) is True  # a flag decides
    code = "\n".join(path.read_text() for path in (Path(__file__).parents[1] / "spleenkit").rglob("*.py"))
    assert code.count("precision_request(") >= 3 and "if preset.amp else False" not in code


def test_the_split_refusal_suggests_a_number_that_works() -> None:
    items = [{"image": f"case_{i}.nii.gz", "label": f"label_{i}.nii.gz"} for i in range(4)]
    with pytest.raises(BadInputError, match=r"set validation_cases to at most 2 \(`--set validation_cases=2`"):
        split_datalist(items, 3)  # once: "`--set validation-cases=3`", which fails the same way
    train, validation = split_datalist(items, 2)
    assert len(train) == len(validation) == 2


def test_the_help_lists_the_recipes_from_the_presets() -> None:
    train = next(action for action in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                 if "--preset" in action.option_strings)
    assert all(name in train.help for name in PRESETS)


def test_a_stored_preset_with_an_unknown_setting_or_no_name_is_refused() -> None:
    with pytest.raises(BadInputError, match="bogus=1: unknown preset setting"):
        Preset.from_dict({"name": "quick", "bogus": 1})
    with pytest.raises(BadInputError, match="needs a name"):
        Preset.from_dict({"patch_size": [64, 64, 64]})


@pytest.mark.parametrize(("name", "trained_with"), [("seed", False), ("bundle-0.5.9", False), ("quick", False),
                                                   ("tutorial", True)])
def test_a_run_stored_before_include_background_keeps_the_loss_it_trained_with(name: str, trained_with: bool) -> None:
    # the loss then: DiceCELoss(include_background=False) for dice_ce recipes, DiceLoss's default (True) for "dice"
    stored = {key: value for key, value in get_preset(name).to_dict().items() if key != "include_background"}
    assert Preset.from_dict(stored).include_background is trained_with
    assert Preset.from_dict({**stored, "loss": "dice"}).include_background is True


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_survives_its_dictionary(name: str) -> None:
    preset = get_preset(name, patch_size=48, learning_rate=3e-4)
    assert Preset.from_dict(preset.to_dict()) == preset


def test_a_bad_value_in_notebooks_run_or_bundle_run_is_one_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "executed"
    assert main(["notebooks", "run", "--only", "03", "--out", str(out), "--set", "epochs=ten"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spleenkit: error: epochs=ten: expected a whole number") and err.count("\n") == 1, err
    assert main(["notebooks", "run", "--only", "03", "--out", str(out), "--set", "preset=quik"]) == 2
    assert "unknown preset 'quik'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["bundle", "run", "train", "--set", "epochs=ten", "--set", f"bundle_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spleenkit: error: epochs=ten: expected a whole number") and err.count("\n") == 1, err

"""Presets travel through run manifests as plain data and come back the same."""

from __future__ import annotations

import pytest

from spleenkit.errors import BadInputError
from spleenkit.presets import PRESETS, Preset, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_survives_its_dictionary(name: str) -> None:
    preset = get_preset(name, patch_size=48, learning_rate=3e-4)
    assert Preset.from_dict(preset.to_dict()) == preset


def test_a_stored_preset_with_an_unknown_setting_or_no_name_is_refused() -> None:
    with pytest.raises(BadInputError, match="unknown preset setting.*bogus"):
        Preset.from_dict({"name": "quick", "bogus": 1})
    with pytest.raises(BadInputError, match="needs a name"):
        Preset.from_dict({"patch_size": [64, 64, 64]})

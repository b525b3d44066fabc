"""Shared fixtures: the real example CT (read in place, never copied into the repo) and small synthetic datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def example_ct_folder() -> Path | None:
    """The folder holding the real example CT: $SPLEENKIT_EXAMPLE_DIR, else ../shared/data/totalseg-example."""
    candidates = [os.environ.get("SPLEENKIT_EXAMPLE_DIR"), REPO.parent / "shared" / "data" / "totalseg-example"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "ct.nii.gz").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def example_ct_dir() -> Path:
    """The real example CT with its two spleen masks."""
    folder = example_ct_folder()
    if folder is None:
        pytest.fail("the example CT is missing: set SPLEENKIT_EXAMPLE_DIR or run `spleenkit data download example`")
    return folder

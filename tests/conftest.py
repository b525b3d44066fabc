"""Shared fixtures: the real example CT (read in place, never copied into the repo), a small synthetic dataset, an
untrained tiny run, and exercise checks as a student meets them. Shared data and writers are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import TINY, write_untrained_run

from spleenkit.exercises import RESULTS_ENV, STRICT_ENV

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


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic MSD-layout dataset: 6 labelled + 1 test phantom, 64x64 in-plane, 5 mm slices (seconds).

    Session-scoped and shared: treat it as read-only (copy it before changing anything).
    """
    from spleenkit.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", cases=6, test_cases=1, seed=0,
                                   matrix=64, slice_spacing=5.0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained tiny-UNet weights (``helpers.TINY``) in a run folder whose manifest names that recipe. Shared:
    treat it as read-only."""
    return write_untrained_run(tmp_path_factory.mktemp("tiny-run"), TINY)


@pytest.fixture(scope="session")
def random_volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dataset of MONAI model-zoo's CI test for this bundle: 10 pairs ``image_N.nii.gz`` / ``label_N.nii.gz`` of
    64^3 random 0/1 voxels (int8, identity affine), no dataset.json. Session-scoped: treat it as read-only."""
    import nibabel as nib
    import numpy as np

    folder = tmp_path_factory.mktemp("random_volumes")
    generator = np.random.default_rng(0)
    for index in range(10):
        for kind in ("image", "label"):
            voxels = generator.integers(0, 2, size=(64, 64, 64)).astype(np.int8)
            nib.save(nib.Nifti1Image(voxels, np.eye(4)), folder / f"{kind}_{index}.nii.gz")
    return folder


@pytest.fixture
def lenient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercise checks as a student meets them: not strict, nothing recorded (tests that want either set it).
    A module takes it for every test with ``pytestmark = pytest.mark.usefixtures("lenient")``."""
    monkeypatch.delenv(STRICT_ENV, raising=False)
    monkeypatch.delenv(RESULTS_ENV, raising=False)

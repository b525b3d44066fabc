"""Datasets in the MSD Task09 layout: synthetic phantoms, downloads, the datalist and its checks.

The submodules are imported on first use, so ``import spleenkit.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from spleenkit.data.datalist import dataset_fingerprint, load_datalist, split_datalist

_LAZY = {
    "write_synthetic_dataset": "spleenkit.data.synthetic",
    "render_case": "spleenkit.data.synthetic",
    "check_dataset": "spleenkit.data.checks",
    "read_volume": "spleenkit.data.checks",
    "download_msd": "spleenkit.data.download",
    "download_example": "spleenkit.data.download",
    "download_file": "spleenkit.data.download",
    "example_as_msd": "spleenkit.data.download",
    "safe_extract": "spleenkit.data.download",
}

__all__ = ["dataset_fingerprint", "load_datalist", "split_datalist", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

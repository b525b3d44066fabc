"""What several test modules share: the tiny recipes and runs, and writers of inputs shaped like real ones.

A test module imports from here (or takes a fixture of conftest.py), never from another test module.
"""

from __future__ import annotations

import enum
import math
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from spleenkit.manifest import build_manifest, write_manifest
from spleenkit.model import atomic_save, build_unet
from spleenkit.presets import Preset, get_preset

# an untrained tiny UNet at 6 mm: every step runs in a second on a CPU; geometry needs no good model
TINY = get_preset("quick", spacing=(6.0, 6.0, 6.0), channels=(4, 8, 16, 32, 64), num_res_units=1,
                  validation_roi_size=(32, 32, 32), sliding_window_overlap=0.25)
# settings that make a real training run take seconds on two cores: 6 mm voxels, 48^3 patches, 2 iterations per
# epoch (48, not 32: PyTorch's CPU bfloat16 Conv3d gradient is wrong on the 2-voxel bottom of a 32^3 patch)
TINY_TRAINING = {"spacing": (6.0, 6.0, 6.0), "patch_size": 48, "num_samples": 1, "batch_size": 2,
                 "validation_cases": 2, "sliding_window_overlap": 0.25, "sliding_window_batch_size": 4}
# train()'s keyword arguments for a quiet tiny run that validates every epoch
TRAIN = {**TINY_TRAINING, "validation_interval": 1, "seed": 7, "progress": False, "num_workers": 1}
# a child process that holds a run folder's lock until it is killed (argv[1]: the folder)
HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from spleenkit.runs import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def write_untrained_run(run: Path, preset: Preset) -> Path:
    """A run folder holding seeded, untrained weights for ``preset`` and a manifest naming it: what evaluation
    and inference read, without the minutes a training takes. Returns the path of ``model.pt``."""
    torch.manual_seed(0)
    atomic_save(build_unet(preset).state_dict(), run / "model.pt")
    write_manifest(run, build_manifest({"preset": preset.to_dict()}))
    return run / "model.pt"


def error_of(capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's stderr, which must be one 'spleenkit: error:' line, not a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("spleenkit: error:")]
    assert len(lines) == 1, err
    return lines[0]


def ct_like(path: Path, shape: tuple[int, int, int] = (48, 48, 12), spacing: float = 5.0,
            dtype: type = np.int16) -> Path:
    """A small CT-like volume (air around a soft-tissue body with a brighter organ), 240 mm across."""
    volume = np.full(shape, -1000, dtype=np.float32)
    volume[8:-8, 8:-8] = 40
    volume[12:20, 26:34] = 120
    nib.Nifti1Image(volume.astype(dtype), np.diag([spacing, spacing, spacing, 1.0])).to_filename(path)
    return path


def write_dicom_series(folder: Path, volume: np.ndarray, affine: np.ndarray, series_uid: str | None = None,
                       skip: tuple[int, ...] = (), prefix: str = "slice") -> Path:
    """Write a CT volume (NIfTI voxel order, RAS affine) as one DICOM file per slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    column_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = [*(lps[:3, 0] / column_spacing), *(lps[:3, 1] / row_spacing)]
    series_uid, study_uid = series_uid or generate_uid(), generate_uid()
    for index in range(volume.shape[2]):
        if index in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series_uid, "CT"
        ds.PatientName, ds.PatientID, ds.SeriesDescription = "Phantom^Test", "0", "test series"
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, :3] @ [0, 0, index] + lps[:3, 3]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{row_spacing:.6f}", f"{column_spacing:.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(lps[:3, 2]):.6f}"
        pixels = (volume[:, :, index].T + 1024).astype(np.uint16)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"{prefix}_{index:04d}.dcm", enforce_file_format=True)
    return folder


def describe(obj: object, depth: int = 0) -> object:
    """Every attribute of a transform, recursively, as plain comparable data (random states left out)."""
    if depth > 8:
        return "..."
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"
    if isinstance(obj, (bool, int, float, str, type(None))):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [describe(item, depth + 1) for item in obj]
    if isinstance(obj, dict):
        return {str(key): describe(value, depth + 1) for key, value in obj.items()}
    if isinstance(obj, (np.ndarray, np.generic, torch.Tensor)):
        return describe(np.asarray(obj).tolist(), depth + 1)
    if isinstance(obj, np.random.RandomState):
        return "RandomState"
    if isinstance(obj, type):
        return obj.__qualname__
    if hasattr(obj, "__dict__"):
        return {"type": type(obj).__qualname__, **{k: describe(v, depth + 1) for k, v in vars(obj).items()}}
    return getattr(obj, "__qualname__", repr(obj))

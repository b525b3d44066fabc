"""Validate a dataset in the MSD layout: every file readable, images 3D and finite, labels 0/1 on the image grid.

:func:`check_dataset` reads every listed file and collects every problem (it does not stop at
the first) with the file and the reason, plus a per-case summary row (shape, spacing,
orientation, HU range, spleen volume). An empty spleen mask is a warning, not an error.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spleenkit.errors import BadInputError

#: Affines of an image and its label may differ by this much (mm) and still match.
AFFINE_TOLERANCE = 1e-3


@dataclass
class Problem:
    """One thing wrong (or worth a warning) with one file."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class CaseSummary:
    """One row of the check table."""

    case: str
    section: str
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    orientation: str | None = None
    hu_min: float | None = None
    hu_max: float | None = None
    spleen_ml: float | None = None
    ok: bool = True

    def row(self) -> dict[str, Any]:
        """The row as plain values (for a table, a DataFrame or JSON)."""
        return {
            "case": self.case,
            "section": self.section,
            "shape": "x".join(map(str, self.shape)) if self.shape else "-",
            "spacing_mm": "x".join(f"{s:.2f}" for s in self.spacing) if self.spacing else "-",
            "orientation": self.orientation or "-",
            "hu_range": f"{self.hu_min:.0f}..{self.hu_max:.0f}" if self.hu_min is not None else "-",
            "spleen_ml": "-" if self.spleen_ml is None else f"{self.spleen_ml:.1f}",
            "status": "ok" if self.ok else "BAD",
        }


@dataclass
class DatasetReport:
    """The outcome of :func:`check_dataset`: one summary per case, all problems and warnings."""

    root: Path
    cases: list[CaseSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """The per-case summary as a fixed-width text table."""
        rows = [case.row() for case in self.cases]
        if not rows:
            return "(no cases)"
        columns = list(rows[0])
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
        lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
        lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        """Raise :class:`BadInputError` listing every problem (for code that must stop on bad data)."""
        if self.problems:
            listed = "\n  ".join(str(p) for p in self.problems)
            raise BadInputError(f"{len(self.problems)} problem(s) in the dataset:\n  {listed}", self.root)


def read_volume(path: str | os.PathLike[str]) -> tuple[Any, np.ndarray]:
    """Load a NIfTI file fully; a missing, truncated or corrupt file raises :class:`BadInputError`."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    if not path.is_file():
        raise BadInputError("missing", path)
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except (EOFError, zlib.error) as error:
        raise BadInputError(f"truncated or corrupt compressed file ({error})", path) from error
    except (ImageFileError, OSError, ValueError) as error:
        raise BadInputError(f"not a readable NIfTI image ({error})", path) from error
    return image, data


def _geometry(image: Any) -> tuple[tuple[float, ...], str]:
    import nibabel as nib

    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    try:
        orientation = "".join(nib.aff2axcodes(image.affine))
    except ValueError:
        orientation = "?"
    return spacing, orientation


def _missing(path: Path, report: DatasetReport) -> bool:
    if path.is_file():
        return False
    report.problems.append(Problem(str(path), "listed in dataset.json but missing"))
    return True


def _check_image(path: Path, summary: CaseSummary, report: DatasetReport) -> Any | None:
    if _missing(path, report):
        return None
    try:
        image, data = read_volume(path)
    except BadInputError as error:
        report.problems.append(Problem(str(path), str(error).removeprefix(f"{path}: ")))
        return None
    summary.shape = tuple(int(n) for n in data.shape)
    if data.ndim != 3:
        report.problems.append(Problem(str(path), f"is {data.ndim}D (shape {data.shape}); a 3D CT volume is "
                                                  "expected"))
        return None
    summary.spacing, summary.orientation = _geometry(image)
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            report.problems.append(Problem(str(path), f"holds {bad} NaN or infinite voxel(s)"))
            finite = data[np.isfinite(data)]
            if finite.size:
                summary.hu_min, summary.hu_max = float(finite.min()), float(finite.max())
            return None
    summary.hu_min, summary.hu_max = float(data.min()), float(data.max())
    if summary.hu_max - summary.hu_min < 1:
        report.warnings.append(Problem(str(path), "is constant"))
    return image


def _check_label(path: Path, image: Any, summary: CaseSummary, report: DatasetReport) -> bool:
    if _missing(path, report):
        return False
    try:
        label, data = read_volume(path)
    except BadInputError as error:
        report.problems.append(Problem(str(path), str(error).removeprefix(f"{path}: ")))
        return False
    ok = True
    if image is not None and tuple(data.shape) != tuple(image.shape):
        report.problems.append(Problem(str(path), f"shape {tuple(data.shape)} differs from the image's "
                                                  f"{tuple(image.shape)}"))
        ok = False
    elif image is not None and not np.allclose(label.affine, image.affine, atol=AFFINE_TOLERANCE):
        spacing, orientation = _geometry(label)
        report.problems.append(Problem(str(path), "affine differs from the image's (label: spacing "
                                       f"{np.round(spacing, 3).tolist()} {orientation} origin "
                                       f"{np.round(label.affine[:3, 3], 2).tolist()}; image: spacing "
                                       f"{np.round(summary.spacing or (), 3).tolist()} {summary.orientation} "
                                       f"origin {np.round(image.affine[:3, 3], 2).tolist()})"))
        ok = False
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        report.problems.append(Problem(str(path), "holds NaN or infinite values"))
        return False
    values = np.unique(data)
    extra = [v for v in values.tolist() if v not in (0, 1)]
    if extra:
        shown = ", ".join(f"{v:g}" for v in extra[:8]) + (" ..." if len(extra) > 8 else "")
        report.problems.append(Problem(str(path), f"label values must be 0 or 1; found {shown}"))
        return False
    voxels = int(np.count_nonzero(data))
    spacing, _ = _geometry(label)
    summary.spleen_ml = voxels * float(np.prod(spacing)) / 1000.0
    if voxels == 0:
        report.warnings.append(Problem(str(path), "the spleen mask is empty"))
    return ok


def check_dataset(dataset_dir: str | os.PathLike[str],
                  sections: tuple[str, ...] = ("training", "test")) -> DatasetReport:
    """Read every file listed in ``dataset.json`` and report all problems, warnings and a row per case."""
    root = Path(dataset_dir)
    report = DatasetReport(root)
    manifest = root / "dataset.json"
    if not root.is_dir():
        report.problems.append(Problem(str(root), "dataset folder not found"))
        return report
    if not manifest.is_file():
        report.problems.append(Problem(str(manifest), "missing: not a dataset in the MSD layout"))
        return report
    try:
        description = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        report.problems.append(Problem(str(manifest), f"not valid JSON ({error})"))
        return report
    if not isinstance(description, dict) or not isinstance(description.get("training"), list):
        report.problems.append(Problem(str(manifest), "has no 'training' list"))
        return report
    for section in sections:
        entries = description.get(section, [])
        if not isinstance(entries, list):
            report.problems.append(Problem(str(manifest), f"{section!r} is not a list"))
            continue
        declared = description.get("numTraining" if section == "training" else "numTest")
        if isinstance(declared, int) and declared != len(entries):
            report.warnings.append(Problem(str(manifest), f"num{'Training' if section == 'training' else 'Test'}"
                                                          f" is {declared} but {len(entries)} file(s) are listed"))
        for entry in entries:
            record = {"image": entry} if isinstance(entry, str) else entry
            if not isinstance(record, dict) or "image" not in record:
                report.problems.append(Problem(str(manifest), f"bad {section} entry {entry!r}"))
                continue
            image_path = root / record["image"]
            summary = CaseSummary(Path(record["image"]).name.removesuffix(".nii.gz"), section)
            before = len(report.problems)
            image = _check_image(image_path, summary, report)
            if "label" in record:
                _check_label(root / record["label"], image, summary, report)
            summary.ok = len(report.problems) == before
            report.cases.append(summary)
    return report

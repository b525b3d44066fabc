"""Validate a dataset in the MSD layout: every file readable, images 3D and finite, labels 0/1 on the image grid.

:func:`check_dataset` reads every listed file and collects every problem (it does not stop at
the first) with the file and the reason, plus a per-case summary row (shape, spacing,
orientation, HU range, spleen volume). An empty spleen mask is a warning, not an error.
:func:`check_training_cases` runs the same checks of a case (:func:`check_case`) on the cases a
training is about to read, and adds the rules of a split: no file listed twice, and at least one
non-empty label on each side.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spleenkit.data.datalist import listed_path
from spleenkit.errors import BadInputError
from spleenkit.images import case_name, read_dicom_series, read_nifti
from spleenkit.presets import Preset, get_preset

log = logging.getLogger(__name__)

#: Affines of an image and its label may differ by this much (mm) and still match.
AFFINE_TOLERANCE = 1e-3
#: Voxel sizes (mm) a CT can have; outside this range the header is broken (a zero pixdim, say).
VOXEL_SIZE_RANGE = (0.05, 30.0)
#: A body CT in Hounsfield units holds air (-1000) and fat (about -100): its lowest value lies below this.
CT_LOWEST_BELOW = -500.0


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
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    if not path.is_file():
        raise BadInputError("missing", path)
    image = read_nifti(path, require_3d=False)  # the shape is one of the findings of inspect_image
    try:
        data = np.asanyarray(image.dataobj)
    except (EOFError, zlib.error) as error:
        raise BadInputError(f"truncated or corrupt compressed file ({error})", path) from error
    except (ImageFileError, OSError, ValueError) as error:
        raise BadInputError(f"not a readable NIfTI image ({error})", path) from error
    return image, data


@dataclass
class ImageFindings:
    """What :func:`inspect_image` found: problems (the image cannot be used), warnings, and whether its
    intensities look like CT (``not_ct`` holds the reason when they do not)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    not_ct: str | None = None
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    orientation: str | None = None
    hu_min: float | None = None
    hu_max: float | None = None


def inspect_image(image: Any, data: np.ndarray | None = None, preset: Preset | None = None) -> ImageFindings:
    """The one check of an input CT, used by ``data check`` and by ``infer`` alike: 3D, a usable affine
    (not singular), voxel sizes a CT can have (zero or absurd ones are header errors), finite values,
    not smaller than one sliding window of ``preset`` on every axis, and intensities that look like CT
    in HU (otherwise a warning in ``not_ct``: an MR image, or CT without its rescale)."""
    from nibabel.affines import voxel_sizes

    found = ImageFindings()
    data = np.asanyarray(image.dataobj) if data is None else data
    shape = tuple(int(n) for n in data.shape)
    found.shape = shape
    while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1) is a 3D volume
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 2:
        found.problems.append(f"is {len(shape) if min(shape) > 1 else 2}D (shape {found.shape}); a 3D CT volume is "
                              "expected")
        return found
    data = data.reshape(shape)
    found.spacing, found.orientation = _geometry(image)
    affine = np.asarray(image.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        found.problems.append(f"its affine (the voxel-to-millimetre matrix) is singular or not finite "
                              f"({np.round(affine[:3, :3], 3).tolist()}): the image cannot be placed in space; "
                              "fix its header (sform/qform)")
    else:
        low, high = VOXEL_SIZE_RANGE
        for label, sizes in (("header's voxel size (pixdim)", stored_voxel_sizes(image) or found.spacing),
                             ("affine's voxel size", tuple(float(v) for v in voxel_sizes(affine)))):
            if not all(low <= s <= high for s in sizes):
                found.problems.append(f"the {label} is {' x '.join(f'{s:g}' for s in sizes)} mm, outside "
                                      f"{low:g}..{high:g} mm: a broken header (volumes and resampling would be "
                                      "wrong)")
                break
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            found.problems.append(f"holds {bad} NaN or infinite voxel(s)")
            finite = data[np.isfinite(data)]
            if finite.size:
                found.hu_min, found.hu_max = float(finite.min()), float(finite.max())
            return found
    found.hu_min, found.hu_max = float(data.min()), float(data.max())
    if found.problems:
        return found
    preset = preset or get_preset("seed")
    extent = np.asarray(shape, dtype=float) * np.asarray(voxel_sizes(affine), dtype=float)
    window = np.asarray(preset.validation_roi_size, dtype=float) * np.asarray(preset.spacing, dtype=float)
    if np.all(extent < np.sort(window)[0]):
        found.problems.append(f"covers only {' x '.join(f'{e:.0f}' for e in extent)} mm, less than one sliding "
                              f"window ({' x '.join(f'{w:.0f}' for w in window)} mm for the {preset.name} preset) "
                              "on every axis: not an abdominal CT")
    if found.hu_max - found.hu_min < 1:
        found.warnings.append("is constant")
    elif found.hu_min > CT_LOWEST_BELOW:
        found.not_ct = (f"its values ({found.hu_min:g}..{found.hu_max:g}) do not look like CT in Hounsfield units: "
                        f"nothing below {CT_LOWEST_BELOW:g} (air is -1000 HU, fat about -100); an MR or PET image, "
                        "or CT stored without its rescale slope and intercept?")
        found.warnings.append(found.not_ct)
    return found


def stored_voxel_sizes(image: Any) -> tuple[float, ...] | None:
    """The voxel sizes as stored in a NIfTI file's header, before nibabel's silent fix-ups (it turns a pixdim
    of 0 into 1 mm with only a log line); None for an image that does not come from a NIfTI file."""
    import nibabel as nib

    filename = image.get_filename() if hasattr(image, "get_filename") else None
    header_class = type(getattr(image, "header", None))
    if not filename or not issubclass(header_class, nib.Nifti1Header):
        return None
    try:
        with nib.openers.ImageOpener(filename) as stream:
            header = header_class.from_fileobj(stream, check=False)
    except Exception:  # noqa: BLE001 - the full read reports an unreadable file
        return None
    return tuple(float(s) for s in header["pixdim"][1:4])


def _geometry(image: Any) -> tuple[tuple[float, ...], str]:
    import nibabel as nib

    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    try:
        orientation = "".join(nib.aff2axcodes(image.affine))
    except (ValueError, TypeError, np.linalg.LinAlgError):  # a singular affine has no axis codes
        orientation = "?"
    return spacing, orientation


def read_input(path: str | os.PathLike[str], series_uid: str | None = None) -> tuple[Any, np.ndarray]:
    """An input CT as (image, voxels): a NIfTI file (:func:`read_volume`) or a DICOM series in a folder (the
    series ``series_uid``, or the folder's only one)."""
    path = Path(path)
    if path.is_dir():
        image = read_dicom_series(path, series_uid)
        return image, np.asanyarray(image.dataobj)
    return read_volume(path)


def _missing(path: Path, report: DatasetReport) -> bool:
    if path.is_file() or path.is_dir():  # a folder: a DICOM series
        return False
    report.problems.append(Problem(str(path), "listed in dataset.json but missing"))
    return True


def _check_image(path: Path, summary: CaseSummary, report: DatasetReport, preset: Preset | None = None) -> Any | None:
    if _missing(path, report):
        return None
    try:
        image, data = read_input(path)
    except BadInputError as error:
        report.problems.append(Problem(str(path), str(error).removeprefix(f"{path}: ")))
        return None
    found = inspect_image(image, data, preset)
    summary.shape = found.shape
    summary.spacing, summary.orientation = found.spacing, found.orientation
    summary.hu_min, summary.hu_max = found.hu_min, found.hu_max
    report.problems.extend(Problem(str(path), message) for message in found.problems)
    report.warnings.extend(Problem(str(path), message) for message in found.warnings)
    return None if found.problems else image


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


def check_case(image_path: str | os.PathLike[str], label_path: str | os.PathLike[str] | None = None,
               section: str = "training", preset: Preset | None = None) -> DatasetReport:
    """The one check of a case (``data check``, training and, for its images, ``infer``): the image through
    :func:`inspect_image`; the label readable, not the image itself, on the image's grid (shape and affine),
    finite and holding only 0 and 1. Returns a report with the case's row, its problems and warnings."""
    image_path = Path(image_path)
    report = DatasetReport(image_path.parent)
    summary = CaseSummary(case_name(image_path), section)
    image = _check_image(image_path, summary, report, preset)
    if label_path is not None:
        label_path = Path(label_path)
        if label_path.exists() and image_path.exists() and label_path.resolve() == image_path.resolve():
            report.problems.append(Problem(str(label_path), "the label is the image itself (dataset.json names the "
                                                            "same file as image and label)"))
        else:
            _check_label(label_path, image, summary, report)
    summary.ok = not report.problems
    report.cases.append(summary)
    return report


def listed_twice(records: list[tuple[str, dict[str, Any]]]) -> list[Problem]:
    """A problem for each file named more than once (as image or label, in any section): a case listed twice
    trains twice, or lands in training and validation both; a label shared by two cases belongs to one."""
    seen: dict[Path, tuple[int, str]] = {}
    problems = []
    for number, (section, record) in enumerate(records):
        for key in ("image", "label"):
            if key not in record:
                continue
            path = Path(record[key])
            resolved = path.resolve() if path.exists() else path.absolute()
            where = f"the {key} of {section} case {case_name(record['image'])}"
            if resolved not in seen:
                seen[resolved] = (number, where)
            elif seen[resolved][0] != number:  # (a label that is its own image: check_case says so)
                problems.append(Problem(str(path), f"listed twice: as {seen[resolved][1]} and as {where} (one file "
                                                   "belongs to one case, on one side of the split)"))
    return problems


def check_training_cases(train_items: list[dict[str, str]], validation_items: list[dict[str, str]],
                         workers: int | None = None) -> DatasetReport:
    """Check the cases a training is about to read, before anything heavy: every case through :func:`check_case`
    as ``data check`` does (labels' values and type, grid and affine matching the image, finite values; the image
    rules with data check's defaults, not the training recipe's window), no file listed twice across
    the split, and at least one non-empty label in training and in validation (else the network learns nothing,
    or its validation Dice is undefined). The first problem is raised as a :class:`BadInputError` naming the
    file, the case and the rule; the report (rows, warnings) is returned when all is well."""
    from concurrent.futures import ThreadPoolExecutor

    records = [("training", r) for r in train_items] + [("validation", r) for r in validation_items]
    report = DatasetReport(Path(train_items[0]["image"]).parent.parent if train_items else Path("."))
    report.problems.extend(listed_twice(records))
    if not report.problems:
        workers = min(4, os.cpu_count() or 1) if workers is None else max(1, workers)
        with ThreadPoolExecutor(workers) as pool:  # reading and decompressing releases the GIL
            reports = list(pool.map(lambda item: check_case(item[1]["image"], item[1].get("label"), item[0]),
                                    records))
        for case in reports:
            report.cases += case.cases
            report.problems += case.problems
            report.warnings += case.warnings
    if not report.problems:
        for section in ("training", "validation"):
            rows = [case for case in report.cases if case.section == section]
            labels = [record["label"] for side, record in records if side == section and "label" in record]
            if rows and labels and all(not case.spleen_ml for case in rows):
                why = ("the network would learn nothing" if section == "training"
                       else "the validation Dice would be undefined")
                report.problems.append(Problem(str(Path(labels[0]).parent), f"every {section} label is empty (no "
                                               f"spleen voxel in {len(rows)} case(s)): {why}"))
    if report.problems:
        first = report.problems[0]
        bad = next((f" ({c.section} case {c.case})" for c in report.cases if not c.ok), "")
        more = len(report.problems) - 1
        raise BadInputError(f"{first.message}{bad}; training reads only checked data"
                            + (f"; {more} more problem(s): `spleenkit data check` lists them all" if more else ""),
                            first.path)
    for warning in report.warnings:
        log.warning("%s", warning)
    return report


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
    listed: list[tuple[str, dict[str, Any]]] = []
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
            try:
                image_path = listed_path(root, record["image"], "image")
                label_path = listed_path(root, record["label"], "label") if "label" in record else None
            except BadInputError as error:
                report.problems.append(Problem(str(manifest), str(error).removeprefix(f"{manifest}: ")))
                continue
            case = check_case(image_path, label_path, section)
            report.cases += case.cases
            report.problems += case.problems
            report.warnings += case.warnings
            listed.append((section, {key: str(path) for key, path in
                                     (("image", image_path), ("label", label_path)) if path is not None}))
    report.problems.extend(listed_twice(listed))
    return report

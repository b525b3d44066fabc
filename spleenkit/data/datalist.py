"""The datalist of an MSD-layout dataset folder and the bundle's train/validation split."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from spleenkit.errors import BadInputError

log = logging.getLogger(__name__)

Datalist = list[dict[str, str]]


def listed_path(root: str | os.PathLike[str], relative: object, key: str = "image") -> Path:
    """The file a dataset.json entry names, which must lie inside the dataset folder: an absolute path or
    one whose ``..`` leaves the folder is refused (judged on the path as written; links inside are fine)."""
    root = Path(root).absolute()
    manifest = root / "dataset.json"
    if not isinstance(relative, str) or not relative.strip():
        raise BadInputError(f"{key} entry {relative!r} is not a file name", manifest)
    path = Path(os.path.normpath(root / relative))
    if Path(relative).is_absolute() or not path.is_relative_to(Path(os.path.normpath(root))):
        raise BadInputError(f"{key} {relative!r} lies outside the dataset folder; dataset.json may only name files "
                            "inside it (such as ./imagesTr/case.nii.gz)", manifest)
    return path


def load_datalist(dataset_dir: str | os.PathLike[str], section: str = "training") -> Datalist:
    """Read ``dataset.json`` and return its ``section`` as absolute paths, sorted by image name.

    Sorting by name reproduces the bundle, which globs ``imagesTr/*.nii.gz`` in sorted order.
    Every listed file must exist; a missing one is named in the error.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise BadInputError("dataset folder not found", root)
    manifest = root / "dataset.json"
    if not manifest.is_file():
        raise BadInputError("no dataset.json: not a dataset in the MSD layout (try `spleenkit data synth`)", manifest)
    try:
        description = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInputError(f"not valid JSON ({error})", manifest) from error
    if section not in description or not isinstance(description[section], list):
        raise BadInputError(f"has no {section!r} list", manifest)
    items: Datalist = []
    for entry in description[section]:
        if not isinstance(entry, (str, dict)):
            raise BadInputError(f"bad {section} entry {entry!r}", manifest)
        record = {"image": entry} if isinstance(entry, str) else dict(entry)
        for key, relative in list(record.items()):
            path = listed_path(root, relative, key)
            if path.is_dir():
                raise BadInputError(f"listed in dataset.json as {key} is a folder (a DICOM series?); training reads "
                                    "NIfTI files: convert it first (spleenkit infer reads DICOM folders)", path)
            if not path.is_file():
                raise BadInputError(f"listed in dataset.json as {key} but missing", path)
            record[key] = str(path.resolve())
        items.append(record)
    return sorted(items, key=lambda record: Path(record["image"]).name)


def split_datalist(items: Datalist, validation_cases: int = 9, *,
                   warn_small_training: bool = False) -> tuple[Datalist, Datalist]:
    """The bundle's split: sorted by image name, the last ``validation_cases`` for validation.

    A split that would keep fewer cases to train on than it holds out is refused: it happens when a
    recipe made for MSD's 41 cases (9 for validation) meets a small dataset (12 phantoms would train
    on 3), and such a run would teach the wrong lesson without a word. With ``warn_small_training`` (the
    MONAI bundle, whose original takes ``images[:-9]`` whatever the dataset) it is a warning instead.
    """
    items = sorted(items, key=lambda record: Path(record["image"]).name)
    most = len(items) // 2  # no more held out than trained on
    fix = (f"set validation_cases to at most {most} (`--set validation_cases={most}` on the command line)" if most
           else "a split needs at least 2 labelled cases")
    if not 0 < validation_cases < len(items):
        raise BadInputError(
            f"cannot hold out {validation_cases} validation case(s) from {len(items)} labelled case(s); {fix}"
        )
    if validation_cases > len(items) - validation_cases:
        message = (
            f"holding out {validation_cases} of {len(items)} labelled cases for validation would leave only "
            f"{len(items) - validation_cases} to train on: the recipe's validation_cases suits a larger dataset "
            f"(MSD: 9 of 41); {fix}"
        )
        if not warn_small_training:
            raise BadInputError(message)
        log.warning("%s", message.replace("would leave", "leaves"))
    return items[:-validation_cases], items[-validation_cases:]


def dataset_fingerprint(items: Datalist) -> str:
    """A sha256 over the names and bytes of every file in the datalist, for run manifests."""
    digest = hashlib.sha256()
    for record in sorted(items, key=lambda r: r["image"]):
        for key in sorted(record):
            path = Path(record[key])
            digest.update(f"{key}:{path.name}:".encode())
            with path.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()

"""Downloads: the MSD Task09 Spleen archive and the real example CT, verified and extracted safely.

Every download goes to ``<name>.part`` first, resumes from there with an HTTP Range request
when a previous attempt was cut off, and is renamed to its final name only after its
checksum matches the pinned one (a mismatch removes the partial file and raises
:class:`~spleenkit.errors.ChecksumError`). Archives are extracted member by member checks
(no absolute paths, no ``..``, no links leaving the folder, no devices) into a staging
folder that is renamed into place, so a failure leaves nothing half-extracted. Calling a
download again when its result is already there and verifies does nothing.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from spleenkit.data.synthetic import msd_description
from spleenkit.errors import BadInputError, ChecksumError, SpleenkitError, first_line
from spleenkit.images import read_nifti
from spleenkit.io import write_json, write_text, write_with
from spleenkit.runs import output_folder

log = logging.getLogger(__name__)

#: The Medical Segmentation Decathlon's Task09 archive, as MONAI's DecathlonDataset fetches it.
MSD_SPLEEN_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar"
MSD_SPLEEN_MD5 = "410d4a301da4e5b2f6f86ec3ddba524e"
MSD_SPLEEN_FOLDER = "Task09_Spleen"

#: Environment variable naming a local copy of the example CT folder.
EXAMPLE_DIR_VARIABLE = "SPLEENKIT_EXAMPLE_DIR"
_TOTALSEG = "https://raw.githubusercontent.com/wasserth/TotalSegmentator"
_CHUNK = 1 << 20
_USER_AGENT = "spleenkit"


# --------------------------------------------------------------------------- checksums
def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in blocks (works for multi-GB archives)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike[str], expected: str, algorithm: str = "sha256") -> None:
    """Raise :class:`ChecksumError` naming the file unless its digest is ``expected``."""
    actual = file_digest(path, algorithm)
    if actual.lower() != expected.lower():
        raise ChecksumError(f"{algorithm} is {actual}, expected {expected}", path)


# --------------------------------------------------------------------------- download with resume
def _progress_bar(total: int | None, initial: int, label: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                disable=not enabled, leave=False)


def _open(url: str, start: int, timeout: float):
    if not url.lower().startswith(("http://", "https://")):
        raise BadInputError(f"only http(s) addresses can be downloaded, not {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if start:
        request.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (scheme checked above)


def download_file(url: str, destination: str | os.PathLike[str], *, md5: str | None = None,
                  sha256: str | None = None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination``, resuming ``destination.part`` and verifying a checksum.

    An existing ``destination`` whose checksum matches is kept as it is. The bytes go to
    ``<destination>.part``; if that exists from an interrupted attempt, the download asks
    the server for the rest (HTTP Range) and starts over if the server cannot resume. A
    checksum mismatch deletes the partial file and raises :class:`ChecksumError`; a network
    failure keeps it (so the next call resumes) and raises :class:`SpleenkitError`.
    """
    destination = Path(destination)
    algorithm, expected = ("md5", md5) if md5 else ("sha256", sha256) if sha256 else (None, None)
    if destination.is_file() and expected:
        try:
            verify_file(destination, expected, algorithm)
            log.info("%s is already downloaded and verified", destination)
            return destination
        except ChecksumError:
            log.warning("%s does not match its %s; downloading it again", destination, algorithm)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"cannot create the download folder ({error.strerror})", destination.parent) from error
    if not os.access(destination.parent, os.W_OK):
        raise BadInputError("download folder is not writable", destination.parent)
    part = destination.with_name(destination.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    try:
        response = _open(url, start, timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:  # nothing left to fetch: the partial file may be complete
            response = None
        else:
            raise SpleenkitError(f"{url}: download failed (HTTP {error.code} {error.reason})") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SpleenkitError(f"{url}: download failed ({reason}); run again to resume") from error
    if response is not None:
        with response:
            kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind in ("text/html", "application/xhtml+xml"):  # a mirror's landing page, a login or error page
                raise SpleenkitError(f"{url}: the address answers with a web page ({kind}), not the file; open it "
                                     "in a browser to find the file's own address")
            status = getattr(response, "status", 200)
            if start and status != 206:
                log.info("the server does not resume downloads; starting %s again", destination.name)
                start = 0
            elif start:
                content_range = response.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {start}-"):
                    log.info("the server answered an unexpected range (%s); starting again", content_range)
                    start = 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else None
            if start:
                log.info("resuming %s at %.1f MB", destination.name, start / 1e6)
            received = start
            try:
                with open(part, "ab" if start else "wb") as stream, \
                        _progress_bar(total, start, destination.name, progress) as bar:
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        stream.write(block)
                        received += len(block)
                        bar.update(len(block))
            except (OSError, http.client.HTTPException) as error:  # connection resets, timeouts, short reads
                raise SpleenkitError(f"{url}: download interrupted after {received} bytes ({error}); "
                                     f"run again to resume from {part}") from error
            if total is not None and received < total:
                raise SpleenkitError(f"{url}: download interrupted after {received} of {total} bytes; "
                                     f"run again to resume from {part}")
    if expected:
        try:
            verify_file(part, expected, algorithm)
        except ChecksumError as error:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{algorithm} of the download from {url} is wrong ({error}); the partial file "
                                "was removed, run again to download afresh", destination) from error
    os.replace(part, destination)
    return destination


# --------------------------------------------------------------------------- safe extraction
def _member_problem(member: tarfile.TarInfo, root: Path) -> str | None:
    """Why extracting ``member`` under ``root`` would be unsafe, or None."""
    name = member.name
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in path.parts:
        return "has '..' in its path"
    target = (root / name).resolve()
    if not target.is_relative_to(root):
        return "would be written outside the folder"
    if member.issym() or member.islnk():
        link = PurePosixPath(member.linkname)
        if link.is_absolute():
            return f"is a link to an absolute path ({member.linkname})"
        base = (root / name).parent if member.issym() else root
        if not (base / member.linkname).resolve().is_relative_to(root):
            return f"is a link pointing outside the folder ({member.linkname})"
    elif not (member.isfile() or member.isdir()):
        return "is a device, FIFO or other special file"
    return None


def _is_macos_metadata(top: str) -> bool:
    """macOS ``._NAME`` AppleDouble files beside a folder: metadata, never data."""
    return top.startswith("._")


def safe_extract(archive: str | os.PathLike[str], root: str | os.PathLike[str], folder: str | None = None, *,
                 check: Callable[[Path], None] | None = None) -> list[Path]:
    """Extract a tar archive into ``root`` after checking every member; return the top-level paths placed.

    Refuses (with :class:`BadInputError` naming the archive and each bad member) archives
    holding absolute paths, ``..``, links that leave ``root`` or special files; uses
    tarfile's ``data`` filter as well where Python has it. With ``folder`` (e.g. "Task09_Spleen")
    every member must lie inside that folder (others are refused by name, macOS ``._`` files
    skipped), and only ``root/folder`` is replaced. Without it, an existing top-level entry of the
    same name is refused rather than replaced. Extraction happens in a staging folder inside
    ``root`` that is removed at the end, so on success or failure nothing else under ``root``
    is touched and nothing half-extracted remains. ``check(extracted_folder)`` may refuse each
    extracted top-level folder before it replaces anything.
    """
    archive = Path(archive)
    root = Path(root).absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"cannot create the folder ({error.strerror or error})", root) from error
    root = root.resolve()
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise BadInputError(_not_a_tar(archive, error), archive) from error
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as error:
            raise BadInputError(f"truncated or corrupt tar archive ({error})", archive) from error
        bad = [f"{m.name!r} {problem}" for m in members if (problem := _member_problem(m, root))]
        if bad:
            raise BadInputError("refusing to extract unsafe member(s): " + "; ".join(bad), archive)
        members = [m for m in members if PurePosixPath(m.name).parts]
        tops = sorted({PurePosixPath(m.name).parts[0] for m in members})
        if folder is not None:
            skipped = [m for m in members if _is_macos_metadata(PurePosixPath(m.name).parts[0])]
            if skipped:
                log.debug("skipping %d macOS metadata member(s) beside %s", len(skipped), folder)
            members = [m for m in members if m not in skipped]
            others = sorted({PurePosixPath(m.name).parts[0] for m in members} - {folder})
            if others:
                raise BadInputError(f"refusing to extract: besides {folder}/ the archive holds "
                                    f"{', '.join(repr(o) for o in others)} at its top level, which could replace "
                                    f"other folders in {root}; nothing was extracted", archive)
            if folder not in tops:
                raise BadInputError(f"the archive holds {', '.join(tops) or 'nothing'}, not {folder}/", archive)
            tops = [folder]
        else:
            existing = [top for top in tops if (root / top).exists() or (root / top).is_symlink()]
            if existing:
                raise BadInputError(f"refusing to extract over {', '.join(existing)} already in {root}; "
                                    "move it away first", archive)
        try:
            staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
        except OSError as error:
            raise BadInputError(f"cannot extract here ({error.strerror or error})", root) from error
        try:
            unpacked = staging / "new"
            if hasattr(tarfile, "data_filter"):
                tar.extractall(unpacked, members=members, filter="data")
            else:  # Python without extraction filters: our own checks above are the guard
                tar.extractall(unpacked, members=members)  # noqa: S202
            if check is not None:
                for top in tops:
                    check(unpacked / top)
            placed = [_swap_into_place(unpacked / top, root / top, staging) for top in tops]
        except (tarfile.TarError, EOFError) as error:
            raise BadInputError(f"truncated or corrupt tar archive ({error})", archive) from error
        except OSError as error:
            raise BadInputError(f"cannot extract ({error.strerror or error})", root) from error
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return placed


def _not_a_tar(archive: Path, error: BaseException) -> str:
    """One line on why ``archive`` is no tar archive (tarfile lists a line per compression it tried)."""
    try:
        with open(archive, "rb") as stream:
            head = stream.read(512).lstrip().lower()
    except OSError:
        head = b""
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "not a tar archive but a web page (HTML): the address gave a landing or error page, not the file"
    if not head:
        return "not a tar archive: the file is empty"
    return f"not a readable tar archive ({first_line(error)}): a truncated or different file"


def _swap_into_place(source: Path, target: Path, staging: Path) -> Path:
    """Rename the extracted folder ``source`` to ``target``; an earlier ``target`` goes into ``staging`` first
    (and comes back if the second rename fails), so ``target`` is always whole: old or new."""
    aside = staging / "old"
    had_old = target.exists() or target.is_symlink()
    if had_old:
        os.replace(target, aside)  # folder rename (staging), not a file write
    try:
        os.replace(source, target)  # folder rename (staging), not a file write
    except OSError:
        if had_old:
            os.replace(aside, target)
        raise
    return target


# --------------------------------------------------------------------------- MSD Task09
def extracted_dataset_problems(dataset_dir: str | os.PathLike[str]) -> list[str]:
    """Cheap structural checks of an extracted MSD folder: dataset.json and every listed file present."""
    root = Path(dataset_dir)
    manifest = root / "dataset.json"
    if not manifest.is_file():
        return [f"{manifest}: missing"]
    try:
        description = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        return [f"{manifest}: not readable JSON ({error})"]
    problems = []
    entries: list[str] = []
    for record in description.get("training", []):
        entries.extend(record.values() if isinstance(record, dict) else [record])
    entries.extend(description.get("test", []))
    if not entries:
        problems.append(f"{manifest}: lists no files")
    for relative in entries:
        path = root / relative
        if not path.is_file() or path.stat().st_size == 0:
            problems.append(f"{path}: listed in dataset.json but missing or empty")
    return problems


def check_md5(md5: str) -> str:
    """``md5`` in lower case, or a BadInputError when it is not 32 hexadecimal digits (checked before downloading)."""
    if not isinstance(md5, str) or not re.fullmatch(r"[0-9a-fA-F]{32}", md5.strip()):
        raise BadInputError(f"--md5 {md5!r} is not an md5 checksum (32 hexadecimal digits)")
    return md5.strip().lower()


def download_msd(root: str | os.PathLike[str], *, url: str = MSD_SPLEEN_URL, md5: str | None = MSD_SPLEEN_MD5,
                 keep_archive: bool = True, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download and extract MSD Task09 Spleen under ``root``; return ``root/Task09_Spleen``.

    Does nothing when the extracted dataset is already there and complete. The archive
    (about 1.5 GB) is verified against ``md5`` before extraction (``md5=None``: not verified, for a
    mirror whose checksum is unknown) and kept as ``root/Task09_Spleen.tar`` unless ``keep_archive``
    is False. Only ``root/Task09_Spleen`` is ever replaced, and only by a complete extraction; an
    archive holding other top-level folders is refused.
    """
    if md5 is not None:
        md5 = check_md5(md5)
    elif url == MSD_SPLEEN_URL:
        md5 = MSD_SPLEEN_MD5
    else:
        log.warning("downloading %s without verifying it (no md5 given)", url)
    root = Path(root).absolute()
    dataset = root / MSD_SPLEEN_FOLDER
    if dataset.is_dir() and not extracted_dataset_problems(dataset):
        log.info("%s is already extracted and complete; nothing to do", dataset)
        return dataset
    archive = root / f"{MSD_SPLEEN_FOLDER}.tar"
    with output_folder(root):  # a download that fails before writing anything leaves no empty folder
        download_file(url, archive, md5=md5, progress=progress, timeout=timeout)
    log.info("extracting %s", archive)

    def complete(extracted: Path) -> None:
        problems = extracted_dataset_problems(extracted)
        if problems:
            shown = "; ".join(p.replace(str(extracted), MSD_SPLEEN_FOLDER) for p in problems[:5])
            raise BadInputError(f"the archive's {MSD_SPLEEN_FOLDER} is incomplete, nothing was replaced: {shown}"
                                + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""), archive)

    safe_extract(archive, root, folder=MSD_SPLEEN_FOLDER, check=complete)
    if not keep_archive:
        archive.unlink()
    return dataset


# --------------------------------------------------------------------------- the example CT
def _copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)


def _label_one(source: Path, target: Path) -> None:
    """Keep label 1 of a multi-label mask as a uint8 0/1 mask, header and extensions unchanged."""
    import nibabel as nib
    import numpy as np

    image = read_nifti(source)
    mask = (np.asanyarray(image.dataobj) == 1).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, image.affine, image.header), target)


def _resave(source: Path, target: Path) -> None:
    """Write the image again with nibabel (deterministic gzip header), values and header unchanged."""
    import nibabel as nib
    import numpy as np

    image = read_nifti(source)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header), target)


@dataclass(frozen=True)
class ExampleFile:
    """One file of the example folder: where it comes from, how it is made, and its final sha256."""

    name: str
    urls: tuple[str, ...]
    sha256: str
    make: Callable[[Path, Path], None] = field(default=_copy)
    description: str = ""
    required: bool = True  # an optional file (the licence text) is fetched when it verifies, else skipped


#: The example CT and two spleen masks, pinned by the sha256 of the files the kit writes.
EXAMPLE_FILES: tuple[ExampleFile, ...] = (
    ExampleFile(
        "ct.nii.gz",
        (f"{_TOTALSEG}/0effae9d718aab0c118ce1f8982dcd16b9e32a50/tests/reference_files/example_ct.nii.gz",
         f"{_TOTALSEG}/master/tests/reference_files/example_ct.nii.gz"),
        "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
        _copy,
        "abdomen-pelvis CT, 3 mm, RAS, int32 HU",
    ),
    ExampleFile(
        "spleen_a.nii.gz",
        (f"{_TOTALSEG}/853cd2fea2e8870e473dba2f911b989a54b6e274/tests/reference_files/"
         "example_seg_fast_force_split.nii.gz",
         f"{_TOTALSEG}/master/tests/reference_files/example_seg_fast_force_split.nii.gz"),
        "7a43ca707d0292e8bb45d233ac4e2856650bfffa2a0db00593f4de039580dee3",
        _label_one,
        "label 1 of a TotalSegmentator v2 --fast prediction, uint8 0/1",
    ),
    ExampleFile(
        "spleen_b.nii.gz",
        (f"{_TOTALSEG}/5de6e4dcf702d525e0b2813683575b2c9e998aee/tests/reference_files/example_seg/spleen.nii.gz",),
        "85f885e536dade84c6fd97db7b73d275c1ea67a9e4dff1511302cde86deac1f5",
        _resave,
        "a TotalSegmentator v1 prediction, float64 0/1 as stored",
    ),
    ExampleFile(
        "LICENSE",
        (f"{_TOTALSEG}/0effae9d718aab0c118ce1f8982dcd16b9e32a50/LICENSE", f"{_TOTALSEG}/master/LICENSE"),
        "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4",
        _copy,
        "the Apache-2.0 licence of the TotalSegmentator repository",
        required=False,
    ),
)

_EXAMPLE_README = """# The example CT

A real abdominal CT with two predicted spleen masks, from the public repository
wasserth/TotalSegmentator (Apache-2.0), folder tests/reference_files/. Not an MSD case:
one scan with predicted (not manual) labels, for preprocessing, inference and metric checks.

{rows}
"""


def example_problems(folder: str | os.PathLike[str], files: Iterable[ExampleFile] = EXAMPLE_FILES) -> list[str]:
    """What is missing or different in an example folder (empty when it is complete and verified)."""
    problems = []
    for item in files:
        path = Path(folder) / item.name
        if not item.required and not path.is_file():
            continue
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        actual = file_digest(path)
        if actual != item.sha256:
            problems.append(f"{path}: sha256 is {actual}, expected {item.sha256}")
    return problems


def download_example(root: str | os.PathLike[str], *, local: str | os.PathLike[str] | None = None,
                     files: Iterable[ExampleFile] = EXAMPLE_FILES, progress: bool = True,
                     timeout: float = 60.0) -> Path:
    """Put the example CT and its spleen masks in ``root``, verified by sha256; return ``root``.

    With ``local`` (or ``$SPLEENKIT_EXAMPLE_DIR``) the files are copied from that folder after
    checking their sha256; otherwise they are downloaded from their public source and made
    exactly as pinned (mask label 1 extracted, float mask re-saved). Does nothing when
    ``root`` already holds the verified files.
    """
    files = tuple(files)
    root = Path(root).absolute()
    local = local if local is not None else os.environ.get(EXAMPLE_DIR_VARIABLE) or None
    if not example_problems(root, files):
        log.info("%s already holds the verified example files; nothing to do", root)
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".example-", dir=root))
    except OSError as error:
        raise BadInputError(f"cannot write here ({error.strerror})", root) from error
    try:
        if local:
            source = Path(local)
            problems = example_problems(source, files)
            if problems:
                raise ChecksumError("the local example copy does not verify: " + "; ".join(problems), source)
            for item in files:
                if (source / item.name).is_file():
                    _copy(source / item.name, staging / item.name)
        else:
            for item in files:
                try:
                    _fetch_example_file(item, staging, progress, timeout)
                except SpleenkitError as error:
                    if item.required:
                        raise
                    log.warning("skipping the optional %s: %s", item.name, error)
        for item in files:
            made = staging / item.name
            if made.is_file():
                write_with(root / item.name, functools.partial(shutil.copyfile, made),
                           check=functools.partial(verify_file, expected=item.sha256))
        rows = "\n".join(f"- {f.name}: {f.description} (from {f.urls[0]}, sha256 {f.sha256})" for f in files
                         if (root / f.name).is_file())
        readme = root / "README.md"
        if not readme.exists():
            write_text(readme, _EXAMPLE_README.format(rows=rows))
    except OSError as error:
        raise BadInputError(f"cannot write the example files ({error.strerror or error})", root) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _fetch_example_file(item: ExampleFile, staging: Path, progress: bool, timeout: float) -> None:
    """Download one example source (trying its addresses in order) and make the pinned file from it."""
    failures = []
    for number, url in enumerate(item.urls):
        raw = staging / f"source-{number}-{PurePosixPath(url).name}"
        try:
            download_file(url, raw, progress=progress, timeout=timeout)
            item.make(raw, staging / item.name)
            verify_file(staging / item.name, item.sha256)
            return
        except SpleenkitError as error:
            failures.append(str(error))
        except Exception as error:  # a source that nibabel cannot read, for instance
            failures.append(f"{url}: {error}")
        finally:
            raw.unlink(missing_ok=True)
            raw.with_name(raw.name + ".part").unlink(missing_ok=True)
    raise ChecksumError(f"could not make a file matching the pinned sha256 {item.sha256}: " + " | ".join(failures),
                        item.name)


# --------------------------------------------------------------------------- example as a dataset
EXAMPLE_DATASET_NAME = "Spleen example"
EXAMPLE_CASE = "example_1.nii.gz"


def example_dataset_problem(out_dir: str | os.PathLike[str]) -> str | None:
    """Why ``out_dir`` cannot take the example dataset (None when it is missing, empty or already one).

    The example is one case, to look at: written over another dataset (the synthetic phantoms, MSD)
    it would replace that dataset's ``dataset.json`` with a one-case list, so such a folder is refused.
    """
    out = Path(out_dir)
    if not out.exists():
        return None
    if not out.is_dir():
        return "exists and is not a folder"
    manifest = out / "dataset.json"
    if manifest.is_file():
        try:
            name = json.loads(manifest.read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            name = None
        if name != EXAMPLE_DATASET_NAME:
            return (f"holds another dataset ({name or 'an unreadable dataset.json'}); the example gets a folder of "
                    "its own, e.g. data/example")
        return None
    images = [path.name for sub in ("imagesTr", "labelsTr", "imagesTs") if (out / sub).is_dir()
              for path in (out / sub).iterdir() if path.name != EXAMPLE_CASE]
    if images:
        return f"holds image files ({images[0]} ...) of another dataset; the example gets a folder of its own"
    return None


def example_as_msd(example_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                   mask: str = "spleen_a.nii.gz") -> Path:
    """An MSD-layout folder holding the example CT as one labelled case (``mask`` as its label).

    Links the files where the file system allows it (else copies them), so notebooks can feed
    the real scan through the same datalist code as MSD and the synthetic phantoms. The label
    is written as uint8 when the mask is stored as another type (spleen_b is float64).
    ``out_dir`` must be new, empty, or an earlier example dataset: a folder holding another
    dataset is refused (see :func:`example_dataset_problem`), never overwritten.
    """
    import nibabel as nib
    import numpy as np

    example = Path(example_dir)
    for name in ("ct.nii.gz", mask):
        if not (example / name).is_file():
            raise BadInputError("missing: run `spleenkit data download example` first", example / name)
    out = Path(out_dir)
    problem = example_dataset_problem(out)
    if problem:
        raise BadInputError(f"{problem}: refusing to write the example dataset there", out)
    name = EXAMPLE_CASE
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        image_target = out / "imagesTr" / name
        if not image_target.exists():
            _link_or_copy(example / "ct.nii.gz", image_target)
        label_image = read_nifti(example / mask)
        label_target = out / "labelsTr" / name
        if label_target.is_symlink() or label_target.exists():
            label_target.unlink()  # another mask may have been chosen before
        if label_image.get_data_dtype() == np.uint8:
            _link_or_copy(example / mask, label_target)
        else:
            data = np.asanyarray(label_image.dataobj)
            header = label_image.header.copy()
            header.set_data_dtype(np.uint8)
            fixed = nib.Nifti1Image(np.rint(data).astype(np.uint8), label_image.affine, header)
            write_with(label_target, lambda path: nib.save(fixed, path))
    except OSError as error:
        raise BadInputError(f"cannot write the example dataset ({error.strerror or error})", out) from error
    description = msd_description([name], [], "The TotalSegmentator example CT (not an MSD case) with a "
                                  f"predicted spleen mask ({mask}) as its label")
    description["name"] = EXAMPLE_DATASET_NAME
    write_json(out / "dataset.json", description, indent=4)
    return out


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.symlink(source.absolute(), target)
    except OSError:
        shutil.copyfile(source, target)


__all__ = [
    "EXAMPLE_FILES", "MSD_SPLEEN_MD5", "MSD_SPLEEN_URL", "ExampleFile", "download_example", "download_file",
    "download_msd", "example_as_msd", "example_dataset_problem", "example_problems", "extracted_dataset_problems",
    "file_digest", "safe_extract", "verify_file",
]

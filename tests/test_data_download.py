"""Downloads end to end against a local HTTP server (127.0.0.1 only) that supports Range requests."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spleenkit.cli import main
from spleenkit.data.checks import check_dataset
from spleenkit.data.datalist import load_datalist
from spleenkit.data.download import (
    EXAMPLE_FILES,
    download_example,
    download_file,
    download_msd,
    example_as_msd,
    safe_extract,
)
from spleenkit.errors import BadInputError, ChecksumError, SpleenkitError


# --------------------------------------------------------------------------- a local file server
@dataclass
class FileServer:
    """What the test server serves and what it was asked for."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # serve N bytes once, then drop the connection
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def add(self, name: str, payload: bytes) -> str:
        self.files[f"/{name}"] = payload
        return f"{self.url}/{name}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        state: FileServer = self.server.state  # type: ignore[attr-defined]
        wanted = self.headers.get("Range")
        state.requests.append((self.path, wanted))
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if match and not state.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        cut = state.cut_after.pop(self.path, None)
        if cut is not None:
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FileServer]:
    state = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = state  # type: ignore[attr-defined]
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


# --------------------------------------------------------------------------- archives
def _tar(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                name, payload = entry
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.fixture(scope="module")
def msd_tar(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A Task09_Spleen.tar built from tiny phantoms, with macOS '._' junk files like the real archive."""
    from spleenkit.data.synthetic import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path_factory.mktemp("msd") / "src", cases=3, test_cases=1, matrix=32,
                                      slice_spacing=5.0)
    entries: list[tarfile.TarInfo | tuple[str, bytes]] = []
    for path in sorted(dataset.rglob("*")):
        if path.is_file():
            entries.append((f"Task09_Spleen/{path.relative_to(dataset).as_posix()}", path.read_bytes()))
    entries.append(("Task09_Spleen/imagesTr/._spleen_1.nii.gz", b"\x00\x05\x16\x07 AppleDouble"))
    return _tar(entries)


def _md5(payload: bytes) -> str:
    return hashlib.md5(payload).hexdigest()  # noqa: S324 (MSD publishes md5)


# --------------------------------------------------------------------------- MSD
def test_good_download_extracts_and_is_idempotent(server: FileServer, msd_tar: bytes, tmp_path: Path) -> None:
    url = server.add("Task09_Spleen.tar", msd_tar)
    dataset = download_msd(tmp_path, url=url, md5=_md5(msd_tar), progress=False)
    assert dataset == tmp_path / "Task09_Spleen"
    assert len(load_datalist(dataset)) == 3
    assert check_dataset(dataset).ok
    assert (tmp_path / "Task09_Spleen.tar").read_bytes() == msd_tar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task09_Spleen", "Task09_Spleen.tar"]
    asked = len(server.requests)
    assert download_msd(tmp_path, url=url, md5=_md5(msd_tar), progress=False) == dataset
    assert len(server.requests) == asked, "a second call must not download again"


def test_checksum_mismatch_removes_the_partial_file(server: FileServer, msd_tar: bytes, tmp_path: Path) -> None:
    url = server.add("Task09_Spleen.tar", msd_tar)
    with pytest.raises(ChecksumError, match="md5") as caught:
        download_msd(tmp_path, url=url, md5="0" * 32, progress=False)
    assert "Task09_Spleen.tar" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_resumes_with_a_range_request(server: FileServer, msd_tar: bytes,
                                                            tmp_path: Path) -> None:
    url = server.add("Task09_Spleen.tar", msd_tar)
    cut = len(msd_tar) // 3
    server.cut_after["/Task09_Spleen.tar"] = cut
    with pytest.raises(SpleenkitError, match="resume"):
        download_msd(tmp_path, url=url, md5=_md5(msd_tar), progress=False)
    part = tmp_path / "Task09_Spleen.tar.part"
    assert part.stat().st_size == cut
    dataset = download_msd(tmp_path, url=url, md5=_md5(msd_tar), progress=False)
    assert server.requests[-1] == ("/Task09_Spleen.tar", f"bytes={cut}-")
    assert not part.exists() and len(load_datalist(dataset)) == 3


def test_server_without_range_support_starts_over(server: FileServer, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 100
    url = server.add("blob.bin", payload)
    server.ignore_range = True
    (tmp_path / "blob.bin.part").write_bytes(b"stale bytes from another file")
    path = download_file(url, tmp_path / "blob.bin", sha256=hashlib.sha256(payload).hexdigest(), progress=False)
    assert path.read_bytes() == payload


def test_complete_partial_file_is_finished_without_downloading(server: FileServer, tmp_path: Path) -> None:
    payload = b"x" * 5000
    url = server.add("done.bin", payload)
    (tmp_path / "done.bin.part").write_bytes(payload)
    download_file(url, tmp_path / "done.bin", sha256=hashlib.sha256(payload).hexdigest(), progress=False)
    assert (tmp_path / "done.bin").read_bytes() == payload
    assert server.requests == [("/done.bin", "bytes=5000-")]


def test_missing_file_on_the_server_is_a_clear_error(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(SpleenkitError, match="HTTP 404"):
        download_file(f"{server.url}/nothing.tar", tmp_path / "nothing.tar", progress=False)


@pytest.mark.parametrize("entry, member", [
    (("../escaped.txt", b"evil"), "../escaped.txt"),
    (("Task09_Spleen/../../escaped.txt", b"evil"), "Task09_Spleen/../../escaped.txt"),
    (("/tmp/spleenkit-absolute.txt", b"evil"), "/tmp/spleenkit-absolute.txt"),
    (_link("Task09_Spleen/imagesTr/link", "../../../escaped.txt"), "Task09_Spleen/imagesTr/link"),
    (_link("Task09_Spleen/abs-link", "/etc/passwd"), "Task09_Spleen/abs-link"),
    (_link("Task09_Spleen/hard", "../outside.txt", tarfile.LNKTYPE), "Task09_Spleen/hard"),
])
def test_malicious_archives_are_refused(server: FileServer, tmp_path: Path, entry, member: str) -> None:
    payload = _tar([("Task09_Spleen/dataset.json", b"{}"), entry])
    url = server.add("Task09_Spleen.tar", payload)
    root = tmp_path / "root"
    with pytest.raises(BadInputError, match="unsafe") as caught:
        download_msd(root, url=url, md5=_md5(payload), progress=False)
    assert repr(member) in str(caught.value)
    assert sorted(p.name for p in root.iterdir()) == ["Task09_Spleen.tar"], "nothing may be extracted"
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/spleenkit-absolute.txt").exists()


def test_every_bad_member_is_named(tmp_path: Path) -> None:
    archive = tmp_path / "bad.tar"
    archive.write_bytes(_tar([("../a.txt", b"a"), ("/b.txt", b"b"), ("ok/c.txt", b"c")]))
    with pytest.raises(BadInputError) as caught:
        safe_extract(archive, tmp_path / "out")
    assert "'../a.txt'" in str(caught.value) and "'/b.txt'" in str(caught.value)
    assert "ok/c.txt" not in str(caught.value)


def test_truncated_archive_leaves_nothing_half_extracted(tmp_path: Path, msd_tar: bytes) -> None:
    archive = tmp_path / "cut.tar"
    archive.write_bytes(msd_tar[: len(msd_tar) // 2])
    with pytest.raises(BadInputError, match="cut.tar"):
        safe_extract(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_unwritable_download_folder_is_a_clear_error(server: FileServer, tmp_path: Path) -> None:
    url = server.add("blob.bin", b"data")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(BadInputError, match="a-file"):
        download_file(url, blocker / "sub" / "blob.bin", progress=False)


def test_cli_download_msd(server: FileServer, msd_tar: bytes, tmp_path: Path, capsys) -> None:
    url = server.add("Task09_Spleen.tar", msd_tar)
    args = ["data", "download", "msd", "--root", str(tmp_path), "--url", url, "-q"]
    assert main([*args, "--md5", "f" * 32]) == 2
    assert "md5" in capsys.readouterr().err
    assert main([*args, "--md5", _md5(msd_tar), "--remove-archive"]) == 0
    assert "Task09_Spleen" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task09_Spleen"]


# --------------------------------------------------------------------------- the example CT
def _multi_label_source(spleen_a: Path, folder: Path) -> bytes:
    """A stand-in for TotalSegmentator's multi-label file: spleen as 1, other organs as other labels."""
    image = nib.load(spleen_a)
    data = np.asanyarray(image.dataobj).copy()
    data[:8, :8, :8] = 5
    data[60:70, 40:50, 30:40] = 2
    path = folder / "multi-label.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine, image.header), path)
    return path.read_bytes()


def _served_example_files(server: FileServer, example_ct_dir: Path, folder: Path,
                          with_licence: bool = True) -> tuple:
    ct = server.add("example_ct.nii.gz", (example_ct_dir / "ct.nii.gz").read_bytes())
    seg = server.add("example_seg_fast_force_split.nii.gz",
                     _multi_label_source(example_ct_dir / "spleen_a.nii.gz", folder))
    spleen_b = server.add("spleen.nii.gz", (example_ct_dir / "spleen_b.nii.gz").read_bytes())
    licence = server.add("LICENSE", (example_ct_dir / "LICENSE").read_bytes()) if with_licence else None
    missing = f"{server.url}/moved-away.nii.gz"
    sources = {"ct.nii.gz": (missing, ct), "spleen_a.nii.gz": (seg,), "spleen_b.nii.gz": (spleen_b,),
               "LICENSE": (licence or missing,)}
    return tuple(dataclasses.replace(f, urls=sources[f.name]) for f in EXAMPLE_FILES)


def test_example_download_makes_the_pinned_files(server: FileServer, example_ct_dir: Path, tmp_path: Path,
                                                  monkeypatch) -> None:
    monkeypatch.delenv("SPLEENKIT_EXAMPLE_DIR", raising=False)
    files = _served_example_files(server, example_ct_dir, tmp_path)
    root = download_example(tmp_path / "example", files=files, progress=False)
    for item in EXAMPLE_FILES:
        assert hashlib.sha256((root / item.name).read_bytes()).hexdigest() == item.sha256
    assert sorted(p.name for p in root.iterdir()) == ["LICENSE", "README.md", "ct.nii.gz", "spleen_a.nii.gz",
                                                       "spleen_b.nii.gz"]
    asked = len(server.requests)
    download_example(root, files=files, progress=False)
    assert len(server.requests) == asked


def test_example_download_skips_an_unavailable_optional_licence(server: FileServer, example_ct_dir: Path,
                                                                tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SPLEENKIT_EXAMPLE_DIR", raising=False)
    files = _served_example_files(server, example_ct_dir, tmp_path, with_licence=False)
    root = download_example(tmp_path / "example", files=files, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["README.md", "ct.nii.gz", "spleen_a.nii.gz",
                                                       "spleen_b.nii.gz"]


def test_example_download_refuses_a_source_that_does_not_match(server: FileServer, example_ct_dir: Path,
                                                               tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SPLEENKIT_EXAMPLE_DIR", raising=False)
    url = server.add("changed.nii.gz", (example_ct_dir / "spleen_a.nii.gz").read_bytes())
    files = (dataclasses.replace(EXAMPLE_FILES[0], urls=(url,)),)
    with pytest.raises(ChecksumError, match="ct.nii.gz"):
        download_example(tmp_path / "example", files=files, progress=False)
    assert list((tmp_path / "example").iterdir()) == []


def test_example_from_a_local_copy(example_ct_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPLEENKIT_EXAMPLE_DIR", str(example_ct_dir))
    root = download_example(tmp_path / "example", progress=False)
    assert all((root / f.name).is_file() for f in EXAMPLE_FILES)
    bad = tmp_path / "bad-copy"
    bad.mkdir()
    for item in EXAMPLE_FILES:
        (bad / item.name).write_bytes((example_ct_dir / item.name).read_bytes())
    (bad / "spleen_b.nii.gz").write_bytes(b"not the mask")
    with pytest.raises(ChecksumError, match="spleen_b.nii.gz"):
        download_example(tmp_path / "other", local=bad, progress=False)
    assert list((tmp_path / "other").iterdir()) == []


@pytest.mark.parametrize("mask", ["spleen_a.nii.gz", "spleen_b.nii.gz"])
def test_example_as_an_msd_dataset(example_ct_dir: Path, tmp_path: Path, mask: str) -> None:
    dataset = example_as_msd(example_ct_dir, tmp_path / "example-msd", mask=mask)
    report = check_dataset(dataset)
    assert report.ok, report.problems
    assert report.cases[0].shape == (122, 101, 112) and 250 < report.cases[0].spleen_ml < 300
    label = nib.load(load_datalist(dataset)[0]["label"])
    assert label.get_data_dtype() == np.uint8


def test_cli_example_from_a_local_copy_as_a_dataset(example_ct_dir: Path, tmp_path: Path, monkeypatch,
                                                    capsys) -> None:
    monkeypatch.delenv("SPLEENKIT_EXAMPLE_DIR", raising=False)
    args = ["data", "download", "example", "--root", str(tmp_path / "ex"), "--local", str(example_ct_dir), "-q",
            "--as-dataset", str(tmp_path / "ex-msd")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "ex-msd") in out
    assert check_dataset(tmp_path / "ex-msd").ok
    assert main(["data", "check", str(tmp_path / "ex-msd")]) == 0

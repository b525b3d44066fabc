"""The one atomic writer: a failed write or check never replaces a good file, and new files get normal permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from spleenkit.errors import BadInputError
from spleenkit.io import atomic_write, write_bytes, write_json, write_text, write_with


def test_a_write_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    write_text(target, "first")
    write_text(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_an_error_while_writing_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = write_bytes(tmp_path / "model.pt", b"good")
    with pytest.raises(RuntimeError), atomic_write(target) as stream:
        stream.write(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_failed_check_keeps_the_old_file(tmp_path: Path) -> None:
    target = write_text(tmp_path / "export.json", "{}")

    def refuse(candidate: Path) -> None:
        assert candidate != target and candidate.read_text() == "bad"
        raise BadInputError("the new file is not valid", candidate)

    with pytest.raises(BadInputError):
        write_text(target, "bad", check=refuse)
    assert target.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["export.json"]


def test_new_files_get_the_permissions_of_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        written = [write_json(tmp_path / "a.json", {"a": 1}),
                   write_with(tmp_path / "b.nii.gz", lambda temporary: temporary.write_bytes(b"x"))]
    finally:
        os.umask(old)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_write_with_keeps_the_suffix_for_libraries_that_choose_a_format_by_name(tmp_path: Path) -> None:
    seen = []
    write_with(tmp_path / "mask.nii.gz", lambda temporary: (seen.append(temporary.name), temporary.write_bytes(b"")))
    assert seen[0].endswith(".nii.gz") and seen[0] != "mask.nii.gz"
    with pytest.raises(RuntimeError, match="no file"):
        write_with(tmp_path / "figure.png", lambda temporary: None)


def test_an_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BadInputError, match="cannot write"):
        write_text(blocker / "inside.txt", "x")

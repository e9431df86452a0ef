"""flowblend/atomic.py, the one atomic writer: the file appears whole or not at all, with the mode asked for, and a
folder that is gone is refused when the caller says so (a job folder deleted while its job ran stays deleted).
References: os.stat's modes, the directory listing."""
from __future__ import annotations

import os

import pytest

from flowblend.atomic import write_atomic


def test_the_file_is_written_whole_with_mkstemps_mode_unless_one_is_given(tmp_path):
    private = write_atomic(tmp_path / "a" / "private.json", "{}")  # parents made by default
    shared = write_atomic(tmp_path / "shared.json", b"[]", mode=0o644)
    assert private.read_text() == "{}" and shared.read_bytes() == b"[]"
    assert os.stat(private).st_mode & 0o777 == 0o600
    assert os.stat(shared).st_mode & 0o777 == 0o644


def test_a_file_made_by_a_writer_callable_gets_the_mode_too(tmp_path):
    path = write_atomic(tmp_path / "made.txt", lambda tmp: tmp.write_text("by a library"), mode=0o640)
    assert path.read_text() == "by a library" and os.stat(path).st_mode & 0o777 == 0o640


def test_a_missing_folder_is_refused_without_parents_and_nothing_is_made(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "gone" / "job.json", "{}", parents=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_atomic(tmp_path / "record.json", "old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(path, fails, mode=0o644)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]

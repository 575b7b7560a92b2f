"""lora_ops.atomic: a file appears whole under its name or not at all."""

import errno
import os

import pytest

from lora_ops.atomic import DiskFullError, atomic_path, check_space


def test_written_file_appears_under_its_name_only_when_the_block_ends(tmp_path):
    target = tmp_path / "new" / "file.txt"
    with atomic_path(str(target)) as temporary:
        assert os.path.basename(temporary) == f".file.txt.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            f.write("whole")
        assert not target.exists()
    assert target.read_text() == "whole"
    assert os.listdir(target.parent) == ["file.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(str(target)) as temporary:
            with open(temporary, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"]


def test_a_full_disk_names_the_file_and_the_free_space(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    full_disk = pytest.raises(DiskFullError, match=r"not enough disk space to write .*file\.txt: [0-9.]+ MiB free in")
    with full_disk as full, atomic_path(str(target)) as temporary:
        with open(temporary, "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(full.value, OSError) and full.value.errno == errno.ENOSPC
    assert isinstance(full.value.__cause__, OSError)  # the system's own error stays attached
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"]


def test_check_space_refuses_what_does_not_fit(tmp_path, monkeypatch):
    import shutil

    check_space(str(tmp_path / "small.bin"), 10)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(100, 99, 1 << 20))
    with pytest.raises(DiskFullError, match=r"big\.bin: it needs 2\.0 MiB, 1\.0 MiB free in"):
        check_space(str(tmp_path / "big.bin"), 2 << 20)
    assert os.listdir(tmp_path) == []

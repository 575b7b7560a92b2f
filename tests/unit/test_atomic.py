"""lora_ops.atomic: a file appears whole under its name or not at all."""

import os

import pytest

from lora_ops.atomic import atomic_path


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

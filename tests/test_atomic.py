import os
import stat

import pytest

from gpt2_decl.atomic import atomic_write


def test_the_new_content_replaces_the_old(tmp_path):
    target = tmp_path / "state.txt"
    target.write_text("old")
    with atomic_write(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["state.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "state.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.txt"]


def test_writing_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_write(tmp_path / "state.txt"):
            pass
    assert os.listdir(tmp_path) == []


def test_a_private_temporary_file_gets_ordinary_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "weights") as tmp:
            tmp.write_bytes(b"x")
            tmp.chmod(0o600)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "weights").stat().st_mode) == 0o644

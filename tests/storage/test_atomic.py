import os
import stat

import pytest

from gpt2_decl.storage import atomic
from gpt2_decl.storage.atomic import atomic_directory, atomic_write, carry_over, recover_directory


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


# --- directories -----------------------------------------------------------------------------


def listing(directory):
    return {path.name: path.read_text() for path in directory.iterdir()}


@pytest.fixture(params=["exchange", "two renames"])
def swap(request, monkeypatch):
    """Each test runs with Linux's atomic exchange and with the fallback of two renames."""
    if request.param == "two renames":
        monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    return request.param


def test_a_directory_is_replaced_whole_and_nothing_else_is_left(tmp_path, swap):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "a").write_text("old a")
    (target / "b").write_text("old b")
    with atomic_directory(target) as staging:
        (staging / "a").write_text("new a")
        assert listing(target) == {"a": "old a", "b": "old b"}  # nothing visible yet
    assert listing(target) == {"a": "new a"}
    assert os.listdir(tmp_path) == ["checkpoint"]


def test_carry_over_keeps_the_files_the_new_version_does_not_write(tmp_path, swap):
    target = tmp_path / "checkpoint"
    (target / "folder").mkdir(parents=True)
    (target / "weights").write_text("old weights")
    (target / "notes").write_text("keep me")
    (target / "folder" / "inner").write_text("keep me too")
    (target / "stale.bin").write_text("drop me")
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("new weights")
        carry_over(target, staging, skip=lambda name: name.endswith(".bin"))
    assert sorted(os.listdir(target)) == ["folder", "notes", "weights"]
    assert (target / "weights").read_text() == "new weights"
    assert (target / "folder" / "inner").read_text() == "keep me too"


def test_a_failed_block_leaves_the_old_directory_and_no_debris(tmp_path, swap):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_directory(target) as staging:
        (staging / "a").write_text("half")
        raise RuntimeError("disk on fire")
    assert listing(target) == {"a": "old"}
    assert os.listdir(tmp_path) == ["checkpoint"]


def test_a_new_directory_appears_whole(tmp_path):
    with atomic_directory(tmp_path / "fresh") as staging:
        (staging / "a").write_text("a")
    assert listing(tmp_path / "fresh") == {"a": "a"}


def test_leftovers_of_a_crashed_swap_are_recovered_or_removed(tmp_path):
    target = tmp_path / "checkpoint"
    # A crash between the two renames of the fallback: the old version aside, the new one staged.
    retired = tmp_path / ".checkpoint.0123.retired"
    staging = tmp_path / ".checkpoint.4567.staging"
    for directory, text in ((retired, "old"), (staging, "new")):
        directory.mkdir()
        (directory / "a").write_text(text)
    assert recover_directory(target)
    assert listing(target) == {"a": "old"}
    with atomic_directory(target) as new:
        (new / "a").write_text("newer")
    assert os.listdir(tmp_path) == ["checkpoint"]
    assert listing(target) == {"a": "newer"}

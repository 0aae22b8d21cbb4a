"""A directory held by one process at a time, taken over when its holder dies."""

import os
import signal
import subprocess
import sys

import pytest

from gpt2_decl.storage import lock
from gpt2_decl.storage.lock import LOCK_FILE, DirectoryInUseError, DirectoryLock

# The holder loads the lock's module from its file alone (it needs only the standard library):
# importing the package would start torch, seconds a process.
HOLD_AND_WAIT = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("lock", sys.argv[2])
lock_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock_module)
lock = lock_module.DirectoryLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding `tmp_path / "out"`, and its Popen."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, str(tmp_path / "out"),
                                lock.__file__], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path, holder):
    with pytest.raises(DirectoryInUseError) as refused, DirectoryLock(tmp_path / "out"):
        pass
    message = str(refused.value)
    assert f"(PID {holder.pid})" in message and str(tmp_path / "out") in message
    assert "\n" not in message


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "out" / LOCK_FILE).exists()  # the kill left the file behind
    with DirectoryLock(tmp_path / "out"):
        assert (tmp_path / "out" / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_letting_go_removes_the_lock_file_and_frees_the_directory(tmp_path):
    with DirectoryLock(tmp_path / "out"):
        pass
    assert os.listdir(tmp_path / "out") == []
    with DirectoryLock(tmp_path / "out"):
        pass

"""An exclusive claim on a directory for the life of a process: two training runs never write
into one output directory at once.

The claim is an advisory lock (`flock`) on a file in the directory that holds the owner's PID.
The kernel drops the lock when its process ends, however it ends, so a claim left by a crashed or
killed run is simply taken over; the file is removed when the owner lets go.
"""

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".gpt2_decl.lock"


class DirectoryInUseError(RuntimeError):
    """Another live process holds the directory."""


class DirectoryLock:
    """`with DirectoryLock(directory):` holds `directory` (created if needed) or raises
    DirectoryInUseError naming the process that holds it."""

    def __init__(self, directory: str | os.PathLike, what: str = "a training run"):
        self.directory, self.what = Path(directory), what
        self.descriptor: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    def acquire(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "?"
                os.close(descriptor)
                raise DirectoryInUseError(
                    f"{self.directory} is in use by {self.what} (PID {holder}); wait for it to "
                    "end or choose another directory"
                ) from None
            # The owner before us may have removed the file between our open and our lock:
            # then we hold a lock on a file nobody else will look at, so try again.
            try:
                if os.path.samestat(os.fstat(descriptor), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self.descriptor = descriptor

    def release(self) -> None:
        if self.descriptor is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.descriptor)
        self.descriptor = None

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

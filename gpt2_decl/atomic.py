"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one."""

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block ends, move it over `path` atomically.

    Write the file to the yielded path by any means (`Path.write_text`, `torch.save`,
    `safetensors.torch.save_file`, ...). On leaving the block it is flushed to disk and renamed
    onto `path` (`os.replace`, atomic within one file system, hence the same directory). If the
    block raises, the temporary file is removed and `path` is left untouched.

        with atomic_write("run/checkpoint.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    # A dot-name in the same directory: hidden from listings and on the same file system.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic_write({str(path)!r}): nothing was written to {tmp}")
        # Some writers (safetensors among them) create private 0600 files: give the result the
        # permissions any new file gets here.
        os.chmod(tmp, _NEW_FILE_MODE & ~_current_umask())
        _fsync(tmp, os.O_RDWR)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself lives in the directory: sync it too, or a crash can undo it (POSIX only).
    if os.name == "posix":
        _fsync(path.parent, os.O_RDONLY)


_NEW_FILE_MODE = 0o666


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Atomic writes of files and directories: a reader, or a crash, sees the old version or the whole
new one, never a half-written one."""

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
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


# Names of the sibling directories a directory swap works in: the new contents while they are
# written, and the old ones while they wait to be removed.
_STAGING, _RETIRED = "staging", "retired"


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty directory beside `path`; once the block ends, it replaces `path` in one
    atomic step, so a reader (or a crash) sees all of the old directory or all of the new one.

    Files written into the yielded directory are flushed to disk first; to keep files of the
    old `path`, the block calls `carry_over`. If the block raises, `path` is untouched. On
    Linux the swap is one `renameat2(RENAME_EXCHANGE)`; where that is missing, the old directory
    is moved aside and the new one moved in, and `recover_directory` puts the old one back if a
    crash fell between the two. Leftovers of earlier interrupted swaps are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
        _recover(path)
        _remove_leftovers(path)
        staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.{_STAGING}")
        staging.mkdir()
        with _staged(staging, path) as yielded:
            yield yielded


@contextlib.contextmanager
def _staged(staging: Path, path: Path) -> Iterator[Path]:
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                _fsync(file, os.O_RDONLY)
        _fsync(staging, os.O_RDONLY)
        if path.exists():
            retired = path.with_name(f".{path.name}.{uuid.uuid4().hex}.{_RETIRED}")
            if _exchange(staging, path):
                staging.rename(retired)
            else:
                path.rename(retired)
                try:
                    staging.rename(path)
                except BaseException:
                    retired.rename(path)  # the old version back where it was
                    raise
            if os.name == "posix":
                _fsync(path.parent, os.O_RDONLY)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(path)
            if os.name == "posix":
                _fsync(path.parent, os.O_RDONLY)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def carry_over(old: Path, new: Path, skip: Callable[[str], bool]) -> None:
    """Link (or copy) into `new` every file and folder of `old` that `new` lacks and `skip(name)`
    does not refuse: what a directory swap should keep of the directory it replaces."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or skip(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def recover_directory(path: str | os.PathLike) -> bool:
    """Put back the old directory that an interrupted two-step swap left aside, if `path` is
    missing because of it; return whether it did. Waits for a swap in progress to end."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    with _locked(path.parent):
        return _recover(path)


def _recover(path: Path) -> bool:
    if path.exists():
        return False
    retired = sorted(
        path.parent.glob(f".{glob.escape(path.name)}.*.{_RETIRED}"), key=os.path.getmtime
    )
    if not retired:
        return False
    retired[-1].rename(path)
    return True


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `directory` itself (none off POSIX): swaps of its
    entries then never clean up after each other while both run."""
    if os.name != "posix":
        yield
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without such locks (NFS wants a file open for writing): go on
        yield
    finally:
        os.close(descriptor)


def _remove_leftovers(path: Path) -> None:
    for suffix in (_STAGING, _RETIRED):
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.{suffix}"):
            shutil.rmtree(leftover, ignore_errors=True)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux's renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
    ]
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(second))

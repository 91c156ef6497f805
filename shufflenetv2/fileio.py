"""Atomic file writes: a reader (or a crash) never sees half a file under the final name."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import StorageError

_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there or choose another folder",
    errno.EDQUOT: "the disk quota is used up: free space there or choose another folder",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit or free space",
    errno.EROFS: "the file system is mounted read-only: choose a writable folder",
    errno.EACCES: "permission denied: fix the folder's permissions or choose another folder",
    errno.EPERM: "permission denied: fix the folder's permissions or choose another folder",
}


def storage_error(exc: OSError, path: str | os.PathLike[str], what: str) -> StorageError:
    """One sentence for a failed write: what could not be written, the system's reason, what to do."""
    advice = _ADVICE.get(exc.errno or 0, "check the folder and the disk")
    return StorageError(f"cannot write {what} {path}: {exc.strerror or exc} ({advice})")


def check_writable(directory: str | os.PathLike[str], what: str) -> None:
    """Fail now, not hours from now at the first checkpoint, when ``directory`` cannot take files."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / ".write-test") as tmp:
            tmp.write_bytes(b"ok")
        (directory / ".write-test").unlink()
    except OSError as exc:
        raise storage_error(exc, directory, what) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the mode a plain open() would
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def torch_bytes(obj: object) -> bytes:
    """``torch.save`` into memory.  Writing the bytes with Python then fails with the system's OSError
    (ENOSPC, EROFS...); torch's own file writer reports a full disk as an unexplained RuntimeError."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()

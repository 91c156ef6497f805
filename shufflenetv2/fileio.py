"""Atomic file writes (a reader, or a crash, never sees half a file under the final name), and the lock
that keeps a run's folder to that one run."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import DirectoryInUse, StorageError

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
    probe = directory / f".write-test-{os.getpid()}.tmp"  # its own name: another process may probe at once
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(probe) as tmp:
            tmp.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise storage_error(exc, directory, what) from None


class RunLock:
    """A folder claimed by ``lock_run_directory``; ``release()`` lets another run in."""

    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle
        _HELD.add(self)

    def release(self) -> None:
        self.handle.close()
        _HELD.discard(self)


_HELD: set[RunLock] = set()


def _close_held_locks_in_child() -> None:
    """flock belongs to the open file, which fork shares: a DataLoader worker that outlives its killed run
    by a few seconds would still hold the folder, and the run torchrun restarts would find it in use.
    Closing the child's copy leaves the parent's lock in place."""
    for lock in _HELD:
        lock.handle.close()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


def lock_run_directory(directory: str | os.PathLike[str]) -> RunLock | None:
    """Claim ``directory`` for this training run, or raise DirectoryInUse naming the run that holds it.

    Two runs writing one folder (the same command started twice, a scheduler's retry while the first job
    still runs) would interleave checkpoints and records, and each run's start-up removes the temporary
    files an interrupted save left, which would be the other run's saves in flight.  The lock is an
    advisory ``flock`` on ``.run.lock``: the kernel drops it when the holder exits, however it exits, so a
    crashed run never leaves the folder locked.  None where the platform or file system has no such lock
    (the run goes on unguarded).
    """
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    path = Path(directory) / ".run.lock"
    try:  # held open for the run, so no with-block; "a+": opening must not erase the holder's description
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115
    except OSError:  # check_writable has passed; a folder that still refuses this file goes unguarded
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not described itself yet"
        handle.close()
        raise DirectoryInUse(
            f"{directory} is in use by another training run ({holder}); wait for it to finish or stop it, or give "
            "this run another ckpt_save_dir (and output_dir)"
        ) from None
    except OSError:  # a file system without flock (some network mounts)
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {' '.join(sys.argv)}\n")
    handle.flush()
    return RunLock(handle)


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

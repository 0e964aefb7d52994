"""Opening a checkpoint file for reading: the one place every reader goes through.

A plain ``open()`` of a FIFO blocks until a writer appears, and a character device
such as ``/dev/zero`` never ends; both can sit under a checkpoint's name. So a file
is opened without blocking (``O_NONBLOCK``: a FIFO opens at once, and the flag does
nothing to a regular file), ``fstat``-ed, and refused unless it is a regular file,
before a byte of it is read. Symlinks are followed: a path the caller names may be
a link to a checkpoint; what it points to must be a regular file like any other.

h5py opens files by name. It is handed ``/proc/self/fd/N`` of the descriptor checked
here, which reopens that very inode, so the file libhdf5 parses is the one checked,
even if the name was replaced in between.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import h5py

from . import _native
from .errors import CheckpointCorruptError, CheckpointValueError
from .staging import oserror_to_checkpoint

__all__ = ["checkpoint_kind", "file_kind", "open_hdf5", "open_regular", "read_head"]

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
_PROC_FD = Path("/proc/self/fd")

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def open_regular(path: str | os.PathLike[str], action: str = "open checkpoint") -> int:
    """A read-only descriptor of the regular file ``path`` (the caller closes it).

    Raises
    ------
    CheckpointValueError
        When ``path`` is a directory, FIFO, device or socket (nothing was read).
    CheckpointError
        The matching subclass when the file cannot be opened.
    """
    try:
        fd = os.open(path, _FLAGS)
    except OSError as exc:
        raise oserror_to_checkpoint(exc, action, path) from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise oserror_to_checkpoint(exc, "stat", path) from exc
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise CheckpointValueError(
            f"{path} is {kind}, not a regular file: not a checkpoint",
            {"path": str(path), "reason": "not a regular file"},
        )
    return fd


def read_head(fd: int, path: str | os.PathLike[str], size: int = 8) -> bytes:
    """The first ``size`` bytes of an open file (fewer if it is shorter)."""
    try:
        return os.pread(fd, size, 0)
    except OSError as exc:
        raise oserror_to_checkpoint(exc, "read", path) from exc


def file_kind(path: str | os.PathLike[str], action: str = "open checkpoint") -> str:
    """``"h5ckpt"``, ``"legacy"`` or ``"foreign"``, from the first bytes of the regular
    file ``path`` by the Rust core's check (the one the directory scan uses)."""
    fd = open_regular(path, action)
    try:
        head = read_head(fd, path)
    finally:
        os.close(fd)
    return _native.file_kind(head)


def checkpoint_kind(path: str | os.PathLike[str], action: str = "open checkpoint") -> str:
    """``"h5ckpt"`` or ``"legacy"``, as :func:`file_kind`.

    Raises
    ------
    CheckpointCorruptError
        When the file is neither (``reason`` ``"foreign"``).
    """
    kind = file_kind(path, action)
    if kind == "foreign":
        raise CheckpointCorruptError(
            f"{path} is not a checkpoint file (neither an h5ckpt header nor an HDF5 signature)",
            {"path": str(path), "reason": "foreign"},
        )
    return kind


@contextlib.contextmanager
def open_hdf5(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """``h5py.File`` of the regular file ``path``, read-only, without HDF5 file locking."""
    fd = open_regular(path)
    try:
        name = _PROC_FD / str(fd)
        # Without /proc the name is opened again: only the check above guards it.
        source = name if name.exists() else Path(path)
        f = h5py.File(source, "r", locking=False)
    finally:
        os.close(fd)
    with f:
        yield f

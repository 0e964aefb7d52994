"""The verified read: a whole h5ckpt file read once into memory and verified there.

Loading parses those bytes, never the file again: a file replaced or changed on disk
after it was read cannot be parsed unverified. :func:`read_verified` fills a numpy
buffer (the loaded arrays become views of it); :func:`verified_copy` fills a private
memory file, sealed once verified, for readers that parse through a descriptor
(``h5ckpt show``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import _native
from .errors import CheckpointError, CheckpointResourceError
from .limits import LoadLimits
from .opening import open_regular, read_head
from .payload import read_payload
from .staging import oserror_to_checkpoint
from .verification import check_size

__all__ = ["load_verified", "read_verified", "read_verified_fd", "verified_copy"]

#: The buffers a verified read fills: loading's numpy array, or a memory mapping.
_Out = TypeVar("_Out", np.ndarray, mmap.mmap)


def read_verified(
    path: Path, key: bytes | None, limits: LoadLimits
) -> tuple[_native.Header, np.ndarray]:
    """The whole file, read once into fresh memory and verified from it.

    The memory is a numpy buffer: its large raw arrays become the loaded arrays
    (views), so loading touches their bytes once. The header, the file's length and
    its size against ``limits`` and the machine's memory are checked before the
    buffer is allocated.
    """
    fd = open_regular(path)
    try:
        return read_verified_fd(fd, path, key, limits, _numpy_buffer)
    finally:
        os.close(fd)


def load_verified(
    path: Path, key: bytes | None, allow_pickle: bool, limits: LoadLimits
) -> tuple[_native.Header, dict[str, Any]]:
    """Verify every byte of one h5ckpt file, then parse it: its header and state.

    An error of the parse names the file: the payload reader knows only the bytes.
    """
    header, data = read_verified(path, key, limits)
    try:
        result = read_payload(data, header, allow_pickle=allow_pickle, limits=limits)
    except CheckpointError as exc:
        exc.error_context.setdefault("path", str(path))
        if str(path) not in exc.message:
            exc.message = f"{path}: {exc.message}"
            exc.args = (exc.message,)
        raise
    return header, result


def read_verified_fd(
    fd: int,
    path: Path,
    key: bytes | None,
    limits: LoadLimits,
    allocate: Callable[[Path, int], _Out],
) -> tuple[_native.Header, _Out]:
    """The file open at ``fd`` (named ``path`` in messages) read into
    ``allocate(path, size)``, a writable buffer of its size, and verified there."""
    size = os.fstat(fd).st_size
    head = read_head(fd, path, _native.HEADER_SIZE)
    try:
        header = _native.parse_header(head)
    except CheckpointError as exc:
        exc.message = f"{path}: {exc.message}"
        exc.args = (exc.message,)
        exc.error_context.setdefault("path", str(path))
        raise
    check_size(path, header, size, limits)
    _check_memory(path, size)
    out = allocate(path, size)
    return _native.read_verified_fd(fd, out, key, path), out


def _numpy_buffer(path: Path, size: int) -> np.ndarray:
    try:
        return np.empty(size, dtype=np.uint8)
    except MemoryError as exc:
        raise _out_of_memory(path, size) from exc


def _out_of_memory(path: Path, size: int) -> CheckpointResourceError:
    return CheckpointResourceError(
        f"cannot load {path}: out of memory for its {size} bytes (the file is not "
        "at fault; free memory or raise the process's memory limit)",
        {"path": str(path), "size_bytes": size, "resource": "memory"},
    )


def _check_memory(path: Path, size: int) -> None:
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if size > memory:
        raise CheckpointResourceError(
            f"cannot load {path}: it is {size} bytes, more than this machine's "
            f"{memory} bytes of memory",
            {"path": str(path), "size_bytes": size, "memory_bytes": memory, "resource": "memory"},
        )


@contextlib.contextmanager
def verified_copy(
    fd: int, path: Path, key: bytes | None, limits: LoadLimits
) -> Iterator[tuple[_native.Header, int]]:
    """The header and a descriptor of a private copy of the file open at ``fd``,
    read once and verified (see :func:`read_verified_fd`).

    The copy is a memory file that nothing else has opened; where the system can
    seal it (``memfd``), it is sealed against every change once verified, so what is
    parsed through the descriptor is byte for byte what was verified.
    """
    copy, sealable = _private_file()
    try:
        mapping: mmap.mmap | None = None

        def allocate(path: Path, size: int) -> mmap.mmap:
            nonlocal mapping
            try:
                if hasattr(os, "posix_fallocate"):
                    # The memory is taken now: a page that could not be had later
                    # would be a SIGBUS in the middle of the read.
                    os.posix_fallocate(copy, 0, size)
                else:
                    os.ftruncate(copy, size)
                mapping = mmap.mmap(copy, size)
            except OSError as exc:
                if exc.errno in (errno.ENOMEM, errno.ENOSPC):
                    raise _out_of_memory(path, size) from exc
                raise oserror_to_checkpoint(exc, "make a private copy of", path) from exc
            return mapping

        try:
            header, _ = read_verified_fd(fd, path, key, limits, allocate)
        finally:
            if mapping is not None:
                mapping.close()
        if sealable:
            seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
            fcntl.fcntl(copy, fcntl.F_ADD_SEALS, seals)
        yield header, copy
    finally:
        os.close(copy)


def _private_file() -> tuple[int, bool]:
    """A descriptor of a new, nameless file; whether it can be sealed."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("h5ckpt-verified", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING), True
    with tempfile.TemporaryFile() as f:  # elsewhere: an unlinked file of our own
        return os.dup(f.fileno()), False

"""Type stubs for the Rust core, ``h5ckpt._native``.

Private: users import from ``h5ckpt``. Every function that touches files or hashes
releases the GIL. Errors are raised as the classes of :mod:`h5ckpt.errors`.
"""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, final

import numpy as np
from typing_extensions import Buffer, Self

from .errors import CheckpointError

_Path = str | os.PathLike[str]
# numpy declares ndarray.__buffer__ only for Python 3.12+; the module takes any buffer.
_Buffer = Buffer | np.ndarray[Any, Any]

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_OS_ERROR_CLASS",
    "ERRNO_CLASSES",
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "HDF5_SIGNATURE",
    "HEADER_SIZE",
    "MAGIC",
    "STATUS_INVALID",
    "STATUS_LEGACY",
    "STATUS_UNVERIFIED",
    "STATUS_VALID",
    "Catalog",
    "CheckpointInfo",
    "Header",
    "__version__",
    "blosc_compress_chunks",
    "blosc_max_frame_len",
    "blosc_ratio",
    "checkpoint_batch",
    "checkpoint_name",
    "checkpoint_name_parts",
    "file_kind",
    "finalize",
    "fsync_directory",
    "parse_header",
    "plan_retention",
    "read_header",
    "read_verified_fd",
    "seal_image",
    "start_writeback",
    "tree_digest",
    "verify_fds",
    "verify_files",
]

__version__: str
MAGIC: bytes
HEADER_SIZE: int
FORMAT_MAJOR: int
FORMAT_MINOR: int
DEFAULT_CHUNK_SIZE: int
HDF5_SIGNATURE: bytes

@final
class Header:
    """A parsed, self-consistent h5ckpt header (its header digest checked)."""

    format_major: int
    format_minor: int
    payload_offset: int
    payload_length: int
    chunk_size: int
    chunk_count: int
    flags: int
    keyed: bool
    batch_idx: int
    loss: float
    timestamp: float
    payload_digest: bytes
    hmac_tag: bytes | None
    header_digest: bytes
    def to_dict(self) -> dict[str, object]: ...

_Status = Literal["valid", "invalid", "legacy", "unverified"]

@final
class CheckpointInfo:
    """One checkpoint file of a directory, as ``CheckpointManager.list_checkpoints``
    reports it. Immutable; equal when every public field is (NaN equal to NaN).

    ``status`` is ``"valid"`` (an h5ckpt file, every byte verified), ``"unverified"``
    (h5ckpt header intact, payload not hashed yet), ``"legacy"`` (a file of the
    predecessor's format; checked when ``verified`` is true) or ``"invalid"``
    (corrupt, truncated, tampered, foreign content; ``error`` says why).
    """

    def __new__(
        cls,
        path: _Path,
        batch_idx: int,
        loss: float,
        timestamp: float,
        size_bytes: int,
        status: _Status,
        verified: bool = False,
        error: str | None = None,
    ) -> Self: ...
    @property
    def path(self) -> Path:
        """The file (a ``pathlib.Path``)."""
    @property
    def batch_idx(self) -> int:
        """Batch index, from the file name."""
    @property
    def loss(self) -> float:
        """Loss at that batch (NaN when unknown)."""
    @property
    def timestamp(self) -> float:
        """Save time, seconds since the epoch (NaN when unknown)."""
    @property
    def size_bytes(self) -> int:
        """File size in bytes."""
    @property
    def status(self) -> _Status:
        """``"valid"``, ``"unverified"``, ``"legacy"`` or ``"invalid"``."""
    @property
    def verified(self) -> bool:
        """Whether the whole file was checked for this status."""
    @property
    def error(self) -> str | None:
        """Why the file is invalid (None otherwise)."""
    @property
    def is_valid(self) -> bool:
        """True when the file was verified intact (h5ckpt or legacy)."""
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class Catalog:
    """The checkpoint files of one directory and prefix, with what verifying them
    showed, by file identity (device, inode, size, mtime, ctime). Thread-safe."""

    def __new__(cls, directory: _Path, prefix: str, keyed: bool) -> Self: ...
    def list(self) -> tuple[list[CheckpointInfo], list[int]]:
        """Scan the directory again, reading only files whose identity changed:
        ``(infos by batch index, indices of the legacy files whose loss and timestamp
        are still to be read)``. An unchanged file gets the same info object back."""
    def note(
        self,
        info: CheckpointInfo,
        status: _Status | None = None,
        error: str | None = None,
        loss: float | None = None,
        timestamp: float | None = None,
    ) -> CheckpointInfo:
        """Attach a verification result and/or a legacy file's loss and timestamp to
        the file ``info`` describes, if it has not changed since; return the info
        object that shows it."""
    def remember(self, name: str, status: _Status, error: str | None = None) -> None:
        """Record a verification result for the file ``name`` as it is now."""
    def forget(self, name: str) -> None:
        """Forget the file ``name``."""
    def __len__(self) -> int: ...
    def __contains__(self, key: str, /) -> bool: ...

def tree_digest(data: _Buffer, chunk_size: int | None = None) -> bytes:
    """Payload digest (docs/format.md) of an in-memory byte string.

    ``data``: any C-contiguous buffer (bytes, bytearray, memoryview, numpy array of any
    dtype), read as raw bytes. ``chunk_size``: a power of two from 4096 to 2**30 (None:
    ``DEFAULT_CHUNK_SIZE``).
    """

def parse_header(data: bytes) -> Header:
    """Parse and check the first 512 bytes of a file (no payload check)."""

def read_header(path: _Path) -> Header:
    """Read and parse a file's header; checks the file length against it."""

def verify_files(
    paths: Sequence[_Path], hmac_key: bytes | None = None
) -> list[Header | CheckpointError]:
    """Check header, length, payload digest and (keyed) HMAC tag of many files in
    parallel; failures are returned, not raised."""

def verify_fds(
    fds: Sequence[int], paths: Sequence[_Path], hmac_key: bytes | None = None
) -> list[Header | CheckpointError]:
    """``verify_files`` of open descriptors (kept open, offsets unchanged), in parallel:
    the open files are verified, whatever their names point to by now. ``paths``
    name them in messages. Failures are returned, not raised."""

def read_verified_fd(
    fd: int, out: _Buffer, hmac_key: bytes | None = None, path: _Path | None = None
) -> Header:
    """Read the open file ``fd`` into the writable buffer ``out`` and verify it.

    ``out`` must be exactly as long as the file (else ``CheckpointCorruptError``:
    the file changed). The descriptor is neither closed nor moved. Every byte of
    ``out`` is overwritten on success. ``path`` names the file in messages.
    """

def finalize(
    fd: int,
    segments: Sequence[tuple[int, _Buffer]],
    batch_idx: int,
    loss: float,
    timestamp: float,
    hmac_key: bytes | None = None,
    durable: bool = True,
    chunk_size: int | None = None,
) -> Header:
    """Complete a payload written by HDF5 and seal it with a header.

    Writes each ``(file_offset, bytes)`` segment into the open file ``fd`` while hashing
    the payload (the segments from memory, everything else read back from the file),
    writes the header at offset 0 and, when ``durable``, fsyncs ``fd``.

    ``fd`` stays open (the caller owns it); it must be open for reading and writing,
    not in append mode. Segments are C-contiguous buffers read as raw bytes; they must
    lie inside ``[512, file length)`` without overlapping.
    """

def seal_image(
    fd: int,
    image: bytes,
    batch_idx: int,
    loss: float,
    timestamp: float,
    hmac_key: bytes | None = None,
    durable: bool = True,
    chunk_size: int | None = None,
) -> Header:
    """Write a whole checkpoint into the empty file ``fd``: the header, then
    ``image`` (the payload: the file from offset 512 on), in one write, digests
    computed from ``image``; when ``durable``, fsync ``fd``.

    ``fd`` stays open (the caller owns it) and must be writable.
    """

def plan_retention(
    candidates: Sequence[tuple[int, bool, float]],
    keep_last_n: int | None,
    keep_every: int | None = None,
    keep_best_n: int | None = None,
    maximize: bool = False,
    delete_invalid: bool = False,
) -> list[int]:
    """Indices of ``(batch_idx, valid, loss)`` candidates that the policy deletes.

    None means no such rule (``keep_best_n`` None keeps no best-by-loss files)."""

def blosc_compress_chunks(
    data: _Buffer, chunk_bytes: int, typesize: int, out: _Buffer
) -> list[int]:
    """Blosc frames (byte shuffle + LZ4) of consecutive ``chunk_bytes`` pieces of ``data``.

    The last piece is padded with zeros to ``chunk_bytes``, as HDF5 stores edge
    chunks. Frame ``i`` is written to the writable buffer ``out`` at
    ``i * blosc_max_frame_len(chunk_bytes)``; returns the frame lengths. Compressed
    on all cores with the GIL released; each frame is what HDF5's Blosc filter
    (id 32001) decompresses.
    """

def blosc_max_frame_len(chunk_bytes: int) -> int:
    """Bytes of ``out`` one frame of a ``chunk_bytes`` chunk may need."""

def blosc_ratio(data: _Buffer, typesize: int) -> float:
    """Compressed over raw size of ``data`` as ``blosc_compress_chunks`` stores it."""

def start_writeback(fd: int, offset: int | None = None, length: int | None = None) -> None:
    """Start writing the dirty pages of a file range to the disk, without waiting.

    ``offset`` defaults to 0; ``length`` 0 or None means to the end of the file. Only a hint (Linux
    ``sync_file_range``; nothing elsewhere): errors surface at the next fsync.
    """

def fsync_directory(path: _Path) -> None:
    """fsync a directory, so that a rename in it is durable."""

# One definition of each rule, owned by the Rust core.
STATUS_VALID: Literal["valid"]
STATUS_INVALID: Literal["invalid"]
STATUS_LEGACY: Literal["legacy"]
STATUS_UNVERIFIED: Literal["unverified"]
ERRNO_CLASSES: dict[int, str]
DEFAULT_OS_ERROR_CLASS: str

def checkpoint_batch(name: str, prefix: str) -> int | None:
    """The batch index of a checkpoint file name of ``prefix``, or ``None``."""

def checkpoint_name_parts(name: str) -> tuple[str, int] | None:
    """``(prefix, batch_idx)`` of a checkpoint file name of any prefix, or ``None``."""

def checkpoint_name(prefix: str, batch_idx: int) -> str:
    """The file name of the checkpoint of ``batch_idx`` under ``prefix``."""

def file_kind(head: bytes) -> str:
    """``"h5ckpt"``, ``"legacy"`` or ``"foreign"`` from a file's first bytes."""

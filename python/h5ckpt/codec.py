"""How each array is laid out in the file: raw, or chunked through a compression filter.

``"auto"`` compresses an array only when a sample of it shrinks enough to pay for the
CPU time: most optimizer states (random-looking float64) do not, and storing them raw
lets the Rust core write them straight into the space HDF5 allocated for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from . import _native
from .errors import CheckpointValueError

__all__ = ["COMPRESSIONS", "SMALL_ARRAY_BYTES", "chunk_shape", "filter_options", "resolve"]

#: Arrays smaller than this are stored without filters: compression cannot win much.
SMALL_ARRAY_BYTES = 64 * 1024
#: Target size of one HDF5 chunk of a compressed dataset.
CHUNK_BYTES = 1 << 20
#: ``"auto"`` compresses when a sample shrinks to at most this fraction.
AUTO_MAX_RATIO = 0.8
_SAMPLE_PIECES = 4
_SAMPLE_PIECE_BYTES = 64 * 1024

COMPRESSIONS = ("auto", "lz4", "zstd", "gzip", None)


def resolve(enable_compression: bool, compression: object) -> str | None:
    """The compression setting a manager uses, from its two arguments.

    ``compression`` wins when given; otherwise ``enable_compression`` picks ``"auto"``
    or ``None``.
    """
    # Only text is compared: `x in COMPRESSIONS` with an array x compares elementwise.
    is_text = isinstance(compression, str)
    if is_text and compression == "default":
        return "auto" if enable_compression else None
    if compression is not None and not (is_text and compression in COMPRESSIONS):
        raise CheckpointValueError(
            f"compression must be one of {COMPRESSIONS!r}, got {compression!r}",
            {"compression": repr(compression)},
        )
    return compression


def filter_options(codec: str) -> Mapping[str, Any]:
    """``create_dataset`` keyword arguments of a named codec (byte shuffle + codec)."""
    if codec == "lz4":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if codec == "zstd":
        return dict(hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if codec == "gzip":
        # Built into every HDF5: readable without hdf5plugin.
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    raise CheckpointValueError(f"unknown codec {codec!r}", {"compression": codec})


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """A chunk shape of about ``CHUNK_BYTES``, whole trailing rows where they fit."""
    chunk = list(shape)
    budget = max(1, CHUNK_BYTES // itemsize)
    # Shrink from the leading axis: trailing axes stay whole so chunks are contiguous runs.
    for axis in range(len(chunk)):
        inner = int(np.prod(chunk[axis + 1 :], dtype=np.int64)) or 1
        chunk[axis] = max(1, min(chunk[axis], budget // inner))
        if int(np.prod(chunk, dtype=np.int64)) <= budget:
            break
    return tuple(max(1, c) for c in chunk)


def codec_for(arr: np.ndarray, compression: str | None) -> str | None:
    """The codec an array is written with, or ``None`` for raw storage."""
    if compression is None or arr.nbytes < SMALL_ARRAY_BYTES or arr.ndim == 0:
        return None
    if compression == "auto":
        return "lz4" if _sample_ratio(arr, "lz4") <= AUTO_MAX_RATIO else None
    return compression


def native_lz4(arr: np.ndarray, codec: str, chunks: tuple[int, ...]) -> bool:
    """Whether the Rust core compresses ``arr``'s chunks (on all cores) for ``codec``.

    It writes the same Blosc frames (byte shuffle + LZ4) as the HDF5 filter, for
    C-contiguous arrays whose chunks are whole runs of leading-axis rows.
    """
    return (
        codec == "lz4"
        and arr.ndim >= 1
        and arr.flags.c_contiguous
        and 1 <= arr.itemsize <= 255
        and tuple(chunks[1:]) == tuple(arr.shape[1:])
    )


def _sample_ratio(arr: np.ndarray, codec: str) -> float:
    """Compressed/raw size of a few evenly spaced pieces of ``arr``."""
    flat = arr.reshape(-1)
    piece = max(1, _SAMPLE_PIECE_BYTES // arr.itemsize)
    if flat.size <= piece * _SAMPLE_PIECES:
        sample = flat
    else:
        starts = np.linspace(0, flat.size - piece, _SAMPLE_PIECES).astype(np.int64)
        sample = np.concatenate([flat[s : s + piece] for s in starts])
    if codec == "lz4" and 1 <= arr.itemsize <= 255:
        # The frames the Rust core writes: no HDF5 file needed to size them.
        return _native.blosc_ratio(np.ascontiguousarray(sample), arr.itemsize)
    # The core driver tells files apart by name: a name shared by two threads
    # sampling at once makes the second creation fail ("already open").
    name = f"h5ckpt-sample-{id(sample)}"
    with h5py.File(name, "w", driver="core", backing_store=False) as f:
        ds = f.create_dataset("s", data=sample, chunks=(piece,), **filter_options(codec))
        stored = ds.id.get_storage_size()
    return stored / max(1, sample.nbytes)

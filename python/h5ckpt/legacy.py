"""Files written by the predecessor (homodyne's ``CheckpointManager``).

They have no h5ckpt header: a plain HDF5 file whose ``optimizer_state`` dataset holds
a pickle (an opaque scalar, ``np.void(pickle.dumps(state))``), with a SHA-256 hex
digest of that pickle in the ``checksum`` attribute. Only that pickle is covered by
their checksum, so nothing here can be verified before libhdf5 parses the file; what
can be checked is checked, and the pickle is only unpickled when the caller allows it.

Nothing declared by the file is trusted for memory: the pickle is hashed straight
from its bytes in the file, a piece at a time, and must lie in the file (a dataset
that was never written has no bytes to check); loading obeys :class:`LoadLimits`.
Validating a file costs a small constant amount of memory, whatever it declares.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLimitError,
    CheckpointPickleError,
    CheckpointResourceError,
)
from .limits import LoadLimits
from .opening import open_regular
from .payload import DescriptorFile
from .staging import oserror_to_checkpoint

__all__ = ["load_legacy", "read_legacy_summary", "validate_legacy"]

_REQUIRED_ATTRS = ("batch_idx", "loss", "checksum")
#: The pickle is hashed from the file in pieces of this size.
_HASH_PIECE = 1 << 20
#: Attributes this large are not read (the predecessor's are short).
_MAX_ATTR_BYTES = 1 << 20


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[h5py.File, int]]:
    """The file open through h5py over a descriptor of ours, and that descriptor.

    Whatever fails inside becomes a ``CheckpointError``: a read that failed (EIO,
    EMFILE, ...) or memory that ran out says so and is never taken for a malformed
    file; anything else HDF5 or h5py raises is a malformed file.
    """
    fd = open_regular(path)
    source: DescriptorFile | None = None
    try:
        source = DescriptorFile(fd)
        with h5py.File(source, "r", locking=False) as f:
            yield f, fd
    except CheckpointError:
        raise
    except MemoryError as exc:
        raise CheckpointResourceError(
            f"legacy checkpoint {path}: out of memory while reading it (the file is not "
            "at fault; free memory or raise the process's memory limit)",
            {"path": str(path), "resource": "memory"},
        ) from exc
    except Exception as exc:
        if source is None and isinstance(exc, OSError):  # fstat failed
            raise oserror_to_checkpoint(exc, "read", path) from exc
        if source is not None and source.error is not None:
            raise oserror_to_checkpoint(source.error, "read", path) from source.error
        raise CheckpointCorruptError(
            f"legacy checkpoint {path} cannot be read: {exc}", {"path": str(path)}
        ) from exc
    finally:
        os.close(fd)


def _corrupt(path: Path, what: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"legacy checkpoint {path} {what}", {"path": str(path)})


def _check_attributes(obj: h5py.HLObject, path: Path, limits: LoadLimits) -> None:
    count = h5py.h5o.get_info(obj.id).num_attrs
    if count > limits.max_attributes:
        raise CheckpointLimitError(
            f"legacy checkpoint {path}: {obj.name} has {count} attributes, more than "
            f"max_attributes={limits.max_attributes}",
            {"path": str(path), "max_attributes": limits.max_attributes},
        )


def _attr(obj: h5py.HLObject, name: str, path: Path) -> Any:
    """One attribute, refused unread when it declares more than a short value."""
    aid = h5py.h5a.open(obj.id, name.encode())
    nbytes = aid.get_storage_size()
    if nbytes > _MAX_ATTR_BYTES:
        raise _corrupt(path, f"has a {nbytes}-byte attribute {name!r}")
    return obj.attrs[name]


def _summary(f: h5py.File, path: Path) -> tuple[int, float, float]:
    attrs = f.attrs
    timestamp = float(_attr(f, "timestamp", path)) if "timestamp" in attrs else 0.0
    return int(_attr(f, "batch_idx", path)), float(_attr(f, "loss", path)), timestamp


def _pickle_extent(f: h5py.File, fd: int, path: Path) -> tuple[int | None, int]:
    """``(file offset or None for a compact dataset, length)`` of the pickle's bytes."""
    ds = f["optimizer_state"]
    if not isinstance(ds, h5py.Dataset) or ds.shape != () or ds.dtype.kind != "V":
        raise _corrupt(path, "has an 'optimizer_state' that is not an opaque scalar")
    nbytes = ds.dtype.itemsize
    plist = ds.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.COMPACT:
        return None, nbytes  # in the object header: HDF5 caps it at 64 KiB
    if layout != h5py.h5d.CONTIGUOUS or plist.get_nfilters() or plist.get_external_count():
        raise _corrupt(path, "stores 'optimizer_state' in a layout the predecessor never wrote")
    offset = ds.id.get_offset()
    size = os.fstat(fd).st_size
    if offset is None or ds.id.get_storage_size() != nbytes or offset + nbytes > size:
        raise _corrupt(
            path, f"declares a {nbytes}-byte 'optimizer_state' whose bytes are not in the file"
        )
    return offset, nbytes


def _pickle_digest(f: h5py.File, fd: int, path: Path, keep: bool) -> tuple[str, bytes | None]:
    """SHA-256 hex digest of the pickle, and the pickle itself when ``keep``."""
    offset, nbytes = _pickle_extent(f, fd, path)
    if offset is None:
        blob = f["optimizer_state"][()].tobytes()
        return hashlib.sha256(blob).hexdigest(), blob if keep else None
    digest = hashlib.sha256()
    pieces: list[bytes] = []
    done = 0
    while done < nbytes:
        try:
            piece = os.pread(fd, min(_HASH_PIECE, nbytes - done), offset + done)
        except OSError as exc:
            raise oserror_to_checkpoint(exc, "read", path) from exc
        if not piece:
            raise _corrupt(path, "is shorter than its 'optimizer_state' (truncated?)")
        digest.update(piece)
        if keep:
            pieces.append(piece)
        done += len(piece)
    return digest.hexdigest(), b"".join(pieces) if keep else None


def _checked(
    f: h5py.File, fd: int, path: Path, limits: LoadLimits, keep: bool
) -> tuple[tuple[int, float, float], bytes | None]:
    """The predecessor's checks (its datasets, attributes and pickle checksum), made
    within ``limits``: the summary, and the pickle when ``keep``."""
    for key in ("parameters", "optimizer_state"):
        if key not in f:
            raise _corrupt(path, f"has no '{key}' dataset")
    _check_attributes(f, path, limits)
    for key in _REQUIRED_ATTRS:
        if key not in f.attrs:
            raise _corrupt(path, f"has no '{key}' attribute")
    params = f["parameters"]
    if not isinstance(params, h5py.Dataset):
        raise _corrupt(path, "has a 'parameters' that is not a dataset")
    summary = _summary(f, path)
    stored = _attr(f, "checksum", path)
    stored = stored.decode() if isinstance(stored, bytes) else str(stored)
    actual, blob = _pickle_digest(f, fd, path, keep)
    if actual != stored:
        raise CheckpointCorruptError(
            f"legacy checkpoint {path}: checksum mismatch (file changed or corrupted)",
            {"path": str(path), "stored_checksum": stored, "computed_checksum": actual},
        )
    return summary, blob


def validate_legacy(path: Path, *, limits: LoadLimits | None = None) -> tuple[int, float, float]:
    """``(batch_idx, loss, timestamp)`` of a legacy file that passes the legacy checks.

    Raises ``CheckpointCorruptError`` (or ``CheckpointLimitError``) for a file that
    does not; another ``CheckpointError`` when the file could not be read.
    """
    with _opened(path) as (f, fd):
        summary, _ = _checked(f, fd, path, limits or LoadLimits(), keep=False)
    return summary


def read_legacy_summary(path: Path) -> tuple[int, float, float]:
    """``(batch_idx, loss, timestamp)`` from the attributes, nothing unpickled."""
    with _opened(path) as (f, _):
        return _summary(f, path)


def load_legacy(path: Path, *, allow_pickle: bool, limits: LoadLimits) -> dict[str, Any]:
    """Load a legacy checkpoint into the same dictionary ``load_checkpoint`` returns."""
    with _opened(path) as (f, fd):
        budget = limits.resolved_max_bytes(os.fstat(fd).st_size)
        _, nbytes = _pickle_extent(f, fd, path)
        params_ds = f["parameters"]
        declared = nbytes + math.prod(params_ds.shape or ()) * params_ds.dtype.itemsize
        if declared > budget:
            raise CheckpointLimitError(
                f"legacy checkpoint {path} declares {declared} bytes of parameters and "
                f"optimizer state, more than max_array_bytes={budget}",
                {"path": str(path), "max_array_bytes": budget, "declared_bytes": declared},
            )
        (batch_idx, loss, timestamp), blob = _checked(f, fd, path, limits, keep=True)
        if not allow_pickle:
            raise CheckpointPickleError(
                f"{path} is a legacy checkpoint whose optimizer state is a pickle; "
                "loading it needs allow_pickle=True (unpickling can run code: only do "
                "it for files you trust)",
                {"path": str(path)},
            )
        parameters = params_ds[()]
        metadata = _legacy_metadata(f, path, limits, budget - declared)
        version = _attr(f, "version", path) if "version" in f.attrs else "unknown"
    try:
        optimizer_state = pickle.loads(blob)  # type: ignore[arg-type]
    except Exception as exc:
        raise CheckpointCorruptError(
            f"legacy checkpoint {path}: the pickled optimizer state does not load: {exc}",
            {"path": str(path)},
        ) from exc
    return {
        "batch_idx": batch_idx,
        "parameters": parameters,
        "optimizer_state": optimizer_state,
        "loss": loss,
        "metadata": metadata,
        "version": version.decode() if isinstance(version, bytes) else str(version),
        "timestamp": timestamp,
    }


def _legacy_metadata(f: h5py.File, path: Path, limits: LoadLimits, left: int) -> dict[str, Any]:
    """Metadata as the predecessor read it back (JSON strings parsed, arrays loaded)."""
    if "metadata" not in f:
        return {}
    group = f["metadata"]
    _check_attributes(group, path, limits)
    if len(group) > limits.max_nodes:
        raise CheckpointLimitError(
            f"legacy checkpoint {path}: the metadata has more than "
            f"max_nodes={limits.max_nodes} datasets",
            {"path": str(path), "max_nodes": limits.max_nodes},
        )
    out: dict[str, Any] = {}
    for key in group.attrs:
        value = _attr(group, key, path)
        if isinstance(value, str):
            try:
                out[key] = json.loads(value)
            except (json.JSONDecodeError, TypeError):
                out[key] = value
        elif isinstance(value, np.generic):
            out[key] = value.item()
        else:
            out[key] = value
    for key in group:
        ds = group[key]
        if not isinstance(ds, h5py.Dataset):
            raise _corrupt(path, f"has a metadata entry {key!r} that is not a dataset")
        left -= math.prod(ds.shape or ()) * ds.dtype.itemsize
        if left < 0:
            raise CheckpointLimitError(
                f"legacy checkpoint {path}: the arrays total more than the max_array_bytes budget",
                {"path": str(path)},
            )
        out[key] = ds[()]
    return out

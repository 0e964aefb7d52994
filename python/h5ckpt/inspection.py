"""Finding, verifying and describing checkpoint files, for the command line.

Verification goes through the Rust core (:func:`h5ckpt._native.verify_files`, many
files at once, on all cores); seed-format files through their own checksum
(:mod:`h5ckpt.legacy`). A file's HDF5 content is parsed only after it verified.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import _native, interop
from .errors import CheckpointError, CheckpointNotFoundError
from .legacy import validate_legacy
from .limits import LoadLimits
from .opening import checkpoint_kind, file_kind, open_hdf5, open_regular, read_head
from .payload import DescriptorFile
from .reading import verified_copy
from .staging import oserror_to_checkpoint
from .tree import TYPE_ATTR, ordered_links, unescape_key
from .verification import (
    INVALID,
    LEGACY,
    UNVERIFIED,
    VALID,
    VERDICT_ERRORS,
    check_h5ckpt_files,
    check_name,
    check_verified,
)

__all__ = [
    "FileReport",
    "checkpoint_files",
    "describe_file",
    "file_format",
    "json_safe",
    "verify_paths",
]

#: A batch of files handed to the Rust core at once holds at most this many bytes...
_BATCH_BYTES = 256 * 1024 * 1024
#: ...and at most this many files per CPU.
_FILES_PER_CPU = 4
#: ``describe_file`` summarises numeric arrays up to this size (min, max, mean).
_STATS_MAX_BYTES = 64 * 1024 * 1024
#: ``describe_file`` lists the values of arrays with at most this many elements.
_INLINE_ELEMENTS = 8
_TEXT_CHARS = 80


def _batch_from_name(path: Path) -> int | None:
    parts = _native.checkpoint_name_parts(path.name)
    return parts[1] if parts is not None else None


def checkpoint_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files named by ``paths``, directories searched for checkpoint files.

    Parameters
    ----------
    paths : iterable of str or Path
        Files (taken as they are, whatever their name) and directories (searched
        recursively, hidden subdirectories skipped, for regular files whose name
        is a checkpoint name of any prefix, by ``_native.checkpoint_name_parts``).

    Returns
    -------
    list of Path
        Each file once, in the order given; a directory's files sorted by folder,
        prefix and batch index.

    Raises
    ------
    CheckpointNotFoundError
        When a path does not exist.
    """
    out: list[Path] = []
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found: list[tuple[str, str, int, Path]] = []
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in files:
                    parts = _native.checkpoint_name_parts(name)
                    full = Path(root) / name
                    if parts is not None and full.is_file():
                        found.append((root, *parts, full))
            group = [entry[3] for entry in sorted(found)]
        elif path.exists():
            group = [path]
        else:
            raise CheckpointNotFoundError(f"no such file or directory: {path}", {"path": str(path)})
        for file in group:
            key = os.path.realpath(file)
            if key not in seen:
                seen.add(key)
                out.append(file)
    return out


def file_format(path: str | os.PathLike[str]) -> str:
    """``"h5ckpt"``, ``"legacy"`` (plain HDF5, the seed's format) or ``"unknown"``.

    Only the first 8 bytes are read; nothing is verified.

    Raises
    ------
    CheckpointError
        When the file cannot be opened or read.
    """
    kind = file_kind(path, "read")
    return "unknown" if kind == "foreign" else kind


@dataclass(frozen=True)
class FileReport:
    """The outcome of verifying one file.

    Attributes
    ----------
    path : Path
        The file.
    format : str
        ``"h5ckpt"``, ``"legacy"``, ``"unknown"`` (neither) or ``"unreadable"``.
    status : str
        ``"valid"`` (every byte verified and the payload passes the checks of
        loading), ``"legacy"`` (a seed-format file whose own checksum matches),
        ``"invalid"``, or ``"unverified"`` when the check itself failed (memory or
        descriptors ran out, a read failed): nothing is known of the file then.
    batch_idx : int or None
        From the header, the legacy attributes or, failing those, the file name.
    loss : float
        NaN when unknown.
    timestamp : float
        Seconds since the epoch; NaN when unknown.
    size_bytes : int
        File size (0 when it cannot be read).
    error : str or None
        Why the file is invalid or could not be checked.
    keyed : bool
        Whether the file carries an HMAC tag.
    """

    path: Path
    format: str
    status: str
    batch_idx: int | None
    loss: float = math.nan
    timestamp: float = math.nan
    size_bytes: int = 0
    error: str | None = None
    keyed: bool = False

    @property
    def is_valid(self) -> bool:
        """True for ``"valid"`` and ``"legacy"`` (intact as far as its format can tell)."""
        return self.status in (VALID, LEGACY)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (non-finite floats as strings)."""
        return json_safe(
            {
                "path": str(self.path),
                "format": self.format,
                "status": self.status,
                "valid": self.is_valid,
                "batch_idx": self.batch_idx,
                "loss": self.loss,
                "timestamp": self.timestamp,
                "size_bytes": self.size_bytes,
                "keyed": self.keyed,
                "error": self.error,
            }
        )


def _file_batches(indices: list[int], sizes: Sequence[int]) -> Iterable[list[int]]:
    max_files = _FILES_PER_CPU * (os.cpu_count() or 1)
    batch: list[int] = []
    nbytes = 0
    for i in indices:
        batch.append(i)
        nbytes += sizes[i]
        if nbytes >= _BATCH_BYTES or len(batch) >= max_files:
            yield batch
            batch, nbytes = [], 0
    if batch:
        yield batch


def _legacy_report(path: Path, size: int, hmac_key: bytes | None) -> FileReport:
    batch = _batch_from_name(path)
    if hmac_key is not None:
        return FileReport(
            path,
            "legacy",
            INVALID,
            batch,
            size_bytes=size,
            error="seed-format file without an HMAC tag, refused when a key is set",
        )
    try:
        batch, loss, timestamp = validate_legacy(path, limits=LoadLimits())
        check_name(path, batch)
    except CheckpointError as exc:
        status = INVALID if isinstance(exc, VERDICT_ERRORS) else UNVERIFIED
        return FileReport(path, "legacy", status, batch, size_bytes=size, error=_why(exc))
    return FileReport(path, "legacy", LEGACY, batch, loss, timestamp, size)


def _why(exc: CheckpointError) -> str:
    if isinstance(exc, VERDICT_ERRORS):
        return str(exc)
    return f"could not be checked: {exc}"


def verify_paths(
    paths: Sequence[Path],
    hmac_key: bytes | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[FileReport]:
    """Verify files, h5ckpt ones in parallel batches through the Rust core.

    The verdict is the one a manager's listing gives (default limits): digests,
    HMAC tag, a name that agrees with the header and the payload checks of loading.

    Parameters
    ----------
    paths : sequence of Path
        The files.
    hmac_key : bytes, optional
        With a key, h5ckpt files must carry a matching HMAC tag and seed-format files
        (which have none) are invalid.
    progress : callable, optional
        Called with the number of bytes done after each file or batch.

    Returns
    -------
    list of FileReport
        One per path, in order. Nothing raises for a bad file: it is reported.
    """
    reports: list[FileReport | None] = [None] * len(paths)
    sizes = [0] * len(paths)
    hashed: list[int] = []
    for i, path in enumerate(paths):
        try:
            sizes[i] = path.stat().st_size
            kind = file_format(path)
        except (OSError, CheckpointError) as exc:
            if not isinstance(exc, CheckpointError):
                exc = oserror_to_checkpoint(exc, "read", path)
            reports[i] = FileReport(
                path, "unreadable", INVALID, _batch_from_name(path), error=str(exc)
            )
            continue
        if kind == "h5ckpt":
            hashed.append(i)
            continue
        if kind == "legacy":
            reports[i] = _legacy_report(path, sizes[i], hmac_key)
        else:
            reports[i] = FileReport(
                path,
                "unknown",
                INVALID,
                _batch_from_name(path),
                size_bytes=sizes[i],
                error="not a checkpoint file (neither an h5ckpt header nor an HDF5 signature)",
            )
        if progress is not None:
            progress(sizes[i])
    for batch in _file_batches(hashed, sizes):
        outcomes = check_h5ckpt_files([paths[i] for i in batch], hmac_key, LoadLimits())
        for i, outcome in zip(batch, outcomes, strict=True):
            path = paths[i]
            if isinstance(outcome, Exception):
                try:
                    header = _native.read_header(path)
                except Exception:
                    header = None
                verdict = isinstance(outcome, VERDICT_ERRORS)
                reports[i] = FileReport(
                    path,
                    "h5ckpt",
                    INVALID if verdict else UNVERIFIED,
                    header.batch_idx if header is not None else _batch_from_name(path),
                    header.loss if header is not None else math.nan,
                    header.timestamp if header is not None else math.nan,
                    sizes[i],
                    _why(outcome) if isinstance(outcome, CheckpointError) else str(outcome),
                    header.keyed if header is not None else False,
                )
            else:
                reports[i] = FileReport(
                    path,
                    "h5ckpt",
                    VALID,
                    outcome.batch_idx,
                    outcome.loss,
                    outcome.timestamp,
                    sizes[i],
                    None,
                    outcome.keyed,
                )
        if progress is not None:
            progress(sum(sizes[i] for i in batch))
    return reports  # type: ignore[return-value]


# ------------------------------------------------------------------- describing


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars made Python, bytes made hex, non-finite floats
    made the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (strict JSON has no
    such numbers) and complex numbers made strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, complex):
        return str(value)
    return repr(value)


def _text(value: str) -> dict[str, Any]:
    if len(value) <= _TEXT_CHARS:
        return {"value": value}
    return {"value": value[: _TEXT_CHARS - 1] + "…", "length": len(value)}


def _storage(ds: h5py.Dataset) -> str:
    plist = ds.id.get_create_plist()
    names = []
    for i in range(plist.get_nfilters()):
        code, _flags, _values, name = plist.get_filter(i)
        label = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
        names.append(label.split()[0].lower() if label else f"filter {code}")
    if names:
        return "+".join(names)
    return {h5py.h5d.COMPACT: "compact", h5py.h5d.CONTIGUOUS: "raw"}.get(
        plist.get_layout(), "chunked"
    )


def _text_attr(obj: h5py.HLObject, name: str) -> str | None:
    """A string attribute as text (None when missing or not text)."""
    raw = obj.attrs.get(name)
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw[()]
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace")
    return raw if isinstance(raw, str) else None


def _ml_view(ds: h5py.Dataset) -> tuple[str | None, Callable[[np.ndarray], np.ndarray] | None]:
    """The ml_dtypes name of an ``ml_ndarray``/``ml_scalar`` node, and a function that
    turns its bits into numbers for display (None without ml_dtypes, or for its
    complex types)."""
    name = _text_attr(ds, interop.DTYPE_ATTR)
    if name is None or not interop.is_ml_name(name):
        return name, None
    try:
        dtype = interop.ml_dtype(name)
    except LookupError:
        return name, None
    if dtype.itemsize != ds.dtype.itemsize or "complex" in name:
        return name, None
    target = np.int64 if "int" in name else np.float32

    def convert(bits: np.ndarray) -> np.ndarray:
        return bits.astype(bits.dtype.newbyteorder("=")).view(dtype).astype(target)

    return name, convert


def _array_node(ds: h5py.Dataset, tag: str) -> dict[str, Any]:
    dtype = ds.dtype
    shape = list(ds.shape) if ds.shape is not None else []
    nbytes = int(math.prod(shape)) * dtype.itemsize
    node: dict[str, Any] = {
        "type": tag,
        "dtype": str(dtype),
        "shape": shape,
        "nbytes": nbytes,
        "storage": _storage(ds),
    }
    hint = _text_attr(ds, interop.ARRAY_HINT_ATTR)
    if hint is not None:
        node["array"] = hint[:80]
    convert = None
    if tag == "ml_ndarray":
        name, convert = _ml_view(ds)
        node["dtype"] = name if name is not None else "?"
        node["bits"] = str(dtype)
    size = int(math.prod(shape))
    if tag == "ml_ndarray" and convert is None:
        if size:
            node["note"] = "ml_dtypes is not installed: values not shown"
        return node
    if 0 < size <= _INLINE_ELEMENTS:
        data = np.asarray(ds[()])
        node["values"] = (convert(data) if convert else data).reshape(-1).tolist()
    elif size and (convert is not None or dtype.kind in "biuf") and nbytes <= _STATS_MAX_BYTES:
        data = np.asarray(ds[()])
        if convert is not None:
            data = convert(data)
            dtype = data.dtype
        if dtype.kind == "b":
            node["summary"] = {"true": int(np.count_nonzero(data))}
        else:
            finite = data[np.isfinite(data)] if dtype.kind == "f" else data
            summary: dict[str, Any] = {}
            if finite.size:
                summary = {
                    "min": finite.min().item(),
                    "max": finite.max().item(),
                    "mean": float(finite.mean(dtype=np.float64)),
                }
            if dtype.kind == "f":
                summary["non_finite"] = int(data.size - finite.size)
            node["summary"] = summary
    return node


def _leaf_node(ds: h5py.Dataset, tag: str) -> dict[str, Any]:
    if tag == "none":
        return {"type": tag}
    if tag in ("ndarray", "ml_ndarray"):
        return _array_node(ds, tag)
    if tag == "ml_scalar":
        name, convert = _ml_view(ds)
        scalar: dict[str, Any] = {"type": tag, "dtype": name if name is not None else "?"}
        if convert is not None:
            scalar["value"] = convert(np.asarray(ds[()])).item()
        return scalar
    if tag in ("bytes", "bytearray", "str_bytes", "pickle"):
        node: dict[str, Any] = {"type": tag, "nbytes": int(ds.shape[0]) if ds.shape else 0}
        if tag == "pickle":
            node["note"] = "pickled, not loaded"
        return node
    raw = ds[()]
    if tag in ("str", "bigint"):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        if tag == "bigint":
            text = str(int(text, 16))
        return {"type": tag, **_text(text)}
    value = raw.item() if isinstance(raw, np.generic) else raw
    if not isinstance(value, (int, float, bool)):
        value = repr(value)
    return {"type": tag, "dtype": str(ds.dtype), "value": value}


def _links(group: h5py.Group) -> list[str]:
    """The link names of ``group`` in the order loading reads them."""
    return [n.decode("utf-8", "surrogateescape") for n, _ in ordered_links(group.id)]


class _Budget:
    """How many more nodes the description may hold, and how deep it may go."""

    def __init__(self, max_nodes: int, max_depth: int) -> None:
        self.left = max_nodes
        self.max_depth = max_depth


def _tree_node(obj: h5py.Group | h5py.Dataset, depth: int, budget: _Budget) -> dict[str, Any]:
    budget.left -= 1
    raw_tag = obj.attrs.get(TYPE_ATTR)
    tag = raw_tag.decode("ascii", "replace") if isinstance(raw_tag, bytes) else str(raw_tag)
    if isinstance(obj, h5py.Dataset):
        return _leaf_node(obj, tag)
    names = _links(obj)
    node: dict[str, Any] = {"type": tag, "length": len(names), "children": {}}
    fields: list[str] | None = None
    if tag in ("list", "tuple", "namedtuple", "pytree"):
        names = sorted(names, key=lambda n: int(n) if n.isdigit() else -1)
    if tag in ("namedtuple", "pytree"):
        node["class"] = (_text_attr(obj, interop.CLASS_ATTR) or "?")[:200]
        text = _text_attr(obj, interop.FIELDS_ATTR)
        if text is not None:
            fields = text.split(",") if text else []
            node["fields"] = fields[:64]
            if len(fields) != len(names):
                fields = None
    if depth >= budget.max_depth and names:
        node["truncated"] = len(names)
        return node
    for i, name in enumerate(names):
        if budget.left <= 0:
            node["truncated"] = len(names) - i
            break
        key = unescape_key(name) if tag == "dict" else name
        if fields is not None:
            key = fields[i]
        link = obj.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            node["children"][key] = {"type": "link", "note": f"{type(link).__name__}, not followed"}
            continue
        node["children"][key] = _tree_node(obj[name], depth + 1, budget)
    return node


def _legacy_tree(f: h5py.File) -> dict[str, Any]:
    tree: dict[str, Any] = {"parameters": _array_node(f["parameters"], "ndarray")}
    tree["optimizer_state"] = {
        "type": "pickle",
        "nbytes": int(f["optimizer_state"].dtype.itemsize),
        "note": "seed format: pickled, not loaded",
    }
    if "metadata" in f:
        group = f["metadata"]
        children: dict[str, Any] = {}
        for key, value in group.attrs.items():
            value = value.item() if isinstance(value, np.generic) else value
            if isinstance(value, str):
                children[key] = {"type": "attribute", **_text(value)}
            elif isinstance(value, (int, float, bool)):
                children[key] = {"type": "attribute", "value": value}
            else:
                children[key] = {"type": "attribute", **_text(repr(value))}
        for key in group:
            children[key] = _array_node(group[key], "ndarray")
        tree["metadata"] = {"type": "group", "length": len(children), "children": children}
    return tree


def _header_dict(header: _native.Header) -> dict[str, Any]:
    fields = header.to_dict()
    return json_safe(fields)


def describe_file(
    path: str | os.PathLike[str],
    hmac_key: bytes | None = None,
    max_nodes: int = 2000,
    limits: LoadLimits | None = None,
) -> dict[str, Any]:
    """Header, verification status and a summary of the payload tree of one file.

    An h5ckpt file is opened once and read once, as loading reads it: into private
    memory, verified there, then checked and described from those verified bytes
    only, so a file changed or replaced meanwhile is never parsed unverified. Arrays
    are described by dtype, shape, storage and, when small, a summary (min / max /
    mean, or the values of arrays of at most 8 elements); pickled values are never
    unpickled. A seed-format file is checked by its own checksum (which covers only
    its pickle), then described.

    Parameters
    ----------
    path : str or Path
        An h5ckpt or seed-format checkpoint file.
    hmac_key : bytes, optional
        Key the file's HMAC tag must match.
    max_nodes : int, default 2000
        At most this many tree nodes are described; larger groups say how many of
        their items were left out (``"truncated"``).
    limits : LoadLimits, optional
        The limits an h5ckpt file is checked against, as a manager with these
        ``load_limits`` checks it (default ``LoadLimits()``); the description goes
        no deeper than their ``max_depth``.

    Returns
    -------
    dict
        ``path``, ``format``, ``size_bytes``, ``status`` (``"valid"``,
        ``"legacy"``, ``"invalid"``, or ``"unverified"`` when the check itself
        failed), ``error``, ``header`` (the h5ckpt header fields, or a seed file's
        attributes), ``attributes`` (the HDF5 root attributes) and ``tree``
        (``parameters``, ``optimizer_state``, ``metadata``; ``None`` unless the file
        is valid). JSON-ready.

    Raises
    ------
    CheckpointError
        When the file does not exist, cannot be read or is not a checkpoint at all.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"no such file: {path}", {"path": str(path)})
    limits = LoadLimits() if limits is None else limits
    budget = _Budget(max_nodes, limits.max_depth)
    fd = open_regular(path, "read")
    try:
        head = read_head(fd, path, _native.HEADER_SIZE)
        if _native.file_kind(head) == "h5ckpt":
            return json_safe(_describe_h5ckpt(fd, path, head, hmac_key, limits, budget))
    finally:
        os.close(fd)
    kind = checkpoint_kind(path, "read")  # the manager's refusal of a foreign file
    report = verify_paths([path], hmac_key)[0]
    info = _description(path, kind, report.size_bytes)
    info["status"], info["error"] = report.status, report.error
    if report.is_valid:
        with _content_errors(info), open_hdf5(path) as f:
            _describe_content(info, f, kind, budget)
    return json_safe(info)


def _description(path: Path, kind: str, size: int) -> dict[str, Any]:
    return {
        "path": str(path),
        "format": kind,
        "size_bytes": size,
        "status": INVALID,
        "error": None,
        "header": None,
        "attributes": None,
        "tree": None,
    }


def _describe_h5ckpt(
    fd: int, path: Path, head: bytes, key: bytes | None, limits: LoadLimits, budget: _Budget
) -> dict[str, Any]:
    size = os.fstat(fd).st_size
    info = _description(path, "h5ckpt", size)
    with contextlib.suppress(CheckpointError):
        header = _native.parse_header(head)
        # Shown as a header read alone shows it: only when the length agrees.
        if header.payload_offset + header.payload_length == size:
            info["header"] = _header_dict(header)
    try:
        with verified_copy(fd, path, key, limits) as (header, copy):
            check_verified(path, header, copy, limits)
            info["status"] = VALID
            with _content_errors(info), h5py.File(DescriptorFile(copy), "r", locking=False) as f:
                _describe_content(info, f, "h5ckpt", budget)
    except CheckpointError as exc:
        info["status"] = INVALID if isinstance(exc, VERDICT_ERRORS) else UNVERIFIED
        info["error"] = _why(exc)
    return info


@contextlib.contextmanager
def _content_errors(info: dict[str, Any]) -> Iterator[None]:
    """A verified file whose HDF5 content cannot be described is reported invalid."""
    try:
        yield
    except Exception as exc:
        info["status"] = INVALID
        info["error"] = f"verified, but the HDF5 content cannot be read: {exc}"
        info["tree"] = None


def _describe_content(info: dict[str, Any], f: h5py.File, kind: str, budget: _Budget) -> None:
    info["attributes"] = {
        key: (value.decode() if isinstance(value, bytes) else value)
        for key, value in f.attrs.items()
    }
    if kind == "legacy":
        info["header"] = {
            key: info["attributes"].get(key)
            for key in ("batch_idx", "loss", "timestamp", "version", "checksum")
        }
        info["tree"] = _legacy_tree(f)
    else:
        info["tree"] = {
            name: _tree_node(f[name], 0, budget)
            for name in ("parameters", "optimizer_state", "metadata")
            if name in f
        }

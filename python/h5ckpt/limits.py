"""Load limits: how much a checkpoint may ask of the reader.

A checkpoint file is verified (digests, optional HMAC) before any of its HDF5
content is parsed, but a verified file can still come from a careless or hostile
writer. :class:`LoadLimits` bounds what loading a payload tree may cost: nesting
depth, number of nodes, attributes per HDF5 object and total array bytes. Every
limit is checked *before* the corresponding memory is allocated.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from h5ckpt.errors import CheckpointValueError

__all__ = [
    "DEFAULT_ARRAY_BYTES_PER_FILE_BYTE",
    "DEFAULT_MIN_ARRAY_BYTES",
    "LoadLimits",
    "default_max_array_bytes",
]

#: The default array byte budget is never smaller than this (8 GiB).
DEFAULT_MIN_ARRAY_BYTES = 8 * 1024**3

#: Every limit is below this: the Rust core and the file format count in 64 bits.
MAX_LIMIT = 2**63 - 1

#: The default array byte budget grows with the file: this many decoded bytes per
#: file byte, which leaves room for well-compressed arrays.
DEFAULT_ARRAY_BYTES_PER_FILE_BYTE = 64


def _as_int(name: str, value: object) -> int:
    # bool is an int subclass, but LoadLimits(max_depth=True) is a mistake.
    if isinstance(value, bool):
        raise CheckpointValueError(
            f"{name} must be an int, not bool", {"field": name, "value": value}
        )
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise CheckpointValueError(
            f"{name} must be an int, not {type(value).__name__}",
            {"field": name, "value": repr(value)},
        ) from None


def _short(value: int) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"an integer of {len(text)} digits"


def default_max_array_bytes(file_size: int) -> int:
    """Default budget of decoded array bytes for a file of ``file_size`` bytes.

    Parameters
    ----------
    file_size : int
        Size of the checkpoint file in bytes.

    Returns
    -------
    int
        ``max(8 GiB, 64 * file_size)``.

    Raises
    ------
    CheckpointValueError
        If ``file_size`` is not a non-negative int.
    """
    size = _as_int("file_size", file_size)
    if size < 0:
        raise CheckpointValueError(
            f"file_size must be >= 0, got {size}", {"field": "file_size", "value": size}
        )
    return max(DEFAULT_MIN_ARRAY_BYTES, DEFAULT_ARRAY_BYTES_PER_FILE_BYTE * size)


@dataclass(frozen=True)
class LoadLimits:
    """Upper bounds on what loading one checkpoint payload may cost.

    Loading a tree that exceeds any bound raises
    :class:`~h5ckpt.errors.CheckpointLimitError` before the memory for the
    offending part is allocated. Saving checks ``max_depth`` and ``max_nodes`` too,
    so that a file written with the defaults also loads with them.

    Parameters
    ----------
    max_depth : int, default 256
        Deepest allowed nesting. The root value has depth 0, the items of a root
        container depth 1, and so on; a node deeper than ``max_depth`` is refused.
        Must be >= 0.
    max_nodes : int, default 1_000_000
        Most nodes (containers and leaves, the root included) in one tree.
        Must be >= 1.
    max_attributes : int, default 64
        Most HDF5 attributes on any one group or dataset of the tree. h5ckpt writes
        one per node. Must be >= 1.
    max_array_bytes : int or None, default None
        Most decoded bytes of all arrays and strings of a file together (numpy
        arrays, bytes, bytearrays, pickles, str), counted from each dataset's
        declared shape and item size before it is read. ``None`` means a budget that grows
        with the file: ``max(8 GiB, 64 * file_size)`` (see :meth:`resolved_max_bytes`).
        Must be >= 0 when given.

    Every int field is at most ``2**63 - 1``.

    Raises
    ------
    CheckpointValueError
        If a field is not an int (``bool`` is refused) or is out of range.

    Examples
    --------
    >>> LoadLimits(max_depth=32).max_depth
    32
    >>> LoadLimits(max_array_bytes=2**30).resolved_max_bytes(10)
    1073741824
    >>> LoadLimits().resolved_max_bytes(2**30) == 64 * 2**30
    True
    """

    max_depth: int = 256
    max_nodes: int = 1_000_000
    max_attributes: int = 64
    max_array_bytes: int | None = None

    def __post_init__(self) -> None:
        for name, minimum in (("max_depth", 0), ("max_nodes", 1), ("max_attributes", 1)):
            value = _as_int(name, getattr(self, name))
            if not minimum <= value <= MAX_LIMIT:
                raise CheckpointValueError(
                    f"{name} must be from {minimum} to 2**63-1, got {_short(value)}",
                    {"field": name, "value": _short(value)},
                )
            object.__setattr__(self, name, value)
        if self.max_array_bytes is not None:
            value = _as_int("max_array_bytes", self.max_array_bytes)
            if not 0 <= value <= MAX_LIMIT:
                raise CheckpointValueError(
                    f"max_array_bytes must be from 0 to 2**63-1 or None, got {_short(value)}",
                    {"field": "max_array_bytes", "value": _short(value)},
                )
            object.__setattr__(self, "max_array_bytes", value)

    def resolved_max_bytes(self, file_size: int) -> int:
        """The array byte budget that applies to a file of ``file_size`` bytes.

        Parameters
        ----------
        file_size : int
            Size of the checkpoint file in bytes.

        Returns
        -------
        int
            ``max_array_bytes`` when set, else
            ``default_max_array_bytes(file_size)`` = ``max(8 GiB, 64 * file_size)``.

        Raises
        ------
        CheckpointValueError
            If ``file_size`` is not a non-negative int.
        """
        default = default_max_array_bytes(file_size)
        return default if self.max_array_bytes is None else self.max_array_bytes

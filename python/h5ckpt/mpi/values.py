"""What each value of a rank's state is across ranks, and how it is split again.

A rank's state is the tree ``{"parameters": ..., "optimizer_state": ..., "metadata":
...}``. Its *values* are the nodes reached through dicts with str keys: everything
that is not such a dict (arrays, scalars, lists, tuples, empty dicts) is one value,
named by its key path. A value is

* **sharded**: wrapped in :class:`Sharded` on every rank (this rank's block of a
  global array, blocks in rank order along ``axis``);
* **replicated**: not wrapped, and the same (types and bytes, by digest) on every
  rank; stored once, in rank 0's shard;
* **rank-local**: anything else; each rank's own value is kept.
"""

from __future__ import annotations

import hashlib
import numbers
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _native
from ..errors import CheckpointValueError

__all__ = ["Sharded", "classify", "flatten", "render", "split_ranges", "unflatten"]

KeyPath = tuple[str, ...]
ROOTS = ("parameters", "optimizer_state", "metadata")
SHARDED = "sharded"
REPLICATED = "replicated"
RANK_LOCAL = "rank_local"


class Sharded:
    """This rank's block of a global array split along ``axis`` in rank order.

    Parameters
    ----------
    block : array_like
        The local block (at least one dimension). Blocks of all ranks must agree in
        dtype and in every dimension but ``axis``; their lengths along ``axis`` may
        differ (a rank may hold none).
    axis : int, default 0
        The axis the global array is split along.
    """

    __slots__ = ("axis", "block")
    block: np.ndarray
    axis: int

    def __init__(self, block: Any, axis: int = 0) -> None:
        arr = np.asarray(block)
        if arr.ndim == 0:
            raise CheckpointValueError(
                "Sharded needs an array of at least one dimension", {"shape": arr.shape}
            )
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise CheckpointValueError(f"Sharded axis must be an integer, got {axis!r}", {})
        if not -arr.ndim <= int(axis) < arr.ndim:
            raise CheckpointValueError(
                f"Sharded axis {axis} is out of range for a {arr.ndim}-d block",
                {"axis": int(axis), "ndim": arr.ndim},
            )
        self.block = arr
        self.axis = int(axis) % arr.ndim

    def __repr__(self) -> str:
        return f"Sharded(<{self.block.dtype} {self.block.shape}>, axis={self.axis})"


def render(path: KeyPath) -> str:
    """A key path as people read it: ``optimizer_state/moment``."""
    return "/".join(path)


def flatten(state: dict[str, Any]) -> list[tuple[KeyPath, Any]]:
    """The values of a state tree in depth-first (insertion) order."""
    out: list[tuple[KeyPath, Any]] = []
    stack: list[tuple[KeyPath, Any]] = [((), state)]
    while stack:
        path, node = stack.pop()
        if type(node) is dict and node and (not path or all(type(k) is str for k in node)):
            stack.extend(((*path, k), v) for k, v in reversed(list(node.items())))
        else:
            if not isinstance(node, Sharded):
                _refuse_nested_sharded(path, node)
            out.append((path, node))
    return out


def _refuse_nested_sharded(path: KeyPath, node: Any) -> None:
    stack = [node]
    while stack:
        x = stack.pop()
        if isinstance(x, Sharded):
            raise CheckpointValueError(
                f"{render(path)}: Sharded must be a value of a dict (or the parameters), "
                "not inside a list, tuple or dict with non-str keys",
                {"key": render(path)},
            )
        if isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())


def unflatten(leaves: list[tuple[KeyPath, Any]]) -> dict[str, Any]:
    """The tree of :func:`flatten`'s values (dict order as listed)."""
    root: dict[str, Any] = {}
    for path, value in leaves:
        node = root
        for key in path[:-1]:
            child = node.get(key)
            if type(child) is not dict:
                child = node[key] = {}
            node = child
        node[path[-1]] = value
    return root


def get_at(tree: dict[str, Any], path: KeyPath) -> Any:
    node: Any = tree
    for key in path:
        node = node[key]
    return node


def set_at(tree: dict[str, Any], path: KeyPath, value: Any) -> None:
    node: Any = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


# -- digests ---------------------------------------------------------------------------

_BIG = 1 << 16


def value_digest(value: Any) -> bytes:
    """SHA-256 of a value's exact types and bytes (equal values, equal digests)."""
    h = hashlib.sha256()
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        name = f"{t.__module__}.{t.__qualname__}".encode()
        h.update(struct.pack("<I", len(name)) + name)
        stack.extend(_hash_node(h, v))
    return h.digest()


def _hash_node(h: Any, v: Any) -> list[Any]:
    """Feed ``v``'s own bytes to ``h``; its children, to push in this order (so that
    they are taken first to last)."""
    t = type(v)
    if t is np.ndarray:
        h.update(_array_bytes(v))
        return []
    if isinstance(v, np.generic):
        h.update(v.dtype.str.encode() + v.tobytes())
        return []
    if t is dict:
        h.update(struct.pack("<Q", len(v)))
        children = []
        for k, x in reversed(list(v.items())):
            children += [x, k]  # the key is taken before its value
        return children
    if t in (list, tuple):
        h.update(struct.pack("<Q", len(v)))
        return list(reversed(v))
    scalar = _SCALAR_BYTES.get(t)
    h.update(_pickled(v) if scalar is None else scalar(v))
    return []


def _array_bytes(v: np.ndarray) -> bytes:
    head = f"{v.dtype.str}|{v.dtype.descr}|{v.shape}".encode()
    if v.dtype.hasobject:
        return head + _pickled(v)
    a = np.ascontiguousarray(v)
    return head + (_native.tree_digest(a) if a.nbytes >= _BIG else a.tobytes())


def _text_bytes(v: str) -> bytes:
    b = v.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(b)) + b


#: The bytes hashed for a scalar, by its exact type (bool and int alike: by value).
_SCALAR_BYTES: dict[type, Any] = {
    float: lambda v: struct.pack("<d", v),
    complex: lambda v: struct.pack("<dd", v.real, v.imag),
    int: lambda v: str(int(v)).encode(),
    bool: lambda v: str(int(v)).encode(),
    str: _text_bytes,
    bytes: lambda v: struct.pack("<Q", len(v)) + bytes(v),
    bytearray: lambda v: struct.pack("<Q", len(v)) + bytes(v),
    type(None): lambda v: b"",
}


def _pickled(v: Any) -> bytes:
    try:
        return pickle.dumps(v, protocol=5)
    except Exception:
        # Unpicklable: never equal across ranks, so rank-local (the save refuses it later).
        return repr(id(v)).encode() + struct.pack("<d", np.random.random())


@dataclass(frozen=True)
class LocalValue:
    """What a rank tells the others about one of its values."""

    path: KeyPath
    digest: bytes | None  # None for a sharded value
    axis: int = 0
    dtype: str = ""
    shape: tuple[int, ...] = ()


def describe(leaves: list[tuple[KeyPath, Any]]) -> list[LocalValue]:
    out = []
    for path, v in leaves:
        if isinstance(v, Sharded):
            b = v.block
            out.append(LocalValue(path, None, v.axis, b.dtype.str, tuple(b.shape)))
        else:
            out.append(LocalValue(path, value_digest(v)))
    return out


def split_ranges(length: int, world: int) -> list[tuple[int, int]]:
    """Each rank's ``[start, stop)`` of ``np.array_split(range(length), world)``."""
    base, extra = divmod(length, world)
    out, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def classify(per_rank: list[list[LocalValue]]) -> list[dict[str, Any]]:
    """Every value's kind across ranks, in first-seen order (rank 0's order first).

    Raises ``CheckpointValueError`` for sharded values that disagree between ranks and
    for trees whose key paths conflict (a value on one rank is a dict on another).
    """
    world = len(per_rank)
    order: list[KeyPath] = []
    table: dict[KeyPath, list[LocalValue | None]] = {}
    for r, values in enumerate(per_rank):
        for lv in values:
            row = table.get(lv.path)
            if row is None:
                row = table[lv.path] = [None] * world
                order.append(lv.path)
            row[r] = lv
    paths = set(order)
    for p in order:
        for n in range(1, len(p)):
            if p[:n] in paths:
                raise CheckpointValueError(
                    f"{render(p[:n])} is a value on some ranks and a dict on others",
                    {"key": render(p[:n])},
                )
    out: list[dict[str, Any]] = []
    for p in order:
        row = table[p]
        sharded = [lv for lv in row if lv is not None and lv.digest is None]
        if sharded:
            out.append(_sharded_entry(p, row))
        elif (
            all(lv is not None for lv in row)
            and len({lv.digest for lv in row if lv is not None}) == 1
        ):
            out.append({"path": list(p), "kind": REPLICATED})
        else:
            ranks = [r for r, lv in enumerate(row) if lv is not None]
            out.append({"path": list(p), "kind": RANK_LOCAL, "ranks": ranks})
    return out


def _sharded_entry(p: KeyPath, row: list[LocalValue | None]) -> dict[str, Any]:
    missing = [r for r, lv in enumerate(row) if lv is None or lv.digest is not None]
    if missing:
        raise CheckpointValueError(
            f"{render(p)} is Sharded on some ranks but not on rank(s) {missing}",
            {"key": render(p), "ranks": missing},
        )
    first = row[0]
    assert first is not None
    axis, dtype, shape = first.axis, first.dtype, first.shape
    for r, lv in enumerate(row):
        assert lv is not None
        other = lv.shape[:axis] + lv.shape[axis + 1 :]
        if (
            lv.axis != axis
            or lv.dtype != dtype
            or len(lv.shape) != len(shape)
            or other != shape[:axis] + shape[axis + 1 :]
        ):
            raise CheckpointValueError(
                f"{render(p)}: rank {r}'s block (dtype {lv.dtype}, shape {lv.shape}, axis "
                f"{lv.axis}) does not fit rank 0's (dtype {dtype}, shape {shape}, axis {axis})",
                {"key": render(p), "rank": r},
            )
    ranges, start = [], 0
    for lv in row:
        assert lv is not None
        ranges.append([start, start + lv.shape[axis]])
        start += lv.shape[axis]
    global_shape = list(shape)
    global_shape[axis] = start
    return {
        "path": list(p),
        "kind": SHARDED,
        "axis": axis,
        "dtype": dtype,
        "global_shape": global_shape,
        "ranges": ranges,
    }


def take_range(
    pieces: list[tuple[tuple[int, int], np.ndarray]],
    want: tuple[int, int],
    axis: int,
    dtype: np.dtype,
    shape: list[int],
) -> np.ndarray:
    """The rows ``want`` (along ``axis``) of the global array, from old ranks' blocks."""
    parts = []
    for (start, stop), block in pieces:
        lo, hi = max(start, want[0]), min(stop, want[1])
        if lo < hi:
            index = [slice(None)] * block.ndim
            index[axis] = slice(lo - start, hi - start)
            parts.append(block[tuple(index)])
    if not parts:
        empty = list(shape)
        empty[axis] = 0
        return np.empty(empty, dtype=dtype)
    # A copy: the blocks are views of whole old shard files, which need not stay in memory.
    return np.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0].copy(order="C")

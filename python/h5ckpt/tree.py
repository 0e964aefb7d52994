"""Exact, pickle-free round trip of Python values through an HDF5 tree.

A value is stored as one HDF5 object per node: containers (``dict``, ``list``,
``tuple``) become groups, everything else becomes a dataset. Every object carries
one attribute, ``h5ckpt_type``, a short fixed-length ASCII string that names the
Python type (see ``docs/format.md``, section "Payload tree"). Dict keys become link
names through a reversible escape (:func:`escape_key`). Values no tag can describe
are pickled, one node at a time, when the caller allows it.

The four entry points:

* :func:`check_value` walks a value without touching any file and refuses what
  cannot be stored, naming the offending key path.
* :func:`write_value` writes a value as one child of an HDF5 group.
* :func:`read_value` reads it back, bounded by :class:`~h5ckpt.limits.LoadLimits`.
* :func:`values_equal` compares two values exactly (types, dtypes, NaN, signed zero).

All walks are iterative, so a deep tree never raises ``RecursionError``.
"""

from __future__ import annotations

import itertools
import math
import pickle
import re
from collections.abc import Callable, Iterable
from typing import Any

import h5py
import numpy as np
from h5py import h5, h5a, h5d, h5g, h5i, h5l, h5o, h5p, h5s, h5t

from h5ckpt import interop
from h5ckpt.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLimitError,
    CheckpointPickleError,
    CheckpointResourceError,
    CheckpointValueError,
)
from h5ckpt.limits import LoadLimits

__all__ = [
    "PICKLE_PROTOCOL",
    "TAGS",
    "TYPE_ATTR",
    "ByteBudget",
    "check_value",
    "default_put_array",
    "escape_key",
    "hdf5_type",
    "read_value",
    "unescape_key",
    "values_equal",
    "write_array",
    "write_value",
]

#: Name of the attribute that carries the type tag of every node.
TYPE_ATTR = "h5ckpt_type"
_TYPE_ATTR_B = TYPE_ATTR.encode("ascii")

#: Pickle protocol of pickled nodes.
PICKLE_PROTOCOL = 5

# Type tags. Containers are groups; all others are datasets.
_DICT = "dict"
_LIST = "list"
_TUPLE = "tuple"
_NONE = "none"
_BOOL = "bool"
_INT = "int"
_BIGINT = "bigint"
_FLOAT = "float"
_STR = "str"
_STR_BYTES = "str_bytes"
_BYTES = "bytes"
_BYTEARRAY = "bytearray"
_NP_SCALAR = "np_scalar"
_NDARRAY = "ndarray"
_PICKLE = "pickle"
# Values of other libraries (see h5ckpt.interop).
_NAMEDTUPLE = "namedtuple"
_PYTREE = "pytree"
_ML_NDARRAY = "ml_ndarray"
_ML_SCALAR = "ml_scalar"

#: Every type tag this version writes and reads.
TAGS = frozenset(
    {
        _DICT,
        _LIST,
        _TUPLE,
        _NONE,
        _BOOL,
        _INT,
        _BIGINT,
        _FLOAT,
        _STR,
        _STR_BYTES,
        _BYTES,
        _BYTEARRAY,
        _NP_SCALAR,
        _NDARRAY,
        _PICKLE,
        _NAMEDTUPLE,
        _PYTREE,
        _ML_NDARRAY,
        _ML_SCALAR,
    }
)
_CONTAINERS = frozenset({_DICT, _LIST, _TUPLE, _NAMEDTUPLE, _PYTREE})
_BLOBS = frozenset({_STR_BYTES, _BYTES, _BYTEARRAY, _PICKLE})
_MAX_TAG_BYTES = 32
_COMPACT_TEXT_BYTES = 4096  # longer strings are stored contiguously (compact max: 64 KiB)

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_MAX_RANK = 32  # H5S_MAX_RANK
_BIGINT_RE = re.compile(r"-?0x[0-9a-f]+")

# Exact Python types with a fixed tag (bool before int does not matter: exact types).
_SIMPLE_TAGS: dict[type, str] = {
    list: _LIST,
    tuple: _TUPLE,
    float: _FLOAT,
    bool: _BOOL,
    type(None): _NONE,
    bytes: _BYTES,
    bytearray: _BYTEARRAY,
}

_VLEN_UTF8 = h5py.string_dtype("utf-8")
_U8 = np.dtype(np.uint8)


# --------------------------------------------------------------------------- keys

_ESCAPE_RE = re.compile("[%/\x00\ud800-\udfff]")
_PCT_RE = re.compile(rb"%([0-9A-Fa-f]{2})")


def _pct(match: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in match.group().encode("utf-8", "surrogatepass"))


def escape_key(key: str) -> str:
    """Turn a dict key into the HDF5 link name that stores it.

    ``%``, ``/``, NUL and lone surrogates are percent-encoded as the uppercase hex
    of their UTF-8 bytes (surrogates as the three bytes Python's ``surrogatepass``
    gives), a leading ``.`` becomes ``%2E``, and the empty key becomes ``%``. Every
    other character is kept, so ordinary keys stay readable in h5dump.

    Parameters
    ----------
    key : str
        Any str.

    Returns
    -------
    str
        A valid, non-empty HDF5 link name without ``/`` or NUL, encodable as UTF-8.
    """
    if not key:
        return "%"
    name = _ESCAPE_RE.sub(_pct, key)
    if name[0] == ".":
        name = "%2E" + name[1:]
    return name


def unescape_key(name: str) -> str:
    """Inverse of :func:`escape_key`.

    Parameters
    ----------
    name : str
        A link name.

    Returns
    -------
    str
        The key it stores.

    Raises
    ------
    ValueError
        If ``name`` is not exactly what :func:`escape_key` writes for some key
        (this keeps the mapping one to one).
    """
    if name == "%":
        return ""
    if "%" in name:
        raw = _PCT_RE.sub(lambda m: bytes((int(m.group(1), 16),)), name.encode("utf-8"))
        key = raw.decode("utf-8", "surrogatepass")
    else:
        key = name
    if not key or escape_key(key) != name:
        raise ValueError(f"link name {name!r} is not a canonically escaped dict key")
    return key


# ------------------------------------------------------------------------- dtypes


def hdf5_type(dtype: np.dtype) -> h5t.TypeID:
    """The HDF5 file datatype h5ckpt stores a numpy dtype as.

    This is h5py's own mapping (``h5py.h5t.py_create``): byte order is kept, bool
    becomes an 8-bit enum ``{FALSE: 0, TRUE: 1}`` and complex a compound ``{r, i}``.

    Parameters
    ----------
    dtype : numpy.dtype
        A bool, integer, float or complex dtype.

    Returns
    -------
    h5py.h5t.TypeID
    """
    return h5t.py_create(np.dtype(dtype))


_DTYPE_OK: dict[np.dtype, bool] = {}
_SCALAR_TYPE_OK: dict[type, bool] = {}


def _probe_dtype(dt: np.dtype) -> bool:
    """Whether arrays of ``dt`` survive an h5py round trip with dtype and values."""
    values = np.array([0, 1, 2, 1], dtype=dt)
    if dt.kind in "fc":
        values[3] = -0.0
        values[2] = np.inf
    try:
        name = f"h5ckpt-probe-{dt.str}-{id(values)}"
        with h5py.File(name, "w", driver="core", backing_store=False) as f:
            dset = f.create_dataset("a", data=values, dtype=hdf5_type(dt))
            file_dt = dset.id.get_type().dtype
            if file_dt != dt or file_dt.metadata is not None:
                return False
            out = np.empty(values.shape, file_dt)
            dset.id.read(h5s.ALL, h5s.ALL, out)
    except Exception:
        return False
    return _arrays_equal(values, out)


def _dtype_storable(dt: np.dtype) -> bool:
    if dt.kind not in "biufc" or dt.metadata is not None or dt.names is not None:
        return False
    ok = _DTYPE_OK.get(dt)
    if ok is None:
        ok = _DTYPE_OK[dt] = _probe_dtype(dt)
    return ok


def _scalar_type_storable(t: type) -> bool:
    ok = _SCALAR_TYPE_OK.get(t)
    if ok is None:
        try:
            dt = np.dtype(t)
            # np.longlong has the dtype of np.int64 but is another type: it would
            # come back as np.int64, so it is not stored as a numpy scalar.
            ok = np.dtype(dt.str).type is t and _dtype_storable(dt)
        except Exception:
            ok = False
        _SCALAR_TYPE_OK[t] = ok
    return ok


# ---------------------------------------------------------------- classification


def _is_plain_text(s: str) -> bool:
    """True when ``s`` can be a plain HDF5 UTF-8 string (no NUL, no lone surrogate)."""
    return "\x00" not in s and (s.isascii() or _SURROGATE_RE.search(s) is None)


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _native_tag(value: Any) -> str | None:
    """The tag that stores ``value`` without pickling, or None."""
    t = type(value)
    tag = _SIMPLE_TAGS.get(t)
    if tag is not None:
        return tag
    if t is dict:
        for k in value:
            if type(k) is not str:
                return None
        return _DICT
    if t is str:
        return _STR if _is_plain_text(value) else _STR_BYTES
    if t is int:
        return _INT if _INT64_MIN <= value <= _INT64_MAX else _BIGINT
    if t is np.ndarray:
        if value.ndim <= _MAX_RANK and _dtype_storable(value.dtype):
            return _NDARRAY
        return _ML_NDARRAY if value.ndim <= _MAX_RANK and interop.ml_name(value.dtype) else None
    if isinstance(value, np.generic) and _scalar_type_storable(t):
        return _NP_SCALAR
    return _foreign_tag(value)


def _array_tag(dtype: np.dtype, ndim: int) -> str | None:
    if ndim > _MAX_RANK:
        return None
    if _dtype_storable(dtype):
        return _NDARRAY
    return _ML_NDARRAY if interop.ml_name(dtype) else None


def _foreign_tag(value: Any) -> str | None:
    """The tag of a value another library defines (reached only by values that no
    tag above takes, so these checks cost the common values nothing)."""
    if isinstance(value, tuple):
        return _NAMEDTUPLE if interop.namedtuple_fields(value) is not None else None
    if isinstance(value, np.generic):
        return _ML_SCALAR if interop.ml_name(value.dtype) else None
    spec = interop.array_spec(value)
    if spec is not None:
        return None if isinstance(spec, str) else _array_tag(spec[0], len(spec[1]))
    if interop.node_parts(value) is not None:
        return _PYTREE
    return None


def _type_name(t: type) -> str:
    module = t.__module__
    return t.__qualname__ if module == "builtins" else f"{module}.{t.__qualname__}"


def _refusal(value: Any) -> str:
    """Why ``value`` cannot be stored without pickling, in words."""
    t = type(value)
    if t is dict:
        for k in value:
            if type(k) is not str:
                return f"a dict with the key {k!r} of type {_type_name(type(k))} (keys must be str)"
    if t is np.ndarray:
        if value.ndim > _MAX_RANK:
            return f"a numpy array with {value.ndim} dimensions (HDF5 allows {_MAX_RANK})"
        return (
            f"a numpy array of dtype {value.dtype} (only bool, integer, float and complex "
            "dtypes are stored without pickling)"
        )
    if isinstance(value, np.generic):
        return f"a numpy scalar of type {_type_name(t)}"
    spec = interop.array_spec(value)
    if isinstance(spec, str):
        return f"an array of type {_type_name(t)} with {spec} (it has no numpy form)"
    if spec is not None:
        dtype, shape = spec
        if len(shape) > _MAX_RANK:
            return (
                f"an array of type {_type_name(t)} with {len(shape)} dimensions "
                f"(HDF5 allows {_MAX_RANK})"
            )
        return (
            f"an array of type {_type_name(t)} of dtype {dtype} (only bool, integer, float and "
            "complex dtypes, and those of ml_dtypes, are stored without pickling)"
        )
    return f"a value of type {_type_name(t)}"


# ------------------------------------------------------------------------- paths

# A key path is a linked list of (parent, key) pairs, rendered only for messages.
_Path = tuple | None


def _render(root: str, node: _Path) -> str:
    keys = []
    while node is not None:
        node, key = node
        keys.append(key)
    keys.reverse()
    return (root or "value") + "".join(
        f".{k}" if type(k) is interop.Field else f"[{k!r}]" for k in keys
    )


# ------------------------------------------------------------------- check_value


class _NullSink:
    """A write-only file that discards what it gets (used to test picklability)."""

    __slots__ = ()

    def write(self, data: Any) -> None:
        return None


def _refuse(root: str, node: _Path, value: Any) -> CheckpointValueError:
    where = _render(root, node)
    return CheckpointValueError(
        f"{where}: cannot store {_refusal(value)} without pickling; convert it to a "
        "supported type (dict with str keys, list, tuple, str, bytes, bytearray, int, "
        "float, bool, None, numpy bool/number arrays and scalars) or pass "
        "allow_pickle=True to pickle this value",
        {"path": where, "type": _type_name(type(value))},
    )


def _check_picklable(value: Any, root: str, node: _Path) -> None:
    try:
        pickle.Pickler(_NullSink(), protocol=PICKLE_PROTOCOL).dump(value)
    except Exception as exc:
        where = _render(root, node)
        raise CheckpointValueError(
            f"{where}: cannot pickle a value of type {_type_name(type(value))}: {exc}",
            {"path": where, "type": _type_name(type(value))},
        ) from exc


_EXIT = object()


def check_value(
    value: Any, *, allow_pickle: bool, limits: LoadLimits | None = None, path: str = ""
) -> int:
    """Make sure ``value`` can be written and loaded back; touch no file.

    Parameters
    ----------
    value : Any
        The value to store.
    allow_pickle : bool
        Whether values without a native encoding may be pickled. Each such value is
        then pickled on its own; its parents stay native. Picklability is tested
        here (into a null sink), so an unpicklable value fails before any write.
    limits : LoadLimits, optional
        ``max_depth`` and ``max_nodes`` are enforced so that the file loads with
        these limits. Default: ``LoadLimits()``.
    path : str, default ""
        Name of the value in messages, e.g. ``"optimizer_state"``; key paths are
        appended to it (``optimizer_state['layers'][3]['w']``). ``""`` reads "value".

    Returns
    -------
    int
        The bytes of arrays, bytes and strings in ``value`` (as loading counts them
        against ``max_array_bytes``), pickled values not included.

    Raises
    ------
    CheckpointValueError
        For an unsupported value (non-str dict key, object/structured/string/
        datetime numpy array, set, other types) when ``allow_pickle`` is False, an
        unpicklable value when it is True, a container that contains itself, a tree
        deeper than ``limits.max_depth`` or with more than ``limits.max_nodes``
        nodes. The message and ``error_context["path"]`` name the key path.
    """
    if limits is None:
        limits = LoadLimits()
    elif not isinstance(limits, LoadLimits):
        raise CheckpointValueError(f"limits must be a LoadLimits, not {type(limits).__name__}")
    nodes = 1
    nbytes = 0
    ancestors: set[int] = set()
    stack: list[tuple[Any, Any, _Path]] = [(value, 0, None)]
    while stack:
        v, depth, node = stack.pop()
        if v is _EXIT:
            ancestors.discard(depth)
            continue
        tag = _native_tag(v)
        if tag is None:
            if not allow_pickle:
                raise _refuse(path, node, v)
            _check_picklable(v, path, node)
            continue
        if tag not in _CONTAINERS:
            nbytes += _declared_bytes(v, tag)
            continue
        vid = id(v)
        if tag is _NAMEDTUPLE or tag is _PYTREE:
            # Walked as a dict of its children (the node itself, alive in its
            # parent, stands for it among the ancestors).
            v, tag = _node_dict(v), _DICT
        if not v:
            continue
        nodes += len(v)
        _check_container(path, node, vid in ancestors, depth, nodes, limits)
        ancestors.add(vid)
        stack.append((_EXIT, vid, None))
        child_depth = depth + 1
        pairs = v.items() if tag is _DICT else enumerate(v)
        stack.extend((item, child_depth, (node, k)) for k, item in pairs)
    return nbytes


def _node_dict(value: Any) -> dict[Any, Any]:
    """The children of a NamedTuple or pytree node, keyed by field name or position."""
    _, fields, children = interop.node_parts(value)  # type: ignore[misc]
    keys = map(interop.Field, fields) if fields is not None else range(len(children))
    return dict(zip(keys, children, strict=True))


def _check_container(
    root: str, node: _Path, in_ancestors: bool, depth: int, nodes: int, limits: LoadLimits
) -> None:
    """Refuse a non-empty container that contains itself, sits at ``limits.max_depth``
    or brings the node count to ``nodes`` above ``limits.max_nodes``."""
    if in_ancestors:
        where = _render(root, node)
        raise CheckpointValueError(
            f"{where}: the value contains itself (a reference cycle); only trees can be stored",
            {"path": where},
        )
    max_depth = limits.max_depth
    if depth >= max_depth:
        where = _render(root, node)
        raise CheckpointValueError(
            f"{where}: the value nests deeper than max_depth={max_depth}, so it could "
            "not be loaded with these limits; raise them with "
            "CheckpointManager(..., load_limits=LoadLimits(max_depth=...))",
            {"path": where, "max_depth": max_depth},
        )
    max_nodes = limits.max_nodes
    if nodes > max_nodes:
        where = _render(root, node)
        raise CheckpointValueError(
            f"{where}: the value has more than max_nodes={max_nodes} nodes, so it could "
            "not be loaded with these limits; raise them with "
            "CheckpointManager(..., load_limits=LoadLimits(max_nodes=...))",
            {"path": where, "max_nodes": max_nodes},
        )


def _declared_bytes(value: Any, tag: str) -> int:
    """What loading counts against ``max_array_bytes`` for one leaf of ``tag``."""
    if (tag is _NDARRAY or tag is _ML_NDARRAY) and not isinstance(value, np.ndarray):
        spec = interop.array_spec(value)
        assert isinstance(spec, tuple)  # the tag says so
        return math.prod(spec[1]) * spec[0].itemsize
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    return 0


# ------------------------------------------------------------------- write_value

PutArray = Callable[[h5py.Group, str, np.ndarray], h5py.Dataset]
GetArray = Callable[[h5d.DatasetID, tuple[int, ...], np.dtype], "np.ndarray | None"]


def default_put_array(group: h5py.Group, name: str, arr: np.ndarray) -> h5py.Dataset:
    """Create ``group[name]`` holding ``arr`` (contiguous, uncompressed).

    Parameters
    ----------
    group : h5py.Group
    name : str
        Link name (already escaped).
    arr : numpy.ndarray
        C-contiguous array; may be 0-d or empty.

    Returns
    -------
    h5py.Dataset
        The new dataset.
    """
    return group.create_dataset(name, data=arr, dtype=hdf5_type(arr.dtype))


def _tag_type(tag: str) -> tuple[h5t.TypeID, np.ndarray]:
    buf = np.array(tag.encode("ascii"), dtype=f"S{len(tag)}")
    return h5t.py_create(buf.dtype), buf


_TAG_TYPES = {tag: _tag_type(tag) for tag in TAGS}

#: Arrays up to this size are written with the compact layout (inside their object
#: header: no separate allocation to make or, when loading, to read).
_COMPACT_ARRAY_BYTES = 4096


class _Handles:
    """The HDF5 property lists, dataspaces and types every write uses, made once per
    process: making them is a good part of the cost of writing a small tree, and
    none of them belongs to a file."""

    def __init__(self) -> None:
        self.scalar_space = h5s.create(h5s.SCALAR)
        self.null_space = h5s.create(h5s.NULL)
        self.lcpl = h5p.create(h5p.LINK_CREATE)
        self.lcpl.set_char_encoding(h5t.CSET_UTF8)
        # No modification times: the same value always gives the same bytes.
        self.gcpl = h5p.create(h5p.GROUP_CREATE)
        self.gcpl.set_link_creation_order(h5p.CRT_ORDER_TRACKED | h5p.CRT_ORDER_INDEXED)
        self.gcpl.set_obj_track_times(False)
        self.contiguous = h5p.create(h5p.DATASET_CREATE)
        self.contiguous.set_obj_track_times(False)
        self.compact = h5p.create(h5p.DATASET_CREATE)
        self.compact.set_obj_track_times(False)
        self.compact.set_layout(h5d.COMPACT)
        # (file type, memory type) of the fixed-type scalars.
        native_bool = h5t.py_create(np.dtype(np.bool_))
        self.types = {
            _INT: (h5t.STD_I64LE, h5t.py_create(np.dtype(np.int64))),
            _FLOAT: (h5t.IEEE_F64LE, h5t.py_create(np.dtype(np.float64))),
            _BOOL: (native_bool, native_bool),
        }
        self.dtype_types: dict[np.dtype, h5t.TypeID] = {}
        self.spaces: dict[tuple[int, ...], h5s.SpaceID] = {}
        self.text_types: dict[int, h5t.TypeID] = {}

    def type_of(self, dtype: np.dtype) -> h5t.TypeID:
        """:func:`hdf5_type` of ``dtype``, remembered (it is also its memory type)."""
        tid = self.dtype_types.get(dtype)
        if tid is None:
            tid = self.dtype_types[dtype] = hdf5_type(dtype)
        return tid

    def space_of(self, shape: tuple[int, ...]) -> h5s.SpaceID:
        """The simple dataspace of ``shape``; those of the first shapes asked for
        are remembered (a run saves the same shapes again and again)."""
        space = self.spaces.get(shape)
        if space is None:
            space = h5s.create_simple(shape)
            if len(self.spaces) < _REMEMBERED:
                self.spaces[shape] = space
        return space

    def text_type(self, size: int) -> h5t.TypeID:
        """The fixed-length, null-padded UTF-8 string type of ``size`` bytes."""
        tid = self.text_types.get(size)
        if tid is None:
            tid = h5t.C_S1.copy()
            tid.set_size(size)
            tid.set_strpad(h5t.STR_NULLPAD)
            tid.set_cset(h5t.CSET_UTF8)
            if len(self.text_types) < _REMEMBERED:
                self.text_types[size] = tid
        return tid


#: How many dataspaces and string types the writer keeps for reuse.
_REMEMBERED = 256


_HANDLES: _Handles | None = None


def _handles() -> _Handles:
    global _HANDLES
    if _HANDLES is None:
        _HANDLES = _Handles()
    return _HANDLES


class _Writer:
    """Writes the nodes of one write_value call.

    Without a ``put_array`` it writes arrays itself (compact when small, else
    contiguous). A ``put_array`` of h5ckpt's own may offer ``put_id(gid, name, arr)
    -> DatasetID``, used instead, without high-level h5py objects, and trusted to
    create the dataset it is asked for; what any other returns is checked.
    """

    def __init__(self, put_array: PutArray | None, root: str, allow_pickle: bool) -> None:
        self.put_array = put_array
        self.put_id = getattr(put_array, "put_id", None)
        self.root = root
        self.allow_pickle = allow_pickle
        h = self.h = _handles()
        self.scalar_space = h.scalar_space
        self.lcpl = h.lcpl
        self.types = h.types
        # Tasks: (parent gid, link name, value, key path of the value).
        self.stack: list[tuple[h5g.GroupID, str, Any, _Path]] = []

    def run(self, gid: h5g.GroupID, value: Any) -> None:
        """Write ``value`` as the child ``root`` of the group ``gid``."""
        stack = self.stack
        stack.append((gid, self.root, value, None))
        while stack:
            gid, name, v, node = stack.pop()
            tag = _native_tag(v)
            if tag is None:
                self.pickled(gid, name, v, node)
            else:
                _VALUE_WRITERS[tag](self, gid, name, v, tag, node)

    def tag(self, obj: Any, tag: str) -> None:
        tid, buf = _TAG_TYPES[tag]
        h5a.create(obj, _TYPE_ATTR_B, tid, self.scalar_space).write(buf, mtype=tid)

    def group(self, gid: h5g.GroupID, name: str, tag: str) -> h5g.GroupID:
        group = h5g.create(gid, name.encode("utf-8"), lcpl=self.lcpl, gcpl=self.h.gcpl)
        self.tag(group, tag)
        return group

    def scalar(
        self,
        gid: h5g.GroupID,
        name: str,
        tid: h5t.TypeID,
        data: np.ndarray,
        tag: str,
        compact: bool = True,
        mtype: h5t.TypeID | None = None,
    ) -> h5d.DatasetID:
        dcpl = self.h.compact if compact else self.h.contiguous
        dset = h5d.create(
            gid, name.encode("utf-8"), tid, self.scalar_space, dcpl=dcpl, lcpl=self.lcpl
        )
        # The memory type describes ``data`` (native order); text: the file's type.
        dset.write(h5s.ALL, h5s.ALL, data, mtype=mtype or tid)
        self.tag(dset, tag)
        return dset

    def text_attr(self, obj: Any, name: str, text: str) -> None:
        """A fixed-length, NUL-padded UTF-8 string attribute (no global heap)."""
        raw = text.encode("utf-8")
        size = max(len(raw), 1)
        tid = self.h.text_type(size)
        attr = h5a.create(obj, name.encode("ascii"), tid, self.scalar_space)
        attr.write(np.array(raw, dtype=f"S{size}"), mtype=tid)

    def text(self, gid: h5g.GroupID, name: str, text: str, tag: str) -> None:
        # A fixed-length string: variable-length ones live in the global heap, and
        # HDF5 can loop forever reading a damaged global heap.
        raw = text.encode("utf-8")
        size = max(len(raw), 1)  # HDF5 strings have at least one byte; NUL pads
        tid = self.h.text_type(size)
        data = np.array(raw, dtype=f"S{size}")
        self.scalar(gid, name, tid, data, tag, compact=size <= _COMPACT_TEXT_BYTES)

    def array(self, gid: h5g.GroupID, name: str, arr: np.ndarray, tag: str) -> h5d.DatasetID:
        arr = np.require(arr, requirements=("C", "A"))
        if self.put_array is None:
            dset_id = write_array(gid, name, arr)
            self.tag(dset_id, tag)
            return dset_id
        if self.put_id is not None:
            dset_id = self.put_id(gid, name, arr)
            self.tag(dset_id, tag)
            return dset_id
        dset = self.put_array(h5py.Group(gid), name, arr)
        if not isinstance(dset, h5py.Dataset):
            raise CheckpointValueError(
                f"put_array must return the h5py.Dataset it created, not {type(dset).__name__}"
            )
        stored = dset.id.get_type().dtype
        if stored != arr.dtype or dset.id.shape != arr.shape:
            raise CheckpointValueError(
                f"put_array stored {name!r} as dtype {stored.str} shape {dset.id.shape} for an "
                f"array of dtype {arr.dtype.str} shape {arr.shape}; it must keep the array's "
                "dtype (byte order included) and shape, 0-d arrays too",
                {"name": name},
            )
        self.tag(dset.id, tag)
        return dset.id

    def foreign_array(self, gid: h5g.GroupID, name: str, value: Any, refuse: Callable) -> None:
        """An array-like (converted to its numpy array here, once) or an ml_dtypes array."""
        hint = None
        arr = value
        if type(value) is not np.ndarray:
            try:
                arr, hint, _ = interop.host_array(value)
            except Exception as exc:
                why = f"cannot copy it to a numpy array: {type(exc).__name__}: {exc}"
                raise refuse(why) from exc
        tag = _array_tag(arr.dtype, arr.ndim)
        if tag is None:  # the conversion gave another dtype than the object declared
            raise refuse(_refusal(arr))
        ml = interop.ml_name(arr.dtype) if tag is _ML_NDARRAY else None
        dset = self.array(
            gid, name, arr if ml is None else arr.view(interop.bits_dtype(arr.dtype)), tag
        )
        if ml is not None:
            self.text_attr(dset, interop.DTYPE_ATTR, ml)
        if hint:
            self.text_attr(dset, interop.ARRAY_HINT_ATTR, hint)

    # ------------------------------------------------------------- values
    # One writer per tag (see _VALUE_WRITERS), called with the value, its tag and
    # its key path; containers queue their children.

    def pickled(self, gid: h5g.GroupID, name: str, value: Any, node: _Path) -> None:
        """A value no tag describes: pickled when allowed, else refused."""
        if not self.allow_pickle:
            raise _refuse(self.root, node, value)
        try:
            data = pickle.dumps(value, protocol=PICKLE_PROTOCOL)
        except Exception as exc:
            where = _render(self.root, node)
            raise CheckpointValueError(
                f"{where}: cannot pickle a value of type {_type_name(type(value))}: {exc}",
                {"path": where},
            ) from exc
        self.array(gid, name, np.frombuffer(data, dtype=_U8), _PICKLE)

    def dict_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        group = self.group(gid, name, tag)
        children = [(group, escape_key(k), item, (node, k)) for k, item in v.items()]
        children.reverse()
        self.stack.extend(children)

    def sequence_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        """A list or tuple."""
        group = self.group(gid, name, tag)
        children = [(group, str(i), item, (node, i)) for i, item in enumerate(v)]
        children.reverse()
        self.stack.extend(children)

    def node_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        """A NamedTuple or pytree node: a group of its children, with its class and
        field names."""
        parts = interop.node_parts(v)
        assert parts is not None  # the tag says so
        class_name, fields, children = parts
        group = self.group(gid, name, tag)
        self.text_attr(group, interop.CLASS_ATTR, class_name)
        if fields is not None:
            self.text_attr(group, interop.FIELDS_ATTR, ",".join(fields))
        keys = map(interop.Field, fields) if fields is not None else range(len(children))
        items = [
            (group, str(i), item, (node, k))
            for i, (k, item) in enumerate(zip(keys, children, strict=True))
        ]
        items.reverse()
        self.stack.extend(items)

    def number_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        """An int (of 64 bits), float or bool."""
        tid, mtype = self.types[tag]
        self.scalar(gid, name, tid, np.array(v, dtype=_NUMBER_DTYPES[tag]), tag, mtype=mtype)

    def none_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        dset = h5d.create(
            gid,
            name.encode("utf-8"),
            h5t.STD_U8LE,
            self.h.null_space,
            dcpl=self.h.contiguous,
            lcpl=self.lcpl,
        )
        self.tag(dset, _NONE)

    def str_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        self.text(gid, name, v, tag)

    def bigint_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        self.text(gid, name, hex(v), tag)

    def np_scalar_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        scalar = np.array(v)
        self.scalar(gid, name, self.h.type_of(scalar.dtype), scalar, tag)

    def ml_scalar_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        scalar = np.array(v)
        bits = scalar.view(interop.bits_dtype(scalar.dtype))
        dset = self.scalar(gid, name, hdf5_type(bits.dtype), bits, tag)
        self.text_attr(dset, interop.DTYPE_ATTR, interop.ml_name(scalar.dtype) or "")

    def ndarray_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        if type(v) is np.ndarray:
            self.array(gid, name, v, tag)
        else:
            self.foreign_value(gid, name, v, tag, node)

    def foreign_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        """An array-like or an ml_dtypes array."""
        self.foreign_array(gid, name, v, _refuser(self.root, node, v))

    def str_bytes_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        raw = v.encode("utf-8", "surrogatepass")
        self.array(gid, name, np.frombuffer(raw, dtype=_U8), tag)

    def bytes_value(self, gid: h5g.GroupID, name: str, v: Any, tag: str, node: _Path) -> None:
        """bytes or bytearray."""
        self.array(gid, name, np.frombuffer(v, dtype=_U8), tag)


#: The numpy dtype of each number tag.
_NUMBER_DTYPES = {_INT: np.dtype(np.int64), _FLOAT: np.dtype(np.float64), _BOOL: np.dtype(np.bool_)}

#: The writer of each tag.
_VALUE_WRITERS: dict[str, Callable[[_Writer, h5g.GroupID, str, Any, str, _Path], None]] = {
    _DICT: _Writer.dict_value,
    _LIST: _Writer.sequence_value,
    _TUPLE: _Writer.sequence_value,
    _NAMEDTUPLE: _Writer.node_value,
    _PYTREE: _Writer.node_value,
    _NONE: _Writer.none_value,
    _BOOL: _Writer.number_value,
    _INT: _Writer.number_value,
    _FLOAT: _Writer.number_value,
    _BIGINT: _Writer.bigint_value,
    _STR: _Writer.str_value,
    _STR_BYTES: _Writer.str_bytes_value,
    _BYTES: _Writer.bytes_value,
    _BYTEARRAY: _Writer.bytes_value,
    _NP_SCALAR: _Writer.np_scalar_value,
    _NDARRAY: _Writer.ndarray_value,
    _ML_NDARRAY: _Writer.foreign_value,
    _ML_SCALAR: _Writer.ml_scalar_value,
}
assert _VALUE_WRITERS.keys() == TAGS - {_PICKLE}  # pickles: _Writer.pickled


def write_array(gid: h5g.GroupID, name: str, arr: np.ndarray) -> h5d.DatasetID:
    """Create the dataset ``name`` (a link name, used as given) of the group ``gid``
    holding the C-contiguous ``arr``, as :func:`write_value` writes arrays without
    ``put_array``: contiguous, compact up to 4 KiB, no filters, data written.
    """
    h = _handles()
    tid = h.type_of(arr.dtype)
    space = h.scalar_space if arr.ndim == 0 else h.space_of(arr.shape)
    dcpl = h.compact if 0 < arr.nbytes <= _COMPACT_ARRAY_BYTES else h.contiguous
    dset = h5d.create(gid, name.encode("utf-8"), tid, space, dcpl=dcpl, lcpl=h.lcpl)
    if arr.size:
        dset.write(h5s.ALL, h5s.ALL, arr, mtype=tid)
    return dset


def write_value(
    parent: h5py.Group,
    name: str,
    value: Any,
    *,
    allow_pickle: bool,
    put_array: PutArray | None = None,
) -> None:
    """Write ``value`` as the child ``name`` of ``parent``.

    Call :func:`check_value` first: it refuses everything this function would
    refuse, before anything is written. This function raises the same
    :class:`~h5ckpt.errors.CheckpointValueError` for an unsupported value it meets,
    but by then the file holds the part of the tree written so far.

    Parameters
    ----------
    parent : h5py.Group
        Group (or file) to write into; it must not have a child ``name``.
    name : str
        Link name of the new node, used as given (it is not escaped).
    value : Any
        The value; see ``docs/format.md`` for what is stored natively.
    allow_pickle : bool
        Pickle values that have no native encoding (only those values).
    put_array : callable, optional
        ``put_array(group, link_name, arr) -> h5py.Dataset`` creates every dataset
        that holds an array: numpy arrays (any shape, including 0-d and empty) and
        the uint8 vectors of bytes, bytearray, str with NUL or lone surrogates, and
        pickles (possibly empty). ``arr`` is C-contiguous and aligned. The dataset
        must have exactly ``arr``'s dtype (byte order included, i.e. the HDF5 type
        :func:`hdf5_type` gives) and shape (``()`` for 0-d arrays: do not pass them
        through ``np.ascontiguousarray``, which makes them 1-d); chunking, filters
        and writing the data later are up to it. Default: the arrays are written
        here, contiguous (compact up to 4 KiB), without filters, as
        :func:`default_put_array` would but faster. Scalars, strings and
        containers are written directly.

    Raises
    ------
    CheckpointValueError
        For an unsupported value (with its key path), or when ``put_array`` does
        not return a dataset of ``arr``'s dtype and shape.
    """
    _Writer(put_array, name, allow_pickle).run(parent.id, value)


def _refuser(root: str, node: _Path, value: Any) -> Callable[[str], CheckpointValueError]:
    def refuse(why: str) -> CheckpointValueError:
        where = _render(root, node)
        return CheckpointValueError(
            f"{where}: cannot store a value of type {_type_name(type(value))}: {why}",
            {"path": where, "type": _type_name(type(value))},
        )

    return refuse


# -------------------------------------------------------------------- read_value


class _Corrupt(Exception):
    """Internal: a malformed node; turned into CheckpointCorruptError with its path."""


#: numpy dtypes of the fixed-length tag sizes, made once.
_TAG_DTYPES = [np.dtype(f"S{n}") for n in range(_MAX_TAG_BYTES + 1)]


def _read_tag(obj: Any) -> str:
    try:
        attr = h5a.open(obj, _TYPE_ATTR_B)
    except KeyError:
        raise _Corrupt(f"has no {TYPE_ATTR} attribute") from None
    tid = attr.get_type()
    if not isinstance(tid, h5t.TypeStringID):
        raise _Corrupt(f"has a {TYPE_ATTR} attribute that is not a string")
    if attr.get_space().get_simple_extent_type() != h5s.SCALAR:
        raise _Corrupt(f"has a {TYPE_ATTR} attribute that is not a scalar")
    if tid.is_variable_str():
        # Accepted for tags written with h5py's ``attrs[...] = "..."``; h5ckpt
        # itself writes fixed-length tags.
        buf = np.empty((), dtype=_VLEN_UTF8)
        attr.read(buf)
    else:
        size = tid.get_size()
        if size > _MAX_TAG_BYTES:
            raise _Corrupt(f"has a {TYPE_ATTR} attribute of {size} bytes")
        # The dataspace is known to be scalar: h5py does not check that the
        # attribute fits the buffer.
        buf = np.empty((), dtype=_TAG_DTYPES[size])
        attr.read(buf, mtype=tid)
    raw = buf[()]
    tag = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    if tag not in TAGS:
        raise _Corrupt(f"has the unknown type tag {tag[:_MAX_TAG_BYTES]!r}")
    return tag


def _read_text_attr(obj: Any, name: str, max_bytes: int) -> str | None:
    """A fixed-length string attribute of ``obj`` as text; None when it has none."""
    raw_name = name.encode("ascii")
    if not h5a.exists(obj, raw_name):
        return None
    attr = h5a.open(obj, raw_name)
    tid = attr.get_type()
    if not isinstance(tid, h5t.TypeStringID) or tid.is_variable_str():
        raise _Corrupt(f"has a {name} attribute that is not a fixed-length string")
    if attr.get_space().get_simple_extent_type() != h5s.SCALAR:
        raise _Corrupt(f"has a {name} attribute that is not a scalar")
    size = tid.get_size()
    if size > max_bytes:
        raise _Corrupt(f"has a {name} attribute of {size} bytes (at most {max_bytes})")
    buf = np.empty((), dtype=f"S{size}")
    attr.read(buf, mtype=tid)
    try:
        return buf.item().decode("utf-8")
    except UnicodeDecodeError:
        raise _Corrupt(f"has a {name} attribute that is not UTF-8") from None


class ByteBudget:
    """The ``max_array_bytes`` budget of one file, shared by the trees read from it."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


#: Checking only (``structure_only``): strings up to this size are still read, to
#: check that they decode; larger ones, arrays and blobs are not read.
_CHECKED_TEXT_BYTES = 1 << 20


def _memory_type(dt: np.dtype) -> h5t.TypeID:
    """The HDF5 memory type of an array of ``dt`` (what h5py would make for each
    read), made once per dtype."""
    return _handles().type_of(dt)


def _fixed_scalar(file_type: h5t.TypeID, dt: np.dtype, convert: Any) -> tuple[Any, ...]:
    return (file_type, dt, h5t.py_create(dt), convert)


#: tag -> (the file type h5ckpt writes, numpy dtype read into, memory type,
#: conversion to the Python value) of the scalars of a fixed type.
_FIXED_SCALARS = {
    _INT: _fixed_scalar(h5t.STD_I64LE, np.dtype(np.int64), int),
    _FLOAT: _fixed_scalar(h5t.IEEE_F64LE, np.dtype(np.float64), float),
    _BOOL: _fixed_scalar(h5t.py_create(np.dtype(np.bool_)), np.dtype(np.bool_), bool),
}


#: What a scalar's dtype must be, by tag, when it is not the one h5ckpt writes
#: (files from elsewhere): int and float 8 bytes of their kind, bool any bool.
_SCALAR_DTYPE_OK: dict[str, Callable[[np.dtype], bool]] = {
    _INT: lambda dt: dt.kind == "i" and dt.itemsize == 8,
    _FLOAT: lambda dt: dt.kind == "f" and dt.itemsize == 8,
    _BOOL: lambda dt: dt.kind == "b",
    _NP_SCALAR: _dtype_storable,
}

#: The value of a blob's bytes, by tag.
_BLOB_VALUES: dict[str, Callable[[bytearray], Any]] = {
    _BYTEARRAY: lambda data: data,
    _BYTES: bytes,
    _STR_BYTES: lambda data: data.decode("utf-8", "surrogatepass"),
    _PICKLE: lambda data: pickle.loads(data),
}


def _plain_dtype(tid: h5t.TypeID, tag: str) -> np.dtype:
    """The numpy dtype of ``tid``, refused when h5py gives it metadata (a vlen
    string, an enum other than bool, a reference...)."""
    dt = tid.dtype
    if dt.metadata is not None:
        raise _Corrupt(f"is tagged {tag} but has the special dtype {dt}")
    return dt


def ordered_links(gid: h5g.GroupID) -> list[tuple[bytes, int]]:
    """The links of the group ``gid`` as ``(raw name, link type)`` pairs.

    In creation order, which h5ckpt tracks in every group it writes, so a dict
    comes back in its insertion order; in name order for a group that does not
    track it (written by another program).
    """
    links: list[tuple[bytes, int]] = []

    def collect(link_name: bytes, info: Any) -> None:
        links.append((link_name, info.type))

    try:
        gid.links.iterate(collect, idx_type=h5.INDEX_CRT_ORDER, info=True)
    except RuntimeError:
        links.clear()
        gid.links.iterate(collect, idx_type=h5.INDEX_NAME, info=True)
    return links


class _Visit:
    """A task of the reader: read the child ``name`` of the group ``gid`` into
    ``target[key]``. (A class with slots: a NamedTuple costs measurably more to
    make, once per node.)"""

    __slots__ = ("depth", "gid", "key", "name", "node", "target")

    def __init__(
        self, gid: h5g.GroupID, name: bytes, depth: int, node: _Path, target: Any, key: Any
    ) -> None:
        self.gid = gid
        self.name = name
        self.depth = depth
        self.node = node
        self.target = target
        self.key = key


class _Finish:
    """A task of the reader, queued below the children of a tuple, NamedTuple or
    pytree node: once they are read, ``target[key] = make(items)``."""

    __slots__ = ("items", "key", "make", "node", "target")

    def __init__(
        self,
        items: list[Any],
        make: Callable[[list[Any]], Any],
        node: _Path,
        target: Any,
        key: Any,
    ) -> None:
        self.items = items
        self.make = make
        self.node = node
        self.target = target
        self.key = key


class _Reader:
    def __init__(
        self,
        allow_pickle: bool,
        limits: LoadLimits,
        root: str,
        budget: ByteBudget,
        get_array: GetArray | None = None,
        structure_only: bool = False,
    ) -> None:
        self.get_array = get_array
        self.allow_pickle = allow_pickle
        self.limits = limits
        self.root = root
        self.budget = budget
        self.structure_only = structure_only
        self.nodes = 1
        self.stack: list[_Visit | _Finish] = []

    def where(self, node: _Path) -> str:
        return _render(self.root, node)

    def limit(self, node: _Path, message: str, **context: Any) -> CheckpointLimitError:
        where = self.where(node)
        return CheckpointLimitError(f"{where}: {message}", {"path": where, **context})

    def take_bytes(self, node: _Path, nbytes: int) -> None:
        budget = self.budget
        budget.used += nbytes
        if budget.used > budget.limit:
            raise self.limit(
                node,
                f"arrays total more than max_array_bytes={budget.limit} bytes (this dataset "
                f"declares {nbytes} bytes)",
                max_array_bytes=budget.limit,
                declared_bytes=nbytes,
            )

    def run(self, obj: Any) -> Any:
        result: list[Any] = [None]
        stack = self.stack
        # ``node`` and ``obj`` name where the reader is, for the messages of errors.
        self.node: _Path = None
        self.visit(obj, 0, None, result, 0)
        while stack:
            task = stack.pop()
            self.node = task.node
            if isinstance(task, _Finish):
                task.target[task.key] = task.make(task.items)
            else:
                obj = h5o.open(task.gid, task.name)
                self.visit(obj, task.depth, task.node, task.target, task.key)
        return result[0]

    def visit(self, obj: Any, depth: int, node: _Path, target: Any, key: Any) -> None:
        """Read the object ``obj`` into ``target[key]``; queue its children."""
        self.obj = obj
        if h5a.get_num_attrs(obj) > self.limits.max_attributes:
            raise self.limit(
                node,
                f"an HDF5 object has more than max_attributes={self.limits.max_attributes} "
                "attributes",
                max_attributes=self.limits.max_attributes,
            )
        tag = _read_tag(obj)
        if isinstance(obj, h5g.GroupID):
            if tag not in _CONTAINERS:
                raise _Corrupt(f"is a group with the leaf type tag {tag!r}")
            self.container(obj, tag, depth, node, target, key)
        elif isinstance(obj, h5d.DatasetID):
            if tag in _CONTAINERS:
                raise _Corrupt(f"is a dataset with the container type tag {tag!r}")
            target[key] = _LEAF_READERS[tag](self, obj, tag, node)
        else:
            raise _Corrupt("is neither a group nor a dataset")

    # ------------------------------------------------------------- containers

    def container(
        self, gid: h5g.GroupID, tag: str, depth: int, node: _Path, target: Any, key: Any
    ) -> None:
        n = len(gid)
        if n:
            self.take_nodes(n, depth, node)
        if tag == _DICT:
            self.dict_children(gid, n, depth + 1, node, target, key)
        else:
            self.sequence_children(gid, tag, n, depth + 1, node, target, key)

    def take_nodes(self, n: int, depth: int, node: _Path) -> None:
        """Count the ``n`` children of a group at ``depth`` against the limits."""
        if depth >= self.limits.max_depth:
            raise self.limit(
                node,
                f"the tree nests deeper than max_depth={self.limits.max_depth}",
                max_depth=self.limits.max_depth,
            )
        self.nodes += n
        if self.nodes > self.limits.max_nodes:
            raise self.limit(
                node,
                f"the tree has more than max_nodes={self.limits.max_nodes} nodes",
                max_nodes=self.limits.max_nodes,
            )

    def dict_children(
        self, gid: h5g.GroupID, n: int, child_depth: int, node: _Path, target: Any, key: Any
    ) -> None:
        value: dict[str, Any] = {}
        target[key] = value
        links = ordered_links(gid)
        if len(links) != n:
            raise _Corrupt("lists a different number of links than it holds")
        tasks = []
        for link_name, link_type in links:
            try:
                k = unescape_key(link_name.decode("utf-8"))
            except ValueError as exc:
                raise _Corrupt(f"has the malformed link name {link_name!r}") from exc
            if link_type != h5l.TYPE_HARD:
                raise _Corrupt(f"has the soft or external link {link_name!r}")
            tasks.append(_Visit(gid, link_name, child_depth, (node, k), value, k))
        tasks.reverse()
        self.stack.extend(tasks)

    def sequence_children(
        self,
        gid: h5g.GroupID,
        tag: str,
        n: int,
        child_depth: int,
        node: _Path,
        target: Any,
        key: Any,
    ) -> None:
        """A list, tuple, NamedTuple or pytree node: children named 0 to n - 1."""
        items: list[Any] = [None] * n
        make, keys = self.sequence_maker(gid, tag, n)
        if make is None:
            target[key] = items
        elif not n:
            target[key] = make([])
            return
        else:
            self.stack.append(_Finish(items, make, node, target, key))
        tasks = []
        for i in range(n):
            link_name = str(i).encode("ascii")
            try:
                link_type = gid.links.get_info(link_name).type
            except (KeyError, RuntimeError):
                raise _Corrupt(f"has {n} links but none named {i}") from None
            if link_type != h5l.TYPE_HARD:
                raise _Corrupt(f"has the soft or external link {i}")
            tasks.append(_Visit(gid, link_name, child_depth, (node, keys[i]), items, i))
        tasks.reverse()
        self.stack.extend(tasks)

    def sequence_maker(
        self, gid: h5g.GroupID, tag: str, n: int
    ) -> tuple[Callable[[list[Any]], Any] | None, Any]:
        """What makes the value of a sequence node from its items (None: the list of
        them is the value) and the keys of its children in key paths."""
        if tag == _LIST:
            return None, range(n)
        if tag == _TUPLE:
            return tuple, range(n)
        try:
            make, fields = interop.node_maker(
                tag == _NAMEDTUPLE,
                _read_text_attr(gid, interop.CLASS_ATTR, interop.MAX_CLASS_BYTES),
                _read_text_attr(gid, interop.FIELDS_ATTR, interop.MAX_FIELDS_BYTES),
                n,
            )
        except ValueError as exc:
            raise _Corrupt(str(exc)) from None
        return make, range(n) if fields is None else [interop.Field(f) for f in fields]

    # ----------------------------------------------------------------- leaves
    # One reader per tag (see _LEAF_READERS), each checking that the dataset is
    # what its tag says before reading it.

    def none_leaf(self, dset: h5d.DatasetID, tag: str, node: _Path) -> None:
        if dset.get_space().get_simple_extent_type() != h5s.NULL:
            raise _Corrupt("is tagged none but its dataspace is not null")

    def number_leaf(self, dset: h5d.DatasetID, tag: str, node: _Path) -> Any:
        """An int, float or bool."""
        kind = dset.get_space().get_simple_extent_type()
        tid = dset.get_type()
        file_type, dt, mtype, convert = _FIXED_SCALARS[tag]
        if kind == h5s.SCALAR and tid == file_type:
            # The type h5ckpt writes for an int, float or bool: no dtype to work out.
            number = np.empty((), dtype=dt)
            dset.read(h5s.ALL, h5s.ALL, number, mtype=mtype)
            return convert(number[()])
        return convert(self.scalar(dset, tag, kind, tid))

    def np_scalar_leaf(self, dset: h5d.DatasetID, tag: str, node: _Path) -> Any:
        kind = dset.get_space().get_simple_extent_type()
        return self.scalar(dset, tag, kind, dset.get_type())

    def scalar(self, dset: h5d.DatasetID, tag: str, kind: int, tid: h5t.TypeID) -> Any:
        """The numpy scalar of a scalar dataset of ``tid``, of a dtype its tag allows."""
        dt = _plain_dtype(tid, tag)
        if kind != h5s.SCALAR:
            raise _Corrupt(f"is tagged {tag} but is not a scalar")
        if not _SCALAR_DTYPE_OK[tag](dt):
            raise _Corrupt(f"is tagged {tag} but has the dtype {dt}")
        out = np.empty((), dtype=dt)
        dset.read(h5s.ALL, h5s.ALL, out, mtype=_memory_type(dt))
        return out[()]

    def text_leaf(self, dset: h5d.DatasetID, tag: str, node: _Path) -> Any:
        """A str or bigint: a scalar fixed-length UTF-8 string."""
        kind = dset.get_space().get_simple_extent_type()
        tid = dset.get_type()
        if kind != h5s.SCALAR:
            raise _Corrupt(f"is tagged {tag} but is not a scalar")
        if not isinstance(tid, h5t.TypeStringID) or tid.is_variable_str():
            raise _Corrupt(f"is tagged {tag} but is not a fixed-length string")
        size = tid.get_size()
        self.take_bytes(node, size)
        if self.structure_only and size > _CHECKED_TEXT_BYTES:
            return None
        buf = np.empty((), dtype=f"S{size}")
        dset.read(h5s.ALL, h5s.ALL, buf, mtype=tid)
        text = buf.item().decode("utf-8")  # numpy drops the NUL padding
        if tag == _STR:
            return text
        if _BIGINT_RE.fullmatch(text) is None:
            raise _Corrupt(f"is tagged bigint but holds {text[:40]!r}")
        return int(text, 16)

    def pickle_leaf(self, dset: h5d.DatasetID, tag: str, node: _Path) -> Any:
        if not self.allow_pickle and not self.structure_only:
            where = self.where(node)
            raise CheckpointPickleError(
                f"{where} was saved with allow_pickle=True; pass allow_pickle=True to load "
                "it — unpickling can run code, only do it for files you trust",
                {"path": where},
            )
        return self.blob_leaf(dset, tag, node)

    def blob_leaf(self, dset: h5d.DatasetID, tag: str, node: _Path) -> Any:
        """bytes, bytearray, str_bytes or pickle: a 1-d uint8 dataset."""
        space = dset.get_space()
        kind = space.get_simple_extent_type()
        dt = _plain_dtype(dset.get_type(), tag)
        if kind != h5s.SIMPLE or space.get_simple_extent_ndims() != 1 or dt != _U8:
            raise _Corrupt(f"is tagged {tag} but is not a 1-d uint8 dataset")
        (size,) = space.get_simple_extent_dims()
        self.take_bytes(node, size)
        if self.structure_only:
            return None
        data = bytearray(size)
        if size:
            dset.read(h5s.ALL, h5s.ALL, np.frombuffer(data, dtype=_U8), mtype=_memory_type(dt))
        return _BLOB_VALUES[tag](data)

    def ndarray_leaf(self, dset: h5d.DatasetID, tag: str, node: _Path) -> Any:
        space = dset.get_space()
        kind = space.get_simple_extent_type()
        dt = _plain_dtype(dset.get_type(), tag)
        if kind not in (h5s.SCALAR, h5s.SIMPLE):
            raise _Corrupt("is tagged ndarray but has a null dataspace")
        if not _dtype_storable(dt):
            raise _Corrupt(f"is tagged ndarray but has the unsupported dtype {dt}")
        shape = space.get_simple_extent_dims() if kind == h5s.SIMPLE else ()
        self.take_bytes(node, math.prod(shape) * dt.itemsize)
        if self.structure_only:
            # Stands for the array (no memory): the structure was all there was to check.
            return np.broadcast_to(np.zeros((), dtype=dt), shape)
        out = self.get_array(dset, shape, dt) if self.get_array is not None else None
        if out is None:
            out = np.empty(shape, dtype=dt)
            if out.size:
                dset.read(h5s.ALL, h5s.ALL, out, mtype=_memory_type(dt))
        return out

    def ml_leaf(self, dset: h5d.DatasetID, tag: str, node: _Path) -> Any:
        """An ml_dtypes array or scalar: its bits, viewed as the dtype its attribute names."""
        name = _read_text_attr(dset, interop.DTYPE_ATTR, 64)
        if name is None or not interop.is_ml_name(name):
            raise _Corrupt(f"is tagged {tag} but has no valid {interop.DTYPE_ATTR} attribute")
        file_dt = dset.get_type().dtype
        if file_dt.kind != "u" or file_dt.metadata is not None:
            raise _Corrupt(f"is tagged {tag} but holds {file_dt}, not unsigned integers")
        kind = dset.get_space().get_simple_extent_type()
        if kind != h5s.SCALAR and (tag == _ML_SCALAR or kind != h5s.SIMPLE):
            shape = "null" if kind == h5s.NULL else "non-scalar"
            raise _Corrupt(f"is tagged {tag} but has a {shape} dataspace")
        if tag == _ML_NDARRAY:
            bits = self.ndarray_leaf(dset, _NDARRAY, node)
        else:
            bits = self.np_scalar_leaf(dset, _NP_SCALAR, node)
        if self.structure_only:
            return bits
        try:
            dtype = interop.ml_dtype(name)
        except LookupError as exc:
            where = self.where(node)
            raise CheckpointError(f"{where}: {exc}", {"path": where, "dtype": name}) from None
        if dtype.itemsize != file_dt.itemsize:
            raise _Corrupt(f"holds {file_dt.itemsize}-byte elements for the dtype {name}")
        bits = np.asarray(bits)
        if not bits.dtype.isnative:
            bits = bits.astype(bits.dtype.newbyteorder("="))
        out = bits.view(dtype)
        return out if tag == _ML_NDARRAY else out[()]


#: The reader of each leaf tag.
_LEAF_READERS: dict[str, Callable[[_Reader, h5d.DatasetID, str, _Path], Any]] = {
    _NONE: _Reader.none_leaf,
    _BOOL: _Reader.number_leaf,
    _INT: _Reader.number_leaf,
    _FLOAT: _Reader.number_leaf,
    _BIGINT: _Reader.text_leaf,
    _STR: _Reader.text_leaf,
    _STR_BYTES: _Reader.blob_leaf,
    _BYTES: _Reader.blob_leaf,
    _BYTEARRAY: _Reader.blob_leaf,
    _PICKLE: _Reader.pickle_leaf,
    _NP_SCALAR: _Reader.np_scalar_leaf,
    _NDARRAY: _Reader.ndarray_leaf,
    _ML_NDARRAY: _Reader.ml_leaf,
    _ML_SCALAR: _Reader.ml_leaf,
}
assert _LEAF_READERS.keys() == TAGS - _CONTAINERS


def _hdf5_name(obj: Any) -> str | None:
    try:
        name = h5i.get_name(obj)
    except Exception:
        return None
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else name


def read_value(
    node: h5py.Group | h5py.Dataset | h5g.GroupID | h5d.DatasetID,
    *,
    allow_pickle: bool,
    limits: LoadLimits,
    path: str = "",
    get_array: GetArray | None = None,
    budget: ByteBudget | None = None,
    structure_only: bool = False,
) -> Any:
    """Read the value stored at ``node`` by :func:`write_value`.

    Every limit is checked before the memory it guards is allocated: the
    attribute count of each object before its tag is read, depth and node count
    before a group's links are listed, and each array's or string's declared size
    (shape times item size, from its dataspace and datatype) before it is read.
    Links must be hard links; soft and external links are refused without being
    followed.

    Parameters
    ----------
    node : h5py.Group, h5py.Dataset, or the low-level GroupID or DatasetID of one
        The node written by ``write_value``.
    allow_pickle : bool
        Whether pickled nodes may be unpickled. Only for trusted files.
    limits : LoadLimits
        Bounds on depth, node count, attributes per object and total array bytes.
        With ``max_array_bytes=None`` the budget is
        ``limits.resolved_max_bytes(size of node's file)``.
    path : str, default ""
        Name of the value in messages; ``""`` reads "value".
    get_array : callable, optional
        ``get_array(dataset_id, shape, dtype)`` may return the array of an
        ``ndarray`` node itself (for example a view of bytes already in memory) after
        the node passed every check; ``None`` lets the reader read it as usual.
    budget : ByteBudget, optional
        The array byte budget to charge, shared by every tree read from one file;
        default: a new one of ``max_array_bytes``, or
        ``limits.resolved_max_bytes(size of node's file)``.
    structure_only : bool, default False
        Make every check loading makes without reading array, blob or large string
        data and without unpickling: what the result holds in their place is not the
        value (arrays are zero-filled read-only stand-ins, the others ``None``).

    Returns
    -------
    Any
        The value.

    Raises
    ------
    CheckpointLimitError
        When the tree exceeds a limit.
    CheckpointPickleError
        On a pickled node when ``allow_pickle`` is False; nothing is unpickled.
    CheckpointCorruptError
        On anything malformed: missing or unknown type tags, a tag that does not
        match its object's kind, dtype or dataspace, badly escaped keys, missing list
        items, soft or external links, undecodable text, and any error HDF5 or
        unpickling raises. No other exception type escapes (``KeyboardInterrupt``
        aside).
    CheckpointResourceError
        When memory ran out (``MemoryError``): nothing is wrong with the file.
    """
    if not isinstance(limits, LoadLimits):
        raise CheckpointValueError(f"limits must be a LoadLimits, not {type(limits).__name__}")
    reader: _Reader | None = None
    try:
        if isinstance(node, (h5g.GroupID, h5d.DatasetID)):
            oid: Any = node
            if budget is None:
                budget = ByteBudget(file_budget(limits, h5py.File(h5i.get_file_id(oid))))
        else:
            # A File's id is a FileID; its root group is a GroupID.
            oid = node["/"].id if isinstance(node, h5py.File) else node.id
            if budget is None:
                budget = ByteBudget(file_budget(limits, node.file))
        reader = _Reader(allow_pickle, limits, path, budget, get_array, structure_only)
        return reader.run(oid)
    except CheckpointError:
        raise
    except MemoryError as exc:
        where = _render(path, reader.node if reader is not None else None)
        raise CheckpointResourceError(
            f"{where}: out of memory while loading (the file is not at fault; free memory "
            "or raise the process's memory limit)",
            {"path": where, "resource": "memory"},
        ) from exc
    except Exception as exc:
        tree_node = reader.node if reader is not None else None
        where = _render(path, tree_node)
        obj = getattr(reader, "obj", None)
        hdf5_name = _hdf5_name(obj) if obj is not None else None
        if isinstance(exc, _Corrupt):
            message = f"{where}: malformed checkpoint tree: the node {exc}"
            cause = exc.__cause__
        else:
            message = f"{where}: malformed checkpoint tree: {type(exc).__name__}: {exc}"
            cause = exc
        context = {"path": where}
        if hdf5_name is not None:
            context["hdf5_path"] = hdf5_name
        raise CheckpointCorruptError(message, context) from cause


def file_budget(limits: LoadLimits, f: h5py.File) -> int:
    """The ``max_array_bytes`` budget of the open file ``f``."""
    if limits.max_array_bytes is not None:
        return limits.max_array_bytes
    return limits.resolved_max_bytes(f.id.get_filesize())


# ------------------------------------------------------------------ values_equal


def _float_equal(x: float, y: float) -> bool:
    if x != x:
        return y != y
    return x == y and math.copysign(1.0, x) == math.copysign(1.0, y)


def _arrays_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Exact comparison of two non-object arrays (dtype, shape, values)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    kind = a.dtype.kind
    if kind in "fc" and interop.ml_name(a.dtype):  # few ufuncs take them: their bits
        return a.tobytes() == b.tobytes()
    if kind in "fc":
        pairs = [(a.real, b.real), (a.imag, b.imag)] if kind == "c" else [(a, b)]
        for x, y in pairs:
            with np.errstate(invalid="ignore"):
                same = (x == y) & (np.signbit(x) == np.signbit(y))
                same |= np.isnan(x) & np.isnan(y)
            if not same.all():
                return False
        return True
    if kind in "biu":
        return bool(np.array_equal(a, b))
    return a.tobytes() == b.tobytes()


def values_equal(a: Any, b: Any) -> bool:
    """Whether two values are exactly equal, as a round trip must preserve them.

    Types must match exactly at every level (``True`` is not ``1``, a tuple is not
    a list, ``np.float32(1)`` is not ``1.0``). Dicts must have the same keys in the
    same order. Floats (Python, numpy scalars and arrays, real and imaginary parts
    of complex values) are equal when both are NaN or when they are equal with the
    same sign, so ``-0.0`` differs from ``0.0``. Arrays must have the same dtype
    (byte order included) and shape; array-likes (``jax.Array``, ``torch.Tensor``)
    are compared as their numpy arrays, JAX pytree nodes child by child. Object
    arrays are compared element by element; other values (e.g. unpickled objects)
    with ``==``.

    Parameters
    ----------
    a, b : Any

    Returns
    -------
    bool
    """
    stack: list[tuple[Any, Any]] = [(a, b)]
    while stack:
        x, y = stack.pop()
        t = type(x)
        if t is not type(y):
            return False
        pairs = _EQUAL_PAIRS.get(t, _other_pairs)(x, y)
        if pairs is None:
            return False
        stack.extend(pairs)
    return True


# Comparers of two values of one type: None when they differ, else the pairs of
# their parts that must be equal too (none for a leaf).
_Pairs = Iterable[tuple[Any, Any]] | None
_SAME: tuple[tuple[Any, Any], ...] = ()


def _dict_pairs(x: dict, y: dict) -> _Pairs:
    if len(x) != len(y):
        return None
    return itertools.chain(
        zip(x.keys(), y.keys(), strict=True), zip(x.values(), y.values(), strict=True)
    )


def _sequence_pairs(x: Any, y: Any) -> _Pairs:
    """A list, tuple or NamedTuple."""
    return None if len(x) != len(y) else zip(x, y, strict=True)


def _float_pairs(x: float, y: float) -> _Pairs:
    return _SAME if _float_equal(x, y) else None


def _complex_pairs(x: complex, y: complex) -> _Pairs:
    same = _float_equal(x.real, y.real) and _float_equal(x.imag, y.imag)
    return _SAME if same else None


def _ndarray_pairs(x: np.ndarray, y: np.ndarray) -> _Pairs:
    if x.dtype.hasobject:
        if x.dtype != y.dtype or x.shape != y.shape:
            return None
        return zip(x.ravel().tolist(), y.ravel().tolist(), strict=True)
    return _SAME if _arrays_equal(x, y) else None


def _other_pairs(x: Any, y: Any) -> _Pairs:
    """Values of any other type: NamedTuples, numpy scalars, array-likes and pytree
    nodes of other libraries, and at last whatever ``==`` says."""
    t = type(x)
    if issubclass(t, tuple) and hasattr(t, "_fields"):
        return _sequence_pairs(x, y)
    if isinstance(x, np.generic):
        return _SAME if _arrays_equal(np.asarray(x), np.asarray(y)) else None
    if x is y:
        return _SAME
    tag = _foreign_tag(x)
    if tag in (_NDARRAY, _ML_NDARRAY):
        # Array-likes of the same type (jax.Array, torch.Tensor...): their arrays.
        same = _arrays_equal(interop.host_array(x)[0], interop.host_array(y)[0])
        return _SAME if same else None
    if tag is _PYTREE:
        px, py = interop.node_parts(x), interop.node_parts(y)
        if px is None or py is None or px[1] != py[1] or len(px[2]) != len(py[2]):
            return None
        return zip(px[2], py[2], strict=True)
    try:
        same = bool(x == y)
    except Exception:
        return None
    return _SAME if same else None


_EQUAL_PAIRS: dict[type, Callable[[Any, Any], _Pairs]] = {
    dict: _dict_pairs,
    list: _sequence_pairs,
    tuple: _sequence_pairs,
    float: _float_pairs,
    complex: _complex_pairs,
    np.ndarray: _ndarray_pairs,
}

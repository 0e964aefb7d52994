"""read_value: read a value back, checking every load limit before the memory it
guards is allocated (:class:`ByteBudget`, :func:`file_budget`), and the links of a
group in order (:func:`ordered_links`)."""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np
from h5py import h5, h5a, h5d, h5g, h5i, h5l, h5o, h5s, h5t

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

from .classify import _dtype_storable
from .handles import _handles
from .names import (
    _BIGINT,
    _BOOL,
    _BYTEARRAY,
    _BYTES,
    _CONTAINERS,
    _DICT,
    _FLOAT,
    _INT,
    _LIST,
    _ML_NDARRAY,
    _ML_SCALAR,
    _NAMEDTUPLE,
    _NDARRAY,
    _NONE,
    _NP_SCALAR,
    _PICKLE,
    _STR,
    _STR_BYTES,
    _TUPLE,
    _TYPE_ATTR_B,
    _U8,
    TAGS,
    TYPE_ATTR,
    _Path,
    _render,
    unescape_key,
)

# -------------------------------------------------------------------- read_value

GetArray = Callable[[h5d.DatasetID, tuple[int, ...], np.dtype], "np.ndarray | None"]

_MAX_TAG_BYTES = 32
_BIGINT_RE = re.compile(r"-?0x[0-9a-f]+")
_VLEN_UTF8 = h5py.string_dtype("utf-8")


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
        try:
            dtype = interop.ml_dtype(name)
        except LookupError as exc:
            if self.structure_only:
                # A dtype this process cannot name says nothing about the file:
                # loading it here fails, and says why, without marking it.
                return bits
            where = self.where(node)
            raise CheckpointError(f"{where}: {exc}", {"path": where, "dtype": name}) from None
        # Checked when validating too: a size that cannot be loaded is corruption.
        if dtype.itemsize != file_dt.itemsize:
            raise _Corrupt(f"holds {file_dt.itemsize}-byte elements for the dtype {name}")
        if self.structure_only:
            return bits
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

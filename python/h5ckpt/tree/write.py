"""write_value: write a value as one child of an HDF5 group, one object per node
(:func:`write_array` and :func:`default_put_array` for its arrays)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np
from h5py import h5a, h5d, h5g, h5s, h5t

from h5ckpt import interop
from h5ckpt.errors import CheckpointValueError

from .classify import _array_tag, _native_tag, _refusal, _refuse, _type_name, hdf5_type
from .handles import _handles
from .names import (
    _BIGINT,
    _BOOL,
    _BYTEARRAY,
    _BYTES,
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
    _PYTREE,
    _STR,
    _STR_BYTES,
    _TUPLE,
    _TYPE_ATTR_B,
    _U8,
    PICKLE_PROTOCOL,
    TAGS,
    _Path,
    _render,
    escape_key,
)

# ------------------------------------------------------------------- write_value

PutArray = Callable[[h5py.Group, str, np.ndarray], h5py.Dataset]


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
_COMPACT_TEXT_BYTES = 4096  # longer strings are stored contiguously (compact max: 64 KiB)


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

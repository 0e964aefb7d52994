"""The HDF5 property lists, dataspaces and types that writing (and the memory types
of reading) use, made once per process."""

from __future__ import annotations

import numpy as np
from h5py import h5d, h5p, h5s, h5t

from .classify import hdf5_type
from .names import _BOOL, _FLOAT, _INT


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

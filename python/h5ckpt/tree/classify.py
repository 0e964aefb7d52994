"""Which type tag stores a value, or in words why none does, and which numpy dtypes
survive an h5py round trip (:func:`hdf5_type` is the HDF5 type of each).
"""

from __future__ import annotations

import re
from typing import Any

import h5py
import numpy as np
from h5py import h5s, h5t

from h5ckpt import interop
from h5ckpt.errors import CheckpointValueError

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
    _PYTREE,
    _STR,
    _STR_BYTES,
    _TUPLE,
    _Path,
    _render,
)

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_MAX_RANK = 32  # H5S_MAX_RANK

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


def _refuse(root: str, node: _Path, value: Any) -> CheckpointValueError:
    where = _render(root, node)
    return CheckpointValueError(
        f"{where}: cannot store {_refusal(value)} without pickling; convert it to a "
        "supported type (dict with str keys, list, tuple, str, bytes, bytearray, int, "
        "float, bool, None, numpy bool/number arrays and scalars) or pass "
        "allow_pickle=True to pickle this value",
        {"path": where, "type": _type_name(type(value))},
    )

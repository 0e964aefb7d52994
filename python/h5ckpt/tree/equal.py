"""values_equal: whether two values are exactly equal, as a round trip must
preserve them (types, dtypes, NaN, signed zero)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from h5ckpt import interop

from .classify import _arrays_equal, _foreign_tag
from .names import _ML_NDARRAY, _NDARRAY, _PYTREE

# ------------------------------------------------------------------ values_equal


def _float_equal(x: float, y: float) -> bool:
    if x != x:
        return y != y
    return x == y and math.copysign(1.0, x) == math.copysign(1.0, y)


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

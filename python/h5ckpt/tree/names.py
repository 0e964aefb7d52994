"""The names of the payload tree: type tags, the constants several modules share,
dict keys as link names, and key paths in messages.

Every HDF5 object of a tree carries the attribute :data:`TYPE_ATTR` holding one of
:data:`TAGS`. Dict keys become link names through a reversible escape
(:func:`escape_key`, :func:`unescape_key`). A key path (``_Path``) names a node in
messages (:func:`_render`).
"""

from __future__ import annotations

import re

import numpy as np

from h5ckpt import interop

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

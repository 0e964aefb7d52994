"""Values that other libraries define: array-likes, ml_dtypes, NamedTuples, JAX pytree nodes.

The payload tree (:mod:`h5ckpt.tree`) stores these through the tags ``ndarray``
(with a library hint), ``ml_ndarray``, ``ml_scalar``, ``namedtuple`` and ``pytree``
(``docs/format.md``, section "Payload tree"). This module knows how to take such a
value apart without pickling it, and how to give a stored one back without
importing anything a file names:

* **Array-likes** (``jax.Array``, ``torch.Tensor``, CuPy arrays, numpy subclasses
  such as ``np.memmap``; anything with ``__array__``, ``__array_interface__`` or
  ``__dlpack__``) become their numpy array, copied to host memory at most once.
* **ml_dtypes** arrays and scalars (``bfloat16``, the float8 types, ``int4``, ...),
  which HDF5 has no type for, are stored as the unsigned integers of their bits.
* **NamedTuples** are stored with their field names and class name as text, and
  come back as a NamedTuple class built here from those names.
* **JAX pytree nodes** (a class registered with ``jax.tree_util``, e.g. a flax
  ``struct.dataclass`` or an equinox module) are stored as their children.

None of jax, torch, cupy or ml_dtypes is imported here unless a value already comes
from it (then it is in ``sys.modules``), or, for ml_dtypes, a file holds such an
array.
"""

from __future__ import annotations

import collections
import keyword
import re
import sys
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "ARRAY_HINT_ATTR",
    "CLASS_ATTR",
    "DTYPE_ATTR",
    "FIELDS_ATTR",
    "MAX_CLASS_BYTES",
    "MAX_FIELDS_BYTES",
    "RESTORED_MODULE",
    "Field",
    "HostArray",
    "Node",
    "array_spec",
    "bits_dtype",
    "host_array",
    "library",
    "ml_dtype",
    "ml_name",
    "namedtuple_fields",
    "node_maker",
    "node_parts",
    "pytree_flatten",
    "restored_namedtuple",
    "snapshot_value",
    "torch_numpy_dtype",
]

#: Attribute of an array dataset that names the library the array came from (a hint).
ARRAY_HINT_ATTR = "h5ckpt_array"
#: Attribute of an ``ml_ndarray`` / ``ml_scalar`` dataset: the ml_dtypes dtype name.
DTYPE_ATTR = "h5ckpt_dtype"
#: Attribute of a ``namedtuple`` / ``pytree`` group: the class's qualified name.
CLASS_ATTR = "h5ckpt_class"
#: Attribute of a ``namedtuple`` / ``pytree`` group: the field names, comma-separated.
FIELDS_ATTR = "h5ckpt_fields"
#: Longest class name text written and read (longer names keep their end).
MAX_CLASS_BYTES = 1024
#: Longest field list text: attributes stay well inside HDF5's 64 KiB object header.
MAX_FIELDS_BYTES = 60_000
#: ``__module__`` of the NamedTuple classes built for files: no such module exists,
#: so nothing ever imports it (pickling such a value fails instead).
RESTORED_MODULE = "h5ckpt.restored"
#: Longest library hint written and read.
MAX_HINT_BYTES = 256

_PROTOCOLS = ("__array__", "__array_interface__", "__dlpack__")
# Array-likes that hold more than their array (labels, coordinates): stored as one
# they would come back without them, so they are not taken for array-likes.
_LABELLED = frozenset({"pandas", "xarray"})
_ML_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_NUMPY_NAMES = frozenset(
    {"bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64"}
    | {"float16", "float32", "float64", "complex64", "complex128"}
)
_MISSING = object()


class Field(str):
    """A key of a key path that is a field name: rendered ``.name``, not ``['name']``."""

    __slots__ = ()


# ----------------------------------------------------------------------- ml_dtypes

_ML_NAMES: dict[np.dtype, str | None] = {}


def ml_name(dtype: np.dtype) -> str | None:
    """The ml_dtypes name of ``dtype`` (``"bfloat16"``), or None for any other dtype."""
    name = _ML_NAMES.get(dtype, _MISSING)
    if name is _MISSING:
        name = None
        module = getattr(dtype.type, "__module__", "") or ""
        if module.partition(".")[0] == "ml_dtypes" and dtype.names is None:
            candidate = dtype.name
            if _ML_NAME_RE.fullmatch(candidate) and dtype.itemsize in (1, 2, 4, 8):
                name = candidate
        _ML_NAMES[dtype] = name
    return name  # type: ignore[return-value]


def bits_dtype(dtype: np.dtype) -> np.dtype:
    """The native unsigned integer dtype that holds the bits of one ``dtype`` element."""
    return np.dtype(f"u{dtype.itemsize}")


def is_ml_name(name: str) -> bool:
    """Whether ``name`` has the form of an ml_dtypes dtype name (letters, digits, ``_``)."""
    return _ML_NAME_RE.fullmatch(name) is not None


def ml_dtype(name: str) -> np.dtype:
    """The ml_dtypes dtype called ``name``.

    Only names in ``ml_dtypes.__all__`` that are numpy scalar types are looked up:
    the name comes from a file, and nothing else of ml_dtypes is reached through it.

    Raises
    ------
    LookupError
        When ml_dtypes is not installed, or does not know ``name``; the message
        says which.
    """
    try:
        import ml_dtypes
    except ImportError:
        raise LookupError(
            f"the array has the ml_dtypes dtype {name!r}, and ml_dtypes is not installed "
            "(pip install ml_dtypes; jax installs it)"
        ) from None
    exported = getattr(ml_dtypes, "__all__", ())
    found = getattr(ml_dtypes, name, None) if name in exported else None
    if not (isinstance(found, type) and issubclass(found, np.generic)):
        version = getattr(ml_dtypes, "__version__", "?")
        raise LookupError(
            f"the array has the dtype {name!r}, which ml_dtypes {version} does not define "
            "(a newer ml_dtypes may)"
        )
    dtype = np.dtype(found)
    if ml_name(dtype) != name:
        raise LookupError(f"ml_dtypes' {name!r} is not an ml_dtypes dtype of that name")
    return dtype


def torch_numpy_dtype(torch_dtype: Any) -> np.dtype | None:
    """The numpy dtype (an ml_dtypes one for ``bfloat16``, float8...) of a torch dtype."""
    name = str(torch_dtype).removeprefix("torch.")
    if name in _NUMPY_NAMES:
        return np.dtype(name)
    try:  # bfloat16, float8_e4m3fn, complex32...: the ml_dtypes dtype of that name
        return ml_dtype(name)
    except LookupError:  # quantized types, or no ml_dtypes
        return None


# --------------------------------------------------------------------- array-likes


class HostArray:
    """An array-like leaf already copied to host memory (an asynchronous save's
    snapshot), with the library hint it is stored with."""

    __slots__ = ("array", "hint")

    def __init__(self, array: np.ndarray, hint: str | None) -> None:
        self.array = array
        self.hint = hint


def library(t: type) -> str:
    """The top-level package a type comes from (``jaxlib`` counts as ``jax``)."""
    top = (getattr(t, "__module__", None) or "").partition(".")[0]
    return "jax" if top == "jaxlib" else top


def _hint(t: type) -> str:
    if issubclass(t, np.ndarray):
        return f"{t.__module__}.{t.__qualname__}"[:MAX_HINT_BYTES]
    return library(t)[:MAX_HINT_BYTES]


def _is_masked(value: np.ndarray) -> bool:
    ma = sys.modules.get("numpy.ma")
    return ma is not None and isinstance(value, ma.MaskedArray)


def array_spec(value: Any) -> tuple[np.dtype, tuple[int, ...]] | str | None:
    """What a leaf is as an array-like, known without copying it where possible.

    Returns
    -------
    None
        ``value`` is not an array-like (exact ``numpy.ndarray`` and numpy scalars
        are not, nor masked arrays, pandas and xarray objects).
    str
        An array-like without a numpy form, e.g. ``"dtype key<fry>"`` (a JAX PRNG
        key array): why it cannot be stored natively.
    (numpy.dtype, tuple)
        The dtype and shape its numpy array has. For libraries whose objects have
        no numpy ``dtype`` and ``shape`` attributes the object is converted here
        (and once more when written).
    """
    if isinstance(value, HostArray):
        return value.array.dtype, value.array.shape
    if isinstance(value, np.ndarray):
        if type(value) is np.ndarray or _is_masked(value):
            return None
        return value.dtype, value.shape
    t = type(value)
    if isinstance(value, np.generic) or not any(hasattr(t, p) for p in _PROTOCOLS):
        return None
    lib = library(t)
    if lib in _LABELLED:
        return None
    try:
        if lib == "torch":
            dtype = torch_numpy_dtype(value.dtype)
            if dtype is None:
                return f"dtype {value.dtype}"
        else:
            dtype = np.dtype(value.dtype)
        return dtype, tuple(int(d) for d in value.shape)
    except Exception:
        if lib == "jax":
            return f"dtype {getattr(value, 'dtype', '?')}"
    try:
        arr = host_array(value)[0]
    except Exception as exc:
        return f"no numpy form ({type(exc).__name__}: {exc})"
    return arr.dtype, arr.shape


def host_array(value: Any) -> tuple[np.ndarray, str | None, bool]:
    """The numpy array of an array-like, its library hint, and whether the array is
    the caller's alone (a copy no one else can change).

    A CPU ``jax.Array`` comes back as a read-only view of its buffer (no copy); a
    device array (JAX on GPU, CuPy, torch on CUDA) as one host copy.

    Raises
    ------
    Exception
        Whatever the library raises when the value has no numpy form.
    """
    if isinstance(value, HostArray):
        return value.array, value.hint, True
    t = type(value)
    if isinstance(value, np.ndarray):
        return value.view(np.ndarray), _hint(t), False
    lib = library(t)
    if lib == "jax":
        arr = np.asarray(value)
        on_host = {d.platform for d in value.devices()} == {"cpu"}
        # A CPU array's view shares the (immutable) buffer, which the caller may still
        # donate or delete: a snapshot copies it. A device array was copied here.
        return arr, "jax", not on_host
    if lib == "torch":
        arr, moved = _torch_to_numpy(value)
        return arr, "torch", moved
    if lib == "cupy":
        return value.get(), "cupy", True
    if hasattr(t, "__array__") or hasattr(t, "__array_interface__"):
        return np.asarray(value), _hint(t), False
    return np.from_dlpack(value), _hint(t), False


def _torch_to_numpy(x: Any) -> tuple[np.ndarray, bool]:
    torch = sys.modules["torch"]  # x is a torch.Tensor: torch is imported
    moved = x.device.type != "cpu"
    x = x.detach()
    if moved:
        x = x.cpu()
    x = x.resolve_conj().resolve_neg()
    dtype = torch_numpy_dtype(x.dtype)
    if dtype is None:
        raise TypeError(f"torch dtype {x.dtype} has no numpy form")
    if ml_name(dtype) is None:
        return x.numpy(), moved
    # torch cannot hand out bfloat16 (or float8) as numpy: take the bits instead.
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    return x.view(ints).numpy().view(dtype), moved


# --------------------------------------------------------------- NamedTuples, pytrees

_NT_FIELDS: weakref.WeakKeyDictionary[type, tuple[str, ...] | None] = weakref.WeakKeyDictionary()


def _namedtuple_field_ok(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("_")


def _fields_text_ok(fields: tuple[str, ...]) -> bool:
    return len(",".join(fields).encode("utf-8")) <= MAX_FIELDS_BYTES


def namedtuple_fields(value: tuple) -> tuple[str, ...] | None:
    """The field names of a NamedTuple (a tuple subclass with ``_fields`` naming its
    items), or None for any other tuple."""
    t = type(value)
    if t is tuple:
        return None
    fields = _NT_FIELDS.get(t, _MISSING)
    if fields is _MISSING:
        raw = getattr(t, "_fields", None)
        ok = (
            isinstance(raw, tuple)
            and all(type(f) is str and _namedtuple_field_ok(f) for f in raw)
            and len(set(raw)) == len(raw)
            and _fields_text_ok(raw)
        )
        fields = raw if ok else None
        _NT_FIELDS[t] = fields
    if fields is None or len(fields) != len(value):  # type: ignore[arg-type]
        return None
    return fields  # type: ignore[return-value]


class Node:
    """A JAX pytree node taken apart (an asynchronous save's snapshot of it)."""

    __slots__ = ("children", "class_name", "fields")

    def __init__(self, class_name: str, fields: tuple[str, ...] | None, children: list) -> None:
        self.class_name = class_name
        self.fields = fields
        self.children = children


def _class_name(t: type) -> str:
    name = vars(t).get("_h5ckpt_class")
    if not isinstance(name, str):
        name = f"{t.__module__}.{t.__qualname__}"
    raw = name.replace("\x00", "").encode("utf-8", "replace")
    return raw[-MAX_CLASS_BYTES:].decode("utf-8", "ignore") or "?"


def pytree_flatten(value: Any) -> tuple[Any, tuple[str, ...] | None, list] | None:
    """One level of a registered JAX pytree node: ``(treedef, fields, children)``.

    ``fields`` are the children's attribute names when every child is reached
    through one (flax and equinox classes, ``register_dataclass``), else None. None
    for anything that is not such a node: jax not imported, dicts, lists, tuples,
    None and leaves.
    """
    jax = sys.modules.get("jax")
    if jax is None or value is None or isinstance(value, (dict, list, tuple)):
        return None
    if library(type(value)) in ("builtins", "numpy"):
        return None
    try:
        tree_util = jax.tree_util
        keyed, treedef = tree_util.tree_flatten_with_path(value, is_leaf=lambda x: x is not value)
        if tree_util.treedef_is_leaf(treedef):
            return None
        names = []
        for path, _ in keyed:
            key = path[0] if len(path) == 1 else None
            names.append(key.name if isinstance(key, tree_util.GetAttrKey) else None)
    except Exception:
        return None
    fields: tuple[str, ...] | None = None
    if all(type(n) is str and n.isidentifier() for n in names) and len(set(names)) == len(names):
        fields = tuple(names)  # type: ignore[arg-type]
        if not _fields_text_ok(fields):
            fields = None
    return treedef, fields, [child for _, child in keyed]


def node_parts(value: Any) -> tuple[str, tuple[str, ...] | None, list] | None:
    """``(class name, field names or None, children)`` of a NamedTuple, a JAX pytree
    node or its snapshot; None for any other value."""
    if isinstance(value, tuple):
        fields = namedtuple_fields(value)
        return None if fields is None else (_class_name(type(value)), fields, list(value))
    if isinstance(value, Node):
        return value.class_name, value.fields, value.children
    flat = pytree_flatten(value)
    if flat is None:
        return None
    return _class_name(type(value)), flat[1], flat[2]


_RESTORED: dict[tuple[str, tuple[str, ...]], type] = {}
_RESTORED_MAX = 4096


def restored_namedtuple(class_name: str, fields: tuple[str, ...]) -> type:
    """The NamedTuple class of a file's ``namedtuple`` node: named after the last part
    of ``class_name``, with these fields, in the module ``h5ckpt.restored`` (which
    does not exist). One class per (name, fields); it remembers ``class_name`` so
    that saving its values again writes the same name."""
    key = (class_name, fields)
    found = _RESTORED.get(key)
    if found is not None:
        return found
    simple = class_name.rsplit(".", 1)[-1]
    if not simple.isidentifier() or keyword.iskeyword(simple):
        simple = "RestoredNamedTuple"
    cls: type = collections.namedtuple(simple, fields, module=RESTORED_MODULE)  # type: ignore[misc]
    cls._h5ckpt_class = class_name  # type: ignore[attr-defined]
    cls.__doc__ = f"The NamedTuple {class_name!r} as a checkpoint stored it."
    if len(_RESTORED) < _RESTORED_MAX:
        _RESTORED[key] = cls
    return cls


def node_maker(
    namedtuple: bool, class_name: str | None, fields_text: str | None, count: int
) -> tuple[Callable[[list], Any], tuple[str, ...] | None]:
    """How to build a stored ``namedtuple`` (or ``pytree``) node from its ``count``
    items, and its field names.

    Raises
    ------
    ValueError
        For a missing or malformed class name or field list (the node is malformed).
    """
    if class_name is None:
        raise ValueError(f"has no {CLASS_ATTR} attribute")
    if not class_name or "\x00" in class_name:
        raise ValueError(f"has an empty or NUL-holding {CLASS_ATTR} attribute")
    if fields_text is None:
        if namedtuple:
            raise ValueError(f"is tagged namedtuple but has no {FIELDS_ATTR} attribute")
        return tuple, None
    fields = tuple(fields_text.split(",")) if fields_text else ()
    if len(fields) != count:
        raise ValueError(f"names {len(fields)} fields in {FIELDS_ATTR} but has {count} items")
    valid = _namedtuple_field_ok if namedtuple else str.isidentifier
    bad = [f for f in fields if not valid(f)]
    if bad:
        raise ValueError(f"has the invalid field name {bad[0][:40]!r}")
    if len(set(fields)) != len(fields):
        raise ValueError("names a field twice")
    if namedtuple:
        cls = restored_namedtuple(class_name, fields)
        return (lambda items: tuple.__new__(cls, items)), fields
    return (lambda items: dict(zip(fields, items, strict=True))), fields


# ------------------------------------------------------------------------ snapshots

_ALIGNED_COPY_BYTES = 1 << 20


def _copy(arr: np.ndarray) -> np.ndarray:
    """A copy of ``arr`` whose address equals the source's modulo 64.

    memcpy between buffers misaligned relative to each other is much slower: JAX's
    CPU buffers start on 64-byte boundaries, numpy's on 16, and a plain copy of a
    100 MB ``jax.Array`` took 16 ms against 10 ms for the same numpy array here
    (AMD EPYC); matched, 11 ms.
    """
    if arr.nbytes < _ALIGNED_COPY_BYTES or not arr.flags.c_contiguous:
        return arr.copy()
    raw = np.empty(arr.nbytes + 64, np.uint8)
    start = (arr.ctypes.data - raw.ctypes.data) % 64
    out = raw[start : start + arr.nbytes].view(arr.dtype).reshape(arr.shape)
    np.copyto(out, arr)
    return out


def snapshot_value(value: Any) -> Any:
    """A copy of a state tree that later changes by the caller cannot reach.

    Numpy arrays are copied; array-likes become a :class:`HostArray` (a device array
    copied to host once, a CPU one copied), JAX pytree nodes a :class:`Node` of
    their children's snapshots: writing the snapshot later touches no library but
    numpy. NamedTuples keep their class.
    """
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: snapshot_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [snapshot_value(v) for v in value]
    if isinstance(value, tuple):
        items = [snapshot_value(v) for v in value]
        if namedtuple_fields(value) is not None:
            return tuple.__new__(type(value), items)
        return tuple(items)
    if isinstance(value, (str, bytes, int, float, bool, complex, type(None), np.generic)):
        return value
    spec = array_spec(value)
    if spec is not None and not isinstance(spec, str):
        arr, hint, owned = host_array(value)
        return HostArray(arr if owned else _copy(arr), hint)
    flat = pytree_flatten(value)
    if flat is not None:
        children = [snapshot_value(child) for child in flat[2]]
        return Node(_class_name(type(value)), flat[1], children)
    import copy

    return copy.deepcopy(value)

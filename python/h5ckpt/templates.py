"""Giving a loaded state back in the structure and leaf types of a template (``like=``).

``load_checkpoint(path, like={"optimizer_state": opt_state, "parameters": params})``
loads as usual, then walks each loaded part together with its template:

* containers must match exactly: a dict the same keys (the result takes the
  template's key order), a list or tuple the same type and length, a NamedTuple the
  same field names and class name (its last dotted part: a class that moved to
  another module still matches), and the result is of the template's class;
* a registered JAX pytree node (a flax ``struct.dataclass``, an equinox module, a
  class registered with ``jax.tree_util``) is rebuilt from its children through
  ``jax.tree_util`` with the template's own tree definition (its static fields come
  from the template);
* a ``jax.Array`` leaf (or a ``jax.ShapeDtypeStruct``) takes an array of the same
  shape and dtype and gives a ``jax.Array`` placed with the template leaf's sharding
  (weakly typed, as the template, when it is a weakly typed scalar);
  a ``torch.Tensor`` leaf gives a tensor of the template's dtype and device (and
  ``requires_grad``); a numpy array leaf takes a numpy array of the same shape and
  dtype; any other leaf (a Python or numpy scalar, a string, ``None``, ...) a value
  of exactly its type.

Anything else is a :class:`~h5ckpt.errors.CheckpointValueError` that names the key
path (``optimizer_state[1][0].mu['w']``) and what the template and the file hold.
jax and torch are used only when a template leaf comes from them (they are imported
then already).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import interop
from .errors import CheckpointValueError
from .tree.names import _Path, _render

__all__ = ["PARTS", "apply_like", "check_like", "rebuild"]

#: The parts of a loaded checkpoint a template may be given for.
PARTS = ("parameters", "optimizer_state", "metadata")


def check_like(like: Any) -> dict[str, Any] | None:
    """``like`` checked: None, or a dict whose keys are among :data:`PARTS`.

    Parameters
    ----------
    like : Mapping or None
        The ``like=`` argument of a load.

    Returns
    -------
    dict or None

    Raises
    ------
    CheckpointValueError
        When ``like`` is not a mapping or has another key.
    """
    if like is None:
        return None
    if not isinstance(like, Mapping):
        raise CheckpointValueError(
            f"like must be a dict with any of the keys {', '.join(PARTS)}, not a "
            f"{type(like).__name__} (e.g. like={{'optimizer_state': opt_state}})",
            {"type": type(like).__name__},
        )
    unknown = [k for k in like if k not in PARTS]
    if unknown:
        raise CheckpointValueError(
            f"like has the unknown key(s) {', '.join(map(repr, unknown))}; it takes "
            f"templates for {', '.join(PARTS)}",
            {"unknown": [repr(k) for k in unknown]},
        )
    return dict(like)


def apply_like(loaded: dict[str, Any], like: dict[str, Any] | None) -> dict[str, Any]:
    """``loaded`` (what a load returns) with each part that has a template rebuilt.

    Parameters
    ----------
    loaded : dict
        The result of a load.
    like : dict or None
        Checked by :func:`check_like`.

    Returns
    -------
    dict
        A new dict (``loaded`` itself without templates).
    """
    if not like:
        return loaded
    out = dict(loaded)
    for part, template in like.items():
        out[part] = rebuild(loaded[part], template, part)
    return out


def rebuild(value: Any, template: Any, path: str = "value") -> Any:
    """``value`` (as loaded, without a template) in the structure and leaf types of
    ``template``.

    Parameters
    ----------
    value : Any
        A loaded value.
    template : Any
        A value of the structure and leaf types wanted (its leaves' values are not
        used).
    path : str, default "value"
        Name of the value in messages.

    Returns
    -------
    Any

    Raises
    ------
    CheckpointValueError
        When structure, shape or dtype differ; the message and
        ``error_context["path"]`` name the key path.
    """
    try:
        return _rebuild(value, template, path, None)
    except RecursionError:
        raise CheckpointValueError(
            f"{path}: the template nests too deeply to be walked", {"path": path}
        ) from None


def _describe(x: Any) -> str:
    t = type(x)
    if x is None:
        return "None"
    if t is dict:
        keys = list(x)
        shown = ", ".join(map(repr, keys[:8])) + (", ..." if len(keys) > 8 else "")
        return f"a dict with the keys [{shown}]"
    if t is list or t is tuple:
        return f"a {t.__name__} of {len(x)} items"
    if isinstance(x, tuple):
        fields = interop.namedtuple_fields(x)
        if fields is not None:
            return f"the NamedTuple {_simple_name(t)}{fields}"
    if isinstance(x, np.ndarray):
        return f"a numpy array of dtype {x.dtype} and shape {x.shape}"
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is not None and dtype is not None:
        return (
            f"a {interop.library(t) or t.__name__} array of dtype {dtype} and shape {tuple(shape)}"
        )
    return f"a value of type {t.__module__}.{t.__qualname__}"


def _simple_name(t: type) -> str:
    name = vars(t).get("_h5ckpt_class")
    return (name if isinstance(name, str) else t.__qualname__).rsplit(".", 1)[-1]


def _mismatch(root: str, node: _Path, template: Any, value: Any, why: str = "") -> Exception:
    where = _render(root, node)
    expected, found = _describe(template), _describe(value)
    return CheckpointValueError(
        f"{where}: the template has {expected}, the checkpoint {found}"
        + (f" ({why})" if why else ""),
        {"path": where, "expected": expected, "found": found},
    )


def _rebuild(value: Any, template: Any, root: str, node: _Path) -> Any:
    t = type(template)
    if template is None:
        if value is not None:
            raise _mismatch(root, node, template, value)
        return None
    if t is dict:
        if type(value) is not dict:
            raise _mismatch(root, node, template, value)
        if value.keys() != template.keys():
            missing = [k for k in template if k not in value]
            extra = [k for k in value if k not in template]
            why = ", ".join(
                part
                for part in (
                    f"the checkpoint lacks {missing}" if missing else "",
                    f"the template lacks {extra}" if extra else "",
                )
                if part
            )
            raise _mismatch(root, node, template, value, why)
        return {k: _rebuild(value[k], item, root, (node, k)) for k, item in template.items()}
    if t is list or t is tuple:
        if type(value) is not t or len(value) != len(template):
            raise _mismatch(root, node, template, value)
        items = [
            _rebuild(v, item, root, (node, i))
            for i, (v, item) in enumerate(zip(value, template, strict=True))
        ]
        return items if t is list else tuple(items)
    if isinstance(template, tuple):
        fields = interop.namedtuple_fields(template)
        if fields is not None:
            return _namedtuple(value, template, fields, root, node)
    kind = _leaf_kind(template)
    if kind is not None:
        return _leaf(value, template, kind, root, node)
    flat = interop.pytree_flatten(template)
    if flat is not None:
        return _pytree(value, template, flat, root, node)
    if type(value) is not t:
        raise _mismatch(root, node, template, value)
    return value


def _namedtuple(
    value: Any, template: tuple, fields: tuple[str, ...], root: str, node: _Path
) -> Any:
    found = interop.namedtuple_fields(value) if isinstance(value, tuple) else None
    if found != fields:
        raise _mismatch(root, node, template, value)
    if _simple_name(type(value)) != _simple_name(type(template)):
        raise _mismatch(root, node, template, value, "another class name")
    items = [
        _rebuild(v, item, root, (node, interop.Field(f)))
        for f, v, item in zip(fields, value, template, strict=True)
    ]
    return tuple.__new__(type(template), items)


def _pytree(value: Any, template: Any, flat: tuple, root: str, node: _Path) -> Any:
    """A registered JAX pytree node, from its children loaded as a dict (by field
    name), a NamedTuple of those fields, or a tuple."""
    treedef, fields, children = flat
    loaded: list | None = None
    if fields is not None and type(value) is dict and list(value) == list(fields):
        loaded = list(value.values())
    elif isinstance(value, tuple) and len(value) == len(children):
        found = interop.namedtuple_fields(value) if type(value) is not tuple else None
        if type(value) is tuple or (found is not None and found == fields):
            loaded = list(value)
    if loaded is None:
        why = f"fields {list(fields)}" if fields is not None else f"{len(children)} children"
        raise _mismatch(root, node, template, value, f"the template's node has {why}")
    keys = [interop.Field(f) for f in fields] if fields is not None else range(len(children))
    items = [
        _rebuild(v, child, root, (node, k))
        for k, v, child in zip(keys, loaded, children, strict=True)
    ]
    return sys.modules["jax"].tree_util.tree_unflatten(treedef, items)


def _leaf_kind(template: Any) -> str | None:
    if isinstance(template, np.ndarray):
        return "numpy"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(template, (jax.Array, jax.ShapeDtypeStruct)):
        return "jax"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(template, torch.Tensor):
        return "torch"
    return None


def _leaf(value: Any, template: Any, kind: str, root: str, node: _Path) -> Any:
    if kind == "torch":
        dtype = interop.torch_numpy_dtype(template.dtype)
    else:
        dtype = np.dtype(template.dtype)
    shape = tuple(int(d) for d in template.shape)
    if type(value) is not np.ndarray:
        raise _mismatch(root, node, template, value)
    if value.shape != shape:
        raise _mismatch(root, node, template, value, "another shape")
    if dtype is None or value.dtype != dtype:
        raise _mismatch(root, node, template, value, "another dtype")
    if kind == "numpy":
        return value
    if kind == "jax":
        return _jax_leaf(value, template)
    return _torch_leaf(value, template, dtype)


def _jax_leaf(value: np.ndarray, template: Any) -> Any:
    jax = sys.modules["jax"]
    sharding = getattr(template, "sharding", None)
    put = jax.device_put if sharding is None else (lambda x: jax.device_put(x, sharding))
    if getattr(template, "weak_type", False) and value.ndim == 0:
        # A weakly typed scalar (made from a Python number) promotes differently from
        # a strong one: rebuilt the way it was made, so that computing on it resumes
        # exactly. (Weak arrays of other shapes come back strongly typed.)
        weak = jax.numpy.asarray(value.item())
        if weak.dtype == value.dtype and weak.weak_type:
            return put(weak)
    return put(value)


def _torch_leaf(value: np.ndarray, template: Any, dtype: np.dtype) -> Any:
    torch = sys.modules["torch"]  # the template is a torch.Tensor: torch is imported
    arr = value if value.flags.writeable else value.copy()
    if interop.ml_name(dtype) is None:
        tensor = torch.from_numpy(arr)
    else:  # torch takes no bfloat16 (or float8) numpy arrays: hand it the bits
        ints = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[dtype.itemsize]
        tensor = torch.from_numpy(arr.view(ints)).view(template.dtype)
    tensor = tensor.to(device=template.device)
    if template.requires_grad:
        tensor.requires_grad_(True)
    return tensor

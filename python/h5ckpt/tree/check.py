"""check_value: walk a value without touching any file and refuse what cannot be
stored or loaded back under the load limits, naming the offending key path."""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np

from h5ckpt import interop
from h5ckpt.errors import CheckpointValueError
from h5ckpt.limits import LoadLimits

from .classify import _native_tag, _refuse, _type_name
from .names import (
    _CONTAINERS,
    _DICT,
    _ML_NDARRAY,
    _NAMEDTUPLE,
    _NDARRAY,
    _PYTREE,
    PICKLE_PROTOCOL,
    _Path,
    _render,
)

# ------------------------------------------------------------------- check_value


class _NullSink:
    """A write-only file that discards what it gets (used to test picklability)."""

    __slots__ = ()

    def write(self, data: Any) -> None:
        return None


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

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

One job per module; each imports only from those listed above it:

* ``names``: the type tags (:data:`TAGS`), :data:`TYPE_ATTR`,
  :data:`PICKLE_PROTOCOL` and the other constants several modules share; dict keys
  as link names (:func:`escape_key`, :func:`unescape_key`); key paths in messages.
* ``classify``: which tag stores a value, or why none does (the refusal every
  writer raises); which numpy dtypes are stored natively, and :func:`hdf5_type`.
* ``check``: :func:`check_value`.
* ``handles``: the HDF5 property lists, dataspaces and types made once per process.
* ``write``: :func:`write_value`, :func:`write_array`, :func:`default_put_array`.
* ``read``: :func:`read_value`, :class:`ByteBudget`, :func:`file_budget`,
  :func:`ordered_links`.
* ``equal``: :func:`values_equal`.

Names with a leading underscore are private to this package: its modules import
them, explicitly, from the module that defines them.
"""

from __future__ import annotations

from .check import check_value
from .classify import hdf5_type
from .equal import values_equal
from .names import PICKLE_PROTOCOL, TAGS, TYPE_ATTR, escape_key, unescape_key
from .read import ByteBudget, file_budget, ordered_links, read_value
from .write import default_put_array, write_array, write_value

__all__ = [
    "PICKLE_PROTOCOL",
    "TAGS",
    "TYPE_ATTR",
    "ByteBudget",
    "check_value",
    "default_put_array",
    "escape_key",
    "file_budget",
    "hdf5_type",
    "ordered_links",
    "read_value",
    "unescape_key",
    "values_equal",
    "write_array",
    "write_value",
]

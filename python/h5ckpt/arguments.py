"""Arguments as the manager takes them: converted, or refused with a clear message.

Every public call checks its arguments here before it touches a file, so that a bad
value is a :class:`~h5ckpt.errors.CheckpointValueError` naming the argument, never a
``TypeError`` from deep inside h5py or the Rust core, and never a half-done save.
"""

from __future__ import annotations

import math
import numbers
import os
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .errors import CheckpointLimitError, CheckpointValueError
from .limits import DEFAULT_MIN_ARRAY_BYTES, LoadLimits
from .payload import MAX_ATTRIBUTES_WRITTEN, as_parameters
from .tree import check_value

__all__ = [
    "HMAC_KEY_ENV",
    "INT_LIMIT",
    "SaveArguments",
    "as_loss",
    "as_path",
    "batch_index",
    "check_hmac_key",
    "check_prefix",
    "file_mode",
    "flag",
    "hmac_key_from_environment",
    "positive_int",
    "resolve_hmac_key",
    "save_arguments",
    "short_repr",
]

#: The environment variable a manager takes its HMAC key from when given none.
HMAC_KEY_ENV = "H5CKPT_HMAC_KEY"

#: Counts and batch indices stay below this: the file format and the Rust core hold
#: them in 64 bits.
INT_LIMIT = 2**63

#: Longest file name most file systems allow, in bytes.
_NAME_MAX = 255
#: What a checkpoint's temp file name adds to the prefix at most:
#: ``.{prefix}_batch_{19 digits}.h5.{7-digit pid}.{12 hex digits}.tmp``.
_NAME_OVERHEAD = len("._batch_.h5...tmp") + 19 + 7 + 12


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut short: an int of 400 digits is not a message."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def positive_int(name: str, value: object, *, minimum: int, allow_none: bool = False) -> Any:
    """``value`` as an int from ``minimum`` to 2**63-1 (or None when allowed)."""
    if value is None and allow_none:
        return None
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or not minimum <= int(value) < INT_LIMIT
    ):
        raise CheckpointValueError(
            f"{name} must be an integer from {minimum} to 2**63-1"
            + (" or None" if allow_none else "")
            + f", got {short_repr(value)}",
            {name: short_repr(value)},
        )
    return int(value)


def flag(name: str, value: object) -> bool:
    """``value`` as a bool: a bool, a numpy bool, or the integer 0 or 1."""
    # bool("no") is True: a string where a flag belongs (allow_pickle="no") is refused.
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, numbers.Integral) and value in (0, 1)
    ):
        return bool(value)
    raise CheckpointValueError(
        f"{name} must be True or False, got {short_repr(value)}", {name: short_repr(value)}
    )


def check_prefix(prefix: object) -> str:
    """The file name prefix, checked: every checkpoint name of it must be creatable.

    Parameters
    ----------
    prefix : str
        Text without ``/``, NUL or lone surrogates, at most 200 bytes of UTF-8.

    Returns
    -------
    str
        ``prefix``.

    Raises
    ------
    CheckpointValueError
        When some checkpoint name of ``prefix`` could not be a file name.
    """
    problem = None
    if not isinstance(prefix, str):
        problem = f"must be a str, got {type(prefix).__name__}"
    elif not prefix:
        problem = "must not be empty"
    elif "/" in prefix or "\x00" in prefix:
        problem = "must not contain '/' or NUL"
    else:
        try:
            size = len(prefix.encode("utf-8"))
        except UnicodeEncodeError as exc:
            # The native scan matches names as UTF-8: such a prefix would match nothing.
            problem = f"has a lone surrogate (at position {exc.start}), which is not UTF-8"
        else:
            if size + _NAME_OVERHEAD > _NAME_MAX:
                problem = (
                    f"is {size} bytes long: its file names would exceed {_NAME_MAX} bytes "
                    f"(at most {_NAME_MAX - _NAME_OVERHEAD} bytes of UTF-8)"
                )
    if problem is not None:
        raise CheckpointValueError(
            f"prefix {problem}, got {short_repr(prefix)}", {"prefix": short_repr(prefix)}
        )
    return prefix  # type: ignore[return-value]


def file_mode(mode: object) -> int | None:
    """Permission bits from 0 to 0o777, or None (the umask decides)."""
    if mode is None:
        return None
    if (
        isinstance(mode, bool)
        or not isinstance(mode, numbers.Integral)
        or not 0 <= int(mode) <= 0o777
    ):
        raise CheckpointValueError(
            f"file_mode must be None or permission bits from 0 to 0o777, got {mode!r}",
            {"file_mode": repr(mode)},
        )
    return int(mode)


def batch_index(batch_idx: object) -> int:
    """``batch_idx`` as an int from 0 to 2**63-1 (numpy integers too, never a bool)."""
    if isinstance(batch_idx, (bool, np.bool_)) or not isinstance(batch_idx, numbers.Integral):
        raise CheckpointValueError(
            f"batch_idx must be a non-negative integer, got {short_repr(batch_idx)}",
            {"batch_idx": short_repr(batch_idx)},
        )
    value = int(batch_idx)
    if value < 0 or value >= INT_LIMIT:
        raise CheckpointValueError(
            f"batch_idx must be a non-negative integer below 2**63, got {short_repr(value)}",
            {"batch_idx": short_repr(value)},
        )
    return value


def as_loss(loss: object) -> float:
    """``loss`` as a float: a real number (``numbers.Real`` except bool, numpy real
    scalars included) or a 0-d array of an integer or float dtype (as reductions of
    numpy, JAX or torch arrays give); anything else is refused, text included."""
    value = loss
    if not isinstance(loss, numbers.Real) and hasattr(loss, "__array__"):
        try:
            array = np.asarray(loss)
        except Exception:
            array = None
        if array is not None and array.ndim == 0:
            value = array[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise CheckpointValueError(
            "loss must be a real number (an int, a float, a numpy real scalar or a 0-d "
            f"array), got {type(loss).__name__} {short_repr(loss)}"
            + (
                ": convert it with float() if that is what you mean"
                if isinstance(loss, (str, bytes, Decimal))
                else ""
            ),
            {"loss": short_repr(loss)},
        )
    try:
        with np.errstate(over="ignore"):
            result = float(value)
    except OverflowError:
        result = -math.inf if value < 0 else math.inf
        finite = True
    except (TypeError, ValueError) as exc:
        raise CheckpointValueError(
            f"loss {short_repr(loss)} does not convert to a float: {exc}",
            {"loss": short_repr(loss)},
        ) from exc
    else:
        finite = isinstance(value, np.generic) and bool(np.isfinite(value))
    if math.isinf(result) and finite:
        raise CheckpointValueError(
            f"loss {short_repr(loss)} is too large for a 64-bit float "
            "(the largest is about 1.8e308)",
            {"loss": short_repr(loss)},
        )
    return result if not math.isnan(result) else float("nan")


def as_path(path: object, what: str = "the checkpoint path") -> Path:
    """``path`` as a ``Path``, refused when no file could have that name."""
    problem = None
    if not isinstance(path, (str, os.PathLike)):
        problem = f"must be a str or Path, got {type(path).__name__}"
    else:
        try:
            text = os.fspath(path)
        except TypeError as exc:
            text, problem = None, str(exc)
        if not isinstance(text, str):
            problem = problem or f"must be a str path, got {type(text).__name__}"
        elif not text:
            problem = "is empty (use '.' for the current directory)"
        elif "\x00" in text:
            problem = "contains a NUL character, which no file name can hold"
        else:
            try:
                os.fsencode(text)
            except UnicodeEncodeError as exc:
                problem = (
                    f"has a character that is no file name byte (U+{ord(text[exc.start]):04X} "
                    f"at position {exc.start})"
                )
    if problem is not None:
        raise CheckpointValueError(
            f"{what} {problem}: {short_repr(path)}", {"path": short_repr(path)}
        )
    return Path(text)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ keys


def check_hmac_key(hmac_key: object) -> bytes | None:
    """An explicit HMAC key as bytes (text as its UTF-8 bytes); None stays None.

    Raises ``CheckpointValueError`` for an empty key, text without UTF-8 bytes (a
    lone surrogate) and anything that is neither bytes nor text.
    """
    if hmac_key is None:
        return None
    if isinstance(hmac_key, str):
        try:
            hmac_key = hmac_key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CheckpointValueError(
                f"hmac_key is text with a lone surrogate (at position {exc.start}), which "
                "has no UTF-8 bytes: pass the key as bytes",
                {"hmac_key_type": "str", "position": exc.start},
            ) from None
    if not isinstance(hmac_key, (bytes, bytearray, memoryview)) or len(bytes(hmac_key)) == 0:
        raise CheckpointValueError(
            "hmac_key must be non-empty bytes or text, got "
            + (
                "an empty key"
                if isinstance(hmac_key, (bytes, bytearray, memoryview))
                else type(hmac_key).__name__
            ),
            {"hmac_key_type": type(hmac_key).__name__},
        )
    return bytes(hmac_key)


def hmac_key_from_environment() -> bytes | None:
    """The bytes of ``H5CKPT_HMAC_KEY``, or None when it is unset or empty.

    The bytes the variable holds, not decoded and encoded again: a value that is
    not UTF-8 still works.

    Returns
    -------
    bytes or None
        The key a manager given no ``hmac_key`` uses.

    Raises
    ------
    CheckpointValueError
        Where the environment is text (Windows) and the value has no UTF-8 bytes.
    """
    if os.supports_bytes_environ:
        raw = os.environb.get(HMAC_KEY_ENV.encode("ascii"))
        return bytes(raw) if raw else None
    text = os.environ.get(HMAC_KEY_ENV)  # Windows: the environment is text
    if not text:
        return None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointValueError(
            f"the environment variable {HMAC_KEY_ENV} holds text that has no UTF-8 bytes",
            {"variable": HMAC_KEY_ENV},
        ) from None


def resolve_hmac_key(hmac_key: object) -> bytes | None:
    """The HMAC key bytes: bytes as given, text as its UTF-8 bytes, and without
    ``hmac_key`` the key in ``H5CKPT_HMAC_KEY`` (None when there is none).

    Parameters
    ----------
    hmac_key : bytes, str or None
        The key given, if any.

    Returns
    -------
    bytes or None
        The key to sign and check with.
    """
    key = check_hmac_key(hmac_key)
    return key if key is not None else hmac_key_from_environment()


# ------------------------------------------------------------------------ saves


class SaveArguments(NamedTuple):
    """The arguments of one save, converted and checked."""

    batch_idx: int
    parameters: np.ndarray
    optimizer_state: Any
    loss: float
    metadata: Any
    #: Whether the written file must be checked against the load limits before it
    #: is committed (see :func:`save_arguments`).
    check_after: bool


def save_arguments(
    batch_idx: object,
    parameters: Any,
    optimizer_state: Any,
    loss: object,
    metadata: Any,
    *,
    allow_pickle: bool,
    limits: LoadLimits,
) -> SaveArguments:
    """The arguments of a save, converted, and whether the written file must be
    checked against the limits before it is committed; refused before anything is
    written."""
    if metadata is None:
        metadata = {}
    batch, params, loss_float = batch_index(batch_idx), as_parameters(parameters), as_loss(loss)
    # Checked against the manager's own load limits: a save never commits a file its
    # manager refuses to load (what only the written file can tell is checked again
    # before the commit, see CheckpointManager._check_loadable).
    nbytes = params.nbytes
    for name, tree in (("optimizer_state", optimizer_state), ("metadata", metadata)):
        nbytes += check_value(tree, allow_pickle=allow_pickle, limits=limits, path=name)
    if limits.max_array_bytes is not None and nbytes > limits.max_array_bytes:
        raise CheckpointLimitError(
            f"the checkpoint of batch {batch} holds {nbytes} bytes of arrays and "
            f"strings, more than this manager's load_limits allow "
            f"(max_array_bytes={limits.max_array_bytes}), so it could not be loaded; "
            "nothing was written. Raise the limit with "
            "CheckpointManager(..., load_limits=LoadLimits(max_array_bytes=...))",
            {
                "batch_idx": batch,
                "max_array_bytes": limits.max_array_bytes,
                "declared_bytes": nbytes,
            },
        )
    # Only the written file can tell the default budget (it grows with the file's
    # size), what pickles take, and whether the root's attributes fit a lower
    # max_attributes; otherwise the checks above are all the file's.
    check_after = (
        allow_pickle
        or limits.max_attributes < MAX_ATTRIBUTES_WRITTEN
        or (limits.max_array_bytes is None and nbytes > DEFAULT_MIN_ARRAY_BYTES)
    )
    return SaveArguments(batch, params, optimizer_state, loss_float, metadata, check_after)

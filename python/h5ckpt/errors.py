"""The exception family of h5ckpt.

Every failure that reaches a user is a :class:`CheckpointError`. Subclasses narrow
it down, and those that stand for an operating-system condition also derive from the
matching built-in (``FileNotFoundError``, ``PermissionError``, ``OSError``), so that
existing ``except OSError`` handlers keep working. The native module raises these
same classes: it looks them up here by name.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointAuthenticationError",
    "CheckpointConflictError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointLimitError",
    "CheckpointNotFoundError",
    "CheckpointPermissionError",
    "CheckpointPickleError",
    "CheckpointResourceError",
    "CheckpointStorageError",
    "CheckpointValueError",
    "CheckpointVersionError",
]


class CheckpointError(Exception):
    """Base class of every error h5ckpt raises.

    Parameters
    ----------
    message : str
        What went wrong, in words a person can act on.
    error_context : dict, optional
        Machine-readable details (paths, batch index, expected and actual values).

    Attributes
    ----------
    message : str
        The message.
    error_context : dict
        The details; always a dict, empty when none were given.
    """

    def __init__(self, message: str, error_context: dict[str, Any] | None = None) -> None:
        # Only the message goes to the base: OSError would read a second
        # argument as (errno, strerror).
        super().__init__(message)
        self.message = message
        self.error_context: dict[str, Any] = dict(error_context or {})

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the context when the error crosses a process or thread pool boundary.
        return (type(self), (self.message, self.error_context))


class CheckpointValueError(CheckpointError, ValueError):
    """An argument is out of range or of a type h5ckpt cannot store."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file or directory does not exist."""


class CheckpointPermissionError(CheckpointError, PermissionError):
    """The operating system refused access to a file or directory."""


class CheckpointStorageError(CheckpointError, OSError):
    """Reading or writing failed (disk full, I/O error, directory gone)."""


class CheckpointResourceError(CheckpointStorageError):
    """The process ran out of something (memory, file descriptors) while reading or
    writing a checkpoint. Says nothing about the file: it is neither marked invalid
    nor deleted, and the operation may succeed with more of what ran out."""


class CheckpointCorruptError(CheckpointError):
    """The file is not an intact checkpoint: bad header, digest mismatch, truncated,
    extra bytes, inconsistent fields, or content that is not a checkpoint at all."""


class CheckpointAuthenticationError(CheckpointCorruptError):
    """A keyed manager found no HMAC tag, or a tag that does not match its key."""


class CheckpointVersionError(CheckpointError):
    """The file was written in a newer major format version than this reader knows."""


class CheckpointPickleError(CheckpointError):
    """Loading this value would unpickle data; pass ``allow_pickle=True`` to permit it."""


class CheckpointLimitError(CheckpointError):
    """A verified file asks for more than the configured load limits allow."""


class CheckpointConflictError(CheckpointError):
    """A save below the newest valid checkpoint of the directory (a restart or a
    rollback over a newer run) was refused; nothing was written or deleted. Pass
    ``on_older_batch="set_aside"`` or call ``set_aside_newer_than`` to go on."""

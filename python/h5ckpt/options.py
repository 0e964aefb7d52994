"""``CheckpointManagerOptions``: every setting of a manager, checked in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .arguments import (
    check_hmac_key,
    check_prefix,
    file_mode,
    flag,
    hmac_key_from_environment,
    positive_int,
    short_repr,
)
from .codec import resolve as resolve_compression
from .errors import CheckpointValueError
from .limits import LoadLimits

__all__ = ["KEYWORD_DEFAULTS", "ON_OLDER_BATCH", "CheckpointManagerOptions", "options_from"]

#: What a save below the newest valid checkpoint of the directory does.
ON_OLDER_BATCH = ("raise", "set_aside")


@dataclass(frozen=True)
class CheckpointManagerOptions:
    """The settings of a :class:`~h5ckpt.CheckpointManager`, checked when made.

    Every field is also a keyword argument of ``CheckpointManager`` of the same name
    and default: ``CheckpointManager(d, keep_last_n=5)`` and
    ``CheckpointManager(d, options=CheckpointManagerOptions(keep_last_n=5))`` are the
    same manager. One options object can serve many managers (several directories,
    a reader and a writer); ``dataclasses.replace`` derives another, checked again.

    Parameters
    ----------
    checkpoint_frequency : int, default 10
        ``should_save(batch_idx)`` is true every this many batches.
    keep_last_n : int or None, default 3
        How many of the newest *valid* checkpoints retention keeps; ``None`` keeps all.
    enable_compression : bool, default True
        Compress arrays that compress well (byte shuffle + LZ4); others stay raw.
    prefix : str, default "checkpoint"
        File name prefix: text without ``/``, NUL or lone surrogates, at most 200
        bytes of UTF-8 (so that every file name fits in 255 bytes). Use
        ``"homodyne_state"`` for a directory of the predecessor's files.
    allow_pickle : bool, default False
        Store values that have no native HDF5 form by pickling them, and load
        pickled values (including legacy files' optimizer state). Unpickling can run
        code: only enable it for files you trust.
    hmac_key : bytes or str, optional
        Sign saves with HMAC-SHA256 and refuse files without a matching tag. Text is
        used as its UTF-8 bytes (the field holds the bytes); an empty key is refused.
        Without it, see ``key_from_environment``. Not shown by ``repr``.
    durable : bool, default True
        fsync the file and its directory on every save. ``False`` is faster but a
        power loss may lose recent checkpoints (never corrupt them undetected).
    keep_every : int, optional
        Also keep, for good, valid checkpoints whose ``batch_idx % keep_every == 0``.
    keep_best_n : int, default 0
        Also keep the ``keep_best_n`` valid checkpoints with the best loss.
    best_mode : {"min", "max"}, default "min"
        Whether the best loss is the lowest or the highest. NaN is never best.
    delete_invalid : bool, default False
        Let retention delete invalid files under the manager's names (they are
        otherwise kept and reported).
    auto_cleanup : bool, default True
        Apply retention after every committed save.
    compression : {"auto", "lz4", "zstd", "gzip", None}, optional
        Overrides ``enable_compression``: a codec for every array of 64 KiB or more,
        ``"auto"`` (compress what samples show to be compressible), or ``None`` (raw).
        Left out (``"default"``), ``enable_compression`` decides.
    load_limits : LoadLimits, optional
        Bounds on what loading a verified file may allocate; ``None`` or left out:
        ``LoadLimits()``.
    on_older_batch : {"raise", "set_aside"}, default "raise"
        What a save does when the directory holds a valid checkpoint of a *higher*
        batch (a fresh start or a rollback in a used directory; retention would
        delete the new saves and a resume would pick the abandoned run).
        ``"raise"`` refuses it with :class:`~h5ckpt.CheckpointConflictError`,
        writing and deleting nothing; saving the same batch again is always allowed.
        ``"set_aside"`` first moves every checkpoint of a higher batch into a new
        subdirectory ``abandoned-<UTC time>-<token>/`` (logged as a warning; never
        listed, loaded or deleted by a manager), then commits.
    read_only : bool, default False
        Only list, validate, find and load: the directory must exist, nothing is
        created or swept and no lock is taken, so read access to the directory and
        its files is all the manager needs. Saves and retention raise
        ``CheckpointError``; ``plan_cleanup`` still says what retention would delete.
    file_mode : int, optional
        Permission bits of committed checkpoint files. Default: those of any new
        file under the process umask (``0o666 & ~umask``, read at each save).
    key_from_environment : bool, default True
        Without ``hmac_key``, use the bytes of the environment variable
        ``H5CKPT_HMAC_KEY`` when it is set and not empty (read when a manager is
        made). ``False``: no key unless ``hmac_key`` is given, whatever the
        environment holds (a reader of unsigned files, such as the predecessor's).

    Raises
    ------
    CheckpointValueError
        When a field is out of range or of the wrong type; the message names it.

    Examples
    --------
    >>> reader = CheckpointManagerOptions(prefix="run", read_only=True)
    >>> reader.read_only, reader.keep_last_n
    (True, 3)
    """

    checkpoint_frequency: int = 10
    keep_last_n: int | None = 3
    enable_compression: bool = True
    prefix: str = "checkpoint"
    allow_pickle: bool = False
    hmac_key: bytes | None = field(default=None, repr=False)
    durable: bool = True
    keep_every: int | None = None
    keep_best_n: int = 0
    best_mode: str = "min"
    delete_invalid: bool = False
    auto_cleanup: bool = True
    compression: str | None = "default"
    load_limits: LoadLimits = field(default_factory=LoadLimits)
    on_older_batch: str = "raise"
    read_only: bool = False
    file_mode: int | None = None
    key_from_environment: bool = True

    def __post_init__(self) -> None:
        # In the order the manager has always checked them: of several bad values,
        # the same one is reported.
        put = self._put
        put("checkpoint_frequency", positive_int, minimum=1)
        put("keep_last_n", positive_int, minimum=1, allow_none=True)
        put("keep_every", positive_int, minimum=1, allow_none=True)
        put("keep_best_n", positive_int, minimum=0)
        _one_of("best_mode", self.best_mode, ("min", "max"), short_repr)
        _one_of("on_older_batch", self.on_older_batch, ON_OLDER_BATCH, repr)
        object.__setattr__(self, "prefix", check_prefix(self.prefix))
        put("enable_compression", flag)
        resolve_compression(self.enable_compression, self.compression)
        for name in ("allow_pickle", "durable", "delete_invalid", "auto_cleanup"):
            put(name, flag)
        if self.load_limits is None:  # the manager's keyword default
            object.__setattr__(self, "load_limits", LoadLimits())
        elif not isinstance(self.load_limits, LoadLimits):
            raise CheckpointValueError(
                f"load_limits must be a LoadLimits or None, got {short_repr(self.load_limits)}",
                {"load_limits": short_repr(self.load_limits)},
            )
        object.__setattr__(self, "hmac_key", check_hmac_key(self.hmac_key))
        put("read_only", flag)
        object.__setattr__(self, "file_mode", file_mode(self.file_mode))
        put("key_from_environment", flag)

    def _put(self, name: str, check: Any, **how: Any) -> None:
        object.__setattr__(self, name, check(name, getattr(self, name), **how))

    @property
    def resolved_compression(self) -> str | None:
        """The codec setting saves use: ``compression``, or when it was left out,
        ``"auto"`` or ``None`` by ``enable_compression``."""
        return resolve_compression(self.enable_compression, self.compression)

    def resolved_hmac_key(self) -> bytes | None:
        """The key a manager made now signs and checks with.

        Returns
        -------
        bytes or None
            ``hmac_key``; without it, the key in ``H5CKPT_HMAC_KEY`` when
            ``key_from_environment`` (None when the variable is unset or empty).
        """
        if self.hmac_key is not None or not self.key_from_environment:
            return self.hmac_key
        return hmac_key_from_environment()


def _one_of(
    name: str, value: object, allowed: tuple[str, ...], show: Callable[[object], str]
) -> None:
    # Only text is compared: `x in allowed` with an array x compares elementwise.
    if not isinstance(value, str) or value not in allowed:
        choices = " or ".join(repr(a) for a in allowed)
        raise CheckpointValueError(
            f"{name} must be {choices}, got {show(value)}", {name: show(value)}
        )


#: The keyword defaults of ``CheckpointManager``: the fields' own, and None for a
#: field whose default is made by a factory (``load_limits``).
KEYWORD_DEFAULTS: dict[str, Any] = {
    f.name: None if f.default is dataclasses.MISSING else f.default
    for f in dataclasses.fields(CheckpointManagerOptions)
}


def options_from(options: object, keywords: dict[str, Any]) -> CheckpointManagerOptions:
    """The options of a manager made with ``options`` or with ``keywords`` (every
    field by name, at its default when not given).

    Raises ``CheckpointValueError`` when ``options`` is not a
    ``CheckpointManagerOptions``, or when it is given together with a keyword that
    differs from its default (which of the two should win would be a guess).
    """
    if options is None:
        return CheckpointManagerOptions(**keywords)
    if not isinstance(options, CheckpointManagerOptions):
        raise CheckpointValueError(
            f"options must be a CheckpointManagerOptions or None, got {short_repr(options)}",
            {"options": short_repr(options)},
        )
    given = sorted(k for k, v in keywords.items() if not _is_default(v, KEYWORD_DEFAULTS[k]))
    if given:
        raise CheckpointValueError(
            "pass the settings either as options= or as keyword arguments, not both: "
            f"{', '.join(given)} given next to options (use dataclasses.replace(options, "
            f"{given[0]}=...) for a variant)",
            {"keywords": given},
        )
    return options


def _is_default(value: object, default: object) -> bool:
    # By identity or, for the same type only, by equality: an array compared with ==
    # would answer elementwise.
    return value is default or (type(value) is type(default) and bool(value == default))

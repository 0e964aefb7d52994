"""Converting a directory of seed-format checkpoints into h5ckpt files.

Each source file is verified by its own checksum, loaded through a
:class:`~h5ckpt.CheckpointManager` (so its pickled optimizer state is unpickled only
when that manager has ``allow_pickle=True``), saved by the destination manager
(atomic, sealed with a digest of every byte) and loaded back to check that the new
file holds exactly what was read.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from .errors import CheckpointError, CheckpointPickleError, CheckpointValueError
from .manager import CheckpointManager
from .templates import apply_like
from .tree import PICKLE_PROTOCOL, check_value, values_equal

__all__ = ["MigrationResult", "migrate_directory"]


@dataclass(frozen=True)
class MigrationResult:
    """What happened to one source file.

    Attributes
    ----------
    source : Path
        The source file.
    destination : Path
        Where the converted file is (or would have been) written.
    batch_idx : int
        Its batch index.
    outcome : str
        ``"converted"``, ``"skipped"`` (the destination exists) or ``"failed"``.
    message : str
        Details: the source format, values kept pickled, or why it failed.
    pickled : str or None
        When values without a native form were kept pickled, the first of them
        (loading the new file then needs ``allow_pickle=True``).
    """

    source: Path
    destination: Path
    batch_idx: int
    outcome: str
    message: str
    pickled: str | None = None

    @property
    def ok(self) -> bool:
        """True unless the file failed."""
        return self.outcome != "failed"


def _same(a: Any, b: Any) -> bool:
    if values_equal(a, b):
        return True
    # Values without ``==`` (plain objects that were kept pickled): same pickle.
    try:
        return pickle.dumps(a, PICKLE_PROTOCOL) == pickle.dumps(b, PICKLE_PROTOCOL)
    except Exception:
        return False


def _needs_pickle(state: dict[str, Any]) -> str | None:
    """The first value of a loaded checkpoint that has no native form, or None."""
    try:
        check_value(state["optimizer_state"], allow_pickle=False, path="optimizer_state")
        check_value(state["metadata"], allow_pickle=False, path="metadata")
    except CheckpointValueError as exc:
        return str(exc.error_context.get("path") or exc)
    return None


def migrate_directory(
    source: CheckpointManager,
    destination: CheckpointManager,
    *,
    native_only: bool = False,
    overwrite: bool = False,
) -> Iterator[MigrationResult]:
    """Convert every checkpoint of ``source`` into an h5ckpt file of ``destination``.

    Parameters
    ----------
    source : CheckpointManager
        Manager of the source directory and prefix (e.g. ``prefix="homodyne_state"``).
        Seed-format files hold a pickled optimizer state: without
        ``allow_pickle=True`` on this manager, the first such file stops the
        migration with a ``CheckpointPickleError`` before anything is written.
    destination : CheckpointManager
        Manager of the destination; use ``auto_cleanup=False`` so that retention
        does not delete converted files. Values that have no native form (objects
        of arbitrary classes in an unpickled state) are kept pickled, one value at a
        time, when this manager has ``allow_pickle=True``; otherwise that file fails.
    native_only : bool, default False
        Fail files with values that have no native form even when the destination
        manager could pickle them.
    overwrite : bool, default False
        Replace existing destination files (otherwise they are skipped).

    Yields
    ------
    MigrationResult
        One per source file, by batch index, as each is done. A converted file has
        the same batch index, loss, parameters, optimizer state and metadata as its
        source (checked by loading it back); its timestamp is the time of the
        conversion.

    Raises
    ------
    CheckpointPickleError
        When a source file needs unpickling and ``source.allow_pickle`` is False.
    """
    for info in source.list_checkpoints(verify=True):
        target = destination.checkpoint_path(info.batch_idx)
        result = partial(MigrationResult, info.path, target, info.batch_idx)
        if not info.is_valid:
            yield result("failed", f"invalid source: {info.error}")
            continue
        if target.exists() and not overwrite:
            yield result("skipped", f"{target.name} already exists in the destination")
            continue
        kind = "seed-format" if info.status == "legacy" else "h5ckpt"
        try:
            state = source.load_checkpoint(info.path)
        except CheckpointPickleError:
            raise
        except CheckpointError as exc:
            yield result("failed", f"cannot load: {exc}")
            continue
        pickled = _needs_pickle(state)
        if pickled is not None and (native_only or not destination.allow_pickle):
            why = "--native-only" if native_only else "the destination does not allow pickle"
            yield result(
                "failed",
                f"{pickled} has no native HDF5 form and {why}: not converted",
                pickled,
            )
            continue
        try:
            written = destination._save_copy(
                state["batch_idx"],
                state["parameters"],
                state["optimizer_state"],
                state["loss"],
                state["metadata"],
            )
            back = destination.load_checkpoint(written)
        except CheckpointError as exc:
            yield result("failed", f"cannot write or read back the converted file: {exc}")
            continue
        # NamedTuples, jax arrays, torch tensors and pytree nodes of the source are
        # stored natively: read back into the source's own types to compare them.
        like = {"optimizer_state": state["optimizer_state"], "metadata": state["metadata"]}
        try:
            typed: dict[str, Any] | None = apply_like(back, like)
        except CheckpointValueError:
            typed = None
        same = typed is not None and (
            typed["batch_idx"] == state["batch_idx"]
            and values_equal(typed["loss"], float(state["loss"]))
            and values_equal(typed["parameters"], state["parameters"])
            and _same(typed["optimizer_state"], state["optimizer_state"])
            and _same(typed["metadata"], state["metadata"])
        )
        if not same:
            written.unlink(missing_ok=True)
            yield result("failed", "the converted file does not read back the same; removed")
            continue
        note = f"from a {kind} file, verified"
        if pickled is not None:
            note += f"; values without a native form kept pickled (e.g. {pickled})"
        yield result("converted", note, pickled)

"""Shard and manifest files, and checking a step directory (no MPI needed).

Every file of a step is an ordinary h5ckpt file: written through the payload writer,
sealed by the Rust core, renamed into place; read back through the verified loader.
The manifest's ``optimizer_state`` holds the step's description (see
``docs/format.md``, "Sharded checkpoints").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _native
from ..errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError
from ..limits import LoadLimits
from ..payload import Contents, write_sealed
from ..reading import load_verified
from ..staging import new_file_mode, staged_file
from .layout import MANIFEST_NAME, is_step_dir, list_steps, parse_shard_name, shard_name
from .values import ROOTS

__all__ = [
    "MANIFEST_FORMAT",
    "Manifest",
    "StepInfo",
    "check_shards",
    "list_step_infos",
    "read_manifest",
    "read_shard",
    "write_file",
]

MANIFEST_FORMAT = "h5ckpt-sharded"
MANIFEST_VERSION = 1


def write_file(
    final: Path,
    contents: Contents,
    *,
    compression: str | None,
    allow_pickle: bool,
    hmac_key: bytes | None,
    durable: bool,
    file_mode: int | None = None,
) -> tuple[_native.Header, int]:
    """Write one h5ckpt file at ``final`` (temp file, seal, fsync, rename, fsync dir).

    It gets ``file_mode``, or without it the mode any new file gets under the
    process umask, as single files do.
    """
    failure, context = f"cannot write {final}", {"path": str(final)}
    mode = file_mode if file_mode is not None else new_file_mode()
    with staged_file(final, mode, failure=failure, context=context) as staged:
        header = write_sealed(
            staged.fd,
            contents,
            compression=compression,
            allow_pickle=allow_pickle,
            hmac_key=hmac_key,
            durable=durable,
        )
        size = os.fstat(staged.fd).st_size
        staged.commit(durable, _native.fsync_directory)
    return header, size


@dataclass
class Manifest:
    """What ``manifest.h5`` says about its step."""

    batch_idx: int
    loss: float
    timestamp: float
    version: str
    world_size: int
    shards: list[dict[str, Any]]  # name, size, payload_digest
    values: list[dict[str, Any]]  # path, kind, and per kind: axis/dtype/global_shape/ranges, ranks

    def content(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "world_size": self.world_size,
            "shards": self.shards,
            "values": self.values,
        }

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [v for v in self.values if v["kind"] == kind]


def write_manifest(
    step_dir: Path,
    manifest: Manifest,
    *,
    hmac_key: bytes | None,
    durable: bool,
    file_mode: int | None = None,
) -> None:
    contents = Contents(
        batch_idx=manifest.batch_idx,
        loss=manifest.loss,
        timestamp=manifest.timestamp,
        parameters=np.zeros(0, np.uint8),
        optimizer_state=manifest.content(),
        metadata={},
    )
    write_file(
        step_dir / MANIFEST_NAME,
        contents,
        compression=None,
        allow_pickle=False,
        hmac_key=hmac_key,
        durable=durable,
        file_mode=file_mode,
    )


def _corrupt(path: Path, why: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{path}: {why}", {"path": str(path), "reason": why})


def read_manifest(step_dir: Path, hmac_key: bytes | None, batch_idx: int | None = None) -> Manifest:
    """The verified manifest of a step; ``CheckpointError`` if it is missing or bad."""
    path = step_dir / MANIFEST_NAME
    if not path.exists():
        raise CheckpointNotFoundError(
            f"{step_dir}: no {MANIFEST_NAME} (an incomplete step)",
            {"path": str(step_dir), "reason": "incomplete"},
        )
    _, result = load_verified(path, hmac_key, False, LoadLimits())
    c = result["optimizer_state"]
    try:
        if not isinstance(c, dict) or c.get("format") != MANIFEST_FORMAT:
            raise _corrupt(path, "not a sharded-checkpoint manifest")
        if int(c["format_version"]) > MANIFEST_VERSION:
            raise _corrupt(path, f"manifest format version {c['format_version']} is newer")
        world = int(c["world_size"])
        shards = list(c["shards"])
        values = list(c["values"])
        if world < 1 or len(shards) != world:
            raise _corrupt(path, "the shard list does not match the world size")
        for r, s in enumerate(shards):
            if s["name"] != shard_name(r, world) or parse_shard_name(s["name"]) != (r, world):
                raise _corrupt(path, f"unexpected shard name {s['name']!r}")
            int(s["size"]), bytes(s["payload_digest"])
        for v in values:
            v["path"] = tuple(v["path"])
            if v["kind"] not in ("sharded", "replicated", "rank_local"):
                raise _corrupt(path, f"unknown value kind {v['kind']!r}")
    except CheckpointCorruptError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(path, f"malformed manifest: {exc!r}") from exc
    if batch_idx is not None and result["batch_idx"] != batch_idx:
        raise _corrupt(path, f"holds batch {result['batch_idx']}, not {batch_idx}")
    return Manifest(
        result["batch_idx"],
        result["loss"],
        result["timestamp"],
        result["version"],
        world,
        shards,
        values,
    )


def shard_mismatch(
    step_dir: Path, manifest: Manifest, rank: int, header: _native.Header | Exception
) -> str | None:
    """Why shard ``rank`` does not belong to the step (None when it does)."""
    entry = manifest.shards[rank]
    if isinstance(header, Exception):
        if isinstance(header, FileNotFoundError):
            return f"{entry['name']} is missing"
        text = str(header)
        return text if entry["name"] in text else f"{entry['name']}: {text}"
    if bytes(header.payload_digest) != bytes(entry["payload_digest"]):
        return f"{entry['name']} is not the shard the manifest names (digest differs)"
    if header.batch_idx != manifest.batch_idx:
        return f"{entry['name']} holds batch {header.batch_idx}, not {manifest.batch_idx}"
    try:
        size = os.stat(step_dir / entry["name"]).st_size
    except OSError:
        size = -1
    if size != int(entry["size"]):
        return f"{entry['name']} has {size} bytes, the manifest says {entry['size']}"
    return None


def read_shard(
    step_dir: Path,
    manifest: Manifest,
    rank: int,
    hmac_key: bytes | None,
    allow_pickle: bool,
    limits: LoadLimits,
) -> dict[str, Any]:
    """Shard ``rank`` of a step, verified and checked against the manifest, as its
    tree of ``parameters``, ``optimizer_state`` and ``metadata``."""
    header, result = load_verified(
        step_dir / manifest.shards[rank]["name"], hmac_key, allow_pickle, limits
    )
    why = shard_mismatch(step_dir, manifest, rank, header)
    if why is not None:
        raise CheckpointCorruptError(f"{step_dir}: {why}", {"path": str(step_dir)})
    return {k: result[k] for k in ROOTS}


def check_shards(
    step_dir: Path, manifest: Manifest, ranks: list[int], hmac_key: bytes | None
) -> list[str]:
    """Hash the given shards (in parallel); the reasons of those that do not match."""
    if not ranks:
        return []
    paths = [step_dir / manifest.shards[r]["name"] for r in ranks]
    outcomes = _native.verify_files(paths, hmac_key)
    reasons = []
    for r, outcome in zip(ranks, outcomes, strict=True):
        why = shard_mismatch(step_dir, manifest, r, outcome)
        if why is not None:
            reasons.append(why)
    return reasons


@dataclass(frozen=True)
class StepInfo:
    """One step directory as :func:`list_step_infos` sees it.

    ``status`` is ``"complete"`` (manifest and every shard verified), ``"unverified"``
    (manifest verified, every shard present with its recorded size, shards not hashed),
    ``"incomplete"`` (no manifest, or a shard missing) or ``"invalid"`` (a file is
    corrupt, tampered or not the one the manifest names); ``error`` says why.
    """

    path: Path
    batch_idx: int
    loss: float
    timestamp: float
    world_size: int
    size_bytes: int
    status: str
    error: str | None = None

    @property
    def is_valid(self) -> bool:
        return self.status == "complete"


def step_info(step_dir: Path, hmac_key: bytes | None, verify: bool) -> StepInfo:
    named = is_step_dir(step_dir)
    batch = named[1] if named else -1
    size = _tree_size(step_dir)
    nan = float("nan")
    try:
        m = read_manifest(step_dir, hmac_key, batch)
    except CheckpointNotFoundError as exc:
        return StepInfo(step_dir, batch, nan, nan, 0, size, "incomplete", str(exc))
    except CheckpointError as exc:
        return StepInfo(step_dir, batch, nan, nan, 0, size, "invalid", str(exc))
    missing = [s["name"] for s in m.shards if not (step_dir / s["name"]).is_file()]
    if missing:
        why = f"{step_dir}: missing shard(s) {', '.join(missing)}"
        return StepInfo(step_dir, batch, m.loss, m.timestamp, m.world_size, size, "incomplete", why)
    if not verify:
        for r in range(m.world_size):
            header: _native.Header | Exception
            try:
                header = _native.read_header(step_dir / m.shards[r]["name"])
            except Exception as exc:
                header = exc
            mismatch = shard_mismatch(step_dir, m, r, header)
            if mismatch is not None:
                return StepInfo(
                    step_dir, batch, m.loss, m.timestamp, m.world_size, size, "invalid", mismatch
                )
        return StepInfo(step_dir, batch, m.loss, m.timestamp, m.world_size, size, "unverified")
    reasons = check_shards(step_dir, m, list(range(m.world_size)), hmac_key)
    status = "invalid" if reasons else "complete"
    return StepInfo(
        step_dir,
        batch,
        m.loss,
        m.timestamp,
        m.world_size,
        size,
        status,
        "; ".join(reasons) if reasons else None,
    )


def _tree_size(step_dir: Path) -> int:
    total = 0
    try:
        for entry in os.scandir(step_dir):
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                pass
    except OSError:
        pass
    return total


def list_step_infos(
    directory: Path, prefix: str, hmac_key: bytes | None, verify: bool
) -> list[StepInfo]:
    return [step_info(p, hmac_key, verify) for _, p in list_steps(directory, prefix)]


def now() -> float:
    return time.time()

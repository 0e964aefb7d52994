"""What ``h5ckpt ls``, ``verify`` and ``show`` print about step directories.

Called by :mod:`h5ckpt.cli`; runs on one process without MPI.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.filesize import decimal as human_size
from rich.table import Table
from rich.text import Text

from ..arguments import resolve_hmac_key
from .layout import is_step_dir, list_steps
from .manifest import Manifest, StepInfo, read_manifest, step_info

__all__ = ["Steps", "show_step", "step_dirs", "verify_steps"]


def _cli():  # the table helpers live in h5ckpt.cli, which imports this module lazily
    from .. import cli

    return cli


def _as_json(info: StepInfo, latest: Path | None) -> dict[str, Any]:
    return {
        "path": str(info.path),
        "name": info.path.name,
        "kind": "step",
        "batch_idx": info.batch_idx,
        "loss": info.loss,
        "timestamp": info.timestamp,
        "world_size": info.world_size,
        "size_bytes": info.size_bytes,
        "status": info.status,
        "verified": info.status in ("complete", "invalid"),
        "latest": latest is not None and info.path == latest,
        "error": info.error,
    }


class Steps:
    """The step directories of one directory and prefix, the newest complete one found."""

    def __init__(self, directory: Path, prefix: str, verify: bool) -> None:
        key = resolve_hmac_key(None)
        self.directory = directory
        self.prefix = prefix
        self.infos = [step_info(p, key, verify) for _, p in list_steps(directory, prefix)]
        self.latest: Path | None = None
        for index in range(len(self.infos) - 1, -1, -1):
            info = self.infos[index]
            if info.status == "unverified":
                info = self.infos[index] = step_info(info.path, key, True)
            if info.is_valid:
                self.latest = info.path
                break

    def __bool__(self) -> bool:
        return bool(self.infos)

    @property
    def exit_status(self) -> int:
        """1 when a step is invalid or incomplete, as for an invalid file."""
        return 1 if any(i.status in ("invalid", "incomplete") for i in self.infos) else 0

    def json(self) -> list[dict[str, Any]]:
        return [_as_json(i, self.latest) for i in self.infos]

    def render(self, out: Console) -> int:
        if not self.infos:
            return 0
        cli = _cli()
        notes = any(i.error for i in self.infos)
        columns = [
            ("", "left"),
            ("batch", "right"),
            ("loss", "right"),
            ("saved", "left"),
            ("ranks", "right"),
            ("size", "right"),
            ("status", "left"),
        ]
        if notes:
            columns.append(("note", "left"))
        rows, styles = [], []
        for i in self.infos:
            newest = i.path == self.latest
            row = [
                Text("*", style="bold green") if newest else "",
                str(i.batch_idx),
                "-" if math.isnan(i.loss) else cli._loss(i.loss),
                cli._when(i.timestamp),
                str(i.world_size) if i.world_size else "-",
                human_size(i.size_bytes),
                cli._status(i.status),
            ]
            if notes:
                row.append(Text(i.error or ""))
            rows.append(row)
            styles.append("bold" if newest else None)
        title = f"{self.directory}  ({self.prefix}_batch_*/ sharded steps)"
        cli._emit(out, cli._table(columns, rows, title, styles))
        if self.latest is None:
            caption = "(no complete step: ShardedCheckpointManager.load_latest() would start fresh)"
        else:
            caption = "(* marks the newest complete step: load_latest() resumes from it)"
        if any(i.status == "unverified" for i in self.infos):
            caption += "\n(without --verify the shards of 'unverified' steps were not hashed)"
        out.print(caption, style="dim")
        return self.exit_status


def step_dirs(paths: list[str]) -> list[Path]:
    """Step directories named by ``paths`` or found under them (hidden ones skipped)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            continue
        if is_step_dir(path):
            out.append(path)
            continue
        for root, dirs, _ in os.walk(path):
            keep = []
            for d in sorted(dirs):
                if d.startswith("."):
                    continue
                if is_step_dir(Path(root) / d):
                    out.append(Path(root) / d)
                else:
                    keep.append(d)
            dirs[:] = keep
    return out


def verify_steps(steps: list[Path], out: Console | None) -> tuple[list[dict[str, Any]], int]:
    """Verify every step (manifest and all shards); print a table unless ``out`` is None."""
    key = resolve_hmac_key(None)
    infos = [step_info(p, key, True) for p in steps]
    bad = sum(not i.is_valid for i in infos)
    if out is not None and infos:
        cli = _cli()
        columns = [("status", "left"), ("batch", "right"), ("ranks", "right")]
        columns += [("size", "right"), ("step", "left")]
        if bad:
            columns.append(("problem", "left"))
        rows = []
        for i in infos:
            row = [
                cli._status(i.status),
                str(i.batch_idx),
                str(i.world_size) if i.world_size else "-",
                human_size(i.size_bytes),
                Text(str(i.path)),
            ]
            if bad:
                row.append(Text(i.error or ""))
            rows.append(row)
        cli._emit(out, cli._table(columns, rows))
        out.print(
            f"{len(infos)} step(s): {len(infos) - bad} complete, {bad} incomplete or invalid",
            style="bold red" if bad else "bold green",
        )
    return [_as_json(i, None) for i in infos], (1 if bad else 0)


def show_step(path: Path, args: argparse.Namespace, out: Console) -> int:
    """``h5ckpt show STEP_DIR``: status, shards and values of one step."""
    key = resolve_hmac_key(None)
    info = step_info(path, key, True)
    try:
        manifest = read_manifest(path, key)
    except Exception:
        manifest = None  # the status line says why
    values = _value_entries(manifest)
    doc = _as_json(info, None)
    doc.update(shards=_shard_entries(manifest), values=values)
    if args.json:
        _cli()._print_json(doc)
    else:
        _print_step(path, info, manifest, values, out)
    return 0 if info.is_valid else 1


def _shard_entries(manifest: Manifest | None) -> list[dict[str, Any]]:
    if manifest is None:
        return []
    return [{"name": s["name"], "size_bytes": int(s["size"])} for s in manifest.shards]


def _value_entries(manifest: Manifest | None) -> list[dict[str, Any]]:
    values: list[dict[str, Any]] = []
    for v in [] if manifest is None else manifest.values:
        entry = {"path": "/".join(v["path"]), "kind": v["kind"]}
        if v["kind"] == "sharded":
            entry.update(axis=v["axis"], dtype=v["dtype"], global_shape=v["global_shape"])
        if v["kind"] == "rank_local":
            entry["ranks"] = list(v["ranks"])
        values.append(entry)
    return values


def _print_step(
    path: Path,
    info: StepInfo,
    manifest: Manifest | None,
    values: list[dict[str, Any]],
    out: Console,
) -> None:
    cli = _cli()
    out.print(Text(str(path), style="bold"))
    status = Text("status: ")
    status.append_text(cli._status(info.status))
    if info.is_valid:
        status.append(
            f" — manifest and all {info.world_size} shard(s) verified (each its own header, "
            "SHA-256 tree digest and recorded digest)"
        )
    else:
        status.append(f" — {info.error}")
    out.print(status)
    if manifest is None:
        return
    out.print(
        f"batch {manifest.batch_idx}, loss {cli._loss(manifest.loss)}, saved "
        f"{cli._when(manifest.timestamp)} by h5ckpt {manifest.version} on "
        f"{manifest.world_size} rank(s), {human_size(info.size_bytes)}"
    )
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, title="values", title_justify="left")
    for col in ("key path", "kind", "detail"):
        table.add_column(col)
    for v in values:
        table.add_row(Text(v["path"]), v["kind"], _value_detail(v))
    cli._emit(out, table)


def _value_detail(v: dict[str, Any]) -> str:
    if v["kind"] == "sharded":
        shape = ", ".join(str(n) for n in v["global_shape"])
        return f"{_native_dtype(v['dtype'])} ({shape}) split along axis {v['axis']}"
    if v["kind"] == "rank_local":
        return f"ranks {v['ranks']}"
    return ""


def _native_dtype(text: str) -> str:
    import numpy as np

    try:
        return str(np.dtype(text))
    except TypeError:
        return text

"""The ``h5ckpt`` command line (also ``python -m h5ckpt``).

Commands::

    h5ckpt ls DIR [--prefix P] [--verify] [--json]
    h5ckpt verify PATH... [--json]
    h5ckpt show FILE [--json]
    h5ckpt prune DIR --keep-last N [--keep-best M] [--keep-every K]
                 [--delete-invalid] [--dry-run] [--prefix P] [--json]
    h5ckpt migrate SRC_DIR DST_DIR [--prefix homodyne_state] [--dst-prefix P]
                   [--allow-pickle] [--native-only] [--overwrite]
    h5ckpt demo [DIR] [demo options]

Exit status, the same rule for every command:

* 0: the command did what was asked and every checkpoint file it examined is intact
  (``ls`` without ``--verify`` examines headers only; ``prune`` counts the files it
  keeps).
* 1: a checkpoint file is invalid (the output says which and why; nothing on
  stderr), or the command failed: a path does not exist, a file failed to convert,
  ``verify`` or ``migrate`` found no checkpoint file to work on (one line on stderr,
  ``h5ckpt: error: ...``). ``ls`` and ``prune`` of a directory without checkpoints
  say so and exit 0.
* 2: a usage error.

``--debug`` adds the traceback and the library's debug log to an error. An HMAC key
in the environment variable ``H5CKPT_HMAC_KEY`` (its bytes) is used as the manager
uses it; without one, ``verify`` and ``show`` say which files carry a tag that was not
checked.

With ``--json``, a number the file could not provide (no readable header) is
``null``; a loss or timestamp that a header holds as NaN or an infinity is the string
``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (strict JSON has no such numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.filesize import decimal as human_size
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.style import Style
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from . import _native
from .arguments import HMAC_KEY_ENV, check_prefix, hmac_key_from_environment
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointPickleError,
    CheckpointValueError,
)
from .inspection import (
    FileReport,
    checkpoint_files,
    describe_file,
    json_safe,
    verify_paths,
)
from .manager import CheckpointManager
from .migrate import migrate_directory
from .mpi.cli import Steps, show_step, step_dirs, verify_steps
from .options import CheckpointManagerOptions
from .payload import FORMAT_VERSION
from .verification import INVALID, LEGACY, UNVERIFIED, VALID, CheckpointInfo

__all__ = ["build_parser", "main"]

PROG = "h5ckpt"
STATUS_STYLE = {
    VALID: "green",
    LEGACY: "yellow",
    UNVERIFIED: "cyan",
    INVALID: "bold red",
    "complete": "green",
    "incomplete": "yellow",
    "converted": "green",
    "skipped": "yellow",
    "failed": "bold red",
}


class UsageError(Exception):
    """A command line that parses but asks for something impossible (exit status 2)."""


# ----------------------------------------------------------------------- helpers


def _console() -> Console:
    """Rich console on stdout; wide and plain when stdout is not a terminal."""
    tty = sys.stdout.isatty()
    # Piped output is never folded: one table row stays one line, whatever its width.
    return Console(highlight=False, width=None if tty else 100_000, soft_wrap=not tty)


def _emit(out: Console, renderable: Any) -> None:
    """Print a table or tree; without a terminal, without trailing blanks."""
    # A block of text from _table is laid out already: folding it would cost time.
    no_wrap = isinstance(renderable, Text)
    if out.is_terminal:
        out.print(renderable, no_wrap=no_wrap, overflow="ignore" if no_wrap else None)
        return
    with out.capture() as captured:
        out.print(renderable, no_wrap=no_wrap, overflow="ignore" if no_wrap else None)
    lines = [line.rstrip() for line in captured.get().splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    sys.stdout.write("\n".join(lines) + "\n")


# Rich lays a table out cell by cell, about a millisecond per row here (11 s for a
# directory of 10,000 checkpoints). Above this many rows the same columns are laid
# out as one block of text, which prints 10,000 rows in a fraction of a second.
RICH_TABLE_MAX_ROWS = 200

_Cell = str | Text


def _table(
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Sequence[_Cell]],
    title: str | None = None,
    styles: Sequence[str | None] | None = None,
) -> Any:
    """A table of ``columns`` (header, ``"left"`` or ``"right"``) for :func:`_emit`."""
    styles = styles or [None] * len(rows)
    if len(rows) <= RICH_TABLE_MAX_ROWS:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, title=escape(title) if title else None)
        for header, justify in columns:
            table.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for row, style in zip(rows, styles, strict=True):
            table.add_row(*row, style=style)
        return table
    # Plain strings laid out with f-string speed; styles added as spans afterwards.
    plain = [[c.plain if isinstance(c, Text) else c for c in row] for row in rows]
    headers = [header for header, _ in columns]
    widths = [
        max([cell_len(header)] + [cell_len(row[k]) for row in plain])
        for k, header in enumerate(headers)
    ]
    last = len(columns) - 1
    lines: list[str] = []
    spans: list[tuple[int, int, str | Style]] = []
    offset = 0

    def add(texts: Sequence[str], styled: Sequence[_Cell], style: str | None) -> None:
        nonlocal offset
        line = " "
        for k, (text, (_, justify)) in enumerate(zip(texts, columns, strict=True)):
            pad = " " * (widths[k] - cell_len(text))
            if justify == "right":
                line += pad
            cell = styled[k]
            if isinstance(cell, Text) and cell.style:
                spans.append((offset + len(line), offset + len(line) + len(text), cell.style))
            line += text
            if k < last:
                line += ("" if justify == "right" else pad) + "  "
        if style:
            spans.append((offset, offset + len(line), style))
        lines.append(line)
        offset += len(line) + 1

    if title:
        lines.append(title)
        spans.append((0, len(title), "italic"))
        offset = len(title) + 1
    add(headers, headers, "bold")
    lines.append(" " + "─" * (sum(widths) + 2 * last))
    offset += len(lines[-1]) + 1
    for texts, styled, style in zip(plain, rows, styles, strict=True):
        add(texts, styled, style)
    block = Text("\n".join(lines))
    for begin, end, span_style in spans:
        block.stylize(span_style, begin, end)
    return block


def _is(info: CheckpointInfo, path: Path | None) -> bool:
    """Whether ``info`` is the file ``path``, making its ``Path`` only when it may be."""
    return path is not None and info.batch_idx == _batch_of(path) and info.path == path


def _batch_of(path: Path) -> int | None:
    parts = _native.checkpoint_name_parts(path.name)
    return parts[1] if parts is not None else None


def _directory(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"no such directory: {p}", {"path": str(p)})
    if not p.is_dir():
        raise CheckpointError(f"not a directory: {p}", {"path": str(p)})
    return p


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer from ``minimum`` to 2**63-1 (the manager's range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if not minimum <= value < 2**63:
            raise argparse.ArgumentTypeError(f"expected {what} below 2**63, got {text!r}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")


def _prefix_arg(text: str) -> str:
    """An argparse type: a file name prefix the manager accepts."""
    try:
        return check_prefix(text)
    except CheckpointValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _when(timestamp: float) -> str:
    if not math.isfinite(timestamp) or timestamp <= 0:
        return "-"
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _loss(loss: float) -> str:
    return f"{loss:.6g}" if not math.isnan(loss) else "nan"


def _num(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _status(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def _header_readable(path: Path) -> bool:
    try:
        _native.read_header(path)
    except CheckpointError:
        return False
    return True


def _json_number(value: float, status: str, path: Path) -> float | str | None:
    """A loss or timestamp for JSON: None when the file could not provide it.

    Listings use NaN for "unknown", but a header may hold a real NaN loss: only an
    invalid file's NaN can be unknown, and its header tells which.
    """
    if not math.isnan(value) or status != INVALID or _header_readable(path):
        return json_safe(value)
    return None


_TAG_NOT_CHECKED = f"HMAC tag not checked (no key: set {HMAC_KEY_ENV})"


def _tag_note(report: FileReport, key: bytes | None) -> str | None:
    if key is None and report.keyed and report.is_valid:
        return _TAG_NOT_CHECKED
    return None


def _report_json(report: FileReport, key: bytes | None) -> dict[str, Any]:
    fields = report.to_dict()
    fields["loss"] = _json_number(report.loss, report.status, report.path)
    fields["timestamp"] = _json_number(report.timestamp, report.status, report.path)
    fields["tag_checked"] = key is not None and report.keyed and report.is_valid
    fields["note"] = _tag_note(report, key)
    return fields


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n")


def _other_prefixes(directory: Path, prefix: str) -> list[str]:
    found = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            parts = _native.checkpoint_name_parts(entry.name)
            if parts is not None and parts[0] != prefix:
                found.add(parts[0])
    return sorted(found)


def _nothing_found(directory: Path, prefix: str) -> str:
    message = f"no checkpoints named {prefix}_batch_<n>.h5 in {directory}"
    others = _other_prefixes(directory, prefix)
    if others:
        message += f" (files with prefix {', '.join(others)} exist: use --prefix)"
    return message


def _reader(directory: Path, prefix: str, **settings: Any) -> CheckpointManager:
    """A read-only manager of ``directory``: it creates nothing, takes no lock and
    needs only read access; it keeps and prunes nothing either."""
    options = CheckpointManagerOptions(
        keep_last_n=None, auto_cleanup=False, prefix=prefix, read_only=True, **settings
    )
    return CheckpointManager(directory, options=options)


# ---------------------------------------------------------------------- commands


def cmd_ls(args: argparse.Namespace, out: Console) -> int:
    """``h5ckpt ls``: the checkpoints of one directory and prefix."""
    directory = _directory(args.directory)
    manager = _reader(directory, args.prefix)
    latest = manager.find_latest_checkpoint()  # verifies the newest files only
    infos = manager.list_checkpoints(verify=args.verify)
    status = 1 if any(i.status == INVALID for i in infos) else 0
    steps = Steps(directory, args.prefix, args.verify)  # sharded checkpoints of MPI jobs
    status = max(status, steps.exit_status)
    if args.json:
        _print_json(
            [
                {
                    "path": str(i.path),
                    "name": i.path.name,
                    "batch_idx": i.batch_idx,
                    "loss": _json_number(i.loss, i.status, i.path),
                    "timestamp": _json_number(i.timestamp, i.status, i.path),
                    "size_bytes": i.size_bytes,
                    "status": i.status,
                    "verified": i.verified,
                    "latest": _is(i, latest),
                    "error": i.error,
                }
                for i in infos
            ]
            + steps.json()
        )
        return status
    if not infos:
        if steps:
            return steps.render(out)
        out.print(escape(_nothing_found(directory, args.prefix)))
        return 0
    notes = any(i.error for i in infos)
    columns = [
        ("", "left"),
        ("batch", "right"),
        ("loss", "right"),
        ("saved", "left"),
        ("size", "right"),
        ("status", "left"),
    ]
    if notes:
        columns.append(("note", "left"))
    rows: list[list[_Cell]] = []
    styles: list[str | None] = []
    for i in infos:
        newest = _is(i, latest)
        row: list[_Cell] = [
            Text("*", style="bold green") if newest else "",
            str(i.batch_idx),
            "-" if i.status == INVALID and math.isnan(i.loss) else _loss(i.loss),
            _when(i.timestamp),
            human_size(i.size_bytes),
            _status(i.status),
        ]
        if notes:
            row.append(Text(i.error or ""))
        rows.append(row)
        styles.append("bold" if newest else None)
    _emit(out, _table(columns, rows, f"{directory}  ({args.prefix}_batch_*.h5)", styles))
    caption = "(* marks the newest valid checkpoint: load_latest() resumes from it)"
    if latest is None:
        caption = "(no valid checkpoint: load_latest() would start from scratch)"
    if not args.verify and any(i.status == UNVERIFIED or not i.verified for i in infos):
        caption += "\n(without --verify only headers were read for 'unverified' and 'legacy')"
    out.print(caption, style="dim")
    return max(status, steps.render(out))


def _verify_with_progress(files: list[Path], key: bytes | None, show: bool, out: Console):
    if not show:
        return verify_paths(files, key)
    total = 0
    for f in files:
        with contextlib.suppress(OSError):
            total += f.stat().st_size
    columns = (
        TextColumn("verifying {task.fields[count]} files"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=out, transient=True) as progress:
        task = progress.add_task("verify", total=total, count=len(files))
        return verify_paths(files, key, lambda n: progress.advance(task, n))


def cmd_verify(args: argparse.Namespace, out: Console) -> int:
    """``h5ckpt verify``: check every byte of files and directories."""
    files = checkpoint_files(args.paths)
    steps = step_dirs(args.paths)  # sharded checkpoints of MPI jobs
    if not files and not steps:
        raise CheckpointNotFoundError(
            "nothing to verify: no checkpoint files (named <prefix>_batch_<n>.h5) under "
            + ", ".join(args.paths)
            + " (directories are searched recursively, hidden ones skipped; a file named "
            "on the command line is checked whatever its name)",
            {"paths": list(args.paths)},
        )
    step_reports, steps_bad = verify_steps(steps, None if args.json else out)
    if not files:
        if args.json:
            _print_json(step_reports)
        return steps_bad
    key = hmac_key_from_environment()
    reports = _verify_with_progress(files, key, out.is_terminal and not args.json, out)
    bad = sum(not r.is_valid for r in reports) + steps_bad
    if args.json:
        _print_json([_report_json(r, key) for r in reports] + step_reports)
        return 1 if bad else 0
    notes = [r.error or _tag_note(r, key) for r in reports]
    columns = [
        ("status", "left"),
        ("batch", "right"),
        ("loss", "right"),
        ("size", "right"),
        ("file", "left"),
    ]
    if any(notes):
        columns.append(("note", "left"))
    rows: list[list[_Cell]] = []
    for r, note in zip(reports, notes, strict=True):
        row: list[_Cell] = [
            _status(r.status),
            "-" if r.batch_idx is None else str(r.batch_idx),
            "-" if r.format in ("unknown", "unreadable") else _loss(r.loss),
            human_size(r.size_bytes),
            Text(str(r.path)),
        ]
        if any(notes):
            row.append(Text(note or ""))
        rows.append(row)
    _emit(out, _table(columns, rows))
    counts = {s: sum(r.status == s for r in reports) for s in (VALID, LEGACY, INVALID)}
    summary = f"{len(reports)} file(s): {counts[VALID]} valid"
    if counts[LEGACY]:
        summary += f", {counts[LEGACY]} legacy (seed format, own checksum only)"
    summary += f", {counts[INVALID]} invalid"
    unchecked = sum(_tag_note(r, key) is not None for r in reports)
    if unchecked:
        summary += (
            f"; {unchecked} carry an HMAC tag that was not checked "
            f"(no key: set {HMAC_KEY_ENV} to check it)"
        )
    out.print(summary, style="bold red" if bad else "bold green")
    return 1 if bad else 0


def _tree_label(name: str, node: dict[str, Any]) -> Text:
    label = Text(name, style="bold")
    _append_kind(label, node)
    _append_contents(label, node)
    if "note" in node:
        label.append(f"  ({node['note']})", style="yellow")
    return label


def _append_kind(label: Text, node: dict[str, Any]) -> None:
    """What the node is: type, class and fields, dtype, shape, length, size."""
    kind = node.get("type", "?")
    label.append(f"  {kind}", style="cyan")
    if "class" in node:  # a NamedTuple or JAX pytree node: the class it was saved from
        label.append(f"  {node['class']}")
        if "fields" in node:
            label.append(f"({', '.join(node['fields'])})", style="dim")
    if "dtype" in node:
        label.append(f"  {node['dtype']}")
    if "shape" in node:
        label.append(
            "  ("
            + ", ".join(str(d) for d in node["shape"])
            + ("," if len(node["shape"]) == 1 else "")
            + ")"
        )
    if "length" in node and kind not in ("str", "bigint"):
        label.append(f"  {node['length']} item(s)", style="dim")
    if "nbytes" in node:
        label.append(f"  {human_size(node['nbytes'])}", style="dim")


def _append_contents(label: Text, node: dict[str, Any]) -> None:
    """How it is stored and what it holds: storage, origin, values or a summary."""
    if "storage" in node:
        label.append(f"  [{node['storage']}]", style="dim")
    if "array" in node:  # the library the array came from (jax, torch, numpy.memmap...)
        label.append(f"  from {node['array']}", style="dim")
    if "bits" in node:
        label.append(f"  (stored as {node['bits']} bits)", style="dim")
    if "value" in node:
        value = node["value"]
        label.append(
            " = "
            + (json.dumps(value, ensure_ascii=False) if isinstance(value, str) else _num(value))
        )
    if "values" in node:
        label.append(" = [" + ", ".join(_num(v) for v in node["values"]) + "]")
    summary = node.get("summary")
    if summary:
        label.append(
            "  "
            + ", ".join(
                f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
            ),
            style="dim",
        )


def _add_children(tree: Tree, node: dict[str, Any]) -> None:
    for key, child in node.get("children", {}).items():
        branch = tree.add(_tree_label(key, child))
        _add_children(branch, child)
    if node.get("truncated"):
        tree.add(Text(f"… {node['truncated']} more", style="dim"))


def cmd_show(args: argparse.Namespace, out: Console) -> int:
    """``h5ckpt show``: header, digest status and payload tree of one file."""
    if Path(args.file).is_dir():
        return show_step(Path(args.file), args, out)  # a sharded step directory
    key = hmac_key_from_environment()
    info = describe_file(args.file, key)
    valid = info["status"] in (VALID, LEGACY)
    keyed = bool((info["header"] or {}).get("keyed")) and info["format"] == "h5ckpt"
    info["tag_checked"] = key is not None and keyed and info["status"] == VALID
    info["note"] = _TAG_NOT_CHECKED if key is None and keyed and valid else None
    if args.json:
        _print_json(info)
        return 0 if valid else 1
    out.print(Text(info["path"], style="bold"))
    fmt = "h5ckpt" if info["format"] == "h5ckpt" else "seed format (legacy)"
    out.print(f"format: {fmt}, {human_size(info['size_bytes'])}")
    status = Text("status: ")
    status.append_text(_status(info["status"]))
    if info["status"] == VALID:
        status.append(
            " — every byte verified (header digest, SHA-256 tree digest of the payload"
            + (", HMAC tag)" if info["tag_checked"] else ")")
        )
        if info["note"]:
            status.append(f"; {info['note']}", style="yellow")
    elif info["status"] == LEGACY:
        status.append(" — the seed's checksum matches; it covers only the pickled optimizer state")
    else:
        status.append(f" — {info['error']}")
    out.print(status)
    header = info["header"]
    if header:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, title="header", title_justify="left")
        table.add_column("field")
        table.add_column("value", overflow="fold")
        for key, value in header.items():
            shown = value
            if key == "timestamp" and isinstance(value, float):
                shown = f"{value} ({_when(value)})"
            table.add_row(key, Text(str(shown)))
        _emit(out, table)
    if info["tree"] is None:
        out.print(
            "payload not shown: the file did not verify, and h5ckpt parses only verified files",
            style="yellow",
        )
        return 1
    root = Tree(Text("payload", style="bold"))
    for key, attr in (info["attributes"] or {}).items():
        if key in ("h5ckpt_format", "h5ckpt_version", "version"):
            root.add(Text(f"@{key} = {attr}", style="dim"))
    for name, node in info["tree"].items():
        branch = root.add(_tree_label(name, node))
        _add_children(branch, node)
    _emit(out, root)
    return 0 if valid else 1


def cmd_prune(args: argparse.Namespace, out: Console) -> int:
    """``h5ckpt prune``: apply the manager's retention policy."""
    directory = _directory(args.directory)
    options = CheckpointManagerOptions(
        keep_last_n=args.keep_last,
        keep_best_n=args.keep_best,
        keep_every=args.keep_every,
        best_mode=args.best_mode,
        delete_invalid=args.delete_invalid,
        auto_cleanup=False,
        prefix=args.prefix,
        read_only=args.dry_run,  # a dry run only reads
    )
    manager = CheckpointManager(directory, options=options)
    before = manager.list_checkpoints()
    removed = manager.plan_cleanup() if args.dry_run else manager.cleanup_old_checkpoints()
    kept = [i.path for i in before if i.path not in removed]
    # Planning verified every file; the listing answers from what it remembers.
    gone = set(removed)
    invalid = [
        i.path
        for i in manager.list_checkpoints(verify=True)
        if i.status == INVALID and i.path not in gone
    ]
    status = 1 if invalid else 0
    if args.json:
        _print_json(
            {
                "dry_run": args.dry_run,
                "deleted": [str(p) for p in removed],
                "kept": [str(p) for p in kept],
                "invalid_kept": [str(p) for p in invalid],
            }
        )
        return status
    if not before:
        out.print(escape(_nothing_found(directory, args.prefix)))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for path in removed:
        out.print(Text(f"{verb} {path}"))
    summary = f"{len(removed)} of {len(before)} checkpoint file(s) "
    summary += "would be deleted" if args.dry_run else "deleted"
    summary += f", {len(kept)} kept" + (" (dry run: nothing deleted)" if args.dry_run else "")
    out.print(summary, style="bold")
    if invalid:
        out.print(
            Text(
                f"kept {len(invalid)} invalid file(s) (--delete-invalid deletes them): "
                + ", ".join(p.name for p in invalid)
            ),
            style="bold red",
        )
    return status


def _refuse_pickle(source: CheckpointManager) -> None:
    """Stop before writing anything when a source file needs unpickling."""
    for info in source.list_checkpoints():
        if info.status == LEGACY:
            try:
                source.load_checkpoint(info.path)
            except CheckpointPickleError:
                raise CheckpointPickleError(_pickle_reason(source.checkpoint_dir), {}) from None
            except CheckpointError:
                continue
            return


def _pickle_reason(directory: Path) -> str:
    return (
        f"{directory} holds seed-format checkpoints whose optimizer state the seed pickled; "
        "converting them unpickles it, and unpickling can run arbitrary code: pass "
        "--allow-pickle (allow_pickle=True) only for files you trust"
    )


def cmd_migrate(args: argparse.Namespace, out: Console) -> int:
    """``h5ckpt migrate``: convert seed-format checkpoints into h5ckpt files."""
    src = _directory(args.src_dir)
    dst = Path(args.dst_dir)
    dst_prefix = args.dst_prefix or args.prefix
    if dst.exists() and dst.resolve() == src.resolve() and dst_prefix == args.prefix:
        raise UsageError(
            "DST_DIR is SRC_DIR and the prefix is the same: choose another directory "
            "or --dst-prefix"
        )
    # Seed files carry no tag: the source is read without a key, whatever the
    # environment holds (the new files are signed with it).
    source = _reader(src, args.prefix, allow_pickle=args.allow_pickle, key_from_environment=False)
    if not source.list_checkpoints():
        raise CheckpointNotFoundError(_nothing_found(src, args.prefix), {"path": str(src)})
    if not args.allow_pickle:
        _refuse_pickle(source)
    destination = CheckpointManager(
        dst,
        keep_last_n=None,
        auto_cleanup=False,
        prefix=dst_prefix,
        allow_pickle=args.allow_pickle and not args.native_only,
    )
    counts = {"converted": 0, "skipped": 0, "failed": 0}
    try:
        for result in migrate_directory(
            source, destination, native_only=args.native_only, overwrite=args.overwrite
        ):
            counts[result.outcome] += 1
            line = Text()
            line.append_text(_status(f"{result.outcome:<9}"))
            line.append(f" {result.source.name} -> {result.destination}  ({result.message})")
            out.print(line)
    except CheckpointPickleError as exc:
        raise CheckpointPickleError(_pickle_reason(src), exc.error_context) from exc
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    out.print(
        f"{sum(counts.values())} file(s): {summary}",
        style="bold red" if counts["failed"] else "bold green",
    )
    return 1 if counts["failed"] else 0


def cmd_demo(args: argparse.Namespace, out: Console) -> int:
    """``h5ckpt demo``: the kill-and-resume demo (see :mod:`h5ckpt.demo`)."""
    from .demo import main as demo_main

    return demo_main(args.demo_args)


# ------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``h5ckpt`` command.

    Returns
    -------
    argparse.ArgumentParser
        Each sub-command stores its handler in ``func``.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks and the library's debug log",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Crash-safe, verified HDF5 checkpoints: inspect, verify, prune, migrate.",
        epilog=f"An HMAC key in ${HMAC_KEY_ENV} is used as CheckpointManager uses it. "
        "Exit status: 0 ok and every file examined intact, 1 an invalid file or a failure, "
        "2 usage error.",
        parents=[common],
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"{PROG} {_native.__version__} (file format {FORMAT_VERSION})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[..., int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, parents=[common])
        p.set_defaults(func=func)
        return p

    def prefix_option(
        p: argparse.ArgumentParser,
        flag: str = "--prefix",
        default: str | None = "checkpoint",
        help_: str = "file name prefix",
    ) -> None:
        if default is not None:
            help_ += " (default: %(default)s)"
        p.add_argument(flag, type=_prefix_arg, default=default, help=help_)

    p = command("ls", cmd_ls, "list the checkpoints of a directory")
    p.add_argument("directory", metavar="DIR")
    prefix_option(p)
    p.add_argument("--verify", action="store_true", help="hash every file (default: headers only)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command(
        "verify", cmd_verify, "check every byte of checkpoint files (exit 1 if any is invalid)"
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="files, or directories searched recursively for *_batch_<n>.h5 files",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output, no progress bar")

    p = command("show", cmd_show, "header, digest status and payload tree of one checkpoint")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("prune", cmd_prune, "delete old checkpoints by the manager's retention policy")
    p.add_argument("directory", metavar="DIR")
    prefix_option(p)
    p.add_argument(
        "--keep-last",
        type=_positive,
        required=True,
        metavar="N",
        help="keep the N newest valid checkpoints",
    )
    p.add_argument(
        "--keep-best",
        type=_non_negative,
        default=0,
        metavar="M",
        help="also keep the M valid checkpoints with the best loss",
    )
    p.add_argument(
        "--best-mode",
        choices=("min", "max"),
        default="min",
        help="whether the best loss is the lowest or highest (default: %(default)s)",
    )
    p.add_argument(
        "--keep-every",
        type=_positive,
        default=None,
        metavar="K",
        help="also keep valid checkpoints whose batch index is a multiple of K",
    )
    p.add_argument(
        "--delete-invalid", action="store_true", help="also delete invalid files (kept by default)"
    )
    p.add_argument("--dry-run", action="store_true", help="print what would go, delete nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("migrate", cmd_migrate, "convert seed-format checkpoints into h5ckpt files")
    p.add_argument("src_dir", metavar="SRC_DIR")
    p.add_argument("dst_dir", metavar="DST_DIR")
    prefix_option(p, default="homodyne_state", help_="prefix of the source files")
    prefix_option(p, "--dst-prefix", None, "prefix of the new files (default: --prefix)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="unpickle the seed's optimizer state (can run code: trusted files only); values "
        "without a native HDF5 form stay pickled in the new files",
    )
    p.add_argument(
        "--native-only",
        action="store_true",
        help="fail files whose state has values without a native form",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing destination files")

    p = command("demo", cmd_demo, "run the streaming-fit demo: SIGKILL, resume, compare")
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


# -------------------------------------------------------------------------- main


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _say(text: str) -> None:
    """One line on stderr, whatever characters the text holds."""
    try:
        sys.stderr.write(text)
    except UnicodeEncodeError:
        encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
        sys.stderr.write(text.encode(encoding, "backslashreplace").decode(encoding))


@contextlib.contextmanager
def _file_names_as_bytes() -> Iterator[None]:
    """Print names that are not UTF-8 as the bytes they are, as ``ls`` does.

    Python reads such names as lone surrogates (surrogateescape); a strict stdout,
    as a UTF-8 locale gives, would refuse to print them back.
    """
    changed = []
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            with contextlib.suppress(Exception):
                stream.reconfigure(errors="surrogateescape")
                changed.append(stream)
    try:
        yield
    finally:
        for stream in changed:
            with contextlib.suppress(Exception):
                stream.reconfigure(errors="strict")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``h5ckpt`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 success with every examined file intact, 1 an invalid
        file or a failed operation, 2 usage error (see the module docstring).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options, --help included
        return cmd_demo(argparse.Namespace(demo_args=argv[1:]), _console())
    with _file_names_as_bytes():
        return _run(argv)


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    log = logging.getLogger("h5ckpt")
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())  # no stray warnings on stderr
    if debug:
        logging.basicConfig(
            level=logging.DEBUG, stream=sys.stderr, format="h5ckpt: %(levelname)s: %(message)s"
        )
    try:
        return args.func(args, _console())
    except UsageError as exc:
        _say(f"{PROG}: error: {_one_line(exc)}\n")
        return 2
    except KeyboardInterrupt:
        _say(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if debug:
            traceback.print_exc()
        message = _one_line(exc)
        if not isinstance(exc, (CheckpointError, OSError)):
            message = f"{type(exc).__name__}: {message}"
        _say(f"{PROG}: error: {message}\n")
        return 1

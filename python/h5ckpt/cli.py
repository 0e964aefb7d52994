"""The ``h5ckpt`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="h5ckpt", description="Crash-safe HDF5 checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the streaming-fit demo: kill, resume, compare", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    return 2

"""Command line: one subcommand per module of memdefragd/commands/ (damo's layout): each
has `set_argparser(subparsers)` and `main(args) -> int`."""

from __future__ import annotations

import argparse
import os
import select as _select
import sys
from collections.abc import Sequence

from . import __version__
from .commands import check_config, defrag, demo, report, run, simulate, snapshot

COMMANDS = (report, run, defrag, simulate, snapshot, demo, check_config)  # in --help's order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memdefragd",
        description="User-space memory-contiguity agent: measures how physically fragmented "
        "processes' memory is and collapses it into huge pages.",
    )
    parser.add_argument("--version", action="version", version=f"memdefragd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.set_argparser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a reader gone shows here, not as a traceback at exit
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # a pipe of our own, not the reader of our output: a real error
        # `memdefragd report | head`: the reader has all it wanted. As Python's docs
        # (signal module, "Note on SIGPIPE") advise: point stdout at /dev/null, so the
        # interpreter's own flush at exit cannot fail again, and exit 1 without a word.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return code


def _stdout_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has closed it."""
    try:
        poller = _select.poll()  # (`select` is the targets' function here)
        poller.register(sys.stdout.fileno(), _select.POLLOUT)
        return any(ev & (_select.POLLERR | _select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())

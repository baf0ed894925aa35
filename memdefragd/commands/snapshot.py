"""`memdefragd snapshot`: save this machine's memory and chosen processes to a file, for
`memdefragd simulate --from-snapshot` here or anywhere else."""

from __future__ import annotations

import argparse
import os
import sys

from ..config import ConfigError, load_config
from ..model import PAGE_SIZE, AccessDenied, ProcessGone, ProcessInfo
from ..snapshot import HostSnapshot, save
from ..units import format_size
from .common import Subparsers


def add_target_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Which processes a snapshot holds: by pid, or those a config's targets claim."""
    p.add_argument(
        "--pid", type=int, action="append", default=[], metavar="PID",
        help="a process to put in the snapshot (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "-c", "--config", metavar="FILE", help="also every process this config's targets claim"
    )


def take(args: argparse.Namespace) -> HostSnapshot:
    """A snapshot of this machine and the processes the arguments name; raises ValueError
    (a usage or config error) or OSError (kpageflags unreadable)."""
    from ..backends.kernel.backend import KernelBackend
    from ..backends.kernel.snapshot import take_snapshot
    from ..pipeline.targets import select

    if not args.pid and not args.config:
        raise ValueError("name the processes to simulate: --pid PID or -c CONFIG")
    backend = KernelBackend()
    try:
        procs: dict[int, ProcessInfo] = {}
        for pid in args.pid:
            try:
                procs[pid] = backend.process(pid)
            except (ProcessGone, AccessDenied) as e:
                raise ValueError(f"pid {pid}: {e}") from None
        if args.config:
            try:
                targets = load_config(args.config).targets
            except ConfigError as e:
                raise ValueError(str(e)) from None
            for p, _ in select(backend.list_processes(), targets):
                procs.setdefault(p.pid, p)
        return take_snapshot(list(procs.values()), backend=backend)
    finally:
        backend.close()


def describe(snap: HostSnapshot) -> str:
    """One line: what the snapshot holds."""
    procs = ", ".join(
        f"pid {p.pid} ({p.comm}) {format_size(p.present_pages * PAGE_SIZE)}" for p in snap.processes
    )
    return (
        f"kernel {snap.kernel}, {format_size(snap.nframes * PAGE_SIZE)} of frames in "
        f"{len(snap.zones)} zone(s), taken in {snap.seconds:.2f} s; {procs or 'no process'}"
    )


def set_argparser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "snapshot",
        help="save this machine's frames and chosen processes' pages for `simulate`",
        description=(
            "Read every frame's state (/proc/kpageflags), the zones (/proc/zoneinfo),\n"
            "/proc/buddyinfo and the chosen processes' VMAs and page frames, and save them\n"
            "to FILE (compressed .npz), for `memdefragd simulate --from-snapshot FILE`\n"
            "on this or any other machine. Needs root (frame numbers and kpageflags)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_args(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write it")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        snap = take(args)
    except ValueError as e:
        print(f"memdefragd: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"memdefragd: cannot read {e.filename or 'procfs'}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        save(snap, args.output)
    except OSError as e:
        print(f"memdefragd: {args.output}: {e.strerror}", file=sys.stderr)
        return 1
    for note in snap.notes:
        print(f"memdefragd: {note}", file=sys.stderr)
    size = format_size(os.path.getsize(args.output))
    print(f"{args.output}: {describe(snap)}; {size} on disk")
    return 0

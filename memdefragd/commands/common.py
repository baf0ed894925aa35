"""What several commands share: argument types, and the options of a simulated machine."""

from __future__ import annotations

import argparse

from ..pipeline.targets import Regex, RegexError
from ..units import parse_size


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def regex_arg(text: str) -> Regex:
    try:
        return Regex(text)  # RE2, as config patterns: the same syntax, linear time
    except RegexError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def fraction_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def add_machine_args(p: argparse.ArgumentParser, memory: str, title: str) -> None:
    """The aging scenario of a simulated machine (see backends/sim/aging.py)."""
    g = p.add_argument_group(title)
    g.add_argument(
        "--memory", type=size_arg, default=None, metavar="SIZE",
        help=f"physical memory of the simulated machine (default {memory})",
    )  # fmt: skip
    g.add_argument(
        "--fragmentation", type=fraction_arg, default=0.7, metavar="F",
        help="unusable free space index at order 9 to age it to (default 0.7)",
    )  # fmt: skip
    g.add_argument(
        "--unmovable", type=fraction_arg, default=0.02, metavar="F",
        help="fraction of frames held by the kernel, unmovable (default 0.02)",
    )  # fmt: skip
    g.add_argument(
        "--unmovable-layout", choices=["scattered", "clustered"], default="scattered",
        help="scattered: a few kernel pages in many pageblocks (default); clustered: "
        "whole unmovable pageblocks",
    )  # fmt: skip
    g.add_argument(
        "--free", type=fraction_arg, default=0.25, metavar="F",
        help="fraction of memory left free after aging (default 0.25)",
    )  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="aging seed (default 0)")


def machine_scenario(args: argparse.Namespace, memory: int):  # -> backends.sim.aging.Scenario
    from ..backends.sim.aging import Scenario

    return Scenario(
        memory=args.memory if args.memory is not None else memory,
        fragmentation=args.fragmentation,
        unmovable=args.unmovable,
        unmovable_layout=args.unmovable_layout,
        free=args.free,
        seed=args.seed,
    )

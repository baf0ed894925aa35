"""What several commands share: argument types, the options of a simulated machine, and a
progress bar."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO, TypeAlias

from ..config import SimulatedSettings
from ..config.kinds import Choice, Number, Records, Size
from ..config.walk import Kind, read_text, settings_of
from ..pipeline.targets import Regex, RegexError
from ..units import parse_size

# what cli.py hands each command's set_argparser() (a string: not generic at run time)
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

if TYPE_CHECKING:  # the simulator pulls in numpy: imported only where a command needs it
    from ..backends.sim.aging import Scenario


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


def add_machine_args(p: argparse.ArgumentParser, title: str, memory: int | None = None) -> None:
    """One option per setting of the config's `daemon.simulated` (config/schema.py: the
    same help, syntax, bounds and default), but its list of processes: a machine from the
    command line runs the aging's default workload. `memory`: this command's default size,
    where it is not the config's (`simulate` studies a bigger machine)."""
    g = p.add_argument_group(title)
    for s in settings_of(SimulatedSettings):
        if isinstance(s.kind, Records):
            continue
        default = s.default
        if s.name == "memory":  # None: not given (`report` refuses it without --simulated)
            default = memory or s.default
            p.set_defaults(machine_memory=default)
        g.add_argument(
            "--" + s.name.replace("_", "-"),
            # A size is judged by the machine it builds (Scenario.validate), which says
            # why one cannot be built; any other value out of bounds is a usage error here.
            type=size_arg if isinstance(s.kind, Size) else _reader(s.kind),
            choices=list(s.kind.enum) if isinstance(s.kind, Choice) else None,
            default=None if s.name == "memory" else default,
            metavar=_METAVARS.get(type(s.kind), "N") if not isinstance(s.kind, Choice) else None,
            help=f"{s.help} (default {s.kind.show(default)})",
        )


_METAVARS: dict[type, str] = {Size: "SIZE", Number: "F"}


def _reader(kind: Kind) -> Callable[[str], object]:
    """An argparse type: the text read as the config file would read it."""

    def read(text: str) -> object:
        try:
            return read_text(kind, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return read


def machine_scenario(args: argparse.Namespace) -> Scenario:
    """The machine the options of add_machine_args describe."""
    from ..backends.sim.aging import Scenario

    values = {s.name: getattr(args, s.name, None) for s in settings_of(SimulatedSettings)}
    if values["memory"] is None:
        values["memory"] = args.machine_memory
    return Scenario(**{name: value for name, value in values.items() if value is not None})


def progress_bar(
    stream: TextIO = sys.stderr, min_seconds: float = 0.0
) -> Callable[[float, str], None]:
    """``show(fraction, label)``: a one-line bar, redrawn in place, shown only on a terminal
    (a pipe or a log gets nothing) and only once a run has lasted ``min_seconds`` (a quick
    run stays quiet)."""
    if not stream.isatty():
        return lambda fraction, label: None
    start = time.monotonic()

    def show(fraction: float, label: str) -> None:
        if time.monotonic() - start < min_seconds and fraction < 1.0:
            return
        bar = "#" * int(fraction * 30)
        stream.write(f"\r[{bar:<30}] {fraction:4.0%} {label[:40]:<40}")
        if fraction >= 1.0:
            stream.write("\n")
        stream.flush()

    return show

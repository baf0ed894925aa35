"""`memdefragd check-config FILE`: would the daemon accept this config?"""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, load_config
from .common import Subparsers


def set_argparser(sub: Subparsers) -> None:
    chk = sub.add_parser("check-config", help="validate a configuration file and exit")
    chk.add_argument("file", help="the YAML file to check")
    chk.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """0 if the daemon would accept the file (the same checks: where it lies, owner, mode,
    size, schema), 2 with every problem found if not. It runs as root on whatever path it
    is given, so it never prints what the file says, only where and what kind of value."""
    try:
        cfg = load_config(args.file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    except Exception as e:  # a bug: its message or traceback might quote the file
        print(
            f"{args.file}: could not be checked: internal error ({type(e).__name__}); "
            "please report it",
            file=sys.stderr,
        )
        return 1
    print(
        f"{args.file}: OK, {len(cfg.targets)} target(s): " + ", ".join(t.name for t in cfg.targets)
    )
    return 0

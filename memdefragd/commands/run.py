"""`memdefragd run`: the daemon, in the foreground (systemd runs it so)."""

from __future__ import annotations

import argparse
import sys

from ..config import DEFAULT_PATH, ConfigError, load_config
from .common import Subparsers


def set_argparser(sub: Subparsers) -> None:
    run = sub.add_parser(
        "run",
        help="run the daemon: watch the configured targets and collapse their memory",
        description=(
            "Run the daemon in the foreground: find the processes the config's targets\n"
            "name, scan them every scan_interval, and collapse their memory into huge\n"
            "pages within the configured budgets. SIGHUP reloads the config (a bad one\n"
            "keeps the old running); SIGTERM stops within seconds."
        ),
        epilog="Needs root: CAP_SYS_ADMIN (frame numbers), CAP_SYS_PTRACE and CAP_SYS_NICE\n"
        "(process_madvise on other processes).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "-c",
        "--config",
        default=DEFAULT_PATH,
        metavar="FILE",
        help=f"configuration file (default {DEFAULT_PATH})",
    )
    run.add_argument(
        "--once",
        action="store_true",
        help="one cycle: discover, scan, carry out what the budget allows, exit",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="plan and log, but never act (as if every target were in observe mode)",
    )
    run.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    run.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import signal

    from ..daemon.logs import setup_logging
    from ..daemon.loop import Daemon, default_events

    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    daemon = Daemon(config, dry_run=args.dry_run, events=default_events())
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    return daemon.run(once=args.once)

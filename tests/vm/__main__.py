"""python -m tests.vm fetch|run [KERNEL...] [-- PYTEST ARGS]: the kernel matrix in guests.

Without kernels, the whole matrix (harness.MATRIX); without pytest arguments, each kernel
runs its own selection from the matrix (tests/kernel)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .harness import DEFAULT_CACHE, MATRIX, Apt, GuestRun, VmError, prepare, run_guest


def _table(runs: list[GuestRun]) -> str:
    lines = [
        "| kernel | package | guest uname | status | passed | failed | skipped | xfailed | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = r.counts()
        failed = c.get("failed", 0) + c.get("error", 0)
        lines.append(
            f"| {r.kernel.label} | {r.kernel.package.name} {r.kernel.package.version} | {r.guest_uname or '-'} "
            f"| {r.status} (pytest exit {r.pytest_exit}) | {c.get('passed', 0)} | {failed} "
            f"| {c.get('skipped', 0)} | {c.get('xfailed', 0)} | {r.wall:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pytest_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="python -m tests.vm", description=__doc__)
    p.add_argument("command", choices=["fetch", "run"])
    p.add_argument(
        "kernels",
        nargs="*",
        help="5.10 (Debian 11), 6.1, 6.12 (the newest Debian offers) or a linux-image-* package name",
    )
    p.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="download cache, outside the checkout"
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per guest before QEMU is killed"
    )
    p.add_argument(
        "--keep",
        type=Path,
        help="copy each guest's share (junit.xml, pytest.log, dmesg) under DIR/KERNEL",
    )
    p.add_argument("--summary", type=Path, help="write the matrix as JSON here")
    a = p.parse_intermixed_args(argv)
    try:
        host = Apt(a.cache)
        kernels = [prepare(k, a.cache, host) for k in a.kernels or MATRIX]
    except VmError as e:
        print(f"vm: {e}", file=sys.stderr)
        return 2
    for k in kernels:
        print(
            f"vm: {k.label}: {k.package.name} {k.package.version} sha256 {k.package.sha256} -> {k.vmlinuz}"
        )
    if a.command == "fetch":
        return 0
    runs: list[GuestRun] = []
    for k in kernels:
        args = pytest_args or MATRIX.get(k.label, ["tests/kernel"])
        print(f"vm: booting {k.label} ({k.kver}) for pytest {' '.join(args)}", flush=True)
        t = time.monotonic()
        try:
            r = run_guest(
                k,
                args,
                timeout=a.timeout,
                keep=a.keep / k.label if a.keep else None,
            )
        except VmError as e:
            print(f"vm: {e}", file=sys.stderr)
            return 2
        runs.append(r)
        for t_ in r.results:
            print(
                f"vm {k.label}: {t_.outcome.upper():8} {t_.nodeid}"
                + (f"  -- {t_.message[:200]}" if t_.message and t_.outcome != "passed" else "")
            )
            for name, value in t_.properties.items():
                print(f"vm {k.label}:     {name}: {value}")
        c = r.counts()
        print(
            f"vm {k.label}: {r.status}, pytest exit {r.pytest_exit}, {time.monotonic() - t:.0f} s"
        )
        if not r.ok:
            print(f"----- {k.label}: console (last 60 lines) -----")
            print("\n".join(r.console.splitlines()[-60:]))
            print(f"----- {k.label}: guest dmesg (last 120 lines) -----")
            print(
                "\n".join(r.dmesg.splitlines()[-120:]) or "(none: the guest did not get that far)"
            )
        print(
            f"vm {k.label}: {c.get('passed', 0)} passed, {c.get('failed', 0) + c.get('error', 0)} failed, {c.get('skipped', 0)} skipped",
            flush=True,
        )
    print(_table(runs))
    for r in runs:  # last, where a truncated CI log still shows them
        for t_ in r.results:
            if t_.outcome in ("failed", "error"):
                print(
                    f"vm {r.kernel.label}: {t_.outcome.upper()} {t_.nodeid}  -- {t_.message[:300]}"
                )
    if a.summary:
        a.summary.write_text(
            json.dumps(
                [
                    {
                        "kernel": r.kernel.label,
                        "package": r.kernel.package.name,
                        "version": r.kernel.package.version,
                        "sha256": r.kernel.package.sha256,
                        "uname": r.guest_uname,
                        "status": r.status,
                        "pytest_exit": r.pytest_exit,
                        "wall_seconds": round(r.wall, 1),
                        "counts": r.counts(),
                        "tests": {t.nodeid: t.outcome for t in r.results},
                    }
                    for r in runs
                ],
                indent=2,
            )
        )
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for r in runs:
        c = r.counts()
        total["passed"] += c.get("passed", 0)
        total["failed"] += c.get("failed", 0) + c.get("error", 0)
        total["skipped"] += c.get("skipped", 0)
    print(
        f"vm matrix: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped"
    )
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What the generators of committed files share: write the file, or with --check say
(with a diff) that the committed one is not what the generator writes."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path


def write_or_check(out: Path, text: str, argv: list[str], command: str) -> int:
    """Write `text` to `out`; with --check in argv, exit status 1 and a diff if `out`
    differs, naming `command` to run."""
    if "--check" not in argv:
        out.write_text(text)
        return 0
    old = out.read_text() if out.exists() else ""
    if old == text:
        return 0
    sys.stdout.writelines(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            text.splitlines(keepends=True),
            f"{out.name} (committed)",
            f"{out.name} (generated)",
        )
    )
    print(f"{out} is out of date: {command}", file=sys.stderr)
    return 1

"""Writes docs/configuration.md, the settings reference, from the declarations in
memdefragd/config/schema.py: one table per section, every setting with its kind, bounds,
default and help.

    python3 -m tools.configuration_doc           # rewrite docs/configuration.md
    python3 -m tools.configuration_doc --check   # exit 1 if it is out of date

tests/config/test_schema.py fails when the committed file is not what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memdefragd.config.kinds import Nullable
from memdefragd.config.schema import OVERRIDES, ROOT
from memdefragd.config.walk import REQUIRED, Setting, sections
from tools.generated import write_or_check

OUT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

HEAD = """\
# Configuration reference

<!-- Written by tools/configuration_doc.py from memdefragd/config/schema.py: edit those,
then run `python3 -m tools.configuration_doc`. -->

Every setting of `/etc/memdefragd/memdefragd.yaml`, from the one place each is declared
(`memdefragd/config/schema.py`), which also drives the loader, the per-target overrides
and the scheduler. [etc/memdefragd.yaml](../etc/memdefragd.yaml) is a commented example
with every daemon setting at its default. `memdefragd check-config FILE` checks a file:
errors name the file, line and key, all at once; unknown and duplicate keys are errors.

Sizes: 4096, 512K, 256MiB, 1G (at most 1 EiB). Durations: 500ms, 30s, 5m, 1h (a bare
number is seconds; at most 365d). Shares: 5% or 0.05. A dotted key is a key of a nested
mapping: `budget.cpu_share` is `budget: {cpu_share: ...}`.
"""


def _default(s: Setting) -> str:
    if s.default is REQUIRED:
        return "required"
    if hasattr(s.kind, "settings"):
        return "see below"
    if s.default is None and not isinstance(s.kind, Nullable):
        return "none"  # not given: not checked
    return f"`{s.kind.show(s.default)}`"


def _row(s: Setting, overrides: bool) -> str:
    meaning = s.help if s.help.endswith(".") else s.help + "."
    if s.per_target and not overrides:
        meaning += " A target may override it."
    default = "the daemon's" if overrides else _default(s)
    cells = [f"`{s.key}`", s.kind.describe(), default, meaning]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def render() -> str:
    """The whole reference, as Markdown."""
    paths: dict[int, list[str]] = {}  # a section shared by two paths (match, exclude[])
    tables: list[tuple[Setting, ...]] = []
    for path, settings in sections(ROOT):
        if id(settings) not in paths:
            paths[id(settings)] = []
            tables.append(settings)
        paths[id(settings)].append(f"`{path}`" if path else "Top level")
    out = [HEAD]
    for settings in tables:
        out += [f"\n## {', '.join(paths[id(settings)])}\n", "| Key | Value | Default | Meaning |"]
        out += ["|---|---|---|---|", *(_row(s, settings is OVERRIDES) for s in settings)]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    return write_or_check(OUT, render(), argv, "python3 -m tools.configuration_doc")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""commands/common.py: the progress bar the long-running commands share."""

from __future__ import annotations

import io

from memdefragd.commands.common import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_is_silent_off_a_terminal():
    stream = io.StringIO()
    show = progress_bar(stream)
    show(0.5, "half")
    show(1.0, "done")
    assert stream.getvalue() == ""


def test_progress_bar_redraws_one_line_and_ends_it():
    stream = Terminal()
    show = progress_bar(stream)
    show(0.5, "1.0 MiB of 2.0 MiB")
    show(1.0, "2.0 MiB of 2.0 MiB")
    first, second = stream.getvalue().split("\r")[1:]
    assert first == f"[{'#' * 15:<30}]  50% {'1.0 MiB of 2.0 MiB':<40}"
    assert second == f"[{'#' * 30}] 100% {'2.0 MiB of 2.0 MiB':<40}\n"


def test_progress_bar_waits_min_seconds_but_always_shows_the_end():
    stream = Terminal()
    show = progress_bar(stream, min_seconds=3600)
    show(0.5, "aging")
    assert stream.getvalue() == ""
    show(1.0, "done")
    assert stream.getvalue().endswith("done" + " " * 36 + "\n")

"""Target matching: pure predicates over ProcessInfo."""

from __future__ import annotations

import re

import pytest

from memdefragd.model import ProcessInfo
from memdefragd.pipeline.targets import (
    MAX_CMDLINE,
    Matcher,
    Regex,
    RegexError,
    Target,
    cmdline_text,
    in_cgroup,
    select,
)

REDIS = ProcessInfo(
    pid=42, comm="redis-server", cmdline=("/usr/bin/redis-server", "127.0.0.1:6379"),
    exe="/usr/bin/redis-server", uid=105, cgroup="/system.slice/redis-server.service",
    start_time=7, rss=512 << 20,
)  # fmt: skip


@pytest.mark.parametrize(
    ("path", "ancestor", "inside"),
    [
        ("/system.slice/redis.service", "/system.slice", True),
        ("/system.slice/redis.service", "/system.slice/", True),
        ("/system.slice/redis.service", "system.slice", True),
        ("/system.slice/redis.service", "/system.slice/redis.service", True),
        ("/system.slice/redis.service2", "/system.slice/redis.service", False),
        ("/system.slicex/a", "/system.slice", False),
        ("/anything", "/", True),
        ("", "/a", False),
    ],
)
def test_in_cgroup(path, ancestor, inside):
    assert in_cgroup(path, ancestor) is inside


@pytest.mark.parametrize(
    ("matcher", "hit"),
    [
        (Matcher(), True),
        (Matcher(comm=re.compile("^redis")), True),
        (Matcher(comm=re.compile("^server")), False),
        (Matcher(cmdline=re.compile(r"127\.0\.0\.1:6379")), True),
        (Matcher(exe="/usr/bin/redis-*"), True),
        (Matcher(exe="/usr/sbin/*"), False),
        (Matcher(uids=frozenset({105})), True),
        (Matcher(uids=frozenset({0})), False),
        (Matcher(cgroup="/system.slice"), True),
        (Matcher(unit="redis-server.service"), True),
        (Matcher(unit="redis.service"), False),
        (Matcher(pids=frozenset({42, 43})), True),
        (Matcher(pids=frozenset({43})), False),
        (Matcher(comm=re.compile("redis"), pids=frozenset({43})), False),  # every key must hold
    ],
)
def test_matcher(matcher, hit):
    assert matcher.matches(REDIS) is hit


def test_deleted_executable_still_matches_its_path():
    upgraded = ProcessInfo(**{**_fields(REDIS), "exe": "/usr/bin/redis-server (deleted)"})
    assert Matcher(exe="/usr/bin/redis-server").matches(upgraded)


def test_target_min_rss_exclude_and_first_target_wins():
    small = ProcessInfo(**{**_fields(REDIS), "pid": 7, "rss": 1 << 20})
    sh = ProcessInfo(**{**_fields(REDIS), "pid": 8, "comm": "sh"})
    big = Target("big", min_rss=256 << 20, exclude=(Matcher(comm=re.compile("^sh$")),))
    rest = Target("rest")
    assert select([REDIS, small, sh], [big, rest]) == [(REDIS, big), (small, rest), (sh, rest)]
    assert select([small], [big]) == []


def _fields(p: ProcessInfo) -> dict:
    return {name: getattr(p, name) for name in ProcessInfo.__slots__}


# ---------------------------------------------------------------- hostile input


def _with_cmdline(*args: str) -> ProcessInfo:
    return ProcessInfo(**{**_fields(REDIS), "cmdline": args})


def test_catastrophic_patterns_match_in_linear_time():
    """Patterns that make a backtracking engine run for ever (Python's `re` takes years on
    the first, minutes on the second) give their answer at once: a hang fails the test."""
    assert Regex("(a+)+$").search("a" * 100_000 + "b") is None
    assert Regex("(a+)+$").search("a" * 100_000)
    nested = Matcher(cmdline=Regex("(a+)+$"))
    assert not nested.matches(_with_cmdline("a" * 40 + "b"))
    assert nested.matches(_with_cmdline("a" * 40))
    queue = Matcher(cmdline=Regex("python.*worker.*queue"))
    assert not queue.matches(_with_cmdline("python", *["worker"] * 12_000))  # 84 KB
    assert queue.matches(_with_cmdline("python", "worker", "queue"))


def test_exe_globs_cannot_backtrack_on_a_long_path():
    """fnmatch's translation (atomic groups since Python 3.11) is linear too."""
    assert not Matcher(exe="*a*a*a*a*a*a*a*a*a*a*a*a*b").matches(
        ProcessInfo(**{**_fields(REDIS), "exe": "/" + "a" * 4094})
    )


def test_a_pattern_sees_only_the_first_max_cmdline_bytes():
    head = "x" * (MAX_CMDLINE - len("needle"))
    assert Matcher(cmdline=Regex("needle")).matches(_with_cmdline(head + "needle"))
    assert not Matcher(cmdline=Regex("needle")).matches(_with_cmdline(head + "xneedle"))
    assert not Matcher(cmdline=Regex("needle")).matches(_with_cmdline(head, "needle"))
    # `$` anchors at the cut, not at the real end of a longer command line.
    assert not Matcher(cmdline=Regex("tail$")).matches(_with_cmdline("a" * MAX_CMDLINE, "tail"))
    assert Matcher(cmdline=Regex("a$")).matches(_with_cmdline("a" * MAX_CMDLINE, "tail"))
    assert len(cmdline_text(("a" * MAX_CMDLINE, "b" * MAX_CMDLINE))) == MAX_CMDLINE


def test_text_that_is_not_utf8_is_matched_not_raised():
    """/proc text keeps bytes that are not UTF-8 as surrogate escapes; a pattern sees '?'."""
    p = _with_cmdline("worker\udcff", "queue")
    assert Matcher(cmdline=Regex("worker. queue$")).matches(p)
    assert Matcher(comm=Regex("^w")).matches(ProcessInfo(**{**_fields(REDIS), "comm": "w\udcff"}))


@pytest.mark.parametrize(
    ("pattern", "what"),
    [
        (r"(sec)ret\1", "a backreference"),
        (r"(?P<s>sec)ret(?P=s)", "a named backreference"),
        (r"secret(?=x)", "a lookahead"),
        (r"secret(?!x)", "a negative lookahead"),
        (r"(?<=x)secret", "a lookbehind"),
        (r"(?<!x)secret", "a negative lookbehind"),
        (r"(?>secret)", "an atomic group"),
        (r"secret++", "a possessive quantifier"),
        (r"secret\Z", r"\Z"),
        (r"secret{1001}", "a repetition count over 1000"),
        (r"(?x)secret", "a (?...) group or flag"),
    ],
)
def test_what_re2_cannot_express_is_refused_saying_what_without_quoting(pattern, what):
    with pytest.raises(RegexError) as info:
        Regex(pattern)
    msg = str(info.value)
    assert msg.startswith(f"unsupported regular expression: it uses {what}"), msg
    assert "RE2" in msg and "secret" not in msg


@pytest.mark.parametrize(
    ("pattern", "what"),
    [
        ("secret(", "missing )"),
        ("[z-a]secret", "invalid character class range"),
        ("*secret", "no argument for repetition operator"),
    ],
)
def test_syntax_errors_say_what_without_quoting(pattern, what, capfd):
    with pytest.raises(RegexError, match=r"^bad regular expression: ") as info:
        Regex(pattern)
    assert str(info.value) == f"bad regular expression: {what}"
    assert "secret" not in capfd.readouterr().err  # RE2's own logging is off


def test_equal_patterns_make_equal_targets():
    """A config reload compiles its patterns again: an unchanged target must compare equal
    (else every tracked process would count as retargeted)."""
    assert Target("t", Matcher(comm=Regex("^a"))) == Target("t", Matcher(comm=Regex("^a")))
    assert Regex("^a") != Regex("^b") and len({Regex("x"), Regex("x")}) == 1


def test_select_stops_between_processes_when_told():
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    assert select([REDIS] * 10, [Target("any")], should_stop) == [(REDIS, Target("any"))] * 2

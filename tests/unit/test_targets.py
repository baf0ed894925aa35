"""Target matching: pure predicates over ProcessInfo."""

from __future__ import annotations

import re

import pytest

from memdefragd.model import ProcessInfo
from memdefragd.targets import Matcher, Target, in_cgroup, select

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

"""Config loading: what users get when they write it right, and when they write it wrong."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path

import pytest

from memdefragd.config import ConfigError, load_config, parse_config
from memdefragd.model import ProcessInfo

REPO = Path(__file__).resolve().parents[2]


def proc(**kw) -> ProcessInfo:
    base = dict(
        pid=100, comm="redis-server", cmdline=("redis-server", "*:6379"), exe="/usr/bin/redis",
        uid=0, cgroup="/system.slice/redis.service", start_time=1, rss=1 << 30,
    )  # fmt: skip
    base.update(kw)
    return ProcessInfo(**base)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "m.yaml")
    return info.value.errors


def test_example_config_is_valid_and_means_what_it_says():
    cfg = load_config(REPO / "etc" / "memdefragd.yaml", check_owner=False)
    names = [t.name for t in cfg.targets]
    assert names == ["databases", "batch", "jvm", "large"]
    db, batch, jvm, large = cfg.targets
    assert batch.matches(proc(comm="spark-worker")) and not batch.matches(proc())
    assert db.matches(proc()) and db.priority == 10 and db.mode == "enforce"
    assert not db.matches(proc(rss=100 << 20))  # under min_rss 256MiB
    assert jvm.mode == "observe"
    java = proc(comm="java", exe="/usr/lib/jvm/java-17-openjdk-amd64/bin/java", rss=2 << 30)
    assert jvm.matches(java)
    assert not jvm.matches(dataclasses.replace(java, cmdline=("java", "jdk.jshell")))
    assert large.matches(proc(comm="anything", rss=5 << 30))
    assert not large.matches(proc(comm="anything", rss=3 << 30))


def test_full_target_parses():
    cfg = parse_config(
        textwrap.dedent(
            """
            targets:
              - name: web
                match: {cmdline: 'gunicorn', user: [root, 0], cgroup: /system.slice, pid: [100, 101]}
                exclude: [{comm: '^sh$'}, {unit: other.service}]
                min_rss: 64M
                mode: observe
                priority: -3
            """
        )
    )
    (t,) = cfg.targets
    assert (t.name, t.min_rss, t.mode, t.priority) == ("web", 64 << 20, "observe", -3)
    assert t.match.uids == frozenset({0}) and t.match.pids == frozenset({100, 101})
    assert t.matches(proc(cmdline=("gunicorn", "app")))
    assert not t.matches(proc(cmdline=("gunicorn",), comm="sh"))
    assert not t.matches(proc(cmdline=("gunicorn",), cgroup="/system.slice/other.service"))
    assert not t.matches(proc(cmdline=("gunicorn",), pid=7))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("targets:\n  - name: a\n    nmae: b\n", "m.yaml:3: targets[0].nmae: unknown key"),
        ("targets:\n  - name: a\n    name: b\n", "m.yaml:3: targets[0].name: duplicate key (first given on line 2)"),
        ("targets:\n  - name: a\n    match: {comm: '(('}\n", "m.yaml:3: targets[0].match.comm: bad regular expression"),
        ("targets:\n  - name: a\n    priority: high\n", "m.yaml:3: targets[0].priority: expected an integer, got str 'high'"),
        ("targets:\n  - name: a\n    min_rss: lots\n", "m.yaml:3: targets[0].min_rss: expected a size"),
        ("targets:\n  - name: a\n    mode: fix\n", "m.yaml:3: targets[0].mode: expected one of enforce, observe"),
        ("targets:\n  - name: a\n    match: {user: nosuchuser-xyz}\n", "no such user 'nosuchuser-xyz'"),
        ("targets:\n  - name: a\n    match: {exe: bin/java}\n", "m.yaml:3: targets[0].match.exe: expected an absolute path"),
        ("targets:\n  - name: a\n    match: {pid: -4}\n", "expected a positive pid"),
        ("targets:\n  - name: a\n  - name: a\n", "m.yaml:3: targets[1].name: duplicate target name 'a' (first on line 2)"),
        ("targets:\n  - match: {comm: x}\n", "m.yaml:2: targets[0].name: missing"),
        ("targets: {}\n", "m.yaml:1: targets: expected a list"),
        ("target:\n  - name: a\n", "m.yaml:1: target: unknown key; expected one of: daemon, targets"),
        ("targets:\n  - name: [a\n", "YAML syntax: expected ',' or ']'"),
        ("targets:\n  - name: [a\n", "(while parsing a flow sequence at line 2)"),
        ("", "the file is empty"),
    ],
)  # fmt: skip
def test_errors_say_what_and_where(text, expected):
    errs = errors_of(text)
    assert any(expected in e for e in errs), errs


def test_all_errors_are_reported_at_once():
    errs = errors_of(
        """
        targets:
          - name: a
            mode: x
          - name: b
            priority: y
        """
    )
    assert len(errs) == 2
    assert errs[0].startswith("m.yaml:4:") and errs[1].startswith("m.yaml:6:")


def test_world_writable_config_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("targets: []\n")
    os.chmod(f, 0o666)
    with pytest.raises(ConfigError, match=r"writable by other users.*chmod go-w"):
        load_config(f)
    os.chmod(f, 0o644)
    assert load_config(f).targets == ()


def test_missing_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read: No such file"):
        load_config(tmp_path / "nope.yaml")


def test_example_daemon_section_equals_the_defaults():
    """The example config documents every daemon key with its default: keep them equal."""
    from memdefragd.config import DaemonSettings

    cfg = load_config(REPO / "etc" / "memdefragd.yaml", check_owner=False)
    assert cfg.daemon == DaemonSettings()
    assert cfg.overrides["databases"].duty_cycle == 0.02
    assert cfg.overrides["batch"].latency_sensitive is False
    assert len(cfg.sha256) == 64


def test_daemon_settings_parse():
    cfg = parse_config(
        textwrap.dedent(
            """
            daemon:
              scan_interval: 500ms
              budget: {bytes_per_second: 1G, cpu_share: 0.25}
              chunk: 8MiB
              cooldown: 2m
              backoff: {initial: 1s, max: 1h}
              pressure: {psi_some_avg10: 2.5, min_available: 512M}
              compaction: {enabled: true, min_interval: 5m}
              ranger: {syscall: 335}
            targets:
              - name: t
                overrides: {method: ranger, cooldown: 10s}
            """
        )
    )
    d = cfg.daemon
    assert (d.scan_interval, d.bytes_per_second, d.cpu_share, d.chunk) == (
        0.5,
        1 << 30,
        0.25,
        8 << 20,
    )
    assert (d.cooldown, d.backoff_initial, d.backoff_max) == (120.0, 1.0, 3600.0)
    assert (d.psi_some_avg10, d.min_available, d.compaction, d.compaction_interval) == (
        2.5,
        512 << 20,
        True,
        300.0,
    )
    assert d.ranger_syscall == 335
    assert cfg.overrides["t"].method == "ranger" and cfg.overrides["t"].cooldown == 10.0


def test_pacing_and_access_parse():
    cfg = parse_config(
        textwrap.dedent(
            """
            daemon:
              pacing: {latency_sensitive: false, duty_cycle: 10%, max_pause: 250ms}
              access: {source: referenced, untouched: skip}
            targets:
              - name: db
                overrides: {duty_cycle: 0.02}
              - name: batch
                overrides: {latency_sensitive: false}
            """
        )
    )
    d = cfg.daemon
    assert (d.latency_sensitive, d.duty_cycle, d.max_pause) == (False, 0.1, 0.25)
    assert (d.access_source, d.access_untouched) == ("referenced", "skip")
    assert cfg.overrides["db"].duty_cycle == 0.02
    assert cfg.overrides["batch"].latency_sensitive is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("daemon: {backend: qemu}\ntargets: []\n", "m.yaml:1: daemon.backend: expected one of kernel, simulated, got str 'qemu'"),
        ("daemon:\n  simulated: {memory: 1M}\ntargets: []\n", "m.yaml:2: daemon.simulated.memory: must be at least 67108864 bytes"),
        ("daemon:\n  simulated: {fragmentation: 2}\ntargets: []\n", "daemon.simulated.fragmentation: expected a number from 0 to 1, got int 2"),
        ("daemon:\n  simulated: {unmovable_layout: spread}\ntargets: []\n", "daemon.simulated.unmovable_layout: expected one of scattered, clustered"),
        ("daemon:\n  simulated: {processes: [{comm: db}]}\ntargets: []\n", "daemon.simulated.processes[0]: needs comm (process name) and heap (size)"),
        ("daemon:\n  simulated: {processes: [{comm: db, heap: 1G, count: 0}]}\ntargets: []\n", "daemon.simulated.processes[0].count: must be at least 1, got 0"),
        ("daemon:\n  simulated: {seed: -1}\ntargets: []\n", "daemon.simulated.seed: must be at least 0, got -1"),
        ("daemon: {method: defrag}\ntargets: []\n", "m.yaml:1: daemon.method: expected one of collapse, ranger, ranger-improved, compaction"),
        ("daemon:\n  scan_interval: soon\ntargets: []\n", "m.yaml:2: daemon.scan_interval: expected a duration"),
        ("daemon:\n  scan_interval: 0\ntargets: []\n", "m.yaml:2: daemon.scan_interval: must be at least 0.1s"),
        ("daemon:\n  chunk: 3MiB\ntargets: []\n", "m.yaml:2: daemon.chunk: must be a multiple of 2MiB and at most 64MiB"),
        ("daemon:\n  chunk: 128MiB\ntargets: []\n", "daemon.chunk: must be a multiple of 2MiB and at most 64MiB"),
        ("daemon:\n  budget: {cpu_share: 2}\ntargets: []\n", "m.yaml:2: daemon.budget.cpu_share: expected a number from 0.001 to 1, got int 2"),
        ("daemon:\n  budget: {bytes: 1G}\ntargets: []\n", "m.yaml:2: daemon.budget.bytes: unknown key; expected one of: bytes_per_second, cpu_share"),
        ("daemon:\n  backoff: {initial: 1m, max: 1s}\ntargets: []\n", "m.yaml:2: daemon.backoff: max must not be below initial"),
        ("daemon:\n  compaction: {enabled: yes please}\ntargets: []\n", "daemon.compaction.enabled: expected true or false"),
        ("daemon:\n  ranger: {syscall: '335'}\ntargets: []\n", "daemon.ranger.syscall: expected an integer"),
        ("daemon:\n  pressure: {psi_some_avg10: 150}\ntargets: []\n", "daemon.pressure.psi_some_avg10: expected a number from 0 to 100"),
        ("targets:\n  - name: a\n    overrides: {chunk: 1K}\n", "m.yaml:3: targets[0].overrides.chunk: must be at least 2097152 bytes"),
        ("targets:\n  - name: a\n    overrides: {budget: 1}\n", "m.yaml:3: targets[0].overrides.budget: unknown key; expected one of: method, chunk, cooldown, latency_sensitive, duty_cycle"),
        ("targets:\n  - name: a\n    overrides: {duty_cycle: 0%}\n", "targets[0].overrides.duty_cycle: expected a share such as 5% or 0.05 (above 0, at most 100%), got str '0%'"),
        ("daemon:\n  pacing: {duty_cycle: 1.5}\ntargets: []\n", "m.yaml:2: daemon.pacing.duty_cycle: expected a share such as 5% or 0.05"),
        ("daemon:\n  pacing: {latency_sensitive: maybe}\ntargets: []\n", "daemon.pacing.latency_sensitive: expected true or false"),
        ("daemon:\n  access: {source: perf}\ntargets: []\n", "daemon.access.source: expected one of auto, damon, referenced, off"),
        ("daemon:\n  access: {untouched: never}\ntargets: []\n", "daemon.access.untouched: expected one of skip, last"),
        ("daemon:\n  chunk: 8M\n  chunk: 16M\ntargets: []\n", "m.yaml:3: daemon.chunk: duplicate key (first given on line 2)"),
    ],
)  # fmt: skip
def test_daemon_errors_say_what_and_where(text, expected):
    errs = errors_of(text)
    assert any(expected in e for e in errs), errs


def test_simulated_section_is_read_whole():
    cfg = parse_config(
        textwrap.dedent(
            """\
            daemon:
              backend: simulated
              method: ranger-improved
              simulated:
                memory: 2G
                nodes: 2
                fragmentation: 0.5
                unmovable: 0.01
                unmovable_layout: clustered
                free: 0.3
                seed: 7
                processes:
                  - {comm: simdb, heap: 512M, count: 2}
                  - {comm: cold, heap: 64M, thp: false}
            targets:
              - name: t
            """
        )
    )
    d = cfg.daemon
    assert (d.backend, d.method) == ("simulated", "ranger-improved")
    s = d.simulated
    assert (s.memory, s.nodes, s.fragmentation, s.unmovable) == (2 << 30, 2, 0.5, 0.01)
    assert (s.unmovable_layout, s.free, s.seed) == ("clustered", 0.3, 7)
    assert [(p.comm, p.heap, p.thp, p.count) for p in s.processes] == [
        ("simdb", 512 << 20, True, 2),
        ("cold", 64 << 20, False, 1),
    ]
    # Only what fixes the machine takes part in the reload check.
    assert d.backend_key() == ("simulated", s)
    assert parse_config("targets: []\n").daemon.backend_key() == ("kernel", None)

"""Config loading: what users get when they write it right, and when they write it wrong."""

from __future__ import annotations

import dataclasses
import os
import textwrap

import pytest

from memdefragd.config import ConfigError, load_config, parse_config
from memdefragd.model import ProcessInfo
from tests.paths import REPO


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
        ("targets:\n  - name: a\n    priority: high\n", "m.yaml:3: targets[0].priority: expected an integer from -1000 to 1000, got a string"),
        ("targets:\n  - name: a\n    min_rss: lots\n", "m.yaml:3: targets[0].min_rss: expected a size"),
        ("targets:\n  - name: a\n    mode: fix\n", "m.yaml:3: targets[0].mode: expected one of enforce, observe"),
        ("targets:\n  - name: a\n    match: {user: nosuchuser-xyz}\n", "m.yaml:3: targets[0].match.user: no such user on this machine at column 19; check the name, or give the uid"),
        ("targets:\n  - name: a\n    match: {exe: bin/java}\n", "m.yaml:3: targets[0].match.exe: expected an absolute path"),
        ("targets:\n  - name: a\n    match: {pid: -4}\n", "m.yaml:3: targets[0].match.pid: expected a pid from 1 to 4194304, got one outside that range at column 18"),
        ("targets:\n  - name: a\n  - name: a\n", "m.yaml:3: targets[1].name: duplicate target name (first on line 2)"),
        ("targets:\n  - match: {comm: x}\n", "m.yaml:2: targets[0].name: missing"),
        ("targets: {}\n", "m.yaml:1: targets: expected a list"),
        ("target:\n  - name: a\n", "m.yaml:1: target: unknown key; expected one of: daemon, targets"),
        ("targets:\n  - name: [a\n", "m.yaml:3:1: YAML syntax: "),
        ("targets:\n  - name: [a\n", "expected ',' or ']'"),
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
        ("daemon: {backend: qemu}\ntargets: []\n", "m.yaml:1: daemon.backend: expected one of kernel, simulated, got a string"),
        ("daemon:\n  simulated: {memory: 1M}\ntargets: []\n", "m.yaml:2: daemon.simulated.memory: must be at least 67108864 bytes"),
        ("daemon:\n  simulated: {fragmentation: 2}\ntargets: []\n", "daemon.simulated.fragmentation: expected a number from 0 to 1, got one outside that range"),
        ("daemon:\n  simulated: {unmovable_layout: spread}\ntargets: []\n", "daemon.simulated.unmovable_layout: expected one of scattered, clustered"),
        ("daemon:\n  simulated: {processes: [{comm: db}]}\ntargets: []\n", "daemon.simulated.processes[0]: needs comm (process name) and heap (size)"),
        ("daemon:\n  simulated: {processes: [{comm: db, heap: 1G, count: 0}]}\ntargets: []\n", "daemon.simulated.processes[0].count: expected an integer from 1 to 10000, got one outside that range"),
        ("daemon:\n  simulated: {seed: -1}\ntargets: []\n", "daemon.simulated.seed: expected an integer from 0 to 4294967295, got one outside that range"),
        ("daemon: {method: defrag}\ntargets: []\n", "m.yaml:1: daemon.method: expected one of collapse, ranger, ranger-improved, compaction"),
        ("daemon:\n  scan_interval: soon\ntargets: []\n", "m.yaml:2: daemon.scan_interval: expected a duration"),
        ("daemon:\n  scan_interval: 0\ntargets: []\n", "m.yaml:2: daemon.scan_interval: must be at least 0.1s"),
        ("daemon:\n  chunk: 3MiB\ntargets: []\n", "m.yaml:2: daemon.chunk: must be a multiple of 2MiB and at most 64MiB"),
        ("daemon:\n  chunk: 128MiB\ntargets: []\n", "daemon.chunk: must be a multiple of 2MiB and at most 64MiB"),
        ("daemon:\n  budget: {cpu_share: 2}\ntargets: []\n", "m.yaml:2: daemon.budget.cpu_share: expected a number from 0.001 to 1, got one outside that range"),
        ("daemon:\n  budget: {bytes: 1G}\ntargets: []\n", "m.yaml:2: daemon.budget.bytes: unknown key; expected one of: bytes_per_second, cpu_share"),
        ("daemon:\n  backoff: {initial: 1m, max: 1s}\ntargets: []\n", "m.yaml:2: daemon.backoff: max must not be below initial"),
        ("daemon:\n  compaction: {enabled: yes please}\ntargets: []\n", "daemon.compaction.enabled: expected true or false"),
        ("daemon:\n  ranger: {syscall: '335'}\ntargets: []\n", "daemon.ranger.syscall: expected an integer"),
        ("daemon:\n  pressure: {psi_some_avg10: 150}\ntargets: []\n", "daemon.pressure.psi_some_avg10: expected a number from 0 to 100"),
        ("targets:\n  - name: a\n    overrides: {chunk: 1K}\n", "m.yaml:3: targets[0].overrides.chunk: must be at least 2097152 bytes"),
        ("targets:\n  - name: a\n    overrides: {budget: 1}\n", "m.yaml:3: targets[0].overrides: unknown key at column 17; expected one of: method, chunk, cooldown, latency_sensitive, duty_cycle"),
        ("targets:\n  - name: a\n    overrides: {duty_cycle: 0%}\n", "targets[0].overrides.duty_cycle: expected a share such as 5% or 0.05 (above 0, at most 100%), got one outside that range"),
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


def test_patterns_re2_cannot_express_are_refused_at_their_line_without_quoting():
    """Backreferences and lookarounds need a backtracking engine, which a hostile command
    line can stall for ever: refused at load, at file:line, saying what to do instead."""
    errs = errors_of(
        r"""
        targets:
          - name: a
            match: {comm: '^(x)y\1$'}
          - name: b
            match:
              cmdline: 'secret(?!-test)'
          - name: c
            match: {cmdline: '(a+)+$'}
            exclude: {comm: '(?<=z)w'}
        """
    )
    assert len(errs) == 3, errs
    assert errs[0].startswith("m.yaml:4: targets[0].match.comm: unsupported regular "
                              "expression: it uses a backreference")  # fmt: skip
    assert errs[1].startswith("m.yaml:7: targets[1].match.cmdline: unsupported regular "
                              "expression: it uses a negative lookahead")  # fmt: skip
    assert "exclude:" in errs[1]  # what to do instead
    assert errs[2].startswith("m.yaml:10: targets[2].exclude.comm: unsupported regular "
                              "expression: it uses a lookbehind")  # fmt: skip
    assert not any("secret" in e or "(x)" in e or "z)w" in e for e in errs)
    # What RE2 can express loads, and matches in linear time ('(a+)+$' included).
    cfg = parse_config("targets:\n  - name: c\n    match: {cmdline: '(a+)+$'}\n")
    assert not cfg.targets[0].matches(proc(cmdline=("a" * 40 + "b",)))
    assert cfg.targets[0].matches(proc(cmdline=("a" * 40,)))


# ---------------------------------------------------------------- hostile files

# What a file that is not ours might hold: no part of it may reach an error message.
SECRET = "zqxj7_vwkpfm9b"  # an identifier, so that it is tried as a key too
HOSTILE = [
    f"{SECRET}\n",
    f"root:{SECRET}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
    f"{SECRET}: 1\n",
    f"password: {SECRET}\n",
    f"targets:\n  - name: a\n    {SECRET}: 1\n",
    f"targets:\n  - name: a\n    priority: {SECRET}\n",
    f"targets:\n  - name: a\n    mode: {SECRET}\n",
    f"targets:\n  - name: a\n    min_rss: {SECRET}\n",
    f"targets:\n  - name: a\n    match: {{user: {SECRET}}}\n",
    f"targets:\n  - name: a\n    match: {{exe: {SECRET}}}\n",
    f"targets:\n  - name: a\n    match: {{pid: [{SECRET}]}}\n",
    f"targets:\n  - name: {SECRET}\n  - name: {SECRET}\n",
    f"targets:\n  - name: a\n    overrides: {{duty_cycle: {SECRET}, method: {SECRET}}}\n",
    f"daemon: {{backend: {SECRET}}}\ntargets: []\n",
    f"daemon: {{scan_interval: {SECRET}}}\ntargets: []\n",
    f"daemon: {{budget: {{cpu_share: {SECRET}}}}}\ntargets: []\n",
    f"daemon: {{pacing: {{latency_sensitive: {SECRET}}}}}\ntargets: []\n",
    f"daemon: {{access: {{source: {SECRET}}}}}\ntargets: []\n",
    f"daemon: {{metrics: {{listen: '{SECRET}:9847'}}}}\ntargets: []\n",
    f"daemon: {{metrics: {{listen: '{SECRET}'}}}}\ntargets: []\n",
    f"targets:\n  - name: !{SECRET} x\n",
    f"targets:\n  - name: !!int {SECRET}\n",
    f"targets: *{SECRET}\n",
    f"a: &{SECRET} 1\nb: &{SECRET} 2\n",
    f"!{SECRET}! a: b\n",
    f"a: @{SECRET}\n",
    f"targets: [{SECRET}\n",
    f"key: '{SECRET}\n",
    f'key: "\\q{SECRET}"\n',
    f"a:\n  - {SECRET}\n b: c\n",
    f"{SECRET}:\tb\n\tc: d\n",
]


@pytest.fixture(params=["libyaml", "python"])
def loader(request, monkeypatch):
    """Both parsers PyYAML may use: their messages differ (the Python one quotes more)."""
    import yaml

    from memdefragd.config import load

    if request.param == "libyaml":  # libyaml is installed here: it is the one used
        assert load._LOADER is yaml.CSafeLoader
    else:
        monkeypatch.setattr(load, "_LOADER", yaml.SafeLoader)
    return request.param


@pytest.mark.parametrize("text", HOSTILE)
def test_errors_never_quote_the_file(text, loader):
    errs = errors_of(text)
    assert errs and all(e.startswith("m.yaml") for e in errs)
    joined = "\n".join(errs)
    for i in range(len(SECRET) - 3):  # no 4 characters in a row
        assert SECRET[i : i + 4] not in joined, errs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("targets:\n  - name: a\n    priority: high\n", "targets[0].priority: expected an integer from -1000 to 1000, got a string"),
        ("targets:\n  - {name: a, priority: !!int xyz}\n", "got a value its YAML type cannot hold"),
        ("targets:\n  - {name: a, priority: " + "9" * 5000 + "}\n", "m.yaml:2: targets[0].priority: expected an integer"),
        ("targets:\n  - {name: a, mode: !!bool maybe}\n", "targets[0].mode: expected one of enforce, observe, got a value"),
        ("targets:\n  - {name: a, min_rss: !!timestamp 2024-13-45}\n", "targets[0].min_rss: expected a size"),
        ("targets:\n  - {name: a, exclude: {comm: !!binary '%%%'}}\n", "targets[0].exclude.comm: expected a non-empty string, got binary data"),
        ("daemon: {access: {source: on}}\ntargets: []\n", "daemon.access.source: expected one of auto, damon, referenced, off, got true or false"),
        ("targets: {}\n", "m.yaml:1: targets: expected a list"),
        ("- a\n", "m.yaml:1: expected a mapping with keys daemon, targets, got a list"),
        ("just text\n", "m.yaml:1: expected a mapping with keys daemon, targets, got a string"),
    ],
)  # fmt: skip
def test_errors_say_what_kind_of_value_not_which(text, expected):
    errs = errors_of(text)
    assert any(expected in e for e in errs), errs


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("nmae", True),  # a typo of name
        ("exclud", True),  # a prefix of exclude
        ("priorty", True),
        ("zqxj7_vwkpfm9b", False),  # an identifier, but nothing like our keys
        ("Name", False),  # not lower case
        ("name with spaces", False),
        ("name_and_then_a_long_tail_of_text", False),
    ],
)
def test_unknown_keys_are_named_only_when_they_look_like_typos(key, shown):
    (err,) = errors_of(f"targets:\n  - name: a\n    '{key}': 1\n")
    if shown:
        assert err.startswith(f"m.yaml:3: targets[0].{key}: unknown key; expected one of: name,")
    else:
        assert key not in err
        assert err.startswith("m.yaml:3: targets[0]: unknown key at column 5; expected one of:")


def test_errors_are_capped():
    text = "targets:\n" + "".join(f"  - {{name: t{i}, priority: x}}\n" for i in range(1000))
    errs = errors_of(text)
    assert len(errs) == 21, errs[-1]
    assert errs[0].startswith("m.yaml:2: targets[0].priority:")
    assert errs[-1] == "m.yaml: ... and 980 more error(s) not shown; fix these first"


def test_yaml_aliases_cannot_multiply_the_work():
    row = "[" + ",".join(["0"] * 1000) + "]"
    text = (
        f"targets:\n  - name: a\n    match: {{user: &u {row}}}\n"
        f"    exclude: &e [{', '.join(['{user: *u}'] * 1000)}]\n"
        + "".join(f"  - {{name: b{i}, exclude: *e}}\n" for i in range(1000))
    )  # 43 KB that would expand to a billion uids
    (err,) = errors_of(text)
    assert "m.yaml: expands to more than 1,000,000 values" in err and "without aliases" in err


@pytest.mark.parametrize(
    "text", ["[" * 100_000, "a:\n" + "".join(f"{' ' * i}- \n" for i in range(2000))]
)
def test_deep_nesting_is_an_error_not_a_crash(text, loader):
    (err,) = errors_of(text)
    assert err.startswith("m.yaml")


def test_access_source_off_may_be_unquoted():
    """The example documents `source: off`; unquoted, YAML 1.1 reads it as false."""
    for spelling in ("off", "'off'", "false", "no"):
        cfg = parse_config(f"daemon: {{access: {{source: {spelling}}}}}\ntargets: []\n")
        assert cfg.daemon.access_source == "off", spelling


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("targets:\n  - {name: a, min_rss: 99999999999999999999999T}\n", "m.yaml:2: targets[0].min_rss: too large: sizes are at most 1 EiB"),
        ("targets:\n  - {name: a, min_rss: " + "9" * 30 + "}\n", "targets[0].min_rss: too large"),
        ("targets:\n  - {name: a, priority: " + "9" * 30 + "}\n", "targets[0].priority: expected an integer from -1000 to 1000, got one outside that range"),
        ("targets:\n  - {name: a, priority: -1001}\n", "targets[0].priority: expected an integer from -1000 to 1000"),
        ("daemon: {ranger: {syscall: " + "3" * 30 + "}}\ntargets: []\n", "daemon.ranger.syscall: expected an integer from 0 to 65535"),
        ("daemon: {simulated: {seed: 4294967296}}\ntargets: []\n", "daemon.simulated.seed: expected an integer from 0 to 4294967295"),
        ("daemon: {simulated: {nodes: 65}}\ntargets: []\n", "daemon.simulated.nodes: expected an integer from 1 to 64"),
        ("daemon: {simulated: {nodes: 17, memory: 64M}}\ntargets: []\n", "daemon.simulated.memory: must be at least 4MiB per node"),
        ("daemon: {simulated: {memory: 2T}}\ntargets: []\n", "daemon.simulated.memory: must be at most 1.0 TiB"),
        ("daemon: {simulated: {processes: [{comm: a, heap: 1G, count: 100001}]}}\ntargets: []\n", "count: expected an integer from 1 to 10000"),
        ("daemon: {scan_interval: " + "9" * 30 + "}\ntargets: []\n", "daemon.scan_interval: too long: durations are at most 365d"),
        ("daemon: {cooldown: .inf}\ntargets: []\n", "daemon.cooldown: too long"),
        ("daemon: {cooldown: .nan}\ntargets: []\n", "daemon.cooldown: expected a duration such as 30s, not NaN"),
        ("targets:\n  - {name: a, match: {pid: 4194305}}\n", "expected a pid from 1 to 4194304"),
        ("targets:\n  - {name: a, match: {user: 4294967295}}\n", "expected a uid from 0 to 4294967294"),
    ],
)  # fmt: skip
def test_numbers_are_bounded(text, expected):
    errs = errors_of(text)
    assert any(expected in e for e in errs), errs


def test_sizes_and_durations_at_their_bounds():
    from memdefragd.units import parse_duration, parse_size

    assert parse_size("1048576T") == 1 << 60 and parse_size(1 << 60) == 1 << 60
    assert parse_size("1.5G") == 3 << 29 and parse_size(1.5e9) == 1_500_000_000
    assert parse_duration("365d") == 365 * 86400
    for bad in ("1048577T", (1 << 60) + 1, "1" * 31, float("inf")):
        with pytest.raises(ValueError):
            parse_size(bad)
    for bad in ("366d", 10**400, -(10**400), float("nan")):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("999.1.1.1:9847", "the host is not an IPv4 address"),
        ("127.1:9847", "the host is not an IPv4 address"),
        ("::1:9847", "an IPv6 address goes in brackets"),
        ("[::g]:9847", "the address in brackets is not an IPv6 address"),
        ("under_score:9847", "neither an IP address nor a host name"),
        ("127.0.0.1:65536", "the port must be a number from 0 to 65535"),
        ("127.0.0.1:", "the port must be a number from 0 to 65535"),
        (":9847", "the host is missing"),
        ("9847", "the port must be"),
    ],
)
def test_metrics_listen_is_checked_when_loading(listen, expected):
    (err,) = errors_of(f"daemon:\n  metrics: {{listen: '{listen}'}}\ntargets: []\n")
    assert err.startswith("m.yaml:2: daemon.metrics.listen: ") and expected in err, err


def test_metrics_listen_accepts_addresses_and_names_that_resolve():
    def listen(value: str):
        return parse_config(
            f"daemon: {{metrics: {{listen: '{value}'}}}}\ntargets: []\n"
        ).daemon.metrics_listen

    assert listen("0.0.0.0:0") == ("0.0.0.0", 0)
    assert listen("[::1]:9847") == ("::1", 9847)
    assert listen("localhost:9847") == ("localhost", 9847)
    assert listen("off") is None


def test_check_config_exits_2_on_a_bad_listen_address(tmp_path, capsys):
    from memdefragd.cli import main

    f = tmp_path / "m.yaml"
    f.write_text("daemon:\n  metrics: {listen: 999.1.1.1:9847}\ntargets: []\n")
    assert main(["check-config", str(f)]) == 2
    assert (
        f"{f}:2: daemon.metrics.listen: the host is not an IPv4 address" in capsys.readouterr().err
    )


# ---------------------------------------------------------------- the file itself


def test_non_utf8_and_control_characters_say_line_and_column(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_bytes(b"targets:\n  - name: " + "ça".encode() + b"\xe9\n")  # Latin-1 é
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.errors == [
        f"{f}:2:13: not valid UTF-8 (byte 23 of the file); the config must be UTF-8 text: "
        "re-save it as UTF-8, or is this the right file?"
    ]
    f.write_text("targets:\n  - name: é\x07\n")
    with pytest.raises(ConfigError, match=rf"^{f}:2:12: a control character, which YAML"):
        load_config(f)


def test_a_symbolic_link_is_refused(tmp_path):
    real = tmp_path / "real.yaml"
    real.write_text("targets: []\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match=r"link.yaml: refusing a symbolic link: .* real file"):
        load_config(link)
    assert load_config(real).targets == ()


def test_directories_others_could_write_are_refused(tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    d = tmp_path / "d"
    d.mkdir()
    f = d / "m.yaml"
    f.write_text("targets: []\n")
    os.chown(d, nobody, -1)
    with pytest.raises(ConfigError, match=rf"under {d}, a directory owned by nobody .*chown root"):
        load_config(f)
    os.chown(d, 0, -1)
    os.chmod(d, 0o777)
    with pytest.raises(
        ConfigError, match=rf"under {d}, a directory other users can .*chmod go-w {d}"
    ):
        load_config(f)
    os.chmod(d, 0o1777)  # sticky, as /tmp: others cannot replace what root owns there
    assert load_config(f).targets == ()
    # Through a directory symlink: the real directories are checked.
    os.chmod(d, 0o777)
    (tmp_path / "alias").symlink_to(d)
    with pytest.raises(ConfigError, match=rf"under {d}, a directory other users can"):
        load_config(tmp_path / "alias" / "m.yaml")


def test_a_fifo_or_a_directory_is_refused_without_blocking(tmp_path):
    import threading

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def load():
        try:
            load_config(fifo)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(5)
    assert outcome and isinstance(outcome[0], ConfigError), "blocked on the FIFO"
    assert "fifo.yaml: is not a regular file" in str(outcome[0])
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_an_oversized_config_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import yaml

    from memdefragd.config import load

    f = tmp_path / "m.yaml"
    f.write_text("targets: []\n" + "#" * (1 << 20))
    monkeypatch.setattr(yaml, "compose", lambda *a, **k: pytest.fail("parsed"))
    reads: list[int] = []
    real_read = os.read
    monkeypatch.setattr(load.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.errors == [
        f"{f}: refusing a config of 1.0 MiB: the limit is 1.0 MiB (500 targets take about "
        "100 KB); is this the right file?"
    ]
    assert reads == []
    monkeypatch.undo()
    f.write_text("targets: []\n" + "#" * ((1 << 20) - 20))
    assert load_config(f).targets == ()

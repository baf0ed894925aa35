"""The declarations: each setting declared once, with help and a default within its bounds,
and everything that follows from them (docs, example, overrides, scheduler, simulator)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from memdefragd.config import DaemonSettings, SimulatedSettings, parse_config, scheduler_settings
from memdefragd.config.kinds import Nullable
from memdefragd.config.schema import OVERRIDES, ROOT
from memdefragd.config.walk import REQUIRED, every_setting, read_text, settings_of
from memdefragd.model import Heat, Method, Mode, UnmovableLayout
from tests.paths import REPO

SETTINGS = list(every_setting(ROOT))
EXAMPLE = REPO / "etc" / "memdefragd.yaml"


def test_every_setting_has_help_and_a_default_within_its_bounds():
    assert len(SETTINGS) > 40
    for path, s in SETTINGS:
        assert s.help and s.name and s.key, path
        if s.default is REQUIRED:
            assert s.required, f"{path}: no default, and no word on why it must be given"
        elif hasattr(s.kind, "settings"):  # a section: its own settings are checked
            assert not list(getattr(s.default, "problems", list)()), path
        elif s.default is not None or isinstance(s.kind, Nullable):
            # Written as the file would hold it, the default reads back as itself.
            assert read_text(s.kind, s.kind.show(s.default)) == s.default, path


def test_the_settings_reference_is_what_the_generator_writes():
    from tools.configuration_doc import OUT, render

    assert OUT == REPO / "docs" / "configuration.md"
    assert OUT.read_text() == render(), "run: python3 -m tools.configuration_doc"
    for path, s in SETTINGS:
        assert f"| `{s.key}` |" in render(), path


def test_the_example_mentions_every_setting():
    """Daemon settings stand in the example at their place (and equal the defaults: see
    test_config); a target's keys are named in its comments."""
    text = EXAMPLE.read_text()
    daemon = yaml.safe_load(text)["daemon"]
    for path, _ in SETTINGS:
        if path.startswith("daemon.") and "[]" not in path:
            node = daemon
            for part in path.split(".")[1:]:
                assert isinstance(node, dict) and part in node, f"{path} not in the example"
                node = node[part]
        else:
            leaf = path.rpartition(".")[2].removesuffix("[]")
            assert re.search(rf"\b{leaf}:", text), f"{path} not mentioned in the example"
    overrides = re.search(r"#\s+overrides:(.*?)\n#\s*\n", text, re.S)
    assert overrides, "the example's comments explain overrides"
    for s in OVERRIDES:
        assert s.name in overrides[1], f"overrides: {s.name} not mentioned"


def test_a_target_overrides_the_daemon_settings_themselves():
    per_target = [s.name for s in settings_of(DaemonSettings) if s.per_target]
    assert [s.key for s in OVERRIDES] == per_target == [s.name for s in OVERRIDES]
    daemon = {s.name: s for s in settings_of(DaemonSettings)}
    assert all(s.kind is daemon[s.name].kind and s.help is daemon[s.name].help for s in OVERRIDES)
    cfg = parse_config(
        "daemon: {cooldown: 1s, method: collapse}\n"
        "targets:\n"
        "  - {name: a, overrides: {method: ranger, chunk: 8M, latency_sensitive: false}}\n"
        "  - {name: b}\n"
    )
    a, b = cfg.settings_for("a"), cfg.settings_for("b")
    assert (a.method, a.chunk, a.latency_sensitive, a.cooldown) == ("ranger", 8 << 20, False, 1)
    assert b is cfg.daemon
    s = scheduler_settings(cfg)
    assert (s.chunk_for("a"), s.chunk_for("b"), s.cooldown_for("a")) == (8 << 20, 2 << 20, 1)


def test_every_scheduler_setting_comes_from_a_declaration():
    from memdefragd.pipeline.plan.scheduler import SchedulerSettings

    fed = set()
    for s in settings_of(DaemonSettings):
        if s.plan is not None:
            fed |= {s.plan.field, s.plan.by_target} - {""}
    own = {"cpu_window"}  # the scheduler's own: not a setting
    assert fed | own == {f.name for f in dataclasses.fields(SchedulerSettings)}
    d = scheduler_settings(parse_config("targets: []\n"))
    assert (d.chunk_bytes, d.min_available_bytes, d.duty_cycle, d.collapse_untouched) == (
        64 << 20, 1 << 30, 0.1, True,
    )  # fmt: skip


def test_the_aging_scenario_is_the_config_machine():
    from memdefragd.backends.sim.aging import BIG_MACHINE, Scenario

    machine = {s.name for s in settings_of(SimulatedSettings)}
    assert machine <= {f.name for f in dataclasses.fields(Scenario)}
    differ = {"memory": BIG_MACHINE, "processes": ()}  # stated on Scenario, and why
    for name in machine:
        expected = differ.get(name, getattr(SimulatedSettings(), name))
        assert getattr(Scenario(), name) == expected, name
    sc = SimulatedSettings(memory=2 << 30, seed=3).scenario()
    assert (sc.memory, sc.seed, sc.processes) == (2 << 30, 3, SimulatedSettings().processes)
    for bad, message in [
        ({"fragmentation": 1.5}, "fragmentation: expected a number from 0 to 1"),
        ({"memory": 1 << 20}, "memory: must be at least 67108864 bytes"),
        ({"nodes": 64, "memory": 128 << 20}, "memory: must be at least 4MiB per node"),
    ]:
        with pytest.raises(ValueError, match=message):
            Scenario(**bad).validate()


def test_the_simulator_options_are_the_machine_settings():
    from memdefragd.backends.sim.aging import BIG_MACHINE
    from memdefragd.cli import build_parser

    for command, memory in (["simulate"], BIG_MACHINE), (["report"], 1 << 30):
        args = build_parser().parse_args(command)
        assert args.memory is None and args.machine_memory == memory  # None: not given
        for s in settings_of(SimulatedSettings):
            if s.name not in ("memory", "processes"):
                assert getattr(args, s.name) == s.default, s.name
    args = build_parser().parse_args(
        ["simulate", "--free", "0.3", "--unmovable-layout", "clustered"]
    )
    assert (args.free, args.unmovable_layout) == (0.3, UnmovableLayout.CLUSTERED)
    with pytest.raises(SystemExit):  # the declared bounds, as in the file
        build_parser().parse_args(["simulate", "--free", "0.99"])


def test_names_are_enums_equal_to_their_strings():
    assert list(Method) == ["collapse", "ranger", "ranger-improved", "compaction"]
    assert list(Mode) == ["enforce", "observe"]
    assert list(Heat) == ["hot", "cold", "untouched", "unknown"]
    assert f"{Method.RANGER_IMPROVED}" == str(Method.RANGER_IMPROVED) == "ranger-improved"
    assert {Method.COLLAPSE: 1}["collapse"] == 1
    assert parse_config("daemon: {method: ranger}\ntargets: []\n").daemon.method is Method.RANGER

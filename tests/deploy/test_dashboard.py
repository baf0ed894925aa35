"""etc/grafana/memdefragd.json is written by tools/dashboard.py with Grafana's SDK
(grafana-foundation-sdk, pinned in constraints.txt and pyproject's `test` extra): the
committed file must be exactly what it writes. Its layout, ids and JSON shape are the
generator's business; the queries are linted and parsed by test_dashboard_rules.py.

Every metric and label the dashboard and the alert rules name must be one the exporter
(memdefragd/daemon/metrics.py) declares: checked here without a kernel, on a `Metrics`
registry whose labelled families each get one child, query by query (a label a query
filters, groups or labels its legend by must be carried by a metric that query reads).
tests/kernel/test_metrics_names.py checks the names against a live daemon's scrape.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import re

import pytest
from packaging.version import Version
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from memdefragd.daemon.metrics import Metrics
from tests.daemon.test_metrics import snapshot
from tests.paths import REPO

from .test_dashboard_rules import (
    DASHBOARD,
    TARGET_LABELS,
    alert_rules,
    dashboard,
    panels,
    parse,
    require,
    variable_queries,
)

SDK = "grafana-foundation-sdk"
# Prometheus' own series: in queries, never in the exporter's output.
NOT_EXPORTED = {"up"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def pinned(name: str) -> Version | None:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(rf"^{re.escape(name)}==(\S+)", line.strip(), re.I)
        if m:
            return Version(m[1])
    return None


def test_the_committed_dashboard_is_what_the_generator_writes():
    require(
        importlib.util.find_spec("grafana_foundation_sdk"),
        f"{SDK} is missing: pip install -e '.[test]' (the dashboard generator's SDK)",
    )
    installed, pin = Version(importlib.metadata.version(SDK)), pinned(SDK)
    assert pin is not None, f"constraints.txt does not pin {SDK}"
    assert installed == pin, (
        f"{SDK} {installed} is installed but constraints.txt pins {pin}, and the dashboard "
        "is that version's output: pip install -e '.[test]'"
    )
    from tools.dashboard import render

    generated = render()
    committed = DASHBOARD.read_text()
    if committed != generated:
        diff = difflib.unified_diff(
            committed.splitlines(), generated.splitlines(), "committed", "generated", lineterm=""
        )
        shown = "\n".join(list(diff)[:60])
        pytest.fail(
            f"{DASHBOARD.name} is not what tools/dashboard.py writes: edit the generator, "
            f"not the JSON, then run `python3 -m tools.dashboard`.\n{shown}",
            pytrace=False,
        )


# ---------------------------------------------------------------- names against the exporter


def exposition() -> tuple[dict[str, str], dict[str, set[str]]]:
    """(family name -> type from the # TYPE lines, sample name -> label names) of a daemon's
    metrics after one scan snapshot, every labelled live family given one child."""
    m = Metrics(snapshot)
    m.configured("ab" * 32, 30.0, {"ranger": "no Translation Ranger here"})
    for metric in vars(m).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*(["x"] * len(metric._labelnames)))
    text = generate_latest(m.registry).decode()
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    return types, labels


def queries() -> list[tuple[str, str, set[str]]]:
    """(where, expr, labels it names outside PromQL) of every dashboard and alert query:
    legend {{label}}s, label_values()' label."""
    out = []
    for p in panels(dashboard()):
        for t in p.get("targets", []):
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"], legend))
    for expr, label in variable_queries(dashboard()):
        out.append((f"variable {label}", expr, {label}))
    for r in alert_rules():
        out.append((f"alert {r['alert']}", r["expr"], set()))
    return out


def findings(
    where: str, expr: str, extra: set[str], types: dict[str, str], carried: dict[str, set[str]]
) -> list[str]:
    """What one query names that the exposition lacks: metrics, labels a selector filters
    its metric on, and labels the query groups or labels its legend by (`extra`), which
    some metric it reads must carry."""

    def exported(name: str) -> bool:
        base = name.removesuffix(next((s for s in HISTOGRAM_SUFFIXES if name.endswith(s)), ""))
        return name in types or types.get(base) == "histogram"

    q = parse(expr)
    metrics = {s.metric for s in q.selectors if s.metric} - NOT_EXPORTED
    out = [f"{where}: {name} is not exported" for name in sorted(metrics) if not exported(name)]
    for s in q.selectors:
        if s.metric in metrics:
            have = carried.get(s.metric, set()) | TARGET_LABELS
            out += [
                f"{where}: {s.metric} has no label {lb}"
                for lb, _, _ in s.matchers
                if lb not in have
            ]
    have = set().union(*(carried.get(name, set()) for name in metrics)) | TARGET_LABELS
    return out + [
        f"{where}: no metric it reads has {lb}" for lb in sorted((q.labels | extra) - have)
    ]


def test_dashboard_and_rules_use_only_names_the_exporter_declares():
    types, carried = exposition()
    assert [
        f for where, expr, extra in queries() for f in findings(where, expr, extra, types, carried)
    ] == []


JI = 'job=~"$job", instance=~"$instance"'
BAD_AND_GOOD = [
    (f"sum by (cause) (rate(memdefragd_regressions_total{{{JI}}}[5m]))", (), []),
    (f"sum by (target, le) (rate(memdefragd_fork_restore_seconds_bucket{{{JI}}}[5m]))", (), []),
    (f"up{{{JI}}} == 0", ("instance",), []),
    (f"memdefragd_no_such_thing{{{JI}}}", (), ["memdefragd_no_such_thing is not exported"]),
    (f"memdefragd_no_such_seconds_bucket{{{JI}}}", (), ["memdefragd_no_such_seconds_bucket is not exported"]),
    (f'memdefragd_forks_total{{{JI}, cause="fork"}}', (), ["memdefragd_forks_total has no label cause", "no metric it reads has cause"]),
    (f"sum by (heat) (memdefragd_queued_bytes{{{JI}}})", (), ["no metric it reads has heat"]),
    (f"memdefragd_queued_bytes{{{JI}}}", ("target",), ["no metric it reads has target"]),
]  # fmt: skip


@pytest.mark.parametrize(("expr", "legend", "expected"), BAD_AND_GOOD)
def test_the_names_check_catches_what_it_should(expr, legend, expected):
    types, carried = exposition()
    assert types["memdefragd_forks_total"] == "counter"  # declared before any fork
    assert carried["memdefragd_regressions_total"] == {"target", "cause"}
    assert findings("q", expr, set(legend), types, carried) == [f"q: {e}" for e in expected]

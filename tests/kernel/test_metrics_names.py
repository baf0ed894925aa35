"""The dashboard and the alert rules against a live scrape: every metric and label name they
use is one the daemon exports, and `promtool check metrics` accepts the exposition.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .helpers import Daemon, MiB, write_config
from .test_daemon_kernel import anon_huge

pytestmark = pytest.mark.kernel

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Absent from a scrape on purpose: `up` is Prometheus's own.
NOT_EXPORTED = {"up"}


def _dashboard_rules():
    """tests/deploy/test_dashboard_rules.py, for its PromQL reader and names_used()."""
    name = "memdefragd_test_dashboard_rules"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "deploy" / "test_dashboard_rules.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while being built
        spec.loader.exec_module(module)
    return sys.modules[name]


lint = _dashboard_rules()

# Families that get samples only when something goes wrong (a race, an unexpected error, a
# failed region), with the labels exporter.py gives them: a healthy run's scrape has their
# # TYPE lines but no sample to show a label on. When a run has samples, they are checked.
EVENT_ONLY = {
    "memdefragd_races_total": {"kind"},
    "memdefragd_errors_total": {"kind"},
    "memdefragd_failures_total": {"target", "method", "reason"},
    # Gentle and persistent: only once a tracked process forks or loses huge pages.
    "memdefragd_forks_total": {"target"},
    "memdefragd_regressions_total": {"target", "cause"},
    "memdefragd_recollapsed_bytes_total": {"target"},
    "memdefragd_fork_restore_seconds_bucket": {"target", "le"},
    "memdefragd_fork_restore_seconds_sum": {"target"},
    "memdefragd_fork_restore_seconds_count": {"target"},
}


@pytest.fixture
def daemon():
    started = []

    def start(config: Path) -> Daemon:
        started.append(Daemon(config))
        return started[-1]

    yield start
    for d in started:
        d.stop()


def scrape(port: int) -> tuple[str, dict]:
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return text, samples


def exposition_types(text: str) -> dict[str, str]:
    """Family name -> type, from the # TYPE lines (present even for families without
    samples yet, such as failures before the first failure)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            out[name] = kind
    return out


@pytest.mark.needs_collapse
def test_dashboard_and_rules_use_only_what_a_live_scrape_has(spawn, daemon, tmp_path):
    """Names first (they need no promtool), then `promtool check metrics` on the text."""
    child = spawn(64 * MiB, comm="mdd-names")
    d = daemon(write_config(tmp_path / "m.yaml", "mdd-names", listen="127.0.0.1:0"))
    port = d.metrics_port()
    end = time.monotonic() + 30
    while anon_huge(child.pid, child.addr) < child.size and time.monotonic() < end:
        time.sleep(0.2)
    d.wait_settled()
    text, samples = scrape(port)
    assert samples["memdefragd_target_thp_coverage_ratio", (("target", "testee"),)] == 1.0, text

    types = exposition_types(text)
    labels_of: dict[str, set[str]] = {}
    for name, labels in samples:
        labels_of.setdefault(name, set()).update(label for label, _ in labels)
    used_metrics, used_labels = lint.names_used()
    missing = []
    for name in sorted(used_metrics - NOT_EXPORTED):
        base = name.removesuffix(next((s for s in HISTOGRAM_SUFFIXES if name.endswith(s)), ""))
        if name not in types and types.get(base) != "histogram":
            missing.append(name)
    assert missing == [], f"used but not exported: {missing}\n{text}"

    for family, labels in EVENT_ONLY.items():
        base = family.removesuffix(next((s for s in HISTOGRAM_SUFFIXES if family.endswith(s)), ""))
        assert types.get(family) == "counter" or types.get(base) == "histogram", family
        if family in labels_of:
            assert labels_of[family] == labels, family
    scraped = set().union(*labels_of.values())
    quiet = set().union(*(lb for f, lb in EVENT_ONLY.items() if f not in labels_of))
    assert used_labels - scraped - quiet - lint.TARGET_LABELS == set(), text

    # Where a query filters a metric on a label, that metric carries it.
    exprs = lint.dashboard_exprs(lint.dashboard()) + [r["expr"] for r in lint.alert_rules()]
    wrong = set()
    for expr in exprs:
        for sel in lint.parse(expr).selectors:
            carried = labels_of.get(sel.metric) or EVENT_ONLY.get(sel.metric) or set()
            if sel.metric in NOT_EXPORTED:
                continue
            wrong |= {
                (sel.metric, lb) for lb, _, _ in sel.matchers
                if lb not in carried | lint.TARGET_LABELS
            }  # fmt: skip
    assert wrong == set(), text

    promtool = lint.promtool_path()
    lint.require(promtool, "promtool is missing: `make promtool` fetches it (or set PROMTOOL=path)")
    r = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, r.stderr) == (0, ""), f"{r.stdout}{r.stderr}"

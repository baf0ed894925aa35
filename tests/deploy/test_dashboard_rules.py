"""The Grafana dashboard and the Prometheus alert rules, checked offline.

The dashboard is generated (tools/dashboard.py, with Grafana's SDK; test_dashboard.py
checks that the committed JSON is its output and that every name it uses is exported), so
its JSON shape, panel ids and grid positions are the SDK's business. What is written by
hand, the queries and the choices behind them, is linted here. grafana/dashboard-linter
cannot be installed here, so its rules are ported: the `datasource` variable, the
`job`/`instance` variables, panel data sources, titles and descriptions, units and
targets, `$__rate_interval` in every rate/irate/increase, `_total` only inside
rate/irate/increase, and job/instance matchers in every selector. Each rule is a function
returning its findings, tried first on bad input (test_the_rules_catch_...) so that a pass
means something. PromQL syntax, of the dashboard's queries and of the rules, is promtool's
word: the queries go into a temporary rules file for `promtool check rules`, and the
alerts through `promtool check rules` and `promtool test rules`.

promtool comes from `make promtool` (.cache/promtool/promtool), or PROMTOOL=path, or PATH.
Without it these tests skip, or fail under MEMDEFRAGD_REQUIRE_KERNEL=1 (as CI runs them).

tests/kernel/test_metrics_names.py loads this module by path for `parse` and `names_used`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.paths import REPO

DASHBOARD = REPO / "etc" / "grafana" / "memdefragd.json"
PROVISIONING = REPO / "etc" / "grafana" / "provisioning.yaml"
RULES = REPO / "etc" / "prometheus" / "memdefragd.rules.yml"
RULES_TEST = REPO / "etc" / "prometheus" / "memdefragd.rules.test.yml"
PROMTOOL_CACHE = REPO / ".cache" / "promtool" / "promtool"
REQUIRE_ENV = "MEMDEFRAGD_REQUIRE_KERNEL"

DS = {"type": "prometheus", "uid": "${datasource}"}
RATE_FUNCTIONS = {"rate", "irate", "increase"}
# Labels Prometheus attaches at scrape time: in queries, never in an exporter's output.
TARGET_LABELS = {"job", "instance"}

# dashboard-linter's panel-units-rule list (lint/rule_panel_units.go), the categories a
# memory daemon's panels can use.
VALID_UNITS = {
    "none", "string", "short", "percent", "percentunit", "hex0x", "hex", "sci", "locale",
    "bytes", "decbytes", "bits", "decbits", "kbytes", "deckbytes", "mbytes", "decmbytes",
    "gbytes", "decgbytes", "tbytes", "dectbytes", "pbytes", "decpbytes",
    "pps", "binBps", "Bps", "binbps", "bps", "KiBs", "Kibits", "KBs", "Kbits", "MiBs", "Mibits",
    "MBs", "Mbits", "GiBs", "Gibits", "GBs", "Gbits", "TiBs", "Tibits", "TBs", "Tbits",
    "dateTimeAsIso", "dateTimeAsIsoNoDateIfToday", "dateTimeAsUS", "dateTimeAsUSNoDateIfToday",
    "dateTimeAsLocal", "dateTimeAsLocalNoDateIfToday", "dateTimeAsSystem", "dateTimeFromNow",
    "hertz", "ns", "µs", "ms", "s", "m", "h", "d", "dtdurationms", "dtdurations", "dthms",
    "dtdhms", "timeticks", "clockms", "clocks",
    "cps", "ops", "reqps", "rps", "wps", "iops", "cpm", "opm", "rpm", "wpm",
    "bool", "bool_yes_no", "bool_on_off",
}  # fmt: skip


# ---------------------------------------------------------------- promtool


def require(condition: object, reason: str) -> None:
    """tests/kernel/helpers.require_kernel's rule: skip, or fail under CI's variable."""
    if condition:
        return
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{REQUIRE_ENV} is set and {reason}", pytrace=False)
    pytest.skip(reason)


def promtool_path() -> str | None:
    if os.environ.get("PROMTOOL"):
        return os.environ["PROMTOOL"]
    if os.access(PROMTOOL_CACHE, os.X_OK):
        return str(PROMTOOL_CACHE)
    return shutil.which("promtool")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = promtool_path()
    require(path, "promtool is missing: `make promtool` fetches it (or set PROMTOOL=path)")
    return path


def run_promtool(promtool: str, *args: str, cwd: Path | None = None, stdin: str | None = None):
    return subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=120
    )


# ---------------------------------------------------------------- a small PromQL reader

# Enough PromQL for lint rules: selectors (name, matchers, range, the function whose
# argument they are), and the label names in matchers and by/without/on/ignoring/group_*
# lists. Syntax errors are promtool's business; this only needs balanced brackets.
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<number>(?:\d+(?:ms|[smhdwy]))+|0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}@])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Selector:
    metric: str | None
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value without quotes)
    range: str | None  # "[5m]" as written, or None
    call: str | None  # the function or aggregation it is an argument of; None at top level


@dataclass
class Query:
    expr: str
    selectors: list[Selector] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)  # in matchers and label lists
    calls: set[str] = field(default_factory=set)


def tokenize(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read PromQL at {pos}: {expr[pos : pos + 20]!r}")
        if m.lastgroup != "space":
            out.append((m.lastgroup, m.group()))
        pos = m.end()
    return out


def parse(expr: str) -> Query:
    q = Query(expr)
    toks = tokenize(expr)
    stack: list[str] = []  # one entry per open "(": its function, or "" for grouping
    pending: str | None = None  # a function or aggregation whose "(" comes next

    def text(i: int) -> str | None:
        return toks[i][1] if i < len(toks) else None

    def matchers(i: int) -> tuple[int, tuple[tuple[str, str, str], ...]]:
        found = []
        i += 1  # past "{"
        while text(i) != "}":
            if text(i) == ",":
                i += 1
                continue
            (k1, label), (_, op), (k3, value) = toks[i : i + 3]
            if k1 not in ("name", "string") or k3 != "string":
                raise ValueError(f"bad matcher near {label!r} in {expr!r}")
            found.append((label.strip("\"'`"), op, value[1:-1]))
            q.labels.add(label.strip("\"'`"))
            i += 3
        return i + 1, tuple(found)

    i = 0
    while i < len(toks):
        kind, tok = toks[i]
        if kind == "name" and tok.lower() in LABEL_LISTS:
            i += 1
            if text(i) == "(":
                i += 1
                while text(i) != ")":
                    if toks[i][0] == "name":
                        q.labels.add(toks[i][1])
                    i += 1
                i += 1
            continue
        if kind == "name" and (text(i + 1) == "(" or tok.lower() in AGGREGATIONS):
            pending = tok
            q.calls.add(tok)
            i += 1
            continue
        if kind == "name" and tok.lower() in KEYWORDS:
            i += 1
            continue
        if kind == "name" or tok == "{":
            metric = tok if kind == "name" else None
            i += kind == "name"
            found: tuple[tuple[str, str, str], ...] = ()
            if text(i) == "{":
                i, found = matchers(i)
            rng = None
            if i < len(toks) and toks[i][0] == "range":
                rng = toks[i][1]
                i += 1
            q.selectors.append(Selector(metric, found, rng, stack[-1] if stack else None))
            continue
        if tok == "(":
            stack.append(pending or "")
            pending = None
        elif tok == ")":
            if not stack:
                raise ValueError(f"unbalanced ')' in {expr!r}")
            stack.pop()
        i += 1
    if stack:
        raise ValueError(f"unclosed '(' in {expr!r}")
    return q


# ---------------------------------------------------------------- the ported rules


def counter_agg_findings(q: Query) -> list[str]:
    """target-counter-agg-rule: a counter (…_total) only as rate/irate/increase(x[range])."""
    return [
        f"counter {s.metric} is not inside rate, irate or increase"
        for s in q.selectors
        if s.metric and s.metric.endswith("_total")
        and not (s.range and s.call in RATE_FUNCTIONS)
    ]  # fmt: skip


def rate_interval_findings(q: Query) -> list[str]:
    """target-rate-interval-rule: rate/irate/increase over [$__rate_interval], nothing else."""
    return [
        f"{s.call}({s.metric}{s.range}) should use [$__rate_interval]"
        for s in q.selectors
        if s.call in RATE_FUNCTIONS and s.range not in ("[$__rate_interval]", "[${__rate_interval}]")
    ]  # fmt: skip


def matcher_findings(q: Query) -> list[str]:
    """target-job-rule, target-instance-rule, and ours for target: every selector filtered
    by the dashboard's variables."""
    out = []
    for s in q.selectors:
        want = [("job", "=~", "$job"), ("instance", "=~", "$instance")]
        if s.metric and s.metric.startswith("memdefragd_target_"):
            want.append(("target", "=~", "$target"))
        out += [
            f"{s.metric} lacks {lb}{op}{v!r}" for lb, op, v in want if (lb, op, v) not in s.matchers
        ]
    return out


def variable(d: dict, name: str) -> dict | None:
    return next((v for v in d["templating"]["list"] if v["name"] == name), None)


def template_findings(d: dict) -> list[str]:
    """template-datasource-rule, template-job-rule, template-instance-rule, and
    template-on-time-change-reload-rule; no __inputs (file provisioning cannot fill them)."""
    out = []
    ds = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    if len(ds) != 1 or ds[0]["name"] != "datasource" or ds[0].get("query") != "prometheus":
        out.append("needs exactly one datasource variable, named datasource, query prometheus")
    elif ds[0].get("label") != "Data source":
        out.append("the datasource variable should be labelled 'Data source'")
    if "__inputs" in d or "${DS_" in json.dumps(d):
        out.append("__inputs/${DS_…} placeholders: only the UI import resolves them")
    for name in ("job", "instance"):
        v = variable(d, name)
        if v is None:
            out.append(f"no {name} variable")
            continue
        if v.get("datasource", {}).get("uid") not in ("$datasource", "${datasource}"):
            out.append(f"{name} variable should use $datasource")
        if v["type"] != "query" or v.get("label") != name.title():
            out.append(f"{name} variable should be a query labelled {name.title()!r}")
        if not v.get("multi") or v.get("allValue") != ".+":
            out.append(f"{name} variable should be multi-select with allValue '.+'")
    for v in d["templating"]["list"]:
        if v["type"] == "query" and v.get("refresh") != 2:
            out.append(f"{v['name']} variable should refresh on time range change (2)")
    return out


def panel_findings(p: dict) -> list[str]:
    """panel-datasource-rule, panel-title-description-rule, panel-units-rule,
    panel-no-targets-rule, and the target rules over each target's expr."""
    if p["type"] == "row":
        return [] if p.get("title") else ["a row without a title"]
    out = []
    if p.get("datasource") != DS:
        out.append(f"datasource {p.get('datasource')} is not {DS}")
    if not p.get("title") or not p.get("description"):
        out.append("needs a title and a description")
    fc = p.get("fieldConfig", {})
    units = [fc.get("defaults", {}).get("unit")]
    units += [
        prop["value"] for o in fc.get("overrides", []) for prop in o.get("properties", [])
        if prop.get("id") == "unit"
    ]  # fmt: skip
    out += [f"unit {u!r} is missing or unknown" for u in units if u not in VALID_UNITS]
    if not p.get("targets"):
        out.append("has no targets")
    for t in p.get("targets", []):
        if t.get("datasource", DS) != DS:
            out.append(f"target {t.get('refId')}: datasource is not {DS}")
        if not t.get("expr"):
            out.append(f"target {t.get('refId')}: no expr")
            continue
        q = parse(t["expr"])
        out += counter_agg_findings(q) + rate_interval_findings(q) + matcher_findings(q)
    return [f"panel {p.get('id')} {p.get('title')!r}: {f}" for f in out]


# ---------------------------------------------------------------- reading the files


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict) -> list[dict]:
    """Every panel, rows' nested (collapsed) panels included."""
    out = []
    for p in d["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.*),\s*(?P<label>\w+)\s*\)\s*$", re.S)


def variable_queries(d: dict) -> list[tuple[str, str]]:
    """(selector expression, label) of every label_values() variable."""
    out = []
    for v in d["templating"]["list"]:
        if v["type"] != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = LABEL_VALUES.match(query)
        assert m, f"variable {v['name']}: only label_values(expr, label) is expected: {query!r}"
        out.append((m["expr"], m["label"]))
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs(d: dict) -> list[str]:
    exprs = [t["expr"] for p in panels(d) for t in p.get("targets", [])]
    return exprs + [e for e, _ in variable_queries(d)]


def names_used() -> tuple[set[str], set[str]]:
    """(metric names, label names) the dashboard and the alert rules rely on: selectors,
    matchers, label lists, label_values(), {{label}} in legends, {{ $labels.x }} in alerts."""
    d = dashboard()
    exprs = dashboard_exprs(d) + [r["expr"] for r in alert_rules()]
    metrics: set[str] = set()
    labels: set[str] = {label for _, label in variable_queries(d)}
    for e in exprs:
        q = parse(e)
        metrics |= {s.metric for s in q.selectors if s.metric}
        labels |= q.labels
    for p in panels(d):
        for t in p.get("targets", []):
            labels |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
    for r in alert_rules():
        for text in r.get("annotations", {}).values():
            labels |= set(re.findall(r"\$labels\.(\w+)", text))
    return metrics, labels


GRAFANA_DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def expand(expr: str, variables: list[str], durations: dict[str, str] = GRAFANA_DURATIONS) -> str:
    """Grafana's variables as Prometheus can parse them: its built-in durations (ranges 5m
    unless `durations` says otherwise), label values .+ (what "All" selects)."""
    for name, value in durations.items():
        expr = re.sub(rf"\$\{{{name}\}}|\${name}\b", value, expr)
    for name in variables:
        expr = re.sub(rf"\$\{{{name}\}}|\${name}\b|\[\[{name}\]\]", ".+", expr)
    return expr


# ---------------------------------------------------------------- the rules, on bad input


def test_the_rules_catch_what_they_should():
    ji = 'job=~"$job", instance=~"$instance"'
    bad_counter = parse(f"sum(memdefragd_failures_total{{{ji}}})")
    assert counter_agg_findings(bad_counter)
    assert counter_agg_findings(parse(f"delta(memdefragd_failures_total{{{ji}}}[5m])"))
    ok = parse(f"sum by (reason) (rate(memdefragd_failures_total{{{ji}}}[$__rate_interval]))")
    assert not counter_agg_findings(ok) and not rate_interval_findings(ok)
    assert ok.selectors[0].call == "rate" and ok.labels == {"reason", "job", "instance"}
    assert rate_interval_findings(parse(f"rate(memdefragd_requests_total{{{ji}}}[5m])"))
    assert rate_interval_findings(parse(f"increase(memdefragd_requests_total{{{ji}}}[1h])"))
    assert not rate_interval_findings(parse(f"max_over_time(memdefragd_paused{{{ji}}}[1h])"))
    assert matcher_findings(parse('memdefragd_queued_bytes{job=~"$job"}'))
    assert matcher_findings(parse(f"memdefragd_target_thp_bytes{{{ji}}}"))
    assert not matcher_findings(parse(f'memdefragd_target_thp_bytes{{{ji}, target=~"$target"}}'))
    nested = parse(
        f"histogram_quantile(0.9, sum by (method, le) "
        f"(rate(memdefragd_request_duration_seconds_bucket{{{ji}}}[$__rate_interval])))"
        f" * on (job, instance) group_left (sha256) memdefragd_config_info{{{ji}}}"
    )
    assert [s.metric for s in nested.selectors] == [
        "memdefragd_request_duration_seconds_bucket", "memdefragd_config_info"
    ]  # fmt: skip
    assert nested.labels == {"method", "le", "job", "instance", "sha256"}
    assert nested.calls == {"histogram_quantile", "sum", "rate"}
    with pytest.raises(ValueError):
        parse("sum(rate(x[5m])")
    good = dashboard()
    imported = json.loads(json.dumps(good).replace("${datasource}", "${DS_PROMETHEUS}"))
    imported["templating"]["list"][0]["name"] = "ds_prometheus"
    assert len(template_findings(imported)) == 4  # the variable, ${DS_…}, job's, instance's
    bad = json.loads(json.dumps(good))
    del bad["templating"]["list"][1]["allValue"]
    bad["templating"]["list"][2]["refresh"] = 1
    assert template_findings(bad) == [
        "job variable should be multi-select with allValue '.+'",
        "instance variable should refresh on time range change (2)",
    ]
    p = next(p for p in good["panels"] if p["type"] == "timeseries")
    broken = {**p, "description": "", "fieldConfig": {"defaults": {"unit": "MB/s"}}, "targets": []}
    assert len(panel_findings(broken)) == 3
    assert panel_findings({**p, "datasource": {"type": "prometheus", "uid": "prom1"}})


# ---------------------------------------------------------------- the dashboard


def test_dashboard_is_ready_for_file_provisioning():
    d = dashboard()
    assert d.get("id") is None and d["uid"] == "memdefragd"  # a stable uid, no instance id
    assert d["editable"] is False  # uneditable-dashboard rule
    assert template_findings(d) == []


def test_target_variable_follows_job_and_instance():
    d = dashboard()
    v = variable(d, "target")
    assert v is not None and v["type"] == "query" and v["datasource"] == DS
    assert v["multi"] and v["includeAll"] and v["allValue"] == ".+" and v["refresh"] == 2
    queries = {label: parse(expr) for expr, label in variable_queries(d)}
    assert set(queries) == {"job", "instance", "target"}
    for label, narrowed_by in (("instance", ["job"]), ("target", ["job", "instance"])):
        (sel,) = queries[label].selectors
        for name in narrowed_by:
            assert (name, "=~", f"${name}") in sel.matchers, label


def test_every_panel_passes_the_panel_and_target_rules():
    findings = [f for p in panels(dashboard()) for f in panel_findings(p)]
    assert findings == []


def test_dashboard_queries_parse(promtool, tmp_path):
    d = dashboard()
    names = [v["name"] for v in d["templating"]["list"]]
    rules = []
    for i, expr in enumerate(dashboard_exprs(d)):
        expanded = expand(expr, names)
        assert not re.search(r"\$(?!\d)", expanded), f"an unknown variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expanded})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = run_promtool(promtool, "check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout


def test_provisioning_points_a_file_provider_at_a_directory():
    conf = yaml.safe_load(PROVISIONING.read_text())
    assert conf["apiVersion"] == 1
    (provider,) = conf["providers"]
    assert provider["type"] == "file" and provider["name"]
    assert Path(provider["options"]["path"]).is_absolute()


# ---------------------------------------------------------------- the alert rules


def test_alert_rules_check(promtool):
    r = run_promtool(promtool, "check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout


def test_alert_rules_unit_tests(promtool):
    r = run_promtool(promtool, "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_alerts_are_labelled_annotated_and_count_with_rate():
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Memdefragd[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert "$labels.instance" in rule["annotations"]["summary"], name
        assert "$" not in rule["expr"], f"{name}: a dashboard variable in an alert"
        assert counter_agg_findings(parse(rule["expr"])) == [], name


def test_every_alert_is_tested_firing_and_not_firing():
    firing, quiet = set(), set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"

"""Writes etc/grafana/memdefragd.json, the Grafana dashboard, with Grafana's own SDK
(grafana-foundation-sdk, pinned in pyproject.toml's `test` extra and constraints.txt):
every panel, query and variable is declared here, and the SDK lays the panels out on the
grid, numbers nothing twice and writes the JSON model.

    python3 -m tools.dashboard           # rewrite etc/grafana/memdefragd.json
    python3 -m tools.dashboard --check   # exit 1, with a diff, if it is out of date

(`make dashboard` runs the first.) tests/deploy/
test_dashboard.py fails when the committed file is not what this writes; tests/deploy/
test_dashboard_rules.py lints the queries and has promtool parse them.

Panels: a row is a list of lines; each line's widths add up to 24 (the grid's width; a
row's last line may be shorter) and the SDK puts each line below the last. Queries filter
on the dashboard's variables: `{JI}` (job and instance) everywhere, `{JIT}` (and target)
on per-target families.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

with warnings.catch_warnings():
    # The SDK steers new code to its v2 dashboard (Grafana 12's resource schema), and says
    # so on import; the classic model is what file provisioning and Grafana 10 to 12 load.
    warnings.filterwarnings("ignore", "Prefer using dashboardv2", DeprecationWarning)
    from grafana_foundation_sdk.builders import common as cb
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.builders import gauge, heatmap, prometheus, stat, table, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as dm
    from grafana_foundation_sdk.models import heatmap as hm
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from tools.generated import write_or_check

OUT = Path(__file__).resolve().parent.parent / "etc" / "grafana" / "memdefragd.json"

DS = common.DataSourceRef(type_val="prometheus", uid="${datasource}")
JI = 'job=~"$job", instance=~"$instance"'
JIT = f'{JI}, target=~"$target"'
GRID = 24

Panel = timeseries.Panel | stat.Panel | gauge.Panel | table.Panel | heatmap.Panel
P = TypeVar("P", timeseries.Panel, stat.Panel, gauge.Panel, table.Panel, heatmap.Panel)
Line = Sequence[Panel]


# ---------------------------------------------------------------- building blocks


def q(expr: str, legend: str = "", *, instant: bool = False) -> prometheus.Dataquery:
    """A Prometheus query: a range query for graphs, an instant one for stats and tables."""
    query = prometheus.Dataquery().expr(expr).legend_format(legend)
    return query.instant() if instant else query.range()


def _panel(
    p: P, title: str, description: str, unit: str, queries: Sequence[prometheus.Dataquery]
) -> P:
    """What every panel has: title, description, unit, and its queries (refId A, B, ...),
    panel and queries on the `datasource` variable."""
    p = p.title(title).description(description).datasource(DS).unit(unit)
    for i, query in enumerate(queries):
        p = p.with_target(query.ref_id(chr(ord("A") + i)).datasource(DS))
    return p


def _thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


OK = ((None, "green"),)
WARN_FROM_1 = ((None, "green"), (1, "orange"))
BAD_FROM_1 = ((None, "green"), (1, "red"))
COVERAGE = ((None, "red"), (0.5, "orange"), (0.8, "green"))


def _reduce() -> cb.ReduceDataOptions:
    return cb.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)


def ts(
    title: str,
    description: str,
    unit: str,
    *queries: prometheus.Dataquery,
    w: int = 12,
    h: int = 8,
    lo: float | None = None,
    hi: float | None = None,
    stack: bool = False,
    bars: bool = False,
) -> timeseries.Panel:
    """A time series: lines (or bars), stacked when the series add up to a whole."""
    p = (
        _panel(timeseries.Panel(), title, description, unit, queries)
        .span(w)
        .height(h)
        .draw_style(common.GraphDrawStyle.BARS if bars else common.GraphDrawStyle.LINE)
        .fill_opacity(30 if stack else 10)
        .line_width(1)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(False)
        .stacking(
            cb.StackingConfig()
            .mode(common.StackingMode.NORMAL if stack else common.StackingMode.NONE)
            .group("A")
        )
        .legend(
            cb.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(
            cb.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    if lo is not None:
        p = p.min(lo)
    if hi is not None:
        p = p.max(hi)
    return p


def ratio(
    title: str, description: str, *queries: prometheus.Dataquery, w: int = 12
) -> timeseries.Panel:
    """A time series of shares, from 0 to 100%."""
    return ts(title, description, "percentunit", *queries, w=w, lo=0, hi=1)


def big(
    title: str,
    description: str,
    unit: str,
    expr: str,
    legend: str,
    steps: Sequence[tuple[float | None, str]] = OK,
    w: int = 4,
) -> stat.Panel:
    """A single figure, now."""
    return (
        _panel(stat.Panel(), title, description, unit, [q(expr, legend, instant=True)])
        .span(w)
        .height(4)
        .thresholds(_thresholds(*steps))
        .reduce_options(_reduce())
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .justify_mode(common.BigValueJustifyMode.AUTO)
        .text_mode(common.BigValueTextMode.AUTO)
        .orientation(common.VizOrientation.AUTO)
    )


def listing(
    title: str,
    description: str,
    unit: str,
    expr: str,
    *,
    value: str | None = None,
    hide: Sequence[str] = (),
    rename: dict[str, str] | None = None,
    ascending: bool | None = None,
    steps: Sequence[tuple[float | None, str]] | None = None,
    w: int = 12,
    h: int = 8,
) -> table.Panel:
    """A table of an instant query, one row per series: its labels as columns, then the
    value as `value` (or no value column at all when `value` is None)."""
    query = q(expr, instant=True).format(PromQueryFormat.TABLE)
    renamed = dict(rename or {})
    excluded: dict[str, bool] = {"Time": True, **{label: True for label in hide}}
    if value is None:
        excluded["Value"] = True
    else:
        renamed["Value"] = value
    p = (
        _panel(table.Panel(), title, description, unit, [query])
        .span(w)
        .height(h)
        .show_header(True)
        .cell_height(common.TableCellHeight.SM)
    )
    if value is not None and ascending is not None:
        p = p.sort_by([cb.TableSortByFieldState().display_name(value).desc(not ascending)])
    if steps is not None:
        p = p.thresholds(_thresholds(*steps)).cell_options(
            common.TableColoredBackgroundCellOptions()
        )
    organize = {"excludeByName": excluded} | ({"renameByName": renamed} if renamed else {})
    return p.with_transformation(dm.DataTransformerConfig(id_val="organize", options=organize))


def quantiles(metric: str, by: str, selector: str, legend: str) -> list[prometheus.Dataquery]:
    """Median and 99th percentile of a histogram, grouped `by` (plus le)."""
    group = f"{by}, le" if by else "le"
    space = f"{legend} " if legend else ""
    return [
        q(
            f"histogram_quantile({p}, sum by ({group}) "
            f"(rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
            f"{space}p{name}",
        )
        for p, name in ((0.5, "50"), (0.99, "99"))
    ]


# ---------------------------------------------------------------- the rows


def fleet_overview() -> list[Line]:
    return [
        [
            big(
                "Daemons",
                "memdefragd instances reporting (memdefragd_build_info), of the selected jobs "
                "and instances.",
                "none",
                f"count(memdefragd_build_info{{{JI}}})",
                "daemons",
            ),
            big(
                "Targets",
                "Distinct configured targets that matched at least one process at the last scan.",
                "none",
                f"count(count by (target) (memdefragd_target_processes{{{JIT}}} > 0))",
                "targets",
            ),
            big(
                "Processes",
                "Processes matched by the selected targets at the last scan, summed over "
                "instances.",
                "none",
                f"sum(memdefragd_target_processes{{{JIT}}})",
                "processes",
            ),
            _panel(
                gauge.Panel(),
                "THP coverage",
                "Share of the selected targets' resident bytes that sit in PMD-mapped (2 MiB) "
                "huge pages: sum of memdefragd_target_thp_bytes over sum of "
                "memdefragd_target_present_bytes.",
                "percentunit",
                [
                    q(
                        f"sum(memdefragd_target_thp_bytes{{{JIT}}}) / "
                        f"sum(memdefragd_target_present_bytes{{{JIT}}})",
                        "THP coverage",
                        instant=True,
                    )
                ],
            )
            .span(4)
            .height(4)
            .min(0)
            .max(1)
            .thresholds(_thresholds(*COVERAGE))
            .reduce_options(_reduce())
            .show_threshold_labels(False)
            .show_threshold_markers(True)
            .orientation(common.VizOrientation.AUTO),
            big(
                "Verified bytes/s",
                "Bytes per second found mapped by huge pages when re-read after a request "
                "(memdefragd_verified_bytes_total), all methods and instances.",
                "binBps",
                f"sum(rate(memdefragd_verified_bytes_total{{{JIT}}}[$__rate_interval]))",
                "verified",
            ),
            big(
                "Paused",
                "Instances whose work is paused now (memdefragd_paused, any reason: memory "
                "pressure or low available memory).",
                "none",
                f"sum(memdefragd_paused{{{JI}}}) or vector(0)",
                "paused",
                WARN_FROM_1,
            ),
        ],
        [
            listing(
                "Versions and configs",
                "Per instance: memdefragd version (memdefragd_build_info) and the sha256 of "
                "the loaded config (memdefragd_config_info). Differing hashes across a fleet "
                "mean differing configs.",
                "none",
                f"max by (job, instance, version) (memdefragd_build_info{{{JI}}}) "
                f"* on (job, instance) group_left (sha256) "
                f"max by (job, instance, sha256) (memdefragd_config_info{{{JI}}})",
                rename={"sha256": "config sha256"},
                w=24,
                h=5,
            )
        ],
    ]


def fleet() -> list[Line]:
    """For one memdefragd per node: which nodes and targets need a look."""
    return [
        [
            big(
                "Daemons down",
                "Scrape targets of the selected jobs whose last scrape failed (up == 0): "
                "memdefragd is not running there or its endpoint is unreachable "
                "(MemdefragdDown fires after 5 minutes of it).",
                "none",
                f"count(up{{{JI}}} == 0) or vector(0)",
                "down",
                BAD_FROM_1,
                w=6,
            ),
            big(
                "Not cycling",
                "Instances whose last completed scan cycle is older than three scan intervals "
                "(at least 5 minutes): memdefragd_last_cycle_timestamp_seconds against "
                "memdefragd_cycle_interval_seconds (scan_interval, or longer when a cycle's "
                "own cost stretched it; memdefragd_scan_interval_seconds where a daemon does "
                "not export it), as MemdefragdNotCycling reads them.",
                "none",
                f"count(time() - memdefragd_last_cycle_timestamp_seconds{{{JI}}} "
                f"> clamp_min(3 * memdefragd_cycle_interval_seconds{{{JI}}} "
                f"or 3 * memdefragd_scan_interval_seconds{{{JI}}}, 300)) or vector(0)",
                "not cycling",
                WARN_FROM_1,
                w=6,
            ),
            big(
                "Method refused",
                "Instances whose config asks for a method the machine cannot carry out "
                "(memdefragd_method_refused, e.g. collapse on a kernel before 6.1): the "
                "targets of that method are observed there, not defragmented.",
                "none",
                f"count(max by (job, instance) (memdefragd_method_refused{{{JI}}}) > 0) "
                f"or vector(0)",
                "refusing",
                WARN_FROM_1,
                w=6,
            ),
            big(
                "Collectors failing",
                "Instances where an exporter collector failed at the last scrape "
                "(memdefragd_collector_success 0): that group's families are missing there.",
                "none",
                f"count(min by (job, instance) (memdefragd_collector_success{{{JI}}}) == 0) "
                f"or vector(0)",
                "failing",
                WARN_FROM_1,
                w=6,
            ),
        ],
        [
            listing(
                "Lowest THP coverage",
                "The 10 target-and-instance pairs with the lowest THP coverage now "
                "(bottomk of memdefragd_target_thp_coverage_ratio): where huge pages are "
                "missing most, whichever node it is on.",
                "percentunit",
                f"bottomk(10, memdefragd_target_thp_coverage_ratio{{{JIT}}})",
                value="THP coverage",
                hide=("__name__", "job"),
                ascending=True,
                steps=COVERAGE,
            ),
            listing(
                "Most collapsible bytes",
                "The 10 target-and-instance pairs with the most bytes of aligned regions "
                "that could still be collapsed (topk of memdefragd_target_collapsible_bytes): "
                "where the work left is.",
                "bytes",
                f"topk(10, memdefragd_target_collapsible_bytes{{{JIT}}})",
                value="collapsible",
                hide=("__name__", "job"),
                ascending=False,
            ),
        ],
        [
            ratio(
                "THP coverage by instance",
                "Per instance: the selected targets' bytes mapped by huge pages over their "
                "resident bytes (memdefragd_target_thp_bytes over "
                "memdefragd_target_present_bytes).",
                q(
                    f"sum by (instance) (memdefragd_target_thp_bytes{{{JIT}}}) / "
                    f"sum by (instance) (memdefragd_target_present_bytes{{{JIT}}})",
                    "{{instance}}",
                ),
                w=8,
            ),
            ts(
                "Time since the last cycle",
                "The 10 instances whose last completed scan cycle is the oldest (time() "
                "minus memdefragd_last_cycle_timestamp_seconds); it should stay near the "
                "scan interval.",
                "s",
                q(
                    f"topk(10, time() - memdefragd_last_cycle_timestamp_seconds{{{JI}}})",
                    "{{instance}}",
                ),
                w=8,
                lo=0,
            ),
            listing(
                "Refused methods",
                "Each instance and method it refuses (memdefragd_method_refused is 1): the "
                "kernel there lacks what the method needs, so its targets are only observed.",
                "none",
                f"max by (instance, method) (memdefragd_method_refused{{{JI}}}) > 0",
                w=8,
            ),
        ],
    ]


def per_target() -> list[Line]:
    return [
        [
            ratio(
                "THP coverage by target",
                "Huge (PMD-mapped) 2 MiB regions over aligned 2 MiB regions, per target and "
                "instance (memdefragd_target_thp_coverage_ratio).",
                q(
                    f"memdefragd_target_thp_coverage_ratio{{{JIT}}}",
                    "{{target}} @ {{instance}}",
                ),
            ),
            ratio(
                "Contiguity coverage by target",
                "Share of present pages inside the K largest translation-contiguous runs, "
                "i.e. what a K-entry range TLB would cover "
                "(memdefragd_target_contiguity_coverage_ratio).",
                q(
                    f"memdefragd_target_contiguity_coverage_ratio{{{JIT}}}",
                    "{{target}} K={{k}} @ {{instance}}",
                ),
            ),
        ],
        [
            ts(
                "Resident, huge and collapsible bytes",
                "Per target, summed over instances: resident bytes in scanned VMAs, bytes "
                "mapped by huge pages, and bytes of aligned regions that could still be "
                "collapsed.",
                "bytes",
                q(
                    f"sum by (target) (memdefragd_target_present_bytes{{{JIT}}})",
                    "{{target}} resident",
                ),
                q(f"sum by (target) (memdefragd_target_thp_bytes{{{JIT}}})", "{{target}} huge"),
                q(
                    f"sum by (target) (memdefragd_target_collapsible_bytes{{{JIT}}})",
                    "{{target}} collapsible",
                ),
            ),
            ts(
                "Contiguity runs by target",
                "Translation-contiguous runs (virtual and physical page numbers both step by "
                "one) per target and instance; fewer runs for the same memory means a more "
                "contiguous layout.",
                "short",
                q(f"memdefragd_target_contiguity_runs{{{JIT}}}", "{{target}} @ {{instance}}"),
            ),
        ],
    ]


def _rate(metric: str, by: str, selector: str = JIT) -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}[$__rate_interval]))"


def throughput() -> list[Line]:
    return [
        [
            ts(
                "Attempted, done and verified bytes/s",
                "Per method: bytes of regions sent to the kernel, bytes the kernel reported "
                "collapsed, and bytes found huge when re-read afterwards.",
                "binBps",
                *(
                    q(_rate(f"memdefragd_{kind}_bytes_total", "method"), f"{{{{method}}}} {kind}")
                    for kind in ("attempted", "done", "verified")
                ),
            ),
            ts(
                "Requests by result",
                "Defrag requests per second, by method and result (memdefragd_requests_total).",
                "reqps",
                q(_rate("memdefragd_requests_total", "method, result"), "{{method}} {{result}}"),
                stack=True,
            ),
        ],
        [
            ratio(
                "Verified share of done bytes",
                "Bytes verified huge after a request over bytes the kernel reported done; "
                "below 100% means collapsed memory was split again or re-read found it "
                "otherwise.",
                q(
                    f"{_rate('memdefragd_verified_bytes_total', 'method')} / "
                    f"{_rate('memdefragd_done_bytes_total', 'method')}",
                    "{{method}}",
                ),
            ),
            ts(
                "Queue and budget",
                "Bytes planned and not yet done (memdefragd_queued_bytes), and bytes that may "
                "start now under the bytes/s budget (memdefragd_budget_available_bytes), per "
                "instance.",
                "bytes",
                q(f"memdefragd_queued_bytes{{{JI}}}", "queued @ {{instance}}"),
                q(f"memdefragd_budget_available_bytes{{{JI}}}", "budget available @ {{instance}}"),
            ),
        ],
    ]


def access_and_pacing() -> list[Line]:
    """Gentle: work queued by how hot its regions are, and the rests between requests."""
    pending = f"memdefragd_pending_bytes{{{JIT}}}"
    return [
        [
            ts(
                "Pending bytes by heat",
                "Bytes planned and not yet done, by how hot their regions are "
                "(memdefragd_pending_bytes): hot (at least half their pages accessed in the "
                "last window), cold, untouched (none: queued last or, with access.untouched "
                "skip, held back) and unknown (not measured).",
                "bytes",
                q(f"sum by (heat) ({pending})", "{{heat}}"),
                stack=True,
            ),
            ratio(
                "Hot share of pending bytes",
                "Per target: pending bytes in hot regions over all pending bytes "
                '(memdefragd_pending_bytes{heat="hot"}); hot work is the work whose huge '
                "pages pay off first.",
                q(
                    f'sum by (target) (memdefragd_pending_bytes{{{JIT}, heat="hot"}}) / '
                    f"(sum by (target) ({pending}) > 0)",
                    "{{target}}",
                ),
            ),
        ],
        [
            ts(
                "Pacing rest after a request",
                "The rest imposed on a latency-sensitive target after each request: median "
                "and 99th percentile per target from memdefragd_pacing_delay_seconds.",
                "s",
                *quantiles("memdefragd_pacing_delay_seconds", "target", JIT, "{{target}}"),
            ),
            ratio(
                "Time resting per second",
                "Per target, averaged over instances: the share of time its work rests "
                "between paced requests (rate of memdefragd_pacing_delay_seconds_sum).",
                q(
                    f"avg by (target) "
                    f"(rate(memdefragd_pacing_delay_seconds_sum{{{JIT}}}[$__rate_interval]))",
                    "{{target}}",
                ),
            ),
        ],
    ]


def forks_and_regressions() -> list[Line]:
    """Persistent: huge pages split again (after a fork, or otherwise) and made huge again."""
    return [
        [
            ts(
                "Forks",
                "Forks of tracked processes per second, per target (memdefragd_forks_total): "
                "a fork's copy-on-write may split the parent's huge pages.",
                "ops",
                q(_rate("memdefragd_forks_total", "target"), "{{target}}"),
            ),
            ts(
                "Regressions by cause",
                "Times per second huge regions of a process were found split again, per "
                "target and cause (memdefragd_regressions_total): fork (after a fork child "
                "exited) or drop (coverage fell otherwise).",
                "ops",
                q(_rate("memdefragd_regressions_total", "target, cause"), "{{target}} {{cause}}"),
                stack=True,
            ),
        ],
        [
            ts(
                "Bytes made huge again",
                "Bytes per second collapsed again after they had been split, per target "
                "(memdefragd_recollapsed_bytes_total).",
                "binBps",
                q(_rate("memdefragd_recollapsed_bytes_total", "target"), "{{target}}"),
            ),
            ts(
                "Fork restore time",
                "From a fork child's exit to its parent's THP coverage restored: median and "
                "99th percentile per target from memdefragd_fork_restore_seconds.",
                "s",
                *quantiles("memdefragd_fork_restore_seconds", "target", JIT, "{{target}}"),
            ),
        ],
    ]


def failures() -> list[Line]:
    return [
        [
            ts(
                "Failed regions by reason",
                "2 MiB regions that failed to collapse, per second, by reason (errno name, "
                "e.g. EAGAIN, EBUSY, ENOMEM) (memdefragd_failures_total).",
                "ops",
                q(_rate("memdefragd_failures_total", "target, reason"), "{{target}} {{reason}}"),
                stack=True,
            ),
            ts(
                "Races and errors",
                "Processes that exited or refused access mid-work (memdefragd_races_total), "
                "and unexpected errors the daemon carried on after (memdefragd_errors_total), "
                "per second by kind.",
                "ops",
                q(_rate("memdefragd_races_total", "kind", JI), "race: {{kind}}"),
                q(_rate("memdefragd_errors_total", "kind", JI), "error: {{kind}}"),
            ),
        ],
        [
            ts(
                "Metrics collectors",
                "1 when the exporter's collector succeeded at the last scrape, 0 when it "
                "failed (memdefragd_collector_success); a failed collector leaves its "
                "families out of the scrape.",
                "bool",
                q(
                    f"min by (collector) (memdefragd_collector_success{{{JI}}})",
                    "{{collector}}",
                ),
                lo=0,
                hi=1,
            ),
        ],
    ]


def cost() -> list[Line]:
    return [
        [
            ts(
                "Scan time per second",
                "Wall time spent scanning processes per second of real time (rate of "
                "memdefragd_scan_duration_seconds_sum): the share of one core the scans "
                "take, per instance.",
                "percentunit",
                q(_rate("memdefragd_scan_duration_seconds_sum", "instance", JI), "{{instance}}"),
            ),
            ts(
                "Scan duration per process",
                "Time to scan one process: median and 99th percentile from "
                "memdefragd_scan_duration_seconds.",
                "s",
                *quantiles("memdefragd_scan_duration_seconds", "", JI, ""),
            ),
        ],
        [
            ts(
                "Pages scanned per second",
                "Present pages the scans read per second (memdefragd_scanned_pages_total), "
                "per instance.",
                "short",
                q(_rate("memdefragd_scanned_pages_total", "instance", JI), "{{instance}}"),
            ),
            ts(
                "Kernel time in requests per second",
                "Time spent inside the kernel carrying out defrag requests per second of "
                "real time (rate of memdefragd_request_duration_seconds_sum), per method; "
                "compare with the CPU budget.",
                "percentunit",
                q(_rate("memdefragd_request_duration_seconds_sum", "method", JI), "{{method}}"),
            ),
        ],
        [
            ts(
                "Request duration",
                "Time in the kernel per request: median and 99th percentile per method from "
                "memdefragd_request_duration_seconds.",
                "s",
                *quantiles("memdefragd_request_duration_seconds", "method", JI, "{{method}}"),
            ),
            ts(
                "CPU budget used",
                "CPU time (the kernel's collapsing, the daemon's watching) used over the CPU "
                "budget's window (memdefragd_budget_cpu_used_ratio); at 100% requests wait "
                "for the window to move on.",
                "percentunit",
                q(f"memdefragd_budget_cpu_used_ratio{{{JI}}}", "{{instance}}"),
                lo=0,
            ),
        ],
        [
            ts(
                "Watching CPU per target",
                "CPU time the daemon spends scanning each target's processes per second of "
                "real time (rate of memdefragd_scan_cpu_seconds_total), and all of its "
                "watching: discovery, matching, scans and planning "
                "(memdefragd_watch_cpu_seconds_total), charged to budget.cpu_share.",
                "percentunit",
                q(_rate("memdefragd_scan_cpu_seconds_total", "target"), "{{target}}"),
                q(
                    _rate("memdefragd_watch_cpu_seconds_total", "instance", JI),
                    "all @ {{instance}}",
                ),
            ),
            ts(
                "Scans read and kept",
                "Process scans per second by result (memdefragd_scans_total): read, or kept "
                "(a full cycle kept the last scan of a process with nothing to do and no "
                "fault since).",
                "short",
                q(_rate("memdefragd_scans_total", "result"), "{{result}}"),
            ),
        ],
        [
            ts(
                "Collector duration",
                "Time each exporter collector took at the last scrape "
                "(memdefragd_collector_duration_seconds).",
                "s",
                q(
                    f"max by (collector) (memdefragd_collector_duration_seconds{{{JI}}})",
                    "{{collector}}",
                ),
                w=24,
            )
        ],
    ]


def discovery() -> list[Line]:
    return [
        [
            ts(
                "Discovery duration",
                "Time to list every process and match it against the targets (one "
                "rescan): median and 99th percentile from "
                "memdefragd_discovery_duration_seconds.",
                "s",
                *quantiles("memdefragd_discovery_duration_seconds", "", JI, ""),
                w=8,
            ),
            ts(
                "Discovery time per second",
                "Wall time spent in discovery rescans per second of real time (rate of "
                "memdefragd_discovery_duration_seconds_sum), per instance.",
                "percentunit",
                q(
                    _rate("memdefragd_discovery_duration_seconds_sum", "instance", JI),
                    "{{instance}}",
                ),
                w=8,
            ),
            ts(
                "Processes listed and tracked",
                "Processes the last complete rescan read "
                "(memdefragd_discovery_listed_processes) and processes the targets claim now "
                "(memdefragd_discovery_tracked_processes), per instance.",
                "short",
                q(f"memdefragd_discovery_listed_processes{{{JI}}}", "listed @ {{instance}}"),
                q(f"memdefragd_discovery_tracked_processes{{{JI}}}", "tracked @ {{instance}}"),
                w=8,
            ),
        ],
    ]


def pauses() -> list[Line]:
    return [
        [
            ts(
                "Paused",
                "1 while an instance's work is paused, by reason: pressure (PSI memory some "
                "avg10 over the threshold) or low_memory (MemAvailable under the minimum) "
                "(memdefragd_paused).",
                "bool_yes_no",
                q(
                    f'max by (instance, reason) (memdefragd_paused{{{JI}, reason!=""}})',
                    "{{instance}} {{reason}}",
                ),
                w=8,
                lo=0,
                hi=1,
            ),
            ts(
                "Memory pressure",
                "PSI memory 'some avg10' at the daemon's last reading, as a ratio "
                "(memdefragd_memory_pressure_some_ratio); work pauses above the configured "
                "threshold.",
                "percentunit",
                q(f"memdefragd_memory_pressure_some_ratio{{{JI}}}", "{{instance}}"),
                w=8,
                lo=0,
            ),
            ts(
                "Config reloads",
                "Config reloads per interval by result (memdefragd_config_reloads_total); a "
                "failed reload keeps the previous config running.",
                "short",
                q(
                    f"sum by (instance, result) "
                    f"(increase(memdefragd_config_reloads_total{{{JI}}}[$__rate_interval]))",
                    "{{instance}} {{result}}",
                ),
                w=8,
                bars=True,
            ),
        ],
    ]


def free_memory() -> list[Line]:
    unusable = (
        _panel(
            heatmap.Panel(),
            "Unusable free space index by order",
            "Gorman's unusable free space index per buddy order: the share of free memory in "
            "blocks smaller than 2^order pages, so unusable for an allocation of that order "
            "(0 good, 1 fully fragmented). Worst node and zone of the selected instances, "
            "orders zero-padded (00 to 10) so the rows sort; order 09 is a 2 MiB huge page on "
            "x86-64.",
            "percentunit",
            [
                q(
                    f"label_replace(max by (order) "
                    f"(memdefragd_unusable_free_space_index_ratio{{{JI}}}), "
                    f'"order", "0$1", "order", "([0-9])")',
                    "{{order}}",
                )
            ],
        )
        .span(24)
        .height(10)
        .hide_from(cb.HideSeriesConfig().legend(False).tooltip(False).viz(False))
        .scale_distribution(cb.ScaleDistributionConfig().type(common.ScaleDistribution.LINEAR))
        .calculate(False)
        .cell_gap(1)
        .cell_values(heatmap.CellValues().unit("percentunit").decimals(2))
        .color(
            heatmap.HeatmapColorOptions()
            .mode(hm.HeatmapColorMode.SCHEME)
            .scheme("RdYlGn")
            .reverse(True)
            .fill("dark")
            .scale(hm.HeatmapColorScale.LINEAR)
            .exponent(0.5)
            .steps(64)
            .min(0)
            .max(1)
        )
        .exemplars_color("rgba(255,0,255,0.7)")
        .filter_values(heatmap.FilterValueRange().le(1e-9))
        .show_legend()
        .rows_frame(
            heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.AUTO).value("index")
        )
        .tooltip(
            heatmap.HeatmapTooltip()
            .mode(common.TooltipDisplayMode.SINGLE)
            .y_histogram(False)
            .show_color_scale(True)
        )
        .y_axis(
            heatmap.YAxisConfig()
            .axis_placement(common.AxisPlacement.LEFT)
            .axis_label("order")
            .unit("none")
            .reverse(False)
        )
    )
    free = f"memdefragd_free_blocks{{{JI}"
    return [
        [unusable],
        [
            ratio(
                "Unusable index at 2 MiB (order 9) by zone",
                "The unusable free space index at order 9 (2 MiB blocks) per instance, node "
                "and zone: how hard a huge-page allocation is there now.",
                q(
                    f'memdefragd_unusable_free_space_index_ratio{{{JI}, order="9"}}',
                    "{{instance}} node {{node}} {{zone}}",
                ),
            ),
            ts(
                "Free 2 MiB-or-larger blocks by zone",
                "Free blocks of order 9 and 10 (/proc/buddyinfo via memdefragd_free_blocks) "
                "per instance, node and zone, counted in 2 MiB units.",
                "short",
                q(
                    f'sum by (instance, node, zone) ({free}, order="9"}}) + '
                    f'2 * sum by (instance, node, zone) ({free}, order="10"}})',
                    "{{instance}} node {{node}} {{zone}}",
                ),
            ),
        ],
    ]


ROWS = (
    ("Fleet overview", fleet_overview),
    ("Fleet: one memdefragd per node", fleet),
    ("Per-target THP coverage and contiguity", per_target),
    ("Defrag throughput", throughput),
    ("Access and pacing", access_and_pacing),
    ("Forks and regressions", forks_and_regressions),
    ("Failures", failures),
    ("Daemon cost", cost),
    ("Discovery", discovery),
    ("Pauses and pressure", pauses),
    ("Free memory fragmentation", free_memory),
)


# ---------------------------------------------------------------- the dashboard


def variable(name: str, description: str, selector: str) -> db.QueryVariable:
    """A multi-value label_values() variable that follows the time range, all by default."""
    query = f"label_values({selector}, {name})"
    return (
        db.QueryVariable(name)
        .label(name.title())
        .description(description)
        .datasource(DS)
        .query(query)
        .definition(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".+")
        .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .regex("")
        .hide(dm.VariableHide.DONT_HIDE)
    )


def build() -> dm.Dashboard:
    """The dashboard model, every panel numbered in order from 1."""
    d = (
        db.Dashboard("memdefragd")
        .uid("memdefragd")
        .description(
            "memdefragd: huge-page coverage and contiguity of the targets it watches, the "
            "defragmentation it carries out, its failures, pauses and cost, and free-memory "
            "fragmentation; per node for a fleet; pacing, forks and regressions, and "
            "discovery."
        )
        .tags(["memdefragd", "memory", "thp"])
        .readonly()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .refresh("1m")
        .time("now-6h", "now")
        .timezone("browser")
        .fiscal_year_start_month(0)
        .live_now(False)
        .week_start("")
        .version(1)
        .annotation(
            db.AnnotationQuery()
            .built_in(1)
            .datasource(common.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .enable(True)
            .hide(True)
            .icon_color("rgba(0, 211, 255, 1)")
            .name("Annotations & Alerts")
            .type("dashboard")
        )
        .with_variable(
            db.DatasourceVariable("datasource")
            .label("Data source")
            .description("The Prometheus data source that scrapes memdefragd.")
            .type("prometheus")
            .regex("")
            .hide(dm.VariableHide.DONT_HIDE)
        )
        .with_variable(
            variable("job", "Prometheus jobs that scrape memdefragd.", "memdefragd_build_info")
        )
        .with_variable(
            variable(
                "instance",
                "memdefragd instances (hosts) of the selected jobs.",
                'memdefragd_build_info{job=~"$job"}',
            )
        )
        .with_variable(
            variable(
                "target",
                "Targets from memdefragd's config (targets[].name).",
                f"memdefragd_target_processes{{{JI}}}",
            )
        )
    )
    for title, lines in ROWS:
        d = d.with_row(db.Row(title).collapsed(False))
        block = lines()
        for i, line in enumerate(block):
            width = sum(_pos(p).w for p in line)
            if width != GRID and not (i == len(block) - 1 and width < GRID):
                raise ValueError(f"{title}: line {i} is {width} wide, not {GRID}")
            for p in line:
                d = d.with_panel(p)
    model = d.build()
    for n, panel in enumerate(model.panels or [], 1):
        panel.id_val = n
    return model


def _pos(p: Panel) -> dm.GridPos:
    pos = p.build().grid_pos
    if pos is None:
        raise ValueError(f"{p.build().title}: no size")
    return pos


def render() -> str:
    """The dashboard as JSON, keys sorted, as it is committed."""
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    return write_or_check(OUT, render(), argv, "python3 -m tools.dashboard")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

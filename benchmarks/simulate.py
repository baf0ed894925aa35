"""Every method on one aged simulated machine, side by side, then a big machine's ranger.

    python3 benchmarks/simulate.py [--memory 16G] [--seed 1] [--big-memory 64G | --no-big]

Ages one machine (default 16 GiB to an unusable index of 0.7 at order 9, 2% scattered
unmovable frames, the default workload: a 4 GiB THP database, four web workers, a batch
job without THP), copies it once per method, runs the method over every process, and
prints one row per method, pooled over all processes as one contiguity-aware TLB would
see them: coverage@128, runs_for(0.99), the largest run against `none`'s, THP coverage,
pages moved (copied: an exchange moves two) and the method's wall time. Then the same two
figures for the largest process alone (the paper's claims are per application), next to
the best any placement could do there: the share of it that the 128 largest gaps between
unmovable frames could hold. Last, a ranger run on a --big-memory machine, timed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memdefragd.backends.sim.aging import Scenario, age
from memdefragd.backends.sim.machine import NONLRU, UNMOVABLE, Machine
from memdefragd.commands.simulate import METHODS, Figures, apply, measure
from memdefragd.units import format_size, parse_size


def gap_bound(m: Machine, pages: int, k: int = 128) -> float:
    """Largest share of `pages` that k runs could cover: the k largest stretches of
    frames with no unmovable or non-LRU frame, within one zone."""
    bad = (m.kind == UNMOVABLE) | (m.kind == NONLRU)
    lengths = []
    for z in m.zones:
        good = np.concatenate(([False], ~bad[z.start_pfn : z.end_pfn], [False]))
        edges = np.flatnonzero(np.diff(good.view(np.int8)))
        lengths.append(edges[1::2] - edges[0::2])
    top = np.sort(np.concatenate(lengths))[::-1][:k]
    return min(1.0, float(top.sum()) / pages)


def biggest(f: Figures):
    return max(f.processes, key=lambda p: p.totals.present_pages)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="16G", help="machine size (default 16G)")
    ap.add_argument("--fragmentation", type=float, default=0.7)
    ap.add_argument("--unmovable", type=float, default=0.02)
    ap.add_argument("--unmovable-layout", default="scattered", choices=["scattered", "clustered"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--big-memory", default="64G", help="the big ranger run (default 64G)")
    ap.add_argument("--no-big", action="store_true", help="skip the big ranger run")
    args = ap.parse_args()

    def scenario(memory: str) -> Scenario:
        return Scenario(
            memory=parse_size(memory),
            fragmentation=args.fragmentation,
            unmovable=args.unmovable,
            unmovable_layout=args.unmovable_layout,
            seed=args.seed,
        )

    sc = scenario(args.memory)
    t0 = time.perf_counter()
    aged = age(sc)
    aging = time.perf_counter() - t0
    t0 = time.perf_counter()
    before = measure(aged)
    scan = time.perf_counter() - t0
    big = biggest(before)
    print(
        f"{format_size(sc.memory)} ({aged.nframes} frames), unusable index at order 9 "
        f"{aged.meta['unusable_index_9']:.3f}, {aged.meta['unmovable']:.1%} "
        f"{sc.unmovable_layout} unmovable, seed {sc.seed}: aged in {aging:.2f} s, "
        f"measured in {scan:.2f} s"
    )
    print(
        f"{len(before.processes)} processes, "
        f"{format_size(before.totals.present_pages * 4096)} resident; largest: "
        f"{big.comm} {format_size(big.totals.present_pages * 4096)}"
    )
    print()
    head = (
        f"{'method':<16}{'cov@128':>9}{'runs_for(.99)':>15}{'largest':>10}{'x none':>8}"
        f"{'THP cov':>9}{'moved':>12}{'time s':>8}  | {big.comm + ' cov@128':>13}"
        f"{'runs_for(.99)':>15}"
    )
    print(head)
    print("-" * len(head))
    none_largest = before.totals.contiguity.largest_run
    for method in METHODS:
        m = copy.deepcopy(aged)
        work = apply(m, method)
        after = measure(m)
        c = after.totals.contiguity
        mine = next(p for p in after.processes if p.pid == big.pid).totals.contiguity
        moved = work.bytes_copied // 4096
        thp = after.totals.thp_coverage or 0.0
        print(
            f"{method:<16}{c.coverage[128]:>9.2%}{c.runs_for[0.99]:>15}"
            f"{format_size(c.largest_run * 4096):>10}{c.largest_run / none_largest:>7.1f}x"
            f"{thp:>9.1%}{moved:>12}{work.seconds:>8.2f}  | {mine.coverage[128]:>13.2%}"
            f"{mine.runs_for[0.99]:>15}"
        )
        del m
    bound = gap_bound(aged, big.totals.present_pages)
    print(
        f"\nbest possible for {big.comm} (its pages in the 128 largest unmovable-free "
        f"stretches): cov@128 {bound:.2%}"
    )
    del aged

    if args.no_big:
        return 0
    big_sc = scenario(args.big_memory)
    print(f"\n{format_size(big_sc.memory)}: ", end="", flush=True)
    t0 = time.perf_counter()
    m = age(big_sc)
    aging = time.perf_counter() - t0
    work = apply(m, "ranger")
    after = measure(m)
    c = after.totals.contiguity
    print(
        f"aged in {aging:.1f} s; ranger over {len(after.processes)} processes "
        f"({format_size(after.totals.present_pages * 4096)}) in {work.seconds:.2f} s: "
        f"{work.bytes_copied // 4096} pages moved, cov@128 "
        f"{c.coverage[128]:.2%}, runs_for(.99) {c.runs_for[0.99]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

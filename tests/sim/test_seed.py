"""Seeding a simulated machine from a snapshot: flags to frame kinds, pages at their frames,
zones, the file format, and `simulate --from-snapshot` end to end, on synthetic snapshots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memdefragd.backends.sim.machine import ANON, CACHE, FREE, HEAD, TAIL, UNMOVABLE
from memdefragd.backends.sim.seed import CODE, classify, free_frames, grow_heads, seed
from memdefragd.cli import main
from memdefragd.model import ZoneFree
from memdefragd.snapshot import (
    KPF_ANON,
    KPF_BUDDY,
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    KPF_HUGE,
    KPF_LRU,
    KPF_MLOCKED,
    KPF_PGTABLE,
    KPF_RESERVED,
    KPF_SLAB,
    KPF_THP,
    KPF_UNEVICTABLE,
    KPF_ZERO_PAGE,
    HostSnapshot,
    ProcessShot,
    SnapshotError,
    VmaShot,
    ZoneSpan,
    load,
    save,
)

F = {n: 1 << b for n, b in [("buddy", KPF_BUDDY), ("lru", KPF_LRU), ("anon", KPF_ANON),
     ("slab", KPF_SLAB), ("pgtable", KPF_PGTABLE), ("reserved", KPF_RESERVED),
     ("huge", KPF_HUGE), ("zero", KPF_ZERO_PAGE), ("head", KPF_COMPOUND_HEAD),
     ("tail", KPF_COMPOUND_TAIL), ("unevictable", KPF_UNEVICTABLE), ("mlocked", KPF_MLOCKED), ("thp", KPF_THP)]}  # fmt: skip
NFRAMES = 8192  # 32 MiB: two 16 MiB zones
BASE_VPN = 0x7F0000000  # 2 MiB-aligned


def names(cls: np.ndarray) -> list[str]:
    rev = {v: k for k, v in CODE.items()}
    return [rev[int(c)] for c in cls]


def test_flags_become_classes():
    flags = np.array(
        [F["buddy"], F["lru"] | F["anon"], F["lru"], F["slab"], F["pgtable"], F["reserved"],
         F["huge"], F["zero"], F["lru"] | F["anon"] | F["mlocked"] | F["unevictable"],
         0, F["anon"], 1 << 11],
        dtype=np.uint64,
    )  # fmt: skip
    free = (flags & np.uint64(F["buddy"])) != 0
    assert names(classify(flags, free)) == [
        "free", "anon", "file", "slab", "pgtable", "reserved", "hugetlb", "zero",
        "unevictable", "noflag", "anon", "other",
    ]  # fmt: skip


def test_flagless_pageblocks_are_unmanaged_and_tails_take_their_heads_class():
    flags = np.zeros(1024, dtype=np.uint64)
    flags[512] = F["slab"] | F["head"]  # a slab page of order 2 whose tails carry no SLAB
    flags[513:516] = F["tail"]
    flags[600] = F["lru"]
    cls = names(classify(flags, np.zeros(1024, dtype=bool)))
    assert set(cls[:512]) == {"unmanaged"}  # a whole flagless pageblock
    assert cls[512:516] == ["slab"] * 4 and cls[516] == "noflag" and cls[600] == "file"


def test_free_blocks_from_heads_only_are_grown_over_flagless_frames():
    flags = np.zeros(64, dtype=np.uint64)
    flags[8] = F["buddy"]  # head of an order-3 block: 8..15 flagless
    flags[16] = F["lru"]
    flags[32] = F["buddy"]  # order 4 at most before the next used frame at 48
    flags[48] = F["slab"]
    free = grow_heads(flags, (flags & np.uint64(F["buddy"])) != 0)
    assert np.flatnonzero(free).tolist() == [*range(8, 16), *range(32, 48)]
    # every frame marked (Linux >= 4.4): taken as it is
    every = np.zeros(64, dtype=np.uint64)
    every[8:16] = F["buddy"]
    got, grown = free_frames(every, buddyinfo_pages=8)
    assert not grown and np.flatnonzero(got).tolist() == list(range(8, 16))
    got, grown = free_frames(flags, buddyinfo_pages=24)  # 2 heads against 24 free pages
    assert grown and int(got.sum()) == 24


def synthetic(tmp_path=None) -> HostSnapshot:
    """Two zones, a free second half, scattered slab, page cache; a process whose VMA
    (16 MiB) holds a THP (at frame 2048), scattered 4 KiB pages, a page on the zero page and one on
    a frame mapped twice."""
    rng = np.random.default_rng(3)
    flags = np.full(NFRAMES, F["lru"], dtype=np.uint64)  # page cache by default
    flags[4096:] = F["buddy"]
    flags[rng.choice(4096, 200, replace=False)] = F["slab"]
    flags[0] = F["reserved"]
    flags[2048:2560] = F["lru"] | F["anon"] | F["tail"]
    flags[2048] |= F["head"]
    flags[3000] = F["zero"]
    vpn = np.arange(BASE_VPN, BASE_VPN + 1024, dtype=np.int64)
    cand = np.setdiff1d(np.flatnonzero(flags[:2048] == F["lru"]), [7])
    pfn = np.concatenate((np.arange(2048, 2560), rng.choice(cand, 510, replace=False), [3000, 7]))
    pfn = pfn.astype(np.int64)
    flags[pfn[512:1022]] |= F["anon"]
    thp = np.zeros(1024, dtype=bool)
    thp[:512] = True
    vma = VmaShot(BASE_VPN, BASE_VPN + 4096, "rw-p", "", True)
    lib = VmaShot(BASE_VPN + 8192, BASE_VPN + 8193, "r--p", "/usr/lib/x.so", False)
    p = ProcessShot(
        4242, "db", ("db",), (vma, lib),
        np.append(vpn, BASE_VPN + 8192), np.append(pfn, 7), np.append(thp, False),
    )  # fmt: skip
    return HostSnapshot(
        kernel="6.18-test",
        taken=0.0,
        seconds=0.1,
        flags=flags,
        zones=(
            ZoneSpan(0, "DMA32", 1, 4095, 4095, 4000),
            ZoneSpan(0, "Normal", 4096, 4096, 4096, 4096),
        ),
        buddyinfo=(ZoneFree(0, "DMA32", (0,) * 11), ZoneFree(0, "Normal", (0,) * 10 + (4,))),
        processes=(p,),
    )


def test_seeded_machine_holds_pages_at_their_frames_and_the_zones():
    snap = synthetic()
    m, s = seed(snap)
    m.check()
    assert [(z.name, z.start_pfn, z.end_pfn) for z in m.zones] == [
        ("DMA32", 0, 4096), ("Normal", 4096, 8192),
    ]  # fmt: skip
    proc = m.processes[4242]
    assert proc.comm == "db" and [v.path for v in proc.vmas] == ["", "/usr/lib/x.so"]
    heap = proc.vmas[0]
    p = snap.processes[0]
    placed = np.append(p.pfn[:1022], 7)  # not the zero page
    assert (heap.pfn[p.vpn[:1022] - BASE_VPN] == p.pfn[:1022]).all()
    assert heap.pfn[1022] == -1  # on the zero page
    assert heap.pfn[1023] == 7 and proc.vmas[1].pfn[0] == -1  # mapped once, first in order
    assert (m.kind[placed] == ANON).all() and (m.owner[placed] == 4242).all()
    assert m.compound[2048] == HEAD and (m.compound[2049:2560] == TAIL).all() and s.thps == 1
    assert (m.kind[4096:] == FREE).all() and m.nr_free == 4096
    assert m.kind[0] == UNMOVABLE and m.kind[3000] == UNMOVABLE
    slab = np.flatnonzero(snap.flags[:4096] == F["slab"])
    assert (m.kind[slab] == UNMOVABLE).all()
    other = np.setdiff1d(np.flatnonzero(snap.flags[:4096] == F["lru"]), placed)
    assert (m.kind[other] == CACHE).all()
    assert s.frames["slab"] == slab.size and s.frames["free"] == 4096 and s.pages == 1023
    text = "\n".join(s.notes)
    assert "1 pages on frames the kernel cannot move" in text
    assert "1 pages on frames mapped already" in text
    assert "zone boundaries moved" in text
    assert m.stats.pages_faulted == 0  # seeding is no work done


def test_snapshot_file_round_trip_and_refusal(tmp_path):
    snap = synthetic()
    path = tmp_path / "s.npz"
    save(snap, path)
    back = load(path)
    assert back.kernel == snap.kernel and back.zones == snap.zones
    assert back.buddyinfo == snap.buddyinfo and np.array_equal(back.flags, snap.flags)
    (p,), (q,) = snap.processes, back.processes
    assert q.vmas == p.vmas and np.array_equal(q.pfn, p.pfn) and np.array_equal(q.thp, p.thp)
    bad = HostSnapshot(snap.kernel, 0, 0, snap.flags[:1000], (), (), snap.processes)
    save(bad, tmp_path / "bad.npz")
    with pytest.raises(SnapshotError, match="beyond"):
        load(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SnapshotError, match="not a readable snapshot"):
        load(tmp_path / "junk.npz")


def test_simulate_from_snapshot_runs_each_method_from_the_same_state(tmp_path, capsys):
    path = tmp_path / "s.npz"
    save(synthetic(), path)
    assert main(["simulate", "--from-snapshot", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "memdefragd.simulate-host/1" and set(doc["methods"]) == {
        "ranger", "ranger-improved",
    }  # fmt: skip
    before = doc["before"]
    assert before["processes"][0]["pid"] == 4242 and before["present_bytes"] == 1023 * 4096
    for m in doc["methods"].values():
        assert m["after"]["present_bytes"] == before["present_bytes"]
        assert m["after"]["runs"] < before["runs"]
        assert m["work"]["pages_migrated"] + m["work"]["pages_exchanged"] > 0
    assert main(["simulate", "--from-snapshot", str(path), "--method", "ranger"]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "ranger" in out and "coverage@128" in out
    assert "runs_for(0.99)" in out and "slab: unmovable" in out
    assert main(["simulate", "--from-snapshot", str(path), "--pid", "1"]) == 2
    assert main(["simulate", "--pid", "1"]) == 2


def test_shmem_pages_are_movable_but_not_on_exchange_pages_terms():
    """tmpfs/shmem page cache (SwapBacked, not anonymous): the RFC's exchange_pages
    refuses it (dst_file_failed on its kernel), migration moves it: the non-LRU kind."""
    from memdefragd.backends.sim.machine import NONLRU
    from memdefragd.backends.sim.seed import MOVABLE, SIM_KIND
    from memdefragd.snapshot import KPF_SWAPBACKED

    swap = 1 << KPF_SWAPBACKED
    flags = np.array([F["lru"] | swap, F["lru"] | F["anon"] | swap, F["lru"]], dtype=np.uint64)
    cls = classify(flags, np.zeros(3, dtype=bool))
    assert names(cls) == ["shmem", "anon", "file"]
    assert SIM_KIND[CODE["shmem"]] == NONLRU and MOVABLE[CODE["shmem"]]


def test_other_processes_thps_stay_whole_and_translation_ranger_stops_at_them():
    """Another process's THP (KPF_THP on 512 aligned frames, head then tails) stays a THP
    (unowned page cache) where RFC 04 stops at each of its frames; a smaller THP-marked
    folio becomes base pages, counted."""
    from dataclasses import replace

    snap = synthetic()
    flags = snap.flags.copy()
    other = F["lru"] | F["anon"] | F["thp"]
    flags[3072:3584] = other | F["tail"]  # no page of the process is there (see synthetic)
    flags[3072] = other | F["head"]
    flags[3584:3840] = other | F["tail"]  # an order-8 folio: not a 2 MiB THP
    flags[3584] = other | F["head"]
    m, s = seed(replace(snap, flags=flags))
    m.check()
    assert s.other_thps == 1 and s.thps == 1
    assert m.compound[3072] == HEAD and (m.compound[3073:3584] == TAIL).all()
    assert (m.kind[3072:3584] == CACHE).all() and (m.compound[3584:3840] == 0).all()
    assert any("1 THPs of other processes" in n and "256 pages" in n for n in s.notes)


def thp_in_window(thp: bool) -> HostSnapshot:
    """A 16 MiB heap with 512 pages present, reversed, whose anchor window (the zone's
    first 512 frames) holds another process's anonymous pages: a THP if `thp`."""
    flags = np.full(NFRAMES, F["lru"], dtype=np.uint64)
    mark = F["anon"] | (F["thp"] if thp else 0)
    flags[:512] |= mark | F["tail"]
    flags[0] = F["lru"] | mark | F["head"]
    pfn = np.arange(4095, 3583, -1, dtype=np.int64)  # reversed: 512 runs
    flags[pfn] |= F["anon"]
    vpn = np.arange(BASE_VPN, BASE_VPN + 512, dtype=np.int64)
    heap = VmaShot(BASE_VPN, BASE_VPN + 4096, "rw-p", "", True)
    p = ProcessShot(7, "heap", ("heap",), (heap,), vpn, pfn, np.zeros(512, dtype=bool))
    return HostSnapshot(
        kernel="5.0-test", taken=0.0, seconds=0.1, flags=flags,
        zones=(ZoneSpan(0, "DMA32", 0, NFRAMES, NFRAMES, NFRAMES),),
        buddyinfo=(ZoneFree(0, "DMA32", (0,) * 11),), processes=(p,),
    )  # fmt: skip


def test_translation_ranger_stops_at_another_process_thp_in_its_window():
    """A heap whose anchor window (the zone's start) holds another process's THP: RFC 04
    stops at each of its 512 frames, RFC 05 splits it and exchanges; the same frames as
    base pages (no KPF_THP) are simply exchanged under either rule."""
    from memdefragd.backends.sim.ranger import ISCA_KERNEL, RFC04_KERNEL, defrag

    def run(thp: bool, knobs) -> tuple[dict[str, int], int, np.ndarray]:
        m, s = seed(thp_in_window(thp))
        assert s.other_thps == int(thp)
        r = defrag(m, 7, knobs=knobs)
        m.check()
        return r.failures, r.pages_exchanged, m.processes[7].vmas[0].pfn[:512]

    failures, exchanged, pfn = run(True, RFC04_KERNEL)
    absent = {"src_not_present": 4096 - 512}  # the rest of the 16 MiB heap
    assert failures == {"dst_thp_src_not_failed": 1, "dst_pte_thp_failed": 511, **absent}
    assert exchanged == 0 and (pfn == np.arange(4095, 3583, -1)).all()
    failures, exchanged, pfn = run(True, ISCA_KERNEL)
    assert exchanged == 512 and (pfn == np.arange(512)).all()
    for knobs in (RFC04_KERNEL, ISCA_KERNEL):
        failures, exchanged, pfn = run(False, knobs)
        assert failures == absent and exchanged == 512 and (pfn == np.arange(512)).all()


def test_simulate_ranger_rules_rfc04_from_a_snapshot(tmp_path, capsys):
    path = tmp_path / "s.npz"
    save(thp_in_window(True), path)
    work = {}
    for rules in ("rfc05", "rfc04"):
        argv = ["simulate", "--from-snapshot", str(path), "--method", "ranger", "--json"]
        assert main([*argv, "--ranger-rules", rules]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["seeding"]["other_thps"] == 1
        work[rules] = doc["methods"]["ranger"]["work"]
    assert work["rfc05"]["pages_exchanged"] == 512 and work["rfc05"]["thp_split"] == 1
    assert work["rfc04"]["pages_exchanged"] == 0 and work["rfc04"]["thp_split"] == 0
    assert work["rfc04"]["failures"]["dst_thp_src_not_failed"] == 1

"""The kernel's log buffer in the faithful Translation Ranger (Knobs.log_buffer).

RFC04's kmem_defragd_scan_mm vzalloc()s the caller's buf_len at the start of every call
of action 3 given a buffer and vfree()s it on return. On its kernel (tests/ranger,
test_kravetz.py, case "free") a 16 MiB buffer (the launcher's, and memdefragd's then)
took 3,532 frames of a free anchor window, each a hard stop (dst_non_moveable_failed). The model takes the buffer's
frames as the buddy allocator does (unmovable, stolen from the largest free block, lowest
pieces first) and gives them back when the call ends.
"""

from __future__ import annotations

import numpy as np

from memdefragd.backends.sim.machine import FREE, MMAP_BASE_VPN, Machine
from memdefragd.backends.sim.ranger import Knobs, defrag
from memdefragd.model import PAGE_SIZE

V = MMAP_BASE_VPN  # 512-aligned
PAGES = 2048  # an 8 MiB VMA: anchored at the zone start, frames [0, 2048)


def machine_with_a_scattered_vma() -> tuple[Machine, int]:
    """One zone of 16384 frames; a VMA of PAGES pages on shuffled frames of its upper
    half, so that the anchor's window [0, PAGES) is free."""
    m = Machine(16384)
    p = m.add_process("t")
    m.mmap(p.pid, PAGES, start_vpn=V)
    rng = np.random.default_rng(14)
    m.fault_at(p.pid, V + np.arange(PAGES), 8192 + rng.permutation(8192)[:PAGES])
    return m, p.pid


def test_without_a_buffer_every_page_migrates_into_the_free_window():
    m, pid = machine_with_a_scattered_vma()
    res = defrag(m, pid, knobs=Knobs(defrag_size_threshold=1))
    assert res.pages_migrated == PAGES and res.hard_stops == 0 and res.failures == {}
    assert (m.processes[pid].vmas[0].pfn == np.arange(PAGES)).all()


def test_the_log_buffer_blocks_its_frames_for_the_call_and_is_given_back():
    m, pid = machine_with_a_scattered_vma()
    free_before = m.nr_free
    buf = 64  # pages
    res = defrag(m, pid, knobs=Knobs(defrag_size_threshold=1, log_buffer=buf * PAGE_SIZE))
    # The buffer's frames came from the largest free block, lowest pieces first: frames
    # [0, 64) of the window. Each is a hard stop that skips its page (the anchor stays).
    assert res.hard_stops == buf
    assert res.failures == {"dst_non_moveable_failed": buf}
    assert res.pages_migrated == PAGES - buf
    pfn = m.processes[pid].vmas[0].pfn
    assert (pfn[buf:] == np.arange(buf, PAGES)).all()  # the rest at the anchor's offset
    assert (pfn[:buf] >= 8192).all()  # the blocked pages stayed where they were
    # the call returned: the buffer is free again, and so is as much memory as before
    assert (m.kind[:buf] == FREE).all() and m.nr_free == free_before
    m.check()

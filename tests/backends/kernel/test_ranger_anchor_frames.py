"""Where Translation Ranger's pass anchored, in frames, from its defrag log (action 3):
`carry_out`'s `Outcome.frames`, which the daemon compares across processes.

The log below is built by hand from RFC04's format string (as in test_ranger.py): this
machine runs mainline, which has no scan_process_memory.
"""

from __future__ import annotations

from types import SimpleNamespace

from memdefragd.backends.kernel.ranger import (
    DefragPass,
    anchor_frames,
    carry_out,
    parse_defrag_log,
)
from memdefragd.model import PMD_SIZE, Request

PAGE = 4096
MiB2 = 2 << 20
HEAP = 0x7F0000000000  # a 6 MiB VMA anchored at frame 0x40000
BIG = 0x7F0040000000  # a 4 MiB VMA whose anchor interval still spans 8 MiB (it shrank)
LATE = 0x7F0080000000  # a VMA whose `vma:` line came in an earlier call's log


def chunk(start: int, vma_id: int, vpn: int, pfn: int, first: int, last: int) -> str:
    """One chunk line of RFC04's format: a clean 2 MiB chunk, each VMA's chunks with the
    same anchor (vpn, pfn) and interval [first, last]."""
    return (
        f"[0x{start:x}, 0x{start + MiB2:x}):512 [alig:0, migrated:512, src: not:0, "
        f"src_thp_dst_not:0, src_pte_thp:0 dst: out_bound:0, dst_thp_src_not:0, "
        f"dst_pte_thp:0, isolate_free:0, migrate_free:0, anon:0, file:0, non-lru:0, "
        f"non-moveable:0], anchor: ({vpn:x}, {pfn:x}), range: [{first:x}, {last:x}], "
        f"vma: 0x{vma_id:x}, not_defrag_vpn: 0\n"
    )


LOG = (
    f"vma: 0xa1, 0x{HEAP:x}, 0x{HEAP + 3 * MiB2:x}, -1\n"
    + "".join(
        chunk(HEAP + i * MiB2, 0xA1, HEAP >> 12, 0x40000, HEAP, HEAP + 3 * MiB2 - PAGE)
        for i in range(3)
    )
    + f"vma: 0xb2, 0x{BIG:x}, 0x{BIG + 2 * MiB2:x}, -1\n"
    + chunk(BIG, 0xB2, BIG >> 12, 0x80000, BIG, BIG + 4 * MiB2 - PAGE)
    + chunk(LATE + MiB2, 0xC3, LATE >> 12, 0x90000, LATE, LATE + 2 * MiB2 - PAGE)
)


def test_each_anchor_gives_its_vmas_window_in_frames():
    frames = anchor_frames(parse_defrag_log(LOG))
    assert frames == (
        (0x40000, 0x40000 + 3 * 512),  # the heap: anchor_pfn + (vpn - anchor_vpn), 1536 pages
        (0x80000, 0x80000 + 2 * 512),  # clipped to the VMA its `vma:` line gives
        (0x90000, 0x90000 + 2 * 512),  # no `vma:` line in this log: the anchor's interval
    )
    assert anchor_frames(parse_defrag_log("")) == ()


def test_adjacent_windows_of_one_process_are_one_range():
    """The RFC packs a process's VMAs back to back from its zone's start."""
    text = (
        f"vma: 0xa1, 0x{HEAP:x}, 0x{HEAP + MiB2:x}, -1\n"
        + chunk(HEAP, 0xA1, HEAP >> 12, 0x1000, HEAP, HEAP + MiB2 - PAGE)
        + f"vma: 0xb2, 0x{BIG:x}, 0x{BIG + MiB2:x}, -1\n"
        + chunk(BIG, 0xB2, BIG >> 12, 0x1200, BIG, BIG + MiB2 - PAGE)
    )
    assert anchor_frames(parse_defrag_log(text)) == ((0x1000, 0x1400),)


class FakeRanger:
    """What carry_out uses of Ranger: action 1 once, then action 3 answering `text`."""

    breakout_chunks = None

    def __init__(self, text: str):
        self.text, self.marked = text, 0

    def mark_all(self, handle) -> None:
        self.marked += 1

    def defrag(self, handle, *, max_calls=None, should_stop=lambda: False) -> DefragPass:
        return DefragPass(1, True, parse_defrag_log(self.text))


def test_carry_out_reports_where_the_pass_anchored():
    me = SimpleNamespace(pid=4321, proc=SimpleNamespace(start_time=77))
    req = Request("t", 4321, 77, HEAP, HEAP + 3 * MiB2, ((HEAP, HEAP + 3 * MiB2),), "ranger")
    out = carry_out(FakeRanger(LOG), me, req, marked=set())  # type: ignore[arg-type]
    assert out.frames == anchor_frames(parse_defrag_log(LOG))
    assert out.frames[0] == (0x40000, 0x40600)
    assert out.bytes_attempted == 5 * PMD_SIZE
    # A pass that walked nothing anchored nothing.
    assert carry_out(FakeRanger(""), me, req, marked=set()).frames == ()  # type: ignore[arg-type]

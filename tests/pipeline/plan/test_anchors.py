"""Translation Ranger's anchor windows across processes: the pure rule that ends a fight
over the same frames (the process whose pass filled a window last keeps it)."""

from __future__ import annotations

import pytest

from memdefragd.pipeline.plan.anchors import AnchorWindows, Taken, merge_frames, shared

A, B, C, D = (1000, 1), (1001, 2), (1002, 3), (1003, 4)  # (pid, start time)
HEAP = 0x7F0000000000
ZONE = ((0x1000, 0x11000),)  # the window of a 256 MiB heap at its zone's start


@pytest.mark.parametrize(
    ("spans", "merged"),
    [
        ([], ()),
        ([(5, 5), (7, 3)], ()),  # empty and backwards ranges are dropped
        ([(10, 20), (0, 5)], ((0, 5), (10, 20))),
        ([(0, 10), (10, 20)], ((0, 20),)),  # adjacent: one window
        ([(0, 10), (5, 8), (9, 30)], ((0, 30),)),
    ],
)
def test_merge_frames(spans, merged):
    assert merge_frames(spans) == merged


@pytest.mark.parametrize(
    ("a", "b", "common"),
    [
        (((0, 10),), ((10, 20),), None),  # adjacent is not shared: [first, end)
        (((0, 10),), ((9, 20),), (9, 10)),
        (((0, 4), (8, 12)), ((4, 8), (11, 30)), (11, 12)),
        (((0, 100),), ((20, 30), (40, 50)), (20, 30)),  # the first frames both cover
        ((), ((0, 1),), None),
    ],
)
def test_shared(a, b, common):
    assert shared(a, b) == common
    assert shared(b, a) == common


def test_the_process_passed_last_keeps_the_window_and_the_other_is_held():
    w = AnchorWindows()
    assert w.passed(A, ZONE, {HEAP}) == []  # nobody else had it
    assert not w.held(A)
    # B's pass fills the same frames (the RFC anchors both at the zone's start): A, whose
    # anchor stays in its VMA, would take them back at its next pass.
    assert w.passed(B, ((0x1000 + 512, 0x9000),), {HEAP}) == [Taken(B, A, (0x1200, 0x9000))]
    assert w.held(A) and not w.held(B)
    assert w.holders(A) == (B,)
    # B's next passes hold nobody new and keep it free.
    assert w.passed(B, ZONE, {HEAP}) == []
    assert w.held(A) and not w.held(B)
    assert list(w.held_keys()) == [A]


def test_a_window_of_its_own_is_never_held():
    w = AnchorWindows()
    w.passed(A, ZONE, {HEAP})
    assert w.passed(B, ((0x11000, 0x21000),), {HEAP}) == []  # right after A's: no frame shared
    assert w.passed(C, ((0x40000, 0x50000),), {HEAP}) == []  # another zone
    for _ in range(3):
        assert w.passed(A, ZONE, {HEAP}) == []
        assert w.passed(B, ((0x11000, 0x21000),), {HEAP}) == []
    assert not any(w.held(k) for k in (A, B, C))


def test_a_third_process_holds_the_second_and_the_first_stays_held_until_both_go():
    w = AnchorWindows()
    w.passed(A, ZONE, {HEAP})
    w.passed(B, ZONE, {HEAP})
    # C's pass takes the window again: B is held now; A, held already, is not news, but C
    # holds it too (so that B's exit does not free it while C has the window).
    assert w.passed(C, ZONE, {HEAP}) == [Taken(C, B, ZONE[0])]
    assert w.holders(A) == (B, C) and w.holders(B) == (C,)
    assert w.forget(B[0]) == []  # A is still held by C
    assert w.held(A)
    assert w.forget(C[0]) == [A]  # the holder is gone: A's passes resume
    assert not w.held(A) and len(w) == 1


def test_forgetting_the_holder_frees_what_it_held():
    w = AnchorWindows()
    w.passed(A, ZONE, {HEAP})
    w.passed(B, ZONE, {HEAP})
    assert w.forget(B[0]) == [A]
    assert not w.held(A)
    assert w.forget(A[0]) == [] and len(w) == 0
    assert w.forget(12345) == []  # never booked


def test_untracked_processes_are_not_held():
    """A process that exited (or whose pid was reused) before the daemon forgot it is no
    one to hold back."""
    w = AnchorWindows()
    w.passed(A, ZONE, {HEAP})
    assert w.passed(B, ZONE, {HEAP}, tracked=lambda key: key != A) == []
    assert not w.held(A)


def test_an_anchor_goes_with_its_vmas():
    """The kernel frees an anchor with its VMA: once none of the VMAs a process's windows
    were made for is mapped, its windows are forgotten and so are its holds."""
    other = HEAP + (1 << 30)
    w = AnchorWindows()
    w.passed(A, ZONE, {HEAP, other})
    w.passed(B, ZONE, {HEAP})
    assert w.rescanned(A, {HEAP, 0x400000}) == []  # its heap is still there
    assert w.rescanned(A, {other}) == []  # one of them is enough
    assert w.held(A)
    assert w.rescanned(A, {0x400000}) == [A]  # both gone: its next pass shows where it lies
    assert not w.held(A) and w.frames(A) == ()
    # The same for the holder: B's heap gone, what it held is free.
    w.passed(A, ZONE, {HEAP})
    w.passed(B, ZONE, {HEAP})
    assert w.held(A)
    assert w.rescanned(B, set()) == [A]
    assert not w.held(A)
    assert w.rescanned(D, set()) == []  # never booked


def test_windows_of_passes_in_slices_add_up():
    """A pass in slices (breakout chunks) anchors some VMAs at a time: each slice's
    frames add to the process's windows."""
    w = AnchorWindows()
    w.passed(A, ((0x1000, 0x5000),), {HEAP})
    w.passed(A, ((0x5000, 0x9000),), {HEAP + (1 << 30)})
    assert w.frames(A) == ((0x1000, 0x9000),)
    assert w.passed(B, ((0x8000, 0x8001),), {HEAP}) == [Taken(B, A, (0x8000, 0x8001))]


def test_a_held_process_that_passes_anyway_holds_the_window_again():
    """The daemon passes no held process; if one did (its method changed and back, say),
    its pass filled the window, so by the same rule it holds it."""
    w = AnchorWindows()
    w.passed(A, ZONE, {HEAP})
    w.passed(B, ZONE, {HEAP})
    assert w.passed(A, ZONE, {HEAP}) == [Taken(A, B, ZONE[0])]
    assert not w.held(A) and w.held(B)


def test_a_pass_that_anchored_nothing_books_nothing():
    w = AnchorWindows()
    assert w.passed(A, (), {HEAP}) == []
    assert len(w) == 0 and w.frames(A) == () and w.holders(A) == ()

"""Verify: what a fresh read of a request's ranges finds huge, over the simulated machine."""

from __future__ import annotations

import dataclasses

import numpy as np

from memdefragd.backends.sim.backend import SimBackend
from memdefragd.backends.sim.machine import Machine
from memdefragd.model import PAGE_SIZE, PMD_PAGES, PMD_SIZE, Request
from memdefragd.pipeline.verify import verify


def machine() -> tuple[SimBackend, int, int]:
    """Regions 0 and 2 of a 4-region VMA are THPs; region 1 is full and contiguous but not
    huge; region 3 is half present. (backend, pid, VMA start in bytes)"""
    m = Machine(8192)
    p = m.add_process("app")
    v = m.mmap(p.pid, 4 * PMD_PAGES)
    s = v.start_vpn
    for r, frames in ((0, 512), (1, 2048), (2, 4096)):
        m.fault_at(
            p.pid, np.arange(s + r * 512, s + r * 512 + 512), np.arange(frames, frames + 512)
        )
    m.fault_at(p.pid, np.arange(s + 1536, s + 1792), np.arange(6144, 6400))
    assert m.promote(p.pid, s) and m.promote(p.pid, s + 1024)
    return SimBackend(m), p.pid, s * PAGE_SIZE


def request(pid: int, *ranges: tuple[int, int]) -> Request:
    lo, hi = min(a for a, _ in ranges), max(b for _, b in ranges)
    return Request("t", pid, 0, lo, hi, tuple(ranges))


def test_only_regions_huge_now_count():
    backend, pid, base = machine()
    proc = backend.process(pid)
    got = verify(backend, proc, request(pid, (base, base + 4 * PMD_SIZE)))
    assert got.bytes == 2 * PMD_SIZE
    np.testing.assert_array_equal(got.huge, [base, base + 2 * PMD_SIZE])


def test_ranges_not_vmas_are_read():
    """Two separate ranges inside one VMA: only those, in the order asked."""
    backend, pid, base = machine()
    proc = backend.process(pid)
    got = verify(backend, proc, request(pid, (base + PMD_SIZE, base + 2 * PMD_SIZE)))
    assert (got.bytes, got.huge.size) == (0, 0)
    backend.window = PMD_PAGES  # one window per region: a THP never straddles two
    two = request(pid, (base, base + PMD_SIZE), (base + 2 * PMD_SIZE, base + 3 * PMD_SIZE))
    got = verify(backend, proc, two)
    np.testing.assert_array_equal(got.huge, [base, base + 2 * PMD_SIZE])
    windows = list(backend.iter_ranges(proc, [(base + 3 * PMD_SIZE, base + 4 * PMD_SIZE)]))
    assert sum(w.present_pages for w in windows) == 256


def test_a_process_gone_verifies_nothing():
    backend, pid, base = machine()
    proc = backend.process(pid)
    backend.machine.exit_process(pid)
    got = verify(backend, proc, request(pid, (base, base + PMD_SIZE)))
    assert (got.bytes, got.huge.size) == (0, 0)


def test_ranger_requests_count_translation_contiguous_regions_where_it_worked():
    """Translation Ranger makes runs, not huge pages: a ranger request verifies the 2 MiB
    regions whose pages are all present at one VA-PA offset (THPs included), and reads
    where the backend says it worked, which need not be the request's ranges."""
    backend, pid, base = machine()
    proc = backend.process(pid)
    req = dataclasses.replace(request(pid, (base, base + PMD_SIZE)), method="ranger")
    everything = ((base, base + 4 * PMD_SIZE),)
    got = verify(backend, proc, req, everything)
    assert got.bytes == 3 * PMD_SIZE  # regions 0-2; region 3 is half present
    np.testing.assert_array_equal(got.huge, [base, base + PMD_SIZE, base + 2 * PMD_SIZE])


def test_scattered_frames_are_not_contiguous():
    m = Machine(8192)
    p = m.add_process("app")
    v = m.mmap(p.pid, PMD_PAGES)
    m.fault_at(p.pid, np.arange(v.start_vpn, v.end_vpn), np.arange(4096 + 511, 4095, -1))
    backend = SimBackend(m)
    base = v.start_vpn * PAGE_SIZE
    req = dataclasses.replace(request(p.pid, (base, base + PMD_SIZE)), method="ranger")
    assert verify(backend, backend.process(p.pid), req).bytes == 0

"""The --png picture: a valid PNG written with zlib alone, frames coloured by kind and
owner, THPs darker than base pages, before and after side by side."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from memdefragd.backends.sim.machine import CACHE, MMAP_BASE_VPN, NONLRU, UNMOVABLE, Machine
from memdefragd.backends.sim.render import (
    CACHE_RGB,
    FREE_RGB,
    NONLRU_RGB,
    PANEL,
    UNMOVABLE_RGB,
    Legend,
    Snapshots,
    encode_png,
    frame_colours,
    panel,
)


def decode_png(data: bytes) -> np.ndarray:
    """Just enough of PNG to read back what encode_png writes (8-bit RGB, filter 0)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(tag + body), tag
        chunks.append((tag, body))
        pos += 12 + n
    assert [t for t, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    w, h, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour) == (8, 2)
    raw = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_png_round_trips():
    rgb = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(rgb)), rgb)


def small_machine() -> Machine:
    m = Machine(4096)
    m.alloc_at(np.array([1]), UNMOVABLE)
    m.alloc_at(np.array([2]), NONLRU)
    m.alloc_at(np.array([3]), CACHE)
    p = m.add_process("a")
    m.mmap(p.pid, 1024, start_vpn=MMAP_BASE_VPN)
    m.fault_at(p.pid, MMAP_BASE_VPN + np.arange(512), 512 + np.arange(512))
    assert m.promote(p.pid, MMAP_BASE_VPN)
    m.fault_at(p.pid, MMAP_BASE_VPN + 512 + np.arange(4), 8 + np.arange(4))
    return m


def test_frames_take_the_colour_of_their_kind_and_owner():
    m = small_machine()
    legend = Legend.of(m)
    rgb = frame_colours(m, legend)
    assert tuple(rgb[0]) == FREE_RGB and tuple(rgb[1]) == UNMOVABLE_RGB
    assert tuple(rgb[2]) == NONLRU_RGB and tuple(rgb[3]) == CACHE_RGB
    assert tuple(rgb[512]) == legend.colour(0)  # a THP frame: the process's colour
    assert (rgb[8].astype(int) > rgb[512].astype(int)).all()  # base page: paler


def test_panels_average_runs_of_frames_once_memory_exceeds_a_square():
    n = PANEL * PANEL * 4
    rgb = np.zeros((n, 3), np.uint8)
    rgb[1::2] = 200  # alternate black and grey frames: every pixel averages to 100
    img = panel(rgb)
    assert img.shape == (PANEL, PANEL, 3) and (img == 100).all()
    assert panel(np.zeros((PANEL * 3, 3), np.uint8)).shape == (3, PANEL, 3)  # 1 frame/px


def test_snapshots_write_both_panels(tmp_path):
    m = small_machine()
    shots = Snapshots()
    shots("before", m)
    m.alloc_at(np.array([4]), UNMOVABLE)
    shots("after", m)
    path = tmp_path / "m.png"
    shots.write(str(path), "test")
    img = decode_png(path.read_bytes())
    assert img.shape[1] > 2 * PANEL
    # One frame per pixel here; the panels start below the title and the BEFORE/AFTER
    # labels (8 + 2 * (14 + 8) = 52), at x = 8 and 8 + 512 + 16. Frame 4 was free before
    # and unmovable after.
    assert tuple(img[52, 8 + 4]) == FREE_RGB
    assert tuple(img[52, 8 + PANEL + 16 + 4]) == UNMOVABLE_RGB

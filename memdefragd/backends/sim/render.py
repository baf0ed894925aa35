"""A picture of the simulated machine's physical memory, before and after, as a PNG.

Each panel shows every frame in pfn order, left to right and top to bottom, 512 pixels
wide; when there are more than 512 x 512 frames, each pixel averages a power-of-two run of
them. Anon frames take their process's colour (full for THPs, paler for base pages),
page cache light grey, free frames white, non-LRU dark red, unmovable black. Written
with numpy and zlib only (no imaging library is a dependency).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .machine import ANON, CACHE, FREE, HEAD, NONLRU, TAIL, UNMOVABLE, Machine

PANEL = 512  # pixels per row of a panel
FREE_RGB = (250, 250, 250)
CACHE_RGB = (205, 205, 205)
NONLRU_RGB = (140, 20, 20)
UNMOVABLE_RGB = (0, 0, 0)
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
BASE_PALE = 0.45  # how far a base (non-THP) anon page's colour is toward white


@dataclass(frozen=True)
class Legend:
    """Which colour each process has: fixed once, so both panels agree."""

    pids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def of(cls, machine: Machine) -> Legend:
        pids = tuple(sorted(machine.processes))
        return cls(pids, tuple(machine.processes[p].comm for p in pids))

    def colour(self, i: int) -> tuple[int, int, int]:
        return PALETTE[i % len(PALETTE)]


def frame_colours(machine: Machine, legend: Legend) -> np.ndarray:
    """RGB per frame (uint8, nframes x 3)."""
    rgb = np.empty((machine.nframes, 3), np.uint8)
    kind = machine.kind
    for k, c in ((FREE, FREE_RGB), (CACHE, CACHE_RGB), (NONLRU, NONLRU_RGB),
                 (UNMOVABLE, UNMOVABLE_RGB)):  # fmt: skip
        rgb[kind == k] = c
    anon = np.flatnonzero(kind == ANON)
    pal = np.array([legend.colour(i) for i in range(len(legend.pids))] or [(0, 0, 0)], float)
    pal = np.vstack((pal, [[90, 90, 90]]))  # processes not in the legend
    idx = np.searchsorted(np.array(legend.pids, np.int64), machine.owner[anon])
    known = idx < len(legend.pids)
    known[known] = np.array(legend.pids, np.int64)[idx[known]] == machine.owner[anon][known]
    idx = np.where(known, idx, len(pal) - 1)
    colour = pal[idx]
    huge = np.isin(machine.compound[anon], (HEAD, TAIL))
    colour[~huge] += (255 - colour[~huge]) * BASE_PALE
    rgb[anon] = colour.astype(np.uint8)
    return rgb


def panel(rgb: np.ndarray) -> np.ndarray:
    """Frames laid out PANEL pixels wide (H x PANEL x 3), averaging runs of frames."""
    n = rgb.shape[0]
    per = 1
    while n > PANEL * PANEL * per:
        per *= 2
    rows = -(-n // (PANEL * per))
    padded = np.empty((rows * PANEL * per, 3), np.float32)
    padded[:n] = rgb
    padded[n:] = BACKGROUND
    pixels: np.ndarray = padded.reshape(rows, PANEL, per, 3).mean(axis=2).round()
    return pixels.astype(np.uint8)


def picture(before: np.ndarray, after: np.ndarray, legend: Legend, title: str = "") -> np.ndarray:
    """Both panels side by side under their titles, the legend below."""
    a, b = panel(before), panel(after)
    gap, margin, text_h = 16, 8, 7 * SCALE
    top = margin + (text_h + margin) * (2 if title else 1)
    entries = [("FREE", FREE_RGB), ("PAGE CACHE", CACHE_RGB), ("NON-LRU", NONLRU_RGB),
               ("UNMOVABLE", UNMOVABLE_RGB)]  # fmt: skip
    entries += [(f"{n} (PID {p})", legend.colour(i)) for i, (p, n) in
                enumerate(zip(legend.pids, legend.names, strict=True))]  # fmt: skip
    width = 2 * PANEL + gap + 2 * margin
    per_row = max(1, width // 260)
    legend_rows = -(-len(entries) // per_row) + 1
    height = top + max(a.shape[0], b.shape[0]) + margin + legend_rows * (text_h + margin)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = BACKGROUND
    y = margin
    if title:
        _text(img, margin, y, title)
        y += text_h + margin
    _text(img, margin, y, "BEFORE")
    _text(img, margin + PANEL + gap, y, "AFTER")
    img[top : top + a.shape[0], margin : margin + PANEL] = a
    img[top : top + b.shape[0], margin + PANEL + gap : margin + 2 * PANEL + gap] = b
    y = top + max(a.shape[0], b.shape[0]) + margin
    _text(img, margin, y, "ANON: FULL COLOUR = THP, PALE = BASE PAGES")
    for i, (label, colour) in enumerate(entries):
        row, col = divmod(i, per_row)
        x, yy = margin + col * 260, y + (row + 1) * (text_h + margin)
        img[yy : yy + text_h, x : x + text_h] = colour
        img[yy : yy + text_h, x : x + 1] = INK
        img[yy : yy + text_h, x + text_h - 1 : x + text_h] = INK
        img[yy : yy + 1, x : x + text_h] = INK
        img[yy + text_h - 1 : yy + text_h, x : x + text_h] = INK
        _text(img, x + text_h + 6, yy, label)
    return img


def encode_png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG (filter 0 on every row, one IDAT)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError("expected an H x W x 3 uint8 array")
    h, w, _ = rgb.shape
    raw = np.zeros((h, 1 + 3 * w), np.uint8)
    raw[:, 1:] = rgb.reshape(h, 3 * w)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def write_png(path: str, before: np.ndarray, after: np.ndarray, legend: Legend,
              title: str = "") -> None:  # fmt: skip
    with open(path, "wb") as f:
        f.write(encode_png(picture(before, after, legend, title)))


class Snapshots:
    """Called with ("before" | "after", machine): keeps each moment's frame colours (the
    legend fixed at the first), then writes the picture."""

    def __init__(self) -> None:
        self.legend: Legend | None = None
        self.colours: dict[str, np.ndarray] = {}

    def __call__(self, when: str, machine: Machine) -> None:
        if self.legend is None:
            self.legend = Legend.of(machine)
        self.colours[when] = frame_colours(machine, self.legend)

    def write(self, path: str, title: str = "") -> None:
        if self.legend is None or not {"before", "after"} <= self.colours.keys():
            raise ValueError("a picture needs both the before and the after snapshot")
        write_png(path, self.colours["before"], self.colours["after"], self.legend, title)


# ---------------------------------------------------------------- a 5x7 bitmap font

SCALE = 2
_GLYPHS: dict[str, Sequence[int]] = {
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14), "D": (30, 17, 17, 17, 17, 17, 30),
    "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14), "J": (7, 2, 2, 2, 2, 18, 12),
    "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14), "P": (30, 17, 17, 30, 16, 16, 16),
    "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14), "V": (17, 17, 17, 17, 17, 10, 4),
    "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14),
    "2": (14, 17, 1, 2, 4, 8, 31), "3": (31, 2, 4, 2, 1, 17, 14),
    "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8),
    "8": (14, 17, 17, 14, 17, 17, 14), "9": (14, 17, 17, 15, 1, 2, 12),
    "-": (0, 0, 0, 31, 0, 0, 0), ".": (0, 0, 0, 0, 0, 12, 12),
    "/": (0, 1, 2, 4, 8, 16, 0), ":": (0, 12, 12, 0, 12, 12, 0),
    "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8),
    "%": (24, 25, 2, 4, 8, 19, 3), ",": (0, 0, 0, 0, 12, 4, 8),
    "=": (0, 0, 31, 0, 31, 0, 0), "_": (0, 0, 0, 0, 0, 0, 31),
    " ": (0,) * 7,
}  # fmt: skip
_BITS = {
    ch: np.kron(
        ((np.array(rows)[:, None] >> np.arange(4, -1, -1)) & 1).astype(bool),
        np.ones((SCALE, SCALE), bool),
    )
    for ch, rows in _GLYPHS.items()
}


def _text(img: np.ndarray, x: int, y: int, text: str) -> None:
    """Draw `text` (upper-cased; unknown characters as spaces) with its top left at x, y,
    clipped to the image."""
    for ch in text.upper():
        bits = _BITS.get(ch, _BITS[" "])
        h, w = bits.shape
        if x + w > img.shape[1] or y + h > img.shape[0]:
            return
        img[y : y + h, x : x + w][bits] = INK
        x += w + SCALE

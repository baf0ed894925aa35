"""A process that holds memory for the Translation Ranger tests, and lets go of it on demand.

Run as a script (stdlib only, like tools/child.py) with one JSON object as its argument,
{"size": bytes, "comm": name}: it maps `size` bytes of anonymous memory, writes every page
(4 KiB pages: THP is `madvise` on the guest and nothing asks for it), prints {"addr"} and
then answers one JSON command per line on stdin, one JSON line each:

    {"op": "free_random", "fraction": f, "seed": s}  MADV_DONTNEED a random `f` of its
        pages, one page at a time in random order: {"freed": pages}
    {"op": "free", "offsets": [page indexes]}  MADV_DONTNEED those pages: {"freed"}
    {"op": "free_ranges", "ranges": [[first page, pages]...]}  MADV_DONTNEED them: {"freed"}
    {"op": "mlock_ranges", "ranges": [[first page, pages]...]}  mlock(2) them: {"locked"}
    {"op": "pin", "offsets": [page indexes]}  vmsplice those pages into pipes kept open:
        get_user_pages holds a reference on each until the pipes are closed: {"pinned"}
    {"op": "mlockall"}  mlockall(MCL_CURRENT): every page it holds mlocked: {"ok": true}
    {"op": "pgtables", "count": n}  n page-table pages: a sparse read-only mapping read
        once per 2 MiB (each read maps the zero page and needs a PTE page of its own):
        {"tables": n}
    {"op": "fill_pipes", "pages": n}  n pages of pipe buffers, written and never read:
        {"pages": n}

Page indexes are of its own mapping: one outside it (a negative one, say) is refused with
{"error"}, for an madvise there would zap the hog's interpreter (its heap, its data) and
crash it. `HogProcess` starts it from the tests; its `command` sends one command and reads
the answer (RuntimeError for an {"error"}).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

PAGE = 4096
PMD = 2 << 20
PROT_READ, PROT_RW = 1, 3
MAP_PRIVATE_ANONYMOUS_NORESERVE = 0x22 | 0x4000
MADV_DONTNEED = 4
MCL_CURRENT = 1
PR_SET_NAME = 15
F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20  # pipe-max-size's default: 256 buffers a pipe

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
)  # fmt: skip
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.prctl.argtypes = (
    ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
)  # fmt: skip


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


libc.vmsplice.restype = ctypes.c_ssize_t
libc.vmsplice.argtypes = (ctypes.c_int, ctypes.POINTER(IoVec), ctypes.c_size_t, ctypes.c_uint)


def _check(ok: bool, what: str) -> None:
    if not ok:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _map(size: int, prot: int) -> int:
    addr = libc.mmap(None, size, prot, MAP_PRIVATE_ANONYMOUS_NORESERVE, -1, 0)
    _check(addr not in (None, ctypes.c_void_p(-1).value), "mmap")
    return int(addr)


class Hog:
    def __init__(self, size: int) -> None:
        self.size = size
        self.addr = _map(size, PROT_RW)
        step = 64 << 20
        for off in range(0, size, step):  # in order: the kernel faults page by page
            ctypes.memset(self.addr + off, 0x5A, min(step, size - off))
        self.pipes: list[tuple[int, int]] = []
        self.tables = 0

    def _inside(self, ranges: list[list[int]]) -> None:
        """Refuse [first page, pages] ranges that leave the mapping."""
        pages = self.size // PAGE
        for first, n in ranges:
            if not (first >= 0 and n >= 0 and first + n <= pages):
                raise ValueError(f"pages [{first}, {first + n}) are not in the hog's {pages}")

    def free(self, offsets: list[int]) -> int:
        self._inside([[i, 1] for i in offsets])
        for i in offsets:
            _check(libc.madvise(self.addr + i * PAGE, PAGE, MADV_DONTNEED) == 0, "madvise")
        return len(offsets)

    def free_ranges(self, ranges: list[list[int]]) -> int:
        self._inside(ranges)
        for first, n in ranges:
            _check(libc.madvise(self.addr + first * PAGE, n * PAGE, MADV_DONTNEED) == 0, "madvise")
        return sum(n for _, n in ranges)

    def mlock_ranges(self, ranges: list[list[int]]) -> int:
        self._inside(ranges)
        for first, n in ranges:
            _check(
                libc.mlock(ctypes.c_void_p(self.addr + first * PAGE), ctypes.c_size_t(n * PAGE))
                == 0,
                "mlock",
            )
        return sum(n for _, n in ranges)

    def free_random(self, fraction: float, seed: int) -> int:
        pages = self.size // PAGE
        rng = random.Random(seed)
        return self.free(rng.sample(range(pages), int(pages * fraction)))

    def pin(self, offsets: list[int]) -> int:
        self._inside([[i, 1] for i in offsets])
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        per_pipe = PIPE_BYTES // PAGE
        need = 2 * (len(offsets) // per_pipe + 1) + 64
        if soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(need, soft), max(need, hard)))
        pinned = 0
        for k in range(0, len(offsets), per_pipe):
            r, w = os.pipe()
            self.pipes.append((r, w))
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_BYTES)
            part = offsets[k : k + per_pipe]
            iov = (IoVec * len(part))(*[IoVec(self.addr + i * PAGE, PAGE) for i in part])
            done = 0
            while done < len(part):
                first = ctypes.cast(ctypes.addressof(iov) + done * ctypes.sizeof(IoVec),
                                    ctypes.POINTER(IoVec))  # fmt: skip
                n = libc.vmsplice(w, first, len(part) - done, 0)
                _check(n > 0, "vmsplice")
                done += n // PAGE
            pinned += done
        return pinned

    def pgtables(self, count: int) -> int:
        addr = _map(count * PMD, PROT_READ)
        for k in range(count):
            ctypes.c_char.from_address(addr + k * PMD).value  # noqa: B018  (the read faults)
        self.tables += count
        return count

    def fill_pipes(self, pages: int) -> int:
        block = b"\xa5" * PIPE_BYTES
        done = 0
        while done < pages:
            r, w = os.pipe()
            self.pipes.append((r, w))
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_BYTES)
            n = min(pages - done, PIPE_BYTES // PAGE)
            os.write(w, block[: n * PAGE])
            done += n
        return done


def main(cfg: dict[str, Any]) -> None:
    if cfg.get("comm"):
        libc.prctl(PR_SET_NAME, cfg["comm"].encode(), 0, 0, 0)
    hog = Hog(int(cfg["size"]))
    out = sys.stdout
    out.write(json.dumps({"addr": hog.addr}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            ans = _command(hog, json.loads(line))
        except ValueError as e:
            ans = {"error": str(e)}
        out.write(json.dumps(ans) + "\n")
        out.flush()


def _command(hog: Hog, cmd: dict[str, Any]) -> dict[str, Any]:
    """One command's answer; ValueError for pages outside the mapping."""
    op = cmd["op"]
    if op == "free_random":
        return {"freed": hog.free_random(cmd["fraction"], cmd["seed"])}
    if op == "free":
        return {"freed": hog.free(cmd["offsets"])}
    if op == "free_ranges":
        return {"freed": hog.free_ranges(cmd["ranges"])}
    if op == "mlock_ranges":
        return {"locked": hog.mlock_ranges(cmd["ranges"])}
    if op == "pin":
        return {"pinned": hog.pin(cmd["offsets"])}
    if op == "mlockall":
        _check(libc.mlockall(MCL_CURRENT) == 0, "mlockall")
        return {"ok": True}
    if op == "pgtables":
        return {"tables": hog.pgtables(cmd["count"])}
    if op == "fill_pipes":
        return {"pages": hog.fill_pipes(cmd["pages"])}
    return {"error": f"unknown op {op!r}"}


# ---------------------------------------------------------------- the tests' side


class HogProcess:
    """The hog, started by a test: `command(op, **args)` is its answer; `stop()` at the end."""

    def __init__(self, size: int, comm: str = "mdd-hog", timeout: float = 600.0) -> None:
        from tools.child import answer

        self._answer = answer
        self.size = size
        self.popen = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), json.dumps({"size": size, "comm": comm})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            self.addr = int(answer(self.popen, timeout)["addr"])
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def command(self, op: str, timeout: float = 600.0, **args: Any) -> dict:
        ans = self._answer(self.popen, timeout, json.dumps({"op": op, **args}))
        if "error" in ans:
            raise RuntimeError(ans["error"])
        return dict(ans)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for f in (self.popen.stdin, self.popen.stdout):
            if f:
                with contextlib.suppress(OSError):
                    f.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

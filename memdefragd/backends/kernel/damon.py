"""DAMON through its sysfs interface: a kdamond of our own that measures how often each
tracked process touches each part of its address space
(Documentation/admin-guide/mm/damon/usage.rst).

The sysfs interface (/sys/kernel/mm/damon/admin) is shared by everyone on the machine,
and it can only add a kdamond by rebuilding them all: writing `kdamonds/nr_kdamonds`
removes every kdamond directory and creates new, empty ones, and is refused (EBUSY) while
any kdamond runs. So memdefragd uses DAMON only where nobody else does (nr_kdamonds is 0,
or the one there is ours, left by a memdefragd that died: a state file under /run says
so), never touches a kdamond it did not create, and removes its own on close. Elsewhere
it says why not, and the daemon falls back to the Referenced sampler (or to none).

One context with `vaddr` operations; one target per tracked process and one `stat`
scheme per target, each with a core `target` filter, so that each scheme's
`tried_regions` holds exactly one process's regions (tried regions do not say which
target they came from). After `update_schemes_tried_regions`, a region's `nr_accesses`
over the maximum (aggr_us / sample_us) is the share of samples that found its sampled page
accessed: for an evenly used region, the share of its pages accessed per sampling
interval, i.e. HawkEye's access coverage as a fraction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np

log = logging.getLogger("memdefragd")

ADMIN = "/sys/kernel/mm/damon/admin"
STATE_FILE = "/run/memdefragd/damon.json"
WARMUP = 2.0  # seconds of monitoring before a process's figures mean something
# DAMON starts from a few regions spanning the whole address space and splits them as it
# learns, so its first readings can show no access anywhere in a busy process (seen on
# 6.12 under emulation: 10-12 regions, none accessed, after 3 s; the hot half found after
# 6 s), or a mixed picture that ranks cold regions first (seen at 2 s). Its figures are
# used only once it has monitored for SETTLE seconds.
SETTLE = 10.0
MIN_REGIONS, MAX_REGIONS = 200, 2000  # DAMON's own defaults: 10 and 1000
ULONG_MAX = 2**64 - 1
UINT_MAX = 2**32 - 1
# A `stat` scheme's access pattern, as (min, max) per range: every region that was
# accessed at all. Regions no range covers count as idle (access.hotness_from_ranges), so
# idle memory, the bulk of a big heap, costs nothing to read back: each region read is
# three sysfs files, and 2,000 of them per cycle kept an emulated guest's daemon busy.
ACCESS_PATTERN = {"sz": (0, ULONG_MAX), "nr_accesses": (1, UINT_MAX), "age": (0, UINT_MAX)}


class DamonUnavailable(Exception):
    """DAMON cannot be used here (without disturbing others); the message says why."""


class Damon:
    """Our kdamond: `watch` the processes to measure, `refresh` once per scan cycle, then
    `ranges(pid)` gives (starts, ends, frequency 0..1) of its monitored regions."""

    def __init__(
        self,
        root: str = ADMIN,
        state_file: str = STATE_FILE,
        *,
        sample_us: int = 5_000,
        aggr_us: int = 100_000,
        update_us: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.root = Path(root)
        self.state_file = Path(state_file)
        self.sample_us, self.aggr_us, self.update_us = sample_us, aggr_us, update_us
        self.clock = clock
        self.pids: tuple[int, ...] = ()  # target i, scheme i
        self.started = float("-inf")  # when our kdamond last (re)started
        self._kdamond_pid: str | None = None
        self._ranges: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._open = False

    # ------------------------------------------------------------- sysfs primitives

    def _read(self, rel: str) -> str:
        return (self.root / rel).read_text().strip()

    def _write(self, rel: str, value: object) -> None:
        with open(self.root / rel, "w") as f:
            f.write(f"{value}\n")

    def _exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def _children(self, rel: str) -> list[int]:
        try:
            return sorted(int(n) for n in os.listdir(self.root / rel) if n.isdigit())
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------- life cycle

    def open(self) -> None:
        """Create our kdamond, or raise DamonUnavailable saying why not (touching nothing
        that is not ours)."""
        if not self._exists("kdamonds/nr_kdamonds"):
            raise DamonUnavailable(f"no DAMON sysfs interface at {self.root} (CONFIG_DAMON_SYSFS)")
        n = int(self._read("kdamonds/nr_kdamonds"))
        if n and self._stale_ours(n):
            log.info("DAMON: removing the kdamond a previous memdefragd left behind")
            self._teardown()
            n = int(self._read("kdamonds/nr_kdamonds"))
        if n:
            raise DamonUnavailable(self._occupied(n))
        self._write("kdamonds/nr_kdamonds", 1)
        self._open = True
        self._save_state()
        ctx = "kdamonds/0/contexts"
        self._write(f"{ctx}/nr_contexts", 1)
        avail = self._read(f"{ctx}/0/avail_operations").split()
        if "vaddr" not in avail:
            self.close()
            raise DamonUnavailable(
                f"this kernel's DAMON has no vaddr operations (has: {', '.join(avail) or 'none'}"
                "; CONFIG_DAMON_VADDR is off), so it cannot watch a process's address space"
            )
        self._write(f"{ctx}/0/operations", "vaddr")
        attrs = f"{ctx}/0/monitoring_attrs"
        self._write(f"{attrs}/intervals/sample_us", self.sample_us)
        self._write(f"{attrs}/intervals/aggr_us", self.aggr_us)
        self._write(f"{attrs}/intervals/update_us", self.update_us)
        if self._exists(f"{attrs}/nr_regions/min"):
            # DAMON splits each monitored area into at least this many regions from the
            # start (default 10): coarse regions over a whole address space rarely sample
            # a heap's hot part, and found none for 10 s in an emulated 6.12 guest.
            self._write(f"{attrs}/nr_regions/max", MAX_REGIONS)
            self._write(f"{attrs}/nr_regions/min", MIN_REGIONS)

    def close(self) -> None:
        """Stop and remove our kdamond (only if it is still the one we made)."""
        if not self._open:
            return
        self._open = False
        try:
            if self._ours_now():
                self._teardown()
            else:
                log.warning("DAMON: our kdamond is gone or replaced; leaving sysfs as it is")
        except OSError as e:
            log.warning("DAMON: could not remove our kdamond: %s", e)
        with contextlib.suppress(OSError):
            self.state_file.unlink()

    def _teardown(self) -> None:
        if self._read("kdamonds/0/state") == "on":
            self._write("kdamonds/0/state", "off")
        self._write("kdamonds/nr_kdamonds", 0)

    def _ours_now(self) -> bool:
        if self._read("kdamonds/nr_kdamonds") != "1":
            return False
        pid = self._read("kdamonds/0/pid") if self._exists("kdamonds/0/pid") else None
        return self._kdamond_pid is None or pid in (self._kdamond_pid, "-1")

    def _occupied(self, n: int) -> str:
        kinds = []
        for i in range(n):
            try:
                state = self._read(f"kdamonds/{i}/state")
                ops = self._read(f"kdamonds/{i}/contexts/0/operations")
            except OSError:
                state, ops = "?", "?"
            kinds.append(f"{i}: {state}, {ops}")
        why = (
            f"{n} kdamond(s) configured by someone else ({'; '.join(kinds)}): DAMON's sysfs "
            "interface adds a kdamond only by rebuilding all of them, so memdefragd leaves "
            "DAMON alone"
        )
        with contextlib.suppress(OSError):
            avail = self._read("kdamonds/0/contexts/0/avail_operations").split()
            if "vaddr" not in avail:
                why += "; besides, this kernel has no vaddr operations (CONFIG_DAMON_VADDR)"
        return why

    def _save_state(self) -> None:
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps({"pid": os.getpid(), "boot_id": _boot_id()}))
        except OSError as e:
            log.warning(
                "DAMON: cannot record our kdamond in %s (%s): a memdefragd killed without "
                "cleaning up would leave it for you to remove",
                self.state_file,
                e,
            )

    def _stale_ours(self, n: int) -> bool:
        """A kdamond a memdefragd made and did not remove (it was killed): same boot, its
        process gone, and still the only kdamond."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return False
        if n != 1 or state.get("boot_id") != _boot_id():
            return False
        pid = state.get("pid")
        return isinstance(pid, int) and pid != os.getpid() and not _alive(pid)

    # ------------------------------------------------------------- monitoring

    def watch(self, pids: Collection[int]) -> None:
        """Monitor exactly these processes (a restart of our kdamond when the set changes)."""
        want = tuple(sorted(pids))
        if not self._open or want == self.pids:
            return
        k = "kdamonds/0"
        if self._read(f"{k}/state") == "on":
            self._write(f"{k}/state", "off")
        self.pids, self._ranges = (), {}
        if not want:
            return
        ctx = f"{k}/contexts/0"
        self._write(f"{ctx}/targets/nr_targets", len(want))
        for i, pid in enumerate(want):
            self._write(f"{ctx}/targets/{i}/pid_target", pid)
        self._write(f"{ctx}/schemes/nr_schemes", len(want))
        for i in range(len(want)):
            s = f"{ctx}/schemes/{i}"
            self._write(f"{s}/action", "stat")
            # Every accessed region qualifies (the sysfs defaults of each range are 0..0,
            # which would leave tried_regions empty).
            for rng, (low, high) in ACCESS_PATTERN.items():
                self._write(f"{s}/access_pattern/{rng}/min", low)
                self._write(f"{s}/access_pattern/{rng}/max", high)
            filters = f"{s}/core_filters" if self._exists(f"{s}/core_filters") else f"{s}/filters"
            self._write(f"{filters}/nr_filters", 1)
            f = f"{filters}/0"
            self._write(f"{f}/type", "target")
            self._write(f"{f}/damon_target_idx", i)
            self._write(f"{f}/matching", "N")  # regions not of target i ...
            if self._exists(f"{f}/allow"):
                self._write(f"{f}/allow", "N")  # ... are rejected
        try:
            self._write(f"{k}/state", "on")
        except OSError as e:  # a target exited between listing and now: next cycle
            log.debug("DAMON: could not start monitoring %d process(es): %s", len(want), e)
            return
        self.pids = want
        self.started = self.clock()
        if self._exists(f"{k}/pid"):
            self._kdamond_pid = self._read(f"{k}/pid")

    def refresh(self) -> None:
        """Read every monitored process's regions as they are now."""
        self._ranges = {}
        k = "kdamonds/0"
        if not self.pids or self._read(f"{k}/state") != "on":
            self.pids = ()  # every target exited: DAMON stopped itself
            return
        self._write(f"{k}/state", "update_schemes_tried_regions")
        top = max(1, self.aggr_us // self.sample_us)
        for i, pid in enumerate(self.pids):
            base = f"{k}/contexts/0/schemes/{i}/tried_regions"
            rows = []
            for r in self._children(base):
                d = f"{base}/{r}"
                try:
                    rows.append(
                        (
                            int(self._read(f"{d}/start")),
                            int(self._read(f"{d}/end")),
                            int(self._read(f"{d}/nr_accesses")),
                        )
                    )
                except (OSError, ValueError):
                    continue
            rows.sort()
            arr = np.array(rows, dtype=np.float64).reshape(-1, 3)
            self._ranges[pid] = (arr[:, 0], arr[:, 1], np.minimum(arr[:, 2] / top, 1.0))
            log.debug(
                "DAMON: pid %d: %d region(s), most accesses %d of %d samples, %.1f s monitored",
                pid, len(rows), int(arr[:, 2].max(initial=0)), top, self.clock() - self.started,
            )  # fmt: skip

    def monitored(self) -> float:
        """Seconds since our kdamond last (re)started: its regions start coarse again."""
        return self.clock() - self.started

    def ranges(self, pid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(starts, ends, frequency) of the process's regions; None until it has been
        monitored for WARMUP seconds. (Whether they mean anything yet for the regions one
        asks about is the sampler's call: see SETTLE.)"""
        if pid not in self.pids or self.monitored() < WARMUP:
            return None
        return self._ranges.get(pid)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

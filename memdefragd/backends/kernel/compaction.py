"""Proactive compaction per NUMA node, rate-limited.

When MADV_COLLAPSE fails with ENOMEM there is no free 2 MiB block; writing to
/sys/devices/system/node/nodeN/compact asks the kernel to make some on that node. It costs
CPU and migrations, so each node is asked at most once per `min_interval`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("memdefragd")


class Compactor:
    def __init__(
        self,
        min_interval: float,
        sys_root: str = "/sys",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.min_interval = min_interval
        self.root = Path(sys_root) / "devices/system/node"
        self.clock = clock
        self.last: dict[int, float] = {}
        self.failed: dict[int, str] = {}

    def nodes(self) -> list[int]:
        return sorted(
            int(p.parent.name[4:])
            for p in self.root.glob("node*/compact")
            if p.parent.name[4:].isdigit()
        )

    def maybe_compact(self, nodes: Iterable[int] | None = None) -> list[int]:
        """Compact the nodes not compacted within min_interval; return those compacted."""
        done = []
        for node in self.nodes() if nodes is None else nodes:
            now = self.clock()
            if now - self.last.get(node, -self.min_interval) < self.min_interval:
                continue
            self.last[node] = now
            try:
                (self.root / f"node{node}" / "compact").write_text("1\n")
            except OSError as e:
                self.failed[node] = e.strerror or str(e)
                log.warning("cannot compact node %d: %s", node, e.strerror)
                continue
            done.append(node)
        return done

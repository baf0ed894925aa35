"""Data integrity while targets fight back: children that munmap, mremap, mprotect and fork
under a daemon collapsing their memory as fast as it can, checking every word they wrote."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.kernel.helpers import Daemon, require_kernel, start_hostile, write_config
from tools.child import answer

pytestmark = pytest.mark.kernel

SECONDS = 8.0  # the children's run; the daemon gets SIGTERM at about two thirds of it


def test_no_word_lost_under_munmap_mremap_mprotect_fork(tmp_path: Path) -> None:
    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    require_kernel(
        "[never]" not in enabled.read_text(), "THP enabled=never: nothing would be collapsed"
    )
    cfg = write_config(
        tmp_path / "m.yaml", "mdd-hostile", extra='  access: {source: "off"}',
        pacing="latency_sensitive: false",
    )  # fmt: skip
    d = Daemon(cfg)
    children: list[subprocess.Popen] = []
    try:
        d.wait_for("started:")
        children = [start_hostile("mdd-hostile", SECONDS, seed=i) for i in (1, 2)]
        time.sleep(SECONDS * 2 / 3)
        assert d.proc.poll() is None, d.text()[-3000:]
        t0 = time.monotonic()
        code = d.stop()  # SIGTERM mid-run: the children are still at it
        took = time.monotonic() - t0
        results = [answer(c, 60.0) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
            c.wait()
        d.stop()
    text = d.text()
    assert code == 0 and took < 2.0, f"exit {code} after {took:.1f} s"
    for r in results:
        assert r["bad"] == 0 and r["fork_bad"] == 0, r
        assert r["words"] > 0 and {"munmap", "mremap", "mprotect", "fork"} <= set(r["ops"]), r
    verified = sum(int(m) for m in re.findall(r"collapse pid \d+ .*?(\d+) MiB verified", text))
    assert verified > 0 or any(r["huge"] for r in results), f"nothing collapsed:\n{text[-3000:]}"
    for bad in ("Traceback", "unexpected", " ERROR "):
        assert bad not in text, text[-3000:]

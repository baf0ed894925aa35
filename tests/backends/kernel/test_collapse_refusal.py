"""A kernel older than MADV_COLLAPSE (Linux < 6.1): the kernel backend refuses method
'collapse' with a reason, a config that would move memory is refused at start, and one
whose targets only observe runs as an observer. No such kernel is at hand (Debian 12's
oldest is 6.1, tests/vm), so the kernel's answer to the probe is stood in for here; the
probe itself is checked against the running kernel in tests/kernel/test_collapse_kernel.py.
"""

from __future__ import annotations

import errno
import logging

import pytest

from memdefragd.backends.kernel import collapse
from memdefragd.backends.kernel.backend import KernelBackend
from memdefragd.config import parse_config
from memdefragd.daemon.loop import Daemon


class Sink:
    def __getattr__(self, name):
        return lambda *a, **kw: None


@pytest.fixture
def pre_6_1(monkeypatch):
    """The kernel answers madvise(MADV_COLLAPSE) as one before 6.1 does: EINVAL."""
    asked = []

    def probe(advice: int) -> int:
        asked.append(advice)
        return errno.EINVAL if advice == collapse.MADV_COLLAPSE else 0

    monkeypatch.setattr(collapse, "_madvise_zero_length", probe)
    return asked


def test_an_unknown_advice_is_einval_on_any_linux():
    assert collapse._madvise_zero_length(99) == errno.EINVAL


def test_refusal_names_madv_collapse_and_what_still_works(pre_6_1):
    b = KernelBackend()
    try:
        reason = b.refusal("collapse")
    finally:
        b.close()
    assert pre_6_1 == [collapse.MADV_COLLAPSE]
    assert reason is not None
    assert "MADV_COLLAPSE" in reason and "6.1" in reason and "EINVAL" in reason
    assert "mode: observe" in reason


CONFIG = """
targets:
  - name: t
    match: {comm: '^mdd-no-such-process$'}
    mode: MODE
"""


def test_an_enforcing_config_is_refused_at_start(pre_6_1):
    b = KernelBackend()
    with pytest.raises(SystemExit) as e:
        Daemon(
            parse_config(CONFIG.replace("MODE", "enforce")),
            backend=b,
            notifier=Sink(),
            events=False,
        )
    b.close()
    assert str(e.value).startswith("memdefragd: method 'collapse': this kernel")
    assert "MADV_COLLAPSE" in str(e.value)


def test_an_observing_config_runs_as_an_observer(pre_6_1, caplog):
    b = KernelBackend()
    with caplog.at_level(logging.WARNING, logger="memdefragd"):
        d = Daemon(
            parse_config(CONFIG.replace("MODE", "observe")),
            backend=b,
            notifier=Sink(),
            events=False,
        )
        try:
            d.run(once=True)
        finally:
            b.close()
    text = caplog.text
    assert "method 'collapse' cannot run on this machine" in text
    assert "only measures" in text

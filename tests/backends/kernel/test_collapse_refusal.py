"""A kernel older than MADV_COLLAPSE (Linux < 6.1): the kernel backend refuses method
'collapse' with a reason, and the daemon runs as an observer whatever the config's modes,
saying so in the log and in memdefragd_method_refused. Here the kernel's answer to the
probe is stood in for; tests/kernel runs against a real one (Debian 11's 5.10) in a
guest of tests/vm, and the probe itself against this machine's kernel in
tests/kernel/test_collapse_kernel.py.
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
    assert "only measure" in reason


CONFIG = """
targets:
  - name: t
    match: {comm: '^mdd-no-such-process$'}
    mode: MODE
"""


def refused(d: Daemon) -> dict[str, float]:
    (family,) = [f for f in d.metrics.registry.collect() if f.name == "memdefragd_method_refused"]
    return {s.labels["method"]: s.value for s in family.samples}


@pytest.mark.parametrize("mode", ["enforce", "observe"])
def test_the_daemon_runs_as_an_observer_and_says_why(pre_6_1, caplog, mode):
    b = KernelBackend()
    with caplog.at_level(logging.WARNING, logger="memdefragd"):
        d = Daemon(
            parse_config(CONFIG.replace("MODE", mode)), backend=b, notifier=Sink(), events=False
        )
        try:
            assert d.run(once=True) == 0
        finally:
            b.close()
    assert [t.mode for t in d.config.targets] == ["observe"]
    assert refused(d) == {"collapse": 1.0}
    (record,) = [r for r in caplog.records if "cannot run on this machine" in r.getMessage()]
    text = record.getMessage()
    assert text.startswith("method 'collapse' cannot run on this machine (this kernel")
    assert "MADV_COLLAPSE" in text and "6.1" in text
    if mode == "enforce":  # the config asked for work it will not get: an error
        assert record.levelno == logging.ERROR
        assert "target(s) t are observed only" in text and "no memory is moved" in text
    else:
        assert record.levelno == logging.WARNING
        assert "only measures them" in text


def test_where_the_kernel_has_it_nothing_is_refused():
    b = KernelBackend()
    try:
        d = Daemon(
            parse_config(CONFIG.replace("MODE", "enforce")),
            backend=b,
            notifier=Sink(),
            events=False,
        )
    finally:
        b.close()
    assert [t.mode for t in d.config.targets] == ["enforce"]
    assert refused(d) == {}

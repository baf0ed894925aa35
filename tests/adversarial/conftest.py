"""Hostile input to a root daemon: the real-kernel fixtures (children these tests start,
`memdefragd run` as a subprocess) shared with tests/kernel."""

from tests.kernel.conftest import daemons, spawn  # noqa: F401  (fixtures, by name)

"""Tests that run only on a kernel patched with Translation Ranger (tests/vm boots one)."""

"""Kernels in guests: the test suite (tests/kernel/ by default) in QEMU guests of Debian's
own kernels. `python -m tests.vm --help`; `make vm-test`."""

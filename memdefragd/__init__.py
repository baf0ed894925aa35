"""memdefragd: a policy-driven user-space memory-contiguity agent for Linux."""

__version__ = "0.1.0"

"""Which capabilities memdefragd runs without, and what each one's absence costs.

Read once at start from CapEff in /proc/self/status, so the log says plainly why the
daemon sees or does less than asked, instead of leaving the operator to guess from
zeroed figures, EPERMs and a silent proc connector.
"""

from __future__ import annotations

from pathlib import Path

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_NET_ADMIN = 12
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_SYS_NICE = 23

# (bits, name, what memdefragd cannot do without it), in the order they are reported; any
# one of the bits will do.
NEEDED: tuple[tuple[tuple[int, ...], str, str], ...] = (
    (
        (CAP_SYS_ADMIN,), "CAP_SYS_ADMIN",
        "the kernel zeroes page frame numbers in /proc/PID/pagemap, so physical "
        "contiguity figures (runs, coverage, aligned-contiguous regions) cannot be measured",
    ),
    (
        (CAP_SYS_PTRACE,), "CAP_SYS_PTRACE",
        "processes of other users, or holding capabilities memdefragd lacks (any root "
        "service), cannot be read (/proc/PID/smaps and pagemap need ptrace access), so "
        "they are skipped",
    ),
    (
        (CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE), "CAP_DAC_READ_SEARCH",
        "other users' /proc/PID/pagemap (mode 0400, owned by them) cannot be opened, so "
        "their memory layouts cannot be read",
    ),
    (
        (CAP_SYS_NICE,), "CAP_SYS_NICE",
        "the kernel refuses process_madvise(MADV_COLLAPSE) on other processes, so nothing "
        "is collapsed",
    ),
    (
        (CAP_NET_ADMIN,), "CAP_NET_ADMIN",
        "the kernel refuses the proc connector's process events, so new processes are seen "
        "only by the periodic listing of /proc",
    ),
)  # fmt: skip


def effective_capabilities(proc_root: str = "/proc") -> int | None:
    """The CapEff bit mask of this process, None if it cannot be read."""
    try:
        status = Path(proc_root, "self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            try:
                return int(line.split()[1], 16)
            except (IndexError, ValueError):
                return None
    return None


def has_capability(bit: int, proc_root: str = "/proc") -> bool:
    caps = effective_capabilities(proc_root)
    return caps is not None and bool(caps >> bit & 1)


def privilege_problems(proc_root: str = "/proc") -> list[str]:
    """One sentence per capability memdefragd needs and lacks: its name and its cost."""
    caps = effective_capabilities(proc_root)
    if caps is None:
        return [
            f"cannot read CapEff from {proc_root}/self/status: which capabilities memdefragd "
            "lacks is unknown"
        ]
    return [
        f"no {name}: {cost} (run memdefragd as root with {name})"
        for bits, name, cost in NEEDED
        if not any(caps >> bit & 1 for bit in bits)
    ]

"""Log a message once per key: for races that recur on every scan (a process that exits
between listing and reading, an unreadable pid), logged once, never a crash, never a flood.

The memory is bounded: past ONCE_MAX_KEYS the least recent keys are forgotten, so a
forgotten key may be logged again. Used by every layer, so it depends on none.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

ONCE_MAX_KEYS = 4096


class OnceMemory:
    """Remembers which keys were logged, at most ``max_keys`` of them (least recent dropped)."""

    def __init__(self, max_keys: int = ONCE_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def first(self, key: Hashable) -> bool:
        """True the first time ``key`` is seen (or after it was forgotten)."""
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return False
            self._seen[key] = None
            if len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
            return True

    def log(
        self,
        logger: logging.Logger,
        key: Hashable,
        level: int,
        msg: str,
        *args: object,
        **kwargs: Any,
    ) -> bool:
        """Log ``msg`` unless ``key`` was logged already on this logger; True if logged.

        A record the logger would drop (level disabled) does not use up the key.
        """
        if not logger.isEnabledFor(level):
            return False
        if not self.first((logger.name, key)):
            return False
        kwargs.setdefault("stacklevel", 2)
        logger.log(level, msg, *args, **kwargs)
        return True


_ONCE = OnceMemory()


def once(
    logger: logging.Logger,
    key: Hashable,
    level: int,
    msg: str,
    *args: object,
    **kwargs: Any,
) -> bool:
    """Log ``msg`` at ``level`` only the first time ``key`` is seen for ``logger``.

    Keys are remembered per logger name in one process-wide, bounded memory (ONCE_MAX_KEYS).
    Extra keyword arguments (``extra=``, ``exc_info=``) go to ``logger.log``. Returns True
    if the message was logged.
    """
    kwargs.setdefault("stacklevel", 3)
    return _ONCE.log(logger, key, level, msg, *args, **kwargs)

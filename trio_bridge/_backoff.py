"""Reconnect policy (pure): exponential backoff with full jitter, a cap, and a reset.

``delay = max(floor, uniform(0, min(cap, base * 2**attempt)))`` ("full jitter", which spreads
a crowd of connectors that lost the same broker; ``floor`` 0 unless set). After a connection
stayed up for ``stable_after`` seconds, the next failure starts again from ``base``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs


@attrs.define
class Backoff:
    base: float = 0.5
    cap: float = 8.0
    stable_after: float = 30.0
    #: no delay shorter than this (full jitter starts at 0 otherwise)
    floor: float = 0.0
    attempt: int = 0
    rand: Callable[[], float] = attrs.field(default=random.random, repr=False)

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        ceiling = min(self.cap, self.base * 2.0 ** min(self.attempt, 32))
        self.attempt += 1
        return max(self.floor, ceiling * self.rand())

    def connected_for(self, seconds: float) -> None:
        """Report how long the last connection lasted; a stable one resets the backoff."""
        if seconds >= self.stable_after:
            self.attempt = 0

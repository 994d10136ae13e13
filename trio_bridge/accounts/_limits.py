"""Per-key limits and the fair queue, as pure code (no trio, no I/O; time is passed in).

Two clocks are passed in: ``now`` runs the minute windows (``trio.current_time()``: monotonic,
under a test's clock; a step of the wall clock changes nothing), ``wall`` the UTC day of the
daily budgets (``time.time()``; it defaults to ``now``, for tests that need one clock).

Limits of an API key (keys file, per key or in ``[defaults]``)::

    concurrency         requests of this key in progress at once
    rpm                 requests per minute (sliding 60 s window)
    tokens_per_minute   prompt + completion tokens per minute (sliding 60 s window)
    tokens_per_day      prompt + completion tokens per UTC day
    models              allowed model names (globs); empty = any
    priority            weight in the fair queue (default 1)

A request is admitted (:meth:`Limiter.admit`) or refused with a :class:`Refusal` (HTTP 429 with
``Retry-After``). Token limits are checked *before* a request with what was used so far (an
answer's size is not known in advance), and the tokens are counted when the answer ends
(:meth:`Limiter.finish`): a key can overshoot by the tokens of the requests in flight when it
crosses its limit, never more.

:class:`FairQueue` orders requests that wait for an LLM slot: weighted round-robin over keys, so
a key with many queued requests delays a key with one by at most one turn of each other key.
"""

from __future__ import annotations

import fnmatch
import math
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

import attrs

WINDOW = 60.0
DAY = 86400.0

T = TypeVar("T")


@attrs.frozen(kw_only=True)
class KeyLimits:
    concurrency: int | None = None
    rpm: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    models: tuple[str, ...] = ()
    priority: int = 1

    def allows_model(self, model: str | None) -> bool:
        """True if ``model`` is allowed (a request that names no model always is)."""
        if not self.models or model is None:
            return True
        return any(fnmatch.fnmatchcase(model, p) for p in self.models)

    @property
    def limited(self) -> bool:
        return any(
            v is not None
            for v in (self.concurrency, self.rpm, self.tokens_per_minute, self.tokens_per_day)
        )

    def merged_over(self, defaults: KeyLimits) -> KeyLimits:
        """These limits, with unset ones taken from ``defaults``."""
        return KeyLimits(
            concurrency=_first(self.concurrency, defaults.concurrency),
            rpm=_first(self.rpm, defaults.rpm),
            tokens_per_minute=_first(self.tokens_per_minute, defaults.tokens_per_minute),
            tokens_per_day=_first(self.tokens_per_day, defaults.tokens_per_day),
            models=self.models or defaults.models,
            priority=self.priority if self.priority != 1 else defaults.priority,
        )


def _first(a: int | None, b: int | None) -> int | None:
    return a if a is not None else b


@attrs.frozen
class Refusal:
    """Why a request is refused now: ``limit`` names it, ``retry_after`` in seconds."""

    limit: str
    message: str
    retry_after: int


#: seconds of float rounding forgiven at a window's edge
EDGE = 1e-6


class _Window:
    """Amounts in a sliding window of ``WINDOW`` seconds."""

    __slots__ = ("_items", "total")

    def __init__(self) -> None:
        self._items: deque[tuple[float, int]] = deque()
        self.total = 0

    def expire(self, now: float) -> None:
        items = self._items
        # EDGE: what leaves at exactly now - WINDOW has left, also when float rounding puts
        # it a hair after (a client that waited exactly Retry-After is let in)
        while items and items[0][0] <= now - WINDOW + EDGE:
            self.total -= items.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        if amount:
            self._items.append((now, amount))
            self.total += amount

    def reset_in(self, now: float, need: int) -> float:
        """Seconds until the window total drops by at least ``need``."""
        freed = 0
        for t, amount in self._items:
            freed += amount
            if freed >= need:
                return max(0.0, t + WINDOW - now)
        return WINDOW


@attrs.define
class _KeyState:
    in_flight: int = 0
    requests: _Window = attrs.field(factory=_Window)
    tokens: _Window = attrs.field(factory=_Window)
    day: int = -1
    tokens_today: int = 0


class Limiter:
    """The live counters of every key (one per connector process), by what its limits count
    under (``key_id`` here: ``accounts._keys.budget``, the key's name)."""

    def __init__(self) -> None:
        self._keys: dict[str, _KeyState] = {}

    def _state(self, key_id: str, now: float, wall: float | None = None) -> _KeyState:
        st = self._keys.get(key_id)
        if st is None:
            st = self._keys[key_id] = _KeyState()
        st.requests.expire(now)
        st.tokens.expire(now)
        if wall is not None:  # None: the day's budget is not looked at
            day = int(wall // DAY)
            if st.day != day:
                st.day, st.tokens_today = day, 0
        return st

    def seed_today(self, key_id: str, tokens: int, wall: float) -> None:
        """Tokens a key already used today (from the usage store, after a restart)."""
        st = self._keys.setdefault(key_id, _KeyState())
        day = int(wall // DAY)
        if st.day != day:
            st.day, st.tokens_today = day, 0
        st.tokens_today += tokens

    def admit(
        self, key_id: str, limits: KeyLimits, now: float, *, wall: float | None = None
    ) -> Refusal | None:
        """Count a new request of ``key_id`` in, or say why not (nothing is counted then)."""
        st = self._state(key_id, now, now if wall is None else wall)
        if limits.concurrency is not None and st.in_flight >= limits.concurrency:
            return limit_refusal("concurrency", limits, in_flight=st.in_flight)
        if limits.rpm is not None and st.requests.total >= limits.rpm:
            wait = st.requests.reset_in(now, st.requests.total - limits.rpm + 1)
            return limit_refusal("requests", limits, wait=wait)
        if limits.tokens_per_minute is not None and st.tokens.total >= limits.tokens_per_minute:
            wait = st.tokens.reset_in(now, st.tokens.total - limits.tokens_per_minute + 1)
            return limit_refusal("tokens", limits, wait=wait)
        if limits.tokens_per_day is not None and st.tokens_today >= limits.tokens_per_day:
            return limit_refusal("tokens_per_day", limits, wall=now if wall is None else wall)
        st.in_flight += 1
        st.requests.add(now, 1)
        return None

    def in_flight(self, key_id: str) -> int:
        """Requests of ``key_id`` admitted here and not finished."""
        st = self._keys.get(key_id)
        return 0 if st is None else st.in_flight

    def finish(self, key_id: str, tokens: int, now: float, *, wall: float | None = None) -> None:
        """A request of ``key_id`` ended having used ``tokens`` (prompt + completion)."""
        st = self._state(key_id, now, now if wall is None else wall)
        st.in_flight = max(0, st.in_flight - 1)
        st.tokens.add(now, tokens)
        st.tokens_today += tokens

    def headers(self, key_id: str, limits: KeyLimits, now: float) -> list[tuple[bytes, bytes]]:
        """OpenAI's rate-limit headers for a key with per-minute limits (after admission)."""
        st = self._state(key_id, now)
        requests, tokens = st.requests, st.tokens
        return ratelimit_headers(
            limits,
            (requests.total, requests.reset_in(now, 1) if requests.total else 0.0),
            (tokens.total, tokens.reset_in(now, 1) if tokens.total else 0.0),
        )

    def snapshot(
        self, key_id: str, limits: KeyLimits, now: float, *, wall: float | None = None
    ) -> dict[str, int | None]:
        """What is left now (for ``/_bridge/usage``); None where there is no limit."""
        st = self._state(key_id, now, now if wall is None else wall)

        def left(limit: int | None, used: int) -> int | None:
            return None if limit is None else max(0, limit - used)

        return {
            "in_flight": st.in_flight,
            "concurrency_left": left(limits.concurrency, st.in_flight),
            "requests_this_minute": st.requests.total,
            "requests_left_this_minute": left(limits.rpm, st.requests.total),
            "tokens_this_minute": st.tokens.total,
            "tokens_left_this_minute": left(limits.tokens_per_minute, st.tokens.total),
            "tokens_today": st.tokens_today,
            "tokens_left_today": left(limits.tokens_per_day, st.tokens_today),
        }


def limit_refusal(
    limit: str, limits: KeyLimits, *, in_flight: int = 0, wait: float = 0.0, wall: float = 0.0
) -> Refusal:
    """The refusal for ``limit`` ("concurrency", "requests", "tokens", "tokens_per_day"):
    ``in_flight`` the key's requests in progress, ``wait`` seconds until the window has room,
    ``wall`` the Unix time (the daily budget resets at 00:00 UTC). The words are the same
    whether one connector counted or the pool's store did."""
    if limit == "concurrency":
        return Refusal(
            limit,
            f"this API key has {in_flight} requests in progress (limit {limits.concurrency}); "
            "retry when one finishes",
            1,
        )
    if limit == "requests":
        return Refusal(
            limit, f"rate limit reached: {limits.rpm} requests per minute for this API key",
            _ceil(wait),
        )  # fmt: skip
    if limit == "tokens":
        return Refusal(
            limit,
            f"rate limit reached: {limits.tokens_per_minute} tokens per minute for this API key",
            _ceil(wait),
        )
    return Refusal(
        "tokens_per_day",
        f"daily token budget used up: {limits.tokens_per_day} tokens per day for this API key "
        "(resets at 00:00 UTC)",
        _ceil(DAY - wall % DAY),
    )


def ratelimit_headers(
    limits: KeyLimits, requests: tuple[int, float], tokens: tuple[int, float]
) -> list[tuple[bytes, bytes]]:
    """OpenAI's rate-limit headers for the per-minute limits a key has: ``requests`` and
    ``tokens`` are (used in the window, seconds until the oldest leaves it)."""
    out: list[tuple[bytes, bytes]] = []
    for kind, limit, (used, reset) in (
        ("requests", limits.rpm, requests),
        ("tokens", limits.tokens_per_minute, tokens),
    ):
        if limit is None:
            continue
        out += [
            (f"x-ratelimit-limit-{kind}".encode(), str(limit).encode()),
            (f"x-ratelimit-remaining-{kind}".encode(), str(max(0, limit - used)).encode()),
            (f"x-ratelimit-reset-{kind}".encode(), duration_text(reset).encode()),
        ]
    return out


def _ceil(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def duration_text(seconds: float) -> str:
    """OpenAI's reset format: ``"1s"``, ``"6m0s"``, ``"250ms"``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class FairQueue(Generic[T]):
    """Waiting items ordered by weighted round-robin over keys (pure; no waiting itself).

    Each key with waiting items has a place in a ring; :meth:`pop` serves the key at the front
    up to its ``weight`` items in a row, then moves it to the back. A key that arrives joins at
    the back, so it waits at most one turn of every other waiting key.
    """

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._ring: deque[str] = deque()
        self._items: dict[str, deque[T]] = {}
        self._weights: dict[str, int] = {}
        self._served_in_turn = 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    @property
    def full(self) -> bool:
        return self._len >= self.max_items

    def push(self, key: str, item: T, weight: int = 1) -> None:
        if self.full:
            raise OverflowError("fair queue full")
        items = self._items.get(key)
        if items is None:
            items = self._items[key] = deque()
            self._ring.append(key)
        items.append(item)
        self._weights[key] = max(1, weight)
        self._len += 1

    def remove(self, key: str, item: T) -> bool:
        """Take a waiting item out (it gave up); False if it is not waiting."""
        items = self._items.get(key)
        if items is None or item not in items:
            return False
        items.remove(item)
        self._len -= 1
        if not items:
            self._drop(key)
        return True

    def pop(self) -> T | None:
        """The next item to serve, or None if nothing waits."""
        if not self._ring:
            return None
        key = self._ring[0]
        items = self._items[key]
        item = items.popleft()
        self._len -= 1
        self._served_in_turn += 1
        if not items:
            self._drop(key)
        elif self._served_in_turn >= self._weights[key]:
            self._ring.rotate(-1)
            self._served_in_turn = 0
        return item

    def _drop(self, key: str) -> None:
        if self._ring and self._ring[0] == key:
            self._served_in_turn = 0
        self._ring.remove(key)
        del self._items[key]
        self._weights.pop(key, None)

    def waiting(self) -> Iterable[tuple[str, int]]:
        """(key, items waiting) for each key in the ring."""
        return ((k, len(self._items[k])) for k in self._ring)

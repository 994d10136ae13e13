"""A relayed request's body, as the connector takes it from the relay: the rules it is held to
(size, pace) and what one relay's requests may hold at once.

Error handling: every refusal is a :class:`BodyRefused`; the request answers its ``status``
(nothing sent to the LLM yet) or resets the stream with its ``code`` (the LLM call started).
"""

from __future__ import annotations

import logging
import math

import attrs
import trio

from trio_bridge._config import Config
from trio_bridge._errors import BridgeError
from trio_bridge.relay._frames import ResetCode
from trio_bridge.relay._relay import RelayStream

log = logging.getLogger("trio_bridge.connector")

#: a body that declares at most this is read whole before its request takes an LLM slot (a
#: slow client then holds none while its body crawls in); larger ones (uploads) stream
WHOLE_BEFORE_SLOT = 1024 * 1024


class BodyRefused(BridgeError):
    """A request body the connector stops reading: answered ``status`` (or reset with
    ``code`` once the LLM call started)."""

    status = 400
    code = ResetCode.CANCEL
    message = ""


class TooLarge(BodyRefused):
    status, code, message = 413, ResetCode.TOO_LARGE, "request body too large"


class TooSlow(BodyRefused):
    status, code = 408, ResetCode.TIMEOUT
    message = "the request body came too slowly"


class OverBudget(BodyRefused):
    status, code = 503, ResetCode.REFUSED
    message = "too many request bodies are held for this broker; retry shortly"


class KeyOverBudget(BodyRefused):
    status, code = 429, ResetCode.REFUSED
    message = "this API key has too many request bodies in progress; retry when one finishes"


@attrs.frozen
class BodyRules:
    """What a request body is held to: at most ``max_body`` bytes; at least ``rate`` bytes per
    second on average after ``grace`` seconds (head_timeout, as the broker holds its public
    clients to), and all of it within ``within`` seconds (first_byte_timeout)."""

    max_body: int
    grace: float
    rate: int
    within: float

    @classmethod
    def from_config(cls, config: Config) -> BodyRules:
        lim = config.limits
        return cls(
            int(lim.max_body),
            float(lim.head_timeout),
            int(lim.min_body_rate),
            float(lim.first_byte_timeout),
        )


class BodyChunks:
    """The request body as it comes (an async iterator, not an async generator: nothing of it
    is left for the garbage collector to finish), held to ``rules``: raises
    :class:`TooLarge`, :class:`TooSlow`. Each chunk waits on the stream: a checkpoint."""

    __slots__ = ("latest", "rules", "size", "started", "stream")

    def __init__(self, stream: RelayStream, rules: BodyRules) -> None:
        self.stream, self.rules = stream, rules
        self.size = 0
        self.started = trio.current_time()
        self.latest = self.started + rules.within

    def __aiter__(self) -> BodyChunks:
        return self

    async def __anext__(self) -> bytes:
        rules = self.rules
        due = min(self.started + rules.grace + self.size / rules.rate, self.latest)
        with trio.move_on_at(due) as slow:
            chunk = await self.stream.receive_data()
        if slow.cancelled_caught:
            raise TooSlow
        if not chunk:
            raise StopAsyncIteration
        self.size += len(chunk)
        if self.size > rules.max_body:
            raise TooLarge
        return chunk


#: failed key checks one relay may cause in KEY_FAILURE_WINDOW seconds; beyond, invalid keys
#: get 429 and no log line of their own (one summary line per window)
KEY_FAILURES_PER_WINDOW = 50
KEY_FAILURE_WINDOW = 10.0


class RelayGuard:
    """What one relay's requests may cost the connector, whoever sends them: bytes of whole
    request bodies held at once (``take`` / ``give``; a hostile broker cannot make the
    connector buffer more than ``limit`` for it, and one key not more than half of it, so
    other keys on the same broker still get through), and failed key checks answered and
    logged one by one."""

    __slots__ = ("by_key", "failures", "limit", "unlogged", "used", "window_start")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.by_key: dict[str, int] = {}
        self.window_start = -math.inf
        self.failures = 0
        self.unlogged = 0

    def take(self, n: int, key: str) -> None:
        """Count ``n`` more bytes held for ``key``; raises KeyOverBudget (the key's share,
        half the limit) or OverBudget (the relay's) and counts nothing then."""
        held = self.by_key.get(key, 0)
        if held + n > self.limit // 2:
            raise KeyOverBudget
        if self.used + n > self.limit:
            raise OverBudget
        self.used += n
        self.by_key[key] = held + n

    def give(self, n: int, key: str) -> None:
        """``n`` bytes held for ``key`` are no longer held."""
        if n:
            self.used -= n
            left = self.by_key[key] - n
            if left:
                self.by_key[key] = left
            else:
                del self.by_key[key]

    def key_failed(self, now: float) -> bool:
        """Count a failed key check; False once this window's budget is spent (the caller
        answers 429 and logs nothing for it)."""
        if now - self.window_start >= KEY_FAILURE_WINDOW:
            if self.unlogged:
                log.warning(
                    "%d more failed key checks from one broker in %.0f s were refused with "
                    "429 and not logged one by one",
                    self.unlogged,
                    KEY_FAILURE_WINDOW,
                )
            self.window_start, self.failures, self.unlogged = now, 0, 0
        self.failures += 1
        if self.failures <= KEY_FAILURES_PER_WINDOW:
            return True
        self.unlogged += 1
        return False


class Prefixed:
    """A body's first bytes (read before its request took an LLM slot), then the rest as it
    comes (an async iterator, as :class:`BodyChunks`)."""

    __slots__ = ("first", "rest")

    def __init__(self, first: bytes, rest: BodyChunks) -> None:
        self.first, self.rest = first, rest

    def __aiter__(self) -> Prefixed:
        return self

    async def __anext__(self) -> bytes:
        if self.first:
            first, self.first = self.first, b""
            await trio.lowlevel.checkpoint()
            return first
        return await self.rest.__anext__()


async def read_start(
    stream: RelayStream, rules: BodyRules, guard: RelayGuard, key: str, up_to: int
) -> bytes | Prefixed:
    """A body of unknown length (chunked): whole if it ends within ``up_to`` bytes, else its
    first bytes and the rest to come (:class:`Prefixed`). What was read is taken from the
    relay's ``guard`` (the caller gives it back once the call ends; here if reading fails).
    Raises :class:`BodyRefused` as :func:`read_whole`."""
    chunks = BodyChunks(stream, rules)
    parts: list[bytes] = []
    taken = 0
    try:
        async for chunk in chunks:
            guard.take(len(chunk), key)
            taken += len(chunk)
            parts.append(chunk)
            if taken > up_to:  # an upload: the rest streams
                return Prefixed(b"".join(parts), chunks)
    except BaseException:
        guard.give(taken, key)
        raise
    return b"".join(parts)


async def read_whole(stream: RelayStream, rules: BodyRules, guard: RelayGuard, key: str) -> bytes:
    """The whole request body, its bytes taken from the relay's ``guard`` as they come (the
    caller gives them back once the call ends; here if reading fails). Raises
    :class:`BodyRefused`: beyond max_body, slower than the pace, over the budget."""
    if stream.recv_done:  # all here already (a small request): no waiting
        body, _ = stream.take_ready()
        if len(body) > rules.max_body:
            raise TooLarge
        guard.take(len(body), key)
        return body  # noqa: ASYNC910  all here already: the LLM call checkpoints
    parts: list[bytes] = []
    taken = 0
    try:
        async for chunk in BodyChunks(stream, rules):
            guard.take(len(chunk), key)
            taken += len(chunk)
            parts.append(chunk)
    except BaseException:
        guard.give(taken, key)
        raise
    return b"".join(parts)

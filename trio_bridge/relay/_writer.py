"""I/O: the writing side of a relay: the one task that sends on the transport, coalescing
queued frames into messages (see :mod:`trio_bridge.relay._relay` for the whole relay)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import trio

from trio_bridge._errors import (
    RelayClosed,
)
from trio_bridge.relay._frames import MAX_MESSAGE

#: bytes the writer may hold (see the module docstring). The connector's side: data and
#: response heads wait below high_water, so the rest is control frames (a RESET per stream at
#: most, from an honest broker). The broker's side also holds request heads, which do not wait:
#: public requests in progress (max_requests) times their heads (max_header_bytes) bound them.
MAX_QUEUED = 4 * 1024 * 1024
MAX_QUEUED_OPENER = 64 * 1024 * 1024
#: what a queued frame costs beyond its bytes (a bytes object and its slot in the queue)
FRAME_OVERHEAD = 64


class MessageTransport(Protocol):
    """What a relay needs from a WebSocket: whole binary messages both ways."""

    async def send_message(self, data: bytes, *more: bytes) -> None:
        """Send ``data`` (and ``more``, joined to it) as one message."""
        ...

    async def receive_message(self) -> bytes:
        """The next message; raises RelayClosed when the connection is gone."""
        ...

    async def aclose(self) -> None: ...


class Writer:
    """Single owner of the transport's send side; coalesces queued frames into messages.

    Resource handling: it holds at most ``max_queued`` bytes (frames counted with
    ``FRAME_OVERHEAD``); the frame that would pass that drops the whole queue, closes the
    writer and calls ``on_overflow`` with the reason (the relay then closes).
    """

    def __init__(
        self,
        transport: MessageTransport,
        high_water: int,
        max_queued: int,
        on_overflow: Callable[[str], None],
    ) -> None:
        self._transport = transport
        self._high_water = high_water
        self._max_queued = max_queued
        self._on_overflow = on_overflow
        self._frames: deque[bytes] = deque()
        self._queued = 0
        self._has_data = trio.lowlevel.ParkingLot()
        self._space = trio.lowlevel.ParkingLot()
        self._flushed = trio.lowlevel.ParkingLot()
        # frames taken off the queue for writing / whose write completed, since the start:
        # counted per message (by the writer), not per frame (put_nowait stays as it is)
        self._taken = 0
        self._written = 0
        #: when the write in progress began (None: none is)
        self.writing_since: float | None = None
        self.closed: str | None = None

    @property
    def queued(self) -> int:
        """Bytes of the frames waiting to be sent."""
        return self._queued

    def put_nowait(self, frame: bytes) -> None:
        if self.closed is not None:
            raise RelayClosed(self.closed)
        if not frame:
            return
        frames = self._frames
        frames.append(frame)
        self._queued += len(frame)
        if self._queued + FRAME_OVERHEAD * len(frames) > self._max_queued:
            self._overflow()
        elif self._has_data:
            self._has_data.unpark()

    def _overflow(self) -> None:
        reason = f"peer not reading: more than {self._max_queued} bytes waiting to be sent"
        self.close(reason)
        self._on_overflow(reason)

    @property
    def has_space(self) -> bool:
        return self.closed is None and self._queued < self._high_water

    async def wait_space(self) -> None:  # noqa: ASYNC910  fast path: room now, no wait
        """Wait while ``high_water`` bytes or more are queued; RelayClosed once closed.
        Below it (every data frame asks) it returns at once, without a schedule point: a
        sender that keeps sending fills the writer and then waits here."""
        while self._queued >= self._high_water:
            if self.closed is not None:
                raise RelayClosed(self.closed)
            await self._space.park()
        if self.closed is not None:
            raise RelayClosed(self.closed)

    def close(self, reason: str) -> None:
        """Nothing more is sent: what is queued is dropped, waiters wake."""
        if self.closed is None:
            self.closed = reason
        self._frames.clear()
        self._queued = 0
        self._space.unpark_all()
        self._flushed.unpark_all()

    async def wait_flushed(self) -> None:
        """Return once every frame queued before the call was written to the transport, or
        the writer closed (what it held is dropped then). Frames queued after the call do
        not hold it up."""
        target = self._taken + len(self._frames)
        if self._written >= target or self.closed is not None:
            await trio.lowlevel.checkpoint()
            return
        while True:
            await self._flushed.park()
            if self._written >= target or self.closed is not None:
                return

    async def run(self) -> None:
        frames = self._frames
        while True:
            while not frames:
                await self._has_data.park()
            if self._queued <= MAX_MESSAGE:
                parts = list(frames)
                frames.clear()
                size = self._queued
            else:
                parts = []
                size = 0
                while frames and size + len(frames[0]) <= MAX_MESSAGE:
                    f = frames.popleft()
                    parts.append(f)
                    size += len(f)
            self._queued -= size
            self._taken += len(parts)
            if self._space:
                self._space.unpark_all()
            self.writing_since = trio.current_time()
            # the frames as parts: the transport joins them with its own header, one copy
            await self._transport.send_message(*parts)
            self.writing_since = None
            self._written = self._taken
            if self._flushed:
                self._flushed.unpark_all()

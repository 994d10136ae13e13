"""I/O: one stream of a relay (a request and its answer), as one side sees it: the buffered
data its credit window allows, its reset, and the hooks its owner sets."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from trio_bridge._errors import (
    LocalProtocolError,
    RelayClosed,
    StreamReset,
)
from trio_bridge.relay._frames import MAX_PAYLOAD, Payload, ResetCode
from trio_bridge.relay._protocol import (
    RequestHead,
    ResponseHead,
)

if TYPE_CHECKING:
    from trio_bridge.relay._relay import Relay

#: chunks RelayStream.receive_data hands out before it lets other tasks run: a stream whose
#: reader was busy may hold a window's worth of tiny chunks, each returned without a wait
CHUNKS_PER_TURN = 256


class RelayStream:
    """One request/response exchange on a relay, as seen by one side.

    Receiving methods raise :class:`StreamReset` once the stream was reset (by either side or
    because the relay was lost). ``on_reset``, when set by the owner of the stream, runs once
    on such a reset, so work that is not waiting on the stream (an upstream HTTP call, a write
    to a client) can be cancelled.
    """

    __slots__ = (
        "_calls",
        "_chunks",
        "_counted",
        "_held",
        "_lot",
        "_relay",
        "_unacked",
        "bytes_received",
        "bytes_sent",
        "id",
        "on_reset",
        "recv_done",
        "request_head",
        "reset_error",
        "response_head",
        "send_done",
    )

    def __init__(self, relay: Relay, stream_id: int, request_head: RequestHead | None = None):
        self.id = stream_id
        self.request_head = request_head
        self.response_head: ResponseHead | None = None
        #: called once when the stream is reset (by either side or with its relay)
        self.on_reset: Callable[[], None] | None = None
        self.reset_error: StreamReset | None = None
        self.send_done = False  # our END went out
        self.recv_done = False  # the peer's END arrived
        self.bytes_received = 0
        self.bytes_sent = 0
        self._relay = relay
        # a list, not a deque: it rarely holds more than a chunk or two, and an empty deque
        # costs ~0.6 KiB per stream (a list 56 bytes), on both sides of every open stream
        self._chunks: list[bytes] = []
        self._held = 0  # bytes in _chunks counted in the relay's `buffered`
        self._counted = True
        self._unacked = 0
        self._calls = 0  # of receive_data (a schedule point every CHUNKS_PER_TURN)
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def finished(self) -> bool:
        return self.reset_error is not None or (self.send_done and self.recv_done)

    # -- receiving --
    async def receive_response_head(self) -> ResponseHead:
        """The response head (waits for it); at once, without a schedule point, when it is
        here already. Raises the stream's StreamReset if it was reset first."""
        while self.response_head is None:
            if self.reset_error is not None:
                raise self.reset_error
            await self._lot.park()
        return self.response_head  # noqa: ASYNC910  fast path: the head is here

    async def receive_data(self) -> bytes:
        """The next body chunk; b"" once the peer ended the stream (a reset that arrives
        after the peer's END does not take back what was complete).

        A chunk already buffered is returned without waiting (nor a schedule point, but one
        every ``CHUNKS_PER_TURN`` calls: the chunks a stream holds are bounded by its window,
        not their number).

        Cancellation: a chunk is taken only after the last schedule point, so a cancelled
        call loses nothing."""
        self._calls += 1
        if not self._calls % CHUNKS_PER_TURN:
            await trio.lowlevel.checkpoint()
        while not self._chunks:
            if self.recv_done:
                return b""  # noqa: ASYNC910  fast path: the end is here
            if self.reset_error is not None:
                raise self.reset_error
            await self._lot.park()
        chunk = self._chunks.pop(0)
        self._consumed(len(chunk))
        return chunk  # noqa: ASYNC910  fast path: a chunk was buffered

    def take_ready(self) -> tuple[bytes, bool]:
        """Everything buffered now, without waiting, and whether that is the end of the
        body (so a writer can send it in one piece)."""
        chunks = self._chunks
        if not chunks:
            return b"", self.recv_done
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._consumed(len(data))
        return data, self.recv_done

    def _consumed(self, n: int) -> None:
        if self._counted:
            self._held -= n
            self._relay.unhold(n)
        if not self.recv_done:
            self._unacked += n
            if self._unacked >= self._relay.grant_threshold:
                increment, self._unacked = self._unacked, 0
                self._relay.grant(self.id, increment)

    # -- sending --
    async def send_response(self, head: ResponseHead, *, end_stream: bool = False) -> None:
        self._check_sendable()
        await self._wait_space()
        self._check_sendable()
        self._relay.send_frame(
            self._relay.session.send_response(self.id, head, end_stream=end_stream)
        )
        if end_stream:
            self._sent_end()

    def can_send(self, n: int) -> bool:
        """True if ``send_data`` of ``n`` bytes (≤ MAX_PAYLOAD) will not wait."""
        relay = self._relay
        return (
            self.reset_error is None
            and not self.send_done
            and n <= MAX_PAYLOAD
            and relay.writer_has_space
            and relay.session.send_window(self.id) >= n
        )

    async def send_data(self, data: Payload, *, end_stream: bool = False) -> None:
        """Send ``data`` (any size), waiting for credit as needed."""
        if data and self.can_send(len(data)):  # the common case: one frame, no wait
            relay = self._relay
            relay.send_frame(relay.session.send_data(self.id, data, end_stream=end_stream))
            self.bytes_sent += len(data)
            if end_stream:
                self._sent_end()
            return  # noqa: ASYNC910  fast path: one frame within credit and writer room
        session = self._relay.session
        view = memoryview(data)
        while True:
            self._check_sendable()
            window = session.send_window(self.id)
            if window <= 0 and view:
                await self._lot.park()
                continue
            await self._wait_space()
            self._check_sendable()
            window = session.send_window(self.id)
            n = min(len(view), window, MAX_PAYLOAD)
            last = n == len(view)
            if n == 0 and not (last and end_stream):
                return
            self._relay.send_frame(
                session.send_data(self.id, view[:n], end_stream=end_stream and last)
            )
            self.bytes_sent += n
            view = view[n:]
            if last:
                if end_stream:
                    self._sent_end()
                return

    async def end(self) -> None:
        await self.send_data(b"", end_stream=True)

    def reset(self, code: int, reason: str) -> None:
        """Reset the stream (no-op if it already finished). Never blocks."""
        if self.finished:
            return
        self._relay.reset_stream(self, code, reason)

    async def _wait_space(self) -> None:
        """Wait for room in the writer; a dead relay is this stream's reset (RELAY_LOST)."""
        try:
            await self._relay.wait_writer_space()
        except RelayClosed as exc:
            self.fail(ResetCode.RELAY_LOST, f"relay lost: {exc.reason}")
            raise self.reset_error from None  # type: ignore[misc]

    def _check_sendable(self) -> None:
        if self.reset_error is not None:
            raise self.reset_error
        if self.send_done:
            raise LocalProtocolError("stream already ended")

    def _sent_end(self) -> None:
        self.send_done = True
        if self.recv_done:
            self._relay.stream_ended(self)

    # -- called by the relay (its reader, its teardown, flow control) --
    @property
    def held(self) -> int:
        """Received bytes waiting here that count in the relay's ``buffered``."""
        return self._held

    def wake(self) -> None:
        """Wake the tasks waiting on this stream (new credit arrived)."""
        self._lot.unpark_all()

    def deliver(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.append(data)
            self.bytes_received += len(data)
            if self._counted:
                self._held += len(data)
                self._relay.hold(len(data))
        if end:
            self.recv_done = True
            if self.send_done:
                self._relay.stream_ended(self)
        self._lot.unpark_all()

    def fail(self, code: int, reason: str) -> None:
        if self.reset_error is None:
            self.reset_error = StreamReset(code, reason)
        self.detach()
        if not self.recv_done:
            self._chunks.clear()  # an incomplete body: nobody will use it
        self._lot.unpark_all()
        if self.on_reset is not None:
            on_reset, self.on_reset = self.on_reset, None
            on_reset()

    def detach(self) -> None:
        """The stream leaves its relay: its buffered bytes stop counting there."""
        if self._counted:
            self._relay.unhold(self._held)
            self._held = 0
            self._counted = False

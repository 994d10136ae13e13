"""An in-memory MessageTransport pair: relays without sockets, for the autojump clock."""

from __future__ import annotations

import trio

from trio_bridge._errors import RelayClosed


class MemTransport:
    def __init__(
        self,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
    ) -> None:
        self._send, self._receive = send, receive
        self.blackhole = False

    async def send_message(self, data: bytes, *more: bytes) -> None:
        if self.blackhole:
            return
        try:
            await self._send.send(b"".join((data, *more)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise RelayClosed("peer gone") from None

    async def receive_message(self) -> bytes:
        while True:
            try:
                data = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise RelayClosed("peer closed") from None
            if not self.blackhole:
                return data

    async def aclose(self) -> None:
        await self._send.aclose()


def transport_pair(capacity: int = 100) -> tuple[MemTransport, MemTransport]:
    """Two connected transports (broker end, connector end)."""
    a_send, b_receive = trio.open_memory_channel[bytes](capacity)
    b_send, a_receive = trio.open_memory_channel[bytes](capacity)
    return MemTransport(a_send, a_receive), MemTransport(b_send, b_receive)

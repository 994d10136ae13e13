"""A network in memory, for a whole bridge in one process on trio's autojump clock."""

from __future__ import annotations

import errno
import itertools

import trio
import trio.testing

from trio_bridge._net import Listener, refused


class _Ends:
    """What the two ends of one connection know of each other."""

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = [False, False]


class MemoryStream(trio.abc.HalfCloseableStream):
    """One end of an in-memory connection (trio's memory streams); ``peer``: the other end's
    address, as a socket's ``getpeername`` would say; :attr:`peer_closed`: the other end was
    closed (what a kept-alive connection's staleness check looks at, as the kernel's EOF)."""

    def __init__(
        self,
        stapled: trio.StapledStream,  # type: ignore[type-arg]
        peer: str,
        ends: _Ends,
        side: int,
    ) -> None:
        self._stapled = stapled
        self.peer = peer
        self._ends, self._side = ends, side

    @property
    def peer_closed(self) -> bool:
        return self._ends.closed[1 - self._side]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stapled.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stapled.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stapled.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stapled.receive_some(max_bytes)

    async def aclose(self) -> None:
        self._ends.closed[self._side] = True
        await self._stapled.aclose()


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self, network: MemoryNetwork, address: tuple[str, int]) -> None:
        self.network = network
        self.address = address
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](1000)

    def connect(self) -> MemoryStream:
        """The client's end of a new connection (the server's is queued for accept)."""
        a, b = trio.testing.memory_stream_pair()
        ends = _Ends()
        try:
            self._send.send_nowait(MemoryStream(b, "127.0.0.1", ends, 1))
        except (trio.WouldBlock, trio.ClosedResourceError):
            raise refused(*self.address) from None
        return MemoryStream(a, self.address[0], ends, 0)

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise trio.ClosedResourceError("listener closed") from None

    async def aclose(self) -> None:
        """Stop listening; connections not accepted yet are closed (their clients see the
        connection end, as a TCP reset would tell them)."""
        if self.network.listening.get(self.address) is self:
            del self.network.listening[self.address]
        self._send.close()
        while True:
            try:
                pending = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            await pending.aclose()
        await self._receive.aclose()


class MemoryNetwork:
    """A :class:`~trio_bridge._net.Network` in memory: ``open_listeners`` / ``open_stream`` as
    on TCP (port 0 picks a free port; nothing listening: ``ConnectionRefusedError``; a taken
    address: ``OSError(EADDRINUSE)``). Streams have no kernel buffer limit: a reader that
    stops does not slow its writer down (test slow readers on TCP)."""

    def __init__(self) -> None:
        self.listening: dict[tuple[str, int], MemoryListener] = {}
        self._ports = itertools.count(40000)

    @staticmethod
    def _host(host: str) -> str:
        return "127.0.0.1" if host in ("", "localhost", "0.0.0.0") else host

    async def open_listeners(self, host: str, port: int) -> list[Listener]:
        await trio.lowlevel.checkpoint()
        host = self._host(host)
        if port == 0:
            port = next(p for p in self._ports if (host, p) not in self.listening)
        if (host, port) in self.listening:
            raise OSError(errno.EADDRINUSE, f"address already in use: {host}:{port}")
        listener = self.listening[(host, port)] = MemoryListener(self, (host, port))
        return [listener]

    async def open_stream(self, host: str, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        listener = self.listening.get((self._host(host), port))
        if listener is None:
            raise refused(host, port)
        return listener.connect()

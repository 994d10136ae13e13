"""A hostile broker for tests: the project's own sans-IO :class:`Session` over trio-websocket.

A connector dials it like a real broker; the test then plays the broker by hand, breaking any
rule it likes::

    async with open_hostile_broker(window=1) as hb:
        rc = await lab.start_connector([hb.url], model.url, wait=False)
        conn = await hb.accept()            # the connector dialled and said hello
        await conn.open_streams(1000, HEAD, end_stream=False)   # hold streams open
        # stop reading: just never call conn.receive(); the socket then fills up
        await conn.send(*(conn.request(HEAD) for _ in range(5000)))   # beyond max_streams

``window`` and ``max_streams`` are what its hello advertises. ``rcvbuf`` shrinks the socket's
receive buffer, so that a connection that is not read fills up after a few KiB instead of a
few MiB. Streams are opened with the session's own encoder but without its max_streams check
(a hostile broker opens as many as it likes). Every connection lives in its own handler and
ends when the test calls :meth:`HostileConnection.close` or the broker is closed; a connector
that hangs up is expected (``closed`` then says so).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer

from trio_bridge.relay._frames import MAX_MESSAGE
from trio_bridge.relay._protocol import Event, Hello, RequestHead, Session

MAX_MESSAGE_SIZE = MAX_MESSAGE + 1024


class HostileConnection:
    """One relay connection from a connector, after the hello exchange."""

    def __init__(self, ws: WebSocketConnection, session: Session, hello: Hello) -> None:
        self.ws = ws
        self.session = session
        self.hello = hello  # the connector's
        self.closed = False  # the connector hung up (or the broker closed it)
        self.sent = 0  # bytes sent
        self._done = trio.Event()

    def request(
        self, head: RequestHead, body: bytes = b"", *, end_stream: bool = True, keep: bool = True
    ) -> bytes:
        """The frames that open a new stream with ``head`` (and ``body``), whatever the
        connector's max_streams and window. ``keep=False``: forget the stream at once (what
        comes back for it is dropped; a flood of requests then costs this side nothing)."""
        session = self.session
        assert session.peer_hello is not None
        session.peer_hello.max_streams = 10**9
        sid, wire = session.open_stream(head, end_stream=end_stream and not body)
        if body:
            session.peer_hello.window = MAX_MESSAGE
            wire += session.send_data(sid, body, end_stream=end_stream)
        if not keep:
            session._streams.pop(sid, None)
        return wire

    async def open_streams(
        self, n: int, head: RequestHead, body: bytes = b"", *, end_stream: bool = True
    ) -> None:
        """Open ``n`` streams at once (in as few messages as fit)."""
        await self.send(*(self.request(head, body, end_stream=end_stream) for _ in range(n)))

    async def send(self, *frames: bytes) -> None:
        """Send ``frames`` in messages of at most MAX_MESSAGE bytes. Raises
        ConnectionClosed once the connector hung up."""
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            if batch and size + len(frame) > MAX_MESSAGE:
                await self._send(b"".join(batch))
                batch, size = [], 0
            batch.append(frame)
            size += len(frame)
        if batch:
            await self._send(b"".join(batch))

    async def _send(self, message: bytes) -> None:
        try:
            await self.ws.send_message(message)
        except ConnectionClosed:
            self.closed = True
            raise
        self.sent += len(message)

    async def receive(self) -> list[Event]:
        """Read one message and return its events (raises ConnectionClosed at the end)."""
        try:
            message = await self.ws.get_message()
        except ConnectionClosed:
            self.closed = True
            raise
        assert isinstance(message, bytes)
        self.session.receive_data(message)
        out = []
        while (ev := self.session.next_event()) is not None:
            out.append(ev)
        return out

    async def wait_closed(self) -> None:
        """Read (and drop) everything until the connector hangs up."""
        try:
            while True:
                await self.receive()
        except ConnectionClosed:
            pass

    def close(self) -> None:
        """End this connection (its handler returns; trio-websocket closes it)."""
        self._done.set()


class HostileBroker:
    def __init__(self, *, window: int, max_streams: int) -> None:
        self.window = window
        self.max_streams = max_streams
        self.url = ""
        self.connections: list[HostileConnection] = []
        self._send, self._receive = trio.open_memory_channel[HostileConnection](16)

    async def accept(self) -> HostileConnection:
        """The next connector that dialled and said hello."""
        return await self._receive.receive()

    async def handler(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            session = Session(opener=True, window=self.window, max_streams=self.max_streams)
            session.receive_data(await ws.get_message())  # type: ignore[arg-type]
            hello = session.next_event()
            assert isinstance(hello, Hello), hello
            await ws.send_message(session.send_hello(role="broker"))
            conn = HostileConnection(ws, session, hello)
            self.connections.append(conn)
            await self._send.send(conn)
            await conn._done.wait()
        except ConnectionClosed:
            pass  # the connector hung up on us: usually the point of the test


@asynccontextmanager
async def open_hostile_broker(
    *, window: int = 256 * 1024, max_streams: int = 1000, rcvbuf: int | None = None
) -> AsyncIterator[HostileBroker]:
    """A hostile broker on 127.0.0.1 (port 0); ``.url`` is its relay URL."""
    hb = HostileBroker(window=window, max_streams=max_streams)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # accepted connections inherit it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    server = WebSocketServer(
        hb.handler,
        [trio.SocketListener(sock)],
        message_queue_size=1,
        max_message_size=MAX_MESSAGE_SIZE,
        disconnect_timeout=1,
    )
    hb.url = f"ws://127.0.0.1:{port}/_bridge/relay"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield hb
        nursery.cancel_scope.cancel()

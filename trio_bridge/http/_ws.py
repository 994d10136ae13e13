"""The relay's WebSocket on both ends: wsproto over a trio stream, whole binary messages.

The broker accepts (``_server.Request.accept_websocket``); the connector dials
(:func:`connect_websocket`). Both then hold a :class:`WebSocket`, which is what
``_relay.MessageTransport`` asks for. Why not trio-websocket: its reader task hands every
message through a channel to the caller (one more task switch per message, ~0.1 ms of CPU
each way, measured), it reports an untrusted TLS certificate as a handshake *timeout*, and a
ping answered after a local close takes down its server (issue #184).

Error handling: a broken or closed connection is :class:`RelayClosed`; a peer breaking the
WebSocket protocol or the relay's limits (message size, fragments, text messages) is
:class:`RemoteProtocolError`; a refused handshake is :class:`RelayRejected` with the
HTTP status.
"""

from __future__ import annotations

import ssl
import struct
from typing import Any
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    TextMessage,
)
from wsproto.events import Request as WsRequest
from wsproto.utilities import LocalProtocolError as WsLocalError
from wsproto.utilities import RemoteProtocolError as WsError

from trio_bridge._errors import RelayClosed, RelayRejected, RemoteProtocolError
from trio_bridge._net import TCP, Network
from trio_bridge.http._sockio import receive_some, send_all

_READ = 256 * 1024
#: what is kept of the body of a refused upgrade (an error message: the rest is dropped, and
#: the dialer stops reading there, whatever the server goes on sending)
MAX_REJECTION_BODY = 4096


class WebSocket:
    """A WebSocket over wsproto (either side): whole binary messages, for the relay.

    One task receives; senders are serialised by a lock (the relay's writer, and the reader
    answering WebSocket pings). Messages over ``max_message`` bytes or in more than
    ``MAX_FRAGMENTS`` pieces are a protocol error.
    """

    MAX_FRAGMENTS = 1024
    MAX_PINGS = 100  # WebSocket pings between two messages: more is a flood

    def __init__(self, stream: trio.abc.Stream, ws: Any, max_message: int) -> None:
        self._stream = stream
        self._ws = ws
        self._max = max_message
        self._lock = trio.Lock()
        self._closed: str | None = None
        self._pings = 0
        self._server = not ws.client

    async def _send(self, event: Any, *, closing: bool = False) -> None:
        if self._closed is not None and not closing:
            raise RelayClosed(self._closed)
        try:
            data = self._ws.send(event)
        except WsLocalError:
            # the peer's close arrived (or ours went out) first; never let wsproto's message
            # out: it quotes the event, i.e. the frames with their headers and keys
            self._closed = "websocket closing"
            raise RelayClosed("websocket closing") from None
        await self._send_bytes(data)

    async def _send_bytes(self, data: bytes) -> None:
        # The lock keeps the writer's messages and the reader's control frames (pong, close)
        # whole. Taken without a schedule point when free, and a message the kernel takes at
        # once is written without one either (see _sockio): no task switch per message.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            await send_all(self._stream, data)
        except trio.Cancelled:
            # the stream may hold part of a message now: nothing more may be written on it
            # (not even the close frame)
            self._closed = "a write was cancelled midway"
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._closed = "websocket broken"
            raise RelayClosed(f"websocket broken: {exc!r}") from None
        finally:
            self._lock.release()

    async def send_message(self, data: bytes, *more: bytes) -> None:
        """Send ``data`` and ``more`` (the relay writer's frames) as one binary message."""
        if not self._server or self._closed or self._ws.state is not ConnectionState.OPEN:
            # a client masks its frames; and wsproto is the one who knows when a connection
            # is closing (its refusal becomes RelayClosed in _send)
            await self._send(BytesMessage(data=b"".join((data, *more))))
        else:
            # An unmasked binary frame is a 2-10 byte header; wsproto copies a payload three
            # times to build one (a quarter of the broker's CPU during big uploads). Header
            # and parts are joined once.
            size = len(data) + sum(map(len, more))
            await self._send_bytes(b"".join((_binary_frame_header(size), data, *more)))

    async def receive_message(self) -> bytes:
        """The next whole message. One already received (a read may bring many) is returned
        without a schedule point: the relay's reader takes a schedule point every
        ``EVENTS_PER_TURN`` events it hands on, across messages."""
        parts: list[bytes] = []
        size = fragments = 0
        while True:  # noqa: ASYNC913  each turn returns, raises, or reads (a checkpoint)
            try:
                for event in self._ws.events():
                    if isinstance(event, BytesMessage):
                        parts.append(bytes(event.data))
                        size += len(event.data)
                        if size > self._max:
                            raise RemoteProtocolError(f"relay message over {self._max} bytes")
                        fragments += event.frame_finished
                        if fragments > self.MAX_FRAGMENTS:
                            raise RemoteProtocolError("relay message in too many fragments")
                        if event.message_finished:
                            self._pings = 0
                            return b"".join(parts) if len(parts) > 1 else parts[0]
                    elif isinstance(event, TextMessage):
                        raise RemoteProtocolError("text message on the relay")
                    elif isinstance(event, Ping):
                        self._pings += 1
                        if self._pings > self.MAX_PINGS:
                            raise RemoteProtocolError("websocket ping flood")
                        await self._send(event.response())
                    elif isinstance(event, CloseConnection):
                        reason = f"websocket closed ({event.code})"
                        was_open = self._closed is None
                        self._closed = reason  # before the await: the writer must stop now
                        if was_open:
                            try:
                                await self._send(event.response(), closing=True)
                            except RelayClosed:
                                pass
                        raise RelayClosed(reason)
            except WsError as exc:
                raise RemoteProtocolError(f"websocket: {exc}") from None
            if self._closed is not None:
                raise RelayClosed(self._closed)
            try:
                data = await receive_some(self._stream, _READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self._closed = "connection lost"
                raise RelayClosed("websocket connection lost")
            self._ws.receive_data(bytes(data))

    async def aclose(self) -> None:
        with trio.move_on_after(2, shield=True):
            if self._closed is None:
                try:
                    await self._send(CloseConnection(code=1000))
                except (RelayClosed, Exception):
                    pass
                self._closed = "closed"
            await self._stream.aclose()


def _binary_frame_header(n: int) -> bytes:
    """RFC 6455 5.2: FIN + opcode 2 (binary), no mask (server to client), payload length."""
    if n < 126:
        return bytes((0x82, n))
    if n < 65536:
        return struct.pack("!BBH", 0x82, 126, n)
    return struct.pack("!BBQ", 0x82, 127, n)


async def accept_websocket(
    stream: trio.abc.Stream, head: bytes, trailing: bytes, max_message: int
) -> WebSocket:
    """Complete the server side of an upgrade whose raw request ``head`` was read already
    (``trailing``: bytes that came after it)."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(head)
        event = next(ws.events(), None)
    except WsError as exc:
        raise RemoteProtocolError(f"bad WebSocket upgrade: {exc}") from None
    if not isinstance(event, WsRequest):
        raise RemoteProtocolError("not a valid WebSocket upgrade")
    try:
        await stream.send_all(ws.send(AcceptConnection()))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise RelayClosed(f"websocket broken: {exc!r}") from None
    if trailing:
        ws.receive_data(trailing)
    return WebSocket(stream, ws, max_message)


async def connect_websocket(
    url: str,
    *,
    headers: list[tuple[bytes, bytes]],
    max_message: int,
    ssl_context: ssl.SSLContext | None = None,
    network: Network = TCP,
) -> WebSocket:
    """Dial ``url`` (ws:// or wss://) on ``network`` and complete the upgrade; no timeout of
    its own (wrap it in ``trio.fail_after``). Raises :class:`RelayRejected` for a non-101 answer,
    ``OSError`` / ``trio.BrokenResourceError`` (an ``ssl.SSLError`` as its cause for TLS
    failures) when the connection fails, :class:`RemoteProtocolError` for a broken answer."""

    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stream = await network.open_stream(host, port)
    try:
        if secure:
            tls = trio.SSLStream(
                stream, ssl_context or ssl.create_default_context(), server_hostname=host
            )
            await tls.do_handshake()
            stream = tls
        ws = WSConnection(ConnectionType.CLIENT)
        host_header = parts.netloc.rsplit("@", 1)[-1]
        await stream.send_all(
            ws.send(WsRequest(host=host_header, target=target, extra_headers=headers))
        )
        await _upgrade_answer(stream, ws)
        return WebSocket(stream, ws, max_message)
    except BaseException:
        with trio.move_on_after(1, shield=True):  # a TLS close may never end
            await stream.aclose()
        raise


async def _upgrade_answer(stream: trio.abc.Stream, ws: WSConnection) -> None:
    """Read the server's answer to our upgrade request: return on 101, else raise
    (:class:`RelayRejected` with at most ``MAX_REJECTION_BODY`` bytes of the body: reading
    stops there)."""
    status = 0
    body = b""
    while True:
        data = await stream.receive_some(_READ)
        if not data:
            if status:
                raise RelayRejected(status, body)
            raise RelayClosed("the server closed the connection during the upgrade")
        try:
            ws.receive_data(bytes(data))
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise RelayRejected(status)
                elif isinstance(event, RejectData):
                    body += event.data[: MAX_REJECTION_BODY - len(body)]
                    if event.body_finished or len(body) >= MAX_REJECTION_BODY:
                        raise RelayRejected(status, body)
        except WsError as exc:
            raise RemoteProtocolError(f"bad WebSocket upgrade answer: {exc}") from None

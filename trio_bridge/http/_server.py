"""The broker's public HTTP/1.1 server: trio + h11, with the limits a port on the internet needs.

Why not hypercorn here: hypercorn costs ~0.4 ms of CPU per request (measured with a no-op ASGI
app), has one read timeout for both "send me your head" and "I am streaming you a long answer",
and no hook to cap connections per client address.
This module is small because h11 does the parsing and framing.

One connection = one task (``serve_http`` spawns it). Per request cycle:

    read head (keep-alive timeout before its first byte, ``head_timeout`` for the whole head,
    ``max_header_bytes``; bare-LF line ends and obs-fold refused; a TLS ClientHello on a plain
    port answered 400 at once, so the client's TLS fails now, not after head_timeout)
    ─▶ h11 parses it
    ─▶ handler(request)  in the connection's task; the handler pulls the body
       (``receive_body``, bounded by ``min_body_rate``) and writes the answer
       (``respond`` / ``send`` / ``end``); returning without ``end`` aborts the connection
    ─▶ keep-alive (a fresh h11 state for the next head) or lingering close

Limits: over ``max_connections_per_address`` or ``max_connections`` a new connection gets 429 /
503 and is closed; each refusal is counted in ``on_limit(name)`` and logged at debug (a flood
must not flood the log).

WebSocket upgrades (the relay endpoint) are handed to wsproto via :meth:`Request.accept_websocket`.

Cancellation: cancelling ``serve_http`` closes every connection at once (graceful shutdown is
the broker's drain, which waits for in-flight requests before it cancels). A handler that is
cancelled mid-answer leaves the connection aborted (closed without the terminating chunk), so a
client never mistakes a truncated answer for a complete one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import attrs
import trio

from trio_bridge._errors import (
    BadBody,
    BodyTooSlow,
    BridgeError,
    ClientDisconnected,
    ClientError,
    RelayClosed,
    RemoteProtocolError,
    UnsendableAnswer,
)
from trio_bridge._net import TCP, Network, listener_address, peer_address
from trio_bridge.http._h11 import h11
from trio_bridge.http._messages import error_body
from trio_bridge.http._sockio import receive_some, write_now
from trio_bridge.http._ws import WebSocket, accept_websocket

log = logging.getLogger("trio_bridge.server")

_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_READ = 256 * 1024
#: body parts receive_body hands out before it lets other tasks run: one read may hold tens of
#: thousands of tiny chunks, each returned without a wait
CHUNKS_PER_TURN = 256
_HEAD_ERRORS = {
    431: "request head too large",
    501: "unsupported Transfer-Encoding",
}
#: the first byte of a TLS ClientHello (a handshake record); no HTTP method starts with it
_TLS_HANDSHAKE = b"\x16"
_TLS_ON_PLAIN_PORT = (
    "a TLS handshake on a plain HTTP port: this port speaks plain HTTP (http://, and ws:// "
    "for connectors); TLS is its proxy's (Caddy, nginx) or tls_cert's"
)
LINGER_BYTES = 16 * 1024 * 1024  # after an early answer, read at most this much more body
LINGER_SECONDS = 30.0


@attrs.frozen(kw_only=True)
class ServerLimits:
    max_header_bytes: int = 32 * 1024
    head_timeout: float = 10.0
    keep_alive_timeout: float = 15.0
    min_body_rate: int = 1024  # bytes per second, averaged, after a first head_timeout of grace
    max_connections: int = 10_000
    max_connections_per_address: int = 256
    #: a client that takes longer than this to take one write (reads nothing) is cut
    send_timeout: float = 60.0
    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # trusted proxies


class _HeadError(BridgeError):
    def __init__(self, status: int, message: str, limit: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.limit = limit


Handler = Callable[["Request"], Awaitable[None]]


class Request:
    """One HTTP request on a connection, handed to the handler.

    ``headers`` keep the client's order and case of values; names are lower-case (h11).
    Only one task may call :meth:`receive_body` / :meth:`wait_disconnect`, and one other task
    may write the answer at the same time.
    """

    __slots__ = (
        "_calls",
        "_conn",
        "_ended",
        "_h11",
        "_left",
        "_started",
        "client",
        "headers",
        "is_websocket",
        "method",
        "path",
        "scheme",
        "target",
    )

    def __init__(
        self, conn: _Connection, h: h11.Connection, event: h11.Request, client: str
    ) -> None:
        self._conn = conn
        self._h11 = h
        self._calls = 0  # of receive_body (a schedule point every CHUNKS_PER_TURN)
        self.method: str = event.method.decode("ascii")
        self.target: bytes = event.target
        self.headers: list[tuple[bytes, bytes]] = list(event.headers)
        #: the target without its query string
        self.path: str = self.target.split(b"?", 1)[0].decode("latin-1")
        #: a WebSocket upgrade (``Upgrade: websocket``)
        self.is_websocket: bool = any(
            k == b"upgrade" and v.lower() == b"websocket" for k, v in self.headers
        )
        self.client = client  # the peer's IP address
        self.scheme = conn.scheme
        self._started = False
        self._ended = False
        #: body bytes still to come when this module frames the body itself (below); None
        #: when h11 does (chunked, or a request that may switch protocols)
        self._left: int | None = _body_length(self.method, self.headers)

    @property
    def body_done(self) -> bool:
        if self._left is not None:
            return not self._left
        return self._h11.their_state is not h11.SEND_BODY

    async def receive_body(self) -> bytes | bytearray:
        """The next part of the request body; ``b""`` once it is complete.

        Raises :class:`ClientDisconnected` if the client goes away before the end,
        :class:`BadBody` if it breaks the framing, :class:`BodyTooSlow` below
        ``min_body_rate``.

        Cancellation: body bytes are taken from h11 only after the last schedule point, so a
        cancelled call loses nothing.
        """
        self._calls += 1
        if not self._calls % CHUNKS_PER_TURN:
            await trio.lowlevel.checkpoint()
        h = self._h11
        if h.they_are_waiting_for_100_continue and not self._started:
            go_on = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            await self._conn.send_all(h.send(go_on))  # type: ignore[arg-type]
        left = self._left
        if left is not None:
            # Content-Length framing (or none: no body): parts go to the caller as read from
            # the socket, not copied into h11's buffer and out again (three copies of every
            # uploaded byte, a third of the broker's CPU for a big upload)
            if not left:
                return b""  # noqa: ASYNC910  fast path: the body is complete
            conn = self._conn
            buf = conn.buf
            if buf:  # came with the head (and maybe the next, pipelined, request after it)
                data = bytes(buf[:left])
                del buf[:left]
            else:
                data = await conn.receive_body_bytes()
                if not data:
                    raise ClientDisconnected("client closed the connection during the upload")
                if len(data) > left:  # what follows the body: the next (pipelined) request's
                    buf[:0] = data[left:]
                    data = data[:left]
            self._left = left - len(data)
            conn.body_received += len(data)
            return data  # noqa: ASYNC910  fast path: buffered bytes, taken without a wait
        while True:  # noqa: ASYNC913  each turn returns, raises, or reads (a checkpoint)
            try:
                event = h.next_event()
            except h11.RemoteProtocolError:
                raise BadBody("malformed request body (framing)") from None
            if isinstance(event, h11.Data):
                self._conn.body_received += len(event.data)
                # h11 hands out a fresh object: no need to copy it again
                return event.data  # noqa: ASYNC910  fast path: a part was buffered
            if isinstance(event, h11.EndOfMessage):
                return b""  # noqa: ASYNC910  fast path: the end was buffered
            if event is h11.NEED_DATA:
                data = await self._conn.receive_body_bytes()
                h.receive_data(data)
                if not data:
                    raise ClientDisconnected("client closed the connection during the upload")
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise ClientDisconnected("client closed the connection during the upload")

    async def wait_disconnect(self) -> None:
        """Return once the client has closed its connection (after the body was read).

        Bytes that arrive meanwhile (a pipelined next request) are kept for the next cycle.
        """
        await self._conn.wait_disconnect()

    async def respond(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        *,
        end: bool = False,
    ) -> None:
        """Send the response head (and ``body``, and the end, in the same write)."""
        h = self._h11
        try:
            reason = _REASONS.get(status, b"")
            out = h.send(h11.Response(status_code=status, headers=headers, reason=reason))
            if body:
                out += h.send(h11.Data(data=body))  # type: ignore[operator]
            if end:
                out += h.send(h11.EndOfMessage())  # type: ignore[operator]
        except h11.LocalProtocolError as exc:
            raise UnsendableAnswer(f"HTTP/1.1 cannot carry this head: {exc}") from None
        self._started = True
        self._ended = end
        await self._conn.send_all(out)  # type: ignore[arg-type]

    async def send(
        self, data: bytes, *, end: bool = False, within: trio.CancelScope | None = None
    ) -> None:
        """Send part of the body (and the end). ``within``: a cancel scope the caller holds
        around its whole write loop; the send timeout then moves that scope's deadline for
        the write instead of opening a scope per write (a streamed answer writes once per
        chunk), and when it passes the scope is cancelled: the caller tells a timeout from
        its own cancel by :attr:`send_timed_out`."""
        h = self._h11
        try:
            out = h.send(h11.Data(data=data)) if data else b""
            if end:
                out += h.send(h11.EndOfMessage())  # type: ignore[operator]
        except h11.LocalProtocolError:
            raise UnsendableAnswer("response body does not match its framing") from None
        self._ended = end
        if out:
            await self._conn.send_all(out, within)  # type: ignore[arg-type]
        else:
            await trio.lowlevel.checkpoint()  # nothing to send: a checkpoint all the same

    @property
    def framed_by_h11(self) -> bool:
        """The body is chunked, or the request may switch protocols: h11 reads it."""
        return self._left is None

    @property
    def send_timed_out(self) -> bool:
        """A write of this connection took longer than ``send_timeout``."""
        return self._conn.send_timed_out

    async def end(self) -> None:
        await self.send(b"", end=True)

    async def accept_websocket(self, max_message: int) -> WebSocket:
        """Complete a WebSocket upgrade (wsproto) and hand over the connection."""
        socket = await self._conn.accept_websocket(self._h11.trailing_data[0], max_message)
        self._started = self._ended = True
        return socket

    @property
    def answer_started(self) -> bool:
        """The response head went out."""
        return self._started

    @property
    def answer_complete(self) -> bool:
        """The whole response went out (its end included)."""
        return self._ended


class _Connection:
    __slots__ = (
        "body_received",
        "body_started",
        "buf",
        "head",
        "limits",
        "on_limit",
        "scheme",
        "send_timed_out",
        "stream",
        "websocket",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        limits: ServerLimits,
        scheme: str,
        on_limit: Callable[[str], None],
    ) -> None:
        self.stream = stream
        self.limits = limits
        self.on_limit = on_limit
        self.scheme = scheme
        self.buf = bytearray()  # bytes received and not yet given to h11
        self.head = b""  # the raw head of the current request
        self.body_received = 0
        self.body_started = 0.0
        self.websocket: WebSocket | None = None
        self.send_timed_out = False

    async def send_all(self, data: bytes, within: trio.CancelScope | None = None) -> None:
        """Write ``data``, bounded by ``send_timeout``: in a scope of its own, or by moving
        the deadline of ``within``, a scope the caller holds around its write loop (whose
        cancellation then propagates to it; see :meth:`Request.send`)."""
        # What the kernel takes at once needs no timeout (nor a schedule point): the usual
        # case for an answer or a chunk. Only the rest waits, bounded by the send timeout.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            sent = write_now(self.stream, data)
        except OSError as exc:
            raise ClientDisconnected(f"client connection broken: {exc!r}") from None
        if sent == len(data):
            return
        rest = memoryview(data)[sent:] if sent else data
        scope = trio.CancelScope() if within is None else within
        scope.deadline = trio.current_time() + self.limits.send_timeout
        try:
            with scope if within is None else contextlib.nullcontext():
                await self.stream.send_all(rest)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ClientDisconnected(f"client connection broken: {exc!r}") from None
        finally:
            if scope.cancel_called and trio.current_time() >= scope.deadline:
                self.send_timed_out = True
                self.on_limit("send_timeout")
            if within is not None:
                within.deadline = math.inf
        if within is None and scope.cancelled_caught:
            raise ClientDisconnected("the client stopped reading (send timeout)")

    async def _receive(self) -> bytes:
        try:
            return bytes(await receive_some(self.stream, _READ))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return b""  # noqa: ASYNC910  broken: read as EOF, and the callers stop there

    async def read_head(self, first: bool) -> bytes | None:
        """The next request head (up to and including its blank line), or None if the client
        closed (or stayed idle for the keep-alive timeout) before sending one."""
        lim = self.limits
        buf = self.buf
        while buf[:2] == b"\r\n":  # RFC 9112 2.2: ignore empty lines before a request
            del buf[:2]
        if not buf:
            wait = lim.head_timeout if first else lim.keep_alive_timeout
            with trio.CancelScope(deadline=trio.current_time() + wait):
                data = await self._receive()
                if not data:
                    return None
                buf += data
            if not buf:
                return None  # idle too long
            if first and buf[:1] == _TLS_HANDSHAKE and self.scheme == "http":
                # a TLS client (wss://, https://) on this plain port: answering in plain HTTP
                # fails its handshake at once ("wrong version number") instead of leaving it
                # to wait for head_timeout for a head that never comes
                raise _HeadError(400, _TLS_ON_PLAIN_PORT, "bad_head")
        end = buf.find(b"\r\n\r\n")
        if end >= 0:  # the usual case: the whole head came in one read
            end += 4
        elif (rest := await self._rest_of_head()) is not None:
            end = rest
        else:
            return None
        if end > lim.max_header_bytes:
            raise _HeadError(431, "request head too large", "header_bytes")
        head = bytes(buf[:end])
        del buf[:end]
        if head.count(b"\n") != head.count(b"\r\n"):
            raise _HeadError(400, "bare LF line ending in the request head", "bad_head")
        if b"\r\n " in head or b"\r\n\t" in head:
            raise _HeadError(400, "obsolete line folding in the request head", "bad_head")
        return head  # noqa: ASYNC910  fast path: a pipelined head was buffered

    async def _rest_of_head(self) -> int | None:
        """Read until the head is complete (within ``head_timeout``): where it ends in the
        buffer, or None if the client closed first."""
        lim = self.limits
        buf = self.buf
        with trio.move_on_after(lim.head_timeout) as cs:
            while True:  # read_head found no end in the buffer: read first, then look
                if b"\n\n" in buf or b"\n\r\n" in buf:
                    raise _HeadError(400, "bare LF line ending in the request head", "bad_head")
                if len(buf) > lim.max_header_bytes:
                    raise _HeadError(431, "request head too large", "header_bytes")
                searched = len(buf)
                data = await self._receive()
                if not data:
                    return None
                buf += data
                end = buf.find(b"\r\n\r\n", max(0, searched - 3))
                if end >= 0:
                    return end + 4
        assert cs.cancelled_caught
        raise _HeadError(408, "request head not received in time", "head_timeout")

    async def receive_body_bytes(self) -> bytes:
        """Body bytes for h11, at no less than ``min_body_rate`` on average."""
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            return data  # noqa: ASYNC910  fast path: body bytes that came with the head
        lim = self.limits
        now = trio.current_time()
        if not self.body_started:
            self.body_started = now
        # on average at least min_body_rate, after head_timeout of grace
        deadline = self.body_started + lim.head_timeout + self.body_received / lim.min_body_rate
        with trio.move_on_at(deadline):
            return await self._receive()
        self.on_limit("body_rate")
        raise BodyTooSlow(f"request body slower than {lim.min_body_rate} bytes/s")

    async def wait_disconnect(self) -> None:
        while len(self.buf) <= self.limits.max_header_bytes:
            data = await self._receive()
            if not data:
                return
            self.buf += data
        await trio.sleep_forever()  # a pipelining client far ahead of us: stop reading

    async def accept_websocket(self, received: bytes, max_message: int) -> WebSocket:
        trailing = received + bytes(self.buf)
        self.buf.clear()
        try:
            socket = await accept_websocket(self.stream, self.head, trailing, max_message)
        except RemoteProtocolError as exc:
            raise ClientDisconnected(str(exc)) from None
        except RelayClosed as exc:
            raise ClientDisconnected(exc.reason) from None
        self.websocket = socket
        return socket

    async def serve(self, handler: Handler, client: str) -> None:
        first = True
        while True:
            try:
                head = await self.read_head(first)
            except _HeadError as exc:
                await self.refuse(exc.status, exc.message, exc.limit)
                return
            if head is None:
                return
            first = False
            try:
                h, event = _parse_head(head)
            except _HeadError as exc:
                await self.refuse(exc.status, exc.message, "bad_head")
                return
            self.body_received = 0
            self.body_started = 0.0
            request = Request(self, h, event, client)
            # The raw head, only for a WebSocket upgrade (its handshake reads it); neither it
            # nor h11's event (raw header names, triples) stays alive while the request does:
            # ~1 KiB per open request
            self.head = head if request.is_websocket else b""
            del head, event
            try:
                await handler(request)
            except BadBody as exc:
                if not request.answer_started:
                    await self.refuse(400, str(exc), "bad_body")
                return
            except ClientDisconnected:
                return
            except UnsendableAnswer as exc:  # a handler's answer HTTP/1.1 cannot carry: closed
                log.warning("answer not sent, connection closed: %s", exc)
                return
            if self.websocket is not None:
                return
            if not request.answer_complete:
                return  # aborted: close without the end, the client sees a truncated answer
            if not request.body_done:
                await self.linger(request)
            if h.our_state is not h11.DONE or not request.body_done:
                return  # Connection: close, or the client broke the protocol or left
            if request.framed_by_h11:
                if h.their_state is not h11.DONE:
                    return  # e.g. a protocol switch it proposed
                trailing, closed = h.trailing_data
                if closed:
                    return
                if trailing:
                    self.buf[:0] = trailing

    async def linger(self, request: Request) -> None:
        """The answer went out before the upload ended: read (and drop) the rest of the body,
        bounded, so the client gets to read our answer before we close."""
        with trio.move_on_after(LINGER_SECONDS):
            await trio.lowlevel.checkpoint()  # the loop may not run (LINGER_BYTES read)
            while self.body_received < LINGER_BYTES:
                try:
                    if not await request.receive_body():
                        return
                except ClientError:  # gone, or a broken body: stop reading either way
                    return

    async def refuse(self, status: int, message: str, limit: str = "") -> None:  # noqa: ASYNC910
        """Answer ``status`` with an OpenAI-shaped error and close (no request was parsed)."""
        body = error_body(message, "invalid_request_error", "bad_request")
        reason = _REASONS.get(status, b"Error")
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, len(body))
        )
        if limit:
            self.on_limit(limit)
        log.debug("refused with %d (%s)", status, limit or "bad request")
        # ASYNC910/912: a write that fails at once ends it, with nothing to wait for
        with trio.move_on_after(1):  # noqa: ASYNC912  bounds a write that blocks
            try:
                await self.stream.send_all(head + body)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


def _body_length(method: str, headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body length of a request this module frames itself: its Content-Length (one
    valid value: h11 checked it), or 0 without one (RFC 9112 6.3: a request with neither
    Content-Length nor Transfer-Encoding has no body). None, for h11 to frame, with a
    Transfer-Encoding (chunked), an Upgrade header or CONNECT (a protocol switch: h11 pauses
    there and the connection ends)."""
    if method == "CONNECT":
        return None
    length = 0
    for name, value in headers:
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" or name == b"upgrade":
            return None
    return length


def _parse_head(head: bytes) -> tuple[h11.Connection, h11.Request]:
    """A fresh h11 state fed with one complete head; _HeadError for a bad one."""
    h = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
    h.receive_data(head)
    try:
        event = h.next_event()
    except h11.RemoteProtocolError as exc:
        # h11's text quotes the offending bytes (maybe a key): never echo or log it
        status = exc.error_status_hint
        raise _HeadError(status, _HEAD_ERRORS.get(status, "malformed request head")) from None
    if not isinstance(event, h11.Request):  # pragma: no cover - a head is complete
        raise _HeadError(400, "bad request")
    # Content-Length + Transfer-Encoding together is how requests get smuggled
    names = [k for k, _ in event.headers]
    if b"content-length" in names and b"transfer-encoding" in names:
        raise _HeadError(400, "Content-Length together with Transfer-Encoding")
    return h, event


class _Admission:
    """The connection caps: ``max_connections`` in all and ``max_connections_per_address``
    (addresses in ``exempt``, e.g. a trusted reverse proxy, skip the latter)."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_address: dict[str, int] = {}

    def enter(self, peer: str) -> tuple[int, str, str] | None:
        """Count a new connection; the refusal (status, message, limit) if over a cap."""
        count = self.per_address.get(peer, 0)
        self.total += 1
        self.per_address[peer] = count + 1
        limits = self.limits
        if self.total > limits.max_connections:
            return 503, "too many connections; retry later", "connections"
        if count >= limits.max_connections_per_address and not self._exempt(peer):
            return 429, "too many connections from your address", "connections_per_address"
        return None

    def leave(self, peer: str) -> None:
        self.total -= 1
        left = self.per_address[peer] - 1
        if left:
            self.per_address[peer] = left
        else:
            del self.per_address[peer]

    def _exempt(self, peer: str) -> bool:
        if not self.limits.exempt:
            return False
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(ip in net for net in self.limits.exempt)


def _log_crash(exc: Exception) -> None:
    """A bug must cost one connection, not the server. Only the type and place are logged:
    exception texts can quote request bytes (keys)."""
    leaf: BaseException = exc
    while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
        leaf = leaf.exceptions[0]
    tb = leaf.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
    log.error("connection handler failed: %s at %s", type(leaf).__name__, where)


async def _start_tls(conn: _Connection, ssl_context: ssl.SSLContext) -> bool:
    """The TLS handshake, bounded by ``head_timeout``; False if it did not complete."""
    tls = trio.SSLStream(conn.stream, ssl_context, server_side=True, https_compatible=True)
    with trio.move_on_after(conn.limits.head_timeout) as cs:  # noqa: ASYNC912  bounds a wait
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, OSError):
            return False  # noqa: ASYNC910  it failed at once: nothing to wait for
    if cs.cancelled_caught:
        conn.on_limit("head_timeout")
        return False
    conn.stream = tls
    return True


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    limits: ServerLimits,
    *,
    ssl_context: ssl.SSLContext | None = None,
    on_limit: Callable[[str], None] = lambda _name: None,
    network: Network = TCP,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on host:port (port 0 allowed) of ``network`` until cancelled;
    started value: the bound (host, port). ``ssl_context``: serve TLS (handshake bounded by
    ``head_timeout``)."""
    listeners = await network.open_listeners(host, port)
    admission = _Admission(limits)
    scheme = "https" if ssl_context is not None else "http"

    async def connection(stream: trio.abc.Stream) -> None:  # noqa: ASYNC910  a task's body
        try:
            peer = peer_address(stream)
        except OSError:
            await stream.aclose()
            return
        conn = _Connection(stream, limits, scheme, on_limit)
        refusal = admission.enter(peer)
        try:
            if refusal is not None:
                await conn.refuse(*refusal)
            elif ssl_context is None or await _start_tls(conn, ssl_context):
                await conn.serve(handler, peer)
        except Exception as exc:
            _log_crash(exc)
        finally:
            admission.leave(peer)
            with trio.move_on_after(1, shield=True):  # noqa: ASYNC912  bounds a close that blocks
                try:
                    await conn.stream.aclose()
                except (trio.BrokenResourceError, OSError):
                    pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, connection, listeners)
        task_status.started(listener_address(listeners[0]))

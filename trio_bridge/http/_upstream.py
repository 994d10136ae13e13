"""A lean httpx transport on h11 for the connector's calls to the local LLM.

httpx keeps its API (``httpx.Request``, ``client.send(stream=True)``, ``aiter_raw``, its
exception tree); only the connection handling is replaced. httpcore's pool costs ~0.5 ms of
CPU per request and grows with concurrency (measured); this transport keeps a short LIFO list
of idle keep-alive connections per origin and gives each request a connection of its own.

Error handling: every failure is raised as the httpx exception httpcore would raise
(``ConnectError``, ``ConnectTimeout``, ``ReadError``, ``WriteError``, ``RemoteProtocolError``),
so callers map one exception tree.

Cancellation: a request cancelled before its response completes closes its connection (it is
never put back in the pool), so the LLM sees the disconnect and stops generating.
"""

from __future__ import annotations

import select
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import httpx
import trio

from trio_bridge._errors import BridgeError
from trio_bridge._net import TCP, Network
from trio_bridge.http._h11 import h11
from trio_bridge.http._sockio import receive_some, send_all

_READ = 256 * 1024
#: how long closing a connection may take (a TLS close_notify to a server that stopped
#: reading would wait for ever)
CLOSE_TIMEOUT = 1.0
#: chunks an answer's iterator hands out before it lets other tasks run
CHUNKS_PER_TURN = 256


if hasattr(select, "poll"):

    def _readable_now(fd: int) -> bool:
        """True if ``fd`` has something to read, or was closed or broken; one poll() call.
        Not select(): it cannot take a descriptor past FD_SETSIZE (1024), and a connector
        with many connections gets such descriptors."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))  # POLLIN, or POLLHUP / POLLERR (always reported)

else:  # pragma: no cover - Windows: no poll(), and its select() takes any socket

    def _readable_now(fd: int) -> bool:
        return bool(select.select([fd], [], [], 0)[0])


class _Conn:
    __slots__ = ("h11", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    def is_stale(self) -> bool:
        """True if the server closed the idle connection (or sent something unasked)."""
        peer_closed = getattr(self.stream, "peer_closed", None)  # a stream without a socket
        if peer_closed is not None:
            return bool(peer_closed)
        sock = getattr(self.stream, "socket", None)
        if sock is None:  # TLS: look at the socket underneath
            sock = getattr(getattr(self.stream, "transport_stream", None), "socket", None)
        if sock is None:
            return False
        fd = sock.fileno()
        if fd < 0:
            return True  # closed here
        # an idle keep-alive connection is never readable, unless it was closed (EOF)
        try:
            return _readable_now(fd)
        except (OSError, ValueError):
            return True

    async def aclose(self) -> None:  # noqa: ASYNC910  a close that fails at once ends it
        """Close the connection, shielded so a cancelled request still tells the LLM, and
        bounded (``CLOSE_TIMEOUT``): a TLS close to a server that stopped reading never
        finishes; cut short, the socket is closed all the same (trio closes it)."""
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):  # noqa: ASYNC912  bounds a wait
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, OSError):
                pass


class _ResponseStream(httpx.AsyncByteStream):
    """The body of an answer, chunk by chunk as it comes (its own async iterator, not an async
    generator: nothing to finalise when a caller stops early)."""

    def __init__(self, transport: H11Transport, key: tuple[str, str, int], conn: _Conn) -> None:
        self._transport = transport
        self._key = key
        self._conn = conn
        self._complete = False
        self._closed = False
        self._calls = 0  # of __anext__ (a schedule point every CHUNKS_PER_TURN)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        """The next chunk. Cancellation: a chunk is taken only after the last schedule
        point; a cancelled read leaves the connection unusable (closed, never kept)."""
        self._calls += 1
        if not self._calls % CHUNKS_PER_TURN:
            # one read may hold thousands of tiny chunks, each handed out without a wait
            await trio.lowlevel.checkpoint()
        if self._complete:
            raise StopAsyncIteration
        event = await _next_event(self._conn)
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self._complete = True
            raise StopAsyncIteration
        raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} from the LLM")

    def release(self) -> bool:
        """Give a complete answer's connection back for the next request, without waiting:
        True if done (or already closed); False if it must be closed (:meth:`aclose`)."""
        if self._closed:
            return True
        h = self._conn.h11
        if not (self._complete and h.our_state is h11.DONE and h.their_state is h11.DONE):
            return False
        if not self._transport.keep(self._key, self._conn):
            return False  # not kept (closed transport, enough idle): aclose closes it
        h.start_next_cycle()
        self._closed = True
        return True

    async def aclose(self) -> None:
        if self.release():
            return  # noqa: ASYNC910  fast path: the connection goes back, nothing to wait for
        self._closed = True
        await self._conn.aclose()


async def close_response(response: httpx.Response) -> None:
    """Close an answer of :class:`H11Transport`: a complete one gives its connection back at
    once (no cancel scope, no schedule point); any other closes it, shielded (bounded by a
    second) so that a cancelled request still tells the LLM."""
    stream = response.stream
    if isinstance(stream, _ResponseStream) and stream.release():
        return  # noqa: ASYNC910  fast path (every request): see the docstring
    with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
        await response.aclose()


async def _next_event(conn: _Conn) -> Any:
    h = conn.h11
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from None
        if event is not h11.NEED_DATA:
            if isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("the LLM server closed the connection early")
            return event  # noqa: ASYNC910  fast path: it was buffered
        # closed or broken before a byte of the answer came: the server may have closed an
        # idle connection as we used it (the caller sends the request again if it can)
        nothing_yet = h.their_state is h11.SEND_RESPONSE and not h.trailing_data[0]
        try:
            data = await receive_some(conn.stream, _READ)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if nothing_yet:
                raise _NothingReceived from None
            raise httpx.ReadError(f"reading from the LLM server: {exc!r}") from None
        if not data and nothing_yet:
            raise _NothingReceived
        h.receive_data(bytes(data))


class H11Transport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=H11Transport(...))``: HTTP/1.1 with keep-alive.

    ``connect_timeout`` bounds TCP connect (and TLS handshake); there are no read timeouts
    here: the connector bounds the first byte and the gaps between chunks itself.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        max_idle: int = 32,
        ssl_context: ssl.SSLContext | None = None,
        network: Network = TCP,
    ) -> None:
        self._network = network
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._closed = False

    def keep(self, key: tuple[str, str, int], conn: _Conn) -> bool:
        """A connection whose exchange ended cleanly: kept for the next request (True), or
        not (the transport is closed or enough are idle: the caller closes it)."""
        idle = self._idle.setdefault(key, [])
        if self._closed or len(idle) >= self._max_idle:
            return False
        idle.append(conn)
        return True

    async def _connect(self, key: tuple[str, str, int]) -> _Conn:
        scheme, host, port = key
        try:
            with trio.fail_after(self._connect_timeout):
                stream = await self._network.open_stream(host, port)
                if scheme == "https":
                    ctx = self._ssl_context or ssl.create_default_context()
                    tls = trio.SSLStream(stream, ctx, server_hostname=host)
                    await tls.do_handshake()
                    stream = tls
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from None
        return _Conn(stream)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """The httpx transport API (``httpx.AsyncClient(transport=...)``): see :meth:`send`."""
        stream = request.stream
        body: bytes | AsyncIterable[bytes]
        if isinstance(stream, httpx.ByteStream):
            body = b"".join([c async for c in stream])
        else:
            body = stream  # type: ignore[assignment]
        return await self._send(request.url, request.method.encode(), request.headers.raw, body)

    async def send(
        self,
        method: str,
        url: httpx.URL,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes],
    ) -> httpx.Response:
        """One request without building an ``httpx.Request`` (~16 µs each, measured): the
        connector's hot path. Adds ``Host`` and the body's framing (``Content-Length``, or
        chunked for a stream) where ``headers`` have none, as httpx does."""
        has_host = has_length = False
        for k, _ in headers:
            k = k.lower()
            if k == b"host":
                has_host = True
            elif k in (b"content-length", b"transfer-encoding"):
                has_length = True
        auto = [] if has_host else [(b"Host", url.netloc)]
        tail = []
        if not has_length:
            if not isinstance(body, bytes):
                tail.append((b"Transfer-Encoding", b"chunked"))
            elif body:
                tail.append((b"Content-Length", b"%d" % len(body)))
            elif method in ("POST", "PUT", "PATCH"):
                auto.append((b"Content-Length", b"0"))
        if auto or tail:
            headers = [*auto, *headers, *tail]
        return await self._send(url, method.encode(), headers, body)

    async def _send(
        self,
        url: httpx.URL,
        method: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes],
    ) -> httpx.Response:
        scheme = url.scheme
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, url.host, port)
        target = url.raw_path
        # A body that can be sent again needs no look at the idle connection first: if the
        # server closed it, nothing comes back and the request goes again on a fresh one.
        replayable = isinstance(body, bytes)
        conn = await self._idle_conn(key, check=not replayable)
        if conn is not None:
            try:
                return await self._exchange(key, conn, method, target, headers, body)
            except _NothingReceived:
                # the server closed the idle connection as we used it: a fresh one, if the
                # body can be sent again
                if not replayable:
                    raise httpx.RemoteProtocolError(
                        "the LLM server closed a kept-alive connection"
                    ) from None
        conn = await self._connect(key)
        try:
            return await self._exchange(key, conn, method, target, headers, body)
        except _NothingReceived:
            raise httpx.RemoteProtocolError(
                "the LLM server closed the connection without answering"
            ) from None

    async def _idle_conn(self, key: tuple[str, str, int], *, check: bool) -> _Conn | None:
        """The most recently used idle connection to ``key`` (with ``check``: one the
        server has not closed; a poll() call each)."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not check or not conn.is_stale():
                return conn  # noqa: ASYNC910  fast path: the request's exchange checkpoints
            await conn.aclose()
        return None  # noqa: ASYNC910  fast path: the caller connects (a checkpoint)

    async def _exchange(
        self,
        key: tuple[str, str, int],
        conn: _Conn,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes],
    ) -> httpx.Response:
        h = conn.h11
        ok = False
        try:
            out = h.send(h11.Request(method=method, target=target, headers=headers))
            assert out is not None
            if isinstance(body, bytes):
                if body:
                    out += h.send(h11.Data(data=body))  # type: ignore[operator]
                out += h.send(h11.EndOfMessage())  # type: ignore[operator]
                await _send(conn, out, first=True)
            else:
                await _send(conn, out, first=True)
                async for chunk in body:
                    if chunk:
                        await _send(conn, h.send(h11.Data(data=chunk)))  # type: ignore[arg-type]
                await _send(conn, h.send(h11.EndOfMessage()))  # type: ignore[arg-type]
            while True:
                event = await _next_event(conn)
                if isinstance(event, h11.Response):
                    break
                # 1xx informational responses: keep reading
            ok = True
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from None
        finally:
            if not ok:
                await conn.aclose()
        return httpx.Response(
            status_code=event.status_code,
            headers=event.headers.raw_items(),
            stream=_ResponseStream(self, key, conn),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": event.reason},
        )

    async def aclose(self) -> None:
        """Close the idle connections; answers in progress close their own. Cancellation:
        everything is closed all the same (each close is shielded)."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.aclose()
        await trio.lowlevel.checkpoint()  # a checkpoint even with nothing to close


class _NothingReceived(BridgeError):
    pass


async def _send(conn: _Conn, data: bytes, *, first: bool = False) -> None:
    try:
        await send_all(conn.stream, data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        if first:
            raise _NothingReceived from None
        raise httpx.WriteError(f"writing to the LLM server: {exc!r}") from None

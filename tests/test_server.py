"""The broker's public HTTP/1.1 server (``_server``) over in-memory streams: properties.

Any bytes a client sends end in one of two ways: the handler gets a well-formed request, or the
client gets a 4xx/5xx answer in the OpenAI error shape and the connection closes. Never an
exception, never a hang. A request is parsed the same however it is split across reads, and
pipelined requests are answered in order.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import h11
import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Ping
from wsproto.events import Request as WsRequest

from trio_bridge._errors import ClientDisconnected, RelayClosed, RemoteProtocolError
from trio_bridge.http._server import Request, ServerLimits, _Connection, serve_http
from trio_bridge.http._ws import accept_websocket

LIMITS = ServerLimits(head_timeout=2.0, keep_alive_timeout=2.0, max_header_bytes=4096)


async def _exchange(chunks: list[bytes]) -> tuple[list[tuple[str, bytes, list, bytes]], bytes]:
    """Feed ``chunks`` to one server connection, then close; returns (requests the handler
    saw as (method, target, headers, body), everything the server wrote)."""
    client, server = trio.testing.memory_stream_pair()
    seen: list[tuple[str, bytes, list, bytes]] = []
    limits_hit: list[str] = []

    async def handler(req: Request) -> None:
        body = b""
        while chunk := await req.receive_body():
            body += chunk
        seen.append((req.method, req.target, req.headers, body))
        answer = json.dumps({"n": len(seen), "size": len(body)}).encode()
        await req.respond(200, [(b"content-length", b"%d" % len(answer))], answer, end=True)

    out = bytearray()
    conn = _Connection(server, LIMITS, "http", limits_hit.append)

    async def serve() -> None:
        try:
            await conn.serve(handler, "127.0.0.1")
        finally:
            await server.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            try:  # the server may answer and close before it has everything
                for c in chunks:
                    await client.send_all(c)
                await client.send_eof()
            except trio.BrokenResourceError:
                pass
            while data := await client.receive_some(65536):
                out += data
    return seen, bytes(out)


def run(chunks: list[bytes]) -> tuple[list[tuple[str, bytes, list, bytes]], bytes]:
    return trio.run(_exchange, chunks)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts, last = [], 0
    for p in [*points, len(data)]:
        parts.append(data[last:p])
        last = p
    return [p for p in parts if p]


def responses(out: bytes) -> list[tuple[int, bytes]]:
    conn = h11.Connection(h11.CLIENT)
    result: list[tuple[int, bytes]] = []
    conn.receive_data(out)
    status, body = 0, b""
    while True:
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        while True:
            ev = conn.next_event()
            if isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                result.append((status, body))
                status, body = 0, b""
                break
            else:
                return result
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return result
        conn.start_next_cycle()


LINE_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n "])
TOKENS = st.sampled_from(
    [
        b"GET",
        b"POST",
        b"/v1/x",
        b" ",
        b"HTTP/1.1",
        b"Host: x",
        b"Content-Length: 3",
        b"abc",
        b"Transfer-Encoding: chunked",
        b"3\r\nabc\r\n0\r\n\r\n",
        b":",
        b"\x00",
        b"\xff",
        b"X-A: b",
    ]
)
HEADS = st.lists(st.one_of(TOKENS, LINE_ENDS, st.binary(max_size=8)), max_size=30).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=HEADS, cuts=st.lists(st.integers(0, 1000), max_size=5))
def test_any_bytes_give_a_request_or_an_error_answer_never_a_crash(
    data: bytes, cuts: list[int]
) -> None:
    seen, out = run(split(data, cuts))
    if out:
        status_line = out.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 "), out[:60]
        status = int(status_line.split(b" ")[1])
        assert status == 200 or 400 <= status < 600
        if status >= 400:
            assert b'"error"' in out
    for method, target, _headers, _body in seen:
        assert method in ("GET", "POST") and target


VALID = (
    b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: b\r\nX-Key: v\r\nContent-Length: 11\r\n\r\nhello world"
    b"POST /v1/chat HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    b"POST /v1/empty HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n"
    b"GET /v1/models HTTP/1.1\r\nHost: b\r\n\r\n"
)


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(0, len(VALID)), max_size=12))
def test_pipelined_requests_parse_the_same_however_they_are_split(cuts: list[int]) -> None:
    seen, out = run(split(VALID, cuts))
    assert [(m, t, b) for m, t, _h, b in seen] == [
        ("POST", b"/v1/chat?x=1", b"hello world"),
        ("POST", b"/v1/chat", b"hello world"),
        ("POST", b"/v1/empty", b""),
        ("GET", b"/v1/models", b""),
    ]
    assert (b"x-key", b"v") in seen[0][2]
    answers = responses(out)
    assert [json.loads(b)["n"] for s, b in answers if s == 200] == [1, 2, 3, 4]


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 200), max_size=6), short=st.integers(1, 11))
def test_a_body_cut_short_by_the_client_is_never_a_request(cuts: list[int], short: int) -> None:
    """A Content-Length body the client ends early (EOF) reaches no handler as complete, and
    nothing after it is read as a next request."""
    data = b"POST /a HTTP/1.1\r\nHost: b\r\nContent-Length: 11\r\n\r\nhello world"[:-short]
    seen, out = run(split(data, cuts))
    assert seen == []
    assert out == b""


@pytest.mark.parametrize(
    ("extra", "served"),
    [
        (b"", ["/a", "/b"]),
        (b"Upgrade: h2c\r\nConnection: upgrade\r\n", ["/a", "/b"]),
        (b"Connection: close\r\n", ["/a"]),
    ],
    ids=["keep-alive", "protocol-switch-declined", "connection-close"],
)
def test_what_follows_a_body_is_the_next_request_unless_the_client_closes(
    extra: bytes, served: list[str]
) -> None:
    """The bytes after a Content-Length body in the same read are the next request; a
    proposed protocol switch the answer declines (200, not 101) keeps the connection; a
    ``Connection: close`` ends it after the answer, and what follows is not read."""
    first = b"POST /a HTTP/1.1\r\nHost: b\r\n" + extra + b"Content-Length: 3\r\n\r\nabc"
    seen, out = run([first + b"GET /b HTTP/1.1\r\nHost: b\r\n\r\n"])
    assert [t.decode() for _m, t, _h, _b in seen] == served
    assert seen[0][3] == b"abc"
    assert [s for s, _ in responses(out)] == [200] * len(served)


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(0, 120), max_size=6))
def test_a_client_that_expects_100_continue_gets_it_once(cuts: list[int]) -> None:
    """``Expect: 100-continue``: one ``100 Continue`` before the first body read, however the
    body arrives, then the answer."""
    head = b"POST /a HTTP/1.1\r\nHost: b\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"
    seen, out = run([head, *split(b"hello world", cuts)])
    assert [(m, t, b) for m, t, _h, b in seen] == [("POST", b"/a", b"hello world")]
    assert out.count(b"HTTP/1.1 100 ") == 1
    assert out.startswith(b"HTTP/1.1 100 ")
    assert b"HTTP/1.1 200 " in out


def test_bare_lf_and_obs_fold_are_refused_before_the_handler() -> None:
    for head in (
        b"GET / HTTP/1.1\nHost: x\n\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    ):
        seen, out = run([head])
        assert seen == []
        assert out.startswith(b"HTTP/1.1 400 "), out


def _client_hello() -> bytes:
    """The first bytes a TLS client sends (a ClientHello record)."""
    import ssl

    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="x")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_tls_handshake_on_the_plain_port_is_answered_at_once_in_plain_http() -> None:
    """A connector dialing wss:// (or a browser https://) at a plain-HTTP broker gets an answer
    its TLS layer rejects at once ("wrong version number"), not a wait for head_timeout."""
    hello = _client_hello()
    assert hello[:1] == b"\x16"
    seen, out = run([hello])
    assert seen == []
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert b"TLS" in out and b"plain HTTP" in out


async def test_a_failing_handler_costs_one_connection_and_its_text_is_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(req: Request) -> None:
        if req.target == b"/boom":
            raise ValueError("Bearer tbk_secret_in_exception_text")
        await req.respond(200, [(b"content-length", b"2")], b"ok", end=True)

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_http, handler, "127.0.0.1", 0, LIMITS)
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(f"http://{host}:{port}/boom")
            assert (await client.get(f"http://{host}:{port}/fine")).text == "ok"
        nursery.cancel_scope.cancel()
    assert "ValueError" in caplog.text
    assert "tbk_secret" not in caplog.text


async def test_a_websocket_closed_by_the_peer_refuses_sends_without_quoting_them() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = WSConnection(ConnectionType.CLIENT)
    head = peer.send(WsRequest(host="x", target="/relay"))
    ws = await accept_websocket(server_stream, head, b"", 1 << 20)
    peer.receive_data(await client_stream.receive_some(65536))
    assert isinstance(next(peer.events()), AcceptConnection)
    await client_stream.send_all(peer.send(CloseConnection(code=1000)))
    with pytest.raises(RelayClosed):
        await ws.receive_message()
    with pytest.raises(RelayClosed) as caught:
        await ws.send_message(b"Bearer tbk_secret")
    assert "tbk_secret" not in str(caught.value)
    await ws.aclose()


async def test_a_send_racing_the_close_handshake_is_relay_closed_not_a_crash() -> None:
    _client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = WSConnection(ConnectionType.CLIENT)
    ws = await accept_websocket(
        server_stream, peer.send(WsRequest(host="x", target="/relay")), b"", 1 << 20
    )
    ws._ws.send(CloseConnection(code=1000))  # wsproto leaves OPEN while a send is on its way
    with pytest.raises(RelayClosed) as caught:
        await ws.send_message(b"Bearer tbk_secret")
    assert "tbk_secret" not in str(caught.value)


async def test_a_websocket_ping_flood_is_a_protocol_error() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = WSConnection(ConnectionType.CLIENT)
    ws = await accept_websocket(
        server_stream, peer.send(WsRequest(host="x", target="/relay")), b"", 1 << 20
    )
    peer.receive_data(await client_stream.receive_some(65536))
    await client_stream.send_all(b"".join(peer.send(Ping(b"x")) for _ in range(50)))
    await client_stream.send_all(peer.send(Message(b"hello")))
    assert await ws.receive_message() == b"hello"  # a few pings are answered, not an error
    await client_stream.send_all(b"".join(peer.send(Ping(b"x")) for _ in range(500)))
    with pytest.raises(RemoteProtocolError, match="ping flood"):
        await ws.receive_message()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 1 << 20])
async def test_server_frames_decode_in_a_standard_client(size: int) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = WSConnection(ConnectionType.CLIENT)
    ws = await accept_websocket(
        server_stream, peer.send(WsRequest(host="x", target="/relay")), b"", 2 << 20
    )
    peer.receive_data(await client_stream.receive_some(65536))
    assert isinstance(next(peer.events()), AcceptConnection)
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    got, done = b"", False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ws.send_message, payload)
        while not done:
            peer.receive_data(await client_stream.receive_some(1 << 21))
            for event in peer.events():
                assert isinstance(event, Message)
                got += bytes(event.data)
                done = event.message_finished
    assert got == payload


async def a_client_that_reads_nothing(
    nursery: trio.Nursery,
    handler: Callable[[Request], Awaitable[None]],
    hits: list[str],
    outcome: list[Any],
    seconds: float,
) -> trio.SocketStream:
    """A server with a 0.5 s send timeout and a client that sends a GET and reads nothing,
    until the handler has recorded its ``outcome``; returns the client's stream."""
    limits = attrs.evolve(LIMITS, send_timeout=0.5)
    host, port = await nursery.start(
        partial(serve_http, handler, "127.0.0.1", 0, limits, on_limit=hits.append)
    )
    s = await trio.open_tcp_stream(host, port)
    await s.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(seconds):
        while not outcome:  # the client reads nothing meanwhile
            await trio.sleep(0.05)
    return s


async def test_a_client_that_takes_no_write_for_the_send_timeout_is_cut() -> None:
    hits: list[str] = []
    outcome: list[str] = []

    async def handler(req: Request) -> None:
        body = b"x" * (32 << 20)  # far more than the socket buffers hold
        headers = [(b"content-length", b"%d" % len(body))]
        try:
            await req.respond(200, headers, body, end=True)
            outcome.append("sent")
        except ClientDisconnected:
            outcome.append("cut")
            raise

    async with trio.open_nursery() as nursery:
        s = await a_client_that_reads_nothing(nursery, handler, hits, outcome, 5)
        assert outcome == ["cut"] and hits == ["send_timeout"]
        received = 0
        with trio.fail_after(5):
            try:
                while data := await s.receive_some(1 << 20):
                    received += len(data)
            except trio.BrokenResourceError:
                pass
        assert received < 32 << 20  # the connection was closed, not finished
        await s.aclose()
        nursery.cancel_scope.cancel()


async def test_a_write_loop_sharing_one_scope_is_cut_by_the_send_timeout_too() -> None:
    """A streamed answer bounds each write through the caller's scope (``within``)."""
    hits: list[str] = []
    outcome: list[tuple[bool, bool]] = []

    async def handler(req: Request) -> None:
        await req.respond(200, [(b"content-type", b"text/event-stream")])
        with trio.CancelScope() as loop:
            for _ in range(4096):  # 1 GiB at most: far more than the socket buffers hold
                await req.send(b"x" * (256 << 10), within=loop)
                await trio.lowlevel.checkpoint()
        outcome.append((loop.cancelled_caught, req.send_timed_out))

    async with trio.open_nursery() as nursery:
        s = await a_client_that_reads_nothing(nursery, handler, hits, outcome, 10)
        assert outcome == [(True, True)] and hits == ["send_timeout"]
        await s.aclose()
        nursery.cancel_scope.cancel()


async def test_a_body_of_many_tiny_chunks_read_at_once_does_not_hold_the_loop() -> None:
    """4 000 one-byte chunks arrive in one read: h11 hands them out one by one with no wait
    (each receive_body returns at once), but every CHUNKS_PER_TURN of them the reader lets
    other tasks run: a task that looks meanwhile sees the body half read."""
    client, server = trio.testing.memory_stream_pair()
    received = [0]
    seen: set[int] = set()
    done = trio.Event()

    async def handler(req: Request) -> None:
        while chunk := await req.receive_body():
            received[0] += len(chunk)
        done.set()
        await req.respond(200, [(b"content-length", b"0")], end=True)

    async def watch() -> None:
        while not done.is_set():
            seen.add(received[0])
            await trio.lowlevel.checkpoint()

    conn = _Connection(server, LIMITS, "http", lambda _limit: None)
    body = b"1\r\nx\r\n" * 4000 + b"0\r\n\r\n"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.serve, lambda r: handler(r), "127.0.0.1")
            await client.send_all(
                b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + body
            )
            nursery.start_soon(watch)
            await done.wait()
            nursery.cancel_scope.cancel()
    assert received[0] == 4000
    assert any(0 < n < 4000 for n in seen), sorted(seen)[:5]

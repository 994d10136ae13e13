"""The connector's httpx transport on h11: keep-alive, stale connections, cancellation, errors."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import h11
import httpx
import pytest
import trio
from netutil import free_port

from trio_bridge._net import TCP
from trio_bridge.http._upstream import (
    H11Transport,
    _Conn,
    _ResponseStream,
    close_response,
)


class Server:
    """A raw h11 server that numbers its connections. Paths: /id (answers the connection
    number), /id-then-close (answers, then closes the socket without saying so), /echo (sha256
    of the body), /forever (a chunk every 10 ms until the client goes away)."""

    def __init__(self) -> None:
        self.connections = 0
        self.eof = trio.Event()
        self.heads: list[list[tuple[bytes, bytes]]] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request)
            self.heads.append(list(event.headers.raw_items()))
            body = b""
            while not isinstance(ev := conn.next_event(), h11.EndOfMessage):
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(ev, h11.Data):
                    body += ev.data
            path = event.target
            if path == b"/forever":
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])))
                try:
                    while True:
                        await stream.send_all(conn.send(h11.Data(data=b"tick\n")))
                        await trio.sleep(0.01)
                except trio.BrokenResourceError:
                    self.eof.set()
                    return
            answer = (
                hashlib.sha256(body).hexdigest().encode() if path == b"/echo" else b"%d" % number
            )
            headers = [(b"content-length", b"%d" % len(answer))]
            await stream.send_all(
                conn.send(h11.Response(status_code=200, headers=headers))
                + conn.send(h11.Data(data=answer))
                + conn.send(h11.EndOfMessage())
            )
            if path == b"/id-then-close":
                await stream.aclose()
                return
            conn.start_next_cycle()


@asynccontextmanager
async def serve() -> AsyncIterator[tuple[Server, str, httpx.AsyncClient]]:
    server = Server()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = httpx.AsyncClient(transport=H11Transport(connect_timeout=2))
        async with client:
            yield server, f"http://127.0.0.1:{port}", client
        nursery.cancel_scope.cancel()


async def test_sequential_requests_reuse_one_connection() -> None:
    async with serve() as (server, url, client):
        answers = [(await client.get(url + "/id")).text for _ in range(5)]
    assert answers == ["1"] * 5
    assert server.connections == 1


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async with serve() as (_server, url, client):
        assert (await client.get(url + "/id-then-close")).text == "1"
        await trio.sleep(0.05)  # the server's FIN arrives
        assert (await client.post(url + "/id", content=b"x")).text == "2"


async def test_cancelling_a_streamed_response_closes_the_connection() -> None:
    async with serve() as (server, url, client):
        with trio.move_on_after(5):
            async with client.stream("GET", url + "/forever") as r:
                async for _chunk in r.aiter_raw():
                    break
        with trio.fail_after(2):
            await server.eof.wait()
        assert (await client.get(url + "/id")).text == "2"  # not the broken connection


async def test_close_response_keeps_a_complete_answer_and_closes_a_partial_one() -> None:
    async with serve() as (server, url, _client):
        transport = H11Transport(connect_timeout=2)
        for expected in (b"1", b"1"):  # the second request reuses the first's connection
            r = await transport.handle_async_request(httpx.Request("GET", url + "/id"))
            assert b"".join([c async for c in r.stream]) == expected  # type: ignore[union-attr]
            await close_response(r)
        r = await transport.handle_async_request(httpx.Request("GET", url + "/forever"))
        async for _chunk in r.stream:  # type: ignore[union-attr]
            break
        await close_response(r)  # the answer is not complete: its connection is closed
        with trio.fail_after(2):
            await server.eof.wait()
        r = await transport.handle_async_request(httpx.Request("GET", url + "/id"))
        assert b"".join([c async for c in r.stream]) == b"2"  # type: ignore[union-attr]
        await close_response(r)
        await transport.aclose()


@pytest.mark.parametrize(
    ("method", "body", "headers"),
    [
        ("POST", b'{"x": 1}', [(b"content-type", b"application/json")]),
        ("POST", b"", []),
        ("GET", b"", [(b"accept", b"*/*")]),
        ("POST", b"abc", [(b"content-length", b"3")]),
        ("POST", b"abc", [(b"host", b"llm.internal")]),
        ("POST", None, [(b"x-a", b"1")]),  # a streamed body
    ],
)
async def test_send_frames_a_request_as_httpx_does(
    method: str, body: bytes | None, headers: list[tuple[bytes, bytes]]
) -> None:
    """The connector's lean send() adds Host and the body's framing where the headers have
    none, exactly as an httpx.Request through the same transport would."""

    async def parts() -> AsyncIterator[bytes]:
        yield b"stream"

    async with serve() as (server, url, client):
        transport = H11Transport(connect_timeout=2)
        content = parts() if body is None else body
        r = await transport.send(method, httpx.URL(url + "/id"), list(headers), content)
        await r.aread()
        await close_response(r)
        content = parts() if body is None else body
        request = httpx.Request(method, url + "/id", headers=headers, content=content)
        await client.send(request)
        await transport.aclose()
    lean, with_httpx = server.heads
    assert [(k.lower(), v) for k, v in lean] == [(k.lower(), v) for k, v in with_httpx]


async def test_a_streamed_upload_arrives_byte_exact() -> None:
    parts = [bytes([i]) * (1000 * i + 1) for i in range(50)]

    async def body() -> AsyncIterator[bytes]:
        for p in parts:
            yield p
            await trio.lowlevel.checkpoint()

    async with serve() as (_server, url, client):
        r = await client.post(url + "/echo", content=body())
    assert r.text == hashlib.sha256(b"".join(parts)).hexdigest()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
async def test_connects_to_an_address_or_a_name(host: str) -> None:
    """IP literals are dialled directly (no resolver, no happy-eyeballs tasks); a name is
    resolved as trio.open_tcp_stream does."""
    listen_host = "::1" if host == "::1" else "127.0.0.1"
    listeners = await trio.open_tcp_listeners(0, host=listen_host)
    port = listeners[0].socket.getsockname()[1]
    stream = await TCP.open_stream(host, port)
    peer = await listeners[0].accept()
    await stream.send_all(b"ping")
    assert await peer.receive_some(10) == b"ping"
    await stream.aclose()
    await peer.aclose()
    await listeners[0].aclose()


async def test_connect_failures_are_httpx_connect_errors() -> None:
    async with httpx.AsyncClient(transport=H11Transport(connect_timeout=2)) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{free_port()}/")


# -- closing over TLS: every shielded close has a deadline ------------------------------------


@pytest.fixture(scope="session")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for a self-signed certificate for "llm.test"."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI missing")
    d: Path = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=llm.test",
         "-addext", "subjectAltName=DNS:llm.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


async def test_closing_a_partial_answer_over_tls_to_an_llm_that_stopped_reading_is_bounded(
    autojump_clock: trio.abc.Clock, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """An https local_url whose server stopped reading: the TLS close (close_notify) never
    gets out. close_response gives up after its second instead of blocking the drain for
    ever (a shielded scope without a deadline inside it did)."""
    server_ctx, client_ctx = tls_contexts
    # no buffering: a write waits until the other side reads it
    client_raw, server_raw = trio.testing.lockstep_stream_pair()
    client = trio.SSLStream(client_raw, client_ctx, server_hostname="llm.test")
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    # the server never reads again; an answer in progress is given up (cancelled request)
    conn = _Conn(client)
    response = httpx.Response(
        200, stream=_ResponseStream(H11Transport(), ("https", "llm.test", 443), conn)
    )
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def unblock_after_a_minute() -> None:
            # a close that never ends would hang the test: read it out, so the test fails
            await trio.sleep(60)
            await server_raw.receive_some()

        nursery.start_soon(unblock_after_a_minute)
        await close_response(response)
        nursery.cancel_scope.cancel()
    assert trio.current_time() - t0 <= 1.5
    with pytest.raises(trio.ClosedResourceError):  # cut short, the connection is closed
        await client_raw.send_all(b"x")


# -- descriptors past 1024: keep-alive works at any number ------------------------------------


@pytest.fixture
def descriptors_past_1024() -> Iterator[None]:
    """Every descriptor below 1030 taken (on /dev/null), so the sockets the test opens get
    numbers select() cannot take. The soft RLIMIT_NOFILE is raised for it when needed and
    restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2048
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    taken: list[int] = []
    try:
        while not taken or taken[-1] < 1030:
            taken.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def streamed(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_keep_alive_works_on_descriptors_past_1024(descriptors_past_1024: None) -> None:
    """A streamed body cannot be sent again, so the idle connection is checked before it is
    reused: a check by select() failed past descriptor 1024, and keep-alive silently
    stopped (every request on a new connection)."""
    async with serve() as (server, url, client):
        answers = [(await client.post(url + "/id", content=streamed(b"x"))).text for _ in range(3)]
        idle = client._transport._idle[("http", "127.0.0.1", int(url.rsplit(":", 1)[1]))][0]
        assert idle.stream.socket.fileno() >= 1024  # type: ignore[attr-defined]
    assert answers == ["1"] * 3
    assert server.connections == 1


async def test_an_idle_connection_the_server_closed_is_seen_past_descriptor_1024(
    descriptors_past_1024: None,
) -> None:
    async with serve() as (_server, url, client):
        assert (await client.get(url + "/id-then-close")).text == "1"
        idle = client._transport._idle[("http", "127.0.0.1", int(url.rsplit(":", 1)[1]))][0]
        assert idle.stream.socket.fileno() >= 1024  # type: ignore[attr-defined]
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(idle.stream.socket)  # type: ignore[attr-defined]
        answer = await client.post(url + "/id", content=streamed(b"x"))
        assert answer.status_code == 200 and answer.text == "2"  # not an error: a new one


# -- an answer of many tiny chunks read at once -----------------------------------------------


async def test_an_answer_of_many_tiny_chunks_read_at_once_does_not_hold_the_loop() -> None:
    """4 000 one-byte chunks in one read: h11 hands them out without a wait, but every
    CHUNKS_PER_TURN of them the answer's iterator lets other tasks run."""
    client_end, llm_end = trio.testing.memory_stream_pair()
    answer = h11.Connection(h11.SERVER)
    answer.receive_data(b"GET / HTTP/1.1\r\nhost: llm\r\n\r\n")
    answer.next_event()
    answer.next_event()
    wire = answer.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
    for _ in range(4000):
        wire += answer.send(h11.Data(data=b"x"))  # type: ignore[operator]
    wire += answer.send(h11.EndOfMessage())  # type: ignore[operator]
    await llm_end.send_all(wire)  # type: ignore[arg-type]
    transport = H11Transport()
    response = await transport._exchange(
        ("http", "llm", 80), _Conn(client_end), b"GET", b"/", [(b"host", b"llm")], b""
    )
    got = [0]
    seen: set[int] = set()
    done = trio.Event()

    async def watch() -> None:
        while True:
            seen.add(got[0])
            if done.is_set():
                return
            await trio.lowlevel.checkpoint()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async for chunk in response.stream:  # type: ignore[union-attr]
                got[0] += len(chunk)
            done.set()
    assert got[0] == 4000
    assert any(0 < n < 4000 for n in seen), sorted(seen)[:5]

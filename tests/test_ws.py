"""The relay's WebSocket dial (``trio_bridge.http._ws``) against raw loopback servers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from trio_bridge._errors import RelayRejected
from trio_bridge.http._ws import MAX_REJECTION_BODY, connect_websocket

Answer = Callable[[trio.SocketStream], Awaitable[None]]


async def dial_refused_by(answer: Answer) -> RelayRejected:
    """Dial a server that reads the upgrade request, then runs ``answer``: the rejection."""

    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        try:
            await answer(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10), pytest.raises(RelayRejected) as info:
            await connect_websocket(
                f"ws://127.0.0.1:{port}/_bridge/relay", headers=[], max_message=1 << 20
            )
        nursery.cancel_scope.cancel()
    return info.value


async def test_a_rejection_keeps_its_body_when_it_is_short() -> None:
    async def answer(stream: trio.SocketStream) -> None:
        body = b'{"error": "bad connector token"}'
        await stream.send_all(
            b"HTTP/1.1 401 Unauthorized\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )

    rejected = await dial_refused_by(answer)
    assert rejected.status == 401 and rejected.body == b'{"error": "bad connector token"}'


async def test_a_huge_rejection_body_is_cut_to_the_first_few_kib() -> None:
    size = 8 * 1024 * 1024

    async def answer(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: %d\r\n\r\n" % size)
        await stream.send_all(b"y" * size)

    rejected = await dial_refused_by(answer)
    assert rejected.status == 403
    assert rejected.body == b"y" * MAX_REJECTION_BODY


async def test_an_endless_rejection_body_ends_the_dial_all_the_same() -> None:
    """A server (or a proxy in front of the broker) that never ends its answer: the dialer
    reads the first few KiB, then hangs up; it neither waits nor holds more."""
    sent = [0]

    async def answer(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 502 Bad Gateway\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"z" * 0x10000 + b"\r\n"
        while True:
            await stream.send_all(chunk)
            sent[0] += 0x10000

    rejected = await dial_refused_by(answer)
    assert rejected.status == 502
    assert rejected.body == b"z" * MAX_REJECTION_BODY
    assert sent[0] < 64 * 1024 * 1024  # the socket buffers' worth, not a stream without end

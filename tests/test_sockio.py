"""The hot paths' socket reads and writes (_sockio): same results and errors as trio's own
stream methods, on plain sockets and on any other stream."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from trio_bridge.http._sockio import receive_some, send_all, write_now


def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def _read_exactly(stream: trio.SocketStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(65536)
        assert chunk
        got += chunk
    return bytes(got)


async def test_small_write_goes_out_at_once_and_is_read_whole() -> None:
    a, b = _pair()
    assert write_now(a, b"hello") == 5
    assert await receive_some(b, 100) == b"hello"
    await send_all(a, bytearray(b"more"))
    assert await receive_some(b, 2) == b"mo"  # at most max_bytes
    assert await receive_some(b, 100) == b"re"


async def test_a_full_buffer_is_sent_by_waiting_for_the_reader() -> None:
    a, _b = _pair()
    a.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 8192  # 2 MiB: far beyond any socket buffer
    assert 0 < write_now(a, data) < len(data)  # what fits now, no more, no waiting
    a2, b2 = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_all, a2, data)
        assert await _read_exactly(b2, len(data)) == data


async def test_eof_and_a_closed_stream() -> None:
    a, b = _pair()
    await a.aclose()
    assert await receive_some(b, 100) == b""
    with pytest.raises(OSError):  # the peer is gone: a broken pipe / reset
        for _ in range(100):
            await send_all(b, b"x" * 65536)
    await b.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await receive_some(b, 100)


async def test_closing_the_stream_wakes_a_waiting_reader() -> None:
    a, b = _pair()
    async with trio.open_nursery() as nursery:

        async def close_soon() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await b.aclose()

        nursery.start_soon(close_soon)
        with pytest.raises(trio.ClosedResourceError):
            await receive_some(b, 100)
    await a.aclose()


async def test_a_cancelled_task_writes_nothing_and_a_wait_is_cancellable() -> None:
    a, b = _pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await send_all(a, b"never")
    assert scope.cancelled_caught
    with trio.move_on_after(0.05) as waited:
        await receive_some(b, 100)  # nothing comes
    assert waited.cancelled_caught
    await send_all(a, b"after")
    assert await receive_some(b, 100) == b"after"  # "never" was not written


async def test_other_streams_use_their_own_methods() -> None:
    left, right = trio.testing.memory_stream_pair()
    assert write_now(left, b"x") == 0
    await send_all(left, b"through the stream")
    assert await receive_some(right, 100) == b"through the stream"

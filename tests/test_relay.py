"""The relay's I/O joint on memory transports, under the autojump clock (no sockets)."""

from __future__ import annotations

import pytest
import trio
from memtransport import transport_pair

from trio_bridge._errors import StreamReset
from trio_bridge._frames import ResetCode
from trio_bridge._protocol import RequestHead, Session
from trio_bridge._relay import Relay, RelayStream


async def test_a_relay_closed_under_a_reader_gives_buffered_data_then_stream_reset(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Regression: consuming buffered body bytes after ``Relay.close()`` queued a WINDOW
    frame on the closed writer and raised RelayClosed out of ``receive_data`` (the handler
    then failed as an internal error). The promise is: data already buffered, then
    StreamReset (RELAY_LOST), never RelayClosed."""
    ta, tb = transport_pair()
    window = 64 * 1024
    received: list[bytes] = []
    outcome: list[BaseException] = []
    body_arrived = trio.Event()
    connector: Relay

    async def handler(stream: RelayStream) -> None:
        with trio.fail_after(5):
            while stream.bytes_received < window // 2:
                await trio.sleep(0.01)
        body_arrived.set()
        connector.close("ping timeout (test)")
        # No checkpoint since close(): the buffered chunks are still here, and taking them
        # crosses the grant threshold (a quarter of the window).
        try:
            received.append(await stream.receive_data())
            while True:
                received.append(await stream.receive_data())
        except BaseException as exc:
            outcome.append(exc)
            raise

    broker = Relay(ta, Session(opener=True, window=window), ping_interval=1.0)
    connector = Relay(tb, Session(opener=False, window=window), ping_interval=1.0, handler=handler)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.run)
        await nursery.start(connector.run)
        stream = broker.open_stream(RequestHead("POST", "/", [], "rid"), end_stream=False)
        await stream.send_data(b"x" * (window // 2))
        await body_arrived.wait()
        with trio.fail_after(5):
            while not outcome:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert sum(map(len, received)) >= window // 4
    # the stream's reset cancels its handler's scope (the connector's LLM call ends with it);
    # a handler outside such a scope sees StreamReset (RELAY_LOST)
    err = outcome[0]
    assert isinstance(err, trio.Cancelled | StreamReset), repr(err)
    if isinstance(err, StreamReset):
        assert err.code == ResetCode.RELAY_LOST


async def test_take_ready_after_close_returns_what_was_buffered(
    autojump_clock: trio.abc.Clock,
) -> None:
    ta, tb = transport_pair()
    window = 64 * 1024
    taken: list[tuple[bytes, bool]] = []
    connector: Relay

    async def handler(stream: RelayStream) -> None:
        with trio.fail_after(5):
            while stream.bytes_received < window // 2:
                await trio.sleep(0.01)
        connector.close("test")
        taken.append(stream.take_ready())  # must not raise
        with pytest.raises(StreamReset):
            await stream.receive_data()

    broker = Relay(ta, Session(opener=True, window=window), ping_interval=1.0)
    connector = Relay(tb, Session(opener=False, window=window), ping_interval=1.0, handler=handler)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.run)
        await nursery.start(connector.run)
        stream = broker.open_stream(RequestHead("POST", "/", [], "rid"), end_stream=False)
        await stream.send_data(b"y" * (window // 2))
        with trio.fail_after(5):
            while not taken:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert len(taken[0][0]) == window // 2 and taken[0][1] is False

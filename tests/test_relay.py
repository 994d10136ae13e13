"""The relay's I/O joint on memory transports, under the autojump clock (no sockets)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from memtransport import MemTransport, transport_pair

from trio_bridge._errors import QueueFull, RelayClosed, StreamReset
from trio_bridge.relay._frames import (
    MAX_MESSAGE,
    Frame,
    FrameDecoder,
    FrameType,
    ResetCode,
    encode_frame,
)
from trio_bridge.relay._protocol import Hello, RequestHead, ResponseHead, Session
from trio_bridge.relay._relay import Liveness, Relay, RelayStream


class Pair:
    """A broker-side and a connector-side relay joined by memory transports."""

    def __init__(
        self, handler: Callable[[RelayStream], Awaitable[None]], window: int = 4096
    ) -> None:
        ta, tb = transport_pair(1000)
        self.broker = Relay(ta, Session(opener=True, window=window), ping_interval=1.0)
        self.connector = Relay(
            tb, Session(opener=False, window=window), ping_interval=1.0, handler=handler
        )

    async def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.broker.run)
        await nursery.start(self.connector.run)
        while self.broker.peer is None:
            await trio.sleep(0.01)


def head(rid: str = "rid") -> RequestHead:
    return RequestHead("POST", "/", [], rid)


async def test_a_relay_closed_under_a_reader_gives_buffered_data_then_stream_reset(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Regression: consuming buffered body bytes after ``Relay.close()`` queued a WINDOW
    frame on the closed writer and raised RelayClosed out of ``receive_data`` (the handler
    then failed as an internal error). The promise is: data already buffered, then
    StreamReset (RELAY_LOST), never RelayClosed."""
    window = 64 * 1024
    received: list[bytes] = []
    outcome: list[BaseException] = []
    body_arrived = trio.Event()

    async def handler(stream: RelayStream) -> None:
        with trio.fail_after(5):
            while stream.bytes_received < window // 2:
                await trio.sleep(0.01)
        body_arrived.set()
        pair.connector.close("ping timeout (test)")
        # No checkpoint since close(): the buffered chunks are still here, and taking them
        # crosses the grant threshold (a quarter of the window).
        try:
            received.append(await stream.receive_data())
            while True:
                received.append(await stream.receive_data())
        except BaseException as exc:
            outcome.append(exc)
            raise

    pair = Pair(handler, window)
    async with trio.open_nursery() as nursery:
        await pair.start(nursery)
        stream = pair.broker.open_stream(head(), end_stream=False)
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
    window = 64 * 1024
    taken: list[tuple[bytes, bool]] = []

    async def handler(stream: RelayStream) -> None:
        with trio.fail_after(5):
            while stream.bytes_received < window // 2:
                await trio.sleep(0.01)
        pair.connector.close("test")
        taken.append(stream.take_ready())  # must not raise
        with pytest.raises(StreamReset):
            await stream.receive_data()

    pair = Pair(handler, window)
    async with trio.open_nursery() as nursery:
        await pair.start(nursery)
        stream = pair.broker.open_stream(head(), end_stream=False)
        await stream.send_data(b"y" * (window // 2))
        with trio.fail_after(5):
            while not taken:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert len(taken[0][0]) == window // 2 and taken[0][1] is False


# -- credit, back-pressure, shedding, loss: two relays over memory transports ---------------


async def test_a_sender_waits_for_credit_and_goes_on_when_the_reader_takes_data(
    autojump_clock: trio.abc.Clock,
) -> None:
    reading = trio.Event()
    got: list[int] = []

    async def handler(stream: RelayStream) -> None:
        await reading.wait()
        while chunk := await stream.receive_data():
            got.append(len(chunk))

    pair = Pair(handler)
    async with trio.open_nursery() as nursery:
        await pair.start(nursery)
        stream = pair.broker.open_stream(head(), end_stream=False)
        sent = trio.Event()

        async def send() -> None:
            await stream.send_data(b"x" * 10_000, end_stream=True)  # > the 4096 window
            sent.set()

        nursery.start_soon(send)
        await trio.sleep(5)
        assert not sent.is_set()  # blocked on credit: nobody reads
        assert pair.broker.session.send_window(stream.id) == 0
        reading.set()
        with trio.fail_after(5):
            await sent.wait()
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert sum(got) == 10_000


async def test_the_slowest_reader_is_shed_when_relay_buffers_are_full(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The connector side holds bodies for handlers that do not read; beyond max_buffered the
    stream holding the most is reset (FLOW_CONTROL), the others go on."""
    outcomes: dict[str, str] = {}

    async def handler(stream: RelayStream) -> None:
        rid = stream.request_head.request_id if stream.request_head else ""
        if rid == "slow":
            await trio.sleep_forever()  # never reads
        total = 0
        while chunk := await stream.receive_data():
            total += len(chunk)
        outcomes[rid] = f"read {total}"

    ta, tb = transport_pair(1000)
    broker = Relay(ta, Session(opener=True, window=64 * 1024), ping_interval=1.0)
    connector = Relay(
        tb,
        Session(opener=False, window=64 * 1024),
        ping_interval=1.0,
        handler=handler,
        max_buffered=16 * 1024,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.run)
        await nursery.start(connector.run)
        while broker.peer is None:
            await trio.sleep(0.01)
        slow = broker.open_stream(head("slow"), end_stream=False)
        fast = broker.open_stream(head("fast"), end_stream=False)
        await slow.send_data(b"s" * 20_000)
        await fast.send_data(b"f" * 1000, end_stream=True)
        with trio.fail_after(5):
            while "fast" not in outcomes or slow.reset_error is None:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert outcomes["fast"] == "read 1000"
    assert slow.reset_error is not None and slow.reset_error.code == ResetCode.FLOW_CONTROL
    assert connector.buffered == 0  # the shed stream's bytes were released


async def test_losing_the_transport_fails_every_stream_with_relay_lost(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def handler(stream: RelayStream) -> None:
        await trio.sleep_forever()

    pair = Pair(handler)
    async with trio.open_nursery() as nursery:
        await pair.start(nursery)
        streams = [pair.broker.open_stream(head(f"r{i}"), end_stream=True) for i in range(3)]
        await trio.sleep(0.1)
        await pair.connector._transport.aclose()  # the connection goes away
        for s in streams:
            with pytest.raises(StreamReset) as info:
                await s.receive_response_head()
            assert info.value.code == ResetCode.RELAY_LOST
        nursery.cancel_scope.cancel()
    assert pair.broker.in_flight == 0


# -- the registry: FIFO, capacity, models, priority -----------------------------------------


async def test_registry_serves_waiters_in_order_within_capacity(
    autojump_clock: trio.abc.Clock,
) -> None:
    from trio_bridge.broker._registry import ConnectorHandle, Registry

    async def handler(stream: RelayStream) -> None:
        await stream.send_response(ResponseHead(200, []), end_stream=True)

    pair = Pair(handler)
    registry = Registry(max_queue=3)
    async with trio.open_nursery() as nursery:
        await pair.start(nursery)
        h = ConnectorHandle(pair.broker, "c", "default", "tok", capacity=1, connected_since=0.0)
        pair.broker.on_change = lambda _r: registry.changed(h)
        registry.add(h)
        first = await registry.acquire("default")
        assert first is h and h.load == 1 and not h.usable  # capacity 1: full
        order: list[int] = []

        async def wait(i: int) -> None:
            got = await registry.acquire("default")
            order.append(i)
            await trio.sleep(1)
            registry.release(got)

        for i in range(3):
            nursery.start_soon(wait, i)
            await trio.sleep(0.01)
        assert registry.queued == 3 == registry.queued_for("default")
        assert registry.queued_for("other") == 0
        with pytest.raises(QueueFull):
            await registry.acquire("default")
        await trio.sleep(2)
        assert order == []  # still held by the first reservation
        registry.release(first)
        await trio.sleep(10)
        assert order == [0, 1, 2] and registry.queued == 0 and h.reserved == 0
        nursery.cancel_scope.cancel()


async def test_registry_prefers_priority_then_load_and_skips_models_it_lacks(
    autojump_clock: trio.abc.Clock,
) -> None:
    from trio_bridge.broker._registry import ConnectorHandle, Registry

    async def handler(stream: RelayStream) -> None:
        await trio.sleep_forever()

    pairs = [Pair(handler) for _ in range(3)]
    registry = Registry()
    async with trio.open_nursery() as nursery:
        handles = []
        for i, pair in enumerate(pairs):
            await pair.start(nursery)
            h = ConnectorHandle(pair.broker, f"c{i}", "r", "t", capacity=2, connected_since=0.0)
            handles.append(h)
            registry.add(h)
        pairs[0].broker.peer_priority = 5  # the big box
        pairs[2].broker.peer_models = ("embed",)
        assert registry.pick("r", "chat") is handles[0]
        handles[0].reserved = 2  # full
        assert registry.pick("r", "chat") is handles[1]  # c2 does not serve "chat"
        assert registry.pick("r", "embed") is handles[1]  # c1 says nothing: serves anything
        handles[1].reserved = 2
        assert registry.pick("r", "embed") is handles[2]
        assert registry.pick("r", "chat") is None
        nursery.cancel_scope.cancel()


async def test_close_telling_peer_sends_the_reason_before_the_close(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A broker closing a relay (a revoked token, a route no longer allowed) says why: the
    connector sees the GOAWAY's reason, not just a closed WebSocket."""

    async def handler(stream: RelayStream) -> None:
        await trio.sleep_forever()

    pair = Pair(handler)
    async with trio.open_nursery() as nursery:
        await pair.start(nursery)
        pair.broker.close_telling_peer("connector token revoked")
        with trio.fail_after(5):
            await pair.connector.wait_closed()
            await pair.broker.wait_closed()
        nursery.cancel_scope.cancel()
    assert pair.connector.peer_goaway == "connector token revoked"
    assert pair.broker.closed_reason == "connector token revoked"


# -- hostile peers: floods cost the flooder its relay -----------------------------------------


class HostilePeer:
    """The far end of a relay, speaking raw frames: a Session for the hello and for building
    frames, and the memory transport to send and receive whole messages."""

    def __init__(self, transport: MemTransport, session: Session) -> None:
        self.transport = transport
        self.session = session
        self.decoder = FrameDecoder()

    async def frames(self) -> list[Frame]:
        """Every frame the relay sent until it closed."""
        out: list[Frame] = []
        with trio.fail_after(10):
            while True:
                try:
                    self.decoder.receive_data(await self.transport.receive_message())
                except RelayClosed:
                    return out
                while (f := self.decoder.next_frame()) is not None:
                    out.append(f)


async def start_victim(
    nursery: trio.Nursery, *, opener: bool, handler: Callable[[RelayStream], Awaitable[None]]
) -> tuple[Relay, HostilePeer]:
    """A relay (the victim; the broker's side with ``opener``) facing a hostile peer."""
    ta, tb = transport_pair(1000)
    victim = Relay(ta, Session(opener=opener, window=4096), ping_interval=1.0, handler=handler)
    peer = HostilePeer(tb, Session(opener=not opener, window=4096))
    if opener:  # the connector says hello first
        await tb.send_message(peer.session.send_hello(role="connector"))
        nursery.start_soon(victim.run)
    else:
        nursery.start_soon(victim.run)
    peer.session.receive_data(await tb.receive_message())
    assert isinstance(peer.session.next_event(), Hello)
    if not opener:
        await tb.send_message(peer.session.send_hello(role="broker"))
    while victim.peer is None:
        await trio.sleep(0.01)
    return victim, peer


async def never_answer(stream: RelayStream) -> None:
    await trio.sleep_forever()


@pytest.mark.parametrize(
    ("opener", "frame", "reason"),
    [
        (True, encode_frame(FrameType.PONG, 0, b"12345678"), "pong flood"),
        (False, encode_frame(FrameType.PONG, 0, b"12345678"), "pong flood"),
        (True, encode_frame(FrameType.STATUS, 0, b'{"ready":false}'), "status flood"),
        (False, encode_frame(FrameType.GOAWAY, 0, b"draining"), "goaway flood"),
    ],
    ids=["pong to the broker", "pong to the connector", "status", "goaway"],
)
async def test_a_control_frame_flood_costs_the_flooder_its_relay(
    autojump_clock: trio.abc.Clock, opener: bool, frame: bytes, reason: str
) -> None:
    async with trio.open_nursery() as nursery:
        victim, peer = await start_victim(nursery, opener=opener, handler=never_answer)
        # one 1 MB message of them, as the attacker sent
        await peer.transport.send_message(frame * ((MAX_MESSAGE - 64) // len(frame)))
        sent = await peer.frames()
        await victim.wait_closed()
    goaways = [f.payload.decode() for f in sent if f.type is FrameType.GOAWAY]
    assert goaways and reason in goaways[-1]
    assert victim.closed_reason is not None and reason in victim.closed_reason


async def test_a_window_flood_on_an_open_stream_costs_the_flooder_its_relay(
    autojump_clock: trio.abc.Clock,
) -> None:
    """WINDOW frames that grant credit nobody used (one byte at a time, beyond the window)
    are as empty as PONGs: the budget of frames that change nothing."""
    async with trio.open_nursery() as nursery:
        victim, peer = await start_victim(nursery, opener=True, handler=never_answer)
        stream = victim.open_stream(head(), end_stream=False)
        frame = encode_frame(FrameType.WINDOW, stream.id, (1).to_bytes(4, "big"))
        await peer.transport.send_message(frame * ((MAX_MESSAGE - 64) // len(frame)))
        sent = await peer.frames()
        await victim.wait_closed()
    goaways = [f.payload.decode() for f in sent if f.type is FrameType.GOAWAY]
    assert goaways and "frames that change nothing" in goaways[-1]
    assert stream.reset_error is not None and stream.reset_error.code == ResetCode.RELAY_LOST


async def test_honest_pings_and_status_changes_never_exhaust_the_budgets(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Two honest relays with 1 s pings, a readiness change every 50 ms, for a minute."""
    pair = Pair(never_answer)
    async with trio.open_nursery() as nursery:
        await pair.start(nursery)
        for i in range(1200):
            pair.connector.send_status(ready=bool(i % 2))
            await trio.sleep(0.05)
        assert pair.broker.closed_reason is None and pair.connector.closed_reason is None
        nursery.cancel_scope.cancel()


async def test_a_message_of_many_frames_does_not_hold_the_loop(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The reader hands on a message's frames in slices and lets other tasks run between
    them: a task that looks while one message of 4 000 one-byte DATA frames is being read
    sees it half done."""
    seen: set[int] = set()

    async def handler(stream: RelayStream) -> None:
        while True:
            await stream.receive_data()  # parks until the reader delivers, then runs
            seen.add(stream.bytes_received)  # when it next gets to run
            stream.take_ready()

    async with trio.open_nursery() as nursery:
        _, peer = await start_victim(nursery, opener=False, handler=handler)
        sid, wire = peer.session.open_stream(head(), end_stream=False)
        await peer.transport.send_message(wire)
        await trio.sleep(0.1)
        body = b"".join(peer.session.send_data(sid, b"x") for _ in range(4000))
        await peer.transport.send_message(body)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert any(0 < n < 4000 for n in seen), sorted(seen)[:5]


# -- a peer that does not read: the writer's bounds -------------------------------------------


async def test_a_peer_that_does_not_read_loses_its_relay_once_the_send_queue_is_full(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests beyond max_streams, each refused with a RESET that never gets out: the queue
    passes max_queued and the relay closes, dropping what it held (within the budgets: 3000
    refusals in one interval)."""
    ta, tb = transport_pair(1)  # one message in flight, then the connector's writes block
    cap = 160 * 1024
    victim = Relay(
        ta,
        Session(opener=False, window=4096, max_streams=1),
        ping_interval=1.0,
        handler=never_answer,
        high_water=16 * 1024,
        max_queued=cap,
    )
    peer = HostilePeer(tb, Session(opener=True, window=4096))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(victim.run)
        peer.session.receive_data(await tb.receive_message())
        peer.session.next_event()
        assert peer.session.peer_hello is not None
        peer.session.peer_hello.max_streams = 10**6  # a hostile broker ignores it
        await tb.send_message(peer.session.send_hello(role="broker"))
        wire = b"".join(peer.session.open_stream(head(), end_stream=True)[1] for _ in range(3000))
        await tb.send_message(wire)  # and never a read from here on
        with trio.fail_after(10):
            await victim.wait_closed()
    assert victim.closed_reason == f"peer not reading: more than {cap} bytes waiting to be sent"
    assert victim.queued == 0
    assert victim.closed_reason in caplog.text


async def test_a_peer_that_does_not_read_loses_its_relay_once_a_write_blocks_too_long(
    autojump_clock: trio.abc.Clock,
) -> None:
    """It keeps pinging (so it is not silent) and never reads: our PONGs wait behind a write
    that never ends, until 2.5 ping intervals have passed."""
    ta, tb = transport_pair(1)
    victim = Relay(ta, Session(opener=False, window=4096), ping_interval=1.0)
    peer = HostilePeer(tb, Session(opener=True, window=4096))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(victim.run)
        peer.session.receive_data(await tb.receive_message())
        peer.session.next_event()
        await tb.send_message(peer.session.send_hello(role="broker"))
        t0 = trio.current_time()
        with trio.fail_after(30):
            while victim.closed_reason is None:
                await tb.send_message(peer.session.send_ping(b"12345678"))
                await trio.sleep(0.5)
        elapsed = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert victim.closed_reason is not None
    assert victim.closed_reason.startswith("peer not reading: a write blocked for")
    assert 2.5 <= elapsed <= 5


class SlowReader(MemTransport):
    """A transport whose owner reads a message only every ``delay`` seconds."""

    def __init__(self, inner: MemTransport, delay: float) -> None:
        super().__init__(inner._send, inner._receive)
        self.delay = delay

    async def receive_message(self) -> bytes:
        await trio.sleep(self.delay)
        return await super().receive_message()


async def test_a_peer_that_reads_slowly_but_steadily_keeps_its_relay(
    autojump_clock: trio.abc.Clock,
) -> None:
    """5 MB of answer to a broker that takes a message every 1.5 s: every write waits, none
    for as long as the deadline (2.5 ping intervals)."""
    size = 5 * 1024 * 1024

    async def handler(stream: RelayStream) -> None:
        await stream.send_response(ResponseHead(200, []))
        await stream.send_data(b"z" * size, end_stream=True)

    ta, tb = transport_pair(1)
    broker = Relay(SlowReader(ta, 1.5), Session(opener=True, window=256 * 1024), ping_interval=1.0)
    connector = Relay(tb, Session(opener=False), ping_interval=1.0, handler=handler)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.run)
        await nursery.start(connector.run)
        while broker.peer is None:
            await trio.sleep(0.01)
        stream = broker.open_stream(head(), end_stream=True)
        got = 0
        with trio.fail_after(600):
            while chunk := await stream.receive_data():
                got += len(chunk)
        assert got == size
        assert broker.closed_reason is None and connector.closed_reason is None
        nursery.cancel_scope.cancel()


# -- wait_flushed: a drain's "the resets are on the wire" -------------------------------------


class GatedTransport(MemTransport):
    """A transport whose sends, once ``gated``, each wait for a permit (``allow``): the test
    decides when a write reaches the wire."""

    def __init__(self, inner: MemTransport) -> None:
        super().__init__(inner._send, inner._receive)
        self.gated = False
        self.written: list[bytes] = []
        self._permits = 0
        self._lot = trio.lowlevel.ParkingLot()

    def allow(self, n: int = 1) -> None:
        self._permits += n
        self._lot.unpark_all()

    async def send_message(self, data: bytes, *more: bytes) -> None:
        while self.gated and self._permits == 0:
            await self._lot.park()
        if self.gated:
            self._permits -= 1
        await super().send_message(data, *more)
        self.written.append(b"".join((data, *more)))


async def gated_pair(
    nursery: trio.Nursery,
) -> tuple[Relay, Relay, GatedTransport]:
    """Two relays; the connector's writes pass the returned gate."""
    ta, tb = transport_pair(1000)
    gate = GatedTransport(tb)
    broker = Relay(ta, Session(opener=True, window=4096), ping_interval=1.0)
    connector = Relay(gate, Session(opener=False, window=4096), ping_interval=1.0)
    nursery.start_soon(broker.run)
    await nursery.start(connector.run)
    while broker.peer is None:
        await trio.sleep(0.01)
    gate.gated = True
    return broker, connector, gate


async def test_wait_flushed_returns_once_what_was_queued_is_written(
    autojump_clock: trio.abc.Clock,
) -> None:
    flushed = trio.Event()
    async with trio.open_nursery() as nursery:
        broker, connector, gate = await gated_pair(nursery)
        connector.send_status(ready=False)
        connector.send_goaway("draining")

        async def wait() -> None:
            await connector.wait_flushed()
            flushed.set()

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert not flushed.is_set()  # the write is held at the gate
        gate.allow()
        with trio.fail_after(1):
            await flushed.wait()
        assert b"draining" in gate.written[-1]
        await trio.testing.wait_all_tasks_blocked()
        assert broker.peer_goaway == "draining" and not broker.peer_ready
        nursery.cancel_scope.cancel()


async def test_wait_flushed_waits_for_frames_queued_behind_a_write_in_progress(
    autojump_clock: trio.abc.Clock,
) -> None:
    flushed = trio.Event()
    async with trio.open_nursery() as nursery:
        _, connector, gate = await gated_pair(nursery)
        connector.send_status(ready=False)
        await trio.testing.wait_all_tasks_blocked()  # the writer holds it, at the gate
        connector.send_goaway("draining")  # queued behind it

        async def wait() -> None:
            await connector.wait_flushed()
            flushed.set()

        nursery.start_soon(wait)
        gate.allow()
        await trio.testing.wait_all_tasks_blocked()
        assert not flushed.is_set()  # the STATUS is out, the GOAWAY not yet
        gate.allow()
        with trio.fail_after(1):
            await flushed.wait()
        assert b"draining" in gate.written[-1]
        nursery.cancel_scope.cancel()


async def test_wait_flushed_is_not_held_by_frames_queued_after_the_call(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A busy relay never has an empty queue: the wait is for what was queued before it."""
    flushed = trio.Event()
    async with trio.open_nursery() as nursery:
        _, connector, gate = await gated_pair(nursery)
        connector.send_goaway("draining")
        await trio.testing.wait_all_tasks_blocked()  # the writer holds it, at the gate

        async def wait() -> None:
            await connector.wait_flushed()
            flushed.set()

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        connector.send_status(ready=False)  # after the call
        written = len(gate.written)
        gate.allow()
        with trio.fail_after(1):
            await flushed.wait()
        # the GOAWAY is out; the STATUS still waits at the gate
        assert len(gate.written) == written + 1 and b"draining" in gate.written[-1]
        nursery.cancel_scope.cancel()


async def test_wait_flushed_returns_at_once_on_a_closed_relay(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        _, connector, _gate = await gated_pair(nursery)
        connector.send_goaway("draining")  # never written: the gate stays shut
        connector.close("test")
        with trio.fail_after(1):
            await connector.wait_flushed()
        await connector.wait_closed()
        with trio.fail_after(1):
            await connector.wait_flushed()
        nursery.cancel_scope.cancel()


# -- control frames on a closed writer: no-ops, and run() returns its reason ------------------


async def run_keeping_reason(
    relay: Relay,
    reasons: list[str],
    *,
    task_status: trio.TaskStatus[Hello] = trio.TASK_STATUS_IGNORED,
) -> None:
    reasons.append(await relay.run(task_status=task_status))


async def test_close_right_after_close_telling_peer_returns_the_reason(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The GOAWAY of close_telling_peer is queued by a task that starts after close(): on the
    closed writer it is dropped, and run() returns the close's reason (it raised
    ExceptionGroup([RelayClosed]))."""
    reasons: list[str] = []
    pair = Pair(never_answer)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.broker.run)
        await nursery.start(run_keeping_reason, pair.connector, reasons)
        pair.connector.close_telling_peer("going")
        pair.connector.close("gone")
        with trio.fail_after(5):
            await pair.connector.wait_closed()
        nursery.cancel_scope.cancel()
    assert reasons == ["gone"]


async def test_a_protocol_error_after_the_owner_closed_the_relay_returns_the_reason(
    autojump_clock: trio.abc.Clock,
) -> None:
    """One message: GOAWAY (the owner's hook closes the relay on it), then a frame that breaks
    the protocol. The GOAWAY we would answer with meets a closed writer: a no-op, and run()
    returns the owner's reason."""
    reasons: list[str] = []
    ta, tb = transport_pair(1000)
    victim = Relay(ta, Session(opener=True, window=4096), ping_interval=1.0)
    victim.on_change = lambda r: r.close("peer going away") if r.peer_draining else None
    peer = HostilePeer(tb, Session(opener=False, window=4096))
    async with trio.open_nursery() as nursery:
        await tb.send_message(peer.session.send_hello(role="connector"))
        await nursery.start(run_keeping_reason, victim, reasons)
        garbage = encode_frame(FrameType.DATA, 2, b"x")  # DATA on a stream never opened
        await tb.send_message(peer.session.send_goaway("draining") + garbage)
        with trio.fail_after(5):
            await victim.wait_closed()
    assert reasons == ["peer going away"]


class SlowClose(MemTransport):
    """A transport whose close takes an hour (a close handshake with a peer that stopped
    reading)."""

    def __init__(self, inner: MemTransport) -> None:
        super().__init__(inner._send, inner._receive)

    async def aclose(self) -> None:
        await super().aclose()
        await trio.sleep(3600)


async def test_a_transport_close_that_hangs_does_not_hold_run_for_ever(
    autojump_clock: trio.abc.Clock,
) -> None:
    ta, tb = transport_pair(1000)
    broker = Relay(ta, Session(opener=True, window=4096), ping_interval=1.0)
    connector = Relay(SlowClose(tb), Session(opener=False, window=4096), ping_interval=1.0)
    reasons: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.run)
        await nursery.start(run_keeping_reason, connector, reasons)
        t0 = trio.current_time()
        connector.close("done")
        await connector.wait_closed()
        elapsed = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert reasons == ["done"]
    assert elapsed <= 5


class BufferedTransport(MemTransport):
    """Like a WebSocket after one big read: the messages that came together are handed out
    without a schedule point, one per call."""

    def __init__(self, inner: MemTransport) -> None:
        super().__init__(inner._send, inner._receive)
        self.ready: list[bytes] = []

    async def receive_message(self) -> bytes:
        if self.ready:
            return self.ready.pop(0)
        return await super().receive_message()


async def test_many_small_messages_read_at_once_do_not_hold_the_loop(
    autojump_clock: trio.abc.Clock,
) -> None:
    """4 000 messages of one one-byte DATA frame each, all buffered: the reader lets other
    tasks run every EVENTS_PER_TURN events across messages too, so a task that looks while
    they are being read sees them half done."""
    seen: set[int] = set()

    async def handler(stream: RelayStream) -> None:
        while True:
            await stream.receive_data()
            seen.add(stream.bytes_received)
            stream.take_ready()

    ta, tb = transport_pair(1000)
    buffered = BufferedTransport(ta)
    victim = Relay(buffered, Session(opener=False, window=64 * 1024), ping_interval=1.0,
                   handler=handler)  # fmt: skip
    peer = HostilePeer(tb, Session(opener=True, window=64 * 1024))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(victim.run)
        peer.session.receive_data(await tb.receive_message())
        peer.session.next_event()
        await tb.send_message(peer.session.send_hello(role="broker"))
        sid, wire = peer.session.open_stream(head(), end_stream=False)
        await tb.send_message(wire)
        await trio.sleep(0.1)
        buffered.ready = [peer.session.send_data(sid, b"x") for _ in range(4000)]
        await tb.send_message(peer.session.send_ping(b"12345678"))  # wakes the reader
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert max(seen) == 4000
    assert any(0 < n < 4000 for n in seen), sorted(seen)[:5]


async def test_a_reader_of_many_buffered_chunks_lets_other_tasks_run(
    autojump_clock: trio.abc.Clock,
) -> None:
    """4 000 one-byte chunks wait in a stream (its reader was busy): receive_data hands each
    out at once, but every CHUNKS_PER_TURN of them lets other tasks run."""
    consumed = [0]
    seen: set[int] = set()
    all_here = trio.Event()
    done = trio.Event()

    async def handler(stream: RelayStream) -> None:
        await all_here.wait()
        while await stream.receive_data():
            consumed[0] += 1
        done.set()

    async def watch() -> None:
        await all_here.wait()
        while True:
            seen.add(consumed[0])
            if done.is_set():
                return
            await trio.lowlevel.checkpoint()

    pair = Pair(handler, window=64 * 1024)
    async with trio.open_nursery() as nursery:
        await pair.start(nursery)
        stream = pair.broker.open_stream(head(), end_stream=False)
        for _ in range(4000):
            await stream.send_data(b"x")
        await stream.end()
        with trio.fail_after(5):
            while pair.connector.buffered < 4000:
                await trio.sleep(0.01)
        nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked()
        all_here.set()
        with trio.fail_after(5):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert consumed[0] == 4000
    assert any(0 < n < 4000 for n in seen), sorted(seen)[:5]


async def test_one_liveness_timer_serves_every_relay_and_pings_only_quiet_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A role's relays share one Liveness task (no pinger task per relay); a relay that keeps
    receiving sends no PING, a quiet one does, and a silent peer is still declared dead."""
    liveness = Liveness(1.0)
    pairs = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(liveness.run)
        for _ in range(3):
            ta, tb = transport_pair(1000)
            broker = Relay(ta, Session(opener=True), ping_interval=1.0, liveness=liveness)
            connector = Relay(tb, Session(opener=False), ping_interval=1.0)
            nursery.start_soon(broker.run)
            await nursery.start(connector.run)
            pairs.append((broker, connector, ta))
        await trio.testing.wait_all_tasks_blocked()
        assert len(liveness) == 3
        for broker, _, _ in pairs:
            assert broker._nursery is not None and len(broker._nursery.child_tasks) == 1  # writer
        busy, _, _ = pairs[0]
        quiet, _, _ = pairs[1]
        talker = pairs[0][1]
        for _ in range(40):  # 10 s of STATUS frames, four a second, to the busy relay
            talker.send_status(ready=True)
            await trio.sleep(0.25)
        assert busy._ping_counter == 0  # it heard its peer all along
        assert quiet._ping_counter >= 3  # nothing but PINGs either way: it probes too
        doomed, _, transport = pairs[2]
        transport.blackhole = True  # nothing from its peer reaches it any more
        await trio.sleep(4)
        assert doomed.closed_reason is not None and "ping timeout" in doomed.closed_reason
        assert len(liveness) == 2
        nursery.cancel_scope.cancel()

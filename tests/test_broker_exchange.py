"""One public request through the broker, in memory and on the autojump clock: the broker's
public handler over memory streams, connectors as memory-transport relays registered with its
registry (no sockets, no real time)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
from memtransport import MemTransport, transport_pair

from trio_bridge._config import BrokerConfig, Config, LimitsConfig
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.broker._broker import Broker
from trio_bridge.broker._registry import ConnectorHandle
from trio_bridge.http._server import _Connection
from trio_bridge.relay._frames import FrameType, ResetCode, encode_frame
from trio_bridge.relay._protocol import ResponseHead, Session
from trio_bridge.relay._relay import Relay, RelayStream

Handler = Callable[[RelayStream], Awaitable[None]]
CHAT = b"/v1/chat/completions"


def make_broker(tmp_path: Path, **broker: object) -> Broker:
    config = Config(
        base_dir=str(tmp_path),
        broker=BrokerConfig(**{"queue_timeout": 30.0, **broker}),  # type: ignore[arg-type]
        limits=LimitsConfig(),
    )
    return Broker(config, SecretStore(tmp_path / "tokens.toml", "tbc"))


class SlowTransport(MemTransport):
    async def send_message(self, data: bytes, *more: bytes) -> None:
        await trio.sleep(0.1)
        await super().send_message(data, *more)


async def add_connector(
    nursery: trio.Nursery,
    broker: Broker,
    handler: Handler,
    *,
    name: str = "c",
    models: tuple[str, ...] | None = None,
    capacity: int = 8,
    slow: bool = False,
) -> ConnectorHandle:
    """A connector stand-in: ``handler`` answers each stream; registered like a relay that
    said hello (and, with ``models``, its models). ``slow``: each message from the broker
    takes 0.1 s to be written."""
    ta, tb = transport_pair(1000)
    if slow:
        ta = SlowTransport(ta._send, ta._receive)
    relay = Relay(ta, Session(opener=True, window=256 * 1024), ping_interval=60.0)
    peer = Relay(tb, Session(opener=False, window=256 * 1024), ping_interval=60.0, handler=handler)
    nursery.start_soon(relay.run)
    await nursery.start(peer.run)
    while relay.peer is None:
        await trio.sleep(0.01)
    relay.peer_models = models
    handle = ConnectorHandle(
        relay, name=name, route="default", token_id="t", capacity=capacity, connected_since=0.0
    )
    relay.on_change = lambda _relay: broker.registry.changed(handle)
    broker.registry.add(handle)
    return handle


def post(path: bytes = CHAT, body: bytes = b'{"model": "m1"}') -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )


class Client:
    """One client connection to the broker's public handler over a memory stream."""

    def __init__(self, broker: Broker, *, lockstep: bool = False) -> None:
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        self.stream, self._server = pair()
        self._conn = _Connection(self._server, broker.server_limits(), "http", lambda _n: None)
        self._broker = broker
        self.served = trio.Event()  # the server's side of the connection ended

    async def serve(self) -> None:
        try:
            await self._conn.serve(self._broker.handle, "192.0.2.1")
        finally:
            with trio.CancelScope(shield=True):
                await self._server.aclose()
            self.served.set()

    async def read_all(self) -> bytes:
        out = b""
        try:
            while data := await self.stream.receive_some(65536):
                out += data
        except trio.BrokenResourceError:
            pass
        return out


async def exchange(nursery: trio.Nursery, broker: Broker, raw: bytes) -> bytes:
    """Send ``raw``; everything the broker answered until it closed the connection."""
    client = Client(broker)
    nursery.start_soon(client.serve)
    await client.stream.send_all(raw)
    return await client.read_all()


def parse(answer: bytes) -> tuple[int, bytes]:
    """(status, body) of one complete answer (h11 raises on a truncated one)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(answer)
    conn.receive_data(b"")
    status, body = 0, b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            raise AssertionError(f"no complete answer: {answer!r}") from None
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, body
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            raise AssertionError(f"incomplete answer: {answer!r}")


def request_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "trio_bridge.request"]


def sample(broker: Broker, name: str, **labels: str) -> float:
    value = broker.metrics.registry.get_sample_value(name, {"role": "broker", **labels})
    return value or 0.0


async def answer_ok(stream: RelayStream) -> None:
    while await stream.receive_data():
        pass
    body = b'{"ok": true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await stream.send_response(ResponseHead(200, headers))
    await stream.send_data(body, end_stream=True)


async def hang(stream: RelayStream) -> None:
    await trio.sleep_forever()


# -- a connector's answer the broker cannot use ------------------------------------------------

BAD_HEADS = {
    "a 1xx status": ResponseHead(101, []),
    "a Content-Length that is no number": ResponseHead(200, [(b"content-length", b"ten")]),
    "a Transfer-Encoding other than chunked": ResponseHead(200, [(b"transfer-encoding", b"gzip")]),
}


@pytest.mark.parametrize("name", list(BAD_HEADS))
async def test_a_response_head_the_broker_cannot_use_is_a_502_and_the_connectors_fault(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    async def bad(stream: RelayStream) -> None:
        await stream.send_response(BAD_HEADS[name], end_stream=True)

    caplog.set_level(logging.INFO)
    broker = make_broker(tmp_path)
    async with trio.open_nursery() as nursery:
        await add_connector(nursery, broker, bad)
        status, body = parse(await exchange(nursery, broker, post()))
        nursery.cancel_scope.cancel()
    assert status == 502
    assert b"bad answer" in body
    [line] = request_lines(caplog)
    assert line.outcome == "bad_answer"  # type: ignore[attr-defined]
    assert line.status == 502  # type: ignore[attr-defined]
    assert sample(broker, "trio_bridge_requests_total", route="default", status_class="5xx",
                  outcome="bad_answer") == 1  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("connector sent a bad answer" in m for m in warned), warned


async def test_an_answer_that_breaks_its_framing_midway_is_the_connectors_fault(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """The head went out; a later chunk runs past its Content-Length: a bad answer from the
    connector (its stream reset, a warning), not a client that went away."""

    async def too_long_later(stream: RelayStream) -> None:
        await stream.send_response(ResponseHead(200, [(b"content-length", b"2")]))
        await trio.sleep(1)  # the head is written on its own
        await stream.send_data(b"four", end_stream=True)

    caplog.set_level(logging.INFO)
    broker = make_broker(tmp_path)
    async with trio.open_nursery() as nursery:
        await add_connector(nursery, broker, too_long_later)
        answer = await exchange(nursery, broker, post())
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 200 ")  # the head went out; the connection then closed
    [line] = request_lines(caplog)
    assert line.outcome == "bad_answer"  # type: ignore[attr-defined]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("does not match its framing" in m for m in warned), warned


async def test_an_answer_longer_than_its_content_length_is_the_connectors_fault(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    async def too_long(stream: RelayStream) -> None:
        await stream.send_response(ResponseHead(200, [(b"content-length", b"2")]))
        await stream.send_data(b"four", end_stream=True)

    caplog.set_level(logging.INFO)
    broker = make_broker(tmp_path)
    async with trio.open_nursery() as nursery:
        await add_connector(nursery, broker, too_long)
        answer = await exchange(nursery, broker, post())
        nursery.cancel_scope.cancel()
    assert answer == b""  # the server can answer nothing more on it: the connection closes
    [line] = request_lines(caplog)
    assert line.outcome == "bad_answer"  # type: ignore[attr-defined]
    assert not hasattr(line, "status")  # none went out


async def test_a_malformed_response_frame_costs_the_relay_and_the_client_gets_a_502(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    async def malformed(stream: RelayStream) -> None:
        frame = encode_frame(FrameType.RESPONSE, stream.id, b'{"status": "200"}')
        stream._relay.send_frame(frame)  # past the connector's own session
        await trio.sleep_forever()

    caplog.set_level(logging.INFO)
    broker = make_broker(tmp_path)
    async with trio.open_nursery() as nursery:
        handle = await add_connector(nursery, broker, malformed)
        status, _ = parse(await exchange(nursery, broker, post()))
        nursery.cancel_scope.cancel()
    assert status == 502
    assert handle.relay.closed_reason is not None
    [line] = request_lines(caplog)
    assert line.outcome == "bridge_error"  # type: ignore[attr-defined]
    assert "RESPONSE: status must be" in line.reset  # type: ignore[attr-defined]


# -- metric labels: only models a connector announced ------------------------------------------


async def test_models_nobody_announced_share_one_metric_label(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    broker = make_broker(tmp_path)
    async with trio.open_nursery() as nursery:
        await add_connector(nursery, broker, answer_ok, name="a", models=("m1",))
        await add_connector(nursery, broker, answer_ok, name="b", models=("m2",))
        for n in range(60):  # more junk names than there are label slots (50)
            status, _ = parse(await exchange(nursery, broker, post(body=b'{"model": "j%d"}' % n)))
            assert status == 404
        for model in (b"m1", b"m2"):
            status, _ = parse(
                await exchange(nursery, broker, post(body=b'{"model": "%s"}' % model))
            )
            assert status == 200
        nursery.cancel_scope.cancel()
    total = "trio_bridge_model_requests_total"
    assert sample(broker, total, model="m1", outcome="ok") == 1
    assert sample(broker, total, model="m2", outcome="ok") == 1
    assert sample(broker, total, model="unknown", outcome="refused") == 60
    assert sample(broker, total, model="other", outcome="refused") == 0
    assert sample(broker, total, model="j0", outcome="refused") == 0


async def test_an_alias_is_a_metric_label_even_when_no_connector_serves_it(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    broker = make_broker(tmp_path, aliases={"coder": ["big", "small"]})
    async with trio.open_nursery() as nursery:
        await add_connector(nursery, broker, answer_ok, name="a", models=("m1",))
        await add_connector(nursery, broker, answer_ok, name="b", models=("m2",))
        status, _ = parse(await exchange(nursery, broker, post(body=b'{"model": "coder"}')))
        nursery.cancel_scope.cancel()
    assert status == 404
    assert sample(broker, "trio_bridge_model_requests_total", model="coder", outcome="refused") == 1


# -- time: the broker's windows and durations are on trio's clock ------------------------------


async def test_durations_and_queue_waits_are_measured_on_the_trio_clock(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async def slow(stream: RelayStream) -> None:
        await trio.sleep(3)  # 3 s to the head, then the answer at once
        await answer_ok(stream)

    broker = make_broker(tmp_path)
    async with trio.open_nursery() as nursery:
        await add_connector(nursery, broker, slow, capacity=1)
        answers: list[int] = []

        async def one() -> None:
            answers.append(parse(await exchange(nursery, broker, post()))[0])

        async with trio.open_nursery() as clients:
            clients.start_soon(one)
            await trio.sleep(0.5)
            clients.start_soon(one)  # waits 2.5 s for the only slot
        nursery.cancel_scope.cancel()
    assert answers == [200, 200]
    route = {"route": "default"}
    waited = sample(broker, "trio_bridge_queue_wait_seconds_sum", **route)
    assert waited == pytest.approx(2.5, abs=0.1)
    ttfb = sample(broker, "trio_bridge_time_to_first_byte_seconds_sum", **route)
    assert ttfb == pytest.approx(3 + 5.5, abs=0.2)
    duration = sample(broker, "trio_bridge_request_duration_seconds_sum", **route)
    assert duration == pytest.approx(3 + 5.5, abs=0.2)


def relay_upgrade(path: str, token: str) -> bytes:
    return (
        b"GET "
        + path.encode()
        + b" HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n\r\n"
    )


async def test_refused_tokens_are_counted_in_one_minute_windows_of_the_trio_clock(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    broker = make_broker(tmp_path, max_token_failures=3)

    async def dial() -> int:
        async with trio.open_nursery() as nursery:
            status, _ = parse(
                await exchange(nursery, broker, relay_upgrade(broker.relay_path, "tbc_nope"))
            )
        return status

    assert [await dial() for _ in range(4)] == [401, 401, 401, 429]
    await trio.sleep(30)
    assert await dial() == 429  # the same window
    await trio.sleep(31)
    assert await dial() == 401  # a new one


# -- drain: the aborts reach their clients -----------------------------------------------------


async def test_a_request_still_waiting_for_a_connector_when_the_grace_ends_gets_503(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    broker = make_broker(tmp_path)
    async with trio.open_nursery() as nursery:
        await add_connector(nursery, broker, hang, capacity=1)
        client = Client(broker)
        async with trio.open_nursery() as served:  # what Broker.serve cancels once drained
            served.start_soon(client.serve)
            busy = Client(broker)
            served.start_soon(busy.serve)
            await busy.stream.send_all(post())  # takes the only slot
            await trio.sleep(1)
            await client.stream.send_all(post())  # waits for it
            await trio.sleep(1)
            assert broker.registry.queued == 1
            await broker.drain(grace=5)
            served.cancel_scope.cancel()
        status, body = parse(await client.read_all())
        nursery.cancel_scope.cancel()
    assert status == 503 and b"shutting down" in body


async def test_drain_waits_for_an_aborted_answer_to_reach_a_client_that_reads_late(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    broker = make_broker(tmp_path)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        await add_connector(nursery, broker, hang)
        client = Client(broker, lockstep=True)  # each write waits for the client to read it

        read = trio.Event()

        async def read_late() -> None:
            await trio.sleep(5.3)  # 0.3 s after the grace ended
            got.append(await client.read_all())
            read.set()

        async with trio.open_nursery() as served:
            served.start_soon(client.serve)
            await client.stream.send_all(post())
            nursery.start_soon(read_late)
            await trio.sleep(1)
            await broker.drain(grace=4)
            assert broker.in_flight == 0  # its answer was written
            served.cancel_scope.cancel()
        await read.wait()
        nursery.cancel_scope.cancel()
    status, body = parse(got[0])
    assert status == 503 and b"shutting down" in body


async def test_drain_stops_within_a_short_deadline_when_a_client_never_reads(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    broker = make_broker(tmp_path)
    async with trio.open_nursery() as nursery:
        await add_connector(nursery, broker, hang)
        client = Client(broker, lockstep=True)
        async with trio.open_nursery() as served:
            served.start_soon(client.serve)
            await client.stream.send_all(post())
            await trio.sleep(1)
            start = trio.current_time()
            await broker.drain(grace=4)
            assert 4 <= trio.current_time() - start <= 4 + 2
            served.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_drain_stops_serving_only_once_its_resets_reached_the_connector(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    broker = make_broker(tmp_path)
    codes: list[int | None] = []

    async def record(stream: RelayStream) -> None:
        try:
            await trio.sleep_forever()
        finally:  # a relay lost cancels the handler before its streams fail
            codes.append(stream.reset_error.code if stream.reset_error else None)

    async with trio.open_nursery() as nursery:
        handle = await add_connector(nursery, broker, record, slow=True)
        async with trio.open_nursery() as served:
            served.start_soon(Client(broker).serve)
            client = Client(broker)
            served.start_soon(client.serve)
            await client.stream.send_all(post())
            await trio.sleep(1)
            await broker.drain(grace=1)
            handle.relay.close("the broker stopped")  # what the end of Broker.serve does
            served.cancel_scope.cancel()
        with trio.fail_after(10):
            while not codes:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert codes == [ResetCode.SHUTDOWN]


async def test_a_reset_while_the_model_list_is_read_is_an_outcome_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """(From an outside review.) A connector that resets its /v1/models answer after the head
    gets the client a 502, not an ExceptionGroup out of Exchange.run and an empty reply."""

    async def head_then_reset(stream: RelayStream) -> None:
        await stream.send_response(ResponseHead(200, [(b"content-type", b"application/json")]))
        await trio.sleep(0.5)
        stream.reset(ResetCode.UPSTREAM_ERROR, "the LLM failed mid-response")

    caplog.set_level(logging.INFO)
    broker = make_broker(tmp_path)
    async with trio.open_nursery() as nursery:
        await add_connector(nursery, broker, head_then_reset, name="a", models=("m1",))
        await add_connector(nursery, broker, head_then_reset, name="b", models=("m2",))
        answer = await exchange(
            nursery, broker, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if "handler failed" in r.getMessage()]
    assert answer.startswith(b"HTTP/1.1 502")
    [line] = request_lines(caplog)
    assert line.outcome == "bridge_error"  # type: ignore[attr-defined]

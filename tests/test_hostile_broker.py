"""A hostile broker against a connector (the connector in-process, the broker hand-played with
tests/hostilebroker.py): whatever it does, the connector's memory stays bounded and it drops
the relay, saying why."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import trio
from hostilebroker import open_hostile_broker
from trio_websocket import ConnectionClosed

from trio_bridge.relay._frames import FLAG_END_STREAM, FrameType, encode_frame
from trio_bridge.relay._protocol import GoAway, RequestHead
from trio_bridge.relay._relay import MAX_QUEUED, Relay
from trio_bridge.testing import Lab, open_lab

CHAT = RequestHead(
    "POST",
    "/v1/chat/completions",
    [(b"content-type", b"application/json"), (b"content-length", b"100")],
    "held",
)
MODELS = RequestHead("GET", "/v1/models", [], "more")


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with open_lab() as lab:
        yield lab


def queued(relay: Relay) -> int:
    """Bytes waiting in the relay's writer."""
    return relay.queued


@pytest.mark.parametrize("pace", ["flat out", "within the budgets"])
async def test_a_broker_that_stops_reading_costs_the_connector_its_relay_not_its_memory(
    lab: Lab, pace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 29 item 1: hold 1000 streams open with a hello window of 1 (no answer can be
    sent), stop reading, keep sending requests: each is refused with a RESET that the
    connector used to queue without bound (14 MB/s)."""
    caplog.set_level(logging.WARNING)
    model = await lab.start_test_model()
    async with open_hostile_broker(window=1, rcvbuf=16 * 1024) as hb:
        rc = await lab.start_connector(
            [hb.url], model.url, wait=False, relay={"ping_interval": "1s"}
        )
        conn = await hb.accept()
        await conn.open_streams(1000, CHAT, end_stream=False)  # bodies that never come
        with trio.fail_after(10):
            while (relay := rc.connector.relays.get(hb.url)) is None or relay.in_flight < 1000:
                await trio.sleep(0.01)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, queued(relay))
                await trio.sleep(0.005)

        batch, pause = (5000, 0.0) if pace == "flat out" else (1000, 0.25)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            with trio.move_on_after(60):
                try:
                    while relay.closed_reason is None:  # and never a read from here on
                        await conn.send(*(conn.request(MODELS, keep=False) for _ in range(batch)))
                        await trio.sleep(pause)
                except ConnectionClosed:
                    pass
            nursery.cancel_scope.cancel()
        reason = relay.closed_reason
        print(f"{pace}: sent {conn.sent >> 10} KiB; peak queue {peak >> 10} KiB; {reason}")
        assert reason is not None, f"still up after 60 s; {queued(relay)} bytes queued"
        assert "not reading" in reason or "flood" in reason, reason
        assert peak <= MAX_QUEUED
        assert queued(relay) == 0  # what was queued went with the relay
        conn.close()
    assert f"relay down: {reason}" in caplog.text


@pytest.mark.parametrize(
    "payload",
    [
        b'{"method":"GET","target":"/v1/models","headers":[],"id":"rid\\ud800"}',
        b'{"method":"GET\\udc00","target":"/v1/models","headers":[],"id":"rid"}',
        b'{"method":"GET","target":"/v1/models","headers":[],"id":"rid","e":'
        + b"[" * 30_000
        + b"]" * 30_000
        + b"}",
    ],
    ids=["lone surrogate in the id", "lone surrogate in the method", "deep nesting"],
)
async def test_a_malformed_request_head_costs_the_broker_its_relay_with_a_reason(
    lab: Lab, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 29 item 7: such heads logged a traceback ('relay failed unexpectedly') and
    reached the LLM and the logs; now the connector answers GOAWAY with the reason and
    closes, and nothing is logged with a traceback."""
    caplog.set_level(logging.DEBUG)
    model = await lab.start_test_model()
    async with open_hostile_broker() as hb:
        await lab.start_connector([hb.url], model.url, wait=False)
        conn = await hb.accept()
        await conn.send(encode_frame(FrameType.REQUEST, 1, payload, FLAG_END_STREAM))
        goaways = []
        with trio.fail_after(10):
            try:
                while True:
                    goaways += [ev.reason for ev in await conn.receive() if isinstance(ev, GoAway)]
            except ConnectionClosed:
                pass
        assert goaways and goaways[-1].startswith("REQUEST: "), goaways
    assert "unexpected" not in caplog.text
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert f"relay down: protocol error: {goaways[-1]}" in caplog.text

"""The connector stands alone: what a hostile broker can make it hold is bounded in size and
time, it cannot pin the LLM's slots, and it cannot flood the connector's log. In memory on the
autojump clock (tests/fakebroker.py's broker on a memory listener), but for a public client's
flood of tiny chunks, which needs a socket that pushes back."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from conftest import memory_upstream, usage_summary_read
from fakebroker import FakeBroker
from hostilebroker import MAX_MESSAGE_SIZE, HostileBroker
from trio_websocket import WebSocketServer

from trio_bridge._net import Network, listener_address
from trio_bridge.accounts._limits import KeyLimits
from trio_bridge.relay._protocol import RequestHead
from trio_bridge.testing import Lab, MemoryNetwork, RunningConnector, open_lab


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    """A lab in memory, for tests on the autojump clock."""
    async with open_lab(network=MemoryNetwork()) as lab:
        yield lab


@pytest.fixture
async def tcp_lab() -> AsyncIterator[Lab]:
    async with open_lab() as lab:
        yield lab


@asynccontextmanager
async def open_fake_broker(
    network: Network, *, window: int = 256 * 1024
) -> AsyncIterator[FakeBroker]:
    """tests/fakebroker.py's ``open_fake_broker``, its server listening on ``network``. It
    never answers the connector's pings: a relay to it is dropped after 2.5 ping intervals
    (12.5 s in a lab) without a frame from it; these tests end before (in virtual time)."""
    fb = FakeBroker()
    hb = HostileBroker(window=window, max_streams=100_000)
    [listener] = await network.open_listeners("127.0.0.1", 0)
    host, port = listener_address(listener)
    fb.url = hb.url = f"ws://{host}:{port}/_bridge/relay"
    server = WebSocketServer(
        hb.handler,
        [listener],  # type: ignore[list-item]
        message_queue_size=1,
        max_message_size=MAX_MESSAGE_SIZE,
        disconnect_timeout=1,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)

        async def first() -> None:
            await fb._read(await hb.accept())

        nursery.start_soon(first)
        yield fb
        nursery.cancel_scope.cancel()


def auth(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + key.encode())]


async def connect(lab: Lab, fb: FakeBroker, llm: str, **options: object) -> RunningConnector:
    rc = await lab.start_connector([fb.url], llm, wait=False, **options)  # type: ignore[arg-type]
    with trio.fail_after(10):
        await fb.connected.wait()
    return rc


async def test_bodies_without_an_end_are_bounded_in_bytes_and_time(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """40 streams of a key with a model allowlist send 512 KiB each and never end: the relay's
    budget (8 MiB here, half of it for one key) refuses what is beyond it at once (429 / 503),
    the rest is cut at
    first_byte_timeout (408); an honest request through another broker is served meanwhile."""
    _, key = lab.keys.add("coder", limits=KeyLimits(models=("m*",)))
    async with (
        memory_upstream(lab.network) as (app, llm),
        open_fake_broker(lab.network) as fb,
        open_fake_broker(lab.network) as honest_broker,
    ):
        rc = await lab.start_connector(
            [fb.url, honest_broker.url], llm, wait=False,
            relay={"max_buffered": "8MiB"},
            limits={"head_timeout": "1s", "min_body_rate": "1KiB", "first_byte_timeout": "3s"},
        )  # fmt: skip
        with trio.fail_after(10):
            await fb.connected.wait()
            await honest_broker.connected.wait()
        head = RequestHead("POST", "/echo", auth(key), "rid")
        part = b" " * (512 * 1024)
        sids = [await fb.request(head, part, end=False) for _ in range(40)]
        held = max(g.used for g in rc.connector.relay_guards.values())
        honest = await honest_broker.request(
            RequestHead("POST", "/echo", auth(key), "honest"), json.dumps({"model": "m1"}).encode()
        )
        with trio.fail_after(5):
            assert (await honest_broker.wait_answers([honest]))[honest] == 200
        started = trio.current_time()
        with trio.fail_after(15):
            answers = await fb.wait_answers(sids)
        took = trio.current_time() - started
        given_back = [g.used for g in rc.connector.relay_guards.values()]
    statuses = sorted(answers.values(), key=str)
    assert set(statuses) <= {429, 503, 408}, statuses
    # one key may hold half of the 8 MiB: 8 x 512 KiB; the rest is refused at once
    assert statuses.count(429) + statuses.count(503) == 40 - 8
    assert statuses.count(408) == 8
    assert held <= 8 * 1024 * 1024
    assert took == pytest.approx(3.0, abs=0.05), f"the stalled bodies were held {took:.2f} s"
    assert given_back == [0, 0]
    assert [r["path"] for r in app.forwarded()] == ["/echo"]


async def test_a_broker_that_grants_no_credit_cannot_pin_the_llm_slots(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """The LLM fails every call at once (it hangs up without an answer) and the broker grants
    1 byte of credit: each 502 waits for credit that never comes, but no LLM slot is held
    meanwhile, and each such stream is reset after stall_timeout. (An LLM that refuses the
    connection is not this case: that request is handed back to the broker, REFUSED.)"""
    [llm] = await lab.network.open_listeners("127.0.0.1", 0)

    async def hang_up() -> None:
        while True:
            stream = await llm.accept()
            await stream.aclose()

    lab.nursery.start_soon(hang_up)
    host, port = listener_address(llm)
    async with open_fake_broker(lab.network, window=1) as fb:
        rc = await connect(
            lab, fb, f"http://{host}:{port}",
            connector={"max_concurrent": 2},
            limits={"stall_timeout": "1s", "connect_timeout": "1s"},
        )  # fmt: skip
        sids = [
            await fb.request(RequestHead("GET", "/v1/models", auth(lab.api_key), f"r{n}"))
            for n in range(10)
        ]
        with trio.fail_after(10):
            while len(fb.status) < 10:  # every answer's head is out (502)
                await trio.sleep(0.02)
        assert rc.connector.slots.busy == 0, "a 502 waiting for credit held an LLM slot"
        with trio.fail_after(10):
            while rc.connector.in_flight:
                await trio.sleep(0.05)
    assert {fb.status[s] for s in sids} == {502}


async def test_a_slow_reader_answer_frees_its_slot_after_the_stall_timeout(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        memory_upstream(lab.network) as (_, llm),
        open_fake_broker(lab.network, window=1) as fb,
    ):
        rc = await connect(lab, fb, llm, connector={"max_concurrent": 1},
                           limits={"stall_timeout": "1s"})  # fmt: skip
        await fb.request(RequestHead("GET", "/big?n=1000000", auth(lab.api_key), "r1"))
        with trio.fail_after(5):
            while rc.connector.slots.busy == 0:
                await trio.sleep(0.02)
        with trio.fail_after(5):
            while rc.connector.slots.busy:
                await trio.sleep(0.05)


async def test_failed_key_checks_from_a_broker_are_throttled_and_summed_up(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """2 000 requests with a wrong key: at most KEY_FAILURES_PER_WINDOW are answered 401 and
    logged one by one in a window; the rest get 429 and no line of their own. A valid key
    still gets through on the same relay."""
    from trio_bridge.connector._body import KEY_FAILURES_PER_WINDOW

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    request_log = logging.getLogger("trio_bridge.request")
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    try:
        async with memory_upstream(lab.network) as (_, llm), open_fake_broker(lab.network) as fb:
            await connect(lab, fb, llm)
            bad = auth("tbk_AAAAAAAA_" + "x" * 43)
            sids = []
            for n in range(2000):
                sids.append(await fb.request(RequestHead("GET", "/sse", bad, f"b{n}")))
            good = await fb.request(RequestHead("GET", "/sse", auth(lab.api_key), "good"))
            with trio.fail_after(20):
                answers = await fb.wait_answers([*sids, good])
    finally:
        request_log.removeHandler(handler)
    assert answers.pop(good) == 200
    statuses = list(answers.values())
    assert statuses.count(401) <= 2 * KEY_FAILURES_PER_WINDOW
    assert statuses.count(429) >= 2000 - 2 * KEY_FAILURES_PER_WINDOW
    lines = stream.getvalue().count("\n")
    assert lines <= 2 * KEY_FAILURES_PER_WINDOW + 1, lines


async def test_a_body_over_max_body_read_whole_for_its_model_is_413(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """A key with a model allowlist makes the connector read the body whole: past max_body
    that is a 413, not a traceback and a 502."""
    _, key = lab.keys.add("coder", limits=KeyLimits(models=("m*",)))
    async with memory_upstream(lab.network) as (app, llm), open_fake_broker(lab.network) as fb:
        await connect(lab, fb, llm, limits={"max_body": "100KiB"})
        sid = await fb.request(RequestHead("POST", "/echo", auth(key), "r1"), b" " * 200_000)
        with trio.fail_after(10):
            answers = await fb.wait_answers([sid])
    assert answers[sid] == 413
    assert app.forwarded() == []


async def test_a_broker_that_takes_no_usage_answer_cannot_pin_the_key(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """GET /_bridge/usage through a broker that grants no credit: reset after stall_timeout,
    so the key's concurrency is free again through an honest broker."""
    _, key = lab.keys.add("k", limits=KeyLimits(concurrency=1))
    async with (
        open_fake_broker(lab.network, window=1) as hostile,
        open_fake_broker(lab.network) as honest,
    ):
        rc = await lab.start_connector(
            [hostile.url, honest.url], "http://127.0.0.1:9", wait=False,
            limits={"stall_timeout": "1s"},
        )  # fmt: skip
        with trio.fail_after(10):
            await hostile.connected.wait()
            await honest.connected.wait()
        await usage_summary_read(rc.connector, autojump_clock)
        await hostile.request(RequestHead("GET", "/_bridge/usage", auth(key), "pin"))
        with trio.fail_after(5):
            while rc.connector.in_flight == 0:
                await trio.sleep(0.02)
        with trio.fail_after(5):
            while rc.connector.in_flight:
                await trio.sleep(0.05)
        sid = await honest.request(RequestHead("GET", "/_bridge/usage", auth(key), "honest"))
        with trio.fail_after(5):
            assert (await honest.wait_answers([sid]))[sid] == 200


async def test_one_key_cannot_take_the_whole_body_budget_of_a_relay(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """A key may hold at most half of its relay's body budget: its own excess gets 429, and
    another key's request still goes through."""
    _, greedy = lab.keys.add("greedy", limits=KeyLimits(models=("m*",)))
    async with memory_upstream(lab.network) as (_, llm), open_fake_broker(lab.network) as fb:
        await connect(lab, fb, llm, relay={"max_buffered": "4MiB"},
                      limits={"first_byte_timeout": "5s"})  # fmt: skip
        part = b" " * (900 * 1024)
        sids = [
            await fb.request(RequestHead("POST", "/echo", auth(greedy), f"g{n}"), part, end=False)
            for n in range(4)
        ]
        with trio.fail_after(5):
            while len(fb.status) < 1:
                await trio.sleep(0.02)
        victim = await fb.request(
            RequestHead("POST", "/echo", auth(lab.api_key), "v"), b"x" * 300_000
        )
        with trio.fail_after(5):
            answers = await fb.wait_answers([victim])
        assert answers[victim] == 200
        assert sorted(s for s in fb.status.values() if s is not None and s != 200) == [429, 429]
        del sids


async def test_a_public_client_cannot_cost_a_connector_its_relay_with_tiny_chunks(
    tcp_lab: Lab,
) -> None:
    """A chunked upload of 1-byte chunks without a key: the connector answers 401 and resets
    at once, and the DATA frames still on their way (one per chunk) are the honest crossing of
    that reset, within the stream's credit: not a flood that drops the relay."""
    model = await tcp_lab.start_test_model()
    rb = await tcp_lab.start_broker()
    rc = await tcp_lab.start_connector([rb], model.url)
    relay = next(iter(rc.connector.relays.values()))
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"10000\r\n" + b"a" * 0x10000 + b"\r\n"
    )
    s = await trio.open_tcp_stream(rb.host, rb.port)
    with trio.move_on_after(5):
        try:
            await s.send_all(head)
            for _ in range(60):
                await s.send_all(b"1\r\nX\r\n" * 2000)
        except trio.BrokenResourceError:
            pass
    await s.aclose()
    assert relay.closed_reason is None
    assert relay.session.noop_frames < 100

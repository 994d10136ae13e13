"""Connections that heal themselves: backoff, liveness, LLM health, queueing, HA, pools."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio
import trio.testing
from conftest import memory_upstream
from memtransport import transport_pair

from trio_bridge import Connector
from trio_bridge._backoff import Backoff
from trio_bridge._errors import StreamReset
from trio_bridge._net import Listener
from trio_bridge.relay._frames import ResetCode
from trio_bridge.relay._protocol import RequestHead, Session
from trio_bridge.relay._relay import Relay, RelayStream
from trio_bridge.testing import Lab, MemoryNetwork, RunningBroker, open_bridge, open_lab

CHAT = "/v1/chat/completions"


def body(prompt: str, stream: bool = True) -> dict[str, object]:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": prompt}]}


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    """A lab in memory: its tests take ``autojump_clock``, so outages, backoffs and timeouts
    pass in no real time."""
    async with open_lab(network=MemoryNetwork()) as lab:
        yield lab


# -- pure policy ---------------------------------------------------------------------------


def test_backoff_is_full_jitter_capped_and_resets_after_a_stable_connection() -> None:
    draws = iter([1.0] * 10)
    b = Backoff(base=0.5, cap=8.0, stable_after=30.0, rand=lambda: next(draws))
    assert [b.next_delay() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    b.connected_for(5.0)  # short-lived: keep backing off
    assert b.next_delay() == 8.0
    b.connected_for(31.0)
    assert b.next_delay() == 0.5
    zero = Backoff(rand=lambda: 0.0)
    assert zero.next_delay() == 0.0  # full jitter: anywhere in [0, ceiling)


# -- liveness, without sockets (autojump clock) --------------------------------------------


async def test_silent_peer_is_declared_dead_within_three_intervals(
    autojump_clock: trio.abc.Clock,
) -> None:
    ta, tb = transport_pair()
    served = trio.Event()

    async def handler(stream: RelayStream) -> None:
        served.set()
        await trio.sleep_forever()

    broker = Relay(ta, Session(opener=True), ping_interval=1.0)
    connector = Relay(tb, Session(opener=False), ping_interval=1.0, handler=handler)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.run)
        await nursery.start(connector.run)
        await trio.sleep(20)  # healthy pings for 20 intervals: nobody is declared dead
        assert broker.closed_reason is None and connector.closed_reason is None
        stream = broker.open_stream(RequestHead("GET", "/", [], "rid"), end_stream=True)
        await served.wait()
        ta.blackhole = tb.blackhole = True
        t0 = trio.current_time()
        with pytest.raises(StreamReset) as info:
            await stream.receive_response_head()
        assert info.value.code == ResetCode.RELAY_LOST
        assert 2.0 <= trio.current_time() - t0 <= 3.0
        assert "ping timeout" in (broker.closed_reason or "")
        with trio.fail_after(3.5):
            while connector.closed_reason is None:
                await trio.sleep(0.1)
        assert "ping timeout" in connector.closed_reason


# -- a whole bridge in memory (autojump clock) --------------------------------------------


async def get_models(client: httpx.AsyncClient, base: str, key: str) -> int:
    r = await client.get(base + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    return r.status_code


async def registered(rb: RunningBroker, n: int = 1) -> None:
    """Until ``n`` relays are registered at ``rb``."""
    while len(rb.broker.registry.relays()) < n:
        await trio.sleep(0.01)


async def test_connector_started_before_the_broker_connects_when_it_appears(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    model = await lab.start_test_model()
    port = 30000  # nothing listens there yet
    url = f"ws://127.0.0.1:{port}/_bridge/relay"
    rc = await lab.start_connector([url], model.url, wait=False)
    await trio.sleep(600)  # ten minutes without a broker: it keeps trying; it never gives up
    assert not rc.connector.relays
    assert "cannot reach broker" in rc.connector.relay_states[url]["last_error"]
    t0 = trio.current_time()
    rb = await lab.start_broker(f"127.0.0.1:{port}")
    with trio.fail_after(30):
        await registered(rb)
    assert trio.current_time() - t0 <= 8 + 0.1  # the backoff cap (8 s) bounds the wait
    async with lab.client() as client:
        assert await get_models(client, rb.url, lab.api_key) == 200


async def test_broker_restart_aborts_streams_then_service_resumes_by_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_bridge(token_delay=0.02, network=MemoryNetwork()) as b, b.client() as client:
        got = []

        async def long_stream() -> None:
            with pytest.raises(httpx.HTTPError):  # aborted: never a "complete" answer
                async with client.stream(
                    "POST",
                    b.base_url + CHAT,
                    json=body("count to 500"),
                    headers={"Authorization": f"Bearer {b.api_key}"},
                ) as r:
                    async for chunk in r.aiter_raw():
                        got.append(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_stream)
            with trio.fail_after(10):
                while not got:
                    await trio.sleep(0.01)
            t0 = trio.current_time()
            await b.restart_broker(down_for=60)  # "count to 500" takes 10 s: cut midway
        recovered = trio.current_time() - t0
        assert got  # it was streaming when the broker died
        assert recovered <= 60 + 8 + 0.1  # back within the backoff cap (8 s) of its return
        assert await get_models(client, b.base_url, b.api_key) == 200


async def test_llm_down_gives_503_then_service_resumes_by_itself(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    model = await lab.start_test_model()
    listen = model.url.removeprefix("http://")
    rb = await lab.start_broker()
    await lab.start_connector([rb], model.url, connector={"health_interval": "1s"})
    async with lab.client() as client:
        assert await get_models(client, rb.url, lab.api_key) == 200
        model.stop.cancel()
        with trio.fail_after(5):  # noticed by the next probe (or the next failed request)
            while (status := await get_models(client, rb.url, lab.api_key)) == 200:
                await trio.sleep(0.1)
        assert status in (502, 503)
        assert await get_models(client, rb.url, lab.api_key) == 503
        await trio.sleep(300)  # down for five minutes
        assert await get_models(client, rb.url, lab.api_key) == 503
        await lab.start_test_model(listen=listen)
        t0 = trio.current_time()
        with trio.fail_after(5):
            while await get_models(client, rb.url, lab.api_key) != 200:
                await trio.sleep(0.1)
        assert trio.current_time() - t0 <= 1 + 0.2  # the next probe (health_interval 1 s)


async def test_two_brokers_one_killed_the_other_keeps_serving(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    model = await lab.start_test_model()
    b1, b2 = await lab.start_broker(), await lab.start_broker()
    rc = await lab.start_connector([b1, b2], model.url)
    assert len(rc.connector.relays) == 2
    async with lab.client() as client:
        assert await get_models(client, b1.url, lab.api_key) == 200
        assert await get_models(client, b2.url, lab.api_key) == 200
        await b1.stop()
        for _ in range(20):
            assert await get_models(client, b2.url, lab.api_key) == 200
    assert list(rc.connector.relays) == [b2.relay_url]


async def test_pool_one_connector_killed_mid_load_only_its_streams_fail(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    m1 = await lab.start_test_model(token_delay=0.02)
    m2 = await lab.start_test_model(token_delay=0.02)
    rb = await lab.start_broker()
    c1 = await lab.start_connector([rb], m1.url, connector={"name": "one"})
    await lab.start_connector([rb], m2.url, connector={"name": "two"})
    results: list[str] = []
    async with lab.client() as client:

        async def one(i: int) -> None:
            text = ""
            try:
                async with client.stream(
                    "POST",
                    rb.url + CHAT,
                    json=body("count to 40"),
                    headers={"Authorization": f"Bearer {lab.api_key}"},
                ) as r:
                    if r.status_code != 200:
                        # lost with its connector before the response head: a clean 502
                        results.append("aborted" if r.status_code == 502 else f"{r.status_code}")
                        return
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                results.append("ok" if text == " ".join(map(str, range(1, 41))) else "corrupt")
            except httpx.HTTPError:
                results.append("aborted")

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
            with trio.fail_after(10):  # spread over both
                while not (m1.model.active_streams and m2.model.active_streams):
                    await trio.sleep(0.01)
            on_two = m2.model.active_streams
            await c1.kill()
        assert len(results) == 20  # each request ended
        assert set(results) <= {"ok", "aborted"}, results  # none truncated, no other errors
        # only streams that were on the killed connector failed (a stream its LLM had just
        # finished may still have been in transit); every stream on the survivor completed
        assert 1 <= results.count("aborted") <= 20 - on_two
        assert results.count("ok") >= on_two
        for _ in range(10):  # later requests all go to the survivor
            assert await get_models(client, rb.url, lab.api_key) == 200


async def test_no_reconnect_storm_after_a_broker_restart(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    model = await lab.start_test_model()
    rb = await lab.start_broker()
    n = 12
    for i in range(n):
        await lab.start_connector([rb], model.url, connector={"name": f"c{i}"})
    host, port = rb.host, rb.port
    await rb.stop()
    await trio.sleep(60)  # down for a minute: every connector's backoff is at its cap
    rb = await lab.start_broker(f"{host}:{port}")
    seen: dict[str, float] = {}
    t0 = trio.current_time()
    with trio.fail_after(15):
        while len(seen) < n:
            for relay in rb.broker.registry.relays():
                seen.setdefault(relay.name, trio.current_time() - t0)
            await trio.sleep(0.005)
    times = sorted(seen.values())
    assert times[-1] <= 8 + 0.1  # all back within the backoff cap (the 30 s promise: kept)
    assert times[-1] - times[0] > 0.15  # spread out by jitter, not a thundering herd


async def test_connector_capacity_is_respected_and_extra_requests_queue(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    model = await lab.start_test_model(token_delay=0.02)
    rb = await lab.start_broker(broker={"queue_timeout": "20s"})
    await lab.start_connector([rb], model.url, connector={"max_concurrent": 2})
    peak = 0
    statuses: list[int] = []
    async with lab.client() as client:

        async def one() -> None:
            r = await client.post(
                rb.url + CHAT,
                json=body("count to 15", stream=True),
                headers={"Authorization": f"Bearer {lab.api_key}"},
            )
            statuses.append(r.status_code)

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, model.model.active_streams)
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as inner:
                for _ in range(6):
                    inner.start_soon(one)
            nursery.cancel_scope.cancel()
    assert statuses == [200] * 6
    assert peak == 2


async def test_full_queue_answers_503_at_once(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    model = await lab.start_test_model(token_delay=0.05)
    rb = await lab.start_broker(broker={"queue_timeout": "20s", "max_queue": 2})
    # the connector takes 1 at its LLM + 1 in its own queue; the broker queues 2 more
    await lab.start_connector([rb], model.url, connector={"max_concurrent": 1, "max_queue": 1})
    statuses: list[int] = []
    refused_after: list[float] = []
    async with lab.client() as client:

        async def one() -> None:
            t0 = trio.current_time()
            r = await client.post(
                rb.url + CHAT,
                json=body("count to 10"),
                headers={"Authorization": f"Bearer {lab.api_key}"},
            )
            statuses.append(r.status_code)
            if r.status_code == 503:
                refused_after.append(trio.current_time() - t0)
                assert "waiting" in r.json()["error"]["message"]
                assert r.headers["retry-after"]

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one)
                await trio.sleep(0.02)
    assert sorted(statuses) == [200, 200, 200, 200, 503, 503]
    assert max(refused_after) < 0.01  # at once: not after the queue_timeout (20 s)


async def test_routes_by_path_prefix_and_by_host(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    ma, mb = await lab.start_test_model(), await lab.start_test_model()
    rb = await lab.start_broker(broker={"route_domain": "example.com", "queue_timeout": "300ms"})
    await lab.start_connector([rb], ma.url, connector={"route": "a", "name": "ca"})
    await lab.start_connector([rb], mb.url, connector={"route": "b", "name": "cb"})
    auth = {"Authorization": f"Bearer {lab.api_key}"}
    async with lab.client() as client:
        r = await client.get(rb.url + "/r/a/v1/models?x=1", headers=auth)
        assert r.status_code == 200
        seen = [q for q in ma.model.requests if q.header("x-request-id")]
        assert seen[-1].path == "/v1/models" and seen[-1].query == "x=1"
        r = await client.get(rb.url + "/r/b/v1/models", headers=auth)
        assert r.status_code == 200
        assert [q for q in mb.model.requests if q.header("x-request-id")]
        n_b = len(mb.model.requests)
        r = await client.get(rb.url + "/v1/models", headers={**auth, "Host": "b.example.com"})
        assert r.status_code == 200 and len(mb.model.requests) == n_b + 1
        r = await client.get(rb.url + "/r/nope/v1/models", headers=auth)
        assert r.status_code == 503  # nobody serves that route
        r = await client.get(rb.url + "/v1/models", headers=auth)
        assert r.status_code == 503  # and nobody serves the default route here


async def test_draining_connector_gets_no_new_requests_and_finishes_in_flight(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    m1 = await lab.start_test_model(token_delay=0.02)
    m2 = await lab.start_test_model(token_delay=0.02)
    rb = await lab.start_broker()
    c1 = await lab.start_connector([rb], m1.url, connector={"name": "one"})
    auth = {"Authorization": f"Bearer {lab.api_key}"}
    async with lab.client() as client:
        text: list[str] = []

        async def long_stream() -> None:
            async with client.stream(
                "POST", rb.url + CHAT, json=body("count to 60"), headers=auth
            ) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        text.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_stream)
            await trio.sleep(0.2)
            assert text  # streaming from the first connector's LLM
            await lab.start_connector([rb], m2.url, connector={"name": "two"})
            nursery.start_soon(c1.drain)
            await trio.sleep(0.1)
            before = len(m1.model.requests)
            for _ in range(5):
                assert await get_models(client, rb.url, lab.api_key) == 200
            assert len(m1.model.requests) == before  # nothing new reached the draining one
        assert "".join(text) == " ".join(map(str, range(1, 61)))  # the stream completed
    assert c1.connector.relays == {}


async def test_broker_killed_mid_stream_makes_the_connector_cancel_the_llm_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    async with memory_upstream(net) as (app, url), open_bridge(url, network=net) as b:
        async with b.client() as client, trio.open_nursery() as nursery:

            async def stream() -> None:
                try:
                    async with client.stream(
                        "GET",
                        b.base_url + "/forever",
                        headers={"Authorization": f"Bearer {b.api_key}"},
                    ) as r:
                        async for _ in r.aiter_raw():
                            pass
                except httpx.HTTPError:
                    pass

            nursery.start_soon(stream)
            await app.forever_started.wait()
            t0 = trio.current_time()
            await b.running_broker.stop()
            with trio.fail_after(5):
                await app.disconnected.wait()
            assert app.disconnect_time is not None and app.disconnect_time - t0 < 0.1


async def test_a_hung_llm_times_out_and_frees_its_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    async with (
        memory_upstream(net) as (_, url),
        open_bridge(
            url,
            connector={"max_concurrent": 1},
            limits={"first_byte_timeout": "300ms"},
            network=net,
        ) as b,
        b.client() as client,
    ):
        auth = {"Authorization": f"Bearer {b.api_key}"}
        t0 = trio.current_time()
        r = await client.get(b.base_url + "/slow-head?s=3600", headers=auth)  # hung for an hour
        assert r.status_code == 504
        assert trio.current_time() - t0 == pytest.approx(0.3)  # at first_byte_timeout
        t0 = trio.current_time()
        r = await client.get(b.base_url + "/sse", headers=auth)  # the only slot is free again
        assert r.status_code == 200 and trio.current_time() - t0 < 0.1


async def test_connector_run_reports_started_once_a_relay_is_up(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    model = await lab.start_test_model()
    rb = await lab.start_broker()
    config = lab.config(connector={"broker_urls": [rb.relay_url], "local_url": model.url})
    connector = Connector(config, keys=lab.keys, token=lab.token, network=lab.network)
    with trio.fail_after(10):
        await lab.nursery.start(connector.run)
    assert connector.relays and rb.broker.registry.connectors()
    # and a connector stopped before any relay came up still reports started (and returns)
    lonely = Connector(
        lab.config(
            connector={"broker_urls": ["ws://127.0.0.1:9/_bridge/relay"], "local_url": model.url}
        ),
        keys=lab.keys,
        token=lab.token,
        network=lab.network,
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            nursery.start_soon(_stop_soon, lonely)
            await nursery.start(lonely.run)
    assert not lonely.relays
    connector.stop()


async def _stop_soon(connector: object) -> None:
    await trio.sleep(0.3)
    connector.stop()  # type: ignore[attr-defined]


# -- a faulty network between connector and broker (tests/faultproxy.py in memory) ----------


class FaultyLink:
    """The connector's :class:`~trio_bridge._net.Network`: streams it dials to ``port`` (the
    broker's) go through this link, the others straight through ``network``.
    ``blackhole()``: no byte moves either way any more and nothing closes (a silent network);
    ``cut()``: every stream through it ends, on both sides (like ``ss -K``)."""

    def __init__(self, network: MemoryNetwork, port: int) -> None:
        self.network, self.port = network, port
        self.flowing = trio.Event()
        self.flowing.set()
        self.streams: set[LinkStream] = set()

    async def open_listeners(self, host: str, port: int) -> list[Listener]:
        return await self.network.open_listeners(host, port)

    async def open_stream(self, host: str, port: int) -> trio.abc.Stream:
        stream = await self.network.open_stream(host, port)
        if port != self.port:
            return stream
        linked = LinkStream(stream, self)
        self.streams.add(linked)
        return linked

    def blackhole(self) -> None:
        self.flowing = trio.Event()

    def restore(self) -> None:
        self.flowing.set()

    async def cut(self) -> None:
        for stream in list(self.streams):
            await stream.cut()
        self.streams.clear()


class LinkStream(trio.abc.Stream):
    def __init__(self, inner: trio.abc.HalfCloseableStream, link: FaultyLink) -> None:
        self.inner, self.link = inner, link
        self.broken = False
        self.receiving = trio.CancelScope()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken:
            raise trio.BrokenResourceError("connection cut")
        if self.link.flowing.is_set():
            await self.inner.send_all(data)
        else:
            await trio.lowlevel.checkpoint()  # lost in the black hole

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        with trio.CancelScope() as self.receiving:
            if not self.broken:
                await self.link.flowing.wait()
                data = await self.inner.receive_some(max_bytes)
                await self.link.flowing.wait()  # what arrived meanwhile waits for the link
                return data
        await trio.lowlevel.checkpoint()
        return b""  # cut: the end of the connection, as after a FIN

    async def cut(self) -> None:
        self.broken = True
        self.receiving.cancel()
        await self.inner.send_eof()  # the broker's side ends too

    async def aclose(self) -> None:
        self.link.streams.discard(self)
        await self.inner.aclose()


async def start_linked_connector(
    lab: Lab, rb: RunningBroker, upstream_url: str, **relay: str
) -> tuple[Connector, FaultyLink]:
    """A connector whose relay to ``rb`` goes through a :class:`FaultyLink`."""
    assert isinstance(lab.network, MemoryNetwork)
    link = FaultyLink(lab.network, rb.port)
    config = lab.config(
        connector={"broker_urls": [rb.relay_url], "local_url": upstream_url}, relay=relay
    )
    connector = Connector(config, keys=lab.keys, token=lab.token, network=link)
    with trio.fail_after(10):
        await lab.nursery.start(connector.run)
        await registered(rb)
    return connector, link


async def test_black_holed_relay_is_detected_by_pings_and_redialled(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    model = await lab.start_test_model(token_delay=0.02)
    rb = await lab.start_broker(relay={"ping_interval": "500ms"})
    connector, link = await start_linked_connector(lab, rb, model.url, ping_interval="500ms")
    async with lab.client() as client:
        outcome: list[str] = []

        async def in_flight() -> None:
            try:
                async with client.stream(
                    "POST",
                    rb.url + CHAT,
                    json=body("count to 1000"),
                    headers={"Authorization": f"Bearer {lab.api_key}"},
                ) as r:
                    async for _ in r.aiter_raw():
                        pass
                outcome.append("complete")
            except httpx.HTTPError:
                outcome.append("aborted")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_flight)
            await trio.sleep(0.3)
            assert model.model.active_streams == 1
            link.blackhole()
            t0 = trio.current_time()
            with trio.fail_after(5):
                while rb.broker.registry.relays() or connector.relays:
                    await trio.sleep(0.02)
            detected = trio.current_time() - t0
        assert outcome == ["aborted"]  # a clean error, not a hang and not a fake success
        assert 2 * 0.5 <= detected <= 3 * 0.5  # 2 to 3 ping intervals of 0.5 s
        await link.cut()
        link.restore()
        with trio.fail_after(10):
            while await get_models(client, rb.url, lab.api_key) != 200:
                await trio.sleep(0.05)
        assert model.model.active_streams == 0  # the black-holed stream's LLM call ended


async def test_a_reset_relay_connection_is_redialled(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    model = await lab.start_test_model()
    rb = await lab.start_broker()
    connector, link = await start_linked_connector(lab, rb, model.url)
    async with lab.client() as client:
        assert await get_models(client, rb.url, lab.api_key) == 200
        await link.cut()  # the relay's connection ends under it, on both sides
        with trio.fail_after(10):
            while connector.relay_states[rb.relay_url]["reconnects"] < 1:
                await trio.sleep(0.05)
        assert await get_models(client, rb.url, lab.api_key) == 200


async def test_a_draining_broker_tells_its_connectors_and_refuses_new_relays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Shutdown is written down (stop accepting → tell the peer → drain): a draining broker
    sends each connector GOAWAY (it logs the broker's reason, not a lost connection) and
    answers a relay dialled meanwhile with 503, so a load balancer's other brokers get it."""
    async with open_bridge(network=MemoryNetwork()) as b:
        [relay] = list(b.connector.relays.values())
        statuses = []

        async def slow_request() -> None:  # keeps the drain going
            async with b.client(timeout=60) as client:
                r = await client.post(
                    b.base_url + "/v1/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": "wait 10 s"}]},
                    headers={"Authorization": f"Bearer {b.api_key}"},
                )
                statuses.append(r.status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_request)
            with trio.fail_after(5):
                while not b.broker.in_flight:
                    await trio.sleep(0.01)
            nursery.start_soon(partial(b.broker.drain, grace=30))
            with trio.fail_after(5):
                while relay.peer_goaway is None:
                    await trio.sleep(0.01)
            assert relay.peer_goaway == "broker draining"
            async with b.client() as client:
                r = await client.get(
                    b.base_url + "/_bridge/relay",
                    headers={
                        "Authorization": f"Bearer {b.lab.token}",
                        "Connection": "Upgrade",
                        "Upgrade": "websocket",
                        "Sec-WebSocket-Version": "13",
                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                    },
                )
            assert r.status_code == 503 and r.headers["retry-after"]
            assert "draining" in r.json()["error"]["message"]
            # a request without a body is refused too, and its connection closed: a client
            # that retries on its pooled connection must reach another broker, not this one
            async with b.client() as client:
                r = await client.get(
                    b.base_url + "/v1/models", headers={"Authorization": f"Bearer {b.api_key}"}
                )
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.headers["connection"] == "close"
        assert statuses == [200]  # the request in flight was finished

"""The whole bridge in one process without a socket (trio_bridge.testing.MemoryNetwork), on
trio's autojump clock: the fault paths run in no real time and the same way every run."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing

from trio_bridge._net import listener_address
from trio_bridge.testing import MemoryNetwork, open_bridge

CHAT = "/v1/chat/completions"


def chat(prompt: str = "count to 3", *, stream: bool = False) -> dict[str, object]:
    return {
        "model": "trio-bridge-test-model",
        "stream": stream,
        "messages": [{"role": "user", "content": prompt}],
    }


async def test_a_bridge_in_memory_answers_and_streams(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    async with open_bridge(network=net, broker={"admin_listen": ""}) as b:
        auth = {"Authorization": f"Bearer {b.api_key}"}
        async with b.client() as client:
            r = await client.post(b.base_url + CHAT, json=chat(), headers=auth)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "1 2 3"
            events = []
            async with client.stream(
                "POST", b.base_url + CHAT, json=chat("count to 5", stream=True), headers=auth
            ) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[6:]))
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
            assert text.split() == ["1", "2", "3", "4", "5"]
            r = await client.post(b.base_url + CHAT, json=chat(), headers={})
            assert r.status_code == 401
    assert ("127.0.0.1", b.running_broker.port) not in net.listening  # all closed


async def test_an_hour_of_reconnect_backoff_passes_in_no_real_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The broker is gone for ten virtual minutes: the connector keeps dialling with backoff
    and is back within its backoff's cap of the broker's return."""
    started = time.monotonic()
    async with open_bridge(network=MemoryNetwork()) as b:
        t0 = trio.current_time()
        await b.restart_broker(down_for=600)
        back = trio.current_time() - t0
        assert 600 <= back <= 600 + 31  # the backoff's cap (30 s) plus the dial
        state = next(iter(b.connector.relay_states.values()))
        assert state["reconnects"] == 1 and state["state"] == "connected"
        async with b.client() as client:
            r = await client.post(
                b.base_url + CHAT, json=chat(), headers={"Authorization": f"Bearer {b.api_key}"}
            )
            assert r.status_code == 200
    assert time.monotonic() - started < 10  # real seconds


async def test_the_documented_memory_example_runs_as_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    page = (Path(__file__).parent.parent / "docs" / "testing.md").read_text()
    section = page.split("**No sockets, no waiting:**", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), "docs/testing.md", "exec"), namespace)
    started = time.monotonic()
    await namespace["test_my_client_rides_out_an_outage"](autojump_clock)
    assert time.monotonic() - started < 10


async def test_a_client_that_leaves_while_queued_gives_its_place_up_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """(From an outside review.) A request queued at the broker whose client leaves is gone
    from the queue at once and never reaches a connector."""
    async with open_bridge(
        network=MemoryNetwork(),
        connector={"max_concurrent": 1, "max_queue": 1},
        broker={"queue_timeout": "30s"},
    ) as b:
        auth = {"Authorization": f"Bearer {b.api_key}"}
        async with b.client() as client, trio.open_nursery() as nursery:
            for _ in range(2):  # the connector's capacity (1 slot + 1 queued) is taken
                nursery.start_soon(
                    lambda: client.post(b.base_url + CHAT, json=chat("wait 5 s"), headers=auth)
                )
            await trio.sleep(0.5)
            with trio.move_on_after(1):  # queued at the broker, then the client gives up
                await client.post(b.base_url + CHAT, json=chat("hi"), headers=auth)
            await trio.sleep(0.01)
            assert b.broker.registry.queued == 0
        assert b.model is not None
        posts = [r for r in b.model.requests if r.method == "POST"]
        assert len(posts) == 2  # the third never reached the LLM


async def test_a_stream_cut_by_a_lost_relay_says_so_on_the_connector(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """(From an outside review.) The broker crashes mid-stream: the connector's request ends
    with outcome relay_lost (it said "cancelled")."""
    async with open_bridge(network=MemoryNetwork(), token_delay=0.5) as b:
        auth = {"Authorization": f"Bearer {b.api_key}"}
        async with b.client() as client, trio.open_nursery() as nursery:

            async def stream() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    await client.post(
                        b.base_url + CHAT, json=chat("count to 100", stream=True), headers=auth
                    )

            nursery.start_soon(stream)
            await trio.sleep(3)
            await b.running_broker.stop()  # a crash
        await trio.sleep(1)
        outcomes = [r["outcome"] for r in b.connector.inspector.recent(10)]
    assert outcomes == ["relay_lost"]


async def test_a_kept_alive_connection_the_server_closed_is_seen_as_on_tcp(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """(From an outside review.) Past the broker's keep-alive timeout, the client's idle
    connection is closed by the broker; the next request (a streamed body, which cannot be
    sent twice) goes on a new connection in memory as on TCP."""
    async with open_bridge(network=MemoryNetwork()) as b, b.client() as client:
        auth = {"Authorization": f"Bearer {b.api_key}"}
        r1 = await client.post(b.base_url + CHAT, json=chat(), headers=auth)
        await trio.sleep(16)  # the broker's keep_alive_timeout is 15 s

        async def upload() -> AsyncIterator[bytes]:
            yield b'{"model": "m", "messages": [{"role": "user", "content": "'
            yield b'hello"}]}'

        r2 = await client.post(b.base_url + CHAT, content=upload(), headers=auth)
    assert (r1.status_code, r2.status_code) == (200, 200)


async def test_closing_a_listener_ends_the_connections_it_had_not_accepted() -> None:
    net = MemoryNetwork()
    [listener] = await net.open_listeners("127.0.0.1", 0)
    client = await net.open_stream(*listener_address(listener))
    await listener.aclose()
    with trio.fail_after(1):
        assert await client.receive_some(10) == b""  # the end, not a hang

"""The whole bridge in one process without a socket (trio_bridge.testing.MemoryNetwork), on
trio's autojump clock: the fault paths run in no real time and the same way every run."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import trio
import trio.testing

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

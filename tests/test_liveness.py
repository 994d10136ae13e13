"""What relays cost at rest: the broker's look at its connectors' tokens goes through them only
when something changed (the tokens file, or a token's expiry passing)."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import trio
import trio.testing

from trio_bridge.testing import MemoryNetwork, open_lab


def iso(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_a_token_whose_expiry_passes_closes_its_relay_without_a_file_change(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    wall = [time.time()]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    async with open_lab(network=MemoryNetwork()) as lab:
        rb = await lab.start_broker()
        model = await lab.start_test_model()
        entry, token = lab.tokens.add("short", routes=("*",), expires=iso(wall[0] + 30))
        await lab.start_connector([rb], model.url, token=token)
        await trio.sleep(5)  # five looks at the tokens: nothing changed, the relay stays
        ids = [h.token_id for h in rb.broker.registry.connectors()]
        assert ids == [entry.id]
        wall[0] += 60  # its expiry passed; the file did not change
        await trio.sleep(2)
        assert entry.id not in [h.token_id for h in rb.broker.registry.connectors()]

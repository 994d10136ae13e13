"""A key's budget and its usage across its secrets (limits count under the key's name:
``accounts._keys.budget``): what a rotation, a revocation or an expiry may not change. An
outside review's reproductions, each failing first (tests/test_limits.py and
tests/test_pool.py hold the budgets themselves)."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing
from conftest import usage_summary_read

from trio_bridge._config import PortalConfig, structure
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.accounts._limits import Limiter
from trio_bridge.accounts._users import ACTIVE
from trio_bridge.testing import Lab, MemoryNetwork, open_lab

CHAT = "/v1/chat/completions"


def chat() -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "count to 3"}]}


def _iso(t: float) -> str:
    return (
        dt.datetime.fromtimestamp(t, dt.UTC)
        .replace(microsecond=0)
        .isoformat()
        .replace("+00:00", "Z")
    )


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with open_lab(network=MemoryNetwork()) as lab:
        yield lab


async def start(lab: Lab, clock: trio.testing.MockClock, **connector: object):  # type: ignore[no-untyped-def]
    model = await lab.start_test_model(token_delay=0.001)
    rb = await lab.start_broker()
    rc = await lab.start_connector([rb], model.url, connector=dict(connector))
    await usage_summary_read(rc.connector, clock)
    return rb.url, lab.client(), rc


# -- F: the portal's Rotate / Create drop an operator-set expiry --------------------------------


def _portal(lab: Lab):  # type: ignore[no-untyped-def]
    from trio_bridge.connector._portal import Portal

    conf = lab.config(connector={"broker_urls": ["ws://127.0.0.1:9/x"], "local_url": "http://x"})
    pc = structure(
        {
            "enabled": True,
            "public_url": "http://127.0.0.1:9/",
            "issuer": "http://127.0.0.1:9/",
            "client_id": "c",
            "allowed_domains": ["example.com"],
        },
        PortalConfig,
        source="portal",
    )
    conf = attrs.evolve(conf, portal=pc)
    return Portal(
        conf, keys=lab.keys, limiter=Limiter(), usage_store=None, models=lambda: (), oidc=object()
    )


async def test_portal_rotate_keeps_the_operators_expiry(lab: Lab) -> None:
    """The operator gives a portal user's key an end (`keys set u1-… --expires 7d`, a trial);
    the user presses Rotate: the new secret must not outlive that end."""
    p = _portal(lab)
    user, _ = p.users.sign_in("sub-1", "eve@example.com", "Eve", (), ACTIVE)
    p.change_key(user, "create")
    end = _iso(time.time() + 7 * 86400)
    lab.keys.set_limits(user.key_name, {"expires": end})
    p.change_key(user, "rotate")
    current = p.current_key(user)
    assert current is not None
    assert current.expires == end, f"rotated key expires {current.expires!r}, not {end!r}"


async def test_portal_create_after_expiry_is_refused(lab: Lab) -> None:
    """The key's end passed: the user's page offers Create (no usable key), which made a
    key that never expires (the operator's end meant nothing for portal users). Neither
    Create nor Rotate makes one now; the operator extends the key; a revoke still works."""
    p = _portal(lab)
    user, _ = p.users.sign_in("sub-1", "eve@example.com", "Eve", (), ACTIVE)
    p.change_key(user, "create")
    lab.keys.set_limits(user.key_name, {"expires": _iso(time.time() - 1)})
    assert p.current_key(user) is None and p.ended_key(user) is not None
    assert p.change_key(user, "create") is None and p.change_key(user, "rotate") is None
    assert [e for e in lab.keys.entries() if e.usable() and e.name == user.key_name] == []
    lab.keys.set_limits(user.key_name, {"expires": ""})  # the operator extends it
    assert p.ended_key(user) is None and p.current_key(user) is not None
    assert p.change_key(user, "revoke") is not None and p.ended_key(user) is None
    assert p.change_key(user, "create") is not None  # after a revoke: a new key


# -- F: /_bridge/usage after f7a52fb ---------------------------------------------------------


async def test_self_service_by_day_has_one_row_per_day_and_model_after_a_rotation(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """`by_day` drops the key id, and now holds a row per secret of the name: after a
    rotation, two rows for the same day and model, indistinguishable (a client that reads
    'today's row for model m' gets half)."""
    _, key = lab.keys.add("alice")
    url, client, _ = await start(lab, autojump_clock, usage_flush_interval="100ms")
    async with client:
        r = await client.post(url + CHAT, json=chat(), headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        _, new, _ = lab.keys.rotate("alice", 0)
        await trio.sleep(1)
        auth = {"Authorization": f"Bearer {new}"}
        assert (await client.post(url + CHAT, json=chat(), headers=auth)).status_code == 200
        doc = (await client.get(url + "/_bridge/usage", headers=auth)).json()
    assert doc["today"]["requests"] == 2
    seen = Counter((r["day"], r["model"]) for r in doc["by_day"])
    assert all(n == 1 for n in seen.values()), doc["by_day"]


async def test_self_service_usage_does_not_show_a_previous_holders_usage(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """`alice` (one person) is revoked; the operator gives the name to someone else. The new
    holder's /_bridge/usage now shows the previous holder's 30 days (f7a52fb sums every
    entry of the name, revoked ones included)."""
    _, first = lab.keys.add("alice")
    url, client, _ = await start(lab, autojump_clock, usage_flush_interval="100ms")
    async with client:
        for _ in range(3):
            r = await client.post(
                url + CHAT, json=chat(), headers={"Authorization": f"Bearer {first}"}
            )
            assert r.status_code == 200
        lab.keys.revoke("alice")
        _, second = lab.keys.add("alice")
        await trio.sleep(1)
        doc = (
            await client.get(url + "/_bridge/usage", headers={"Authorization": f"Bearer {second}"})
        ).json()
    assert doc["last_30_days"]["requests"] == 0, doc["last_30_days"]


async def test_self_service_usage_does_not_scan_every_key(
    lab: Lab, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/_bridge/usage (any key, not limited by tokens) listed and sorted every entry of the
    keys store on the event loop to find the key's secrets (~10 ms at 20 000 keys,
    measured): an index by name now."""
    _, key = lab.keys.add("alice")
    url, client, _ = await start(lab, autojump_clock)
    calls = []
    real = SecretStore.entries

    def spy(self: SecretStore) -> list:  # type: ignore[type-arg]
        calls.append(1)
        return real(self)

    monkeypatch.setattr(SecretStore, "entries", spy)
    async with client:
        for _ in range(5):
            r = await client.get(url + "/_bridge/usage", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
    assert not calls, f"{len(calls)} full scans of the keys store for 5 usage requests"

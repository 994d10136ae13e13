"""Trust between tenants: tokens bound to routes, nothing secret crosses to another connector,
tokens rotate without a restart. Each test plays the attacker: against real sockets where it
is about what crosses them (paths, headers, keys, a forged broker); in memory on the autojump
clock where it is about refusals, retries and rotations over time."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio.testing
from conftest import memory_upstream
from trio_websocket import ConnectionClosed, serve_websocket
from upstream import Upstream, run_upstream

from trio_bridge import Connector
from trio_bridge._backoff import Backoff
from trio_bridge.relay._frames import FLAG_END_STREAM, FrameDecoder, FrameType, encode_frame
from trio_bridge.relay._protocol import RequestHead, Session
from trio_bridge.testing import Lab, MemoryNetwork, RunningBroker, open_lab


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    """A lab in memory, for tests on the autojump clock."""
    async with open_lab(network=MemoryNetwork()) as lab:
        yield lab


@pytest.fixture
async def tcp_lab() -> AsyncIterator[Lab]:
    async with open_lab() as lab:
        yield lab


@pytest.fixture
async def up() -> AsyncIterator[tuple[Upstream, str]]:
    async with run_upstream() as pair:
        yield pair


def refused(rb: RunningBroker, reason: str) -> float:
    v = rb.broker.metrics.registry.get_sample_value(
        "trio_bridge_relays_refused_total", {"role": "broker", "reason": reason}
    )
    return v or 0.0


async def wait_for(predicate: object, seconds: float = 10.0) -> None:
    with trio.fail_after(seconds):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.02)


def last_error(rc_connector: Connector) -> str:
    return str(next(iter(rc_connector.relay_states.values()))["last_error"])


async def test_a_token_for_route_a_cannot_serve_route_b(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        memory_upstream(lab.network) as (alice_llm, alice_url),
        memory_upstream(lab.network) as (bob_llm, bob_url),
    ):
        _, alice_token = lab.tokens.add("alice", routes=("alice",))
        _, bob_token = lab.tokens.add("bob", routes=("bob",))
        rb = await lab.start_broker()
        await lab.start_connector(
            [rb], alice_url, connector={"route": "alice", "name": "alice"}, token=alice_token
        )
        # Bob's connector claims Alice's route.
        thief = await lab.start_connector(
            [rb],
            bob_url,
            connector={"route": "alice", "name": "thief"},
            token=bob_token,
            wait=False,
        )
        await wait_for(lambda: refused(rb, "route_not_allowed") >= 1)
        await wait_for(lambda: "not allowed" in last_error(thief.connector))
        error = last_error(thief.connector)
        assert "route 'alice' is not allowed" in error and "bob" in error
        assert bob_token not in error
        assert [r.name for r in rb.broker.registry.relays("alice")] == ["alice"]
        async with lab.client() as client:
            for _ in range(5):
                r = await client.get(
                    rb.url + "/r/alice/headers",
                    headers={"Authorization": f"Bearer {lab.api_key}"},
                )
                assert r.status_code == 200
        assert len(alice_llm.forwarded()) == 5
        assert bob_llm.forwarded() == []  # none of Alice's users' requests reached Bob
        # and the refusal is retried slowly (5-60 s), not in a loop
        state = next(iter(thief.connector.relay_states.values()))
        assert state["next_attempt_in"] >= 5.0
        before = refused(rb, "route_not_allowed")
        await trio.sleep(600)
        retries = refused(rb, "route_not_allowed") - before
        assert 600 / 60 <= retries <= 600 / 5, retries
        assert [r.name for r in rb.broker.registry.relays("alice")] == ["alice"]


async def test_a_token_written_before_route_binding_serves_the_default_route_only(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    # A tokens file as the previous release wrote it: no "routes" key.
    _, legacy_token = lab.tokens.add("legacy")
    text = (lab.dir / "tokens.toml").read_text()
    assert "routes" not in text.split("legacy")[1].split("[[keys]]")[0]
    rb = await lab.start_broker()
    model = await lab.start_test_model()
    ok = await lab.start_connector([rb], model.url, token=legacy_token)
    assert [r.route for r in rb.broker.registry.relays()] == ["default"]
    other = await lab.start_connector(
        [rb],
        model.url,
        connector={"route": "gpu1", "name": "other"},
        token=legacy_token,
        wait=False,
    )
    await wait_for(lambda: "not allowed" in last_error(other.connector))
    assert "may serve: default" in last_error(other.connector)
    assert ok.connector.relays


async def test_glob_routes_and_changing_them_closes_relays_no_longer_allowed(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    _, token = lab.tokens.add("team", routes=("team-*",))
    rb = await lab.start_broker()
    model = await lab.start_test_model()
    rc = await lab.start_connector(
        [rb], model.url, connector={"route": "team-a", "name": "a"}, token=token
    )
    assert [r.route for r in rb.broker.registry.relays()] == ["team-a"]
    lab.tokens.set_routes("team", ("team-b",))
    await wait_for(lambda: refused(rb, "route_not_allowed") >= 1)
    assert rb.broker.registry.relays() == []
    # the connector learns why: first the GOAWAY of the closed relay, then the refused hello
    await wait_for(lambda: "not allowed" in last_error(rc.connector))


async def test_a_wrong_relay_path_reaches_no_connector(
    tcp_lab: Lab, up: tuple[Upstream, str]
) -> None:
    app, url = up
    rb = await tcp_lab.start_broker()
    await tcp_lab.start_connector([rb], url)  # an honest connector on the default route
    lost = await tcp_lab.start_connector(
        [f"ws://{rb.host}:{rb.port}/wrong/path"],
        url,
        connector={"name": "lost"},
        wait=False,
    )
    await wait_for(lambda: bool(last_error(lost.connector)))
    error = last_error(lost.connector)
    assert "no relay endpoint at this URL" in error and "/_bridge/relay" in error
    assert "token" not in error
    # Variants: a path under the relay path, and a user's own WebSocket upgrade.
    async with httpx.AsyncClient() as client:
        upgrade = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        for path in ("/wrong/path", "/_bridge/relay/x", "/v1/realtime"):
            r = await client.get(
                rb.url + path, headers={**upgrade, "Authorization": f"Bearer {tcp_lab.token}"}
            )
            assert r.status_code == 404, path
            assert "/_bridge/relay" in r.json()["error"]["message"]
        r = await client.get(rb.url + "/_bridge/relay")
        assert r.status_code == 400
    assert app.forwarded() == []  # nothing, and no token, reached any connector


async def test_a_connector_token_sent_as_an_api_key_is_never_forwarded(
    tcp_lab: Lab, up: tuple[Upstream, str]
) -> None:
    app, url = up
    rb = await tcp_lab.start_broker()
    rc = await tcp_lab.start_connector([rb], url)
    async with httpx.AsyncClient() as client:
        for header in ("Authorization", "x-api-key"):
            value = f"Bearer {tcp_lab.token}" if header == "Authorization" else tcp_lab.token
            r = await client.post(rb.url + "/v1/chat/completions", headers={header: value})
            assert r.status_code == 401
            assert tcp_lab.token not in r.text
            assert "connector token" in r.json()["error"]["message"]
    assert app.forwarded() == []
    requests = rc.connector.metrics.registry.get_sample_value(
        "trio_bridge_requests_total",
        {"role": "connector", "route": "default", "status_class": "4xx", "outcome": "refused"},
    )
    assert not requests  # it never reached the connector either


SPOOFED = {
    "X-Forwarded-For": "6.6.6.6",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "gopher",
    "X-Forwarded-Port": "1",
    "X-Forwarded-User": "admin",
    "Forwarded": "for=6.6.6.6;host=evil.example",
    "X-Real-IP": "6.6.6.6",
    "True-Client-IP": "6.6.6.6",
    "X-Trio-Bridge-Route": "admin",
    "X-Trio-Bridge-Key-Id": "root",
}


@pytest.mark.parametrize("trusted", [False, True])
async def test_spoofed_forwarding_and_bridge_headers_are_stripped(
    tcp_lab: Lab, up: tuple[Upstream, str], trusted: bool
) -> None:
    app, url = up
    rb = await tcp_lab.start_broker(broker={"trusted_proxies": ["127.0.0.0/8"] if trusted else []})
    await tcp_lab.start_connector([rb], url)
    async with httpx.AsyncClient() as client:
        r = await client.get(
            rb.url + "/headers", headers={"Authorization": f"Bearer {tcp_lab.api_key}", **SPOOFED}
        )
        assert r.status_code == 200
    seen = dict(app.forwarded()[-1]["headers"])
    # the bridge's own namespace: from nobody, not even a trusted proxy
    assert not [k for k in seen if k.startswith("x-trio-bridge-")]
    if trusted:
        assert seen["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
        assert seen["x-forwarded-host"] == "evil.example"
        assert seen["forwarded"] == "for=6.6.6.6;host=evil.example"
    else:
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        for name in SPOOFED:
            if name.lower() not in ("x-forwarded-for", "x-forwarded-proto"):
                assert name.lower() not in seen, name


async def test_a_rotated_token_is_picked_up_from_the_file_without_a_restart(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    entry, token = lab.tokens.add("home", routes=("default",))
    token_file = lab.dir / "connector.token"
    token_file.write_text(token + "\n")
    os.chmod(token_file, 0o600)
    rb = await lab.start_broker()
    model = await lab.start_test_model()
    config = lab.config(
        connector={
            "broker_urls": [rb.relay_url],
            "local_url": model.url,
            "name": "home",
            "token_file": "connector.token",
        }
    )
    connector = Connector(config, keys=lab.keys, network=lab.network)  # token: from the file
    lab.nursery.start_soon(connector.run)
    await wait_for(lambda: [r.token_id for r in rb.broker.registry.relays()] == [entry.id])

    new_entry, new_token, until = lab.tokens.rotate("home", grace=3600)
    assert until > entry.created
    assert lab.tokens.verify(token) is not None  # the old one still works in the grace period
    tmp = token_file.with_suffix(".new")
    tmp.write_text(new_token + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(token_file)
    await wait_for(lambda: [r.token_id for r in rb.broker.registry.relays()] == [new_entry.id])
    async with lab.client() as client:
        r = await client.get(
            rb.url + "/v1/models", headers={"Authorization": f"Bearer {lab.api_key}"}
        )
        assert r.status_code == 200

    # Grace over: the old secret is refused, and a relay still using it is closed.
    lab.tokens.rotate("home", grace=0)
    assert lab.tokens.verify(new_token) is None
    connector.stop()


def test_refused_dials_are_retried_every_5_to_60_seconds() -> None:
    low = Backoff(base=5.0, cap=60.0, floor=5.0, rand=lambda: 0.0)
    assert {low.next_delay() for _ in range(10)} == {5.0}
    high = Backoff(base=5.0, cap=60.0, floor=5.0, rand=lambda: 1.0)
    assert [high.next_delay() for _ in range(6)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


async def test_a_hostile_broker_cannot_get_past_the_connectors_keys(
    tcp_lab: Lab, up: tuple[Upstream, str]
) -> None:
    """A broker that forges requests for a route the connector never registered, with forged
    bridge headers, no key, or the connector's own token as the key: the LLM sees none."""
    app, url = up
    answers: list[int] = []
    done = trio.Event()

    async def evil_broker(request: object) -> None:
        try:
            ws = await request.accept()  # type: ignore[attr-defined]
            session = Session(opener=True)
            session.receive_data(await ws.get_message())
            session.next_event()
            await ws.send_message(session.send_hello(role="broker"))
            heads = [
                [(b"x-trio-bridge-route", b"other")],
                [(b"authorization", b"Bearer " + tcp_lab.token.encode())],
                [(b"x-api-key", b"tbk_aaaaaaaa_forged")],
            ]
            batch = b""
            for headers in heads:
                head = RequestHead("GET", "/r/other/v1/models", headers, "rid")
                _, frame = session.open_stream(head, end_stream=True)
                batch += frame
            await ws.send_message(batch)
            dec = FrameDecoder()
            with trio.move_on_after(5):
                while len(answers) < len(heads):
                    dec.receive_data(await ws.get_message())
                    while (f := dec.next_frame()) is not None:
                        if f.type is FrameType.RESPONSE:
                            answers.append(int(f.payload.split(b'"status":')[1].split(b",")[0]))
            # then a frame for a stream that was never opened: the connector drops the relay
            await ws.send_message(encode_frame(FrameType.DATA, 999, b"x", FLAG_END_STREAM))
            done.set()
            await trio.sleep_forever()
        except ConnectionClosed:
            done.set()

    async with trio.open_nursery() as nursery:
        listener = await nursery.start(serve_websocket, evil_broker, "127.0.0.1", 0, None)
        await tcp_lab.start_connector(
            [f"ws://127.0.0.1:{listener.port}/_bridge/relay"], url, wait=False
        )
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert answers and all(s == 401 for s in answers), answers
    assert app.forwarded() == []

"""Models across connectors: routing by the request's model, preferred boxes, one merged model
list (the key still checked by a connector), aliases with fallbacks, old connectors beside.
In memory, on the autojump clock."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio.testing
from conftest import memory_upstream

from trio_bridge.relay._frames import FrameDecoder
from trio_bridge.relay._protocol import Session, _decode_hello
from trio_bridge.testing import Lab, MemoryNetwork, RunningBroker, RunningModel, open_lab

CHAT = "/v1/chat/completions"


def chat(model: str, prompt: str = "count to 3", stream: bool = False) -> dict[str, object]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}]}


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    """A lab in memory, for tests on the autojump clock."""
    async with open_lab(network=MemoryNetwork()) as lab:
        yield lab


async def boxes(
    lab: Lab, rb: RunningBroker, spec: dict[str, tuple[tuple[str, ...], int]]
) -> dict[str, RunningModel]:
    """One test model + connector per name: (models it serves, connector priority)."""
    out = {}
    for name, (models, priority) in spec.items():
        out[name] = model = await lab.start_test_model(models=models, token_delay=0.01)
        await lab.start_connector([rb], model.url, connector={"name": name, "priority": priority})
    with trio.fail_after(10):  # each has told the broker its models
        while any(r.models is None for r in rb.broker.registry.connectors()):
            await trio.sleep(0.01)
    return out


def served_by(models: dict[str, RunningModel]) -> dict[str, int]:
    return {
        name: sum(1 for r in m.model.requests if r.method == "POST") for name, m in models.items()
    }


async def test_requests_go_to_a_connector_that_serves_their_model(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    rb = await lab.start_broker()
    models = await boxes(
        lab,
        rb,
        {"big": (("qwen2.5-coder:32b",), 0), "laptop": (("qwen2.5-coder:7b", "nomic"), 0)},
    )
    auth = {"Authorization": f"Bearer {lab.api_key}"}
    async with lab.client() as client:
        for model, n in (("qwen2.5-coder:32b", 3), ("qwen2.5-coder:7b", 2), ("nomic", 1)):
            for _ in range(n):
                r = await client.post(rb.url + CHAT, json=chat(model), headers=auth)
                assert r.status_code == 200, r.text
                assert r.json()["model"] == model
    assert served_by(models) == {"big": 3, "laptop": 3}


async def test_an_unknown_model_is_404_at_once_naming_the_models(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    rb = await lab.start_broker(broker={"queue_timeout": "30s"})
    models = await boxes(lab, rb, {"a": (("m1",), 0), "b": (("m2", "m3"), 0)})
    async with lab.client() as client:
        t0 = trio.current_time()
        r = await client.post(
            rb.url + CHAT, json=chat("gpt-4"), headers={"Authorization": f"Bearer {lab.api_key}"}
        )
        assert trio.current_time() - t0 == 0  # at once: not after the queue_timeout (30 s)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and "m1, m2, m3" in error["message"]
    assert served_by(models) == {"a": 0, "b": 0}


async def test_the_preferred_box_takes_requests_while_it_is_up(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    rb = await lab.start_broker(broker={"queue_timeout": "10s"})
    model_big = await lab.start_test_model(models=("coder",), token_delay=0.01)
    model_small = await lab.start_test_model(models=("coder",), token_delay=0.01)
    big = await lab.start_connector([rb], model_big.url, connector={"name": "big", "priority": 10})
    await lab.start_connector([rb], model_small.url, connector={"name": "small"})
    await lab.start_test_model()  # a third box with another model: routing is on
    other = await lab.start_test_model(models=("embed",))
    await lab.start_connector([rb], other.url, connector={"name": "other"})
    auth = {"Authorization": f"Bearer {lab.api_key}"}
    statuses: list[int] = []
    async with lab.client() as client:

        async def load(n: int) -> None:
            for _ in range(n):
                try:
                    r = await client.post(  # ~0.1 s each at the LLM
                        rb.url + CHAT, json=chat("coder", "count to 10", True), headers=auth
                    )
                    statuses.append(r.status_code if r.text.endswith("[DONE]\n\n") else -2)
                except httpx.HTTPError:  # aborted: it was in flight on the killed box
                    statuses.append(-1)

        await load(5)
        seen = served_by({"big": model_big, "small": model_small})
        assert seen == {"big": 5, "small": 0}  # preferred while it is up
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(load, 10)
            await trio.sleep(0.2)
            await big.kill()  # the big box goes down mid-load
            await trio.sleep(0.5)
            big = await lab.start_connector(
                [rb], model_big.url, connector={"name": "big", "priority": 10}
            )
        seen_during = served_by({"big": model_big, "small": model_small})
        assert seen_during["small"] > 0  # its requests moved
        before = seen_during["big"]
        await load(5)
        assert served_by({"big": model_big, "small": model_small})["big"] == before + 5  # back
    # nothing lost that had not started: only requests in flight on the killed box may fail
    assert statuses.count(200) >= len(statuses) - 4, statuses


async def test_an_alias_falls_back_to_the_next_model_before_the_first_byte(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    rb = await lab.start_broker(
        broker={"aliases": {"coder": ["coder:32b", "coder:7b"], "nothing": ["x", "y"]}}
    )
    models = await boxes(lab, rb, {"big": (("coder:32b",), 0), "small": (("coder:7b",), 0)})
    auth = {"Authorization": f"Bearer {lab.api_key}"}
    async with lab.client() as client:
        r = await client.post(rb.url + CHAT, json=chat("coder"), headers=auth)
        assert r.status_code == 200 and r.json()["model"] == "coder:32b"  # the first choice
        models["big"].stop.cancel()  # the big box's LLM dies; its connector still says "up"
        r = await client.post(rb.url + CHAT, json=chat("coder", stream=True), headers=auth)
        assert r.status_code == 200, r.text
        assert '"model": "coder:7b"' in r.text  # answered by the next candidate
        r = await client.post(rb.url + CHAT, json=chat("nothing"), headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert served_by({"small": models["small"]}) == {"small": 1}


async def test_merged_model_list_needs_a_valid_key(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    rb = await lab.start_broker()
    await boxes(lab, rb, {"a": (("m1", "shared"), 0), "b": (("m2", "shared"), 0)})
    async with lab.client() as client:
        bad = await client.get(rb.url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        assert "m1" not in bad.text and "shared" not in bad.text
        auth = {"Authorization": f"Bearer {lab.api_key}"}
        r = await client.get(rb.url + "/v1/models", headers=auth)
        tags = await client.get(rb.url + "/api/tags", headers=auth)
    assert r.status_code == 200
    data = {m["id"]: m["connectors"] for m in r.json()["data"]}
    assert data == {"m1": ["a"], "m2": ["b"], "shared": ["a", "b"]}
    assert {m["name"] for m in tags.json()["models"]} == {"m1", "m2", "shared"}


async def test_an_old_connector_that_names_no_models_serves_anything(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    rb = await lab.start_broker()
    models = await boxes(lab, rb, {"new": (("m1",), 0)})
    async with memory_upstream(lab.network) as (old_llm, old_url):  # no /v1/models, /api/tags
        await lab.start_connector([rb], old_url, connector={"name": "old"})
        relays = {r.name: r for r in rb.broker.registry.relays()}
        assert relays["old"].models is None and relays["new"].models == ("m1",)
        async with lab.client() as client:
            auth = {"Authorization": f"Bearer {lab.api_key}"}
            r = await client.post(rb.url + "/echo", json=chat("legacy-model"), headers=auth)
            assert r.status_code == 200  # no 404: the old connector may serve it
            assert len(old_llm.forwarded()) == 1
            for _ in range(4):
                r = await client.post(rb.url + CHAT, json=chat("m1"), headers=auth)
                assert r.status_code in (200, 404)  # the old one may get it, and say 404
        assert served_by(models)["new"] >= 1


def test_a_hello_without_models_means_anything_and_with_them_round_trips() -> None:
    s = Session(opener=False)
    frame = s.send_hello(role="connector", models=("a", "b"), priority=3)
    old = Session(opener=False).send_hello(role="connector")
    dec = FrameDecoder()
    dec.receive_data(frame + old)
    new_hello, old_hello = (
        _decode_hello(dec.next_frame().payload),
        _decode_hello(dec.next_frame().payload),
    )  # type: ignore[union-attr]
    assert new_hello.models == ("a", "b") and new_hello.priority == 3
    assert old_hello.models is None and old_hello.priority == 0
    assert b"models" not in old  # the wire format of older releases, byte for byte


async def test_no_fallback_once_the_first_byte_went_out(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """The first candidate's LLM answers a head and a chunk, then dies: the client gets an
    aborted answer; the next candidate is never tried (the client already has bytes)."""
    rb = await lab.start_broker(broker={"aliases": {"coder": ["big", "small"]}})
    async with (
        memory_upstream(lab.network) as (big_llm, big_url),
        memory_upstream(lab.network) as (small_llm, small_url),
    ):
        await lab.start_connector([rb], big_url, connector={"name": "a", "models": ["big"]})
        await lab.start_connector([rb], small_url, connector={"name": "b", "models": ["small"]})
        async with lab.client() as client:
            with pytest.raises(httpx.RemoteProtocolError):  # the response is cut, not complete
                await client.post(
                    rb.url + "/die",  # the upstream's path: a head, one chunk, then it dies
                    json=chat("coder"),
                    headers={"Authorization": f"Bearer {lab.api_key}"},
                )
        assert [r["path"] for r in big_llm.forwarded()] == ["/die"]
        assert small_llm.forwarded() == []

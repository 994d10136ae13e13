"""The operator controls the GPU: per-key limits, token budgets, the fair queue, usage that
survives restarts, and self-service usage for key holders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import trio
import trio.lowlevel
import trio.testing
from conftest import memory_upstream, usage_summary_read
from netutil import free_port

from trio_bridge._errors import QueueFull
from trio_bridge.accounts._limits import DAY, FairQueue, KeyLimits, Limiter, duration_text
from trio_bridge.accounts._usagestore import UsageStore, read_rows, utc_day
from trio_bridge.connector._slots import FairSlots
from trio_bridge.testing import Lab, MemoryNetwork, open_lab

CHAT = "/v1/chat/completions"
PY = sys.executable


def chat(prompt: str = "count to 3", model: str = "m", stream: bool = False) -> dict[str, object]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}]}


# -- limits, pure (time passed in) -----------------------------------------------------------


def test_concurrency_limit_counts_requests_in_progress() -> None:
    lim, key = Limiter(), KeyLimits(concurrency=2)
    assert lim.admit("k", key, 0) is None
    assert lim.admit("k", key, 0) is None
    refusal = lim.admit("k", key, 0)
    assert refusal is not None and refusal.limit == "concurrency" and refusal.retry_after == 1
    lim.finish("k", 0, 1)
    assert lim.admit("k", key, 1) is None
    assert lim.admit("other", key, 1) is None  # per key


def test_requests_per_minute_slide_and_say_when_to_retry() -> None:
    lim, key = Limiter(), KeyLimits(rpm=3)
    for t in (0.0, 10.0, 20.0):
        assert lim.admit("k", key, t) is None
        lim.finish("k", 0, t)
    refusal = lim.admit("k", key, 30.0)
    assert refusal is not None and refusal.limit == "requests"
    assert refusal.retry_after == 30  # the request at t=0 leaves the window at t=60
    assert lim.admit("k", key, 60.5) is None  # it left


def test_tokens_per_minute_are_counted_when_answers_end() -> None:
    lim, key = Limiter(), KeyLimits(tokens_per_minute=100)
    assert lim.admit("k", key, 0) is None
    assert lim.admit("k", key, 0) is None  # nothing counted yet: both may start
    lim.finish("k", 80, 1)
    lim.finish("k", 50, 2)  # an overshoot of at most what was in flight
    refusal = lim.admit("k", key, 3)
    assert refusal is not None and refusal.limit == "tokens"
    assert refusal.retry_after == 58  # the 80 at t=1 leave at t=61 (58 s from now): under
    assert lim.admit("k", key, 61.5) is None


def test_tokens_per_day_reset_at_midnight_utc_and_are_seeded_after_a_restart() -> None:
    lim, key = Limiter(), KeyLimits(tokens_per_day=1000)
    noon = 10 * DAY + DAY / 2
    lim.seed_today("k", 990, noon)  # what the usage store says was used today
    assert lim.admit("k", key, noon) is None
    lim.finish("k", 20, noon)
    refusal = lim.admit("k", key, noon + 1)
    assert refusal is not None and refusal.limit == "tokens_per_day"
    assert refusal.retry_after == int(DAY / 2) - 1
    assert lim.admit("k", key, 11 * DAY + 1) is None  # a new day


def test_model_allowlist_with_globs() -> None:
    key = KeyLimits(models=("qwen2.5-coder*", "llama3"))
    assert key.allows_model("qwen2.5-coder:7b") and key.allows_model("llama3")
    assert not key.allows_model("llama3:70b") and not key.allows_model("gpt-4")
    assert key.allows_model(None)  # a request without a model (e.g. GET /v1/models)
    assert KeyLimits().allows_model("anything")


def test_rate_limit_headers_in_openais_format() -> None:
    lim, key = Limiter(), KeyLimits(rpm=60, tokens_per_minute=1000)
    lim.admit("k", key, 0)
    lim.finish("k", 150, 0)
    headers = dict(lim.headers("k", key, 6.0))
    assert headers[b"x-ratelimit-limit-requests"] == b"60"
    assert headers[b"x-ratelimit-remaining-requests"] == b"59"
    assert headers[b"x-ratelimit-reset-requests"] == b"54s"
    assert headers[b"x-ratelimit-remaining-tokens"] == b"850"
    assert [duration_text(x) for x in (0.25, 1, 75)] == ["250ms", "1s", "1m15s"]


def test_defaults_fill_in_what_a_key_does_not_set() -> None:
    own = KeyLimits(rpm=10)
    merged = own.merged_over(KeyLimits(rpm=99, tokens_per_day=5, models=("a*",), priority=4))
    assert merged == KeyLimits(rpm=10, tokens_per_day=5, models=("a*",), priority=4)


# -- the fair queue ----------------------------------------------------------------------------


def test_fair_queue_round_robin_with_weights() -> None:
    q: FairQueue[str] = FairQueue(100)
    for i in range(5):
        q.push("greedy", f"g{i}")
    q.push("modest", "m0")
    q.push("vip", "v0", weight=2)
    q.push("vip", "v1", weight=2)
    q.push("vip", "v2", weight=2)
    order = [q.pop() for _ in range(len(q))]
    assert order[:6] == ["g0", "m0", "v0", "v1", "g1", "v2"]
    assert q.pop() is None


def test_fair_queue_is_bounded() -> None:
    q: FairQueue[int] = FairQueue(2)
    q.push("a", 1)
    q.push("b", 2)
    with pytest.raises(OverflowError):
        q.push("a", 3)
    assert q.remove("a", 1) and not q.remove("a", 1)
    assert q.pop() == 2 and len(q) == 0


async def test_a_greedy_key_delays_a_modest_one_by_at_most_one_turn(
    autojump_clock: trio.abc.Clock,
) -> None:
    """One LLM slot; a key queues 30 requests of 1 s each; another key's single request,
    arriving later, waits for the request in progress and at most one greedy turn."""
    slots = FairSlots(1, 100)
    done: list[tuple[str, float]] = []

    async def request(key: str, seconds: float = 1.0) -> None:
        async with slots.slot(key):
            await trio.sleep(seconds)
        done.append((key, trio.current_time()))

    async with trio.open_nursery() as nursery:
        for _ in range(30):
            nursery.start_soon(request, "greedy")
        await trio.sleep(2.5)  # greedy's queue is long now
        t0 = trio.current_time()
        nursery.start_soon(request, "modest")
        await trio.lowlevel.checkpoint()
    modest_done = next(t for k, t in done if k == "modest")
    # waited: the rest of the request in progress (0.5 s) + at most one greedy turn (1 s),
    # then its own second; first-come would have been ~28 s
    assert modest_done - t0 <= 0.5 + 1.0 + 1.0 + 1e-6
    assert [k for k, _ in done].count("greedy") == 30


async def test_a_full_queue_refuses_at_once_and_a_cancelled_waiter_frees_its_place(
    autojump_clock: trio.abc.Clock,
) -> None:
    slots = FairSlots(1, 1)
    async with trio.open_nursery() as nursery:

        async def hold() -> None:
            async with slots.slot("a"):
                await trio.sleep(10)

        nursery.start_soon(hold)
        await trio.sleep(0.1)
        with trio.move_on_after(1):  # waits in the queue, then gives up
            async with slots.slot("b"):
                pytest.fail("no slot was free")
        assert slots.queued == 0
        nursery.start_soon(hold)  # takes the queue's only place
        await trio.sleep(0.1)
        with pytest.raises(QueueFull):
            async with slots.slot("c"):
                pass
    assert slots.busy == 0 and slots.queued == 0


# -- through the bridge, in memory on the autojump clock -----------------------------------------


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with open_lab(network=MemoryNetwork()) as lab:
        yield lab


async def start(
    lab: Lab, clock: trio.testing.MockClock, **connector: object
) -> tuple[str, httpx.AsyncClient]:
    model = await lab.start_test_model(token_delay=0.001)
    rb = await lab.start_broker()
    rc = await lab.start_connector([rb], model.url, connector=dict(connector))
    await usage_summary_read(rc.connector, clock)  # before the test's minutes count
    return rb.url, lab.client()


async def test_rotating_a_key_does_not_reset_its_limits(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """A key's limits count under its name: the rotation's new secret goes on with the
    minute's requests and the day's tokens (each rotation gave a fresh budget, and the
    portal lets any user rotate their own key, as often as they like)."""
    _, key = lab.keys.add("limited", limits=KeyLimits(rpm=2))
    url, client = await start(lab, autojump_clock)
    async with client:
        for _ in range(2):
            r = await client.post(
                url + CHAT, json=chat(), headers={"Authorization": f"Bearer {key}"}
            )
            assert r.status_code == 200
        _, new, _ = lab.keys.rotate("limited", 0)
        await trio.sleep(1)  # a running store looks at its file at most twice a second
        r = await client.post(url + CHAT, json=chat(), headers={"Authorization": f"Bearer {new}"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        await trio.sleep(61)
        r = await client.post(url + CHAT, json=chat(), headers={"Authorization": f"Bearer {new}"})
        assert r.status_code == 200


async def test_over_its_rpm_a_key_gets_429_with_openai_headers_and_the_sdk_understands(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    _, key = lab.keys.add("limited", limits=KeyLimits(rpm=2, tokens_per_minute=10_000))
    url, client = await start(lab, autojump_clock)
    sdk = openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=key, max_retries=0, http_client=lab.client()
    )
    # the SDK's first call reads the platform in a worker thread, which the autojump clock
    # does not wait for (it runs on meanwhile): made before the minute counts, then let go
    await sdk.models.list()
    await trio.sleep(61)
    async with client:
        auth = {"Authorization": f"Bearer {key}"}
        r = await client.post(url + CHAT, json=chat(), headers=auth)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert r.headers["x-ratelimit-remaining-requests"] == "1"
        assert r.headers["x-ratelimit-limit-tokens"] == "10000"
        # (the waits stay off the window's exact edges, where float sums of the clock may
        # fall either side of them)
        await trio.sleep(20.5)
        await client.post(url + CHAT, json=chat(), headers=auth)
        r = await client.post(url + CHAT, json=chat(), headers=auth)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "40"  # the first request leaves it in 39.5 s
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        error = r.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
        assert "2 requests per minute" in error["message"]
        # another key is not affected
        r = await client.post(
            url + CHAT, json=chat(), headers={"Authorization": f"Bearer {lab.api_key}"}
        )
        assert r.status_code == 200
        await trio.sleep(35)  # not yet: the window slides, it does not reset
        r = await client.post(url + CHAT, json=chat(), headers=auth)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "5"  # 4.5 s
        await trio.sleep(int(r.headers["retry-after"]))  # as told
        r = await client.post(url + CHAT, json=chat(), headers=auth)
        assert r.status_code == 200
        r = await client.post(url + CHAT, json=chat(), headers=auth)
        assert r.status_code == 429  # the second one (at 20.5 s) is still in the window
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 429
    await sdk.close()


async def test_a_model_outside_the_allowlist_is_403_and_never_reaches_the_llm(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    _, key = lab.keys.add("coder", limits=KeyLimits(models=("qwen2.5-coder*",)))
    async with memory_upstream(lab.network) as (app, llm):
        rb = await lab.start_broker()
        await lab.start_connector([rb], llm)
        async with lab.client() as client:
            auth = {"Authorization": f"Bearer {key}"}
            r = await client.post(rb.url + "/echo", json=chat(model="llama3:70b"), headers=auth)
            assert r.status_code == 403
            assert r.json()["error"]["code"] == "model_not_allowed"
            assert app.forwarded() == []
            r = await client.post(
                rb.url + "/echo", json=chat(model="qwen2.5-coder:7b"), headers=auth
            )
            assert r.status_code == 200
            assert len(app.forwarded()) == 1


async def test_an_expired_key_is_refused_and_told_it_expired(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    _, key = lab.keys.add("temp", expires="2020-01-01T00:00:00Z")
    url, client = await start(lab, autojump_clock)
    async with client:
        r = await client.post(url + CHAT, json=chat(), headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_expired"


def test_minute_windows_run_on_the_monotonic_clock_not_the_wall_clock() -> None:
    """A wall clock stepped back an hour (NTP, a VM resumed) neither keeps a key limited nor
    resets its daily budget; only ``now`` (trio's clock) moves the minute windows."""
    lim, key = Limiter(), KeyLimits(rpm=1, tokens_per_day=100)
    noon = 10 * DAY + DAY / 2
    assert lim.admit("k", key, 5.0, wall=noon) is None
    lim.finish("k", 60, 5.5, wall=noon)
    assert lim.admit("k", key, 6.0, wall=noon - 3600) is not None  # one per minute
    assert lim.admit("k", key, 66.0, wall=noon - 3600) is None  # a minute later by trio's clock
    lim.finish("k", 60, 66.5, wall=noon - 3600)
    refusal = lim.admit("k", key, 130.0, wall=noon - 3599)
    assert refusal is not None and refusal.limit == "tokens_per_day"  # same UTC day
    assert lim.headers("k", key, 130.0)  # reading the headers never resets the day
    assert lim.snapshot("k", key, 130.0, wall=noon)["tokens_today"] == 120


async def test_a_daily_token_budget_is_enforced_from_real_usage(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    _, key = lab.keys.add("budget", limits=KeyLimits(tokens_per_day=20))
    url, client = await start(lab, autojump_clock)
    async with client:
        auth = {"Authorization": f"Bearer {key}"}
        statuses = []
        for _ in range(5):  # each answer reports its usage (prompt + completion > 5 tokens)
            r = await client.post(url + CHAT, json=chat("count to 8"), headers=auth)
            statuses.append(r.status_code)
        assert statuses[0] == 200 and 429 in statuses
        assert "daily token budget" in r.json()["error"]["message"]
        usage = (await client.get(url + "/_bridge/usage", headers=auth)).json()
    assert usage["now"]["tokens_today"] >= 20 and usage["now"]["tokens_left_today"] == 0


async def test_self_service_usage_shows_the_keys_own_limits_and_usage(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    entry, key = lab.keys.add("alice", limits=KeyLimits(rpm=100, concurrency=3))
    url, client = await start(lab, autojump_clock, usage_flush_interval="100ms")
    async with client:
        auth = {"Authorization": f"Bearer {key}"}
        for stream in (False, True):
            r = await client.post(url + CHAT, json=chat(stream=stream), headers=auth)
            assert r.status_code == 200
        # other keys' usage is never shown
        await client.post(
            url + CHAT, json=chat(), headers={"Authorization": f"Bearer {lab.api_key}"}
        )
        r = await client.get(url + "/_bridge/usage", headers=auth)
        assert r.status_code == 200
        doc = r.json()
        unauthenticated = await client.get(url + "/_bridge/usage")
        assert unauthenticated.status_code == 401
        routed = await client.get(url + "/r/default/_bridge/usage", headers=auth)
        assert routed.status_code == 200
    assert doc["key"] == {"name": "alice", "id": entry.id, "expires": None}
    assert doc["limits"]["requests_per_minute"] == 100 and doc["limits"]["concurrency"] == 3
    assert doc["now"]["requests_this_minute"] == 3  # asking for usage is a request too
    assert doc["today"]["requests"] == 2 and doc["today"]["completion_tokens"] > 0
    assert doc["last_30_days"]["requests"] == 2
    assert key not in r.text and lab.api_key not in r.text


async def test_requests_beyond_the_llms_slots_wait_fairly_at_the_connector(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """Through the real bridge: one LLM slot, a greedy key with 8 streams queued, then a modest
    key's request: it is served after at most one greedy turn, not after all 8."""
    _, greedy = lab.keys.add("greedy")
    modest_entry, modest = lab.keys.add("modest")
    model = await lab.start_test_model(token_delay=0.02)  # "count to 10": ~0.2 s per answer
    rb = await lab.start_broker()
    rc = await lab.start_connector([rb], model.url, connector={"max_concurrent": 1})
    order: list[str] = []
    async with lab.client() as client:

        async def one(name: str, key: str) -> None:
            r = await client.post(
                rb.url + CHAT,
                json=chat("count to 10", stream=True),  # streamed: ~0.2 s at the LLM
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 200
            order.append(name)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one, "greedy", greedy)
            await trio.sleep(0.3)  # greedy's requests are queued at the connector now
            nursery.start_soon(one, "modest", modest)
    assert order.index("modest") <= 3, order  # FIFO would make it last (index 8)
    waited = rc.connector.metrics.registry.get_sample_value(
        "trio_bridge_key_queue_wait_seconds_count", {"key_id": modest_entry.id}
    )
    assert waited == 1


# -- usage that survives: real processes -------------------------------------------------------


def test_usage_store_rows_merge_pending_and_flushed(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "usage.sqlite3")
    now = time.time()
    store.record("k1", "m", prompt=3, completion=4, estimated=False, error=False, now=now)
    trio.run(store.flush)
    store.record("k1", "m", prompt=1, completion=1, estimated=True, error=True, now=now)
    [row] = store.rows()
    assert row["requests"] == 2 and row["prompt_tokens"] == 4 and row["estimated"] == 1
    assert row["errors"] == 1
    assert read_rows(tmp_path / "usage.sqlite3")[0]["requests"] == 1  # only what was flushed
    assert store.tokens_on(utc_day(now)) == {"k1": 9}
    assert (tmp_path / "usage.sqlite3").stat().st_mode & 0o077 == 0
    store.close()


async def test_a_batch_being_written_is_counted_once_by_rows(tmp_path: Path) -> None:
    """A flush hands its batch to a worker thread: until the commit, rows() still shows it
    (it used to vanish, and /_bridge/usage answered 0 requests); after it, not twice."""
    store = UsageStore(tmp_path / "usage.sqlite3")
    now = time.time()
    store.record("k1", "m", prompt=3, completion=4, estimated=False, error=False, now=now)
    gate = threading.Event()
    write = store._write

    def slow_write(batch: dict[tuple[str, str, str], list[int]]) -> None:
        gate.wait(10)
        write(batch)

    store._write = slow_write  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.flush)
        await trio.testing.wait_all_tasks_blocked()  # the batch is in the worker thread
        [row] = store.rows()
        assert row["requests"] == 1 and row["completion_tokens"] == 4
        assert read_rows(tmp_path / "usage.sqlite3") == []  # not committed yet
        gate.set()
    [row] = store.rows()
    assert row["requests"] == 1 and row["completion_tokens"] == 4
    assert read_rows(tmp_path / "usage.sqlite3")[0]["requests"] == 1
    store.close()


@pytest.fixture
def processes(tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    """A test model, a broker and a connector as separate processes (like a deployment)."""
    public, model_port = free_port(), free_port()
    (tmp_path / "b.toml").write_text(
        f'[broker]\nlisten = "127.0.0.1:{public}"\nadmin_listen = ""\n'
    )
    (tmp_path / "c.toml").write_text(
        f'[connector]\nbroker_urls = ["ws://127.0.0.1:{public}/_bridge/relay"]\n'
        f'local_url = "http://127.0.0.1:{model_port}"\nadmin_listen = ""\n'
        'usage_flush_interval = "500ms"\n'
    )

    def cli(*args: str) -> str:
        return subprocess.run(
            [PY, "-m", "trio_bridge", *args], capture_output=True, text=True, check=True, timeout=60
        ).stdout

    token = cli("tokens", "add", "home", "-c", str(tmp_path / "b.toml")).strip()
    (tmp_path / "connector.token").write_text(token)
    os.chmod(tmp_path / "connector.token", 0o600)
    key = cli("keys", "add", "alice", "-c", str(tmp_path / "c.toml")).strip()
    procs = [
        subprocess.Popen([PY, "-m", "trio_bridge", "test-model", "--listen",
                          f"127.0.0.1:{model_port}", "--token-delay", "0"],
                         stdout=subprocess.DEVNULL),
        subprocess.Popen([PY, "-m", "trio_bridge", "broker", "-c", str(tmp_path / "b.toml")],
                         stderr=subprocess.DEVNULL),
    ]  # fmt: skip
    connector = subprocess.Popen(
        [PY, "-m", "trio_bridge", "connector", "-c", str(tmp_path / "c.toml")],
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{public}"
    deadline = time.monotonic() + 20
    while True:
        try:
            r = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {key}"})
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the bridge did not come up"
        time.sleep(0.1)
    try:
        yield {"base": base, "key": key, "cli": cli, "connector": connector, "dir": tmp_path}
    finally:
        for p in [*procs, connector]:
            p.kill()
            p.wait()


def test_a_limit_change_reaches_a_running_connector_within_a_second(
    processes: dict[str, object],
) -> None:
    base, key, cli = processes["base"], processes["key"], processes["cli"]
    auth = {"Authorization": f"Bearer {key}"}
    for _ in range(3):
        assert httpx.post(f"{base}{CHAT}", json=chat(), headers=auth).status_code == 200
    cli("keys", "set", "alice", "--rpm", "3", "-c", str(processes["dir"] / "c.toml"))  # type: ignore[operator]
    time.sleep(1.0)
    r = httpx.post(f"{base}{CHAT}", json=chat(), headers=auth)
    assert r.status_code == 429, r.text  # three this minute already: the new limit applies
    cli("keys", "set", "alice", "--rpm", "none", "-c", str(processes["dir"] / "c.toml"))  # type: ignore[operator]
    time.sleep(1.0)
    assert httpx.post(f"{base}{CHAT}", json=chat(), headers=auth).status_code == 200


def test_usage_survives_kill_9_losing_at_most_the_flush_interval(
    processes: dict[str, object],
) -> None:
    base, key, cli = processes["base"], processes["key"], processes["cli"]
    auth = {"Authorization": f"Bearer {key}"}
    for _ in range(10):
        assert httpx.post(f"{base}{CHAT}", json=chat(), headers=auth).status_code == 200
    time.sleep(1.2)  # more than the flush interval (500 ms) since the last answer
    connector = processes["connector"]
    connector.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
    connector.wait()  # type: ignore[attr-defined]
    rows = json.loads(
        cli("usage", "--format", "json", "--since", "0d", "-c", str(processes["dir"] / "c.toml"))  # type: ignore[operator]
    )
    # ours, plus the fixture's GET /v1/models that waited for the bridge to come up
    assert sum(r["requests"] for r in rows if r["key"] == "alice") == 10 + 1
    assert sum(r["completion_tokens"] for r in rows) > 0
    table = cli("usage", "--key", "alice", "-c", str(processes["dir"] / "c.toml"))  # type: ignore[operator]
    lines = [line for line in table.splitlines() if line.split()[1:2] == ["alice"]]
    assert sum(int(line.split()[3]) for line in lines) == 11  # REQUESTS column


def test_a_usage_file_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    from trio_bridge import ConfigError, Connector
    from trio_bridge._config import load_config

    (tmp_path / "c.toml").write_text('[connector]\nusage_file = "/proc/nope/usage.sqlite3"\n')
    with pytest.raises(ConfigError, match=r"connector.usage_file: cannot open /proc/nope"):
        Connector(load_config(tmp_path / "c.toml"), token="tbc_aaaaaaaa_x")


def test_a_client_that_waits_exactly_retry_after_is_let_in() -> None:
    """Retry-After is whole seconds up to the moment the oldest request leaves the window;
    float rounding at that exact edge must not refuse the client that waited just that."""
    refused_at_the_edge = 0
    for i in range(1000):
        lim, key = Limiter(), KeyLimits(rpm=1)
        t0 = 1000.0 + i * 0.001237  # many float offsets
        assert lim.admit("k", key, t0) is None
        lim.finish("k", 0, t0)
        later = t0 + 1 + i % 50  # a whole number of seconds later: Retry-After lands on the edge
        refusal = lim.admit("k", key, later)
        assert refusal is not None
        if lim.admit("k", key, later + refusal.retry_after) is not None:
            refused_at_the_edge += 1
    assert refused_at_the_edge == 0

"""One pool, one budget (issue 27): connectors that name the same store (a real
``redis-server`` started here) share API keys, limits, limit windows, revocations and usage.

Each pool here is two connectors on the route "default", each dialling its own broker, so
that a client alternating between the brokers sends every other request to each box: what
one box admits, the other must see. Real sockets and real time (the store has its own clock);
nothing asserts a duration except the issue's "refused on the other box within a second"."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from faultproxy import FaultProxy
from redisserver import RedisServer, needs_redis

from trio_bridge.accounts._limits import KeyLimits
from trio_bridge.testing import Lab, RunningBroker, RunningConnector, open_lab

pytest.importorskip("coredis", reason="the [redis] extra (coredis) is not installed")

from trio_bridge.accounts._pool import PoolStore
from trio_bridge.accounts._poolclient import store_client
from trio_bridge.accounts._poolkeys import PoolKeys, fetch_keys, put_keys
from trio_bridge.accounts._poolusage import read_usage

pytestmark = needs_redis
CHAT = "/v1/chat/completions"


def chat(prompt: str = "count to 3", stream: bool = False) -> dict[str, object]:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": prompt}]}


@attrs.define
class Pool:
    lab: Lab
    redis: RedisServer
    brokers: list[RunningBroker]
    boxes: list[RunningConnector]
    options: dict[str, Any]

    def store(self, c: int = 0) -> PoolStore:
        pool = self.boxes[c].connector.pool
        assert pool is not None
        return pool

    def config(self) -> Any:
        return self.lab.config(connector={"store": self.redis.url, **self.options})

    async def push_keys(self) -> None:
        """The lab's keys file, as the pool's keys document (what ``keys import`` does)."""
        client = store_client(self.config())
        async with client:
            _, version = await fetch_keys(client)
            assert await put_keys(client, self.lab.keys.path.read_bytes(), version) > 0

    async def usage(self) -> list[dict[str, Any]]:
        client = store_client(self.config())
        async with client:
            return await read_usage(client)

    async def flushed(self) -> None:
        """Every box wrote what ended (the ends of requests leave the request path)."""
        for c in range(len(self.boxes)):
            assert await self.store(c).flush()

    async def post(self, client: httpx.AsyncClient, box: int, key: str, **kw: Any) -> Any:
        return await client.post(
            self.brokers[box].url + CHAT,
            json=chat(**kw),
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )


@asynccontextmanager
async def open_pool(
    tmp_path: Path,
    *,
    boxes: int = 2,
    password: str = "",
    tls: bool = False,
    token_delay: float = 0.001,
    **options: Any,
) -> AsyncIterator[Pool]:
    redis = RedisServer(tmp_path, password=password, tls=tls)
    await redis.start()
    try:
        async with open_lab() as lab:
            if password:
                secret = lab.dir / "store.password"
                secret.write_text(password)
                os.chmod(secret, 0o600)
                options["store_password_file"] = str(secret)
            if tls:
                options["store_ca_file"] = str(redis.cert)
            pool = Pool(lab, redis, [], [], options)
            yield pool
            for rc in pool.boxes:
                await rc.kill()
    finally:
        await redis.kill()


async def start_boxes(
    pool: Pool, n: int = 2, token_delay: float = 0.001, stores: list[str] | None = None
) -> None:
    """``n`` boxes, each with its broker; ``stores``: the store's URL each box dials (a
    proxy's, say; default: the store's own)."""
    await pool.push_keys()
    model = await pool.lab.start_test_model(token_delay=token_delay)
    for i in range(n):
        broker = await pool.lab.start_broker()
        pool.brokers.append(broker)
        url = stores[i] if stores is not None else pool.redis.url
        pool.boxes.append(
            await pool.lab.start_connector(
                [broker],
                model.url,
                connector={"name": f"box{i}", "store": url, **pool.options},
            )
        )
    for c in range(n):
        assert pool.store(c).up, pool.store(c).problems()


async def wait_for(predicate: Any, seconds: float = 10.0) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.01)


async def test_rpm_10_admits_exactly_10_across_two_boxes(tmp_path: Path) -> None:
    async with open_pool(tmp_path) as pool:
        _, key = pool.lab.keys.add("shared", limits=KeyLimits(rpm=10))
        await start_boxes(pool)
        async with pool.lab.client() as client:
            statuses = [(await pool.post(client, i % 2, key)).status_code for i in range(20)]
            last = await pool.post(client, 1, key)
        assert statuses.count(200) == 10 and statuses.count(429) == 10, statuses
        assert statuses[0::2].count(200) == 5 and statuses[1::2].count(200) == 5  # both boxes
        assert last.status_code == 429
        assert "10 requests per minute" in last.json()["error"]["message"]
        assert last.headers["x-ratelimit-limit-requests"] == "10"
        assert last.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(last.headers["retry-after"]) <= 60


async def test_concurrency_2_holds_across_two_boxes(tmp_path: Path) -> None:
    async with open_pool(tmp_path) as pool:
        entry, key = pool.lab.keys.add("shared", limits=KeyLimits(concurrency=2))
        await start_boxes(pool, token_delay=0.05)
        async with pool.lab.client() as client, trio.open_nursery() as nursery:
            done: list[int] = []

            async def slow(box: int) -> None:
                r = await pool.post(client, box, key, prompt="count to 40", stream=True)
                done.append(r.status_code)

            nursery.start_soon(slow, 0)
            nursery.start_soon(slow, 1)
            await wait_for(lambda: all(pool.store(c).holding(entry.name) == 1 for c in (0, 1)))
            for box in (0, 1):  # a third request, on either box
                r = await pool.post(client, box, key)
                assert r.status_code == 429, r.text
                assert "2 requests in progress" in r.json()["error"]["message"]
        assert done == [200, 200]
        await pool.flushed()  # both ended: their places are given back
        async with pool.lab.client() as client:
            assert (await pool.post(client, 1, key)).status_code == 200


async def test_a_daily_token_budget_is_spent_across_two_boxes(tmp_path: Path) -> None:
    async with open_pool(tmp_path) as pool:
        _, key = pool.lab.keys.add("budget", limits=KeyLimits(tokens_per_day=60))
        await start_boxes(pool)
        statuses, spent, admitted_while_under = [], 0, 0
        async with pool.lab.client() as client:
            for i in range(20):
                r = await pool.post(client, i % 2, key, prompt="count to 8")
                statuses.append(r.status_code)
                if r.status_code == 200:
                    admitted_while_under += spent < 60
                    spent += r.json()["usage"]["total_tokens"]
                await pool.flushed()
        assert statuses[0] == 200 and statuses[-1] == 429
        # every admitted request came while the pool's total was under the budget, and the
        # refusals began as soon as it was spent: one budget, not one per box
        assert statuses.count(200) == admitted_while_under
        assert statuses.index(429) == statuses.count(200) and spent >= 60
        assert statuses[0::2].count(200) >= 1 and statuses[1::2].count(200) >= 1
        rows = await pool.usage()
        assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) == spent


async def test_keys_revoke_on_one_box_is_refused_on_the_other_within_a_second(
    tmp_path: Path,
) -> None:
    async with open_pool(tmp_path) as pool:
        entry, key = pool.lab.keys.add("leaver")
        await start_boxes(pool)
        config = tmp_path / "box0.toml"
        config.write_text(f'[connector]\nstore = "{pool.redis.url}"\n')
        async with pool.lab.client() as client:
            assert (await pool.post(client, 1, key)).status_code == 200
            await trio.run_process(  # the CLI, as an operator runs it on box 0
                [sys.executable, "-m", "trio_bridge", "keys", "revoke", "leaver", "-c",
                 str(config)],
                capture_stdout=True,
            )  # fmt: skip
            revoked_at = trio.current_time()
            other = pool.boxes[1].connector.keys
            await wait_for(lambda: (e := other.get(entry.id)) is not None and bool(e.revoked))
            assert trio.current_time() - revoked_at < 1.0
            r = await pool.post(client, 1, key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked"


async def test_a_revocation_survives_a_store_restarted_empty_by_a_box_that_missed_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Box B is cut off from the store while an operator revokes a key (the CLI) and a key is
    made on box A (the portal's path); Redis then restarts empty and B reaches it first: B
    writes back the keys it last read, in which the revoked key is valid and the new one
    missing. Within a few syncs the pool must refuse the revoked key on both boxes (401
    key_revoked) and serve the new one on both: a revocation (or a key) that a live box
    knows is not undone by another box's write-back."""
    caplog.set_level(logging.INFO, logger="trio_bridge.pool")
    async with open_pool(tmp_path) as pool:
        entry, key = pool.lab.keys.add("leaver")
        gates = [FaultProxy(pool.redis.port), FaultProxy(pool.redis.port)]
        ports = [await pool.lab.nursery.start(gate.serve) for gate in gates]
        urls = [pool.redis.url.replace(f":{pool.redis.port}/", f":{p}/") for p in ports]
        await start_boxes(pool, stores=urls)
        keys_a, keys_b = (rc.connector.keys for rc in pool.boxes)
        config = tmp_path / "operator.toml"
        config.write_text(f'[connector]\nstore = "{pool.redis.url}"\n')

        def cut(box: int) -> None:
            gates[box].set_mode("refuse")
            gates[box].cut()

        async with pool.lab.client() as client:
            for box in (0, 1):
                assert (await pool.post(client, box, key)).status_code == 200
            cut(1)  # box B: cut off from the store
            await wait_for(lambda: not pool.store(1).up)
            await trio.run_process(
                [sys.executable, "-m", "trio_bridge", "keys", "revoke", "leaver", "-c",
                 str(config)],
                capture_stdout=True,
            )  # fmt: skip
            made, secret = await trio.to_thread.run_sync(lambda: keys_a.add("newcomer"))
            await wait_for(lambda: bool((e := keys_a.get(entry.id)) and e.revoked))
            assert (await pool.post(client, 1, key)).status_code == 200  # B missed it
            cut(0)
            await wait_for(lambda: not pool.store(0).up)
            await pool.redis.kill()
            await pool.redis.start()  # empty (no persistence)
            gates[1].set_mode("pass")  # B reaches it first, and writes back what it read
            await wait_for(lambda: pool.store(1).up)
            async with store_client(pool.config()) as direct:
                doc, _ = await fetch_keys(direct)
            assert doc is not None and made.id.encode() not in doc  # B's document won
            gates[0].set_mode("pass")

            def settled(keys: Any) -> bool:
                e = keys.get(entry.id)
                return e is not None and bool(e.revoked) and keys.get(made.id) is not None

            await wait_for(lambda: settled(keys_a) and settled(keys_b), 5)
            for box in (0, 1):
                r = await pool.post(client, box, key)
                assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked"
                assert (await pool.post(client, box, secret)).status_code == 200
        async with store_client(pool.config()) as direct:
            doc, _ = await fetch_keys(direct)
        written = PoolKeys("store")
        written.apply(doc, b"")
        assert (e := written.get(entry.id)) is not None and e.revoked  # a box started now too
        assert written.get(made.id) is not None
    said = [r.getMessage() for r in caplog.records if "revocation" in r.getMessage()]
    assert len(said) == 1 and entry.id in said[0], said
    assert not [r for r in caplog.records if key in r.getMessage() or secret in r.getMessage()]
    assert not [r for r in caplog.records if entry.sha256 in r.getMessage()]


async def test_usage_totals_equal_the_requests_made_on_both_boxes(tmp_path: Path) -> None:
    async with open_pool(tmp_path) as pool:
        entry, key = pool.lab.keys.add("counted", limits=KeyLimits(rpm=5))
        await start_boxes(pool)
        async with pool.lab.client() as client:
            statuses = [(await pool.post(client, i % 2, key)).status_code for i in range(9)]
        await pool.flushed()
        rows = await pool.usage()  # model "m", and "unknown" for those refused before it
        assert {r["key_id"] for r in rows} == {entry.id}
        assert sum(r["requests"] for r in rows) == 9
        assert sum(r["refused"] for r in rows) == statuses.count(429) == 4
        await wait_for(lambda: pool.store(1).rows(key_ids=[entry.id]) != [])
        assert sum(r["requests"] for r in pool.store(1).rows()) == 9  # box 1 sees box 0's


async def test_store_killed_under_load_open_policy_keeps_serving_and_reconciles(
    tmp_path: Path,
) -> None:
    async with open_pool(tmp_path) as pool:
        entry, key = pool.lab.keys.add("steady", limits=KeyLimits(rpm=100_000))
        await start_boxes(pool)
        box = pool.boxes[0].connector
        answers: list[tuple[float, int]] = []  # (when it ended, status)
        stop = trio.Event()

        async def load(client: httpx.AsyncClient, box: int) -> None:
            while not stop.is_set():
                r = await pool.post(client, box, key)
                answers.append((trio.current_time(), r.status_code))

        async with pool.lab.client() as client, trio.open_nursery() as nursery:
            for worker in range(4):  # four clients at once, over both boxes
                nursery.start_soon(load, client, worker % 2)
            await wait_for(lambda: len(answers) >= 20)
            await pool.redis.kill()
            killed_at = trio.current_time()
            await wait_for(lambda: all(not pool.store(c).up for c in (0, 1)))
            n = len(answers)
            await wait_for(lambda: len(answers) >= n + 20)  # served on local counts
            await pool.redis.start()
            await wait_for(lambda: all(pool.store(c).up for c in (0, 1)))
            n = len(answers)
            await wait_for(lambda: len(answers) >= n + 20)
            stop.set()
        assert {status for _, status in answers} == {200}, "open: nothing refused, no error"
        await pool.flushed()
        # the store came back empty (no persistence): what ended from shortly after the kill
        # on (waiting in memory, then written) is all in it; what was written before the
        # kill went with Redis (docs/pool.md)
        rows = await pool.usage()
        assert {r["key_id"] for r in rows} == {entry.id}
        stored = sum(r["requests"] for r in rows)
        after_kill = sum(1 for t, _ in answers if t > killed_at + 0.2)
        assert after_kill >= 40 and after_kill <= stored <= len(answers)
        assert box.problems() == []
        up = box.metrics.registry.get_sample_value("trio_bridge_store_up")
        failures = box.metrics.registry.get_sample_value("trio_bridge_store_failures_total")
        assert up == 1 and failures is not None and failures >= 1


async def test_store_killed_closed_policy_refuses_503_then_serves_again(
    tmp_path: Path,
) -> None:
    async with open_pool(tmp_path, on_store_failure="closed") as pool:
        _, key = pool.lab.keys.add("strict")
        await start_boxes(pool)
        async with pool.lab.client() as client:
            assert (await pool.post(client, 0, key)).status_code == 200
            await pool.redis.kill()
            r = await pool.post(client, 0, key)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "store_unavailable"
            host, port = pool.boxes[0].connector.admin_address or ("", 0)
            ready = await client.get(f"http://{host}:{port}/readyz")
            [problem] = ready.json()["problems"]
            assert "pool store" in problem and "on_store_failure = closed" in problem
            await pool.redis.start()
            await wait_for(lambda: pool.store(0).up)
            assert (await pool.post(client, 0, key)).status_code == 200


@pytest.mark.parametrize("policy", ["closed", "open"])
async def test_a_box_started_while_the_store_is_down_answers_503_not_401(
    tmp_path: Path, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A box that starts while the store is unreachable has never read the keys document: it
    cannot tell a good key from a bad one. It says so (503 store_unavailable, the OpenAI error
    shape, Retry-After), not 401 as if the key were unknown; under ``open`` too (``open`` is
    for the limits: there is no key list to fall back on). Once it reads the keys, it serves."""
    caplog.set_level(logging.DEBUG)
    async with open_pool(tmp_path, on_store_failure=policy) as pool:
        entry, key = pool.lab.keys.add("early")
        await pool.push_keys()
        await pool.redis.kill()
        model = await pool.lab.start_test_model()
        pool.brokers.append(await pool.lab.start_broker())
        pool.boxes.append(
            await pool.lab.start_connector(
                pool.brokers,
                model.url,
                connector={"name": "box0", "store": pool.redis.url, **pool.options},
            )
        )
        assert not pool.store().up
        async with pool.lab.client() as client:
            for presented in (key, "tbk-" + "x" * 40):  # a good key and a bad one alike
                r = await pool.post(client, 0, presented)
                assert r.status_code == 503, r.text
                error = r.json()["error"]
                assert set(error) == {"message", "type", "code"}
                assert error["code"] == "store_unavailable"
                assert "key store is unreachable" in error["message"]
                assert r.headers["retry-after"] == "1"
                assert "www-authenticate" not in r.headers
                assert presented not in r.text
            host, port = pool.boxes[0].connector.admin_address or ("", 0)
            problems = (await client.get(f"http://{host}:{port}/readyz")).json()["problems"]
            assert any("no API keys read yet" in p and "503" in p for p in problems), problems
            await pool.redis.start()  # empty (no persistence): the keys go in again
            await pool.push_keys()
            await wait_for(lambda: pool.store().keys.get(entry.id) is not None)
            assert (await pool.post(client, 0, key)).status_code == 200
    refused = [
        r
        for r in caplog.records
        if getattr(r, "role", "") == "connector" and getattr(r, "status", None) == 503
    ]
    assert len(refused) == 2 and all("key store" in getattr(r, "reason", "") for r in refused)
    assert not [r for r in caplog.records if key in str(vars(r))]  # the secret: nowhere


async def test_a_box_whose_first_keys_document_is_unreadable_answers_503(tmp_path: Path) -> None:
    """The store answers but the keys document in it cannot be read (written by hand, say) and
    the box never read a good one: no key can be checked either (503, not 401)."""
    async with open_pool(tmp_path) as pool:
        _, key = pool.lab.keys.add("early")
        pool.lab.keys.path.write_text("[[keys]\nnot toml")
        await start_boxes(pool, n=1)
        async with pool.lab.client() as client:
            r = await pool.post(client, 0, key)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
        assert "cannot be read" in r.json()["error"]["message"]
        [problem] = pool.store().problems()
        assert problem.startswith("pool keys: ") and "no API keys read yet" in problem
        assert "every request gets 503" in problem


async def test_a_store_with_a_password(tmp_path: Path) -> None:
    async with open_pool(tmp_path, password="s3cret-pass-word") as pool:
        _, key = pool.lab.keys.add("alice", limits=KeyLimits(rpm=3))
        await start_boxes(pool)
        async with pool.lab.client() as client:
            statuses = [(await pool.post(client, i % 2, key)).status_code for i in range(4)]
        assert statuses == [200, 200, 200, 429]


async def test_a_wrong_password_is_a_problem_that_names_no_secret(tmp_path: Path) -> None:
    async with open_pool(tmp_path, password="right-password") as pool:
        pool.lab.keys.add("alice")
        await pool.push_keys()
        broker = await pool.lab.start_broker()
        model = await pool.lab.start_test_model()
        url = pool.redis.url.replace("redis://", "redis://:wrong-password@")
        rc = await pool.lab.start_connector(
            [broker], model.url, connector={"store": url, "name": "box"}
        )
        [problem] = rc.connector.problems()
        assert "unreachable" in problem and "wrong-password" not in problem
        assert "***" in problem or ":wrong" not in problem
        await rc.kill()


async def test_a_store_over_tls(tmp_path: Path) -> None:
    async with open_pool(tmp_path, tls=True) as pool:
        _, key = pool.lab.keys.add("alice", limits=KeyLimits(rpm=3))
        await start_boxes(pool)
        assert pool.redis.url.startswith("rediss://")
        async with pool.lab.client() as client:
            statuses = [(await pool.post(client, i % 2, key)).status_code for i in range(4)]
        assert statuses == [200, 200, 200, 429]


async def test_keys_import_moves_a_keys_file_and_its_usage_in_and_the_cli_reads_the_store(
    tmp_path: Path,
) -> None:
    from trio_bridge.accounts._keys import SecretStore
    from trio_bridge.accounts._usagestore import UsageStore, utc_day

    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        keys = SecretStore(tmp_path / "keys.toml", "tbk")
        alice, _ = keys.add("alice", limits=KeyLimits(rpm=7))
        usage = UsageStore(tmp_path / "usage.sqlite3")
        usage.record(alice.id, "m", prompt=3, completion=4, estimated=False, error=False,
                     now=time.time())  # fmt: skip
        assert await usage.flush()
        usage.close()
        config = tmp_path / "bridge.toml"
        config.write_text(f'[connector]\nstore = "{redis.url}"\n')

        async def cli(*args: str) -> str:
            done = await trio.run_process(
                [sys.executable, "-m", "trio_bridge", *args, "-c", str(config)],
                capture_stdout=True,
                capture_stderr=True,
                cwd=tmp_path,
            )
            return str(done.stdout.decode())

        out = await cli("keys", "import")
        assert "1 keys imported" in out and "1 usage rows imported" in out
        again = await cli("keys", "import")
        assert "0 keys imported" in again and "imported before" in again
        listed = await cli("keys", "list")
        assert "alice" in listed and "rpm 7" in listed and "1 req, 7 tokens" in listed
        rows = json.loads(await cli("usage", "--format", "json"))
        assert [(r["key"], r["day"], r["requests"], r["completion_tokens"]) for r in rows] == [
            ("alice", utc_day(time.time()), 1, 4)
        ]
        await cli("keys", "add", "bob", "--tpd", "1k")
        assert "bob" in await cli("keys", "list")
    finally:
        await redis.kill()


async def test_concurrency_1_never_refuses_a_sequential_client_of_one_box(tmp_path: Path) -> None:
    """The box gives the request's place back in its next admission (it sets its own count
    in the store): no race with the write of the end."""
    async with open_pool(tmp_path) as pool:
        _, key = pool.lab.keys.add("one-at-a-time", limits=KeyLimits(concurrency=1))
        await start_boxes(pool, n=1)
        async with pool.lab.client() as client:
            statuses = [(await pool.post(client, 0, key)).status_code for _ in range(10)]
        assert statuses == [200] * 10


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ('store = "http://10.0.0.2:6379"', "connector.store: invalid store 'http://10.0.0.2:6379'"),
        ('store = "redis://:hunter2@h/x"', "invalid store 'redis://:***@h/x'"),
        ('on_store_failure = "maybe"', "on_store_failure"),
    ],
)
def test_a_wrong_store_setting_is_one_line_naming_the_key_and_no_password(
    tmp_path: Path, value: str, said: str
) -> None:
    from trio_bridge._config import load_config
    from trio_bridge._errors import ConfigError

    path = tmp_path / "bridge.toml"
    path.write_text(f"[connector]\n{value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert said in str(err.value) and "hunter2" not in str(err.value)
    assert "\n" not in str(err.value)


def _registered(broker: RunningBroker, name: str) -> bool:
    return any(r.name == name for r in broker.broker.registry.relays())


async def test_two_connector_processes_admit_exactly_rpm_across_both(tmp_path: Path) -> None:
    """The issue's set-up as an operator runs it: two `trio-bridge connector` processes (each
    with its own broker, the same route, the same store) and one key with rpm 10."""
    async with open_pool(tmp_path) as pool:
        _, key = pool.lab.keys.add("shared", limits=KeyLimits(rpm=10))
        await pool.push_keys()
        model = await pool.lab.start_test_model(token_delay=0.001)
        token = tmp_path / "connector.token"
        token.write_text(pool.lab.token)
        os.chmod(token, 0o600)
        processes = []
        try:
            for i in range(2):
                broker = await pool.lab.start_broker()
                pool.brokers.append(broker)
                config = tmp_path / f"box{i}.toml"
                config.write_text(
                    f'[connector]\nbroker_urls = ["{broker.relay_url}"]\n'
                    f'token_file = "{token}"\nlocal_url = "{model.url}"\n'
                    f'admin_listen = ""\nname = "proc{i}"\nstore = "{pool.redis.url}"\n'
                )
                processes.append(
                    await trio.lowlevel.open_process(
                        [sys.executable, "-m", "trio_bridge", "connector", "-c", str(config)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
                await wait_for(partial(_registered, broker, f"proc{i}"), 20)
            async with pool.lab.client() as client:
                statuses = [(await pool.post(client, i % 2, key)).status_code for i in range(20)]
            assert statuses.count(200) == 10 and statuses.count(429) == 10, statuses
            assert statuses[0::2].count(200) == 5 and statuses[1::2].count(200) == 5
        finally:
            for p in processes:
                p.terminate()
            with trio.move_on_after(10):
                for p in processes:
                    await p.wait()
            for p in processes:
                if p.returncode is None:
                    p.kill()
                    await p.wait()


async def test_self_service_usage_shows_what_is_left_across_the_pool(tmp_path: Path) -> None:
    async with open_pool(tmp_path) as pool:
        _, key = pool.lab.keys.add("alice", limits=KeyLimits(rpm=10, tokens_per_day=10_000))
        await start_boxes(pool)
        async with pool.lab.client() as client:
            for i in range(4):
                assert (await pool.post(client, i % 2, key)).status_code == 200
            await pool.flushed()
            r = await client.get(
                pool.brokers[1].url + "/_bridge/usage", headers={"Authorization": f"Bearer {key}"}
            )
        now = r.json()["now"]
        # 4 chats on both boxes, and this request itself, in the pool's minute
        assert now["requests_this_minute"] == 5 and now["requests_left_this_minute"] == 5
        assert now["tokens_today"] > 0 and now["tokens_left_today"] == 10_000 - now["tokens_today"]


async def test_a_rotation_goes_on_with_the_pools_counts(tmp_path: Path) -> None:
    """A key rotated on one box (the portal's way: grace 0, in a worker thread): its new
    secret is refused on both boxes once the minute's requests are spent: the pool counts
    a key under its name, not its secret's id (each rotation gave a fresh budget)."""
    async with open_pool(tmp_path) as pool:
        _, key = pool.lab.keys.add("alice", limits=KeyLimits(rpm=4))
        await start_boxes(pool)
        keys_a, keys_b = (rc.connector.keys for rc in pool.boxes)
        async with pool.lab.client() as client:
            for i in range(4):
                assert (await pool.post(client, i % 2, key)).status_code == 200
            entry, new, _ = await trio.to_thread.run_sync(lambda: keys_a.rotate("alice", 0))
            await wait_for(lambda: keys_b.get(entry.id) is not None)
            for box in (0, 1):
                r = await pool.post(client, box, new)
                assert r.status_code == 429, r.text
                assert "4 requests per minute" in r.json()["error"]["message"]


async def test_the_portal_shows_what_is_left_across_the_pool(tmp_path: Path) -> None:
    """The portal's page on box 1 says what is left of the user's per-minute requests in the
    pool (it read box 1's fallback counts, which count only while the store is down: 10
    left after 3 requests of 10 on both boxes; outside review)."""
    from types import SimpleNamespace

    from trio_bridge._config import PortalConfig, structure
    from trio_bridge.accounts._users import ACTIVE, Session
    from trio_bridge.connector._connector import _open_portal
    from trio_bridge.connector._portal import PortalRequest

    async with open_pool(tmp_path) as pool:
        await start_boxes(pool)
        conn = pool.boxes[1].connector
        portal_config = structure(
            {"enabled": True, "public_url": "http://127.0.0.1:9/", "client_id": "c",
             "issuer": "http://127.0.0.1:9/", "allowed_domains": ["example.com"]},
            PortalConfig,
            source="portal",
        )  # fmt: skip
        portal = _open_portal(attrs.evolve(pool.config(), portal=portal_config), conn)
        assert portal is not None  # as the connector makes it, with its parts
        user, _ = portal.users.sign_in("sub-1", "eve@example.com", "Eve", (), ACTIVE)
        done = await trio.to_thread.run_sync(portal.change_key, user, "create")
        assert done is not None and done[2] is not None
        entry, key = done[1], done[2]
        await trio.to_thread.run_sync(conn.keys.set_limits, entry.name, {"rpm": 10})
        await wait_for(lambda: pool.boxes[0].connector.keys.get(entry.id) is not None)
        async with pool.lab.client() as client:
            for i in range(3):
                assert (await pool.post(client, i % 2, key)).status_code == 200
        await pool.flushed()
        head = SimpleNamespace(target="/_bridge/portal/", method="GET", headers=[])
        page = await PortalRequest(portal, SimpleNamespace(request_head=head))._user_page(  # type: ignore[arg-type]
            Session(user=user, csrf="csrf", expires=0.0)
        )
        await portal.oidc.aclose()
        left = re.search(r"Requests per minute</td><td class=num>10</td><td class=num>(\d+)<", page)
        assert left is not None and left.group(1) == "7", page


async def test_the_admin_page_shows_the_pools_usage(tmp_path: Path) -> None:
    async with open_pool(tmp_path) as pool:
        _, key = pool.lab.keys.add("alice")
        await start_boxes(pool)
        async with pool.lab.client() as client:
            for i in range(3):
                assert (await pool.post(client, i % 2, key)).status_code == 200
            await pool.flushed()
            await wait_for(lambda: sum(r["requests"] for r in pool.store(0).rows()) == 3)
            host, port = pool.boxes[0].connector.admin_address or ("", 0)
            page = (await client.get(f"http://{host}:{port}/api/usage")).json()
        assert page["stored"] is True
        assert page["periods"]["today"]["keys"]["alice"]["requests"] == 3  # box 1's too


async def test_keys_changed_in_a_worker_thread_of_a_box_reach_the_pool(tmp_path: Path) -> None:
    """How the portal changes keys (trio.to_thread): a key made on box 0 works on box 1, and
    revoked there, is refused on box 0."""
    async with open_pool(tmp_path) as pool:
        pool.lab.keys.add("first")
        await start_boxes(pool)
        keys0, keys1 = pool.boxes[0].connector.keys, pool.boxes[1].connector.keys
        entry, secret = await trio.to_thread.run_sync(lambda: keys0.add("portal-user"))
        await wait_for(lambda: keys1.get(entry.id) is not None, 2)
        async with pool.lab.client() as client:
            assert (await pool.post(client, 1, secret)).status_code == 200
            await trio.to_thread.run_sync(keys1.revoke, "portal-user")
            await wait_for(lambda: bool((e := keys0.get(entry.id)) and e.revoked), 2)
            assert (await pool.post(client, 0, secret)).status_code == 401


async def test_a_store_without_keys_is_a_problem_that_says_how_to_fill_it(tmp_path: Path) -> None:
    async with open_pool(tmp_path) as pool:
        broker = await pool.lab.start_broker()
        pool.brokers.append(broker)
        model = await pool.lab.start_test_model()
        rc = await pool.lab.start_connector(
            [broker], model.url, connector={"store": pool.redis.url, "name": "box"}
        )
        pool.boxes.append(rc)
        [problem] = rc.connector.problems()
        assert "holds no API keys yet" in problem and "keys import" in problem
        async with pool.lab.client() as client:
            r = await pool.post(client, 0, pool.lab.api_key)  # the lab's key: not imported
        assert r.status_code == 401
        await pool.push_keys()
        await wait_for(lambda: rc.connector.problems() == [], 2)

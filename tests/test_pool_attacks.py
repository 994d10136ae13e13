"""Attacks on the pool's store (issue 27's review): races between boxes, a slow store, a
store restarted empty. Two :class:`PoolStore` objects in one process stand for two boxes
(each its own connection and instance id) against a real ``redis-server``."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from redisserver import RedisServer, needs_redis

from trio_bridge.accounts._limits import KeyLimits
from trio_bridge.accounts._usagestore import utc_day
from trio_bridge.testing import Lab, open_lab

pytest.importorskip("coredis", reason="the [redis] extra (coredis) is not installed")

from trio_bridge.accounts._pool import PoolStore
from trio_bridge.accounts._poolclient import store_client
from trio_bridge.accounts._poolkeys import PoolKeys, document, fetch_keys, put_keys

pytestmark = needs_redis


@asynccontextmanager
async def two_boxes(
    tmp_path: Path, limits: KeyLimits, *, proxy: SlowAnswers | None = None
) -> AsyncIterator[tuple[Lab, RedisServer, str, list[PoolStore]]]:
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        async with open_lab() as lab:
            url = redis.url
            if proxy is not None:
                proxy.target = redis.port
                lab.nursery.start_soon(proxy.serve)
                while not proxy.port:
                    await trio.sleep(0.01)
                url = url.replace(str(redis.port), str(proxy.port))
            config = lab.config(connector={"store": url})
            entry, _ = lab.keys.add("raced", limits=limits)
            async with store_client(config) as client:
                assert await put_keys(client, lab.keys.path.read_bytes(), b"") > 0
            boxes = [PoolStore(config), PoolStore(config)]
            async with trio.open_nursery() as nursery:
                for box in boxes:
                    await nursery.start(box.run)
                yield lab, redis, entry.id, boxes
                nursery.cancel_scope.cancel()
    finally:
        await redis.kill()


async def flight_in_store(lab: Lab, redis: RedisServer, key_id: str) -> dict[Any, Any]:
    async with store_client(lab.config(connector={"store": redis.url})) as client:
        return dict(await client.hgetall(f"tb:k:{key_id}:flight"))


async def test_a_burst_on_two_boxes_never_exceeds_concurrency_nor_leaves_phantoms(
    tmp_path: Path,
) -> None:
    """40 requests of one key at once, 20 on each box, concurrency 2, five rounds: never
    more than 2 in progress, some admitted in every round, and once all ended, the store
    holds nothing in flight for the key (a refusal must not leave a count behind)."""
    limits = KeyLimits(concurrency=2)
    async with two_boxes(tmp_path, limits) as (lab, redis, key_id, boxes):
        for _ in range(5):
            in_progress = most = admitted = 0

            async def one(box: PoolStore) -> None:
                nonlocal in_progress, most, admitted
                decision = await box.admit(key_id, limits)
                if decision.refusal is None:
                    assert decision.shared
                    admitted += 1
                    in_progress += 1
                    most = max(most, in_progress)
                    await trio.sleep(0.1)
                    in_progress -= 1
                    box.finish(key_id, 0, shared=True)

            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(one, boxes[i % 2])
            for box in boxes:
                assert await box.flush()
            assert most <= 2
            assert admitted >= 1
            assert await flight_in_store(lab, redis, key_id) == {}
        for box in boxes:  # and each box admits at once
            decision = await box.admit(key_id, limits)
            assert decision.refusal is None, decision.refusal
            box.finish(key_id, 0, shared=True)


class SlowAnswers:
    """A TCP proxy before the store that holds its answers back from the moment the
    connector sends a command mentioning ``trigger`` until :meth:`release`: the store runs
    every command at once, the connector does not hear of it (a store or network that
    turned slow right then)."""

    def __init__(self) -> None:
        self.target = self.port = 0
        self.trigger = b""
        self.flowing = trio.Event()
        self.flowing.set()

    def release(self) -> None:
        self.flowing.set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pipe, client, upstream, False, nursery.cancel_scope)
            nursery.start_soon(self._pipe, upstream, client, True, nursery.cancel_scope)

    async def _pipe(
        self, src: trio.SocketStream, dst: trio.SocketStream, answers: bool, scope: trio.CancelScope
    ) -> None:
        try:
            async for data in src:
                if not answers and self.trigger and self.trigger in data:
                    self.trigger = b""  # once
                    self.flowing = trio.Event()
                while answers and not self.flowing.is_set():
                    await self.flowing.wait()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


async def usage_requests(lab: Lab, redis: RedisServer) -> int:
    from trio_bridge.accounts._poolusage import read_usage

    async with store_client(lab.config(connector={"store": redis.url})) as client:
        return sum(r["requests"] for r in await read_usage(client))


async def test_a_slow_store_does_not_count_usage_twice(tmp_path: Path) -> None:
    """A write of usage and tokens that the store ran but answered late (after the connector
    gave up waiting) is not counted a second time when the store answers in time again."""
    proxy = SlowAnswers()
    async with two_boxes(tmp_path, KeyLimits(), proxy=proxy) as (lab, redis, key_id, boxes):
        box = boxes[0]
        proxy.trigger = key_id.encode()  # the write of this key's usage: heard of late
        box.record(key_id, "m", now=time.time(), prompt=3, completion=4, estimated=False,
                   error=False)  # fmt: skip
        box.finish(key_id, 7, shared=False)
        await wait_until(lambda: not box.up, 5)
        assert await usage_requests(lab, redis) == 1  # the store ran it
        proxy.release()
        await wait_until(lambda: box.up, 10)
        assert await box.flush()
        assert await usage_requests(lab, redis) == 1
        async with store_client(lab.config(connector={"store": redis.url})) as client:
            day = await client.get(f"tb:k:{key_id}:day:{utc_day(time.time())}")
        assert int(day or 0) == 7


async def wait_until(predicate: Any, seconds: float) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.01)


async def test_a_box_away_while_the_store_restarted_empty_sees_the_next_revocation(
    tmp_path: Path,
) -> None:
    """The store restarted empty while box B could not reach it; box A wrote the keys back
    and an operator revoked a key at once: B must not take the new document for the one it
    holds because the version counter, started again, reached the same number."""
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        async with open_lab() as lab:
            config = lab.config(connector={"store": redis.url})
            lab.keys.add("alice")
            async with store_client(config) as client:
                assert await put_keys(client, lab.keys.path.read_bytes(), b"") > 0
            bob, _ = lab.keys.add("bob")
            async with store_client(config) as client:
                _, version = await fetch_keys(client)
                assert await put_keys(client, lab.keys.path.read_bytes(), version) > 0
            box_a, box_b = PoolStore(config), PoolStore(config)
            async with trio.open_nursery() as nursery, box_b.client:
                await nursery.start(box_a.run)
                assert await box_b._sync()  # B read the keys (bob valid), then lost the store
                assert (e := box_b.keys.get(bob.id)) is not None and not e.revoked
                await redis.kill()
                await redis.start()  # empty
                await wait_until(lambda: box_a.up, 10)  # A wrote its keys back
                lab.keys.revoke("bob")  # the operator, at once
                async with store_client(config) as client:
                    while (await fetch_keys(client))[0] is None:
                        await trio.sleep(0.01)
                    _, version = await fetch_keys(client)
                    assert await put_keys(client, lab.keys.path.read_bytes(), version) > 0
                for _ in range(3):  # B reaches the store again
                    if await box_b._sync():
                        break
                    await trio.sleep(0.3)
                assert box_b.up
                assert await box_b._sync()
                assert (e := box_b.keys.get(bob.id)) is not None and e.revoked
                nursery.cancel_scope.cancel()
    finally:
        await redis.kill()


@pytest.mark.parametrize(
    "url",
    ["redis://:abc/def@h/0", "redis://:abc?def@h/0", "redis://:abc#def@h:6379/0",
     "redis://u:abc/def@h/0", "redis://:abc@def@h/0"],
)  # fmt: skip
def test_a_password_with_url_delimiters_is_never_shown(tmp_path: Path, url: str) -> None:
    """A generated password often holds '/' (base64): the store's URL is then not one
    urlsplit reads a password from, and the config error showed it whole."""
    from trio_bridge._config import load_config, redact_url
    from trio_bridge._errors import ConfigError

    assert "def" not in redact_url(url) and "***" in redact_url(url)
    path = tmp_path / "bridge.toml"
    path.write_text(f'[connector]\nstore = "{url}"\n')
    try:
        load_config(str(path))
    except ConfigError as exc:
        assert "def" not in str(exc)


async def test_the_daily_budget_is_counted_on_the_stores_clock_not_a_boxs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Box A spends the key's day; box B's clock is a day ahead (as any skew is around
    midnight): B must refuse too, and B's tokens count on the store's day."""
    import trio_bridge.accounts._pool as pool_module

    limits = KeyLimits(tokens_per_day=10)
    async with two_boxes(tmp_path, limits) as (_, _, key_id, boxes):
        box_a, box_b = boxes
        decision = await box_a.admit(key_id, limits)
        assert decision.refusal is None
        box_a.finish(key_id, 10, shared=True)
        assert await box_a.flush()

        class Ahead:
            @staticmethod
            def time() -> float:
                return time.time() + 86400

        monkeypatch.setattr(pool_module, "time", Ahead)  # box B's clock (only B runs now)
        decision = await box_b.admit(key_id, limits)
        assert decision.refusal is not None and decision.refusal.limit == "tokens_per_day"
        monkeypatch.undo()
        assert (await box_b.snapshot(key_id, limits))["tokens_today"] == 10


async def test_a_usage_file_imported_again_after_it_grew_counts_each_request_once(
    tmp_path: Path,
) -> None:
    """`keys import` run again after the box went on counting into its usage file (the
    connectors were switched to the store a little later): the rows imported before are not
    added a second time, what came since is."""
    import sys

    from trio_bridge.accounts._keys import SecretStore
    from trio_bridge.accounts._poolusage import read_usage
    from trio_bridge.accounts._usagestore import UsageStore

    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        keys = SecretStore(tmp_path / "keys.toml", "tbk")
        alice, _ = keys.add("alice")
        config = tmp_path / "bridge.toml"
        config.write_text(f'[connector]\nstore = "{redis.url}"\n')

        async def one_request_and_import() -> None:
            usage = UsageStore(tmp_path / "usage.sqlite3")
            usage.record(alice.id, "m", prompt=3, completion=4, estimated=False, error=False,
                         now=time.time())  # fmt: skip
            assert await usage.flush()
            usage.close()
            await trio.run_process(
                [sys.executable, "-m", "trio_bridge", "keys", "import", "-c", str(config)],
                capture_stdout=True,
                cwd=tmp_path,
            )

        await one_request_and_import()
        await one_request_and_import()  # the file now holds 2 requests
        async with store_client(lab_free_config(config)) as client:
            rows = await read_usage(client)
        assert [(r["requests"], r["completion_tokens"]) for r in rows] == [(2, 8)]
    finally:
        await redis.kill()


def lab_free_config(path: Path) -> Any:
    from trio_bridge._config import load_config

    return load_config(str(path))


async def test_a_burst_through_two_connectors_admits_exactly_the_concurrency(
    tmp_path: Path,
) -> None:
    """The first finding end to end: 30 long chats of one key at once over two brokers and
    their connectors, concurrency 2: exactly 2 answered (before the fix: none, every one
    refused by counts that nothing held), then each box serves the key again."""
    from test_pool import open_pool, start_boxes

    async with open_pool(tmp_path) as pool:
        _, key = pool.lab.keys.add("shared", limits=KeyLimits(concurrency=2))
        await start_boxes(pool, token_delay=0.05)
        for _ in range(2):
            statuses: list[int] = []
            async with pool.lab.client() as client, trio.open_nursery() as nursery:

                async def one(box: int, statuses: list[int]) -> None:
                    r = await pool.post(client, box, key, prompt="count to 40", stream=True)
                    statuses.append(r.status_code)

                for i in range(30):
                    nursery.start_soon(one, i % 2, statuses)
            assert sorted(statuses) == [200] * 2 + [429] * 28
            await pool.flushed()
        async with pool.lab.client() as client:
            for box in (0, 1):
                assert (await pool.post(client, box, key)).status_code == 200


@pytest.mark.parametrize("action", [["keys", "list"], ["usage"], ["keys", "revoke", "bob"]])
async def test_the_cli_against_a_store_that_is_down_says_so_in_one_line(
    tmp_path: Path, action: list[str]
) -> None:
    import sys

    from netutil import free_port

    config = tmp_path / "bridge.toml"
    config.write_text(f'[connector]\nstore = "redis://:pw-secret@127.0.0.1:{free_port()}/0"\n')
    done = await trio.run_process(
        [sys.executable, "-m", "trio_bridge", *action, "-c", str(config)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    err = done.stderr.decode()
    assert done.returncode != 0
    assert "Traceback" not in err and "pw-secret" not in err, err
    last = err.strip().splitlines()[-1]  # (before it: coredis's own info lines, for usage)
    assert last.startswith("trio-bridge: config error: pool store redis://:***@127.0.0.1"), err


async def test_a_stop_while_the_store_is_down_says_what_was_not_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The last flush at a stop, with the store gone and usage waiting: one warning line,
    and the stop goes on (no exception out of :meth:`PoolStore.run`)."""
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        async with open_lab() as lab:
            config = lab.config(connector={"store": redis.url})
            entry, _ = lab.keys.add("alice")
            async with store_client(config) as client:
                assert await put_keys(client, lab.keys.path.read_bytes(), b"") > 0
            box = PoolStore(config)
            async with trio.open_nursery() as nursery:
                await nursery.start(box.run)
                await redis.kill()
                box.record(entry.id, "m", now=time.time(), prompt=1, completion=1,
                           estimated=False, error=False)  # fmt: skip
                await wait_until(lambda: not box.up, 5)
                nursery.cancel_scope.cancel()
        assert "1 usage rows and 0 token counts not written at the stop" in caplog.text
    finally:
        await redis.kill()


async def test_the_usage_summary_rereads_today_not_the_whole_month_every_time(
    tmp_path: Path,
) -> None:
    """The summary (admin page, portal) was 31 HGETALLs every 2 s on every box: with a few
    hundred keys x models that is ~0.5 s of the event loop's time per refresh (measured:
    500 keys x 3 models, 0.6 s), and past ~150 000 rows the refresh alone outlasts the
    sync's deadline, so the store counts as unreachable. A refresh reads today and
    yesterday; the month is read again only every SUMMARY_FULL_INTERVAL."""
    from trio_bridge.accounts._poolusage import SUMMARY_FULL_INTERVAL, SUMMARY_INTERVAL

    assert SUMMARY_FULL_INTERVAL >= 30 * SUMMARY_INTERVAL
    async with two_boxes(tmp_path, KeyLimits()) as (lab, redis, key_id, boxes):
        box = boxes[0]
        box.record(key_id, "m", now=time.time() - 5 * 86400, prompt=1, completion=1,
                   estimated=False, error=False)  # fmt: skip
        assert await box.flush()
        box.summary.full_at = -1e9  # the month is due again
        await box.summary.read(box.client)
        assert [r["requests"] for r in box.rows()] == [1]

        async def hgetalls() -> int:
            async with store_client(lab.config(connector={"store": redis.url})) as client:
                stats = await client.info("commandstats")
            return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))

        before = await hgetalls()
        await box.summary.read(box.client)
        assert await hgetalls() - before <= 2
        assert [r["requests"] for r in box.rows()] == [1]  # the older days are kept


async def test_a_request_admitted_during_an_outage_counts_in_flight_once_the_store_is_back(
    tmp_path: Path,
) -> None:
    """on_store_failure = open: a long request box A admitted on its own counts while the
    store was down is still in progress when the store is back: the pool's concurrency 1
    is taken (box B refuses) until it ends."""
    limits = KeyLimits(concurrency=1)
    async with two_boxes(tmp_path, limits) as (_, redis, key_id, boxes):
        box_a, box_b = boxes
        await redis.kill()
        await wait_until(lambda: not box_a.up, 5)
        held = await box_a.admit(key_id, limits)
        assert held.refusal is None and not held.shared  # on A's own counts
        await redis.start()  # empty, as after a restart
        await wait_until(lambda: box_a.up and box_b.up, 15)
        assert await box_a.flush()
        refused = await box_b.admit(key_id, limits)
        assert refused.refusal is not None and refused.refusal.limit == "concurrency"
        box_a.finish(key_id, 0, shared=False)
        assert await box_a.flush()
        decision = await box_b.admit(key_id, limits)
        assert decision.refusal is None


# -- a Redis restarted empty, and a box (or a file) that holds an older keys document --


async def push(config: Any, data: bytes) -> None:
    """Replace the store's keys document with ``data`` (as `keys` commands do)."""
    async with store_client(config) as client:
        _, version = await fetch_keys(client)
        assert await put_keys(client, data, version) > 0


async def stored(config: Any) -> PoolKeys:
    """The keys document in the store, read as a box would."""
    async with store_client(config) as client:
        doc, version = await fetch_keys(client)
    keys = PoolKeys("store")
    keys.apply(doc, version)
    return keys


async def synced(box: PoolStore) -> None:
    """One sync that reached the store (the first after a restart may find the connection
    gone)."""
    for _ in range(10):
        if await box._sync():
            return
        await trio.sleep(0.2)
    raise AssertionError(box.problems())


@asynccontextmanager
async def synced_boxes(config: Any, n: int) -> AsyncIterator[list[PoolStore]]:
    """``n`` boxes on the store, each synced once."""
    boxes = [PoolStore(config) for _ in range(n)]
    async with AsyncExitStack() as stack:
        for box in boxes:
            await stack.enter_async_context(box.client)
            await synced(box)
        yield boxes


@asynccontextmanager
async def store_and_lab(tmp_path: Path) -> AsyncIterator[tuple[Lab, RedisServer, Any]]:
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        async with open_lab() as lab:
            yield lab, redis, lab.config(connector={"store": redis.url})
    finally:
        await redis.kill()


def test_a_box_keeps_every_revocation_it_knows_whatever_document_it_reads(
    tmp_path: Path,
) -> None:
    """Two documents that each know a revocation the other lacks (one box saw the first,
    another the second): a box that read one and then reads the other holds both revoked,
    and says the store's document lacks the one it knew."""
    from trio_bridge.accounts._keys import SecretStore

    one = SecretStore(tmp_path / "one.toml", "tbk")
    first, _ = one.add("first")
    second, _ = one.add("second")
    (tmp_path / "two.toml").write_bytes(one.path.read_bytes())
    (tmp_path / "two.toml").chmod(0o600)
    one.revoke("first")
    SecretStore(tmp_path / "two.toml", "tbk").revoke("second")
    box = PoolKeys("store")
    box.apply(one.path.read_bytes(), b"1.a")
    box.apply((tmp_path / "two.toml").read_bytes(), b"2.b")
    assert all((e := box.get(i)) is not None and e.revoked for i in (first.id, second.id))
    assert box.lacking is not None and box.lacking.revoked == (first.id,)
    assert box.version == b"2.b"


def test_a_box_that_follows_the_stores_changes_finds_nothing_lacking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge must never fight the operator: a box that reads each document as the
    `keys` commands write it (add, set, rotate, revoke, extend an expired key, trim) writes
    nothing back and holds exactly the store's document."""
    import trio_bridge.accounts._poolkeys as poolkeys
    from trio_bridge.accounts import _keys
    from trio_bridge.accounts._keys import SecretStore

    file = SecretStore(tmp_path / "keys.toml", "tbk")
    box = PoolKeys("store")
    n = 0

    def step() -> None:
        nonlocal n
        n += 1
        doc = file.path.read_bytes()
        box.apply(doc, f"{n}.x".encode())
        assert box.lacking is None, n
        assert box.document == doc

    for name in ("alice", "bob", "carol", "dave"):
        file.add(name)
        step()
    file.set_limits("alice", {"rpm": 5})
    step()
    file.rotate("bob", 0)  # the old secret expires at once (kept, marked replaced)
    step()
    bob = next(e for e in file.entries() if e.name == "bob" and e.replaced)
    file.revoke("carol")
    step()
    file.set_limits("dave", {"expires": "2000-01-01T00:00:00Z"})
    step()
    file.set_limits("dave", {"expires": ""})
    step()
    file.add("erin")
    step()
    carol = next(e for e in file.entries() if e.name == "carol")

    class Later:  # 31 days on, for the box and the commands alike
        @staticmethod
        def time() -> float:
            return time.time() + 31 * 86400

    monkeypatch.setattr(_keys, "time", Later)
    monkeypatch.setattr(poolkeys, "time", Later)
    file.add("frank")  # the write drops carol (revoked more than REVOKED_KEPT ago), bob's old
    assert file.get(carol.id) is None and _keys.REVOKED_KEPT == 30 * 86400
    assert file.get(bob.id) is None
    step()
    assert box.get(carol.id) is None and box.get(bob.id) is None


async def test_an_end_set_during_a_rotations_grace_is_not_undone_by_the_boxes(
    tmp_path: Path,
) -> None:
    """alice's key was rotated (the old secret valid one hour more) and every box read it;
    then the operator ends alice's key at once: both entries expired (the old one kept,
    marked replaced). No box may make either usable again, nor put the old entry back once
    a document drops it (one written by hand, or by an older trio-bridge, whose writes
    dropped it): both secrets stay refused everywhere (the first merge rule restored 'the
    keys the store lacks' and undid this, no fault needed)."""
    async with store_and_lab(tmp_path) as (lab, _redis, config):
        old, _ = lab.keys.add("alice")
        await push(config, lab.keys.path.read_bytes())
        async with synced_boxes(config, 2) as (box_a, box_b):
            new, _, _ = lab.keys.rotate("alice", 3600)
            await push(config, lab.keys.path.read_bytes())
            await synced(box_a)
            await synced(box_b)
            assert all(box_a.keys.get(e.id).usable() for e in (old, new))  # type: ignore[union-attr]
            past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
            lab.keys.set_limits("alice", {"expires": past.strftime("%Y-%m-%dT%H:%M:%SZ")})
            kept = lab.keys.get(old.id)
            assert kept is not None and kept.replaced and not kept.usable()
            for doc in (
                lab.keys.path.read_bytes(),
                document([e for e in lab.keys.entries() if e.id != old.id], lab.keys.defaults),
            ):
                await push(config, doc)
                for _ in range(3):
                    await synced(box_a)
                    await synced(box_b)
                for keys in (box_a.keys, box_b.keys, await stored(config)):
                    named = [e for e in keys.entries() if e.name == "alice"]
                    assert named and not any(e.usable() for e in named), named
            for keys in (box_a.keys, box_b.keys, await stored(config)):
                assert keys.get(old.id) is None  # the last document dropped it: it stays out


@pytest.mark.parametrize("grace", [0, 3600])
async def test_a_rotation_survives_a_store_restarted_empty_by_a_box_that_missed_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, grace: int
) -> None:
    """alice's key is rotated (the portal's way: grace 0; or with an hour's grace) while box
    B is away; Redis then restarts empty and B reaches it first: it writes back the document
    it last read, in which the old secret is valid for ever and the new one missing (it was:
    the new secret refused, the leaked old one usable again). Box A, which saw the rotation,
    must restore it: the old secret ends when the rotation said, the new one works, on
    every box and in the store."""
    caplog.set_level(logging.INFO, logger="trio_bridge.pool")
    async with store_and_lab(tmp_path) as (lab, redis, config):
        old, old_secret = lab.keys.add("alice")
        await push(config, lab.keys.path.read_bytes())
        async with synced_boxes(config, 2) as (box_a, box_b):
            new, new_secret, until = lab.keys.rotate("alice", grace)
            await push(config, lab.keys.path.read_bytes())
            await synced(box_a)  # B is away
            await redis.kill()
            await redis.start()  # empty
            await synced(box_b)  # B first: its document, from before the rotation
            written = await stored(config)
            assert written.get(new.id) is None and not written.get(old.id).replaced  # type: ignore[union-attr]
            for _ in range(3):
                await synced(box_a)
                await synced(box_b)
            for keys in (box_a.keys, box_b.keys, await stored(config)):
                was, now = keys.get(old.id), keys.get(new.id)
                assert was is not None and was.replaced and was.expires == until
                assert was.usable() == (grace > 0)
                assert now is not None and now.usable()
                assert keys.lookup(new_secret) == now
    said = [r.getMessage() for r in caplog.records if "rotation" in r.getMessage()]
    assert len(said) == 1 and old.id in said[0] and new.id in said[0], said
    assert not [r for r in caplog.records for s in (old_secret, new_secret) if s in r.getMessage()]


async def test_an_ended_grace_is_not_undone_by_the_order_the_boxes_come_back(
    tmp_path: Path,
) -> None:
    """alice rotated with 1 h grace (Y away); then the operator ends the old secret at once
    (`keys set OLD --expires <now>`, X away). Redis restarts empty; Y is back first, then X,
    then W (which saw everything). The old secret must stay ended on every box (outside
    review: X's mark, ending in an hour, won over W's earlier end)."""
    async with store_and_lab(tmp_path) as (lab, redis, config):
        old, _ = lab.keys.add("alice")
        await push(config, lab.keys.path.read_bytes())
        async with synced_boxes(config, 3) as (x, y, w):
            lab.keys.rotate("alice", 3600)
            await push(config, lab.keys.path.read_bytes())
            await synced(x)
            await synced(w)  # Y away
            past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
            lab.keys.set_limits(old.id, {"expires": past.strftime("%Y-%m-%dT%H:%M:%SZ")})
            await push(config, lab.keys.path.read_bytes())
            await synced(w)  # X away
            assert not w.keys.get(old.id).usable()  # type: ignore[union-attr]
            await redis.kill()
            await redis.start()  # empty
            await synced(y)  # first back: the old secret valid for ever
            await synced(x)  # marks it replaced again, ending in an hour
            for _ in range(3):
                for box in (w, x, y):
                    await synced(box)
            for keys in (w.keys, x.keys, y.keys, await stored(config)):
                assert not keys.get(old.id).usable(), keys.get(old.id)  # type: ignore[union-attr]


@pytest.mark.parametrize("restarted", [True, False], ids=["restarted-empty", "kept-its-doc"])
async def test_a_box_away_longer_than_revocations_are_kept_brings_no_key_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restarted: bool
) -> None:
    """Box B read bob's key and then could not reach the store for 31 days: bob was revoked
    meanwhile and, 30 days on, left the document (revoked entries are kept 30 days, then no
    box knows of the revocation any more). Whether Redis restarted empty meanwhile or not,
    B must not put bob back: its keys are too old to be written back, or merged in."""
    import trio_bridge.accounts._poolkeys as poolkeys

    async with store_and_lab(tmp_path) as (lab, redis, config):
        lab.keys.add("alice")
        without_bob = lab.keys.path.read_bytes()  # the document once bob was trimmed
        bob, _ = lab.keys.add("bob")
        await push(config, lab.keys.path.read_bytes())
        box_b = PoolStore(config)
        async with box_b.client:
            await synced(box_b)
            await push(config, without_bob)
            if restarted:
                await redis.kill()
                await redis.start()

            class Later:
                @staticmethod
                def time() -> float:
                    return time.time() + 31 * 86400

            monkeypatch.setattr(poolkeys, "time", Later)
            await synced(box_b)
            await synced(box_b)
        in_store = await stored(config)
        assert in_store.get(bob.id) is None and box_b.keys.get(bob.id) is None
        assert (in_store.document is None) == restarted


async def test_a_key_made_on_a_box_before_it_merged_does_not_write_a_revoked_key_back(
    tmp_path: Path,
) -> None:
    """Box A knows bob revoked; the store holds a document in which bob is valid (written
    back by a box that missed the revocation) and, before A's next sync, the portal makes a
    key on A: that change reads the store's document in a worker thread and writes it with
    the new key. bob stays revoked, on A and in the store."""
    async with store_and_lab(tmp_path) as (lab, redis, config):
        lab.keys.add("alice")
        bob, _ = lab.keys.add("bob")
        stale = lab.keys.path.read_bytes()
        await push(config, stale)
        lab.keys.revoke("bob")
        await push(config, lab.keys.path.read_bytes())
        box_a = PoolStore(config)
        async with box_a.client:
            await synced(box_a)
            assert (e := box_a.keys.get(bob.id)) is not None and e.revoked
            await redis.kill()
            await redis.start()
            async with store_client(config) as client:  # box B's write-back, first
                assert await put_keys(client, stale, b"") > 0
            with trio.fail_after(5):
                while True:  # A's connection to the restarted store
                    try:
                        await box_a.client.ping()
                        break
                    except Exception:
                        await trio.sleep(0.1)
            carol, _ = await trio.to_thread.run_sync(lambda: box_a.keys.add("carol"))
            assert (e := box_a.keys.get(bob.id)) is not None and e.revoked
        in_store = await stored(config)
        assert (e := in_store.get(bob.id)) is not None and e.revoked
        assert in_store.get(carol.id) is not None


async def test_an_old_keys_file_imported_after_a_restart_does_not_bring_a_revoked_key_back(
    tmp_path: Path,
) -> None:
    """The operator kept the keys file they once imported; Redis restarted empty and they
    import that file again (`keys import`) before any box wrote its keys back: bob, revoked
    in the store since, is valid in the file. The boxes, which know the revocation, make
    the store's document say it again."""
    import os
    import sys

    async with store_and_lab(tmp_path) as (lab, redis, config):
        lab.keys.add("alice")
        bob, _ = lab.keys.add("bob")
        old = tmp_path / "keys.toml"
        old.write_bytes(lab.keys.path.read_bytes())
        os.chmod(old, 0o600)
        await push(config, old.read_bytes())
        lab.keys.revoke("bob")
        await push(config, lab.keys.path.read_bytes())
        boxes = [PoolStore(config), PoolStore(config)]
        async with boxes[0].client, boxes[1].client:
            for box in boxes:
                await synced(box)
            await redis.kill()
            await redis.start()
            cli = tmp_path / "operator.toml"
            cli.write_text(f'[connector]\nstore = "{redis.url}"\n')
            await trio.run_process(
                [sys.executable, "-m", "trio_bridge", "keys", "import", str(old), "-c",
                 str(cli)],
                capture_stdout=True,
                capture_stderr=True,
            )  # fmt: skip
            assert (e := (await stored(config)).get(bob.id)) is not None and not e.revoked
            for box in boxes:
                await synced(box)
            for box in boxes:
                await synced(box)
                assert (e := box.keys.get(bob.id)) is not None and e.revoked
        assert (e := (await stored(config)).get(bob.id)) is not None and e.revoked


# -- the keys document's cost on the event loop, and key changes racing the sync --


async def test_each_new_keys_version_is_parsed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A box parses each new version of the keys document once (the merge's entries are the
    ones it holds then; a merged document it writes back is not parsed again), and not at
    all a version whose document it holds already (the one it wrote back). Each parse of a
    pool of tens of thousands of keys costs a second of CPU."""
    import tomllib

    parsed: list[int] = []
    real = tomllib.loads

    def counting(text: str, **kw: Any) -> dict[str, Any]:
        parsed.append(len(text))
        return real(text, **kw)

    async with store_and_lab(tmp_path) as (lab, _redis, config):
        lab.keys.add("alice")
        bob, _ = lab.keys.add("bob")
        stale = lab.keys.path.read_bytes()
        lab.keys.revoke("bob")
        await push(config, lab.keys.path.read_bytes())
        box = PoolStore(config)
        async with box.client:
            monkeypatch.setattr(tomllib, "loads", counting)
            await synced(box)  # its first read
            assert len(parsed) == 1
            carol, _ = lab.keys.add("carol")
            await push(config, lab.keys.path.read_bytes())
            parsed.clear()
            await synced(box)  # a new version
            assert len(parsed) == 1 and box.keys.get(carol.id) is not None
            parsed.clear()
            await synced(box)  # the same version: nothing to read
            assert parsed == []
            await push(config, stale)  # lacks bob's revocation (a box that missed it)
            parsed.clear()
            await synced(box)  # merged, and written back
            assert len(parsed) == 1
            assert box.keys.lacking is None
            assert (e := box.keys.get(bob.id)) is not None and e.revoked
            parsed.clear()
            await synced(box)  # the version it wrote: the document it holds
            assert parsed == []
        monkeypatch.undo()
        in_store = await stored(config)
        assert (e := in_store.get(bob.id)) is not None and e.revoked
        # what it holds, never parsed from the document it wrote, is what that document says
        assert in_store.entries() == box.keys.entries()
        assert in_store.defaults == box.keys.defaults


async def test_a_slow_keys_parse_neither_stalls_the_box_nor_marks_the_store_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keys document that takes longer to parse than a round trip may take (a large pool,
    a slow CPU) is parsed off the event loop and outside the round trip's deadline: the box
    goes on admitting meanwhile, the store is not said unreachable (under on_store_failure =
    closed that refused every request), and the new keys are in force once parsed."""
    import tomllib

    from trio_bridge.accounts._poolclient import ROUND_TRIP_TIMEOUT

    real = tomllib.loads

    def slow(text: str, **kw: Any) -> dict[str, Any]:
        time.sleep(ROUND_TRIP_TIMEOUT * 2 + 0.5)
        return real(text, **kw)

    async with store_and_lab(tmp_path) as (lab, redis, _config):
        config = lab.config(connector={"store": redis.url, "on_store_failure": "closed"})
        alice, _ = lab.keys.add("alice")
        await push(config, lab.keys.path.read_bytes())
        box = PoolStore(config)
        async with box.client:
            await synced(box)
            carol, _ = lab.keys.add("carol")
            await push(config, lab.keys.path.read_bytes())
            monkeypatch.setattr(tomllib, "loads", slow)
            ticks: list[float] = []
            admitted: list[Any] = []

            async def tick() -> None:
                while True:
                    ticks.append(trio.current_time())
                    await trio.sleep(0.05)

            async def admit() -> None:
                await trio.sleep(ROUND_TRIP_TIMEOUT)  # the parse is under way
                admitted.append(await box.admit(alice.id, KeyLimits()))
                box.finish(alice.id, 0, shared=True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick)
                nursery.start_soon(admit)
                ok = await box._sync()
                nursery.cancel_scope.cancel()
            monkeypatch.undo()
            assert ok and box.up and box.failures == 0, box.problems()
            assert box.keys.get(carol.id) is not None
            [decision] = admitted
            assert decision.refusal is None and decision.shared
            assert max(b - a for a, b in itertools.pairwise(ticks)) < ROUND_TRIP_TIMEOUT


async def test_a_portal_change_racing_an_operators_change_keeps_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The portal changes keys in a worker thread: it reads the store's document, makes its
    change and writes it by compare-and-set. Between its read and its write the operator
    lowers alice's rpm and revokes bob (`keys set`, `keys revoke` elsewhere), and the box's
    sync reads that. The portal's write must lose its compare-and-set (it was made from the
    older version) and be made again on the new document: both changes hold."""
    async with store_and_lab(tmp_path) as (lab, _redis, config):
        lab.keys.add("alice")
        bob, bob_secret = lab.keys.add("bob")
        await push(config, lab.keys.path.read_bytes())
        box = PoolStore(config)
        async with box.client:
            await synced(box)
            real_save = box.keys._save
            saves: list[bytes] = []

            async def operator() -> None:
                lab.keys.revoke("bob")
                lab.keys.set_limits("alice", {"rpm": 1})
                await push(config, lab.keys.path.read_bytes())
                await synced(box)  # the box's sync reads it meanwhile

            def save(data: bytes) -> None:
                saves.append(data)
                if len(saves) == 1:
                    trio.from_thread.run(operator)
                real_save(data)

            monkeypatch.setattr(box.keys, "_save", save)
            carol, _ = await trio.to_thread.run_sync(lambda: box.keys.add("carol"))
            assert len(saves) == 2  # the first write lost; the change was made again
            await synced(box)
            for keys in (box.keys, await stored(config)):
                alice = next(e for e in keys.entries() if e.name == "alice")
                assert alice.limits.rpm == 1, "the operator's lowered limit was overwritten"
                assert (e := keys.get(bob.id)) is not None and e.revoked
                assert keys.get(carol.id) is not None
            assert box.keys.verify(bob_secret) is None


async def test_a_change_made_again_after_losing_its_write_keeps_all_it_asked(
    tmp_path: Path,
) -> None:
    """``keys set alice --expires … --rpm 7`` whose first write loses to another (a
    concurrent change elsewhere) is made again on the new document: with the expiry too (the
    first attempt took the expiry out of the caller's changes, and the retry ended nothing)."""
    from trio_bridge.accounts._poolcli import StoreCLI

    async with store_and_lab(tmp_path) as (lab, _redis, config):
        lab.keys.add("alice")
        lab.keys.add("bob")
        await push(config, lab.keys.path.read_bytes())

        def operator() -> tuple[str, int | None, int]:
            keys, other = StoreCLI(config).keys(), StoreCLI(config).keys()
            real_put, puts = keys._put, []

            def put(data: bytes, version: bytes) -> int:
                puts.append(1)
                if len(puts) == 1:  # a write elsewhere first: this one loses its CAS
                    other.set_limits("bob", {"rpm": 5})
                return real_put(data, version)  # type: ignore[misc]

            keys._put = put  # type: ignore[method-assign]
            keys.set_limits("alice", {"expires": "2030-01-01T00:00:00Z", "rpm": 7})
            alice = next(e for e in StoreCLI(config).keys().entries() if e.name == "alice")
            return alice.expires, alice.limits.rpm, len(puts)

        expires, rpm, puts = await trio.to_thread.run_sync(operator)
        assert puts == 2  # it lost once and was made again
        assert (expires, rpm) == ("2030-01-01T00:00:00Z", 7)


async def test_a_user_blocked_while_the_portal_makes_their_key_gets_no_key(
    tmp_path: Path,
) -> None:
    """The portal makes a key under the keys' lock after checking the user is active; in a
    pool another process (``trio-bridge users block``) shares no lock with it, and blocks the
    user between the portal's read and its write. The portal's write loses its
    compare-and-set and must not be made again inside the portal's check (the user is
    blocked now): no usable key for a blocked user."""
    from trio_bridge._errors import ConfigError
    from trio_bridge.accounts._poolcli import StoreCLI
    from trio_bridge.accounts._users import ACTIVE, BLOCKED, UserStore, block

    async with store_and_lab(tmp_path) as (lab, _redis, config):
        users = UserStore(tmp_path / "users.sqlite3")
        user, _ = users.sign_in("sub1", "u@example.com", "U", (), ACTIVE)
        past = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        lab.keys.add(user.key_name, expires=past)
        lab.keys.add("other")
        await push(config, lab.keys.path.read_bytes())
        box = PoolStore(config)
        async with box.client:
            await synced(box)
            real_save, saves = box.keys._save, []

            def save(data: bytes) -> None:
                saves.append(1)
                if len(saves) == 1:  # the CLI's block, in "another process", meanwhile
                    block(users, StoreCLI(config).keys(), user, "operator")
                real_save(data)

            box.keys._save = save  # type: ignore[method-assign]

            def change_key() -> object:  # what Portal.change_key does
                with box.keys.changing():
                    if users.state_of(user.id) != ACTIVE:
                        return None
                    return box.keys.add(user.key_name)

            try:
                await trio.to_thread.run_sync(change_key)
            except ConfigError:
                pass  # the portal answers 409 "your key changed meanwhile"
            stored_keys = await trio.to_thread.run_sync(lambda: StoreCLI(config).keys())
        assert users.state_of(user.id) == BLOCKED
        usable = [e for e in stored_keys.entries() if e.name == user.key_name and e.usable()]
        assert usable == []


def test_keys_made_readable_by_a_change_on_the_box_leave_no_stale_problem(
    tmp_path: Path,
) -> None:
    """A bad keys document was read (a problem: the keys cannot be read); a fixed one was
    then put in force by a change made on this box (the portal's), not by the sync: the
    problem is over (the sync no longer reads that version, so it said so until the next)."""
    from trio_bridge.accounts._keys import SecretStore

    source = SecretStore(tmp_path / "k.toml", "tbk")
    source.add("alice")
    good = (tmp_path / "k.toml").read_bytes()
    store = {"doc": good, "v": b"1.a", "n": 1}

    def fetch() -> tuple[bytes, bytes]:
        return store["doc"], store["v"]  # type: ignore[return-value]

    def put(data: bytes, version: bytes) -> int:
        if version != store["v"]:
            return -1
        store["n"] += 1  # type: ignore[operator]
        store["doc"], store["v"] = data, f"{store['n']}.x".encode()
        return store["n"]  # type: ignore[return-value]

    keys = PoolKeys("store", fetch=fetch, put=put)
    assert keys.apply(*fetch()) is True
    store["doc"], store["v"] = b"not toml [[[", b"2.bad"
    keys.apply(*fetch())
    assert keys.reload_error is not None
    store["doc"], store["v"] = good, b"3.fixed"
    keys.add("bob")  # a change on this box reads the fixed version and puts it in force
    assert not keys.wants(store["v"])  # type: ignore[arg-type]
    assert keys.reload_error is None


def test_keys_import_does_not_merge_two_people_into_one_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two boxes become one pool: each had its own `alice` (two people). `keys import` of
    the second box's file added its `alice` beside the first (only ids were compared): two
    usable entries of one name, sharing one budget (limits count by name), one
    /_bridge/usage, one `keys rotate alice` / `keys revoke alice`. Refused now, naming it."""
    import trio
    from redisserver import RedisServer

    from trio_bridge.accounts._keys import SecretStore
    from trio_bridge.cli._cli import main

    server = RedisServer(tmp_path)
    trio.run(server.start)
    try:
        first = SecretStore(tmp_path / "box1.toml", "tbk")
        first.add("alice", limits=KeyLimits(tokens_per_day=1000))
        second = SecretStore(tmp_path / "box2.toml", "tbk")
        second.add("alice", limits=KeyLimits(tokens_per_day=1000))
        cfg = tmp_path / "connector.toml"
        cfg.write_text(f'[connector]\nstore = "{server.url}"\nusage_file = ""\n')
        assert main(["keys", "import", str(tmp_path / "box1.toml"), "-c", str(cfg)]) == 0
        code = main(["keys", "import", str(tmp_path / "box2.toml"), "-c", str(cfg)])
        assert code != 0 and "already holds a usable key named 'alice'" in capsys.readouterr().err
        assert main(["keys", "list", "-c", str(cfg)]) == 0
        alices = [x for x in capsys.readouterr().out.splitlines() if x.startswith("alice ")]
        assert code != 0 or len(alices) == 1, alices
    finally:
        trio.run(server.kill)

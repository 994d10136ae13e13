"""Attacks on the pool's store (issue 27's review): races between boxes, a slow store, a
store restarted empty. Two :class:`PoolStore` objects in one process stand for two boxes
(each its own connection and instance id) against a real ``redis-server``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from redisserver import RedisServer, needs_redis

from trio_bridge.accounts._limits import KeyLimits
from trio_bridge.testing import Lab, open_lab

pytest.importorskip("coredis", reason="the [redis] extra (coredis) is not installed")

from trio_bridge.accounts._pool import PoolStore, put_keys, store_client

pytestmark = needs_redis


@asynccontextmanager
async def two_boxes(
    tmp_path: Path, limits: KeyLimits
) -> AsyncIterator[tuple[Lab, RedisServer, str, list[PoolStore]]]:
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        async with open_lab() as lab:
            config = lab.config(connector={"store": redis.url})
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

"""``GET /_bridge/usage``: the presented key's limits, what is left now, and its usage today and
over the last 30 days (JSON), answered by the connector, not by the LLM.

A request of that key: refused (429) beyond its concurrency or requests per minute, and
counted in them ("now" includes it); not by its token limits (it uses none, and a key out of
tokens may still see why). Built from the usage store's in-memory summary of this key alone
(bounded: 30 days × its models), never from the file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from trio_bridge.accounts._keys import SecretEntry, budget
from trio_bridge.accounts._usagestore import COLUMNS, utc_day
from trio_bridge.http._messages import REQUEST_ID
from trio_bridge.relay._protocol import ResponseHead

if TYPE_CHECKING:
    from trio_bridge.accounts._limits import KeyLimits, Limiter
    from trio_bridge.accounts._pool import PoolStore
    from trio_bridge.connector._request import RelayedRequest

USAGE_PATH = "/_bridge/usage"  # answered by the connector itself, for the key presented


def totals(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    out = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0, "refused": 0}
    for r in rows:
        for k in out:
            out[k] += r[k]
    return out


def by_day_and_model(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (day, model), the key's secrets added up (a rotation makes two)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        row = out.get((r["day"], r["model"]))
        if row is None:
            out[(r["day"], r["model"])] = {k: v for k, v in r.items() if k != "key_id"}
        else:
            for k in COLUMNS:
                row[k] += r[k]
    return list(out.values())


async def left_now(
    limiter: Limiter, pool: PoolStore | None, entry: SecretEntry, limits: KeyLimits
) -> dict[str, int | None]:
    """What is left now of ``entry``'s limits: the pool's, with a pool (its box's own counts
    while the store cannot be reached), else this connector's."""
    if pool is not None:
        return await pool.snapshot(budget(entry), limits)
    await trio.lowlevel.checkpoint()
    wall = time.time()  # wall clock
    return limiter.snapshot(budget(entry), limits, trio.current_time(), wall=wall)


async def answer_usage(req: RelayedRequest, entry: SecretEntry) -> str:
    """Admit the request under the key's request limits, then answer; its outcome."""
    limits = req.limits
    counted = attrs.evolve(limits, tokens_per_minute=None, tokens_per_day=None)
    pool = req.fw.pool
    refusal = req.admit(counted, limits) if pool is None else await req.admit_pooled(counted)
    if refusal is not None:
        return await req.answer(refusal)
    store = req.fw.usage_store
    wall = time.time()  # wall clock
    rows: list[dict[str, Any]] = []
    if store is not None:
        with trio.move_on_after(5):  # the summary is read at start, in a worker thread
            await store.load()
        if not store.loaded:
            return await req.reply_error(
                503, "usage is still being read; retry shortly", retry_after=1
            )
        # its secrets (rotations); not revoked ones: a name given anew
        ids = [e.id for e in req.fw.keys.entries_named(entry.name) if not e.revoked]
        rows = store.rows(since_day=utc_day(wall - 29 * 86400), key_ids=ids)
    today = utc_day(wall)
    doc = {
        "key": {"name": entry.name, "id": entry.id, "expires": entry.expires or None},
        "limits": {
            "concurrency": limits.concurrency,
            "requests_per_minute": limits.rpm,
            "tokens_per_minute": limits.tokens_per_minute,
            "tokens_per_day": limits.tokens_per_day,
            "models": list(limits.models) or None,
            "priority": limits.priority,
        },
        "now": await left_now(req.fw.limiter, pool, entry, limits),
        "today": totals(r for r in rows if r["day"] == today),
        "last_30_days": totals(rows),
        "by_day": by_day_and_model(rows),
        "stored": store is not None,
    }
    body = json.dumps(doc, indent=1).encode()
    req.facts.status = 200
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (REQUEST_ID, req.facts.request_id.encode()),
        (b"cache-control", b"no-store"),
    ]
    sent = await req.send_whole(ResponseHead(200, headers), body)
    return "ok" if sent else "client_stalled"

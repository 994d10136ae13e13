"""The connector's admin pages: the inspector's requests and timeline, usage per key and model,
and replaying a captured request to the LLM."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import httpx
import trio

from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import admin_token
from trio_bridge.accounts._usagestore import utc_day
from trio_bridge.accounts._users import approve, block
from trio_bridge.admin._inspect import scrub
from trio_bridge.admin._ui import Pages
from trio_bridge.http._messages import REQUEST_ID, new_request_id

if TYPE_CHECKING:
    from trio_bridge.connector._connector import Connector


def _int(query: dict[str, list[str]], name: str, default: int) -> int:
    try:
        return max(1, min(1000, int(query.get(name, [str(default)])[0])))
    except ValueError:
        return default


def _seq(text: str) -> int:
    return int(text) if text.isdigit() else -1


def pages(conn: Connector) -> Pages:
    ins = conn.inspector
    return Pages(
        "connector",
        token=admin_token(conn.config, conn.config.connector.admin_token_file),
        apis={
            "/api/requests": lambda q: {
                "requests": ins.recent(_int(q, "limit", 200)),
                "capture_bodies": ins.capture_bodies,
            },
            "/api/usage": lambda q: usage_summary(conn),
            "/api/users": lambda q: portal_users(conn),
            "/api/timeline": lambda q: {
                "now": time.time(),  # wall clock
                "since": conn.started,
                "events": [{"time": t, "what": w, "state": st} for t, w, st in ins.timeline],
                "queue": {"waiting": conn.slots.queued, "at_llm": conn.slots.busy},
                "llm": "up" if conn.llm.ready else "down",
                "relays": {url: st["state"] for url, st in conn.relay_states.items()},
            },
        },
        details=lambda seq: r.detail() if (r := ins.get(_seq(seq))) else None,
        events=ins.subscription,
        actions={
            "/api/replay/": lambda seq: replay(conn, seq),
            "/api/users/": lambda rest: user_action(conn, rest),
        },
    )


async def portal_users(conn: Connector) -> dict[str, Any]:
    """The portal's users and its audit log (``enabled: false`` when there is no portal)."""
    portal = conn.portal
    if portal is None:
        await trio.lowlevel.checkpoint()
        return {"enabled": False, "users": [], "audit": []}
    users, audit = await trio.to_thread.run_sync(
        lambda: (portal.users.users(), portal.users.audit_log(100))
    )
    docs = []
    for u in users:
        doc = u.doc()
        key = portal.current_key(u)
        doc["key"] = key.id if key else None
        docs.append(doc)
    return {"enabled": True, "users": docs, "audit": audit}


async def user_action(conn: Connector, rest: str) -> tuple[int, dict[str, Any]]:
    """``POST /api/users/<approve|block>/<id>`` from the admin page: (status, what was done)."""
    portal = conn.portal
    action, _, ident = rest.strip("/").partition("/")
    if portal is None or action not in ("approve", "block") or not ident.isdigit():
        await trio.lowlevel.checkpoint()
        return 404, {"error": "no such user action (is [portal] enabled?)"}

    def act() -> str:
        assert portal is not None
        user = portal.users.find(ident)
        if action == "approve":
            return approve(portal.users, user, "admin page")
        return block(portal.users, portal.keys, user, "admin page")

    try:
        done = await trio.to_thread.run_sync(act)
    except ConfigError as exc:
        return 404, {"error": str(exc)}  # noqa: ASYNC910  raised from the worker thread (awaited)
    return 200, {"done": done}


def usage_summary(conn: Connector) -> dict[str, Any]:
    """Tokens and requests per key and per model: today, 7 and 30 days (usage store), or
    since the start (in-memory counters) when there is no store."""
    names = {e.id: e.name for e in conn.keys.entries()}
    if conn.usage_store is None:
        per_key = {
            names.get(k, k): {"tokens": sum(p + c for p, c in models.values())}
            for k, models in conn.usage.items()
        }
        return {"stored": False, "periods": {"since start": {"keys": per_key, "models": {}}}}
    now = time.time()  # wall clock
    rows = conn.usage_store.rows(since_day=utc_day(now - 29 * 86400))
    periods: dict[str, Any] = {}
    for label, days in (("today", 0), ("7 days", 6), ("30 days", 29)):
        since = utc_day(now - days * 86400)
        keys: dict[str, dict[str, int]] = {}
        models: dict[str, dict[str, int]] = {}
        for r in rows:
            if r["day"] < since:
                continue
            for table, name in ((keys, names.get(r["key_id"], r["key_id"])), (models, r["model"])):
                t = table.setdefault(name, {"requests": 0, "tokens": 0, "errors": 0, "refused": 0})
                t["requests"] += r["requests"]
                t["tokens"] += r["prompt_tokens"] + r["completion_tokens"]
                t["errors"] += r["errors"]
                t["refused"] += r["refused"]
        periods[label] = {"keys": keys, "models": models}
    return {"stored": True, "periods": periods}


async def replay(conn: Connector, seq_text: str) -> tuple[int, dict[str, Any]]:
    """Send a captured request to the LLM again (from the admin page; not through a broker);
    the answer becomes a new inspector entry."""
    await trio.lowlevel.checkpoint()  # an admin action: whatever it answers
    ins, fw = conn.inspector, conn.forwarder
    old = ins.get(_seq(seq_text.strip("/")))
    if old is None:
        return 404, {"error": "no such request (or no longer kept)"}
    if old.request_body is None or old.request_truncated or not old.target:
        return 409, {"error": "its body was not captured in full: set [inspector] capture_bodies"}
    rec = ins.start(new_request_id(), old.method, old.path)
    rec.key_id, rec.key_name, rec.model, rec.replay_of = (
        old.key_id,
        "replay",
        old.model,
        old.request_id,
    )
    rec.request_headers = list(old.forward_headers)
    rec.request_body = old.request_body
    headers = [(k, v) for k, v in old.forward_headers if k != REQUEST_ID]
    headers.append((REQUEST_ID, rec.request_id.encode()))
    if fw.upstream_auth is not None:
        headers.append(fw.upstream_auth)
    t0 = trio.current_time()
    try:
        with trio.fail_after(fw.first_byte_timeout):
            async with conn.slots.slot("replay"):
                r = await fw.transport.handle_async_request(
                    httpx.Request(old.method, fw.url_for(old.target), headers=headers,
                                  content=old.request_body)
                )  # fmt: skip
                rec.ttfb_ms = round((trio.current_time() - t0) * 1000, 3)
                try:
                    async for chunk in r.stream:  # type: ignore[union-attr]
                        rec.response_body, rec.response_truncated = ins.capture(
                            chunk, rec.response_body
                        )
                        rec.bytes_out += len(chunk)
                finally:
                    await r.aclose()
    except (trio.TooSlowError, httpx.HTTPError) as exc:
        rec.outcome = "upstream_error"
        rec.reset = type(exc).__name__
        ins.finish(rec)
        return 502, {"error": f"the LLM did not answer: {type(exc).__name__}", "seq": rec.seq}
    rec.status, rec.outcome = r.status_code, "ok"
    rec.response_headers = scrub(r.headers.raw)
    rec.duration_ms = round((trio.current_time() - t0) * 1000, 3)
    ins.finish(rec)
    return 200, {"status": r.status_code, "seq": rec.seq}

"""Thin hypercorn glue shared by the broker, the admin endpoints and the test model."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from ._config import parse_hostport
from ._frames import MAX_MESSAGE

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def hypercorn_config(
    listen: str,
    *,
    graceful_timeout: float = 5.0,
    max_head: int = 32 * 1024,
    tls: tuple[str, str] | None = None,
    keep_alive: float = 15.0,
) -> HypercornConfig:
    host, port = parse_hostport(listen)
    cfg = HypercornConfig()
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.accesslog = None  # the bridge writes its own end-of-request line
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.include_server_header = False  # responses carry the LLM's own headers
    cfg.include_date_header = False
    cfg.websocket_max_message_size = MAX_MESSAGE + 1024
    cfg.graceful_timeout = graceful_timeout
    # also how long hypercorn holds a connection its client closed while idle (CLOSE-WAIT)
    cfg.keep_alive_timeout = keep_alive
    cfg.h11_max_incomplete_size = max_head  # a bigger request head gets 431
    # No read_timeout: hypercorn applies it to every read, also while it streams a long answer
    # to a client that (rightly) sends nothing, which would cut long generations.
    cfg.read_timeout = None
    cfg.keep_alive_max_requests = 100_000
    if tls is not None:
        cfg.certfile, cfg.keyfile = tls
    return cfg


async def serve_app(
    app: App,
    listen: str,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    graceful_timeout: float = 5.0,
    max_head: int = 32 * 1024,
    tls: tuple[str, str] | None = None,
    keep_alive: float = 15.0,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` (port 0 allowed), with TLS if ``tls`` = (cert, key) PEM
    paths; started value: the bound (host, port)."""
    cfg = hypercorn_config(
        listen, graceful_timeout=graceful_timeout, max_head=max_head, tls=tls, keep_alive=keep_alive
    )
    kwargs: dict[str, Any] = {}
    if shutdown_trigger is not None:
        kwargs["shutdown_trigger"] = shutdown_trigger

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, cfg, task_status=task_status, mode="asgi", **kwargs)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(run)
        host, port = parse_hostport(binds[0].split("://", 1)[1])
        task_status.started((host, port))


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer ASGI lifespan messages (we have nothing to set up per server)."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def send_simple(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None if it exceeds ``limit`` or the client went away."""
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts)

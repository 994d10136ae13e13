"""Thin hypercorn glue for the ASGI apps off the hot path: admin endpoints and the test model
(the broker's public port has its own server, ``_server``)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import trio

from trio_bridge._config import parse_hostport
from trio_bridge._net import TCP, Network
from trio_bridge.http._server import Handler, Request, ServerLimits, serve_http

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def hypercorn_config(
    listen: str, *, graceful_timeout: float = 5.0, keep_alive: float = 15.0
) -> HypercornConfig:
    from hypercorn.config import Config as HypercornConfig

    host, port = parse_hostport(listen)
    cfg = HypercornConfig()
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.include_server_header = False
    cfg.include_date_header = False
    cfg.graceful_timeout = graceful_timeout
    cfg.keep_alive_timeout = keep_alive
    # No read_timeout: hypercorn applies it to every read, also while it streams a long answer
    # to a client that (rightly) sends nothing, which would cut long generations.
    cfg.read_timeout = None
    return cfg


async def serve_app(
    app: App,
    listen: str,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    graceful_timeout: float = 5.0,
    keep_alive: float = 15.0,
    network: Network = TCP,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` (port 0 allowed); started value: the bound (host, port).
    On TCP with hypercorn; on another ``network`` (in memory, for tests) with our own server
    (:func:`asgi_handler`: HTTP only, no lifespan, no shutdown trigger)."""
    if network is not TCP:
        host, port = parse_hostport(listen)
        limits = ServerLimits(keep_alive_timeout=keep_alive)
        await serve_http(
            asgi_handler(app), host, port, limits, network=network, task_status=task_status
        )
        return
    # imported here: hypercorn takes ~0.1 s to import, which the CLI's other commands
    # (keys, tokens, usage, check) need not pay
    from hypercorn.trio import serve

    cfg = hypercorn_config(listen, graceful_timeout=graceful_timeout, keep_alive=keep_alive)
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


def asgi_handler(app: App) -> Handler:
    """An ASGI app (HTTP only) as a handler of our own HTTP/1.1 server
    (:func:`~trio_bridge.http._server.serve_http`): for a network hypercorn cannot listen on
    (``trio_bridge.testing.MemoryNetwork``). The body comes as ``http.request`` messages, then
    ``http.disconnect`` once the client has gone; the answer's framing is h11's."""

    async def handle(req: Request) -> None:
        raw_path, _, query = req.target.partition(b"?")
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": req.method,
            "scheme": req.scheme,
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": req.headers,
            "client": (req.client, 0),
            "server": None,
        }
        body_done = False
        head: tuple[int, list[tuple[bytes, bytes]]] | None = None

        async def receive() -> dict[str, Any]:
            nonlocal body_done
            if not body_done:
                chunk = bytes(await req.receive_body())
                body_done = not chunk
                return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}
            await req.wait_disconnect()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal head
            if message["type"] == "http.response.start":
                head = (message["status"], list(message.get("headers", [])))
                await trio.lowlevel.checkpoint()
            elif message["type"] == "http.response.body":
                body, more = message.get("body", b""), message.get("more_body", False)
                if head is not None:
                    (status, headers), head = head, None
                    await req.respond(status, headers, body, end=not more)
                else:
                    await req.send(body, end=not more)
            else:  # an extension this server does not offer: ignored
                await trio.lowlevel.checkpoint()

        await app(scope, receive, send)

    return handle

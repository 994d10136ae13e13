"""The admin web pages: the connector's live request inspector and the broker's overview.

Served by the role's admin endpoint (``admin_listen``, loopback by default) from small static
files in ``trio_bridge/admin/ui/`` (no CDN, no build step) and a few JSON endpoints; the connector's
page follows requests live through server-sent events (``/api/events``), no polling.

An optional admin token (``admin_token_file``) protects everything but ``/healthz`` and
``/readyz``: ``Authorization: Bearer <token>``, or open ``/?token=<token>`` once in a browser
(it sets an HttpOnly cookie). Before it, with or without a token, the admin endpoint refuses a
Host that is not its own and a state-changing request without a same-origin proof (see
``_admin.AdminGuard``): the page's script sends ``X-Trio-Bridge-Admin: 1`` with its POSTs.
"""

from __future__ import annotations

import hmac
import inspect
import json
import mimetypes
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import trio

from trio_bridge.http._asgi import Receive, Scope, Send, send_simple

_JSON = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
COOKIE = "tb_admin"
OPEN_PATHS = frozenset({"/healthz", "/readyz"})

Api = Callable[[dict[str, list[str]]], Any]


class Pages:
    """The pages of one role. ``apis``: GET path → function(query) returning JSON-able data
    (or an awaitable of it);
    ``actions``: POST path prefix → async function(rest of path) returning (status, data)."""

    def __init__(
        self,
        role: str,
        *,
        token: str | None = None,
        apis: dict[str, Api] | None = None,
        actions: dict[str, Callable[[str], Awaitable[tuple[int, Any]]]] | None = None,
        details: Callable[[str], Any] | None = None,
        events: Callable[[], Any] | None = None,
    ) -> None:
        self.role = role
        self.token = token
        self.apis = apis or {}
        self.actions = actions or {}
        self.details = details
        self.events = events

    def allowed(self, scope: Scope) -> bool:
        if self.token is None or scope["path"] in OPEN_PATHS:
            return True
        if scope["path"] == "/" and b"token=" in scope.get("query_string", b""):
            return True  # the login link: handle() checks the token and sets the cookie
        for k, v in scope["headers"]:
            if k == b"authorization" and v.startswith(b"Bearer "):
                return hmac.compare_digest(v[7:].strip(), self.token.encode())
            if k == b"cookie":
                for part in v.decode("latin-1").split(";"):
                    name, _, value = part.strip().partition("=")
                    if name == COOKIE and hmac.compare_digest(value, self.token):
                        return True
        return False

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer ``scope`` if it is one of ours; False if not (the caller answers 404)."""
        path, method = scope["path"], scope["method"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if path == "/" and self.token is not None and "token" in query:
            return await self._login(send, query["token"][0])
        if method == "GET" and path in ("/", "/index.html"):
            await _static(send, f"{self.role}.html")
            return True
        if method == "GET" and path.startswith("/ui/"):
            await _static(send, path[4:])
            return True
        if method == "GET" and path in self.apis:
            doc = self.apis[path](query)
            if inspect.isawaitable(doc):  # one that reads a file (in a worker thread)
                doc = await doc
            await _json(send, 200, doc)
            return True
        if method == "GET" and path.startswith("/api/requests/") and self.details:
            doc = self.details(path.rsplit("/", 1)[1])
            await _json(send, 200 if doc is not None else 404, doc or {"error": "no such request"})
            return True
        if method == "GET" and path == "/api/events" and self.events is not None:
            await self._stream_events(receive, send)
            return True
        if method == "POST":
            for prefix, action in self.actions.items():
                if path.startswith(prefix):
                    status, doc = await action(path[len(prefix) :])
                    await _json(send, status, doc)
                    return True
        return False  # noqa: ASYNC910  not ours: the caller answers (a checkpoint)

    async def _login(self, send: Send, token: str) -> bool:
        if self.token is None or not hmac.compare_digest(token, self.token):
            await _json(send, 401, {"error": "wrong admin token"})
            return True
        cookie = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
        await send_simple(send, 303, [(b"location", b"/"), (b"set-cookie", cookie.encode())], b"")
        return True

    async def _stream_events(self, receive: Receive, send: Send) -> None:
        """Server-sent events until the page goes away (a task watches for the disconnect)."""
        assert self.events is not None
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b": connected\n\n", "more_body": True})
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            with self.events() as events:
                while True:
                    with trio.move_on_after(15):  # a comment now and then keeps proxies open
                        event = await events.receive()
                        data = json.dumps(event, separators=(",", ":"))
                        chunk = f"event: {event['type']}\ndata: {data}\n\n".encode()
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        continue
                    await send(
                        {"type": "http.response.body", "body": b": -\n\n", "more_body": True}
                    )


async def _json(send: Send, status: int, doc: Any) -> None:
    await send_simple(send, status, _JSON, json.dumps(doc).encode())


async def _static(send: Send, name: str) -> None:
    if "/" in name or name.startswith(".") or not name:
        await _json(send, 404, {"error": "not found"})
        return
    try:
        data = resources.files("trio_bridge.admin").joinpath("ui", name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        await _json(send, 404, {"error": "not found"})
        return
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    headers = [
        (b"content-type", f"{ctype}; charset=utf-8".encode()),
        (b"cache-control", b"no-cache"),
        (b"x-content-type-options", b"nosniff"),
        (
            b"content-security-policy",
            b"default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:",
        ),
    ]
    await send_simple(send, 200, headers, data)

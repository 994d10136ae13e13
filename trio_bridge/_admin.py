"""The admin endpoint of a role (``admin_listen``, loopback by default; never the public port).

``GET /healthz``  200 while the process runs.
``GET /readyz``   200 when the role can serve (broker: serving, not draining; connector: a relay
                  to at least one broker is up AND the LLM answers), else 503.
``GET /status``   JSON: connections with state and since when, in-flight, recent latency.
``GET /metrics``  Prometheus text (prometheus-client).
``GET /``         the web page (connector: live request inspector; broker: routes and
                  connectors), with its JSON under ``/api/``; see ``_ui``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ._asgi import Receive, Scope, Send, lifespan, send_simple
from ._observe import Metrics
from ._ui import Pages

_JSON = [(b"content-type", b"application/json")]
_OWN = frozenset({"/healthz", "/readyz", "/status", "/metrics"})


class AdminApp:
    def __init__(
        self,
        metrics: Metrics,
        ready: Callable[[], bool],
        status: Callable[[], dict[str, Any]],
        pages: Pages | None = None,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.status = status
        self.pages = pages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.pages is not None and not self.pages.allowed(scope):
            await send_simple(
                send,
                401,
                [*_JSON, (b"www-authenticate", b'Bearer realm="trio-bridge admin"')],
                b'{"error": "this admin endpoint needs its admin token"}',
            )
            return
        await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            # e.g. a connector dialing the admin port instead of the relay: say so (404)
            await receive()  # websocket.connect
            await send({"type": "websocket.http.response.start", "status": 404, "headers": _JSON})
            await send(
                {
                    "type": "websocket.http.response.body",
                    "body": b'{"error": {"message": "this is an admin endpoint; the relay '
                    b'endpoint is on the public port", "type": "invalid_request_error", '
                    b'"code": "not_found"}}',
                }
            )
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if (
            self.pages is not None
            and path not in _OWN
            and await self.pages.handle(scope, receive, send)
        ):
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send_simple(send, 405, _JSON, b'{"error": "method not allowed"}')
        elif path == "/healthz":
            await send_simple(send, 200, _JSON, b'{"status": "alive"}')
        elif path == "/readyz":
            ok = self.ready()
            body = json.dumps({"ready": ok}).encode()
            await send_simple(send, 200 if ok else 503, _JSON, body)
        elif path == "/status":
            body = json.dumps(self.status(), indent=1).encode()
            await send_simple(send, 200, _JSON, body)
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            await send_simple(
                send, 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], self.metrics.render()
            )
        else:
            await send_simple(send, 404, _JSON, b'{"error": "not found"}')

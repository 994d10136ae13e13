"""A controllable upstream HTTP server for end-to-end tests (real hypercorn on loopback)."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from trio_bridge.http._asgi import Receive, Scope, Send, lifespan, read_body, send_simple, serve_app

SSE_BYTES = [
    b'data: {"id":"x","choices":[{"delta":{"content":"H\\u00e9llo"}}]}\n\n',
    b": keep-alive comment\r\n\r\n",
    b'data: {"id":"x","choices":[{"delta":{"content":" w\\u00f6rld"}}]}\n\n',
    b"data: [DONE]\n\n",
]
GZIP_BODY = gzip.compress(b'{"hello": "compressed world"}' * 10, mtime=0)


class Upstream:
    """Paths: /echo (body back + sha256 header), /headers (request headers as JSON),
    /sse (fixed SSE bytes), /gzip (gzip-encoded body), /slow-head?s=N, /hang (no answer until the
    client goes away), /stall (head, one chunk,
    then silence), /die (head, one chunk, then the connection is cut), /forever (a chunk every
    10 ms until the client goes away), /big?n=N (N bytes, streamed in 64 KiB chunks),
    /big-json (``big_json``, as application/json)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.disconnected = trio.Event()
        self.disconnect_time: float | None = None
        self.forever_started = trio.Event()
        #: what /big-json answers (application/json, in 64 KiB chunks)
        self.big_json = b"{}"

    def forwarded(self) -> list[dict[str, Any]]:
        """Requests that came through the bridge (the connector's health probes do not carry
        an X-Request-ID)."""
        return [r for r in self.requests if any(k == "x-request-id" for k, _ in r["headers"])]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive, 64 * 1024 * 1024)
        if body is None:
            return
        path = scope["path"]
        query = scope["query_string"].decode()
        self.requests.append(
            {
                "method": scope["method"],
                "path": path,
                "query": query,
                "raw_path": scope.get("raw_path"),
                "headers": [(k.decode(), v.decode("latin-1")) for k, v in scope["headers"]],
                "sha256": hashlib.sha256(body).hexdigest(),
                "size": len(body),
            }
        )
        if path == "/echo":
            await send_simple(
                send,
                200,
                [
                    (b"content-type", b"application/octet-stream"),
                    (b"x-body-sha256", hashlib.sha256(body).hexdigest().encode()),
                ],
                body,
            )
        elif path == "/headers":
            doc = json.dumps(self.requests[-1]["headers"]).encode()
            await send_simple(send, 200, [(b"content-type", b"application/json")], doc)
        elif path == "/sse":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            for chunk in SSE_BYTES:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await trio.sleep(0.01)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif path == "/fail":  # an LLM's own error answer, naming no model
            await send_simple(
                send,
                500,
                [(b"content-type", b"application/json")],
                b'{"error": {"message": "model crashed", "type": "server_error"}}',
            )
        elif path == "/gzip":
            await send_simple(
                send,
                200,
                [
                    (b"content-type", b"application/json"),
                    (b"content-encoding", b"gzip"),
                    (b"content-length", str(len(GZIP_BODY)).encode()),
                ],
                GZIP_BODY,
            )
        elif path == "/hang":  # no head at all, until the client goes away
            self.forever_started.set()
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnect_time = trio.current_time()
            self.disconnected.set()
        elif path == "/slow-head":
            await trio.sleep(float(query.split("=")[1]))
            await send_simple(send, 200, [], b"late")
        elif path in ("/stall", "/die"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            await send(
                {"type": "http.response.body", "body": b"data: first\n\n", "more_body": True}
            )
            await trio.sleep(0.2)
            if path == "/die":
                raise RuntimeError("simulated LLM crash mid-stream")
            await trio.sleep(3600)
        elif path == "/forever":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            self.forever_started.set()
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.disconnect_time = trio.current_time()
                    self.disconnected.set()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                i = 0
                while True:
                    i += 1
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"data: %d\n\n" % i,
                            "more_body": True,
                        }
                    )
                    await trio.sleep(0.01)
        elif path == "/big-json":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            data = self.big_json
            for i in range(0, len(data), 65536):
                part = data[i : i + 65536]
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif path == "/big":
            n = int(query.split("=")[1])
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", str(n).encode())],
                }
            )
            block = b"z" * 65536
            while n > 0:
                part = block[: min(n, len(block))]
                n -= len(part)
                await send({"type": "http.response.body", "body": part, "more_body": n > 0})
        else:
            await send_simple(send, 404, [], b"no such path")


@asynccontextmanager
async def run_upstream() -> AsyncIterator[tuple[Upstream, str]]:
    app = Upstream()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_app, app, "127.0.0.1:0")
        yield app, f"http://{host}:{port}"
        nursery.cancel_scope.cancel()

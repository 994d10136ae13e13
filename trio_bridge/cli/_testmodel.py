"""The built-in test model: a small deterministic OpenAI-compatible (and Ollama-style) server.

It is **not an LLM**: it answers every chat with a fixed sentence that echoes the last user
message, or, when asked to "count to N", with "1 2 3 … N" (handy for long streams); asked to
"fail with NNN" (a status from 400 to 599), it answers that error, as an LLM server in trouble
would, and asked to "wait N s" (up to an hour) it says nothing for N seconds before it answers
(for tests of what a client, the bridge's timeouts, logs and metrics make of it). Tokens are
words, streamed at a steady pace (``token_delay``). Used by ``python -m trio_bridge demo`` when
no real LLM answers, and by the test suite (``trio_bridge.testing``).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or SSE, honours
``max_tokens`` and ``stream_options.include_usage``), ``POST /v1/completions``,
``POST /v1/embeddings``, ``POST /api/chat`` and ``POST /api/generate`` (Ollama NDJSON),
``GET /api/tags``. It records the head of every request it saw (``requests``) and counts
streams that ended because the client went away (``disconnects``), for tests.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import deque
from typing import Any

import attrs
import trio

from trio_bridge._net import TCP, Network
from trio_bridge.http._asgi import Receive, Scope, Send, lifespan, read_body, send_simple, serve_app
from trio_bridge.http._messages import error_body

MODEL_ID = "trio-bridge-test-model"
_COUNT = re.compile(r"count to (\d{1,6})", re.IGNORECASE)


@attrs.define
class SeenRequest:
    method: str
    path: str
    query: str
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.decode("latin-1").lower() == name.lower():
                return v.decode("latin-1")
        return None


def reply_tokens(prompt: str, max_tokens: int | None) -> tuple[list[str], str]:
    """The reply as word tokens (each with its leading space) and the finish reason."""
    m = _COUNT.search(prompt)
    if m:
        words = [str(i) for i in range(1, int(m.group(1)) + 1)]
    else:
        said = " ".join(prompt.split())[:200] or "nothing"
        words = f"Hello! I am the trio_bridge test model, not a real LLM. You said: {said}".split()
    tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
    if max_tokens is not None and max_tokens < len(tokens):
        return tokens[:max_tokens], "length"
    return tokens, "stop"


def _prompt_tokens(text: str) -> int:
    return max(1, len(text.split()))


class TestModel:
    """The ASGI app. ``token_delay`` seconds between streamed tokens."""

    __test__ = False  # not a pytest test class

    def __init__(self, *, token_delay: float = 0.02, models: tuple[str, ...] | None = None) -> None:
        """``models``: the model ids it lists and accepts (others: 404 like vLLM); default:
        it lists its own id and answers for any model name (like llama.cpp)."""
        self.token_delay = token_delay
        self.models = models
        self.requests: deque[SeenRequest] = deque(maxlen=1000)
        self.disconnects = 0
        self.completed_streams = 0
        self.active_streams = 0

    async def serve(
        self,
        listen: str = "127.0.0.1:0",
        *,
        network: Network = TCP,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await serve_app(self, listen, network=network, task_status=task_status)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # noqa: ASYNC910  not HTTP: nothing to answer
        body = await read_body(receive, 64 * 1024 * 1024)
        if body is None:
            return
        path = scope["path"]
        self.requests.append(
            SeenRequest(
                scope["method"],
                path,
                scope.get("query_string", b"").decode("latin-1"),
                list(scope["headers"]),
                body,
            )
        )
        method = scope["method"]
        ids = self.models or (MODEL_ID,)
        if method == "GET" and path in ("/v1/models", "/models"):
            await _json(send, 200, {"object": "list", "data": [_model_card(m) for m in ids]})
        elif method == "GET" and path.startswith("/v1/models/") and path[11:] in ids:
            await _json(send, 200, _model_card(path[11:]))
        elif method == "GET" and path == "/api/tags":
            await _json(send, 200, {"models": [{"name": m, "model": m} for m in ids]})
        elif method == "GET" and path in ("/health", "/"):
            await _json(send, 200, {"status": "ok", "model": MODEL_ID})
        elif method == "POST" and path in (
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/api/chat",
            "/api/generate",
        ):
            try:
                req = json.loads(body)
                if not isinstance(req, dict):
                    raise ValueError
            except ValueError:
                await _error(send, 400, "could not parse the JSON body")
                return
            if self.models is not None and req.get("model") not in self.models:
                await _error(
                    send,
                    404,
                    f"the model {req.get('model')!r} does not exist",
                    code="model_not_found",
                )
                return
            if path == "/v1/embeddings":
                await self._embeddings(send, req)
            elif path.startswith("/api/"):
                await self._ollama(receive, send, req, chat=path == "/api/chat")
            else:
                await self._openai(receive, send, req, chat=path == "/v1/chat/completions")
        else:
            await _error(send, 404, f"no route {method} {path}", code="not_found")

    async def _openai(
        self, receive: Receive, send: Send, req: dict[str, Any], *, chat: bool
    ) -> None:
        if chat:
            messages = req.get("messages")
            if not isinstance(messages, list) or not messages:
                await _error(send, 400, "'messages' must be a non-empty list")
                return
            users = [
                m.get("content", "")
                for m in messages
                if isinstance(m, dict) and m.get("role") == "user"
            ]
            prompt = str(users[-1]) if users else ""
        else:
            prompt = str(req.get("prompt", ""))
        if (wait := _WAIT.fullmatch(prompt.strip())) and float(wait[1]) <= 3600:
            await trio.sleep(float(wait[1]))
        if (failure := _FAIL.fullmatch(prompt.strip())) and 400 <= int(failure[1]) <= 599:
            status = int(failure[1])
            await _error(send, status, f"failing as asked ({status})", code="test_failure")
            return
        max_tokens = req.get("max_tokens") or req.get("max_completion_tokens")
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
            await _error(send, 400, "'max_tokens' must be a positive integer")
            return
        tokens, finish = reply_tokens(prompt, max_tokens)
        model = str(req.get("model") or MODEL_ID)
        created = int(time.time())  # wall clock
        cid = ("chatcmpl-" if chat else "cmpl-") + hashlib.sha256(
            f"{prompt}{created}".encode()
        ).hexdigest()[:24]
        usage = {
            "prompt_tokens": _prompt_tokens(prompt),
            "completion_tokens": len(tokens),
            "total_tokens": _prompt_tokens(prompt) + len(tokens),
        }
        obj = "chat.completion" if chat else "text_completion"
        if not req.get("stream"):
            text = "".join(tokens)
            choice: dict[str, Any] = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": finish}
            )
            await _json(
                send,
                200,
                {
                    "id": cid,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                },
            )
            return
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        head = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model}  # fmt: skip
        events = _sse_events(head, tokens, finish, chat, usage if include_usage else None)
        await self._stream(receive, send, "text/event-stream", events)

    async def _ollama(
        self, receive: Receive, send: Send, req: dict[str, Any], *, chat: bool
    ) -> None:
        if chat:
            messages = req.get("messages") or []
            users = [
                m.get("content", "")
                for m in messages
                if isinstance(m, dict) and m.get("role") == "user"
            ]
            prompt = str(users[-1]) if users else ""
        else:
            prompt = str(req.get("prompt", ""))
        opts = req.get("options") or {}
        num_predict = opts.get("num_predict") if isinstance(opts, dict) else None
        tokens, _finish = reply_tokens(prompt, num_predict if type(num_predict) is int else None)
        model = str(req.get("model") or MODEL_ID)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

        def line(tok: str, done: bool) -> bytes:
            doc: dict[str, Any] = {"model": model, "created_at": stamp, "done": done}
            if chat:
                doc["message"] = {"role": "assistant", "content": tok}
            else:
                doc["response"] = tok
            if done:
                doc.update(
                    done_reason="stop",
                    prompt_eval_count=_prompt_tokens(prompt),
                    eval_count=len(tokens),
                )
            return json.dumps(doc).encode() + b"\n"

        if req.get("stream", True) is False:
            await _json(send, 200, json.loads(line("".join(tokens), True)))
            return
        events = [line(t, False) for t in tokens] + [line("", True)]
        await self._stream(receive, send, "application/x-ndjson", events)

    async def _embeddings(self, send: Send, req: dict[str, Any]) -> None:
        inputs = req.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for i, item in enumerate(items):
            digest = hashlib.sha256(str(item).encode()).digest()
            data.append(
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": [round(b / 255.0 - 0.5, 4) for b in digest[:8]],
                }
            )
        n = sum(_prompt_tokens(str(x)) for x in items)
        await _json(
            send,
            200,
            {
                "object": "list",
                "data": data,
                "model": MODEL_ID,
                "usage": {"prompt_tokens": n, "total_tokens": n},
            },
        )

    async def _stream(self, receive: Receive, send: Send, ctype: str, events: list[bytes]) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", ctype.encode()), (b"cache-control", b"no-cache")],
            }
        )
        self.active_streams += 1
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.disconnects += 1
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                for i, ev in enumerate(events):
                    if i and self.token_delay:
                        await trio.sleep(self.token_delay)
                    await send({"type": "http.response.body", "body": ev, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                self.completed_streams += 1
                nursery.cancel_scope.cancel()
        finally:
            self.active_streams -= 1


def _model_card(model: str = MODEL_ID) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "trio-bridge"}


async def _json(send: Send, status: int, doc: Any) -> None:
    body = json.dumps(doc).encode()
    await send_simple(
        send,
        status,
        [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        body,
    )


_FAIL = re.compile(r"fail with (\d{3})", re.I)
_WAIT = re.compile(r"wait (\d+(?:\.\d+)?) ?s", re.I)


async def _error(send: Send, status: int, message: str, code: str = "invalid_request") -> None:
    body = error_body(message, "server_error" if status >= 500 else "invalid_request_error", code)
    await send_simple(
        send,
        status,
        [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        body,
    )


def _sse_events(
    head: dict[str, Any],
    tokens: list[str],
    finish: str,
    chat: bool,
    usage: dict[str, int] | None,
) -> list[bytes]:
    """A streamed OpenAI answer as SSE events: one per token, the finish, usage if asked."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**head, "choices": choices, **extra}).encode() + b"\n\n"

    def piece(i: int, tok: str | None, fin: str | None) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {} if tok is None else {"content": tok}
            if i == 0 and tok is not None:
                delta = {"role": "assistant", "content": tok}
            return {"index": 0, "delta": delta, "finish_reason": fin}
        return {"index": 0, "text": tok or "", "finish_reason": fin}

    events = [event([piece(i, t, None)]) for i, t in enumerate(tokens)]
    events.append(event([piece(len(tokens), None, finish)]))
    if usage is not None:
        events.append(event([], usage=usage))
    events.append(b"data: [DONE]\n\n")
    return events

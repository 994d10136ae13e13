"""Token usage read from a *copy* of an LLM's answer (pure; the forwarded bytes are untouched).

- ``application/json`` (non-streamed): the whole body (up to 1 MiB) is parsed at the end:
  OpenAI ``usage.prompt_tokens`` / ``usage.completion_tokens``, or Ollama's
  ``prompt_eval_count`` / ``eval_count``.
- ``text/event-stream`` (OpenAI streaming): events are split on blank lines; only events that
  carry a non-null ``"usage"`` object are parsed (the final chunk when the client asked for
  ``stream_options.include_usage``, or servers that always send it); the first event gives the
  model name.
- ``application/x-ndjson`` (Ollama streaming): the line with ``"done": true`` is parsed.

``events`` counts the data events / lines of a streamed answer ([DONE] excluded): servers send
one token per event (llama.cpp, vLLM, Ollama), so it estimates the completion tokens of a stream
that carries no usage (to within the one or two events that carry only a role or the end).

Anything that does not parse is simply not counted. Memory is bounded: at most one partial
event / line (64 KiB) or one JSON body (1 MiB) is kept.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON = 1024 * 1024
MAX_EVENT = 64 * 1024
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_DONE = re.compile(rb'"done"\s*:\s*true')


class UsageSniffer:
    __slots__ = (
        "_buf",
        "_first",
        "_kind",
        "_skip",
        "completion_tokens",
        "events",
        "model",
        "prompt_tokens",
    )

    def __init__(self, content_type: bytes | None, content_encoding: bytes | None = None) -> None:
        ct = (content_type or b"").split(b";", 1)[0].strip().lower()
        kind = None
        if not content_encoding or content_encoding.strip().lower() == b"identity":
            if ct == b"application/json":
                kind = "json"
            elif ct == b"text/event-stream":
                kind = "sse"
            elif ct in (b"application/x-ndjson", b"application/jsonl"):
                kind = "ndjson"
        self._kind = kind
        self._buf = bytearray()
        self._skip = False
        self._first = True  # the first event is parsed for the model name, even without usage
        self.model: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.events = 0

    @property
    def active(self) -> bool:
        return self._kind is not None

    @property
    def streamed(self) -> bool:
        """An SSE or NDJSON answer (a generation streamed event by event)."""
        return self._kind in ("sse", "ndjson")

    def feed(self, chunk: bytes) -> None:
        kind = self._kind
        if kind is None:
            return
        if kind == "json":
            if len(self._buf) + len(chunk) > MAX_JSON:
                self._kind = None  # too big to be an answer worth counting
                self._buf.clear()
            else:
                self._buf += chunk
            return
        sep = b"\n\n" if kind == "sse" else b"\n"
        buf = self._buf
        if not buf and not self._skip and chunk.find(sep) == len(chunk) - len(sep) >= 0:
            # the usual chunk of a stream: one whole event (a token) and nothing before it
            self._event(chunk[: -len(sep)])
            return
        buf += chunk
        start = 0
        while (end := buf.find(sep, start)) != -1:
            if not self._skip:
                self._event(bytes(buf[start:end]))
            self._skip = False
            start = end + len(sep)
        del buf[:start]
        if len(buf) > MAX_EVENT:  # one absurd event: forget it and resync at the next separator
            buf.clear()
            self._skip = True

    def finish(self) -> None:
        if self._kind == "json":
            self._take(_loads(bytes(self._buf)))
        elif self._kind in ("sse", "ndjson") and self._buf and not self._skip:
            self._event(bytes(self._buf))
        self._buf.clear()

    def _event(self, raw: bytes) -> None:
        if self._kind == "sse":
            if raw.startswith(b"data:") and b"\n" not in raw:  # the usual one-line event
                data = raw[5:].lstrip(b" ")
            else:
                raw = raw.replace(b"\r\n", b"\n")
                data = b"\n".join(
                    line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")
                )
            if not data or data == b"[DONE]":
                return
            self.events += 1
            if self._first or _USAGE.search(data):
                self._first = False
                self._take(_loads(data))
        else:
            if raw.strip():
                self.events += 1
            if self._first or _DONE.search(raw):
                self._first = False
                self._take(_loads(raw))

    def _take(self, doc: Any) -> None:
        if not isinstance(doc, dict):
            return
        model = doc.get("model")
        if isinstance(model, str) and model and self.model is None:
            self.model = model
        usage = doc.get("usage")
        if isinstance(usage, dict):
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
            if type(p) is int and type(c) is int:  # embeddings report no completion tokens
                self.prompt_tokens, self.completion_tokens = p, c
        elif doc.get("done") is True:
            p, c = doc.get("prompt_eval_count"), doc.get("eval_count")
            if type(p) is int and type(c) is int:
                self.prompt_tokens, self.completion_tokens = p, c


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None

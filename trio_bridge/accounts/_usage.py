"""Token usage read from a *copy* of an LLM's answer (pure; the forwarded bytes are untouched).

- ``application/json`` (non-streamed): the whole body (up to 1 MiB) is parsed at the end:
  OpenAI ``usage.prompt_tokens`` / ``usage.completion_tokens``, or Ollama's
  ``prompt_eval_count`` / ``eval_count``. A bigger body (a long answer, a large embeddings
  batch) is not held: only its first and last 64 KiB are kept, and at the end the last
  ``"usage": {...}`` object of the tail (where OpenAI-style servers put it, after
  ``choices`` / ``data``), or Ollama's counts, are read there; a ``usage`` object passed on
  the way is kept too (vLLM writes ``prompt_logprobs`` / ``prompt_token_ids`` after it);
  the model from the head's first ``"model"`` (else the tail's last). Inside a JSON string a
  quote is escaped, so text that merely mentions ``"usage"`` is never taken for it.
- ``text/event-stream`` (OpenAI streaming): events are split on blank lines; only events that
  carry a non-null ``"usage"`` object are parsed (the final chunk when the client asked for
  ``stream_options.include_usage``, or servers that always send it); the first event gives the
  model name.
- ``application/x-ndjson`` (Ollama streaming): the line with ``"done": true`` is parsed.

``events`` counts the data events / lines of a streamed answer ([DONE] excluded): servers send
one token per event (llama.cpp, vLLM, Ollama), so it estimates the completion tokens of a stream
that carries no usage (to within the one or two events that carry only a role or the end).

Anything that does not parse is simply not counted. Memory is bounded: at most one partial
event / line (64 KiB), one JSON body (1 MiB), or a big body's head and tail (2 × 64 KiB, the
tail briefly twice that) is kept.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON = 1024 * 1024
MAX_EVENT = 64 * 1024
EDGE = 64 * 1024  # of a big JSON body, the head and the tail kept
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_DONE = re.compile(rb'"done"\s*:\s*true')
_MODEL = re.compile(rb'"model"\s*:\s*"')
_OLLAMA_COUNT = re.compile(rb'"(prompt_eval_count|eval_count)"\s*:\s*(\d{1,15})\b')
_DECODER = json.JSONDecoder()


class UsageSniffer:
    __slots__ = (
        "_buf",
        "_first",
        "_head",
        "_kind",
        "_skip",
        "_usage",
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
        self._head: bytes | None = None  # a big JSON body's first EDGE bytes
        self._usage: dict[str, Any] | None = None  # the last usage seen in what was dropped
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
            buf = self._buf
            buf += chunk
            if self._head is None:
                if len(buf) > MAX_JSON:  # too big to hold: keep its head, then only a tail
                    self._head = bytes(buf[:EDGE])
                    self._trim()
            elif len(buf) > 2 * EDGE:
                self._trim()
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

    def _trim(self) -> None:
        """Drop all but the last EDGE bytes of a big JSON body, keeping the last ``usage``
        object seen in what is dropped (vLLM writes more after it: prompt_logprobs, …). One
        that is not complete yet keeps the tail from its start on (it is small)."""
        buf = self._buf
        cut = len(buf) - EDGE
        found = _last(_USAGE, buf)
        if found is not None and found.start() < cut:
            usage = _value_at(bytes(buf[found.end() - 1 :]), 0)
            if isinstance(usage, dict):
                self._usage = usage
            elif len(buf) - found.start() < 4 * EDGE:
                cut = found.start()
        del buf[:cut]

    def finish(self) -> None:
        if self._kind == "json":
            if self._head is None:
                self._take(_loads(bytes(self._buf)))
            else:
                doc = _edges(self._head, bytes(self._buf))
                if "usage" not in doc and self._usage is not None:
                    doc["usage"] = self._usage
                self._take(doc)
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
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _value_at(raw: bytes, start: int) -> Any:
    """The JSON value that starts at ``raw[start]``, or None."""
    try:
        return _DECODER.raw_decode(raw.decode("utf-8", "replace"), start)[0]
    except (ValueError, RecursionError):
        return None


def _edges(head: bytes, tail: bytes) -> dict[str, Any]:
    """What :meth:`UsageSniffer._take` needs of a JSON body too big to hold, from its first
    and last bytes: the model, and the usage (OpenAI) or the counts (Ollama)."""
    doc: dict[str, Any] = {}
    found = _MODEL.search(head) or _last(_MODEL, tail)
    source = head if found is not None and found.string is head else tail
    if found is not None:
        # the text before the match is ASCII-safe to cut at: decode from the quote on
        doc["model"] = _value_at(source[found.end() - 1 :], 0)
    usage = _last(_USAGE, tail)
    if usage is not None:
        doc["usage"] = _value_at(tail[usage.end() - 1 :], 0)
    elif _DONE.search(tail):
        doc["done"] = True
        for m in _OLLAMA_COUNT.finditer(tail):
            doc[m.group(1).decode()] = int(m.group(2))
    return doc


def _last(pattern: re.Pattern[bytes], raw: bytes | bytearray) -> re.Match[bytes] | None:
    found = None
    for found in pattern.finditer(raw):  # noqa: B007 (the last one is wanted)
        pass
    return found

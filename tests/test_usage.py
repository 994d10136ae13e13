"""Token usage is read from a copy of the answer, in any chunking; garbage is not counted."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from trio_bridge._usage import UsageSniffer

SSE = (
    b'data: {"id":"1","model":"llama3","choices":[{"delta":{"content":"Hi"}}],"usage":null}\n\n'
    b'data: {"id":"1","model":"llama3","choices":[{"delta":{"content":" there"}}]}\n\n'
    b'data: {"id":"1","model":"llama3","choices":[],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14}}\n\n'
    b"data: [DONE]\n\n"
)
NDJSON = (
    b'{"model":"qwen","message":{"content":"a"},"done":false}\n'
    b'{"model":"qwen","message":{"content":""},"done":true,"prompt_eval_count":7,'
    b'"eval_count":3}\n'
)


def sniff(ctype: bytes, body: bytes, cuts: list[int]) -> UsageSniffer:
    s = UsageSniffer(ctype)
    prev = 0
    for cut in [*sorted(cuts), len(body)]:
        s.feed(body[prev:cut])
        prev = cut
    s.finish()
    return s


@given(st.lists(st.integers(0, len(SSE)), max_size=8))
def test_sse_usage_in_any_chunking(cuts: list[int]) -> None:
    s = sniff(b"text/event-stream; charset=utf-8", SSE, cuts)
    assert (s.model, s.prompt_tokens, s.completion_tokens) == ("llama3", 12, 2)


@given(st.lists(st.integers(0, len(NDJSON)), max_size=8))
def test_ollama_ndjson_usage_in_any_chunking(cuts: list[int]) -> None:
    s = sniff(b"application/x-ndjson", NDJSON, cuts)
    assert (s.model, s.prompt_tokens, s.completion_tokens) == ("qwen", 7, 3)


def test_non_streamed_json_usage() -> None:
    doc = {"model": "m", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}}
    s = sniff(b"application/json", json.dumps(doc).encode(), [3, 10])
    assert (s.model, s.prompt_tokens, s.completion_tokens) == ("m", 5, 9)


@given(
    st.binary(max_size=3000),
    st.sampled_from([b"application/json", b"text/event-stream", b"application/x-ndjson"]),
)
def test_garbage_is_simply_not_counted(garbage: bytes, ctype: bytes) -> None:
    s = sniff(ctype, garbage, [len(garbage) // 2])
    assert s.prompt_tokens is None or isinstance(s.prompt_tokens, int)


def test_compressed_or_unknown_bodies_are_ignored() -> None:
    assert not UsageSniffer(b"application/json", b"gzip").active
    assert not UsageSniffer(b"text/plain").active


def test_memory_stays_bounded_with_an_endless_event() -> None:
    s = UsageSniffer(b"text/event-stream")
    for _ in range(200):
        s.feed(b"x" * 10000)
    assert len(s._buf) <= 64 * 1024 + 10000
    s.feed(b"\n\n" + SSE)
    s.finish()
    assert s.completion_tokens == 2


@given(st.lists(st.integers(0, len(SSE)), max_size=8))
def test_streamed_events_are_counted_in_any_chunking(cuts: list[int]) -> None:
    s = sniff(b"text/event-stream", SSE, cuts)
    assert s.events == 3  # [DONE] is not an event with a token
    n = sniff(b"application/x-ndjson", NDJSON, [])
    assert n.events == 2

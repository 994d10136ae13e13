"""Token usage is read from a copy of the answer, in any chunking; garbage is not counted."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from trio_bridge.accounts._usage import UsageSniffer

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


_EVENT = st.builds(
    lambda doc, spaces, usage: (
        b"data:"
        + b" " * spaces
        + json.dumps({**doc, **({"usage": usage} if usage else {})}).encode()
    ),
    st.fixed_dictionaries({"model": st.sampled_from(["a", "b"]), "n": st.integers(0, 9)}),
    st.integers(0, 2),
    st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {"prompt_tokens": st.integers(0, 99), "completion_tokens": st.integers(0, 99)}
        ),
    ),
) | st.sampled_from([b": keep-alive", b"event: x\ndata: {}", b"data: [DONE]", b"data:\r\ndata: 1"])


@given(st.lists(_EVENT, max_size=12), st.lists(st.integers(0, 4000), max_size=8))
def test_an_event_per_chunk_counts_as_any_other_chunking(
    events: list[bytes], cuts: list[int]
) -> None:
    """Servers send one whole event per chunk (the fast path): same model, usage and event
    count as the same bytes cut anywhere."""
    body = b"".join(e + b"\n\n" for e in events)
    one_each = UsageSniffer(b"text/event-stream")
    for e in events:
        one_each.feed(e + b"\n\n")
    one_each.finish()
    got = (one_each.model, one_each.prompt_tokens, one_each.completion_tokens, one_each.events)
    cut = sniff(b"text/event-stream", body, [c for c in cuts if c <= len(body)])
    assert got == (cut.model, cut.prompt_tokens, cut.completion_tokens, cut.events)
    bytewise = sniff(b"text/event-stream", body, list(range(len(body))))  # never whole events
    assert got == (bytewise.model, bytewise.prompt_tokens, bytewise.completion_tokens,
                   bytewise.events)  # fmt: skip

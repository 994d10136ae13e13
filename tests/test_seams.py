"""Sealed seams: limits fail closed, every answer is counted, secrets are never relayed."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from trio_websocket import ConnectionRejected, open_websocket_url
from upstream import run_upstream

from trio_bridge.accounts._limits import KeyLimits
from trio_bridge.accounts._usage import UsageSniffer
from trio_bridge.http._messages import ModelUnknown, declared_model, presented_key
from trio_bridge.testing import Lab, open_lab


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with open_lab() as lab:
        yield lab


def chat(model: str = "qwen2.5-coder:7b") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


# -- the model allowlist fails closed -----------------------------------------------------------

GOOD = json.dumps(chat()).encode()
UNREADABLE = {
    "UTF-8 BOM": b"\xef\xbb\xbf" + GOOD,
    "UTF-16": json.dumps(chat()).encode("utf-16"),
    "invalid UTF-8": GOOD[:-2] + b'\xff"}',
    "top-level array": b"[" + GOOD + b"]",
    "not JSON": b"model=qwen2.5-coder:7b",
    "no model": b'{"messages": []}',
    "model not a string": b'{"model": ["qwen2.5-coder:7b"]}',
    "two models": b'{"model": "qwen2.5-coder:7b", "model": "llama3:70b"}',
    # Go's encoding/json (Ollama) matches keys case-insensitively, the last one winning
    "MODEL beside model": b'{"model": "qwen2.5-coder:7b", "MODEL": "llama3:70b"}',
    "Model alone": b'{"Model": "qwen2.5-coder:7b"}',
    "deeply nested": b'{"model": "qwen2.5-coder:7b", "x": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}",
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_a_body_whose_model_cannot_be_read_is_refused_with_the_reason(name: str) -> None:
    with pytest.raises(ModelUnknown) as info:
        declared_model(UNREADABLE[name], None)
    assert str(info.value)


def test_a_compressed_body_is_refused_for_an_allowlisted_key() -> None:
    with pytest.raises(ModelUnknown, match="compressed"):
        declared_model(gzip.compress(GOOD), b"gzip")


def test_a_plain_body_gives_its_model_and_no_body_gives_none() -> None:
    assert declared_model(GOOD, None) == "qwen2.5-coder:7b"
    assert declared_model(GOOD, b"identity") == "qwen2.5-coder:7b"
    assert declared_model(b"", None) is None


@pytest.mark.parametrize("name", [*UNREADABLE, "gzip"])
async def test_an_allowlisted_key_gets_400_and_nothing_reaches_the_llm(lab: Lab, name: str) -> None:
    _, key = lab.keys.add("coder", limits=KeyLimits(models=("qwen2.5-coder*",)))
    body, headers = UNREADABLE.get(name, gzip.compress(GOOD)), {"Authorization": f"Bearer {key}"}
    if name == "gzip":
        headers["Content-Encoding"] = "gzip"
    async with run_upstream() as (app, llm):
        rb = await lab.start_broker()
        await lab.start_connector([rb], llm)
        async with httpx.AsyncClient() as client:
            r = await client.post(rb.url + "/echo", content=body, headers=headers)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["type"] == "invalid_request_error"
            assert app.forwarded() == []
            r = await client.post(
                rb.url + "/echo", json=chat(), headers={"Authorization": f"Bearer {key}"}
            )
            assert r.status_code == 200


async def test_a_deeply_nested_body_is_400_without_a_traceback_for_any_key(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_upstream() as (_, llm):
        rb = await lab.start_broker()
        await lab.start_connector([rb], llm)
        async with httpx.AsyncClient() as client:
            r = await client.post(
                rb.url + "/echo",
                content=UNREADABLE["deeply nested"],
                headers={"Authorization": f"Bearer {lab.api_key}"},
            )
    assert r.status_code in (200, 400), r.text  # the LLM's to judge, or refused: never a 5xx
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"


# -- every answer is counted --------------------------------------------------------------------


def big_answer(n_tokens: int, *, kind: str = "chat") -> bytes:
    if kind == "embeddings":
        doc: dict[str, object] = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": [0.125] * 256}
                     for i in range(n_tokens // 10)],
            "model": "embed-1",
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }  # fmt: skip
    elif kind == "ollama":
        doc = {"model": "llama3", "message": {"role": "assistant", "content": "tok " * n_tokens},
               "done": True, "prompt_eval_count": 7, "eval_count": n_tokens}  # fmt: skip
    else:
        doc = {
            "id": "x",
            "object": "chat.completion",
            "model": "big-1",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "tok " * n_tokens}}
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": n_tokens,
                      "total_tokens": 11 + n_tokens, "prompt_tokens_details": {"cached_tokens": 0}},
        }  # fmt: skip
    return json.dumps(doc).encode()


def test_usage_is_read_when_more_than_a_tail_follows_it() -> None:
    """vLLM puts ``usage`` before ``prompt_logprobs`` / ``prompt_token_ids``."""
    doc = json.loads(big_answer(300_000))
    doc["prompt_token_ids"] = list(range(40_000))
    body = json.dumps(doc).encode()
    for chunk in (1000, 16384, 65536, 1 << 20):
        s = UsageSniffer(b"application/json")
        for i in range(0, len(body), chunk):
            s.feed(body[i : i + chunk])
        s.finish()
        assert (s.prompt_tokens, s.completion_tokens) == (11, 300_000), chunk


@pytest.mark.parametrize("chunk", [1000, 65536, 1 << 20])
@pytest.mark.parametrize(
    ("kind", "model", "prompt", "completion"),
    [("chat", "big-1", 11, 700_000), ("embeddings", "embed-1", 200_000, 0),
     ("ollama", "llama3", 7, 700_000)],
)  # fmt: skip
def test_token_usage_is_read_from_json_answers_of_any_size(
    chunk: int, kind: str, model: str, prompt: int, completion: int
) -> None:
    body = big_answer(completion or prompt, kind=kind)
    assert len(body) > 2 * 1024 * 1024
    s = UsageSniffer(b"application/json")
    for i in range(0, len(body), chunk):
        s.feed(body[i : i + chunk])
    s.finish()
    assert (s.model, s.prompt_tokens, s.completion_tokens) == (model, prompt, completion)


async def test_a_budget_counts_a_big_non_streamed_answer(lab: Lab) -> None:
    _, key = lab.keys.add("budget", limits=KeyLimits(tokens_per_day=1000))

    async with run_upstream() as (app, llm):
        app.big_json = big_answer(300_000)
        rb = await lab.start_broker()
        rc = await lab.start_connector([rb], llm)
        async with httpx.AsyncClient() as client:
            auth = {"Authorization": f"Bearer {key}"}
            r = await client.get(rb.url + "/big-json", headers=auth)
            assert r.status_code == 200 and len(r.content) > 1 << 20
            r = await client.get(rb.url + "/big-json", headers=auth)
            assert r.status_code == 429, "the day's budget was spent by the first answer"
    usage = rc.connector.usage
    assert sum(p + c for per_model in usage.values() for p, c in per_model.values()) >= 300_011


# -- connector tokens are never relayed, in any spelling ----------------------------------------

TOKEN_SPELLINGS = {
    "Bearer": ("authorization", "Bearer {t}"),
    "Bearer with a tab": ("authorization", "Bearer\t{t}"),
    "lower-case bearer": ("authorization", "bearer {t}"),
    "Basic as user": ("authorization", "Basic {basic_user}"),
    "Basic as password": ("authorization", "Basic {basic_pass}"),
    "Token scheme": ("authorization", "Token {t}"),
    "bare": ("authorization", "{t}"),
    "x-api-key": ("x-api-key", "{t}"),
    "api-key": ("api-key", "{t}"),
    "x-goog-api-key": ("x-goog-api-key", "{t}"),
    "proxy-authorization": ("proxy-authorization", "Bearer {t}"),
    "cookie": ("cookie", "session={t}"),
}


@pytest.mark.parametrize("name", list(TOKEN_SPELLINGS))
async def test_a_connector_token_is_refused_in_any_credential_header(lab: Lab, name: str) -> None:
    header_name, template = TOKEN_SPELLINGS[name]
    t = lab.token
    value = template.format(
        t=t,
        basic_user=base64.b64encode(f"{t}:x".encode()).decode(),
        basic_pass=base64.b64encode(f"user:{t}".encode()).decode(),
    )
    # with a valid API key beside it: only the token guard stands between it and the LLM
    key_header = "x-api-key" if header_name == "authorization" else "authorization"
    key_value = lab.api_key if header_name == "authorization" else f"Bearer {lab.api_key}"
    async with run_upstream() as (app, llm):
        rb = await lab.start_broker()
        await lab.start_connector([rb], llm)
        async with httpx.AsyncClient() as client:
            r = await client.get(
                rb.url + "/headers", headers={header_name: value, key_header: key_value}
            )
            assert r.status_code == 401, r.text
            assert "connector token" in r.json()["error"]["message"]
            assert t not in r.text
            r = await client.get(
                rb.url + f"/headers?key={t.replace('_', '%5F')}",
                headers={"Authorization": f"Bearer {lab.api_key}"},
            )
            assert r.status_code == 401, r.text
            r = await client.get(
                rb.url + "/headers", headers={"Authorization": f"Bearer {lab.api_key}"}
            )
            assert r.status_code == 200
    assert len(app.forwarded()) == 1


def test_api_keys_that_merely_contain_the_token_prefix_are_not_refused() -> None:
    from trio_bridge.http._messages import carries_secret

    mark = b"tbc_"
    keys = [
        b"tbk_ndju0rw1_cQoCRx3uZE5YS08H-Xog9IRjkNNxsNtbC_9yqNkcjqw",
        b"tbk_abcdetbc_" + b"x" * 43,
        b"tbk_abcdefgh_xtbc_abcdefgh_" + b"y" * 30,
    ]
    for key in keys:
        assert not carries_secret([(b"authorization", b"Bearer " + key)], b"/v1/x", mark)
    token = b"tbc_abcdefgh_" + b"z" * 43
    assert carries_secret([(b"x-a", b"k=" + token)], b"/", mark)
    unpadded = base64.b64encode(b"u:" + token).rstrip(b"=")
    assert carries_secret([(b"authorization", b"Basic " + unpadded)], b"/", mark)


def test_bearer_and_tab_spellings_present_the_same_key() -> None:
    for value in (b"Bearer k1", b"Bearer\tk1", b"bearer  k1", b" Bearer k1 "):
        assert presented_key([(b"authorization", value)]) == "k1"


FORWARDING_SPELLINGS = [
    "X_Forwarded_For", "x-forwarded-for", "CF-Connecting-IP", "X-Cluster-Client-IP",
    "True-Client-IP", "Fastly-Client-IP", "X-Real-IP", "Forwarded", "X-Original-Forwarded-For",
    "X-Client-IP", "X_Real_IP", "Client-IP", "X-Originating-IP", "CF-Connecting-IPv6",
]  # fmt: skip


async def test_forwarding_headers_in_any_spelling_are_dropped_from_untrusted_clients(
    lab: Lab,
) -> None:
    async with run_upstream() as (_, llm):
        rb = await lab.start_broker()
        await lab.start_connector([rb], llm)
        async with httpx.AsyncClient() as client:
            r = await client.get(
                rb.url + "/headers",
                headers={"Authorization": f"Bearer {lab.api_key}"}
                | {name: "203.0.113.9" for name in FORWARDING_SPELLINGS},
            )
    assert r.status_code == 200
    seen = dict(r.json())
    assert "203.0.113.9" not in json.dumps(seen), seen
    assert seen.get("x-forwarded-for") == "127.0.0.1"


# -- lockouts hit the attacker, not the fleet ---------------------------------------------------


async def dial(relay_url: str, token: str, forwarded_for: str | None = None) -> int:
    """The status a relay upgrade got (101: accepted)."""
    headers = [(b"authorization", b"Bearer " + token.encode())]
    if forwarded_for is not None:
        headers.append((b"x-forwarded-for", forwarded_for.encode()))
    try:
        async with open_websocket_url(relay_url, extra_headers=headers):
            return 101
    except ConnectionRejected as exc:
        return int(exc.status_code or 0)


async def test_refused_tokens_behind_a_trusted_proxy_lock_out_only_their_client(
    lab: Lab,
) -> None:
    rb = await lab.start_broker(
        broker={"max_token_failures": 3, "trusted_proxies": ["127.0.0.1/32"]}
    )
    attacker = [await dial(rb.relay_url, "tbc_nope", "203.0.113.66") for _ in range(5)]
    assert attacker == [401, 401, 401, 429, 429]
    # another client behind the same proxy, and a valid token from the attacker's own address
    assert await dial(rb.relay_url, "tbc_nope", "198.51.100.7") == 401
    assert await dial(rb.relay_url, lab.token, "198.51.100.8") == 101
    assert await dial(rb.relay_url, lab.token, "203.0.113.66") == 101


async def test_a_valid_token_is_never_refused_because_others_failed(lab: Lab) -> None:
    rb = await lab.start_broker(broker={"max_token_failures": 3})
    assert [await dial(rb.relay_url, "tbc_nope") for _ in range(4)][-1] == 429
    assert await dial(rb.relay_url, lab.token) == 101


async def test_guesses_at_one_token_id_are_limited_from_any_address(lab: Lab) -> None:
    rb = await lab.start_broker(
        broker={"max_token_failures": 3, "trusted_proxies": ["127.0.0.1/32"]}
    )
    ident = lab.token.split("_")[1]
    guesses = [
        await dial(rb.relay_url, f"tbc_{ident}_guess{n}", f"203.0.113.{n}") for n in range(5)
    ]
    assert guesses == [401, 401, 401, 429, 429]
    assert await dial(rb.relay_url, lab.token, "203.0.113.99") == 101


# -- logs: bounded, terminal-safe ---------------------------------------------------------------


def test_text_log_lines_escape_control_characters_and_quote_forged_fields() -> None:
    import logging

    from trio_bridge._observe import TextFormatter

    record = logging.LogRecord(
        "t", logging.WARNING, __file__, 1, "reason: %s", ("a\x1b[2Jb\nX",), None
    )
    record.path = "/v1 key_id=admin\r\n12:00:00 INFO forged"
    line = TextFormatter().format(record)
    assert "\x1b" not in line and "\n" not in line and "\r" not in line
    assert "key_id=admin" not in line.replace('"/v1 key_id=admin', "")
    assert "\\u001b[2J" in line


async def test_request_lines_cap_what_came_from_outside() -> None:
    from trio_bridge._observe import Facts

    facts = Facts("rid", "GET", "/" + "a" * 100_000)
    facts.model = "m" * 10_000
    line = facts.line("connector")
    assert len(line["path"]) <= 520 and len(line["model"]) <= 140


def test_status_output_is_terminal_safe() -> None:
    from trio_bridge.cli._status import format_status

    doc = {
        "role": "connector",
        "relays": [
            {"broker": "ws://b", "state": "reconnecting", "last_error": "bye\x1b]0;pwn\x07"}
        ],
        "tokens": {"k": {"m\x1b[31m": {"prompt": 1, "completion": 2}}},
    }
    text = format_status(doc)
    assert "\x1b" not in text and "\x07" not in text
    assert "\\u001b" in text

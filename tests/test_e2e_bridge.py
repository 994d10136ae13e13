"""End to end over real loopback sockets: the broker's h11 server, the wsproto relay, and a real
upstream. The fault paths (an LLM that is down, hangs, stalls or dies; clients that leave;
revoked keys and tokens; timeouts) run the same bridge in memory on the autojump clock
(``MemoryNetwork``), where they take no real time and come out the same every run."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import h11
import httpx
import openai
import pytest
import trio
import trio.testing
from conftest import memory_upstream
from upstream import GZIP_BODY, SSE_BYTES, Upstream, run_upstream

from trio_bridge.testing import Bridge, MemoryNetwork, open_bridge, open_lab


@pytest.fixture
async def up() -> AsyncIterator[tuple[Upstream, str]]:
    async with run_upstream() as pair:
        yield pair


def auth(b: Bridge) -> dict[str, str]:
    return {"Authorization": f"Bearer {b.api_key}"}


async def test_openai_sdk_async_gets_what_it_gets_directly(bridge: Bridge) -> None:
    assert bridge.model is not None
    msgs = [{"role": "user", "content": "Is this forwarded?"}]
    via = openai.AsyncOpenAI(base_url=bridge.openai_base_url, api_key=bridge.api_key, max_retries=0)
    direct = openai.AsyncOpenAI(base_url=bridge.upstream_url + "/v1", api_key="x", max_retries=0)
    a = await via.chat.completions.create(model="m", messages=msgs)  # type: ignore[arg-type]
    d = await direct.chat.completions.create(model="m", messages=msgs)  # type: ignore[arg-type]
    assert a.choices[0].message.content == d.choices[0].message.content
    assert "Is this forwarded?" in (a.choices[0].message.content or "")
    assert a.usage == d.usage

    streamed = await via.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "count to 30"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    async for chunk in streamed:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == " ".join(str(i) for i in range(1, 31))
    assert usage is not None and usage.completion_tokens == 30
    models = await via.models.list()
    assert [m.id for m in models.data] == ["trio-bridge-test-model"]
    await via.close()
    await direct.close()


async def test_openai_sdk_sync_stream_and_completions(bridge: Bridge) -> None:
    def run() -> tuple[str, str]:
        client = openai.OpenAI(
            base_url=bridge.openai_base_url, api_key=bridge.api_key, max_retries=0
        )
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "count to 5"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        comp = client.completions.create(model="m", prompt="count to 3")
        return text, comp.choices[0].text

    text, comp = await trio.to_thread.run_sync(run)
    assert text == "1 2 3 4 5"
    assert comp == "1 2 3"


async def test_sse_bytes_through_the_bridge_equal_the_direct_bytes(
    up: tuple[Upstream, str],
) -> None:
    _, url = up
    async with open_bridge(url) as b, httpx.AsyncClient() as client:
        async with client.stream("GET", url + "/sse") as r:
            direct = b"".join([c async for c in r.aiter_raw()])
        async with client.stream("GET", b.base_url + "/sse", headers=auth(b)) as r:
            assert r.headers["content-type"] == "text/event-stream"
            via = b"".join([c async for c in r.aiter_raw()])
    assert via == direct == b"".join(SSE_BYTES)


async def test_compressed_body_is_forwarded_raw(up: tuple[Upstream, str]) -> None:
    _, url = up
    async with open_bridge(url) as b, httpx.AsyncClient() as client:
        async with client.stream("GET", b.base_url + "/gzip", headers=auth(b)) as r:
            raw = b"".join([c async for c in r.aiter_raw()])
            assert r.headers["content-encoding"] == "gzip"
    assert raw == GZIP_BODY
    assert gzip.decompress(raw).startswith(b'{"hello"')


async def test_ollama_ndjson_streams_line_by_line_as_generated() -> None:
    async with open_bridge(token_delay=0.05) as b, httpx.AsyncClient() as client:
        body = {"model": "m", "messages": [{"role": "user", "content": "count to 8"}]}
        arrivals: list[float] = []
        lines: list[dict[str, object]] = []
        async with client.stream("POST", b.base_url + "/api/chat", json=body, headers=auth(b)) as r:
            assert r.headers["content-type"] == "application/x-ndjson"
            async for line in r.aiter_lines():
                arrivals.append(trio.current_time())
                lines.append(json.loads(line))
    assert [x["message"]["content"] for x in lines[:-1]] == [  # type: ignore[index]
        "1",
        " 2",
        " 3",
        " 4",
        " 5",
        " 6",
        " 7",
        " 8",
    ]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 8
    # tokens arrived spread over the generation, not all at the end
    assert arrivals[-1] - arrivals[0] > 0.2


async def test_any_method_path_and_query_are_forwarded_unchanged(up: tuple[Upstream, str]) -> None:
    app, url = up
    async with open_bridge(url) as b, httpx.AsyncClient() as client:
        for method in ("GET", "DELETE", "PATCH", "PUT", "OPTIONS"):
            r = await client.request(
                method,
                b.base_url + "/v1/x%2Fy/z?a=1&b=%20c&a=2",
                headers=auth(b),
                content=b"" if method != "PATCH" else b"p",
            )
            assert r.status_code == 404  # the upstream's own answer
            seen = app.forwarded()[-1]
            assert seen["method"] == method
            assert seen["raw_path"] == b"/v1/x%2Fy/z"
            assert seen["query"] == "a=1&b=%20c&a=2"


async def test_headers_key_removed_request_id_everywhere_hop_by_hop_dropped(
    up: tuple[Upstream, str],
) -> None:
    app, url = up
    async with open_bridge(url) as b, httpx.AsyncClient() as client:
        r = await client.get(
            b.base_url + "/headers",
            headers={
                "x-api-key": b.api_key,
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Drop-Me",
                "X-Drop-Me": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authorization": "Basic eA==",
                "TE": "trailers",
            },
        )
        assert r.status_code == 200
        seen = {k.lower(): v for k, v in app.forwarded()[-1]["headers"]}
        assert seen["x-custom"] == "kept"
        for gone in (
            "x-api-key",
            "authorization",
            "x-drop-me",
            "keep-alive",
            "proxy-authorization",
            "te",
        ):
            assert gone not in seen
        assert b.api_key not in json.dumps(app.forwarded()[-1]["headers"])
        assert seen["x-request-id"] == r.headers["x-request-id"]
        assert len(r.headers["x-request-id"]) >= 16
        # a sane incoming id is kept
        r = await client.get(
            b.base_url + "/headers", headers={**auth(b), "X-Request-ID": "my-trace-42"}
        )
        assert r.headers["x-request-id"] == "my-trace-42"
        assert dict(app.forwarded()[-1]["headers"])["x-request-id"] == "my-trace-42"
        # an insane one is replaced
        r = await client.get(
            b.base_url + "/headers", headers={**auth(b), "X-Request-ID": "bad id\twith spaces"}
        )
        assert r.headers["x-request-id"] != "bad id\twith spaces"


async def test_upstream_api_key_replaces_the_users_key(up: tuple[Upstream, str]) -> None:
    app, url = up
    async with open_bridge(url) as b:
        b.connector.forwarder.upstream_auth = (b"authorization", b"Bearer upstream-secret")
        async with httpx.AsyncClient() as client:
            await client.get(b.base_url + "/headers", headers=auth(b))
    seen = [(k.lower(), v) for k, v in app.forwarded()[-1]["headers"]]
    assert ("authorization", "Bearer upstream-secret") in seen
    assert not any(b.api_key in v for _, v in seen)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"x-api-key": "tbk_aaaaaaaa_nope"},
    ],
)
async def test_missing_or_wrong_key_is_401_and_never_reaches_the_llm(
    up: tuple[Upstream, str],
    headers: dict[str, str],
) -> None:
    app, url = up
    async with open_bridge(url) as b, httpx.AsyncClient() as client:
        r = await client.post(b.base_url + "/v1/chat/completions", headers=headers, json={})
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] and err["message"]
        # right id, wrong secret
        wrong = b.api_key[:-4] + ("AAAA" if not b.api_key.endswith("AAAA") else "BBBB")
        r = await client.get(
            b.base_url + "/v1/models", headers={"Authorization": f"Bearer {wrong}"}
        )
        assert r.status_code == 401
    assert app.forwarded() == []


async def test_revoked_key_is_refused_without_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from trio_bridge.accounts._keys import SecretStore

    async with open_bridge(network=MemoryNetwork()) as bridge, bridge.client() as client:
        r = await client.get(bridge.base_url + "/v1/models", headers=auth(bridge))
        assert r.status_code == 200
        # revoke through a second store object on the same file, like the CLI would
        SecretStore(bridge.keys.path, "tbk").revoke("lab-user")
        await trio.sleep(0.6)  # the running store re-checks the file at most every 0.5 s
        r = await client.get(bridge.base_url + "/v1/models", headers=auth(bridge))
        assert r.status_code == 401


async def test_large_upload_and_download_arrive_intact(up: tuple[Upstream, str]) -> None:
    app, url = up
    body = os.urandom(10 * 1024 * 1024)
    async with (
        open_bridge(url, limits={"max_body": "16MiB"}) as b,
        httpx.AsyncClient(timeout=30) as client,
    ):
        r = await client.post(b.base_url + "/echo", headers=auth(b), content=body)
        assert r.status_code == 200
        assert r.headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
        assert r.content == body

        async def chunked() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 1 << 20):
                yield body[i : i + (1 << 20)]

        r = await client.post(b.base_url + "/echo", headers=auth(b), content=chunked())
        assert r.status_code == 200 and r.content == body
    assert app.forwarded()[-1]["size"] == len(body)


async def test_body_over_the_limit_is_413_before_forwarding(up: tuple[Upstream, str]) -> None:
    app, url = up
    async with (
        open_bridge(url, limits={"max_body": "1MiB"}) as b,
        httpx.AsyncClient(timeout=30) as client,
    ):
        r = await client.post(b.base_url + "/echo", headers=auth(b), content=b"x" * (2 << 20))
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b"y" * 65536

        r = await client.post(b.base_url + "/echo", headers=auth(b), content=chunked())
        assert r.status_code == 413
    assert not any(req["path"] == "/echo" and req["size"] > (1 << 20) for req in app.forwarded())
    assert all(req["size"] <= 1 << 20 for req in app.forwarded())


async def test_llm_down_is_503_not_ready_also_for_the_request_that_finds_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # nothing listens on that port of the memory network: connection refused
    async with (
        open_bridge("http://127.0.0.1:30000", network=MemoryNetwork()) as b,
        b.client() as client,
    ):
        # the connector's probe found the LLM down and told the broker: 503 at once
        r = await client.get(b.base_url + "/v1/models", headers=auth(b))
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "service_unavailable"
        assert "not ready" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) > 0
        # if the LLM dies between two probes, the request that finds out is handed back to
        # the broker (REFUSED: nothing reached an LLM), which has no other connector for it
        # and says the route's LLM is not ready
        b.connector.llm.set(True, "pretend")
        await trio.testing.wait_all_tasks_blocked()  # the broker hears it (no probe meanwhile)
        r = await client.get(b.base_url + "/v1/models", headers=auth(b))
        assert r.status_code == 503
        assert "not ready" in r.json()["error"]["message"]
        assert b.connector.llm_ready is False


async def test_no_first_byte_in_time_is_504(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with (
        memory_upstream(net) as (_, url),
        open_bridge(url, limits={"first_byte_timeout": "300ms"}, network=net) as b,
        b.client() as client,
    ):
        t0 = trio.current_time()
        r = await client.get(b.base_url + "/slow-head?s=5", headers=auth(b))
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_timeout"
        assert trio.current_time() - t0 == pytest.approx(0.3)  # at first_byte_timeout
        r = await client.get(b.base_url + "/slow-head?s=0.29", headers=auth(b))
        assert r.status_code == 200 and r.content == b"late"


@pytest.mark.parametrize(("path", "cut_after"), [("/stall", 0.5), ("/die", 0.2)])
async def test_llm_failing_mid_stream_aborts_the_client_response(
    autojump_clock: trio.testing.MockClock, path: str, cut_after: float
) -> None:
    """/stall: a chunk, then silence (cut at idle_timeout); /die: a chunk, 0.2 s, then the
    LLM's connection breaks."""
    net = MemoryNetwork()
    async with (
        memory_upstream(net) as (_, url),
        open_bridge(url, limits={"idle_timeout": "500ms"}, network=net) as b,
        b.client() as client,
    ):
        got = b""
        t0 = trio.current_time()
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("GET", b.base_url + path, headers=auth(b)) as r:
                assert r.status_code == 200
                async for chunk in r.aiter_raw():
                    got += chunk
        assert got == b"data: first\n\n"
        assert trio.current_time() - t0 == pytest.approx(cut_after, abs=0.01)
        # and the bridge keeps serving
        r2 = await client.get(b.base_url + "/sse", headers=auth(b))
        assert r2.content == b"".join(SSE_BYTES)


async def test_the_idle_timeout_counts_from_the_last_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A stream whose tokens keep coming outlives idle_timeout many times over (the deadline
    moves with the tokens, if lazily); the stalled stream above is cut after it."""
    net = MemoryNetwork()
    async with (
        memory_upstream(net) as (_, url),
        open_bridge(url, limits={"idle_timeout": "300ms"}, network=net) as b,
        b.client() as client,
    ):
        events = 0
        with trio.move_on_after(10):  # 33 idle_timeouts of tokens every 10 ms
            async with client.stream("GET", b.base_url + "/forever", headers=auth(b)) as r:
                async for chunk in r.aiter_raw():
                    events += chunk.count(b"data: ")
        assert events >= 990  # every token of the 10 s


async def upstream_closed_at_once(app: Upstream, client_left_at: float) -> None:
    with trio.fail_after(5):
        await app.disconnected.wait()
    assert app.disconnect_time is not None
    delay = app.disconnect_time - client_left_at
    assert delay < 0.001, f"upstream closed {delay:.3f}s after the client left"


async def test_client_disconnect_closes_the_upstream_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    async with (
        memory_upstream(net) as (app, url),
        open_bridge(url, network=net) as b,
        b.client() as client,
    ):
        async with client.stream("GET", b.base_url + "/forever", headers=auth(b)) as r:
            n = 0
            async for _ in r.aiter_raw():
                n += 1
                if n == 3:
                    break
        await upstream_closed_at_once(app, trio.current_time())
        # nothing left in flight on either side
        with trio.fail_after(2):
            while b.connector.relays and next(iter(b.connector.relays.values())).in_flight:
                await trio.sleep(0.01)


async def test_client_disconnect_before_the_answer_starts_closes_the_upstream_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The LLM is still processing the prompt (no response head yet) when the client leaves."""
    net = MemoryNetwork()
    async with (
        memory_upstream(net) as (app, url),
        open_bridge(url, network=net) as b,
        b.client() as client,
    ):
        with trio.move_on_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(client.get, b.base_url + "/hang", headers=auth(b)))
                await app.forever_started.wait()
                await trio.sleep(60)  # a long prompt
                nursery.cancel_scope.cancel()  # the client gives up and closes its connection
        await upstream_closed_at_once(app, trio.current_time())


async def test_hundred_concurrent_streams_all_complete() -> None:
    results: dict[int, str] = {}

    async def one(i: int, client: httpx.AsyncClient) -> None:
        body = {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": f"count to {20 + i % 7}"}],
        }
        text = ""
        async with client.stream(
            "POST", bridge.base_url + "/v1/chat/completions", headers=auth(bridge), json=body
        ) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    text += delta.get("content", "")
        results[i] = text

    limits = httpx.Limits(max_connections=200)
    async with (
        open_bridge(connector={"max_concurrent": 100}) as bridge,
        httpx.AsyncClient(limits=limits, timeout=60) as client,
    ):
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, i, client)
    assert len(results) == 100
    for i, text in results.items():
        assert text == " ".join(str(k) for k in range(1, 21 + i % 7))


async def test_stalled_reader_neither_stalls_others_nor_buffers_without_bound(
    up: tuple[Upstream, str],
) -> None:
    _, url = up
    total = 64 * 1024 * 1024
    async with open_bridge(url) as b:
        host, port = b.base_url.removeprefix("http://").split(":")
        # A raw client that asks for 64 MiB and never reads a byte.
        stalled = await trio.open_tcp_stream(host, int(port))
        head = f"GET /big?n={total} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {b.api_key}"
        await stalled.send_all(head.encode() + b"\r\n\r\n")
        await trio.sleep(0.5)
        async with httpx.AsyncClient() as client:
            with trio.fail_after(10):
                for _ in range(5):
                    r = await client.get(b.base_url + "/sse", headers=auth(b))
                    assert r.content == b"".join(SSE_BYTES)
        relay = next(iter(b.connector.relays.values()))
        [stream] = [
            s
            for s in relay._streams.values()
            if s.request_head and s.request_head.target.startswith("/big")
        ]
        # The connector has pushed only what the window and socket buffers allow.
        assert stream.bytes_sent < 16 * 1024 * 1024, stream.bytes_sent
        await stalled.aclose()


async def test_revoked_connector_token_closes_its_relay_and_refuses_reconnects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_bridge(network=MemoryNetwork()) as bridge:
        [relay] = [h.relay for h in bridge.broker.registry.connectors()]
        bridge.broker.tokens.revoke("lab-connector")
        with trio.fail_after(5):
            while bridge.broker.registry.relays():
                await trio.sleep(0.05)
        assert relay.closed_reason == "connector token revoked"
        await trio.sleep(600)  # ten minutes: the connector re-dials and is refused each time
        assert bridge.broker.registry.relays() == []
        [state] = bridge.connector.relay_states.values()
        assert "401" in state["last_error"], state
        async with bridge.client() as client:
            r = await client.get(bridge.base_url + "/v1/models", headers=auth(bridge))
        assert r.status_code == 503 and r.headers["retry-after"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")
async def test_wss_relay_and_https_to_a_broker_with_its_own_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await trio.run_process(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    async with open_lab() as lab:
        model = await lab.start_test_model()
        rb = await lab.start_broker(broker={"tls_cert": str(cert), "tls_key": str(key)})
        wss = f"wss://127.0.0.1:{rb.port}/_bridge/relay"
        # without the CA the connector refuses the broker's certificate (and keeps trying)
        untrusting = await lab.start_connector(
            [wss], model.url, wait=False, connector={"name": "untrusting"}
        )
        state = untrusting.connector.relay_states[wss]
        with trio.fail_after(15):
            while not state["last_error"]:
                await trio.sleep(0.1)
        assert not untrusting.connector.relays
        assert "certificate" in state["last_error"]
        await untrusting.stop()
        rc = await lab.start_connector(
            [wss], model.url, connector={"broker_ca_file": str(cert), "name": "trusting"}
        )
        assert list(rc.connector.relays) == [wss]
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert))) as client:
            r = await client.get(
                f"https://127.0.0.1:{rb.port}/v1/models",
                headers={"Authorization": f"Bearer {lab.api_key}"},
            )
        assert r.status_code == 200


async def test_a_long_stream_outlives_the_keep_alive_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a per-read timeout or the keep-alive timer must never cut an answer that is
    still streaming while the client (rightly) sends nothing."""
    async with (
        open_bridge(
            token_delay=0.05, limits={"keep_alive_timeout": "1s"}, network=MemoryNetwork()
        ) as b,
        b.client() as client,
    ):
        body = {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": "count to 1200"}],
        }  # 60 s: 60 keep-alive timeouts
        async with client.stream(
            "POST", b.base_url + "/v1/chat/completions", json=body, headers=auth(b)
        ) as r:
            raw = b"".join([c async for c in r.aiter_raw()])
    assert raw.endswith(b"data: [DONE]\n\n") and b'" 1200"' in raw


async def test_expect_100_continue_gets_a_continue_before_the_body_is_sent(
    up: tuple[Upstream, str],
) -> None:
    _app, url = up
    body = b"b" * 300_000
    async with open_bridge(url) as b:
        s = await trio.open_tcp_stream("127.0.0.1", int(b.base_url.rsplit(":", 1)[1]))
        await s.send_all(
            f"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {b.api_key}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        with trio.fail_after(5):
            interim = await s.receive_some(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await s.send_all(body)
        answer = b""
        with trio.fail_after(10):
            while data := await s.receive_some(1 << 20):
                answer += data
        await s.aclose()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
    conn.receive_data(answer)
    echoed = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if isinstance(event, h11.Data):
            echoed += event.data
    assert echoed == body

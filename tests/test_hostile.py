"""Hostile input: bad HTTP, malicious relay peers, brute force, slow readers, secret files."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    open_websocket_url,
    serve_websocket,
)
from upstream import Upstream, run_upstream

from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.relay._frames import (
    FLAG_END_STREAM,
    FrameDecoder,
    FrameType,
    ResetCode,
    encode_frame,
)
from trio_bridge.relay._protocol import RequestHead, Session, encode_request_head
from trio_bridge.testing import Bridge, Lab, MemoryNetwork, open_bridge, open_lab

CHAT = "/v1/chat/completions"


@pytest.fixture
async def up() -> AsyncIterator[tuple[Upstream, str]]:
    async with run_upstream() as pair:
        yield pair


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with open_lab() as lab:
        yield lab


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes (at most 5 s)."""
    s = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    with trio.move_on_after(5):
        try:
            await s.send_all(data)
        except trio.BrokenResourceError:
            pass
        while True:
            try:
                chunk = await s.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            out += chunk
    await s.aclose()
    return out


BAD_REQUESTS = {
    "content-length and transfer-encoding": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
        b"{auth}\r\n0\r\n\r\n"
    ),
    "two content-lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n{auth}\r\n"
        b"hello"
    ),
    "odd transfer-encoding": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n{auth}\r\n0\r\n\r\n"
    ),
    "bad chunk terminator": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{auth}\r\n"
        b"5\r\nhelloXX0\r\n\r\n"
    ),
    "NUL in a header value": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n{auth}\r\n",
    "CR in a header value": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n{auth}\r\n",
    "over-long header": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: "
    + b"a" * 70000
    + b"\r\n{auth}\r\n",
    "huge URI": b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n{auth}\r\n",
    "URI over max_uri": b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n{auth}\r\n",
    "too many headers": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: a\r\n" % i for i in range(300))
        + b"{auth}\r\n"
    ),
    "1 MiB key": b"GET /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + b"k" * (1 << 20)
    + b"\r\n\r\n",
    "bare LF line endings": b"GET /echo HTTP/1.1\nHost: x\n{auth}\n",
    "bare LF at the end of the head": b"GET /echo HTTP/1.1\r\nHost: x\r\n{auth}\n",
    "obs-fold": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n{auth}\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200) + b"\r\n\r\n",
}


EXACT_STATUS = {
    "content-length and transfer-encoding": 400,
    "two content-lengths": 400,
    "odd transfer-encoding": 501,
    "bad chunk terminator": 400,
    "bare LF line endings": 400,
    "bare LF at the end of the head": 400,
    "obs-fold": 400,
    "over-long header": 431,
    "huge URI": 431,
    "URI over max_uri": 414,
    "too many headers": 431,
    "1 MiB key": 431,
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
async def test_bad_http_gets_a_4xx_or_5xx_and_nothing_is_forwarded(
    up: tuple[Upstream, str],
    name: str,
) -> None:
    app, url = up
    async with open_bridge(url) as b:
        port = int(b.base_url.rsplit(":", 1)[1])
        raw = BAD_REQUESTS[name].replace(
            b"{auth}", f"Authorization: Bearer {b.api_key}\r\n".encode()
        )
        answer = await raw_exchange(port, raw)
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        assert status in (400, 414, 431, 501) or answer == b"", answer[:100]
        if name in EXACT_STATUS:
            assert status == EXACT_STATUS[name], answer[:200]
            assert b'"error"' in answer  # the OpenAI error shape, not an empty page
        # and the bridge keeps serving
        async with httpx.AsyncClient() as client:
            r = await client.get(
                b.base_url + "/sse", headers={"Authorization": f"Bearer {b.api_key}"}
            )
            assert r.status_code == 200
    assert [r["path"] for r in app.forwarded()] == ["/sse"]


def port(b: Bridge) -> int:
    return int(b.base_url.rsplit(":", 1)[1])


def limit_hits(b: Bridge, limit: str) -> float:
    return b.broker.metrics.limit_hits.labels("broker", limit)._value.get()  # type: ignore[no-any-return]


async def test_a_request_head_trickled_slowly_is_cut_after_the_head_timeout(
    up: tuple[Upstream, str],
) -> None:
    app, url = up
    async with open_bridge(url, limits={"head_timeout": "0.5s"}) as b:
        s = await trio.open_tcp_stream("127.0.0.1", port(b))
        t0 = trio.current_time()
        answer = b""
        with trio.move_on_after(5):
            try:
                for c in b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                    await s.send_all(bytes([c]))
                    answer += await _maybe_receive(s, 0.1)
                    if answer:
                        break
            except trio.BrokenResourceError:
                pass
        elapsed = trio.current_time() - t0
        await s.aclose()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert 0.4 < elapsed < 2.0
        assert limit_hits(b, "head_timeout") == 1
        # a connection that sends nothing at all is closed too, without an answer
        s = await trio.open_tcp_stream("127.0.0.1", port(b))
        with trio.fail_after(3):
            assert await s.receive_some(100) == b""
        await s.aclose()
    assert app.forwarded() == []


async def _maybe_receive(s: trio.SocketStream, seconds: float) -> bytes:
    with trio.move_on_after(seconds):
        return bytes(await s.receive_some(65536))
    return b""


async def test_an_upload_slower_than_the_minimum_body_rate_is_cut(
    up: tuple[Upstream, str],
) -> None:
    app, url = up
    async with open_bridge(url, limits={"head_timeout": "0.5s", "min_body_rate": 1000}) as b:
        s = await trio.open_tcp_stream("127.0.0.1", port(b))
        head = (
            f"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {b.api_key}\r\n"
            "Content-Length: 200000\r\n\r\n"
        ).encode()
        await s.send_all(head)
        t0 = trio.current_time()
        closed = False
        with trio.move_on_after(10):
            try:
                while True:  # 100 bytes/s, a tenth of the minimum
                    await s.send_all(b"x" * 10)
                    await trio.sleep(0.1)
            except trio.BrokenResourceError:
                closed = True
        elapsed = trio.current_time() - t0
        await s.aclose()
        assert closed and elapsed < 5, elapsed
        assert limit_hits(b, "body_rate") == 1
        # a fast client is served as usual
        async with httpx.AsyncClient() as client:
            r = await client.post(
                b.base_url + "/echo",
                content=b"y" * 200_000,
                headers={"Authorization": f"Bearer {b.api_key}"},
            )
        assert r.status_code == 200 and len(r.content) == 200_000
    assert [r["path"] for r in app.forwarded()] == ["/echo"]


async def test_connections_per_client_address_are_capped(up: tuple[Upstream, str]) -> None:
    _app, url = up
    async with open_bridge(url, limits={"max_connections_per_address": 4}) as b:
        # the connector's relay is one connection from 127.0.0.1 too, plus three held here
        held = [await trio.open_tcp_stream("127.0.0.1", port(b)) for _ in range(3)]
        await trio.sleep(0.1)
        answer = await raw_exchange(port(b), b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 429 "), answer
        assert limit_hits(b, "connections_per_address") == 1
        await held.pop().aclose()
        await trio.sleep(0.1)
        async with httpx.AsyncClient() as client:
            r = await client.get(
                b.base_url + "/echo", headers={"Authorization": f"Bearer {b.api_key}"}
            )
        assert r.status_code == 200
        for h in held:
            await h.aclose()


async def test_client_forwarding_headers_are_not_trusted_unless_from_a_trusted_proxy(
    up: tuple[Upstream, str],
) -> None:
    app, url = up
    spoof = {"X-Forwarded-For": "1.2.3.4", "X-Real-IP": "1.2.3.4", "Forwarded": "for=1.2.3.4"}
    for trusted, expected in (([], "127.0.0.1"), (["127.0.0.0/8"], "1.2.3.4, 127.0.0.1")):
        async with (
            open_bridge(url, broker={"trusted_proxies": trusted}) as b,
            httpx.AsyncClient() as client,
        ):
            await client.get(
                b.base_url + "/headers", headers={"Authorization": f"Bearer {b.api_key}", **spoof}
            )
        seen = dict(app.forwarded()[-1]["headers"])
        assert seen["x-forwarded-for"] == expected
        if not trusted:
            assert "x-real-ip" not in seen and "forwarded" not in seen


async def test_refused_tokens_are_rate_limited_per_address(lab: Lab) -> None:
    rb = await lab.start_broker(broker={"max_token_failures": 3})
    statuses = []
    for _ in range(5):
        try:
            async with open_websocket_url(
                rb.relay_url, extra_headers=[(b"authorization", b"Bearer nope")]
            ):
                pass
        except ConnectionRejected as exc:
            statuses.append(exc.status_code)
    assert statuses == [401, 401, 401, 429, 429]
    assert rb.broker.registry.relays() == []


# -- a malicious connector against the broker ---------------------------------------------------


async def evil_connector(
    lab: Lab, relay_url: str, *messages: bytes, hello: bool = True, version: int = 1
) -> list[tuple[FrameType, bytes]]:
    """Connect with a valid token, send raw messages, return the frames the broker sent."""
    got: list[tuple[FrameType, bytes]] = []
    decoder = FrameDecoder()
    async with open_websocket_url(
        relay_url, extra_headers=[(b"authorization", b"Bearer " + lab.token.encode())]
    ) as ws:
        if hello:
            doc = {
                "version": version,
                "role": "connector",
                "window": 65536,
                "max_streams": 10,
                "route": "evil",
                "name": "evil",
            }
            await ws.send_message(encode_frame(FrameType.HELLO, 0, json.dumps(doc).encode()))
        for m in messages:
            await ws.send_message(m)
        with trio.move_on_after(3):
            try:
                while True:
                    decoder.receive_data(await ws.get_message())
                    while (f := decoder.next_frame()) is not None:
                        got.append((f.type, f.payload))
            except Exception:  # the broker closed the connection
                pass
    return got


@pytest.mark.parametrize(
    ("case", "messages", "reason"),
    [
        ("other major version", [], "unsupported relay protocol version 2"),
        ("unknown frame type", [b"\x7f" + bytes(9)], "unknown frame type"),
        (
            "absurd length",
            [bytes([FrameType.DATA, 0]) + (1).to_bytes(4, "big") + (2**32 - 1).to_bytes(4, "big")],
            "exceeds",
        ),
        ("REQUEST from a connector", [encode_frame(FrameType.REQUEST, 1, b"{}")], "REQUEST"),
        ("DATA on a stream never opened", [encode_frame(FrameType.DATA, 99, b"x")], "never opened"),
        ("ping flood", [encode_frame(FrameType.PING, 0, b"12345678") * 5000], "ping flood"),
        ("text message", [], ""),
    ],
)
async def test_a_malicious_connector_loses_its_relay_and_nobody_else_notices(
    lab: Lab,
    case: str,
    messages: list[bytes],
    reason: str,
) -> None:
    model = await lab.start_test_model()
    rb = await lab.start_broker()
    await lab.start_connector([rb], model.url)  # an honest connector on the default route
    if case == "text message":
        async with open_websocket_url(
            rb.relay_url, extra_headers=[(b"authorization", b"Bearer " + lab.token.encode())]
        ) as ws:
            await ws.send_message("text, not binary")
            with trio.fail_after(5):
                while not ws.closed:
                    with trio.move_on_after(0.1):
                        try:
                            await ws.get_message()
                        except ConnectionClosed:
                            break
    else:
        frames = await evil_connector(
            lab, rb.relay_url, *messages, version=2 if case == "other major version" else 1
        )
        goaways = [p.decode() for t, p in frames if t is FrameType.GOAWAY]
        assert goaways and reason in goaways[-1], frames[-3:]
    assert [r.name for r in rb.broker.registry.relays()] == ["lab-connector"]
    async with httpx.AsyncClient() as client:
        r = await client.get(
            rb.url + "/v1/models", headers={"Authorization": f"Bearer {lab.api_key}"}
        )
    assert r.status_code == 200


async def test_a_connector_overrunning_its_window_loses_that_stream_only(lab: Lab) -> None:
    rb = await lab.start_broker(relay={"window": "64KiB"})
    auth = {"Authorization": f"Bearer {lab.api_key}"}
    async with open_websocket_url(
        rb.relay_url, extra_headers=[(b"authorization", b"Bearer " + lab.token.encode())]
    ) as ws:
        session = Session(opener=False, window=65536)
        await ws.send_message(session.send_hello(role="connector", route="evil", name="evil"))
        session.receive_data(await ws.get_message())
        assert session.next_event() is not None
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
            results: list[int | str] = []

            async def call() -> None:
                try:
                    async with client.stream("GET", rb.url + "/r/evil/x", headers=auth) as r:
                        async for _ in r.aiter_raw():
                            pass
                    results.append(r.status_code)
                except httpx.HTTPError:
                    results.append("aborted")

            nursery.start_soon(call)
            session.receive_data(await ws.get_message())
            req = session.next_event()
            sid = req.stream_id  # type: ignore[union-attr]
            from trio_bridge.relay._protocol import ResponseHead

            head = session.send_response(sid, ResponseHead(200, []), end_stream=False)
            flood = encode_frame(FrameType.DATA, sid, b"z" * 60000) * 3  # 180 KB > 64 KiB window
            await ws.send_message(head + flood)
        assert results == ["aborted"]
        assert [r.name for r in rb.broker.registry.relays()] == ["evil"]  # the relay survived
        # and it still serves: answer a second request properly
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
            out: list[int] = []

            async def call2() -> None:
                out.append((await client.get(rb.url + "/r/evil/y", headers=auth)).status_code)

            nursery.start_soon(call2)
            while True:
                session.receive_data(await ws.get_message())
                ev = session.next_event()
                if ev is not None and type(ev).__name__ == "Request":
                    break
            await ws.send_message(
                session.send_response(
                    ev.stream_id,
                    ResponseHead(204, []),  # type: ignore[union-attr]
                    end_stream=True,
                )
            )
        assert out == [204]


# -- a malicious broker against the connector ---------------------------------------------------


async def test_a_malicious_broker_cannot_hurt_the_connector(lab: Lab) -> None:
    model = await lab.start_test_model()
    connections: list[str] = []

    async def evil_broker(request: object) -> None:
        try:
            await evil_session(request)
        except ConnectionClosed:
            pass  # the connector hung up on us: that is the point

    async def evil_session(request: object) -> None:
        ws = await request.accept()  # type: ignore[attr-defined]
        connections.append("open")
        session = Session(opener=True, max_streams=100_000)
        session.receive_data(await ws.get_message())
        session.next_event()
        await ws.send_message(session.send_hello(role="broker"))
        head = RequestHead("GET", "/v1/models", [], "rid")
        if len(connections) == 1:
            # 10 000 stream opens at once (beyond the connector's max_streams)
            batch = []
            for _ in range(10_000):
                session.peer_hello.max_streams = 10**6  # type: ignore[union-attr]
                _, frame = session.open_stream(head, end_stream=True)
                batch.append(frame)
            await ws.send_message(b"".join(batch))
            # each is answered or refused (more than 1000 are answered: the connector reads a
            # message in slices, and streams that end between two free their slots)
            refused = answered = 0
            with trio.move_on_after(10):
                dec = FrameDecoder()
                while refused + answered < 10_000:
                    dec.receive_data(await ws.get_message())
                    while (f := dec.next_frame()) is not None:
                        if f.type is FrameType.RESET and f.payload[
                            :2
                        ] == ResetCode.REFUSED.to_bytes(2, "big"):
                            refused += 1
                        elif f.type is FrameType.RESPONSE:
                            answered += 1
            connections.append(f"refused {refused} of {refused + answered}")
            # then a reused stream id: the connector must drop this relay
            await ws.send_message(
                encode_frame(FrameType.REQUEST, 1, encode_request_head(head), FLAG_END_STREAM)
            )
            with trio.move_on_after(5):
                while True:
                    await ws.get_message()
        else:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listener = await nursery.start(serve_websocket, evil_broker, "127.0.0.1", 0, None)
        port = listener.port
        rc = await lab.start_connector(
            [f"ws://127.0.0.1:{port}/_bridge/relay"], model.url, wait=False
        )
        with trio.fail_after(30):
            while connections.count("open") < 2:  # it survived and came back
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    [outcome] = [c.split() for c in connections if c.startswith("refused")]
    assert int(outcome[1]) > 0 and outcome[3] == "10000", outcome
    assert rc.connector.relay_states  # the connector is alive and still dialling


# -- slow readers ---------------------------------------------------------------------------


async def test_a_client_that_stops_reading_is_cut_after_the_stall_timeout(
    up: tuple[Upstream, str],
) -> None:
    _, url = up
    async with open_bridge(url, limits={"stall_timeout": "1s"}) as b:
        port = int(b.base_url.rsplit(":", 1)[1])
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(
            f"GET /big?n={256 << 20} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {b.api_key}\r\n\r\n".encode()
        )
        await trio.sleep(0.3)
        with trio.fail_after(10):
            while b.connector.in_flight:  # cut by the stall timeout, then the slot is free
                await trio.sleep(0.1)
        sent = b.connector.metrics.bytes.labels("connector", "out")._value.get()
        assert sent < 32 << 20  # bounded by windows and socket buffers, not 256 MiB
        # the broker lets go of the client too: its request ends, the connection closes
        with trio.fail_after(5):
            while b.broker.in_flight:
                await trio.sleep(0.05)
        with trio.fail_after(10):
            try:
                while await s.receive_some(1 << 20):
                    pass  # what was already in the socket buffers, then EOF
            except trio.BrokenResourceError:
                pass  # or a reset: either way the connection is gone
        await s.aclose()
        async with httpx.AsyncClient() as client:  # others are unaffected
            r = await client.get(
                b.base_url + "/sse", headers={"Authorization": f"Bearer {b.api_key}"}
            )
            assert r.status_code == 200


# -- secrets at rest --------------------------------------------------------------------------


def test_world_readable_secret_files_are_refused(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "keys.toml", "tbk")
    store.add("alice")
    os.chmod(tmp_path / "keys.toml", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        SecretStore(tmp_path / "keys.toml", "tbk")
    cfg = tmp_path / "bridge.toml"
    cfg.write_text('[connector]\ntoken_file = "t"\n')
    (tmp_path / "t").write_text("tbc_x")
    os.chmod(tmp_path / "t", 0o644)
    r = subprocess.run(
        [sys.executable, "-m", "trio_bridge", "connector", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "chmod 600" in r.stderr


def test_check_warns_about_a_public_listener_without_tls(tmp_path: Path) -> None:
    cfg = tmp_path / "bridge.toml"

    def check(toml: str) -> str:
        cfg.write_text(toml)
        cmd = [sys.executable, "-m", "trio_bridge", "check", "-c", str(cfg)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout

    assert "without TLS" in check('[broker]\nlisten = "0.0.0.0:8080"\n')
    assert "without TLS" not in check(
        '[broker]\nlisten = "0.0.0.0:8080"\nbehind_tls_proxy = true\n'
    )


@pytest.mark.skipif(
    subprocess.run(["which", "stress-ng"], capture_output=True).returncode != 0,
    reason="stress-ng missing (apt-get install stress-ng)",
)
@pytest.mark.slow
def test_cpu_starvation_does_not_trip_liveness(tmp_path: Path) -> None:
    """Roles in their own processes with 1 s pings, all CPUs busy (stress-ng, bounded): no relay
    is declared dead and requests keep succeeding, only slower."""
    from test_service import Bench

    # a fresh bench whose configs carry the 1 s ping interval
    d = tmp_path / "starve"
    d.mkdir()
    b = Bench(d, relay='[relay]\nping_interval = "1s"\n')
    try:
        b.wait_ready()
        stress = subprocess.Popen(
            ["stress-ng", "--cpu", str((os.cpu_count() or 2) * 2), "--timeout", "12s", "--quiet"]
        )
        try:
            ok = 0
            t_end = time.monotonic() + 11
            while time.monotonic() < t_end:
                r = httpx.get(b.url("/v1/models"), headers=b.auth, timeout=10)
                ok += r.status_code == 200
                time.sleep(0.5)
        finally:
            stress.wait(30)
        assert ok >= 5
        for role in ("broker", "connector"):
            log = (d / f"{role}.log").read_text()
            assert "ping timeout" not in log, log[-2000:]
        # connected once and never lost (a first failed dial, before the broker listened, is fine)
        log = (d / "connector.log").read_text()
        assert log.count('"msg":"relay connected"') == 1, log[-2000:]
    finally:
        b.close()


async def test_answers_carry_a_standard_status_line(up: tuple[Upstream, str]) -> None:
    _app, url = up
    async with open_bridge(url) as b:
        raw = (
            f"GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {b.api_key}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        answer = await raw_exchange(port(b), raw)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:80]
        answer = await raw_exchange(
            port(b), b"GET /sse HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), answer[:80]


async def test_a_malformed_head_is_neither_echoed_nor_logged_even_at_debug(
    up: tuple[Upstream, str], caplog: pytest.LogCaptureFixture
) -> None:
    _app, url = up
    caplog.set_level(logging.DEBUG)
    async with open_bridge(url) as b:
        secret = b.api_key.encode()
        for raw in (
            b"GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret + b"\x00\r\n\r\n",
            b"POST /sse HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer " + secret + b"\r\n\r\n" + secret + b"\r\n",
        ):
            answer = await raw_exchange(port(b), raw)
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
            assert secret not in answer
    assert b.api_key not in caplog.text


async def test_relay_buffers_over_their_cap_shed_the_slowest_reader_only(
    up: tuple[Upstream, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Two clients stop reading big answers; once the broker's relay holds more than
    max_buffered for them, the one holding the most is reset; the other still completes."""
    _app, url = up
    size = 40 * 1024 * 1024
    async with (
        open_bridge(url, relay={"max_buffered": "400KiB"}) as b,
        httpx.AsyncClient(timeout=30) as client,
    ):
        relay = b.broker.registry.connectors()[0].relay
        outcomes: list[str] = []

        async def reader(started: trio.Event, go: trio.Event) -> None:
            got = 0
            try:
                async with client.stream(
                    "GET",
                    b.base_url + f"/big?n={size}",
                    headers={"Authorization": f"Bearer {b.api_key}"},
                ) as r:
                    started.set()
                    await go.wait()  # not reading: socket buffers, then relay buffers fill
                    async for chunk in r.aiter_raw():
                        got += len(chunk)
            except httpx.HTTPError:
                pass
            outcomes.append("complete" if got == size else "cut")

        go = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                started = trio.Event()
                nursery.start_soon(reader, started, go)
                await started.wait()
            with trio.fail_after(20):
                while "slowest reader" not in caplog.text:
                    await trio.sleep(0.05)
            assert relay.buffered <= 400 * 1024
            go.set()
        assert sorted(outcomes) == ["complete", "cut"]
        assert relay.buffered == 0 and relay.closed_reason is None


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_slow_upload_does_not_hold_an_llm_slot_while_it_trickles(
    framing: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A request body that trickles in (above min_body_rate) is read whole before the request
    takes one of the LLM's max_concurrent slots, so a slow client (or one that means harm, with
    a valid key) cannot keep the LLM from others while its body crawls in; with a
    Content-Length and without one (chunked: review finding, such a body was streamed)."""
    network = MemoryNetwork()
    async with open_bridge(network=network, connector={"max_concurrent": 1}) as b:
        rb = b.running_broker
        # past the 64 KiB the broker holds before it relays a request
        text = "x" * 200_000
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
        chunked = framing == "chunked"

        def part(data: str) -> bytes:
            return f"{len(data):x}\r\n{data}\r\n".encode() if chunked else data.encode()

        length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
        s = await network.open_stream(rb.host, rb.port)
        await s.send_all(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {b.api_key}\r\nContent-Type: application/json\r\n"
                f"{length}\r\n\r\n"
            ).encode()
            + part(body[:100_000])
        )

        async def trickle() -> None:  # 20 KB/s: above the minimum rate, five seconds in all
            for i in range(100_000, len(body), 2000):
                await trio.sleep(0.1)
                await s.send_all(part(body[i : i + 2000]))
            if chunked:
                await s.send_all(b"0\r\n\r\n")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            await trio.sleep(0.5)
            t0 = trio.current_time()
            async with b.client(timeout=60) as client:
                r = await client.post(
                    b.base_url + "/v1/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {b.api_key}"},
                )
            assert r.status_code == 200
            assert trio.current_time() - t0 < 2  # not after the slow body's five seconds
        answer = await s.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 200 ")  # and the slow one is served too
        await s.aclose()

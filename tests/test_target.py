"""One rule for what a request may be: no target reaches anything but the LLM's own base path."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from fakebroker import open_fake_broker
from hypothesis import given, settings
from hypothesis import strategies as st
from upstream import run_upstream

from trio_bridge.http._target import BadTarget, LLMBase, check_method, check_target
from trio_bridge.relay._protocol import RequestHead
from trio_bridge.testing import open_bridge, open_lab

SSRF_TARGETS = [
    "@127.0.0.1:{canary}/x",
    ":@127.0.0.1:{canary}/x",
    "127.0.0.1:{canary}",
    "http://127.0.0.1:{canary}/x",
    "//127.0.0.1:{canary}/x",
    "/v1/../../../x",
    "/v1/%2e%2e/%2E%2E/x",
    "/v1/..%2f..%2fx",
    "/v1/..%5c..%5cx",
    "/v1\\..\\x",
    "/v1/%00",
    "/x#@127.0.0.1:{canary}",
]


class Canary:
    """A listener on loopback that must never be reached."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async def handler(stream: trio.SocketStream) -> None:
            self.connections += 1
            await stream.aclose()

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(handler, listeners)


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    c = Canary()
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run)
        yield c
        nursery.cancel_scope.cancel()


# -- the rule, as a pure function ---------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["/v1/chat/completions", "/", "/api/chat", "/v1/models/meta-llama%2FLlama-3", "/a/..b/c.",
     "/v1/models?limit=10&order=a%20b", "/double//slash", "/x:y@z/!$&'()*+,;="],
)  # fmt: skip
def test_ordinary_targets_pass(target: str) -> None:
    path, query = check_target(target)
    assert path + query == target


@pytest.mark.parametrize("target", [t.format(canary=1) for t in SSRF_TARGETS])
def test_targets_that_could_leave_the_base_path_are_refused(target: str) -> None:
    with pytest.raises(BadTarget) as info:
        check_target(target)
    assert info.value.status == 400


@pytest.mark.parametrize(("method", "status"), [("TRACE", 405), ("CONNECT", 405), ("G T", 400)])
def test_trace_connect_and_malformed_methods_are_refused(method: str, status: int) -> None:
    with pytest.raises(BadTarget) as info:
        check_method(method)
    assert info.value.status == status
    check_method("POST")


def test_a_method_outside_the_configured_list_is_refused() -> None:
    with pytest.raises(BadTarget) as info:
        check_method("DELETE", frozenset({"GET", "POST"}))
    assert info.value.status == 405


_target_chars = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
_pieces = st.sampled_from(
    ["/", "..", ".", "%2e", "%2E", "%2f", "%5c", "\\", "@", ":", "?", "#", "127.0.0.1", "evil",
     "//", "%", "%00", "http:", "v1"]
)  # fmt: skip
targets = st.lists(st.one_of(_pieces, st.text(_target_chars, max_size=4)), max_size=12).map("".join)


@settings(max_examples=2000, deadline=None)
@given(prefix=st.sampled_from(["", "/ollama", "/a/b"]), target=targets)
def test_any_target_either_is_refused_or_stays_under_the_llms_base(
    prefix: str, target: str
) -> None:
    base = LLMBase(f"http://127.0.0.1:11434{prefix}/")
    try:
        url = base.url_for(target)
    except BadTarget:
        return
    assert (url.scheme, url.host, url.port) == ("http", "127.0.0.1", 11434)
    path = url.raw_path.decode().split("?", 1)[0]
    assert path.startswith(prefix + "/")
    # what any server makes of it, however it decodes: it never climbs above the prefix
    decoded = httpx.URL(url).path
    for candidate in (path, decoded, decoded.replace("\\", "/")):
        depth = 0
        for seg in candidate[len(prefix) :].split("/")[1:]:
            depth += -1 if seg == ".." else (0 if seg in ("", ".") else 1)
            assert depth >= 0


# -- through the running bridge -----------------------------------------------------------------


async def raw_request(port: int, head: bytes) -> bytes:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    with trio.move_on_after(5):
        await s.send_all(head)
        while b"\r\n\r\n" not in out:
            chunk = await s.receive_some(65536)
            if not chunk:
                break
            out += chunk
    await s.aclose()
    return out


@pytest.mark.parametrize("target", SSRF_TARGETS)
async def test_no_target_sent_to_the_broker_reaches_another_address(
    canary: Canary, target: str
) -> None:
    async with run_upstream() as (app, url), open_bridge(url) as b:
        port = int(b.base_url.rsplit(":", 1)[1])
        t = target.format(canary=canary.port).encode()
        answer = await raw_request(
            port,
            b"GET " + t + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + b.api_key.encode() + b"\r\n\r\n",
        )  # fmt: skip
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b"invalid" in answer
    assert canary.connections == 0
    assert app.forwarded() == []


async def test_options_star_is_answered_by_the_broker(canary: Canary) -> None:
    async with run_upstream() as (app, url), open_bridge(url) as b:
        port = int(b.base_url.rsplit(":", 1)[1])
        answer = await raw_request(port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 204 "), answer[:200]
        assert b"allow:" in answer.lower()
    assert app.forwarded() == []


async def test_trace_is_refused_by_the_broker() -> None:
    async with run_upstream() as (app, url), open_bridge(url) as b:
        async with httpx.AsyncClient() as client:
            r = await client.request(
                "TRACE", b.base_url + "/v1/models", headers={"Authorization": f"Bearer {b.api_key}"}
            )
        assert r.status_code == 405
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert app.forwarded() == []


async def test_a_hostile_broker_cannot_send_the_connector_elsewhere(canary: Canary) -> None:
    async with open_lab() as lab, open_fake_broker() as fb:
        model = await lab.start_test_model()
        await lab.start_connector([fb.url], model.url, wait=False)
        with trio.fail_after(10):
            await fb.connected.wait()
        auth = [(b"authorization", b"Bearer " + lab.api_key.encode())]
        heads = [
            RequestHead("GET", t.format(canary=canary.port), auth, f"rid{n}")
            for n, t in enumerate(SSRF_TARGETS)
        ]
        heads.append(RequestHead("TRACE", "/v1/models", auth, "ridtrace"))
        heads.append(RequestHead("GET", "/v1/models", auth, "ridok"))
        sids = {await fb.request(h): h.request_id for h in heads}
        with trio.fail_after(20):
            answers = await fb.wait_answers(list(sids))
    got = {sids[sid]: status for sid, status in answers.items()}
    assert got.pop("ridok") == 200
    assert got.pop("ridtrace") == 405
    assert set(got.values()) == {400}, got
    assert canary.connections == 0

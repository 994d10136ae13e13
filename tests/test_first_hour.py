"""The first hour of a new user: `check` tells the truth about each role, errors are one line,
the commands say which file they use, and an unknown route does not make users wait."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from netutil import free_port

from trio_bridge.testing import Lab, RunningBroker, RunningModel, open_lab

PY = sys.executable


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with open_lab() as lab:
        yield lab


async def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI without blocking the event loop (the brokers it talks to live in it)."""
    with trio.fail_after(60):
        return await trio.run_process(
            [PY, "-m", "trio_bridge", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=cwd,
        )


def write_token(path: Path, token: str, mode: int = 0o600) -> None:
    path.write_text(token + "\n")
    os.chmod(path, mode)


async def connector_check(
    lab: Lab, tmp: Path, relay_url: str, llm_url: str, *, route: str = "default"
) -> tuple[int, str]:
    (tmp / "connector.toml").write_text(
        f'[connector]\nbroker_urls = ["{relay_url}"]\nlocal_url = "{llm_url}"\n'
        f'route = "{route}"\napi_keys_file = "keys.toml"\n[limits]\nconnect_timeout = "2s"\n'
    )
    r = await cli("check", "-c", str(tmp / "connector.toml"))
    return r.returncode, r.stdout.decode()


@pytest.fixture
async def broker_and_model(lab: Lab) -> tuple[RunningBroker, RunningModel]:
    return await lab.start_broker(), await lab.start_test_model()


async def test_check_connector_gives_one_diagnosis_per_broken_setup(
    lab: Lab, tmp_path: Path, broker_and_model: tuple[RunningBroker, RunningModel]
) -> None:
    rb, model = broker_and_model
    token_file = tmp_path / "connector.token"

    # all good: a real relay handshake with the token, the LLM lists its models
    write_token(token_file, lab.token)
    code, out = await connector_check(lab, tmp_path, rb.relay_url, model.url)
    assert code == 0, out
    assert f"OK    broker {rb.relay_url}: relay handshake OK" in out
    assert "OK    LLM" in out and "models: trio-bridge-test" in out

    cases: list[tuple[str, str]] = []
    # token: missing, empty, readable by everyone, wrong
    token_file.unlink()
    cases.append(
        ((await connector_check(lab, tmp_path, rb.relay_url, model.url))[1], "no such file")
    )
    write_token(token_file, "")
    cases.append(((await connector_check(lab, tmp_path, rb.relay_url, model.url))[1], "is empty"))
    write_token(token_file, lab.token, 0o644)
    cases.append(
        ((await connector_check(lab, tmp_path, rb.relay_url, model.url))[1], "accessible to every")
    )
    write_token(token_file, "tbc_aaaaaaaa_wrong")
    cases.append(
        (
            (await connector_check(lab, tmp_path, rb.relay_url, model.url))[1],
            "HTTP 401 (check the connector token)",
        )
    )
    write_token(token_file, lab.token)
    # wrong path, wrong port (the admin port), nothing listening
    wrong_path = rb.relay_url.replace("/_bridge/relay", "/relay")
    cases.append(
        (
            (await connector_check(lab, tmp_path, wrong_path, model.url))[1],
            "no relay endpoint at this URL",
        )
    )
    host, admin_port = rb.broker.admin_address or ("", 0)
    admin = f"ws://{host}:{admin_port}/_bridge/relay"
    cases.append(
        (
            (await connector_check(lab, tmp_path, admin, model.url))[1],
            "this is an admin port, not the broker's public port",
        )
    )
    dead = free_port()
    cases.append(
        (
            (
                await connector_check(
                    lab, tmp_path, f"ws://127.0.0.1:{dead}/_bridge/relay", model.url
                )
            )[1],
            "cannot reach broker",
        )
    )
    # a route the token may not serve
    _, narrow = lab.tokens.add("narrow", routes=("gpu1",))
    write_token(token_file, narrow)
    cases.append(
        (
            (await connector_check(lab, tmp_path, rb.relay_url, model.url, route="gpu2"))[1],
            "route 'gpu2' is not allowed",
        )
    )
    write_token(token_file, lab.token)
    # an HTTP server that is not an LLM (the broker's admin port)
    cases.append(
        (
            (await connector_check(lab, tmp_path, rb.relay_url, f"http://{host}:{admin_port}"))[1],
            "does not look like an LLM API",
        )
    )
    for out, expected in cases:
        assert expected in out, out
        assert re.search(r"^FAIL  ", out, re.M), out
        assert lab.token not in out and narrow not in out

    # the probes served nothing and were no broker errors (the one request the broker saw is
    # the wrong-path upgrade, answered 404 and counted as a refusal)
    assert rb.broker.registry.relays() == []
    recent = rb.broker.stats.summary()
    assert recent["errors"] == 0 and recent["requests"] == 1


def broker_line(out: str) -> str:
    [line] = [x for x in out.splitlines() if x.startswith(("OK    broker", "FAIL  broker"))]
    return line


async def test_check_names_a_wrong_path_in_one_clean_line(
    lab: Lab, tmp_path: Path, broker_and_model: tuple[RunningBroker, RunningModel]
) -> None:
    rb, model = broker_and_model
    write_token(tmp_path / "connector.token", lab.token)
    wrong = rb.relay_url.replace("/_bridge/relay", "/relay")
    code, out = await connector_check(lab, tmp_path, wrong, model.url)
    assert code == 1
    assert broker_line(out) == (
        f"FAIL  broker {wrong}: no relay endpoint at this URL ({wrong}; expected a path like "
        "…/_bridge/relay)"
    )


async def test_check_tells_a_connector_pointed_at_the_admin_port_it_is_the_port(
    lab: Lab, tmp_path: Path, broker_and_model: tuple[RunningBroker, RunningModel]
) -> None:
    rb, model = broker_and_model
    write_token(tmp_path / "connector.token", lab.token)
    host, admin_port = rb.broker.admin_address or ("", 0)
    code, out = await connector_check(
        lab, tmp_path, f"ws://{host}:{admin_port}/_bridge/relay", model.url
    )
    line = broker_line(out)
    assert code == 1
    assert "this is an admin port, not the broker's public port" in line, line
    assert "relay path" not in line and "expected a path" not in line
    assert "broker.listen" in line


async def test_check_says_tls_when_wss_meets_a_plain_http_broker(
    lab: Lab, tmp_path: Path, broker_and_model: tuple[RunningBroker, RunningModel]
) -> None:
    rb, model = broker_and_model
    write_token(tmp_path / "connector.token", lab.token)
    wss = rb.relay_url.replace("ws://", "wss://")
    t0 = trio.current_time()
    code, out = await connector_check(lab, tmp_path, wss, model.url)
    line = broker_line(out)
    assert code == 1
    assert trio.current_time() - t0 < 4  # not the 2 s connect_timeout and more
    assert "TLS" in line and "plain HTTP" in line and "ws://" in line, line


@contextlib.contextmanager
def broker_on_a_busy_port(tmp_path: Path) -> Iterator[int]:
    """A broker config whose public port another socket holds (for the duration)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "broker.toml").write_text(
            f'[broker]\nlisten = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:0"\n'
        )
        yield port


async def test_check_broker_checks_the_broker_only(lab: Lab, tmp_path: Path) -> None:
    with broker_on_a_busy_port(tmp_path) as port:
        r = await cli("check", "-c", str(tmp_path / "broker.toml"))
    out = r.stdout.decode()
    assert r.returncode == 1
    assert f"FAIL  broker.listen: cannot listen on 127.0.0.1:{port}: address already in use" in out
    assert "WARN  broker.connector_tokens_file" in out and "tokens add" in out
    assert "LLM" not in out and "connector token:" not in out and "api_keys" not in out
    # the wrong role for a file is refused
    r = await cli("check", "connector", "-c", str(tmp_path / "broker.toml"))
    assert r.returncode == 2 and b"no [connector] section" in r.stderr


async def test_a_port_in_use_is_one_line_naming_the_option(tmp_path: Path) -> None:
    with broker_on_a_busy_port(tmp_path) as port:
        r = await cli("broker", "-c", str(tmp_path / "broker.toml"))
        (tmp_path / "c.toml").write_text(
            f'[connector]\nadmin_listen = "127.0.0.1:{port}"\n'
            'broker_urls = ["ws://127.0.0.1:9/_bridge/relay"]\n'
        )
        write_token(tmp_path / "connector.token", "tbc_aaaaaaaa_x")
        c = await cli("connector", "-c", str(tmp_path / "c.toml"))
    for result, option in ((r, "broker.listen"), (c, "connector.admin_listen")):
        err = result.stderr.decode().strip().splitlines()
        assert result.returncode == 2, err
        assert err[-1] == (
            f"trio-bridge: config error: cannot listen on 127.0.0.1:{port}: address already in "
            f"use (another process listens there); change {option}"
        )
        assert not any("Traceback" in line or "ExceptionGroup" in line for line in err)


async def test_the_broker_says_where_it_listens(tmp_path: Path) -> None:
    (tmp_path / "broker.toml").write_text(
        '[broker]\nlisten = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\n[log]\nformat = "json"\n'
    )
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            partial(
                trio.run_process,
                [PY, "-m", "trio_bridge", "broker", "-c", str(tmp_path / "broker.toml")],
                stderr=subprocess.PIPE,
                check=False,
            )
        )
        seen = b""
        with trio.fail_after(20):
            while b"listening on" not in seen:
                seen += await proc.stderr.receive_some(4096)
        proc.send_signal(2)
    line = next(x for x in seen.decode().splitlines() if "listening on" in x)
    assert re.search(
        r"listening on http://127\.0\.0\.1:\d+ \(public API; relay at /_bridge/relay\)", line
    )
    assert re.search(r"admin on http://127\.0\.0\.1:\d+", line)
    assert '"ts":"20' in line  # readable UTC time


async def test_keys_and_tokens_say_which_file_and_refuse_the_wrong_role(tmp_path: Path) -> None:
    r = await cli("keys", "add", "alice", cwd=tmp_path)
    assert r.returncode == 0
    assert f"using {tmp_path / 'keys.toml'}" in r.stderr.decode()
    (tmp_path / "broker.toml").write_text('[broker]\nlisten = "127.0.0.1:8080"\n')
    (tmp_path / "connector.toml").write_text('[connector]\nlocal_url = "http://127.0.0.1:1"\n')
    r = await cli("keys", "list", "-c", str(tmp_path / "broker.toml"))
    assert r.returncode == 2 and b"keys live on the connector" in r.stderr
    r = await cli("tokens", "add", "x", "-c", str(tmp_path / "connector.toml"))
    assert r.returncode == 2 and b"tokens live on the broker" in r.stderr
    r = await cli("keys", "list", "-c", str(tmp_path / "connector.toml"))
    assert r.returncode == 0 and r.stdout.decode().startswith("NAME")


async def test_test_model_runs_alone(tmp_path: Path) -> None:
    port = free_port()
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            partial(
                trio.run_process,
                [PY, "-m", "trio_bridge", "test-model", "--listen", f"127.0.0.1:{port}"],
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        seen = b""
        with trio.fail_after(20):
            while b"serving at" not in seen:
                seen += await proc.stdout.receive_some(4096)
        assert b"TEST MODEL" in seen
        async with httpx.AsyncClient() as client:
            r = await client.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "x", "messages": [{"role": "user", "content": "count to 3"}]},
            )
        proc.send_signal(2)
    assert r.json()["choices"][0]["message"]["content"] == "1 2 3"


async def test_a_401_is_a_refusal_in_both_roles_and_no_error(lab: Lab) -> None:
    model = await lab.start_test_model()
    rb = await lab.start_broker()
    rc = await lab.start_connector([rb], model.url)
    async with httpx.AsyncClient() as client:
        r = await client.get(rb.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert rb.broker.stats.summary()["errors"] == 0
    assert rc.connector.stats.summary()["errors"] == 0
    assert rb.broker.stats.summary()["requests"] == rc.connector.stats.summary()["requests"] == 1
    sample = rc.connector.metrics.registry.get_sample_value(
        "trio_bridge_requests_total",
        {"role": "connector", "route": "default", "status_class": "4xx", "outcome": "refused"},
    )
    assert sample == 1


async def test_a_route_never_seen_gets_503_at_once_a_short_gap_waits(lab: Lab) -> None:
    model = await lab.start_test_model()
    rb = await lab.start_broker(broker={"queue_timeout": "30s"})
    assert rb.broker.registry.born is not None
    rb.broker.registry.born -= 120  # the broker has been up for two minutes
    async with httpx.AsyncClient(timeout=60) as client:
        t0 = trio.current_time()
        r = await client.get(rb.url + "/r/never/v1/models")
        assert r.status_code == 503 and "no connector" in r.text
        assert trio.current_time() - t0 < 5  # not the 30 s queue_timeout
        # a route whose connector was here a moment ago waits for it to come back
        rc = await lab.start_connector([rb], model.url, connector={"route": "gpu1"})
        await rc.kill()

        async def come_back() -> None:
            await trio.sleep(1.0)
            await lab.start_connector([rb], model.url, connector={"route": "gpu1"})

        lab.nursery.start_soon(come_back)
        r = await client.get(
            rb.url + "/r/gpu1/v1/models", headers={"Authorization": f"Bearer {lab.api_key}"}
        )
        assert r.status_code == 200
        # route labels in the metrics: only routes a connector served (any client can name
        # any route in a path: one label value per name would grow without bound)
        text = rb.broker.metrics.render().decode()
        assert 'route="gpu1"' in text and 'route="unknown"' in text
        assert "never" not in text

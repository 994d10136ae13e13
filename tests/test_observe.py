"""Observability: admin endpoints, Prometheus metrics, token usage, correlation ids, no secrets."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from upstream import Upstream, run_upstream

from trio_bridge._observe import Facts, JsonFormatter, TextFormatter, log_request, setup_logging
from trio_bridge.testing import Lab, open_bridge, open_lab

CHAT = "/v1/chat/completions"


def admin(address: tuple[str, int] | None) -> str:
    assert address is not None
    return f"http://{address[0]}:{address[1]}"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        v
        for (n, ls), v in metrics.items()
        if n == name and all((k, val) in ls for k, val in labels.items())
    )


@pytest.fixture
async def up() -> AsyncIterator[tuple[Upstream, str]]:
    async with run_upstream() as pair:
        yield pair


async def test_one_request_is_traceable_by_its_correlation_id_everywhere(
    up: tuple[Upstream, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, url = up
    caplog.set_level(logging.INFO)
    async with open_bridge(url) as b, httpx.AsyncClient() as client:
        r = await client.get(
            b.base_url + "/headers?secret=v",
            headers={"Authorization": f"Bearer {b.api_key}", "X-Request-ID": "follow-me-7"},
        )
        assert r.status_code == 200
    assert r.headers["x-request-id"] == "follow-me-7"
    assert dict(app.forwarded()[-1]["headers"])["x-request-id"] == "follow-me-7"
    lines = [rec for rec in caplog.records if getattr(rec, "request_id", None) == "follow-me-7"]
    by_role = {getattr(rec, "role", None): rec for rec in lines}
    assert set(by_role) == {"broker", "connector"}
    for _role, rec in by_role.items():
        assert rec.status == 200 and rec.outcome == "ok"  # type: ignore[attr-defined]
        assert rec.path == "/headers"  # type: ignore[attr-defined]  # no query string values
        assert rec.duration_ms >= 0 and rec.ttfb_ms >= 0  # type: ignore[attr-defined]
    assert by_role["connector"].key_id == b.keys.entries()[0].id  # type: ignore[attr-defined]
    assert by_role["broker"].connector == "lab-connector"  # type: ignore[attr-defined]
    doc = json.loads(JsonFormatter().format(by_role["broker"]))
    assert doc["request_id"] == "follow-me-7" and doc["role"] == "broker"
    assert "follow-me-7" in TextFormatter().format(by_role["connector"])


async def test_metrics_move_by_the_right_amounts(up: tuple[Upstream, str]) -> None:
    _, url = up
    async with (
        open_bridge(url, limits={"first_byte_timeout": "300ms"}) as b,
        httpx.AsyncClient() as client,
    ):
        auth = {"Authorization": f"Bearer {b.api_key}"}
        for _ in range(2):
            assert (await client.get(b.base_url + "/sse", headers=auth)).status_code == 200
        assert (await client.get(b.base_url + "/sse")).status_code == 401
        assert (await client.get(b.base_url + "/slow-head?s=5", headers=auth)).status_code == 504
        async with client.stream("GET", b.base_url + "/forever", headers=auth) as r:
            async for _ in r.aiter_raw():
                break
        total = "trio_bridge_requests_total"
        with trio.fail_after(10):  # until both roles have counted the stream the client left
            while True:
                bm = samples((await client.get(admin(b.broker.admin_address) + "/metrics")).text)
                cm = samples((await client.get(admin(b.connector.admin_address) + "/metrics")).text)
                if value(bm, total, role="broker") >= 5 and value(cm, total) >= 5:
                    break
                await trio.sleep(0.05)
    assert value(bm, total, role="broker", status_class="2xx", outcome="ok") == 2
    assert value(bm, total, role="broker", status_class="4xx") == 1
    assert value(bm, total, role="broker", status_class="5xx") == 1
    assert value(bm, total, role="broker", outcome="client_gone") == 1
    assert value(bm, total, role="broker") == 5
    assert value(cm, total, role="connector") == 5
    assert value(cm, "trio_bridge_auth_failures_total", role="connector") == 1
    assert value(cm, "trio_bridge_resets_total", reason="client_gone") == 1
    assert value(bm, "trio_bridge_request_duration_seconds_count", role="broker") == 5
    assert value(bm, "trio_bridge_time_to_first_byte_seconds_count", role="broker") == 5
    assert value(cm, "trio_bridge_upstream_up") == 1
    assert value(cm, "trio_bridge_relay_connected") == 1
    assert value(bm, "trio_bridge_relays", role="broker", route="default") == 1
    assert value(bm, "trio_bridge_in_flight_requests") == 0
    assert value(bm, "trio_bridge_body_bytes_total", direction="out") > 0
    for (_name, labels), _ in {**bm, **cm}.items():  # no unbounded or secret label values
        for _, v in labels:
            assert (
                b.api_key not in v
                and "slow-head" not in v
                and "/" not in v.replace("ws://", "").split("/", 1)[0]
            )


async def test_token_usage_is_counted_per_key_and_model(lab: Lab) -> None:
    model = await lab.start_test_model()
    rb = await lab.start_broker()
    rc = await lab.start_connector([rb], model.url)
    auth = {"Authorization": f"Bearer {lab.api_key}"}
    key_id = lab.keys.entries()[0].id
    async with httpx.AsyncClient() as client:
        plain = await client.post(
            rb.url + CHAT,
            headers=auth,
            json={"model": "m1", "messages": [{"role": "user", "content": "count to 7"}]},
        )
        usage = plain.json()["usage"]
        await client.post(
            rb.url + CHAT,
            headers=auth,
            json={
                "model": "m1",
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "count to 5"}],
            },
        )
        await client.post(
            rb.url + "/api/chat",
            headers=auth,
            json={"model": "m2", "messages": [{"role": "user", "content": "count to 3"}]},
        )
        await client.post(
            rb.url + CHAT,
            headers=auth,
            json={  # no usage in the stream: not counted
                "model": "m1",
                "stream": True,
                "messages": [{"role": "user", "content": "count to 9"}],
            },
        )
        status = (await client.get(admin(rc.connector.admin_address) + "/status")).json()
        cm = samples((await client.get(admin(rc.connector.admin_address) + "/metrics")).text)
    assert status["tokens"][key_id]["m1"] == {
        "prompt": usage["prompt_tokens"] + 3,
        "completion": 7 + 5,
    }
    assert status["tokens"][key_id]["m2"] == {"prompt": 3, "completion": 3}
    assert (
        value(cm, "trio_bridge_llm_tokens_total", key_id=key_id, model="m1", kind="completion")
        == 12
    )
    assert value(cm, "trio_bridge_time_to_first_token_seconds_count", model="m1") == 2
    # tokens per second for both streams: the one without usage counts its events
    assert value(cm, "trio_bridge_tokens_per_second_count", model="m1") == 2


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with open_lab() as lab:
        yield lab


async def test_readyz_follows_the_llm_and_the_relay(lab: Lab) -> None:
    port_model = await lab.start_test_model()
    host, port = port_model.url.removeprefix("http://").split(":")
    rb = await lab.start_broker()
    rc = await lab.start_connector([rb], port_model.url, connector={"health_interval": "300ms"})
    c_admin, b_admin = admin(rc.connector.admin_address), admin(rb.broker.admin_address)
    async with httpx.AsyncClient() as client:

        async def ready() -> int:
            return (await client.get(c_admin + "/readyz")).status_code

        assert await ready() == 200
        assert (await client.get(b_admin + "/readyz")).status_code == 200
        assert (await client.get(c_admin + "/healthz")).status_code == 200
        port_model.stop.cancel()
        with trio.fail_after(5):
            while await ready() != 503:
                await trio.sleep(0.05)
        doc = (await client.get(c_admin + "/status")).json()
        assert doc["llm"]["up"] is False and doc["llm"]["last_error"]
        await lab.start_test_model(listen=f"{host}:{port}")
        with trio.fail_after(5):
            while await ready() != 200:
                await trio.sleep(0.05)
        await rb.stop()  # relay gone: not ready, though the LLM is fine
        with trio.fail_after(5):
            while await ready() != 503:
                await trio.sleep(0.05)
        doc = (await client.get(c_admin + "/status")).json()
        assert doc["relays"][0]["state"] == "reconnecting" and doc["relays"][0]["last_error"]


async def test_broker_status_lists_connectors_per_route(lab: Lab) -> None:
    model = await lab.start_test_model()
    rb = await lab.start_broker()
    await lab.start_connector(
        [rb], model.url, connector={"name": "gpu-a", "max_concurrent": 3, "max_queue": 5}
    )
    await lab.start_connector([rb], model.url, connector={"name": "gpu-b", "route": "big"})
    async with httpx.AsyncClient() as client:
        doc = (await client.get(admin(rb.broker.admin_address) + "/status")).json()
    assert doc["ready"] is True
    assert [c["connector"] for c in doc["routes"]["default"]] == ["gpu-a"]
    # what the connector takes: its LLM slots plus its (fair) queue
    assert doc["routes"]["default"][0]["capacity"] == 3 + 5
    assert doc["routes"]["big"][0]["connector"] == "gpu-b"
    assert doc["routes"]["big"][0]["ready"] is True


async def test_no_secret_appears_in_logs_metrics_status_or_errors(
    up: tuple[Upstream, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, url = up
    caplog.set_level(logging.DEBUG)
    async with open_bridge(url) as b, httpx.AsyncClient() as client:
        upstream_secret = "upstream-key-s3cr3t-value"
        b.connector.forwarder.upstream_auth = (
            b"authorization",
            f"Bearer {upstream_secret}".encode(),
        )
        secrets = [b.api_key, b.lab.token, upstream_secret, b.api_key.split("_", 2)[2]]
        wrong = b.api_key[:-5] + "XXXXX"
        outputs = []
        for headers in (
            {"Authorization": f"Bearer {b.api_key}"},
            {"x-api-key": wrong},
            {"Authorization": f"Bearer {wrong}"},
            {},
        ):
            r = await client.get(b.base_url + "/sse?api_key=" + b.api_key, headers=headers)
            outputs.append(r.text + json.dumps(dict(r.headers)))
        for base in (admin(b.broker.admin_address), admin(b.connector.admin_address)):
            outputs.append((await client.get(base + "/metrics")).text)
            outputs.append((await client.get(base + "/status")).text)
        b.broker.tokens.revoke("lab-connector")  # a refused relay logs too
        await trio.sleep(1.5)
    fmt = JsonFormatter()
    outputs += [fmt.format(rec) for rec in caplog.records]
    outputs += [TextFormatter().format(rec) for rec in caplog.records]
    everything = "\n".join(outputs)
    assert "request" in everything and "relay" in everything  # we did capture real output
    for secret in secrets:
        leaks = [
            o[max(0, o.find(secret) - 200) : o.find(secret) + 50] for o in outputs if secret in o
        ]
        assert not leaks, leaks
    # the upstream key does reach the LLM (and only it), the user's key never does
    assert any(v == f"Bearer {upstream_secret}" for _, v in app.forwarded()[0]["headers"])


def test_status_command_prints_a_table_and_json(tmp_path: object) -> None:
    async def scenario() -> tuple[str, str]:
        async with open_bridge() as b, httpx.AsyncClient() as client:
            await client.post(
                b.base_url + CHAT,
                headers={"Authorization": f"Bearer {b.api_key}"},
                json={
                    "model": "m",
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "count to 4"}],
                },
            )
            url = admin(b.connector.admin_address)
            table = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-m", "trio_bridge", "status", "--url", url],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            )
            raw = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-m", "trio_bridge", "status", "--url", url, "--json"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            )
            assert table.returncode == 0, table.stderr
            return table.stdout, raw.stdout

    table, raw = trio.run(scenario)
    assert "connector" in table and "READY" in table and "LLM http://" in table
    assert "relay ws://" in table and "completion 4" in table
    assert json.loads(raw)["role"] == "connector"


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_the_direct_request_line_equals_the_formatters_line(fmt: str) -> None:
    """The end-of-request line skips the logging machinery while the role's own handler is
    its only destination; it must be the line the formatter writes, and any other handler
    (an application's, a test's caplog) must still get records."""
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("info", fmt, stream=out)
        facts = Facts("rid-1", "POST", "/v1/chat/completions", route="default", status=200)
        facts.ended = facts.started + 0.012
        log_request("connector", facts)
        direct = out.getvalue()
        assert direct.endswith("\n") and direct.count("\n") == 1
        record = logging.LogRecord("trio_bridge.request", logging.INFO, "", 0, "request", (), None)
        record.__dict__.update(facts.line("connector"))
        record.created = 0.0  # the time differs; everything else must not
        formatted = root.handlers[-1].format(record)
        if fmt == "json":
            a, b = json.loads(direct), json.loads(formatted)
            for doc in (a, b):
                del doc["ts"], doc["t"]
            assert a == b and a["duration_ms"] == 12.0 and a["role"] == "connector"
        else:
            assert direct.split(" ", 1)[1] == formatted.split(" ", 1)[1] + "\n"
        seen: list[logging.LogRecord] = []
        other = logging.Handler()
        other.emit = seen.append  # type: ignore[method-assign]
        root.addHandler(other)
        log_request("broker", facts)
        assert [r.__dict__["role"] for r in seen] == ["broker"]  # the record path again
        assert out.getvalue().count("\n") == 2  # and our handler still wrote its line
        logging.getLogger("trio_bridge.request").setLevel(logging.WARNING)
        log_request("broker", facts)  # filtered out: nothing anywhere
        assert len(seen) == 1 and out.getvalue().count("\n") == 2
    finally:
        logging.getLogger("trio_bridge.request").setLevel(logging.NOTSET)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


async def test_recent_stats_keep_requests_and_errors_per_step_in_fixed_memory(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The broker page's picture of the last minutes: per step, oldest first, steps without
    requests as zeros, nothing older than the window (on trio's clock)."""
    from trio_bridge import _observe

    await trio.sleep_until(1000.0)
    stats = _observe.RecentStats(step=10, length=6)
    stats.add(0.1, None, False)
    stats.add(0.1, None, True)
    await trio.sleep_until(1025.0)
    stats.add(0.1, 0.01, False)
    series = stats.series()
    assert series["step_s"] == 10
    assert series["requests"] == [0, 0, 0, 2, 0, 1]
    assert series["errors"] == [0, 0, 0, 1, 0, 0]
    await trio.sleep_until(1065.0)  # the first requests left the window (six steps of 10 s)
    assert stats.series()["requests"] == [0, 1, 0, 0, 0, 0]
    await trio.sleep_until(5000.0)
    assert stats.series()["requests"] == [0] * 6
    assert len(stats._buckets) == 6

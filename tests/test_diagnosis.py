"""Every failure names its cause: what a user, an operator's CLI and the logs say when something
is wrong (issue: diagnosis), checked as they would see it.

The faults an operator met, one test (or more) each:

1. an expired key: ``test_an_expired_key_*`` (listed, extendable, 401 ``key_expired``, id logged)
2. a usage file that cannot be written (disk full): tests/test_usage_store.py
   ``test_a_failing_usage_file_never_stops_the_connector`` (served, counted, in ``problems``,
   cleared when written) and ``test_check_fails_on_a_usage_file_sqlite_cannot_write``
3. a broken LLM in a pool: ``test_a_connector_whose_answers_keep_failing_is_ejected_*``,
   ``test_a_request_whose_llm_is_unreachable_is_retried_on_another_connector``,
   ``test_answers_failing_while_a_connector_is_ejected_*``
4. 5xx counted as ok: ``test_an_llm_error_is_an_error_*``, ``test_the_docs_error_rate_*``
5. error lines without a reason: ``test_a_bridge_made_error_names_its_cause_in_the_log_line``
6. a corrupt keys file: ``test_a_corrupt_keys_file_*``,
   ``test_a_keys_or_tokens_file_that_is_not_utf8_*``
7. a broker without connectors: ``test_a_broker_without_connectors_says_so_*``,
   ``test_a_request_that_waited_for_a_connector_that_left_*``
8. ``check`` on a running role: ``test_check_asks_a_running_role_*``
9. a slow model list: ``test_check_and_status_agree_on_an_llm_whose_model_list_is_slow``
10. ``local_url`` pointing at the broker: ``test_a_local_url_that_reaches_the_broker_is_named``
11. revoked keys and tokens: ``test_a_revoked_*`` (listed, 401 ``key_revoked``, refusals name
    the id, refused relay dials not counted as requests; the connector gives the broker's
    reason: ``test_a_relay_refusal_gives_the_brokers_own_reason``); a stale last error:
    ``test_status_shows_a_relays_last_error_only_while_it_is_down``; not ready, and why:
    ``test_not_ready_says_why``
"""

from __future__ import annotations

import logging
import re
from functools import partial
from pathlib import Path
from typing import Any, cast

import attrs
import httpx
import pytest
import trio
import trio.testing
from prometheus_client import generate_latest
from redisserver import RedisServer, needs_redis

from trio_bridge._config import Duration, load_config
from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.broker._registry import BORN_GRACE
from trio_bridge.cli import _cli
from trio_bridge.cli._status import format_status
from trio_bridge.connector._llm import A_BROKER
from trio_bridge.testing import Bridge, MemoryNetwork, open_bridge, open_lab

PAST = "2020-01-01T00:00:00Z"
CHAT = "/v1/chat/completions"


def keys_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "connector.toml"
    cfg.write_text('[connector]\napi_keys_file = "keys.toml"\nusage_file = ""\n')
    return cfg


def test_an_expired_key_stays_listed_and_can_be_extended_or_rotated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = keys_config(tmp_path)
    store = SecretStore(tmp_path / "keys.toml", "tbk")
    alice, _ = store.add("alice", expires=PAST)
    store.add("bob")  # another write of the file keeps alice's entry
    assert _cli.main(["keys", "list", "-c", str(cfg)]) == 0
    listed = capsys.readouterr().out
    [line] = [line for line in listed.splitlines() if line.startswith("alice")]
    assert alice.id in line and "expired" in line
    assert _cli.main(["keys", "set", "alice", "--expires", "none", "-c", str(cfg)]) == 0
    assert not SecretStore(tmp_path / "keys.toml", "tbk").entries()[0].expired()
    store.set_limits("alice", {"expires": PAST})
    capsys.readouterr()
    assert _cli.main(["keys", "rotate", "alice", "-c", str(cfg)]) == 0
    fresh = [e for e in SecretStore(tmp_path / "keys.toml", "tbk").entries() if e.name == "alice"]
    # the expired one it replaced stays (marked replaced, REVOKED_KEPT, like a revoked one)
    assert [(e.id == alice.id, e.usable(), bool(e.replaced)) for e in fresh] == [
        (True, False, True),
        (False, True, False),
    ]


async def chat_with(b: Bridge, key: str) -> httpx.Response:
    async with b.client() as client:
        return await client.post(
            b.base_url + CHAT,
            json={"model": "m", "messages": []},
            headers={"Authorization": f"Bearer {key}"},
        )


async def test_an_expired_key_is_told_so_and_its_id_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_bridge(network=MemoryNetwork()) as b:
        entry, key = b.keys.add("carol", expires=PAST)
        caplog.set_level(logging.INFO, "trio_bridge")
        r = await chat_with(b, key)
    assert r.status_code == 401
    error = r.json()["error"]
    assert "expired" in error["message"] and PAST in error["message"]
    assert error["code"] == "key_expired"
    lines = [rec for rec in caplog.records if rec.name == "trio_bridge.request"]
    assert any(getattr(rec, "key_id", None) == entry.id for rec in lines)


async def test_a_rotated_away_key_is_told_it_was_replaced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After a rotation's grace, the old secret is refused saying so (it was dropped from the
    file and answered "invalid API key", as if it had never existed)."""
    async with open_bridge(network=MemoryNetwork()) as b:
        _, key = b.keys.add("carol")
        b.keys.rotate("carol", 0)
        r = await chat_with(b, key)
    assert r.status_code == 401
    error = r.json()["error"]
    assert error["code"] == "key_expired" and "replaced by a new one" in error["message"]
    assert key not in r.text


async def test_an_llm_error_is_an_error_in_the_connectors_log_metrics_and_inspector(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An LLM's own 5xx, relayed as it was, has outcome llm_error (not "ok") in the log line,
    the metrics and the inspector alike; the docs' error-rate query counts it."""
    async with open_bridge(network=MemoryNetwork()) as b:
        caplog.set_level(logging.INFO, "trio_bridge")
        async with b.client() as client:
            for prompt in ("fail with 503", "hello"):
                r = await client.post(
                    b.base_url + CHAT,
                    json={"model": "m", "messages": [{"role": "user", "content": prompt}]},
                    headers={"Authorization": f"Bearer {b.api_key}"},
                )
                assert r.status_code == (503 if "fail" in prompt else 200)
        metrics = b.connector.metrics
        recent = b.connector.inspector.recent(10)
    lines = [
        rec
        for rec in caplog.records
        if rec.name == "trio_bridge.request" and getattr(rec, "role", "") == "connector"
    ]
    assert sorted(getattr(rec, "outcome", "") for rec in lines) == ["llm_error", "ok"]
    assert sorted(r["outcome"] for r in recent) == ["llm_error", "ok"]
    text = generate_latest(metrics.registry).decode()
    errors = [
        line
        for line in text.splitlines()
        if line.startswith("trio_bridge_requests_total{")
        and not re.search(r'outcome="(ok|client_gone|refused)"', line)  # the docs' query
    ]
    assert len(errors) == 1 and 'outcome="llm_error"' in errors[0] and errors[0].endswith(" 1.0")


async def chat_as(b: Any, client: httpx.AsyncClient, key: str, prompt: str) -> httpx.Response:
    return await client.post(
        b.base_url + CHAT,
        json={"model": "m", "messages": [{"role": "user", "content": prompt}]},
        headers={"Authorization": f"Bearer {key}"},
    )


async def test_a_bridge_made_error_names_its_cause_in_the_log_line(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A 504 or 502 the connector made says why in its log line (``reason``), not only in
    the user's body."""
    async with open_bridge(network=MemoryNetwork(), limits={"first_byte_timeout": "2s"}) as b:
        caplog.set_level(logging.INFO, "trio_bridge")
        async with b.client() as client:
            r = await client.post(
                b.base_url + CHAT,
                json={"model": "m", "messages": [{"role": "user", "content": "wait 10 s"}]},
                headers={"Authorization": f"Bearer {b.api_key}"},
            )
    assert r.status_code == 504
    [line] = [
        rec
        for rec in caplog.records
        if rec.name == "trio_bridge.request" and getattr(rec, "role", "") == "connector"
    ]
    assert getattr(line, "status", None) == 504
    assert "did not start answering in time" in str(getattr(line, "reason", ""))


async def test_a_corrupt_keys_file_is_said_at_once_and_the_last_good_keys_stay(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_bridge(network=MemoryNetwork()) as b:
        caplog.set_level(logging.INFO, "trio_bridge")
        async with b.client() as client:
            good = b.keys.path.read_text()
            b.keys.path.write_text("this is [not toml\n")
            await trio.sleep(2)  # past the file's re-check interval
            r = await chat_as(b, client, b.api_key, "hello")
            assert r.status_code == 200  # the last good keys are in force
            errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
            assert len(errors) == 1 and str(b.keys.path) in errors[0].getMessage()
            doc = b.connector.status()
            assert doc["ready"] and any("keys file" in p for p in doc["problems"])
            r = await client.get(b.connector_admin_url + "/readyz")
            assert r.status_code == 200 and r.json()["problems"] == doc["problems"]
            await trio.sleep(2)
            await chat_as(b, client, b.api_key, "again")  # no second error line for it
            assert len([rec for rec in caplog.records if rec.levelno >= logging.ERROR]) == 1
            b.keys.path.write_text(good)
            _, key = SecretStore(b.keys.path, "tbk").add("dave")  # a good file again
            await trio.sleep(2)
            assert (await chat_as(b, client, key, "hi")).status_code == 200
            assert b.connector.status()["problems"] == []


async def test_a_corrupt_tokens_file_is_a_broker_problem_and_its_relays_stay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_bridge(network=MemoryNetwork()) as b:
        path = b.broker.tokens.path
        good = path.read_text()
        path.write_text("this is [not toml\n")
        await trio.sleep(3)  # past the broker's look at its tokens file
        assert b.broker.registry.connectors()  # the relay dialled with a good token stays
        [problem] = b.broker.status()["problems"]
        assert problem.startswith(f"connector tokens file: {path}: invalid TOML")
        async with b.client() as client:
            r = await client.get(b.broker_admin_url + "/readyz")
        assert r.status_code == 200 and r.json()["problems"] == [problem]
        path.write_text(good)
        await trio.sleep(3)
        assert b.broker.status()["problems"] == []


async def test_not_ready_says_why(autojump_clock: trio.testing.MockClock) -> None:
    async with open_bridge(network=MemoryNetwork()) as b:
        assert b.model is not None
        await b.running_broker.stop()
        await trio.sleep(1)
        why = b.connector.not_ready_because()
        assert len(why) == 1 and why[0].startswith("no relay to a broker is up (")
        text = format_status(b.connector.status())
        assert "NOT READY (no relay to a broker is up" in text


async def test_the_docs_error_rate_agrees_with_status_on_the_same_traffic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """docs/operating.md's error-rate query (on the broker's requests_total) and the Grafana
    panel's (the same expression) count what /status counts as errors: LLM errors, a
    connector's own 502/504, and no refusals."""
    page = (Path(__file__).parent.parent / "docs" / "operating.md").read_text()
    excluded = re.search(r'outcome!~"([a-z_|]+)"', page)
    assert excluded is not None
    dashboard = (Path(__file__).parent.parent / "conf" / "grafana-dashboard.json").read_text()
    assert f'outcome!~\\"{excluded[1]}\\"' in dashboard  # the panel uses the same rule
    async with open_bridge(network=MemoryNetwork(), limits={"first_byte_timeout": "2s"}) as b:
        async with b.client() as client:
            statuses = [
                (await chat_as(b, client, key, prompt)).status_code
                for key, prompt in (
                    (b.api_key, "hello"),
                    (b.api_key, "fail with 500"),
                    (b.api_key, "wait 5 s"),  # the connector's 504
                    ("tbk_wrongkey_xxxxxxxxxxxxxxxx", "hello"),  # refused: no error
                    (b.api_key, "fail with 503"),
                )
            ]
        assert statuses == [200, 500, 504, 401, 503]
        text = generate_latest(b.broker.metrics.registry).decode()
        status = b.broker.status()
    total = errors = 0.0
    for line in text.splitlines():
        if line.startswith("trio_bridge_requests_total{") and 'role="broker"' in line:
            n = float(line.rsplit(" ", 1)[1])
            total += n
            outcome = re.search(r'outcome="([a-z_]+)"', line)
            assert outcome is not None
            if not re.fullmatch(excluded[1], outcome[1]):
                errors += n
    assert (total, errors) == (5, 3)
    recent = status["recent"]
    assert recent["requests"] == 5 and round(recent["error_rate"] * 5) == 3


async def test_a_request_whose_llm_is_unreachable_is_retried_on_another_connector(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two connectors on one route; one's LLM goes away. The request that finds it gone
    (nothing was sent to any LLM yet) goes to the other connector instead of a 502, and the
    broken one is not tried again while its LLM is down."""
    async with open_lab(network=MemoryNetwork()) as lab:
        broker = await lab.start_broker()
        healthy, doomed = await lab.start_test_model(), await lab.start_test_model()
        await lab.start_connector([broker], doomed.url, connector={"name": "bad"})
        await lab.start_connector([broker], healthy.url, connector={"name": "good"})
        doomed.stop.cancel()  # its LLM is gone; the connector does not know yet
        await trio.sleep(0.1)
        async with lab.client() as client:
            statuses = []
            for _ in range(6):
                r = await client.post(
                    broker.url + CHAT,
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {lab.api_key}"},
                )
                statuses.append(r.status_code)
        assert statuses == [200] * 6
        assert [r.method for r in healthy.model.requests].count("POST") == 6


async def test_a_connector_whose_answers_keep_failing_is_ejected_for_a_while(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two connectors on one route; five answers in a row from one fail (its health check
    still passes). It then gets no new request for a while (as Envoy's outlier detection),
    the other takes them, status says so, and it is tried again later."""
    async with open_lab(network=MemoryNetwork()) as lab:
        broker = await lab.start_broker()
        good, bad = await lab.start_test_model(), await lab.start_test_model()
        await lab.start_connector([broker], bad.url, connector={"name": "bad"})
        await lab.start_connector([broker], good.url, connector={"name": "good"})
        async with lab.client() as client:

            async def ask(prompt: str) -> int:
                r = await client.post(
                    broker.url + CHAT,
                    json={"model": "m", "messages": [{"role": "user", "content": prompt}]},
                    headers={"Authorization": f"Bearer {lab.api_key}"},
                )
                return r.status_code

            # one at a time, the first connector (equal priority and load) is asked each time:
            # five answers of its LLM fail in a row
            statuses = [await ask("fail with 500") for _ in range(5)]
            assert statuses == [500] * 5
            doc = broker.broker.status()
            [bad_doc] = [c for c in doc["routes"]["default"] if c["connector"] == "bad"]
            assert bad_doc["failed"] == 5 and bad_doc["ejected_for_s"] > 0
            # trio-bridge status says it too (review finding: it read "bad (ready)")
            [line] = [ln for ln in format_status(doc).splitlines() if ": bad (" in ln]
            assert "ejected (10 s more)" in line and "answers 5, failed 5" in line
            assert [await ask("hello") for _ in range(4)] == [200] * 4
            assert [r.method for r in bad.model.requests].count("POST") == 5
            assert [r.method for r in good.model.requests].count("POST") == 4
            await trio.sleep(11)  # the ejection (10 s) is over: the bad box is tried again
            assert await ask("hello") == 200
            assert [r.method for r in bad.model.requests].count("POST") == 6


def test_a_revoked_secret_stays_listed_as_revoked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A revoked key or token is kept (hash only, marked revoked, for 30 days) so that
    `list` says what happened to it and a refusal can name it; it never works again."""
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(
        '[connector]\napi_keys_file = "keys.toml"\nusage_file = ""\n'
        '[broker]\nconnector_tokens_file = "tokens.toml"\n'
    )
    keys = SecretStore(tmp_path / "keys.toml", "tbk")
    alice, _ = keys.add("alice")
    tokens = SecretStore(tmp_path / "tokens.toml", "tbc")
    box, _ = tokens.add("box1")
    assert _cli.main(["keys", "revoke", "alice", "-c", str(cfg)]) == 0
    assert _cli.main(["tokens", "revoke", "box1", "-c", str(cfg)]) == 0
    capsys.readouterr()
    assert _cli.main(["keys", "list", "-c", str(cfg)]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("alice")]
    assert alice.id in line and "revoked" in line
    assert _cli.main(["tokens", "list", "-c", str(cfg)]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("box1")]
    assert box.id in line and "revoked" in line
    fresh = SecretStore(tmp_path / "keys.toml", "tbk")
    revoked = fresh.get(alice.id)
    assert revoked is not None and not revoked.usable() and alice.id not in fresh.active_ids()
    # what is revoked stays revoked: not extended, not rotated, not revoked twice
    for argv in (["set", "alice", "--expires", "none"], ["rotate", "alice"], ["revoke", "alice"]):
        assert _cli.main(["keys", *argv, "-c", str(cfg)]) == 2
        assert "revoked" in capsys.readouterr().err
    # the name is free again: a new key of that name is a new entry beside the revoked one
    keys.add("alice")
    assert [e.revoked != "" for e in SecretStore(tmp_path / "keys.toml", "tbk").entries()] == [
        True,
        False,
    ]


async def test_a_revoked_key_is_told_so_and_the_refusals_name_the_ids(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_bridge(network=MemoryNetwork()) as b:
        entry, key = b.keys.add("dave")
        SecretStore(b.keys.path, "tbk").revoke("dave")
        await trio.sleep(1)  # a running store looks at its file at most twice a second
        caplog.set_level(logging.INFO, "trio_bridge")
        async with b.client() as client:
            r = await client.post(
                b.base_url + CHAT,
                json={"model": "m", "messages": []},
                headers={"Authorization": f"Bearer {key}"},
            )
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "key_revoked"
        lines = [rec for rec in caplog.records if rec.name == "trio_bridge.request"]
        assert any(getattr(rec, "key_id", None) == entry.id for rec in lines)
        # a relay dialled with a revoked connector token: the refusal names the token id
        [token_entry] = b.broker.tokens.entries()
        b.broker.tokens.revoke(token_entry.name)
        with trio.fail_after(60):
            while not any(
                getattr(rec, "token_id", None) == token_entry.id
                and "revoked" in rec.getMessage()
                and "refused" in rec.getMessage()
                for rec in caplog.records
            ):
                await trio.sleep(0.5)
        # refused relay dials are not API requests: the broker counted the user's one only
        assert b.broker.status()["recent"]["requests"] == 1


async def test_a_broker_without_connectors_says_so_and_answers_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A freshly started broker waits for connectors only while they may still be re-dialling
    (BORN_GRACE), never the whole queue_timeout; `status` says it has none. /readyz stays
    200: connectors dial the same port, through the same load balancer."""
    async with open_lab(network=MemoryNetwork()) as lab:
        rb = await lab.start_broker(broker={"queue_timeout": "60s"})
        async with lab.client() as client:
            t0 = trio.current_time()
            r = await client.get(rb.url + "/v1/models", headers={"Authorization": "Bearer x"})
            assert r.status_code == 503
            assert trio.current_time() - t0 <= BORN_GRACE  # not the 60 s queue_timeout
            await trio.sleep(BORN_GRACE)
            t0 = trio.current_time()
            r = await client.get(rb.url + "/v1/models", headers={"Authorization": "Bearer x"})
            assert r.status_code == 503 and trio.current_time() - t0 < 0.1
            assert "no connector" in r.json()["error"]["message"]
        status = rb.broker.status()
        assert status["ready"] is True
        assert any("no connector is connected" in p for p in status["problems"])
        assert "no connector is connected" in format_status(status)


async def test_check_asks_a_running_role_instead_of_failing_on_its_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` while the roles run: the ports in use are theirs (asked on the admin port), and
    what they say of themselves is in the report (a connector whose LLM is down: FAIL)."""
    from trio_bridge.cli._check import run_check

    async with open_lab() as lab:
        model = await lab.start_test_model()
        rb = await lab.start_broker()
        rc = await lab.start_connector([rb], model.url)
        assert rb.broker.admin_address is not None and rc.connector.admin_address is not None
        b_admin = "{}:{}".format(*rb.broker.admin_address)
        c_admin = "{}:{}".format(*rc.connector.admin_address)
        config = attrs.evolve(
            lab.config(
                broker={"listen": f"127.0.0.1:{rb.port}", "admin_listen": b_admin},
                connector={"admin_listen": c_admin, "local_url": model.url},
            ),
            sections=("broker",),
        )
        assert await run_check(config, "broker") == 0
        out = capsys.readouterr().out
        assert f"OK    broker.listen: 127.0.0.1:{rb.port} is served by the running broker" in out
        assert "OK    running broker: ready" in out
        model.stop.cancel()
        rc.connector.llm.failed("test: the LLM stopped")
        with trio.fail_after(10):
            while rc.connector.llm.ready:
                await trio.sleep(0.05)
        assert await run_check(attrs.evolve(config, sections=("connector",)), "connector") == 1
        out = capsys.readouterr().out
        assert "FAIL  running connector: NOT READY: the LLM is down" in out


async def test_a_local_url_that_reaches_the_broker_is_named(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """local_url set to the broker's address: refused when the config is read if it is
    broker_urls' address, and named in not_ready_because when it reaches the broker by
    another name (the broker answers the health probe itself, through this very connector)."""
    network = MemoryNetwork()
    async with open_lab(network=network) as lab:
        rb = await lab.start_broker()
        # the same listener under another name, as a public DNS name would be
        network.listening[("broker.example", rb.port)] = network.listening[("127.0.0.1", rb.port)]
        rc = await lab.start_connector([rb], f"http://broker.example:{rb.port}")
        with trio.fail_after(60):
            while rc.connector.llm.last_error != A_BROKER:
                await trio.sleep(0.5)
        assert any("reaches a trio-bridge broker" in w for w in rc.connector.not_ready_because())
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[connector]\nbroker_urls = ["wss://llm.example.com/_bridge/relay"]\n'
        'local_url = "https://LLM.example.com:443"\n'
    )
    with pytest.raises(ConfigError, match="is the broker's address"):
        load_config(str(cfg))


def test_status_shows_a_relays_last_error_only_while_it_is_down() -> None:
    doc: dict[str, Any] = {
        "role": "connector",
        "ready": True,
        "relays": [
            {"broker": "ws://a/_bridge/relay", "state": "connected", "last_error": "old"},
            {"broker": "ws://b/_bridge/relay", "state": "reconnecting", "last_error": "refused"},
        ],
    }
    text = format_status(doc)
    [a] = [line for line in text.splitlines() if "ws://a/" in line]
    [b] = [line for line in text.splitlines() if "ws://b/" in line]
    assert "old" not in a and "last error: refused" in b


@pytest.mark.slow  # a real wait of connect_timeout + 5 s (the connector's own)
async def test_check_and_status_agree_on_an_llm_whose_model_list_is_slow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An LLM that answers its health path at once but its model list slowly (a model still
    loading) is up for the connector, and a WARN naming the wait for `check`: not a FAIL
    saying it is no LLM at all."""
    from trio_bridge.cli._check import _check_llm, _Report

    async def handler(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some()
            if not chunk:
                return
            head += chunk
        if b"/v1/models" in head or b"/api/tags" in head:
            await trio.sleep(30)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        base = load_config(None)
        outs = []
        for health_path in ("/health", "/v1/models"):  # llama.cpp's; the default
            config = attrs.evolve(
                base,
                connector=attrs.evolve(
                    base.connector, local_url=f"http://127.0.0.1:{port}", health_path=health_path
                ),
                limits=attrs.evolve(base.limits, connect_timeout=Duration(0.5)),
            )
            report = _Report()
            with trio.fail_after(20):
                await _check_llm(config, report)
            outs.append((report.failed, capsys.readouterr().out))
        nursery.cancel_scope.cancel()
    (failed, out), (failed_too, out_too) = outs
    assert not failed and "WARN  LLM" in out and "did not answer within 5.5 s" in out
    # the health probe itself is slow: down for both, with the same wait named
    assert failed_too and "no answer to /v1/models within 5.5 s" in out_too


@needs_redis
async def test_check_asks_the_pools_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With `store`, `check` makes a real round trip to it (the password the connector uses)
    and says whether it holds the pool's keys; a wrong password or a store that is down is a
    FAIL naming the store without the password."""
    from trio_bridge.cli._check import _check_store, _Report

    server = RedisServer(tmp_path, password="s3cret-pass")
    await server.start()
    try:
        base = load_config(None)

        def with_store(url: str) -> Any:
            return attrs.evolve(base, connector=attrs.evolve(base.connector, store=url))

        good = f"redis://:s3cret-pass@127.0.0.1:{server.port}/0"
        for url, failed, said in (
            (good, False, "holds no API keys yet"),
            (f"redis://:wrong@127.0.0.1:{server.port}/0", True, "FAIL  connector.store"),
        ):
            report = _Report()
            await _check_store(with_store(url), report)
            out = capsys.readouterr().out
            assert report.failed is failed and said in out, out
            assert "s3cret-pass" not in out and "wrong" not in out
        await server.kill()
        report = _Report()
        await _check_store(with_store(good), report)
        out = capsys.readouterr().out
        assert report.failed and "FAIL  connector.store: redis://:***@127.0.0.1" in out, out
    finally:
        await server.kill()


async def test_a_corrupt_keys_file_is_a_problem_without_a_request_and_gone_once_fixed(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # review finding: the connector looked at its keys file only when a request came, so
    # status and /readyz said nothing of a corrupt file (and kept saying it once fixed) and
    # the error line came with the next user's request
    async with open_bridge(network=MemoryNetwork()) as b:
        caplog.set_level(logging.INFO, "trio_bridge")
        good = b.keys.path.read_text()
        b.keys.path.write_text("this is [not toml\n")
        await trio.sleep(3)
        assert any("keys file" in p for p in b.connector.status()["problems"])
        assert any(r.levelno >= logging.ERROR for r in caplog.records)
        b.keys.path.write_text(good)
        await trio.sleep(3)
        assert b.connector.status()["problems"] == []


def test_answers_failing_while_a_connector_is_ejected_do_not_lengthen_its_ejection() -> None:
    # review finding: a burst in flight when an LLM broke (15 answers failing within 50 ms)
    # ejected its connector three times over: 10, 20, then 40 s (110 in flight: 5 min)
    from trio_bridge.broker._registry import EJECT_FOR, ConnectorHandle

    h = ConnectorHandle(cast(Any, None), "bad", "default", "t", capacity=110, connected_since=0)
    for _ in range(15):
        h.answered(False, 100.0)
    assert (h.failed, h.ejected_until) == (15, 100.0 + EJECT_FOR)
    for _ in range(5):  # tried again after the ejection, and failing again: twice as long
        h.answered(False, 111.0)
    assert h.ejected_until == 111.0 + 2 * EJECT_FOR


def test_a_relay_refusal_gives_the_brokers_own_reason() -> None:
    # review finding: a connector dialling a draining broker said "HTTP 503 (is URL the
    # broker's relay URL ...?)" and one whose token was revoked "HTTP 401 (check the connector
    # token)", though the broker's answer said "broker draining" or "revoked at ..."
    from trio_bridge._errors import RelayRejected
    from trio_bridge.connector._relays import _rejection
    from trio_bridge.http._messages import error_body

    url = "ws://127.0.0.1:8080/_bridge/relay"

    def refused(status: int, message: str) -> str:
        body = error_body(message, "invalid_request_error", "relay_refused")
        return _rejection(url, RelayRejected(status, body))

    line = refused(503, "broker draining: dial again later")
    assert "broker draining: dial again later" in line and "relay URL" not in line
    line = refused(401, "this connector token was revoked at 2026-12-07T11:51:29Z: ask …")
    assert "revoked at 2026-12-07T11:51:29Z" in line
    assert "relay URL" in _rejection(url, RelayRejected(503, b"<html>busy</html>"))  # a proxy


def test_keys_list_keeps_its_columns_for_expired_and_revoked_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # review finding: "revoked <time>" and "<time> (expired)" pushed the TODAY column over
    cfg = keys_config(tmp_path)
    store = SecretStore(tmp_path / "keys.toml", "tbk")
    store.add("alice", expires=PAST)
    store.add("bob")
    store.add("carol")
    store.revoke("bob")
    store.add("dave")
    store.rotate("dave", 0)  # the old secret: "<time> (replaced)", the widest
    assert _cli.main(["keys", "list", "-c", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, *rows = lines
    assert {row.index("0 req, ") for row in rows} == {header.index("TODAY")}  # none used today


@pytest.mark.parametrize("which", ["keys", "tokens"])
async def test_a_keys_or_tokens_file_that_is_not_utf8_is_a_problem_not_a_crash(
    which: str, autojump_clock: trio.testing.MockClock
) -> None:
    # review finding: a file saved as UTF-16 (or any bytes not UTF-8) raised
    # UnicodeDecodeError out of the reload (tomllib raises it, not TOMLDecodeError): the
    # broker's token watch, and the connector's keys watch, ended their role
    async with open_bridge(network=MemoryNetwork()) as b:
        path = b.keys.path if which == "keys" else b.broker.tokens.path
        good = path.read_bytes()
        path.write_bytes(good.decode().encode("utf-16"))
        await trio.sleep(3)
        role = b.connector if which == "keys" else b.broker
        [problem] = role.status()["problems"]
        assert "not UTF-8" in problem
        path.write_bytes(good)
        await trio.sleep(3)
        assert role.status()["problems"] == []


async def test_a_request_that_waited_for_a_connector_that_left_says_none_is_connected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # review finding: a connector gone (its token revoked, its box down): requests wait
    # queue_timeout for it to re-dial, then read "no connector is available for this route",
    # as if every connector were busy
    # (the clock jumps only after 0.2 s of real idleness: jumping while a worker thread ran
    # took it past ROUTE_MEMORY under load, and the broker then rightly said none is expected)
    autojump_clock.autojump_threshold = 0.2
    async with open_bridge(network=MemoryNetwork()) as b:
        await b.running_connector.stop()
        with trio.fail_after(5):
            while b.broker.registry.connectors():
                await trio.sleep(0.1)
        async with b.client(timeout=60) as client:
            r = await chat_as(b, client, b.api_key, "hello")
        assert r.status_code == 503
        assert "no connector of this route is connected" in r.json()["error"]["message"]


def test_status_url_sends_the_admin_token_only_to_the_roles_own_admin_address(
    tmp_path: Path,
) -> None:
    import http.server
    import threading

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("authorization"))
            body = b'{"role": "connector", "ready": true}'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        (tmp_path / "admin.token").write_text("admin-secret-token\n")
        (tmp_path / "admin.token").chmod(0o600)
        other = tmp_path / "other.toml"
        other.write_text(
            '[connector]\nadmin_listen = "127.0.0.1:9"\nadmin_token_file = "admin.token"\n'
        )
        own = tmp_path / "own.toml"
        own.write_text(
            f'[connector]\nadmin_listen = "127.0.0.1:{port}"\nadmin_token_file = "admin.token"\n'
        )
        url = f"http://127.0.0.1:{port}"
        for cfg in (other, own):
            _cli.main(["status", "--role", "connector", "--url", url, "-c", str(cfg)])
    finally:
        server.shutdown()
    assert seen == [None, "Bearer admin-secret-token"]

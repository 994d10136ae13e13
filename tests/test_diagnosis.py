"""Every failure names its cause: what a user, an operator's CLI and the logs say when something
is wrong (issue: diagnosis), checked as they would see it."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import generate_latest

from trio_bridge.accounts._keys import SecretStore
from trio_bridge.cli import _cli
from trio_bridge.testing import MemoryNetwork, open_bridge

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
    assert len(fresh) == 1 and not fresh[0].expired()  # the expired one it replaced is gone


async def test_an_expired_key_is_told_so_and_its_id_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_bridge(network=MemoryNetwork()) as b:
        entry, key = b.keys.add("carol", expires=PAST)
        caplog.set_level(logging.INFO, "trio_bridge")
        async with b.client() as client:
            r = await client.post(
                b.base_url + CHAT,
                json={"model": "m", "messages": []},
                headers={"Authorization": f"Bearer {key}"},
            )
    assert r.status_code == 401
    error = r.json()["error"]
    assert "expired" in error["message"] and PAST in error["message"]
    assert error["code"] == "key_expired"
    lines = [rec for rec in caplog.records if rec.name == "trio_bridge.request"]
    assert any(getattr(rec, "key_id", None) == entry.id for rec in lines)


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

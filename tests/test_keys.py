"""Secret stores: hashes only, 0600, atomic, reload on change, constant-time verify."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import SecretStore, secret_id


async def test_add_stores_only_the_hash_with_mode_0600(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "keys.toml", "tbk")
    entry, secret = store.add("alice")
    assert secret.startswith(f"tbk_{entry.id}_") and len(secret) > 40
    text = (tmp_path / "keys.toml").read_text()
    assert secret not in text and secret.split("_", 2)[2] not in text
    assert entry.sha256 in text
    assert stat.S_IMODE(os.stat(tmp_path / "keys.toml").st_mode) == 0o600
    assert store.verify(secret) == entry
    assert [e.name for e in store.entries()] == ["alice"]


@pytest.mark.parametrize("bad", ["", "x", "tbk_aaaaaaaa_bbb", "é" * 10, "a" * (1 << 20)])
async def test_wrong_or_absurd_secrets_do_not_verify(tmp_path: Path, bad: str) -> None:
    store = SecretStore(tmp_path / "keys.toml", "tbk")
    store.add("alice")
    assert store.verify(bad) is None


async def test_right_id_wrong_secret_does_not_verify(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "keys.toml", "tbk")
    _, secret = store.add("alice")
    assert store.verify(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None


def test_duplicate_names_and_bad_names_are_refused(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "keys.toml", "tbk")
    store.add("alice")
    with pytest.raises(ConfigError, match="exists"):
        store.add("alice")
    with pytest.raises(ConfigError, match="invalid name"):
        store.add("no spaces please")


async def test_revoke_reaches_a_running_store_without_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A running role looks at the file at most every RELOAD_INTERVAL of trio's clock."""
    running = SecretStore(tmp_path / "keys.toml", "tbk")
    cli = SecretStore(tmp_path / "keys.toml", "tbk")
    _, secret = cli.add("bob")
    assert running.verify(secret) is not None  # never looked: it looks now
    cli.revoke("bob")
    assert running.verify(secret) is not None  # looked a moment ago
    await trio.sleep(0.6)
    assert running.verify(secret) is None
    with pytest.raises(ConfigError, match="'bob' was revoked at"):
        cli.revoke("bob")


def test_secret_id() -> None:
    assert secret_id("tbk_abcdefgh_rest_with_underscores") == "abcdefgh"
    assert secret_id("sk-something") is None


def test_ending_a_rotated_keys_old_secret_at_once_reports_it(tmp_path: Path) -> None:
    """During a rotation's grace, ``keys set <old id> --expires <now>`` ends the old secret;
    the entry stays, replaced and expired (kept like a revoked one, so that a pool's boxes
    can tell a store that lost the rotation). The change is reported as written (it raised
    StopIteration after the write succeeded, when the write dropped the entry)."""
    import datetime as dt

    store = SecretStore(tmp_path / "keys.toml", "tbk")
    old, _ = store.add("alice")
    new, _, _ = store.rotate("alice", 3600)
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    changed = store.set_limits(old.id, {"expires": past})
    assert changed.id == old.id and changed.expired()
    kept = store.get(old.id)
    assert kept is not None and kept.replaced and not kept.usable()
    assert store.get(new.id) is not None and store.get(new.id).usable()  # type: ignore[union-attr]

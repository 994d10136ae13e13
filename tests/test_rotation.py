"""A rotation's old secret (``SecretStore.rotate``): kept, hash only, marked ``replaced``
for REVOKED_KEPT after it ends; it can only end sooner; lists, refusals and the commands
that name a key's newest secret say so. (The pool's merge of it: tests/test_poolmerge.py.)
Several of these are an outside review's reproductions of defects, each failing first."""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from trio_bridge._errors import ConfigError
from trio_bridge.accounts import _keys
from trio_bridge.accounts._keys import SecretEntry, SecretStore, read_entries
from trio_bridge.accounts._users import ACTIVE, UserStore, block
from trio_bridge.cli._stores import _expiry_text, _list_entries
from trio_bridge.testing import MemoryNetwork, open_bridge


def later(seconds: float) -> str:
    t = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_block_after_a_portal_rotation_names_the_key_it_revoked(tmp_path: Path) -> None:
    """`users block` (and `keys revoke`, the portal's revoke) name the key's newest secret,
    not the rotated-away one kept beside it (they named the dead one)."""
    keys = SecretStore(tmp_path / "keys.toml", "tbk")
    users = UserStore(tmp_path / "users.db")
    user, _ = users.sign_in("sub-1", "a@example.com", "A", (), ACTIVE)
    old, _ = keys.add(user.key_name)
    new, _, _ = keys.rotate(user.key_name, 0.0)  # the portal's rotate
    said = block(users, keys, user, "admin")
    audit = users.audit_log(email="a@example.com")[0]
    assert new.id in said and old.id not in said, said
    assert new.id in audit["detail"], audit


@pytest.mark.parametrize("expires", ["", "30d"])
def test_keys_set_by_name_does_not_extend_the_replaced_secret(tmp_path: Path, expires: str) -> None:
    """`keys set alice --expires …` during a grace is meant for alice's new key: the old
    secret keeps its end (it was made valid for ever, or 30 days)."""
    s = SecretStore(tmp_path / "keys.toml", "tbk")
    old, _ = s.add("alice")
    s.rotate("alice", 3600)
    until = s.get(old.id).expires  # type: ignore[union-attr]
    s.set_limits("alice", {"expires": later(30 * 86400) if expires else ""})
    assert s.get(old.id).expires == until  # type: ignore[union-attr]
    end = later(60)
    s.set_limits("alice", {"expires": end})  # ending alice sooner ends both
    assert [e.expires for e in s.entries()] == [end, end]


def test_a_replaced_secret_can_be_ended_sooner_by_its_id_never_later(tmp_path: Path) -> None:
    s = SecretStore(tmp_path / "keys.toml", "tbk")
    old, _ = s.add("alice")
    s.rotate("alice", 3600)
    with pytest.raises(ConfigError, match="can only end sooner"):
        s.set_limits(old.id, {"expires": later(7200)})
    with pytest.raises(ConfigError, match="can only end sooner"):
        s.set_limits(old.id, {"expires": ""})  # never
    ended = s.set_limits(old.id, {"expires": later(-5)})
    assert ended.replaced and not ended.usable()


def test_a_grace_zero_rotation_ends_an_old_secret_whose_expiry_has_an_offset(
    tmp_path: Path,
) -> None:
    """Expiry times compared as strings: a hand-written ``-08:00`` time outlived the
    portal's grace-0 rotation by hours."""
    s = SecretStore(tmp_path / "keys.toml", "tbk")
    in_3h = dt.datetime.now(dt.timezone(dt.timedelta(hours=-8))) + dt.timedelta(hours=3)
    old, _ = s.add("alice", expires=in_3h.replace(microsecond=0).isoformat())
    s.rotate("alice", 0)
    assert not s.get(old.id).usable()  # type: ignore[union-attr]


def test_a_rotation_keeps_the_revoked_entries_of_its_name(tmp_path: Path) -> None:
    """A revoked secret stays listed REVOKED_KEPT, whatever is done to its name after (a
    rotation dropped every entry of the name but the current one)."""
    s = SecretStore(tmp_path / "keys.toml", "tbk")
    gone, _ = s.add("alice")
    s.revoke("alice")
    s.add("alice")
    s.rotate("alice", 0)
    kept = s.get(gone.id)
    assert kept is not None and kept.revoked


def test_a_long_graces_old_secret_is_kept_after_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept REVOKED_KEPT after its end, not after the rotation: a 40-day grace's old secret
    left the file the moment it ended (and was "invalid API key" again)."""
    s = SecretStore(tmp_path / "keys.toml", "tbk")
    old, _ = s.add("alice")
    s.rotate("alice", 40 * 86400)

    class Later:
        @staticmethod
        def time() -> float:
            return time.time() + 41 * 86400  # a day after the grace ended

    monkeypatch.setattr(_keys, "time", Later)
    s.add("bob")  # any write
    kept = s.get(old.id)
    assert kept is not None and kept.replaced and not kept.usable()


def test_tokens_list_keeps_its_columns_during_a_grace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = SecretStore(tmp_path / "tokens.toml", "tbc")
    s.add("c1", routes=("rA",))
    s.rotate("c1", 3600)
    capsys.readouterr()
    _list_entries(s, "tokens")
    header, *rows = capsys.readouterr().out.splitlines()
    col = header.index("ROUTES")
    assert len(rows) == 2 and all(r[col:].startswith("rA") for r in rows), [header, *rows]


def test_a_replaced_secret_without_an_end_lists_readably() -> None:
    e = SecretEntry("alice", "old00001", "x" * 64, "2026-12-07T11:00:00Z", replaced="x")
    assert _expiry_text(e, time.time()) == "- (grace)"  # (no end: still valid)
    ended = attrs.evolve(e, expires="2026-12-07T11:30:00Z")
    assert _expiry_text(ended, time.time()) == "2026-12-07T11:30:00Z (replaced)"


@pytest.mark.parametrize("value", ["soon", "2026-13-01T00:00:00Z", 5])
def test_a_replaced_mark_that_is_not_a_time_is_refused_naming_the_entry(value: object) -> None:
    doc = {"keys": [{"name": "a", "id": "i", "sha256": "h", "created": "2026-12-07T00:00:00Z"}]}
    doc["keys"][0]["replaced"] = value  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"keys\.0: .*replaced: ISO times"):
        read_entries(doc, "keys.toml")


async def test_a_connector_dialling_with_a_rotated_away_token_is_told_it_was_replaced(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_bridge(network=MemoryNetwork()) as b:
        caplog.set_level(logging.INFO, "trio_bridge")
        [token] = b.broker.tokens.entries()
        b.broker.tokens.rotate(token.name, 0)  # the relay is closed; it dials again with it
        with trio.fail_after(120):
            while not any(
                getattr(rec, "token_id", None) == token.id
                and "replaced at" in rec.getMessage()
                and "refused" in rec.getMessage()
                for rec in caplog.records
            ):
                await trio.sleep(0.5)

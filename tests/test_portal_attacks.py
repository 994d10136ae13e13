"""The portal (issue 28) attacked: what an outside review tried that was a defect, one test each
(the provider-backed ones reuse tests/test_portal.py's fixture and helpers)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt

from tests.test_portal import (
    Env,
    _payload,
    _sign_in_with_token_changed,
    _Tamper,
    client,
    env,
    sign_in,
)
from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.accounts._users import UserStore

__all__ = ["env"]  # the fixture, imported for the tests below


# -- the keys file, changed from several worker threads at once --
def test_keys_changed_from_many_threads_at_once_are_all_kept(tmp_path: Path) -> None:
    """The portal changes the keys file from worker threads (one per POST, and the admin
    page's block): a read-modify-write must not lose another thread's change (a key shown
    to its user but missing from the file, or a blocked user's revocation undone)."""
    store = SecretStore(tmp_path / "keys.toml", "tbk")
    store.add("victim")
    start = threading.Barrier(9)

    def add(i: int) -> None:
        start.wait()
        store.add(f"user{i}")

    def revoke() -> None:
        start.wait()
        store.revoke("victim")

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=revoke))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = SecretStore(tmp_path / "keys.toml", "tbk")
    names = {e.name for e in fresh.entries() if e.usable()}
    assert names == {f"user{i}" for i in range(8)}  # every key made, the victim revoked


# -- who may sign in: an email the provider did not verify --
def _with_claims(env: Env, **changes: Any) -> Any:
    def change(token: str) -> str:
        # the address in the ID token itself (as Entra sends it): no userinfo asked
        claims = {**_payload(token), "email": "alice@example.com", **changes}
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, env.key)

    return change


async def test_an_email_verified_false_as_a_string_is_refused(env: Env) -> None:
    r = await _sign_in_with_token_changed(env, _with_claims(env, email_verified="false"))
    assert r.status_code == 403 and "verified" in r.text


async def test_an_email_the_provider_does_not_say_is_verified_matches_no_domain(
    env: Env,
) -> None:
    """Without email_verified, anyone who can set their own address at the provider could
    claim an allowed domain (nOAuth): an allowed group still lets them in."""
    r = await _sign_in_with_token_changed(env, _with_claims(env, email_verified=None))
    assert r.status_code == 403 and "may not use this service" in r.text
    assert env.connector is not None and env.connector.portal is not None
    change = _with_claims(env, email_verified=None, groups=["llm-users"])
    env.connector.portal.oidc.http = httpx.AsyncClient(transport=_Tamper(change), timeout=10)
    async with client() as c:
        r = await sign_in(c, env.base, "alice")
    assert r.status_code == 200 and "alice@example.com" in r.text


# -- hostile bytes --
async def test_a_cookie_or_csrf_token_with_non_ascii_bytes_is_refused_not_a_crash(
    env: Env,
) -> None:
    """Each crashed a portal request (compare_digest on non-ASCII str): a 502 and a traceback
    logged at error level, and five in a row made the broker eject the connector (doubling
    each time): anyone, signed in or not, could keep a pool's portal box out of rotation."""
    await env.start()
    async with httpx.AsyncClient() as c:
        for cookie in (b"tb_portal=\xc3\xa9.abc", b"tb_portal_login=\xc3\xa9.abc") * 3:
            page = "callback?state=x&code=y" if b"login" in cookie else ""
            r = await c.get(env.base + page, headers={"cookie": cookie})
            assert r.status_code in (200, 400), r.text
    assert [r.ejections for r in env.broker.broker.registry.relays()] == [0]
    async with client() as c:
        await sign_in(c, env.base, "alice")
        r = await c.post(
            env.base + "key",
            data={"csrf": "é", "action": "create"},
            headers={"origin": env.broker.url},
        )
        assert r.status_code == 403 and "stale" in r.text


# -- sign-ins in progress --
async def test_a_flood_of_unfinished_sign_ins_does_not_lock_others_out(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET login needs no session: anyone can start sign-ins by the thousand and never come
    back. The table stays bounded, but a real user must still get in."""
    monkeypatch.setattr("trio_bridge.accounts._users.MAX_LOGINS", 3)
    await env.start()
    async with httpx.AsyncClient() as c:
        for _ in range(5):
            await c.get(env.base + "login")
    async with client() as c:
        r = await sign_in(c, env.base, "alice")
        assert r.status_code == 200 and "alice@example.com" in r.text


# -- the operator's side --
def test_an_address_two_accounts_share_is_ambiguous_for_the_operator(tmp_path: Path) -> None:
    """Two provider accounts (two ``sub``) with one address: ``users block ADDRESS`` must not
    block one of them and leave the other in."""
    users = UserStore(tmp_path / "portal.sqlite3")
    users.sign_in("sub-1", "alice@example.com", "Alice", (), "active")
    users.sign_in("sub-2", "Alice@example.com", "Alice again", (), "active")
    with pytest.raises(ConfigError, match="2 users"):
        users.find("alice@example.com")
    assert users.find("2").sub == "sub-2"

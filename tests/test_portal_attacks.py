"""The portal (issue 28) attacked: what an outside review tried that was a defect, one test each
(the provider-backed ones reuse tests/test_portal.py's fixture and helpers)."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from tests.oidc_provider import signing_key
from tests.test_portal import (
    Env,
    _payload,
    _sign_in_with_token_changed,
    _Tamper,
    callback_url,
    client,
    csrf_of,
    env,
    post,
    sign_in,
)
from trio_bridge._config import Config, structure
from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.accounts._users import UserStore, block
from trio_bridge.connector._connector import Connector
from trio_bridge.connector._oidc import OIDCClient, SignInFailed

__all__ = ["env"]  # the fixture, imported for the tests below


# -- the keys file, changed from several worker threads at once --
def _race(add: Callable[[int], object], revoke: Callable[[], object]) -> None:
    """``add(0..7)`` and ``revoke()`` in nine threads let go at the same moment."""
    start = threading.Barrier(9)

    def go(fn: Callable[[], object]) -> None:
        start.wait()
        fn()

    threads = [threading.Thread(target=go, args=(functools.partial(add, i),)) for i in range(8)]
    threads.append(threading.Thread(target=go, args=(revoke,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_keys_changed_from_many_threads_at_once_are_all_kept(tmp_path: Path) -> None:
    """The portal changes the keys file from worker threads (one per POST, and the admin
    page's block): a read-modify-write must not lose another thread's change (a key shown
    to its user but missing from the file, or a blocked user's revocation undone)."""
    store = SecretStore(tmp_path / "keys.toml", "tbk")
    store.add("victim")
    _race(lambda i: store.add(f"user{i}"), lambda: store.revoke("victim"))
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


# -- a blocked user keeping access --
async def test_a_post_held_open_across_a_block_makes_no_key(env: Env) -> None:
    """Held up: the portal looks the session up before it reads the form, but the broker
    sends nothing on before it has the body's first 64 KiB (or its end), and a form is at most
    16 KiB: a user cannot keep a POST open across their block and get a key after it."""
    await env.start()
    blocked = trio.Event()
    async with client() as c:
        page = (await sign_in(c, env.base, "alice")).text
        csrf = csrf_of(page)

        async def body() -> AsyncIterator[bytes]:
            yield b"action=create&"
            await blocked.wait()
            yield f"csrf={csrf}".encode()

        async with trio.open_nursery() as nursery:
            answer: list[httpx.Response] = []

            async def send() -> None:
                answer.append(
                    await c.post(
                        env.base + "key",
                        content=body(),
                        headers={
                            "origin": env.broker.url,
                            "content-type": "application/x-www-form-urlencoded",
                        },
                    )
                )

            nursery.start_soon(send)
            await trio.sleep(0.3)  # the POST is in, its body not finished
            user = env.users.find("alice@example.com")
            await trio.to_thread.run_sync(block, env.users, env.lab.keys, user, "operator")
            blocked.set()
        (r,) = answer
    assert r.status_code in (401, 403), r.text
    assert "shown only once" not in r.text
    env.lab.keys.reload()
    assert not [e for e in env.lab.keys.entries() if e.name == user.key_name and e.usable()]


# -- ID token checks (held up): joserfc against a key set in hand, no provider needed --
def _oidc_with(key: RSAKey) -> OIDCClient:
    oidc = OIDCClient("https://id.example", "portal", None, "https://x/cb", scopes=["openid"])
    oidc.keys = KeySet([key])
    oidc._keys_fetched = math.inf  # fetched "just now": no refresh (and no network)
    return oidc


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": "https://id.example", "aud": "portal", "sub": "u1", "iat": now,
            "exp": now + 300, "nonce": "n1", "email": "a@example.com"}  # fmt: skip
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


def _b64(doc: dict[str, Any] | bytes) -> str:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    signing = f"{_b64({'alg': 'HS256', 'kid': 'k1'})}.{_b64(claims)}"
    mac = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(mac)}"


async def test_forged_id_tokens_are_refused() -> None:
    key = signing_key("k1")
    oidc = _oidc_with(key)
    good = jwt.encode({"alg": "RS256", "kid": "k1"}, _claims(), key)
    assert (await oidc.verify_id_token(good, "n1"))["sub"] == "u1"
    forged = [
        f"{_b64({'alg': 'none', 'kid': 'k1'})}.{_b64(_claims())}.",  # alg none
        _hs256(_claims(), key.as_pem(private=False)),  # the public key as HMAC secret
        jwt.encode({"alg": "RS256", "kid": "k9"}, _claims(), signing_key("k9")),  # other kid
        jwt.encode({"alg": "RS256"}, _claims(), signing_key("k1")),  # no kid, other key
        jwt.encode({"alg": "RS256", "kid": "k1"}, _claims(iss="https://id.example.evil"), key),
        jwt.encode({"alg": "RS256", "kid": "k1"}, _claims(aud=["portal", "other"]), key),
        jwt.encode({"alg": "RS256", "kid": "k1"}, _claims(nonce=None), key),
        jwt.encode({"alg": "RS256", "kid": "k1"}, _claims(nonce="n2"), key),
        jwt.encode({"alg": "RS256", "kid": "k1"}, _claims(exp=int(time.time()) - 120), key),
        jwt.encode({"alg": "RS256", "kid": "k1"}, _claims(sub=None), key),
        "not.a.token",
    ]
    for token in forged:
        with pytest.raises(SignInFailed):
            await oidc.verify_id_token(token, "n1")
    with_azp = jwt.encode({"alg": "RS256", "kid": "k1"}, _claims(aud=["portal", "other"],
                                                                  azp="portal"), key)  # fmt: skip
    assert (await oidc.verify_id_token(with_azp, "n1"))["azp"] == "portal"


# -- the audit log --
def test_refused_sign_ins_cannot_push_the_key_events_out_of_the_audit_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a public provider (Google), anyone with an account there can be refused as often
    as they like; each refusal was one more entry in one shared window of AUDIT_KEPT, so
    enough of them erased who made, rotated and revoked keys and who was blocked."""
    monkeypatch.setattr("trio_bridge.accounts._users.AUDIT_KEPT", 3)
    users = UserStore(tmp_path / "portal.sqlite3")
    users.audit("key_created", "alice@example.com", "user", "key tbk_1")
    users.audit("user_blocked", "alice@example.com", "operator")
    for i in range(10):
        users.audit("signin_refused", f"x{i}@gmail.com", "portal", "not allowed")
    events = [e["event"] for e in users.audit_log()]
    assert events.count("signin_refused") == 3  # still bounded
    assert "key_created" in events and "user_blocked" in events


async def test_create_pressed_twice_at_once_is_one_key_and_a_409_not_a_crash(env: Env) -> None:
    """A double click: both POSTs saw no key; the second's add raised ConfigError (the name
    exists) out of the handler: a 502 and a traceback (the pool store's compare-and-set
    failing did the same)."""
    await env.start()
    async with client() as c:
        page = (await sign_in(c, env.base, "alice")).text
        statuses: list[int] = []

        async def create() -> None:
            r = await post(c, env, "key", page, action="create")
            statuses.append(r.status_code)

        for _ in range(3):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(create)
            page = (await post(c, env, "key", (await c.get(env.base)).text, action="revoke")).text
    assert set(statuses) <= {200, 409}, statuses
    assert [r.ejections for r in env.broker.broker.registry.relays()] == [0]


async def test_a_block_that_lands_between_the_session_check_and_the_key_change_wins(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The POST's session said 'active'; the operator's block (state, then revoke what is
    there) ran before the key was made: the new key outlived the block."""
    conn = await env.start()
    assert conn.portal is not None
    portal = conn.portal
    async with client() as c:
        page = (await sign_in(c, env.base, "alice")).text
        user = env.users.find("alice@example.com")
        looked = portal.current_key

        def block_meanwhile(u: Any) -> Any:
            found = looked(u)
            block(env.users, env.lab.keys, user, "operator")  # the operator, right now
            return found

        monkeypatch.setattr(portal, "current_key", block_meanwhile)
        r = await post(c, env, "key", page, action="create")
        assert "shown only once" not in r.text
    env.lab.keys.reload()
    assert not [e for e in env.lab.keys.entries() if e.name == user.key_name and e.usable()]


# -- two sign-ins in two tabs --
async def test_a_sign_in_started_in_another_tab_meanwhile_does_not_spoil_the_first(
    env: Env,
) -> None:
    """One login cookie held one state: a second tab's sign-in replaced it and the first
    tab came back to 'wrong state' (safe, but a user with two tabs of an expired session
    could not sign in from the first). A state from another browser is still refused."""
    await env.start()
    async with client() as c:
        first = await callback_url(c, env.base, "alice")
        c.follow_redirects = False
        assert (await c.get(env.base + "login")).status_code == 303  # tab 2 starts
        c.follow_redirects = True
        r = await c.get(first)
        assert r.status_code == 200 and "alice@example.com" in r.text
        r = await c.get(first)  # and each state once only
        assert r.status_code == 400
    async with client() as other:
        r = await other.get(first)
        assert r.status_code == 400 and "wrong state" in r.text


def test_two_stores_of_one_keys_file_lose_no_change(tmp_path: Path) -> None:
    """The connector (the portal's key changes) and ``trio-bridge keys|users`` (another
    process) share the keys file: two stores on one file stand for the two processes."""
    path = tmp_path / "keys.toml"
    stores = [SecretStore(path, "tbk"), SecretStore(path, "tbk")]
    stores[0].add("victim")
    _race(lambda i: stores[i % 2].add(f"user{i}"), lambda: stores[1].revoke("victim"))
    names = {e.name for e in SecretStore(path, "tbk").entries() if e.usable()}
    assert names == {f"user{i}" for i in range(8)}


async def test_the_identity_provider_down_does_not_take_the_llm_out_of_rotation(
    env: Env,
) -> None:
    """The portal's honest 502 'provider unreachable' pages counted as the connector's
    failures: with the identity provider down, five visits to the sign-in page (anyone's)
    made the broker eject the connector, for LLM requests too, doubling each time."""
    await env.start()
    scope, done = env.provider
    scope.cancel()
    await done.wait()
    async with client() as c:
        for _ in range(6):
            assert (await c.get(env.base + "login")).status_code == 502
    assert [r.ejections for r in env.broker.broker.registry.relays()] == [0]


async def test_a_crafted_error_in_a_callback_link_is_not_shown_as_the_portals_words(
    env: Env,
) -> None:
    """Anyone could mail a link to the portal's own callback with ``error=`` set to 80
    characters of their choice ('your account is suspended, call …'), shown on the
    portal's page. An OAuth error code is a short token (RFC 6749 4.1.2.1): only that shows."""
    await env.start()
    async with client() as c:
        r = await c.get(env.base + "callback", params={"error": "Call +1 555 0100 now"})
        assert r.status_code == 400 and "555" not in r.text
        r = await c.get(env.base + "callback", params={"error": "access_denied"})
        assert r.status_code == 400 and "access_denied" in r.text


def test_one_user_signing_in_in_a_loop_keeps_a_bounded_number_of_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signed in at the provider, GET login comes straight back with a new session: a script
    looping it added a row per turn, kept until session_ttl (12 h)."""
    monkeypatch.setattr("trio_bridge.accounts._users.SESSIONS_PER_USER", 3)
    users = UserStore(tmp_path / "portal.sqlite3")
    user, _ = users.sign_in("sub-1", "alice@example.com", "Alice", (), "active")
    for i in range(10):
        users.new_session(user.id, f"s{i}", "csrf", 3600)
    with users._db() as db:
        assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 3
    assert users.session("s9") is not None and users.session("s0") is None


def test_an_identity_provider_over_plain_http_off_loopback_is_a_config_error(
    tmp_path: Path,
) -> None:
    """Over http:// anyone on the path can answer the JWKS and the token endpoint: their own
    keys, their own ID token, signed in as anyone (and the client secret read on the way)."""
    conf = structure(
        {"portal": {"enabled": True, "public_url": "https://llm.example.com/",
                    "issuer": "http://id.example.com/realms/staff", "client_id": "c",
                    "allowed_domains": ["example.com"]}},
        Config,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="issuer"):
        Connector(
            attrs.evolve(conf, base_dir=str(tmp_path)), keys=SecretStore(tmp_path / "k", "tbk")
        )


@pytest.mark.slow  # a flood: 500 requests at once (about 10 s on two cores)
async def test_a_flood_of_sign_in_starts_is_no_crash(env: Env) -> None:
    """Hundreds of GET login at once (no session needed): each a write of the users file in
    its own worker thread; SQLite's busy timeout ran out ('database is locked'), the handler
    crashed (a 502 and a traceback each) and the flood held every worker thread of trio's."""
    await env.start()
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=400)) as c:

        async def one() -> None:
            statuses.append((await c.get(env.base + "login")).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(500):
                nursery.start_soon(one)
    assert 502 not in statuses and 303 in statuses, sorted(set(statuses))

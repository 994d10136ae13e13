"""The self-service portal (issue 28) against a real OpenID provider (``oidc-provider`` run by
node, tests/oidc_provider.py): sign-in through the broker with httpx following the provider's
redirects and submitting its login form; the refusals; keys made, rotated and revoked by their
user and used with the ``openai`` SDK; the operator's side (CLI, admin API, audit log)."""

from __future__ import annotations

import html
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import attrs
import httpx
import openai
import pytest
import trio
from joserfc import jwt
from joserfc.jwk import RSAKey

from tests.oidc_provider import (
    CLIENT_ID,
    CLIENT_SECRET,
    installed_script,
    run_provider,
    signing_key,
)
from trio_bridge._config import Config, PortalConfig, structure
from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.accounts._users import UserStore
from trio_bridge.cli._cli import main
from trio_bridge.connector._connector import Connector
from trio_bridge.testing import Lab, RunningBroker, RunningModel, open_lab

USERS = {
    "alice": {"email": "alice@example.com", "name": "Alice", "groups": ["staff"]},
    "bob": {"email": "bob@elsewhere.org", "name": "Bob", "groups": []},
    "carol": {"email": "carol@elsewhere.org", "name": "Carol", "groups": ["llm-users"]},
}


@attrs.define
class Env:
    lab: Lab
    broker: RunningBroker
    issuer: str
    key: RSAKey
    model: RunningModel
    provider: tuple[trio.CancelScope, trio.Event]
    connector: Connector | None = None
    scope: trio.CancelScope | None = None
    done: trio.Event | None = None

    @property
    def base(self) -> str:
        return self.broker.url + "/_bridge/portal/"

    def config(self, **portal: Any) -> Config:
        conf = self.lab.config(
            connector={
                "broker_urls": [self.broker.relay_url],
                "local_url": self.model.url,
                "name": "lab-connector",
            }
        )
        (self.lab.dir / "client.secret").write_text(CLIENT_SECRET + "\n")
        (self.lab.dir / "client.secret").chmod(0o600)
        values = {
            "enabled": True,
            "public_url": self.broker.url + "/",
            "issuer": self.issuer,
            "client_id": CLIENT_ID,
            "client_secret_file": "client.secret",
            "allowed_domains": ["example.com"],
            "allowed_groups": ["llm-users"],
            "new_users": "auto",
            **portal,
        }
        return attrs.evolve(conf, portal=structure(values, PortalConfig, source="portal"))

    async def start(self, **portal: Any) -> Connector:
        conn = Connector(self.config(**portal), keys=self.lab.keys, token=self.lab.token)
        self.scope, self.done = trio.CancelScope(), trio.Event()
        scope, done = self.scope, self.done

        async def run() -> None:
            try:
                with scope:
                    await conn.run()
            finally:
                done.set()

        self.lab.nursery.start_soon(run)
        with trio.fail_after(10):
            while not any(r.name == conn.name for r in self.broker.broker.registry.relays()):
                await trio.sleep(0.01)
        self.connector = conn
        return conn

    async def stop(self) -> None:
        assert self.connector is not None and self.scope is not None and self.done is not None
        self.connector.stop()
        with trio.move_on_after(5):
            await self.done.wait()
        self.scope.cancel()
        await self.done.wait()

    @property
    def users(self) -> UserStore:
        assert self.connector is not None and self.connector.portal is not None
        return self.connector.portal.users


def redirect_uris(broker_url: str) -> list[str]:
    return [
        broker_url + "/_bridge/portal/callback",
        broker_url + "/r/default/_bridge/portal/callback",
    ]


async def start_provider(
    lab: Lab, broker_url: str, keys: list[RSAKey], port: int = 0
) -> tuple[str, trio.CancelScope, trio.Event]:
    """The provider in the lab's nursery: (issuer, its scope, set once it stopped)."""
    scope, done = trio.CancelScope(), trio.Event()

    async def serve(*, task_status: trio.TaskStatus[str]) -> None:
        try:
            with scope:
                uris = redirect_uris(broker_url)
                async with run_provider(
                    redirect_uris=uris, users=USERS, keys=keys, port=port
                ) as issuer:
                    task_status.started(issuer)
                    await trio.sleep_forever()
        finally:
            done.set()

    issuer = await lab.nursery.start(serve)
    return issuer, scope, done


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    installed_script()  # skips (saying why) without node and npm
    key = signing_key("k1")
    async with open_lab() as lab:
        model = await lab.start_test_model(token_delay=0.002)
        broker = await lab.start_broker()
        issuer, scope, done = await start_provider(lab, broker.url, [key])
        e = Env(lab, broker, issuer, key, model, provider=(scope, done))
        yield e
        if e.connector is not None:
            await e.stop()


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(follow_redirects=True, timeout=10)


async def sign_in(c: httpx.AsyncClient, base: str, login: str) -> httpx.Response:
    """Through the provider's own login form, as a browser would: the last answer."""
    r = await c.get(base + "login")
    assert r.status_code == 200, r.text
    m = re.search(r'<form[^>]*action="([^"]+)"', r.text)
    assert m is not None, r.text
    return await c.post(
        urljoin(str(r.url), m.group(1)),
        data={"prompt": "login", "login": login, "password": "anything"},
    )


async def callback_url(c: httpx.AsyncClient, base: str, login: str) -> str:
    """Sign in at the provider but stop before the portal's callback: its URL."""
    c.follow_redirects = True
    r = await c.get(base + "login")
    action = re.search(r'<form[^>]*action="([^"]+)"', r.text)
    assert action is not None
    c.follow_redirects = False
    url = urljoin(str(r.url), action.group(1))
    data = {"prompt": "login", "login": login, "password": "x"}
    r = await c.post(url, data=data)
    while not r.headers["location"].startswith(base + "callback"):
        r = await c.get(urljoin(str(r.url), r.headers["location"]))
        assert r.status_code in (302, 303), r.text
    c.follow_redirects = True
    return str(r.headers["location"])


def csrf_of(page: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m is not None, page
    return m.group(1)


async def post(c: httpx.AsyncClient, env: Env, path: str, page: str, **form: str) -> httpx.Response:
    return await c.post(
        env.base + path,
        data={"csrf": csrf_of(page), **form},
        headers={"origin": env.broker.url},
    )


def shown_key(page: str) -> str:
    m = re.search(r'<pre id="secret"><code>([^<]+)</code>', page)
    assert m is not None, page
    return m.group(1)


# -- off by default, and its settings --
async def test_the_portal_is_off_unless_configured() -> None:
    async with open_lab() as lab:
        model = await lab.start_test_model()
        broker = await lab.start_broker()
        await lab.start_connector([broker], model.url)
        async with lab.client() as c:
            r = await c.get(broker.url + "/_bridge/portal/")
        assert r.status_code == 401  # an API path like any other: the key check answers
        assert r.json()["error"]["message"] == "missing API key"


def test_an_enabled_portal_that_lets_nobody_in_is_a_config_error(tmp_path: Path) -> None:
    conf = structure(
        {"portal": {"enabled": True, "public_url": "https://x/", "issuer": "https://i",
                    "client_id": "c"}},
        Config,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="nobody may sign in"):
        Connector(
            attrs.evolve(conf, base_dir=str(tmp_path)), keys=SecretStore(tmp_path / "k", "tbk")
        )
    with pytest.raises(ConfigError, match="new_users"):
        structure({"portal": {"new_users": "sometimes"}}, Config)


# -- sign-in --
async def test_signing_in_through_the_provider_opens_the_users_page(env: Env) -> None:
    await env.start()
    async with client() as c:
        r = await sign_in(c, env.base, "alice")
        assert r.status_code == 200
        assert str(r.url) == env.base
        assert "alice@example.com" in r.text and "Create my key" in r.text
        assert "default-src 'self'" in r.headers["content-security-policy"]
        cookie = next(v for k, v in r.history[-1].headers.multi_items() if k == "set-cookie"
                      and v.startswith("tb_portal="))  # fmt: skip
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert "Path=/_bridge/portal/" in cookie
    events = [e["event"] for e in env.users.audit_log()]
    assert events == ["signin"]


async def test_a_member_of_an_allowed_group_signs_in_through_a_route_path(env: Env) -> None:
    await env.start(public_url=env.broker.url + "/r/default/")
    async with client() as c:
        r = await sign_in(c, env.broker.url + "/r/default/_bridge/portal/", "carol")
        assert r.status_code == 200, r.text
        assert "carol@elsewhere.org" in r.text


async def test_a_user_outside_the_allowed_domains_is_refused(env: Env) -> None:
    await env.start()
    async with client() as c:
        r = await sign_in(c, env.base, "bob")
        assert r.status_code == 403
        assert "may not use this service" in r.text
        r = await c.get(env.base)
        assert 'id="signin"' in r.text  # no session
    (entry,) = env.users.audit_log()
    assert entry["event"] == "signin_refused" and entry["email"] == "bob@elsewhere.org"


async def test_a_wrong_state_is_refused(env: Env) -> None:
    await env.start()
    async with client() as c:
        url = await callback_url(c, env.base, "alice")
        wrong = re.sub(r"state=[^&]+", "state=forged", url)
        r = await c.get(wrong)
        assert r.status_code == 400 and "wrong state" in r.text
        r = await c.get(env.base)
        assert 'id="signin"' in r.text


async def test_a_callback_from_another_browser_is_refused(env: Env) -> None:
    await env.start()
    async with client() as c:
        url = await callback_url(c, env.base, "alice")
    async with client() as other:  # no login cookie: login CSRF
        r = await other.get(url)
        assert r.status_code == 400 and "wrong state" in r.text


async def test_a_replayed_code_is_refused(env: Env) -> None:
    await env.start()
    async with client() as c:
        url = await callback_url(c, env.base, "alice")
        login_cookie = c.cookies.get("tb_portal_login")
        r = await c.get(url)
        assert r.status_code == 200 and "alice@example.com" in r.text
        c.cookies.set("tb_portal_login", login_cookie or "", path="/_bridge/portal/")
        r = await c.get(url)
        assert r.status_code == 400 and "used already" in r.text


class _Tamper(httpx.AsyncBaseTransport):
    """Between the portal and the provider's token endpoint: the ID token replaced."""

    def __init__(self, change: Callable[[str], str]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.change = change

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        r = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/token"):
            return r
        await r.aread()
        doc = json.loads(r.content)
        if "id_token" in doc:
            doc["id_token"] = self.change(doc["id_token"])
        return httpx.Response(r.status_code, json=doc)


def _payload(token: str) -> dict[str, Any]:
    import base64

    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


async def _sign_in_with_token_changed(env: Env, change: Callable[[str], str]) -> httpx.Response:
    conn = await env.start()
    assert conn.portal is not None
    conn.portal.oidc.http = httpx.AsyncClient(transport=_Tamper(change), timeout=10)
    async with client() as c:
        return await sign_in(c, env.base, "alice")


async def test_an_id_token_with_a_bad_signature_is_refused(env: Env) -> None:
    forger = signing_key("k1")  # the provider's key id, another key

    def forge(token: str) -> str:
        return jwt.encode({"alg": "RS256", "kid": "k1"}, _payload(token), forger)

    r = await _sign_in_with_token_changed(env, forge)
    assert r.status_code == 400
    assert "signature is not the identity provider" in r.text
    assert [e["event"] for e in env.users.audit_log()] == []


async def test_an_id_token_for_another_audience_is_refused(env: Env) -> None:
    def for_another(token: str) -> str:  # signed by the provider's own key, for another client
        claims = {**_payload(token), "aud": "another-client"}
        return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, env.key)

    r = await _sign_in_with_token_changed(env, for_another)
    assert r.status_code == 400
    assert "ID token was refused" in r.text and "aud" in r.text


async def test_an_expired_id_token_is_refused(env: Env) -> None:
    def expired(token: str) -> str:
        claims = _payload(token)
        claims["exp"] = claims["iat"] - 3600
        return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, env.key)

    r = await _sign_in_with_token_changed(env, expired)
    assert r.status_code == 400 and "ID token was refused" in r.text


# -- sessions --
async def test_an_expired_session_asks_to_sign_in_again(env: Env) -> None:
    await env.start(session_ttl="1s")
    async with client() as c:
        r = await sign_in(c, env.base, "alice")
        assert "Create my key" in r.text
        await trio.sleep(1.2)
        r = await c.get(env.base)
        assert 'id="expired"' in r.text and "Create my key" not in r.text
        r = await post(c, env, "key", r.text.replace('id="signin"', 'name="csrf" value="x"'),
                       action="create")  # fmt: skip
        assert r.status_code == 401


async def test_a_cross_site_post_is_refused(env: Env) -> None:
    await env.start()
    async with client() as c:
        page = (await sign_in(c, env.base, "alice")).text
        csrf = csrf_of(page)
        evil = {"origin": "https://evil.example"}
        r = await c.post(env.base + "key", data={"csrf": csrf, "action": "create"}, headers=evil)
        assert r.status_code == 403 and "another site" in r.text
        r = await c.post(env.base + "key", data={"csrf": csrf, "action": "create"},
                         headers={"sec-fetch-site": "cross-site"})  # fmt: skip
        assert r.status_code == 403
        r = await c.post(env.base + "key", data={"csrf": "guessed", "action": "create"},
                         headers={"origin": env.broker.url})  # fmt: skip
        assert r.status_code == 403 and "stale" in r.text
        assert env.lab.keys.entries()[-1].name == "lab-user"  # no key was made


async def test_sessions_survive_a_connector_restart(env: Env) -> None:
    await env.start()
    async with client() as c:
        await sign_in(c, env.base, "alice")
        await env.stop()
        await env.start()
        r = await c.get(env.base)
        assert "alice@example.com" in r.text and "Create my key" in r.text


async def test_signing_out_ends_the_session(env: Env) -> None:
    await env.start()
    async with client() as c:
        page = (await sign_in(c, env.base, "alice")).text
        r = await post(c, env, "logout", page)
        assert 'id="signin"' in r.text
        c.cookies.clear()
        r = await c.get(env.base)
        assert 'id="signin"' in r.text
    assert [e["event"] for e in env.users.audit_log()] == ["signout", "signin"]


@pytest.mark.slow
async def test_a_provider_that_rotates_its_signing_key_is_followed(env: Env) -> None:
    conn = await env.start()
    assert conn.portal is not None
    async with client() as c:
        assert "alice@example.com" in (await sign_in(c, env.base, "alice")).text
    port = int(env.issuer.rsplit(":", 1)[1])
    conn.portal.oidc.jwks_refresh = 0.0
    # the provider comes back with a new key (new kid) on the same address
    scope, done = env.provider
    scope.cancel()
    await done.wait()
    await start_provider(env.lab, env.broker.url, [signing_key("k2")], port)
    async with client() as c:
        assert "alice@example.com" in (await sign_in(c, env.base, "alice")).text
    assert conn.portal.oidc.keys is not None
    assert [k.kid for k in conn.portal.oidc.keys.keys] == ["k2"]


# -- the user's page: their own key, limits, usage --
async def _chat(env: Env, key: str) -> str:
    async with openai.AsyncOpenAI(
        base_url=env.broker.url + "/v1", api_key=key, max_retries=0
    ) as ai:
        r = await ai.chat.completions.create(
            model="test", messages=[{"role": "user", "content": "hello there"}]
        )
    return r.choices[0].message.content or ""


async def test_a_user_makes_their_key_uses_it_and_sees_their_usage(env: Env) -> None:
    env.lab.keys.set_defaults({"rpm": 100, "tokens_per_day": 100_000})
    await env.start()
    async with client() as c:
        page = (await sign_in(c, env.base, "alice")).text
        r = await post(c, env, "key", page, action="create")
        assert r.status_code == 200
        key = shown_key(r.text)
        assert key.startswith("tbk_") and "shown only once" in r.text
        assert key in r.text.split('id="snippets"')[1]  # the snippets carry it
        page = (await c.get(env.base)).text
        assert key not in page and "shown only once" not in page  # once
        assert re.search(r"Requests per minute</td><td class=num>100</td>", page)
        assert await _chat(env, key)
        with trio.fail_after(5):
            while "Today</td><td class=num>1<" not in (page := (await c.get(env.base)).text):
                await trio.sleep(0.05)
        assert '<svg class="chart"' in page
        assert re.search(r"Requests per minute</td><td class=num>100</td><td class=num>99<", page)
    entry = env.lab.keys.entries()[-1]
    assert entry.name == "u1-alice_example.com" and entry.limits.rpm is None  # [defaults]
    assert [e["event"] for e in env.users.audit_log()] == ["key_created", "signin"]


async def test_rotating_stops_the_old_key_and_revoking_stops_the_key(env: Env) -> None:
    await env.start()
    async with client() as c:
        page = (await sign_in(c, env.base, "alice")).text
        page = (await post(c, env, "key", page, action="create")).text
        old = shown_key(page)
        page = (await post(c, env, "key", page, action="rotate")).text
        new = shown_key(page)
        assert new != old
        with pytest.raises(openai.AuthenticationError):
            await _chat(env, old)
        assert await _chat(env, new)
        page = (await post(c, env, "key", page, action="revoke")).text
        assert "You have no key" in page and "Create my key" in page
        with pytest.raises(openai.AuthenticationError, match="revoked"):
            await _chat(env, new)
    events = [e["event"] for e in env.users.audit_log()]
    assert events == ["key_revoked", "key_rotated", "key_created", "signin"]
    assert all("tbk_" not in e["detail"] for e in env.users.audit_log())


async def test_a_new_user_waits_for_approval_before_making_a_key(env: Env) -> None:
    await env.start(new_users="approve")
    async with client() as c:
        page = (await sign_in(c, env.base, "alice")).text
        assert 'id="pending"' in page and "Create my key" not in page
        r = await post(c, env, "key", page, action="create")
        assert r.status_code == 403
        user = env.users.find("alice@example.com")
        env.users.set_state(user.id, "active")
        page = (await c.get(env.base)).text
        assert "Create my key" in page


# -- the operator: CLI, admin page, audit log --
async def _refused_within_a_second(env: Env, key: str) -> None:
    """The connector looks at the keys file at most every RELOAD_INTERVAL (0.5 s)."""
    with trio.fail_after(1.5):
        while True:
            try:
                await _chat(env, key)
            except openai.AuthenticationError as exc:
                assert "revoked" in str(exc)
                return
            await trio.sleep(0.1)


async def _cli(env: Env, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    conf = env.lab.dir / "connector.toml"
    conf.write_text("[connector]\n")
    capsys.readouterr()
    code = await trio.to_thread.run_sync(main, ["users", *args, "-c", str(conf)])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


async def test_the_operator_approves_sets_limits_and_blocks_users_from_the_cli(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    await env.start(new_users="approve")
    async with client() as c:
        page = (await sign_in(c, env.base, "alice")).text
        assert 'id="pending"' in page
        out = await _cli(env, capsys, "list")
        assert re.search(r"alice@example.com\s+pending", out)
        assert "approved alice@example.com" in await _cli(
            env, capsys, "approve", "alice@example.com"
        )
        page = (await c.get(env.base)).text
        key = shown_key((await post(c, env, "key", page, action="create")).text)
        assert '"rpm": 7' in await _cli(env, capsys, "set", "alice@example.com", "--rpm", "7")
        env.lab.keys.reload()  # the CLI wrote the file
        assert env.lab.keys.entries()[-1].limits.rpm == 7
        assert "Requests per minute</td><td class=num>7<" in (await c.get(env.base)).text
        assert await _chat(env, key)
        out = await _cli(env, capsys, "block", "1")
        assert re.match(r"blocked alice@example.com; key \w+ revoked", out), out
        await _refused_within_a_second(env, key)
        assert 'id="signin"' in (await c.get(env.base)).text  # the session ended
        r = await c.get(env.base + "login")  # still signed in at the provider: straight back
        assert r.status_code == 403 and "blocked" in r.text
    out = await _cli(env, capsys, "audit")
    events = [line.split()[2] for line in out.splitlines()]
    assert events == ["signin_refused", "user_blocked", "user_limits", "key_created",
                      "user_approved", "signin"]  # fmt: skip
    assert key.rsplit("_", 1)[1] not in out  # key ids only, never a secret
    listed = json.loads(await _cli(env, capsys, "list", "--json"))
    assert listed[0]["state"] == "blocked" and listed[0]["key"] is None


async def test_the_admin_page_lists_users_and_blocks_one(env: Env) -> None:
    conn = await env.start()
    async with client() as c:
        page = (await sign_in(c, env.base, "alice")).text
        key = shown_key((await post(c, env, "key", page, action="create")).text)
    host, port = conn.admin_address or ("", 0)
    admin = f"http://{host}:{port}"
    async with httpx.AsyncClient() as c:
        doc = (await c.get(admin + "/api/users")).json()
        assert doc["enabled"] and doc["users"][0]["email"] == "alice@example.com"
        assert doc["users"][0]["key"] == env.lab.keys.entries()[-1].id
        assert [e["event"] for e in doc["audit"]] == ["key_created", "signin"]
        r = await c.post(admin + "/api/users/block/1")
        assert r.status_code == 403  # no same-origin proof
        r = await c.post(admin + "/api/users/block/1", headers={"x-trio-bridge-admin": "1"})
        assert r.status_code == 200 and "blocked" in r.json()["done"]
    with pytest.raises(openai.AuthenticationError):
        await _chat(env, key)
    assert env.users.audit_log()[0]["actor"] == "admin page"


# -- snippets and the chat page --
async def test_the_snippets_name_the_base_url_and_the_model(env: Env) -> None:
    await env.start(public_url=env.broker.url + "/r/default/", model="my-model")
    base = env.broker.url + "/r/default/_bridge/portal/"
    v1 = env.broker.url + "/r/default/v1"
    async with client() as c:
        page = (await sign_in(c, base, "alice")).text
    snippets = page.split('id="snippets"')[1]
    for ident, want in (
        ("curl", f"curl {v1}/chat/completions"),
        ("sdk", f'OpenAI(base_url="{v1}", api_key="YOUR_KEY")'),
        ("cline", f"Base URL:     {v1}"),
        ("continue", f"apiBase: {v1}"),
    ):
        m = re.search(f'<pre id="snippet-{ident}"><code>(.*?)</code></pre>', snippets, re.S)
        assert m is not None, ident
        text = html.unescape(m.group(1))
        assert want in text and "my-model" in text, (ident, text)


async def test_the_chat_page_and_its_script_are_served_under_the_strict_csp(env: Env) -> None:
    await env.start(model="my-model")
    async with client() as c:
        await sign_in(c, env.base, "alice")
        r = await c.get(env.base + "chat")
        conf = re.search(r'data-conf="([^"]+)"', r.text)
        assert conf is not None
        assert json.loads(html.unescape(conf.group(1))) == {
            "url": env.broker.url + "/v1/chat/completions",
            "model": "my-model",
        }
        assert 'id="chat-stop"' in r.text
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe" not in csp
        assert re.findall(r"<script(?![^>]*\bsrc=)", r.text) == []  # no inline script
        assert " style=" not in r.text
        js = await c.get(env.base + "ui/portal-chat.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert "AbortController" in js.text
        assert (await c.get(env.base + "ui/connector.js")).status_code == 404  # portal's only
        c.cookies.clear()
        r = await c.get(env.base + "chat")
        assert 'id="signin"' in r.text  # signed-in users only


async def test_over_https_the_cookies_are_secure_and_scoped_to_the_portal(env: Env) -> None:
    await env.start(public_url="https://llm.example.com/r/team/")
    async with httpx.AsyncClient() as c:
        r = await c.get(env.base + "login")
    assert r.status_code == 303
    assert r.headers["location"].startswith(env.issuer + "/auth?")
    assert (
        "redirect_uri=https%3A%2F%2Fllm.example.com%2Fr%2Fteam%2F_bridge%2Fportal%2Fcallback"
        in (r.headers["location"])
    )
    assert "code_challenge_method=S256" in r.headers["location"]
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("tb_portal_login=")
    for part in ("HttpOnly", "SameSite=Lax", "Secure", "Path=/r/team/_bridge/portal/"):
        assert part in cookie


async def test_sign_ins_in_progress_are_bounded(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trio_bridge.accounts._users.MAX_LOGINS", 2)
    await env.start()
    async with httpx.AsyncClient() as c:
        statuses = [(await c.get(env.base + "login")).status_code for _ in range(3)]
    assert statuses == [303, 303, 303]  # the oldest is dropped (a flood keeps no one out)
    with env.users._db() as db:
        assert db.execute("SELECT count(*) FROM logins").fetchone()[0] == 2


async def test_a_provider_that_cannot_be_reached_is_a_502_page_that_says_so(env: Env) -> None:
    await env.start()
    scope, done = env.provider
    scope.cancel()
    await done.wait()
    async with client() as c:
        r = await c.get(env.base + "login")
    assert r.status_code == 502
    assert "discovery document could not be read" in r.text


def test_the_users_command_before_the_portal_ever_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "connector.toml"
    conf.write_text("[connector]\n")
    assert main(["users", "list", "-c", str(conf)]) == 0
    assert "no portal users yet" in capsys.readouterr().out
    assert main(["users", "block", "a@b.c", "-c", str(conf)]) == 2
    assert "no portal users file" in capsys.readouterr().err
    assert not (tmp_path / "portal.sqlite3").exists()


async def test_a_provider_that_never_answers_is_a_504_page_within_the_deadline(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("trio_bridge.connector._portal.DEADLINE", 0.5)
    (silent,) = await trio.open_tcp_listeners(0, host="127.0.0.1")  # accepts, never answers
    port = silent.socket.getsockname()[1]
    await env.start(issuer=f"http://127.0.0.1:{port}")
    async with client() as c:
        with trio.fail_after(5):
            r = await c.get(env.base + "login")
    assert r.status_code == 504 and "did not answer in time" in r.text
    await silent.aclose()

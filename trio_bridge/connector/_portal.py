"""The self-service portal (issue 28): ``/_bridge/portal/`` on the connector, reached through
the broker like any request (``/r/<route>/_bridge/portal/`` too: the broker takes the route off).
Off unless ``[portal] enabled``. See docs/portal.md.

One request, one :class:`PortalRequest`: parse → session → (CSRF on a change) → answer, read
top to bottom in :meth:`PortalRequest.run`. Pages are HTML made here (``_portalpages``) under
the admin pages' strict CSP, with the portal's CSS and script from ``admin/ui/``.

Sign-in: OpenID Connect (``_oidc``). ``GET login`` makes a state, nonce and PKCE verifier
(kept hashed, single-use, in the users file) and a short-lived cookie binding the state to the
browser (the states of up to LOGIN_TABS sign-ins, one per tab); ``GET callback`` takes them
back once (a wrong or replayed state is refused), trades the code, verifies the ID token,
checks who may sign in, and starts a session.

Sessions: a random id in a cookie signed with HMAC-SHA256 by ``secret_file``'s key, HttpOnly,
SameSite=Lax, Secure when ``public_url`` is https, Path scoped to the portal (the LLM never sees
it); kept hashed in the users file with their expiry (``session_ttl``), so they survive a
restart. Every POST needs the session's CSRF token and ``Sec-Fetch-Site: same-origin`` (or,
from a client without it, an ``Origin`` that is ``public_url``'s); another site's ``Origin`` is
refused either way.

Blocking work (the users file, the keys file) runs in worker threads.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import SplitResult, parse_qs, urlsplit

import attrs
import trio

from trio_bridge._config import Config
from trio_bridge._errors import ConfigError, StreamReset
from trio_bridge.accounts._keys import SecretEntry, SecretStore, atomic_write, check_private
from trio_bridge.accounts._limits import KeyLimits, Limiter
from trio_bridge.accounts._usagestore import UsageStore, utc_day
from trio_bridge.accounts._users import ACTIVE, BLOCKED, PENDING, Session, User, UserStore
from trio_bridge.connector import _portalpages as pages
from trio_bridge.connector._oidc import OIDCClient, SignInFailed
from trio_bridge.connector._selfservice import left_now, totals
from trio_bridge.http._messages import REQUEST_ID, header
from trio_bridge.relay._frames import ResetCode
from trio_bridge.relay._protocol import ResponseHead
from trio_bridge.relay._relay import RelayStream

if TYPE_CHECKING:
    from trio_bridge.accounts._pool import PoolStore

log = logging.getLogger("trio_bridge.portal")
T = TypeVar("T")

PORTAL_PATH = "/_bridge/portal"
SESSION_COOKIE = "tb_portal"
LOGIN_COOKIE = "tb_portal_login"
MAX_FORM = 16 * 1024
#: sign-ins in progress one browser may have (one per tab): their states, in the login cookie
LOGIN_TABS = 4
#: one portal request, the identity provider's answers included, ends within this (seconds)
DEADLINE = 30
CSP = (
    b"default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    b"base-uri 'none'"
)


def _loopback(url: SplitResult) -> bool:
    return (url.hostname or "") in ("127.0.0.1", "localhost", "::1")


def load_secret(path: Path) -> bytes:
    """The key that signs session cookies: made (32 random bytes, mode 0600) on first use."""
    try:
        check_private(path)
        data = path.read_bytes().strip()
    except FileNotFoundError:
        data = secrets.token_hex(32).encode()
        atomic_write(path, data + b"\n")
    if len(data) < 32:
        raise ConfigError(f"{path}: the portal's secret is too short (delete it to make one)")
    return data


@attrs.frozen
class Answer:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    content_type: bytes = b"text/html; charset=utf-8"


class Portal:
    """The portal of one connector: its settings, the provider, the users file, and the parts
    of the connector it reads (keys, limiter, usage)."""

    def __init__(
        self,
        config: Config,
        *,
        keys: SecretStore,
        limiter: Limiter,
        usage_store: UsageStore | None,
        models: Callable[[], tuple[str, ...] | None],
        oidc: OIDCClient | None = None,
        pool: PoolStore | None = None,
    ) -> None:
        pc = config.portal
        if not (pc.public_url and pc.issuer and pc.client_id):
            raise ConfigError("portal: public_url, issuer and client_id are needed when enabled")
        if not (pc.allowed_domains or pc.allowed_emails or pc.allowed_groups):
            raise ConfigError(
                "portal: nobody may sign in: set allowed_domains, allowed_emails or allowed_groups"
            )
        if not pc.public_url.startswith(("https://", "http://")):
            raise ConfigError(f"portal.public_url: invalid URL {pc.public_url!r}")
        issuer = urlsplit(pc.issuer)
        if issuer.scheme != "https" and (issuer.scheme != "http" or not _loopback(issuer)):
            raise ConfigError(
                f"portal.issuer: {pc.issuer!r}: must be https:// (over http:// anyone on the "
                "way could hand out their own signing keys); http:// on loopback only"
            )
        self.cfg = pc
        self.public_url = pc.public_url.rstrip("/") + "/"
        parts = urlsplit(self.public_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.base = self.public_url + "_bridge/portal/"
        self.cookie_path = parts.path.rstrip("/") + PORTAL_PATH + "/"
        self.secure = parts.scheme == "https"
        if not self.secure and not _loopback(parts):
            log.warning(
                "portal: public_url is plain http: session cookies cannot be Secure and travel "
                "in clear; put the broker behind TLS and use https://"
            )
        self.keys, self.limiter, self.usage_store = keys, limiter, usage_store
        #: the pool's store: what is left now is the pool's (``limiter`` counts only while
        #: the store cannot be reached)
        self.pool = pool
        self.models = models
        self.users = UserStore(config.path(pc.users_file))
        self.secret = load_secret(config.path(pc.secret_file))
        client_secret = None
        if pc.client_secret_file:
            sp = config.path(pc.client_secret_file)
            check_private(sp)
            try:
                client_secret = sp.read_text().strip()
            except FileNotFoundError:
                raise ConfigError(f"portal.client_secret_file: {sp}: no such file") from None
        self.oidc = oidc or OIDCClient(
            pc.issuer,
            pc.client_id,
            client_secret,
            self.base + "callback",
            scopes=list(pc.scopes) + (["groups"] if pc.allowed_groups else []),
            token_auth=pc.token_auth,
        )
        self.domains = {d.lower().lstrip("@") for d in pc.allowed_domains}
        self.emails = {e.lower() for e in pc.allowed_emails}
        self.groups = set(pc.allowed_groups)
        self.stall_timeout = float(config.limits.stall_timeout)
        self.one_at_a_time = trio.CapacityLimiter(1)  # see in_thread

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking call (the users file, the keys file) in a worker thread, one at a time:
        a flood of sign-ins waits here (cancellable, within DEADLINE) rather than in SQLite's
        busy timeout ('database is locked'), and holds one of trio's worker threads, not all."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.one_at_a_time)

    async def aclose(self) -> None:
        await self.oidc.aclose()

    async def handle(self, stream: RelayStream) -> None:
        await PortalRequest(self, stream).run()

    # -- what the pages and the admin side share --
    def sign(self, value: str) -> str:
        mac = hmac.new(self.secret, value.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{value}.{mac}"

    def unsign(self, signed: str) -> str | None:
        value, _, _mac = signed.rpartition(".")
        # bytes: a cookie is any bytes, and compare_digest refuses non-ASCII str (TypeError)
        if not value or not hmac.compare_digest(self.sign(value).encode(), signed.encode()):
            return None
        return value

    def allowed(self, email: str, groups: tuple[str, ...]) -> bool:
        email = email.lower()
        domain = email.rpartition("@")[2]
        return (
            email in self.emails
            or (bool(domain) and domain in self.domains)
            or bool(self.groups.intersection(groups))
        )

    def current_key(self, user: User) -> SecretEntry | None:
        self.keys.maybe_reload()
        usable = [e for e in self.keys.entries_named(user.key_name) if e.usable()]
        return usable[-1] if usable else None

    def key_ids(self, user: User) -> list[str]:
        return [e.id for e in self.keys.entries_named(user.key_name)]

    def ended_key(self, user: User) -> SecretEntry | None:
        """``user``'s key if the operator's end for it passed (its newest secret expired,
        neither revoked nor replaced): the portal makes no new key or secret for them then
        (that would undo the end); the operator extends it (`keys set NAME --expires`)."""
        named = self.keys.entries_named(user.key_name)
        live = [e for e in named if not e.revoked and not e.replaced]
        return live[-1] if live and live[-1].expired() else None

    def change_key(self, user: User, action: str) -> tuple[str, SecretEntry, str | None] | None:
        """Create, rotate or revoke ``user``'s key (a worker thread): (audit event, entry,
        secret to show); None if they are no longer active. Their state is read again under
        the keys' lock, which a block holds from its state change to its revocation: a key
        is never made for a user being blocked (ConfigError: the key changed meanwhile)."""
        with self.keys.changing():
            if self.users.state_of(user.id) != ACTIVE:
                return None
            if action != "revoke" and self.ended_key(user) is not None:
                return None
            if action == "create":
                entry, secret = self.keys.add(user.key_name, limits=self.user_limits(user))
                return "key_created", entry, secret
            if action == "rotate":
                entry, secret, _ = self.keys.rotate(user.key_name, 0.0)
                return "key_rotated", entry, secret
            return "key_revoked", self.keys.revoke(user.key_name), None

    def user_limits(self, user: User) -> KeyLimits:
        doc: dict[str, Any] = dict(user.limits)
        if "models" in doc:
            doc["models"] = tuple(doc["models"])
        return KeyLimits(**doc)

    def model(self) -> str:
        return self.cfg.model or next(iter(self.models() or ()), "") or "your-model"


def _cookies(raw: bytes | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (raw or b"").decode("latin-1").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out.setdefault(name, value)
    return out


class PortalRequest:
    """One request to the portal: read, decide, answer. Cancellation: the stream's scope."""

    def __init__(self, portal: Portal, stream: RelayStream) -> None:
        head = stream.request_head
        assert head is not None
        self.portal, self.stream, self.head = portal, stream, head
        path, _, query = head.target.partition("?")
        self.path = path[len(PORTAL_PATH) :].lstrip("/")
        self.query = {k: v[0] for k, v in parse_qs(query).items()}
        self.method = head.method
        self.cookies = _cookies(header(head.headers, b"cookie"))
        self.form: dict[str, str] = {}
        #: the states of this browser's other sign-ins in progress (callback)
        self.other_logins: list[str] = []

    async def run(self) -> None:  # noqa: ASYNC910  a reset comes from a send (awaited)
        try:
            with trio.fail_after(DEADLINE):  # the provider's endpoints and the files together
                answer = await self._serve()
        except trio.TooSlowError:
            log.warning("portal: a request took more than %d s (the identity provider?)", DEADLINE)
            answer = self._refused(504, "Too slow", "The sign-in service did not answer in time.")
        except SignInFailed as exc:
            status = exc.status
            answer = self._page(status, pages.message("Sign-in failed", str(exc), self.portal.base))
        try:
            await self._send(answer)
        except StreamReset:
            pass  # the client went away: nothing to answer

    async def _serve(self) -> Answer:
        p = self.portal
        if self.method == "GET" and self.path.startswith("ui/"):
            return pages.static(self.path[3:])  # noqa: ASYNC910  a static file: sent by run() right after (awaits)
        if self.method == "GET" and self.path == "login":
            return await self._login()
        if self.method == "GET" and self.path == "callback":
            return await self._callback()
        session = await self._session()
        if self.method == "POST":
            form = await self._read_form()
            if isinstance(form, Answer):
                return form
            if refusal := self._check_csrf(session):
                return refusal
            assert session is not None
            return await self._change(session)
        if self.method != "GET":
            return self._page(405, pages.message("Not allowed", "Use the page's buttons.", p.base))
        if self.path not in ("", "chat"):
            return self._page(404, pages.message("Not found", "No such page.", p.base))
        if session is None:
            expired = SESSION_COOKIE in self.cookies
            return self._page(200, pages.signin(p.base, expired=expired))
        if self.path == "chat":
            return self._page(200, pages.chat(p.base, p.public_url, p.model()))
        return self._page(200, await self._user_page(session))

    # -- sign-in --
    async def _login(self) -> Answer:
        p = self.portal
        url, state, nonce, verifier = await p.oidc.authorization_url()
        await p.in_thread(p.users.start_login, state, nonce, verifier)
        # the states of this browser's sign-ins in progress (another tab's too), '-' apart
        earlier = [s for s in (p.unsign(self.cookies.get(LOGIN_COOKIE, "")) or "").split("-") if s]
        states = [*earlier[-(LOGIN_TABS - 1) :], state]
        cookie = self._cookie(LOGIN_COOKIE, p.sign("-".join(states)), max_age=600)
        return Answer(303, b"", [(b"location", url.encode()), (b"set-cookie", cookie)])

    async def _callback(self) -> Answer:
        p = self.portal
        q = self.query
        if "error" in q:  # an OAuth error code (RFC 6749 4.1.2.1), not free text (a link's)
            code = q["error"] if re.fullmatch(r"[a-z_]{1,40}", q["error"]) else "an error"
            raise SignInFailed(f"the identity provider said: {code}")
        state, code = q.get("state", ""), q.get("code", "")
        bound = (p.unsign(self.cookies.get(LOGIN_COOKIE, "")) or "").split("-")
        if not state or not code or state not in bound:
            log.warning("portal: a sign-in came back with a state this browser did not start")
            return self._refused(  # noqa: ASYNC910  a refusal: sent by run() right after (awaits)
                400,
                "Sign-in failed",
                "This sign-in was not started here (wrong state). Start again.",
            )
        taken = await p.in_thread(p.users.take_login, state)
        if taken is None:
            log.warning("portal: a sign-in came back twice or too late (state unknown)")
            return self._refused(
                400,
                "Sign-in failed",
                "This sign-in was used already or took too long. Start again.",
            )
        nonce, verifier = taken
        self.other_logins = [s for s in bound if s and s != state]  # other tabs'
        claims = await p.oidc.exchange(code, nonce, verifier)
        return await self._signed_in(claims)

    async def _signed_in(self, claims: dict[str, Any]) -> Answer:
        p = self.portal
        email = str(claims.get("email") or "")
        verified = claims.get("email_verified")
        if not email or verified in (False, "false"):  # some providers send it as a string
            return self._refused(403, "Not allowed", "Your account has no verified email address.")  # noqa: ASYNC910  a refusal: sent by run() right after (awaits)
        raw_groups = claims.get(p.cfg.groups_claim) or []
        groups = tuple(str(g) for g in raw_groups) if isinstance(raw_groups, list) else ()
        users = p.users
        # an address the provider does not say it verified (a user may have typed it) matches
        # no allowed domain or address; an allowed group still lets its members in
        if not p.allowed(email if verified in (True, "true") else "", groups):
            await p.in_thread(
                users.audit,
                "signin_refused",
                email,
                "portal",
                "not in the allowed domains, addresses or groups",
            )
            log.info("portal: sign-in refused (not allowed)")
            return self._refused(
                403, "Not allowed", f"{email} may not use this service. Ask its operator."
            )
        new_state = ACTIVE if p.cfg.new_users == "auto" else PENDING
        user, new = await p.in_thread(
            users.sign_in,
            str(claims["sub"]),
            email,
            str(claims.get("name") or ""),
            groups,
            new_state,
        )
        if user.state == BLOCKED:
            await p.in_thread(users.audit, "signin_refused", email, "portal", "blocked")
            return self._refused(403, "Blocked", "Your access was blocked by the operator.")
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(24)
        await p.in_thread(users.new_session, user.id, session_id, csrf, float(p.cfg.session_ttl))
        await p.in_thread(
            users.audit, "signin", email, "user", f"new user ({user.state})" if new else ""
        )
        log.info("portal: user %d signed in", user.id)
        return Answer(
            303,
            b"",
            [
                (b"location", p.base.encode()),
                (b"set-cookie", self._cookie(SESSION_COOKIE, p.sign(session_id))),
                (b"set-cookie", self._login_cookie_left()),
            ],
        )

    # -- sessions and changes --
    async def _session(self) -> Session | None:
        signed = self.cookies.get(SESSION_COOKIE)
        session_id = self.portal.unsign(signed) if signed else None
        if session_id is None:
            await trio.lowlevel.checkpoint()
            return None
        session = await self.portal.in_thread(self.portal.users.session, session_id)
        if session is not None and session.user.state == BLOCKED:
            return None
        return session

    async def _read_form(self) -> dict[str, str] | Answer:
        body = b""
        with trio.move_on_after(self.portal.stall_timeout):
            while chunk := await self.stream.receive_data():
                body += chunk
                if len(body) > MAX_FORM:
                    return self._page(
                        413, pages.message("Too large", "That form is too large.", self.portal.base)
                    )
            self.form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
            return self.form
        return self._page(408, pages.message("Too slow", "The form did not arrive.", ""))

    def _check_csrf(self, session: Session | None) -> Answer | None:
        p = self.portal
        origin = header(self.head.headers, b"origin")
        site = header(self.head.headers, b"sec-fetch-site")
        # A browser's Sec-Fetch-Site is authoritative; without it (older browsers, scripts)
        # the Origin must be ours. An Origin that is someone else's is refused either way.
        ours = origin is not None and origin.decode("latin-1").rstrip("/") == p.origin
        same_origin = site == b"same-origin" if site is not None else ours
        if not same_origin or (origin not in (None, b"null") and not ours):
            log.warning("portal: a cross-site POST was refused")
            return self._page(
                403, pages.message("Refused", "A change from another site was refused.", p.base)
            )
        if session is None:
            return self._page(401, pages.signin(p.base, expired=SESSION_COOKIE in self.cookies))
        if not hmac.compare_digest(self.form.get("csrf", "").encode(), session.csrf.encode()):
            log.warning("portal: a POST without the session's CSRF token was refused")
            return self._page(
                403,
                pages.message(
                    "Refused", "This form is stale: reload the page and try again.", p.base
                ),
            )
        return None

    async def _change(self, session: Session) -> Answer:
        p, user = self.portal, session.user
        if self.path == "logout":
            session_id = p.unsign(self.cookies.get(SESSION_COOKIE, "")) or ""
            await p.in_thread(p.users.end_session, session_id)
            await p.in_thread(p.users.audit, "signout", user.email, "user")
            return Answer(
                303,
                b"",
                [
                    (b"location", p.base.encode()),
                    (b"set-cookie", self._cookie(SESSION_COOKIE, "", max_age=0)),
                ],
            )
        if self.path != "key":
            return self._page(404, pages.message("Not found", "No such action.", p.base))  # noqa: ASYNC910  a refusal: sent by run() right after (awaits)
        if user.state != ACTIVE:
            return self._page(  # noqa: ASYNC910  a refusal: sent by run() right after (awaits)
                403,
                pages.message("Not yet", "Your account waits for the operator's approval.", p.base),
            )
        action = self.form.get("action", "")
        has_key = p.current_key(user) is not None
        if action != "revoke" and (ended := p.ended_key(user)) is not None:
            return self._page(  # noqa: ASYNC910  a refusal: sent by run() right after (awaits)
                403,
                pages.message(
                    "Key expired",
                    f"Your key expired at {ended.expires}: ask the operator to extend it.",
                    p.base,
                ),
            )
        done = None
        if (action == "create" and not has_key) or (action in ("rotate", "revoke") and has_key):
            try:
                done = await p.in_thread(p.change_key, user, action)
            except ConfigError:  # the key changed meanwhile (a double click, another box)
                done = None
        if done is None:
            return self._page(  # noqa: ASYNC910  a refusal: sent by run() right after (awaits)
                409,
                pages.message(
                    "Nothing done", "Your key changed meanwhile: reload the page.", p.base
                ),
            )
        event, entry, secret = done
        await p.in_thread(p.users.audit, event, user.email, "user", f"key {entry.id}")
        log.info("portal: user %d: %s (key %s)", user.id, event, entry.id)
        return self._page(200, await self._user_page(session, secret=secret))

    # -- the user's page --
    async def _user_page(self, session: Session, *, secret: str | None = None) -> str:
        p, user = self.portal, session.user
        entry = p.current_key(user) if user.state == ACTIVE else None
        limits = p.keys.limits_for(entry) if entry else p.user_limits(user)
        wall = time.time()  # wall clock
        now_left = await left_now(p.limiter, p.pool, entry, limits) if entry else None
        rows: list[dict[str, Any]] = []
        store = p.usage_store
        if store is not None:
            with trio.move_on_after(5):
                await store.load()
            if store.loaded:
                rows = store.rows(since_day=utc_day(wall - 29 * 86400), key_ids=p.key_ids(user))
        else:
            await trio.lowlevel.checkpoint()
        today = utc_day(wall)
        return pages.user_page(
            base=p.base,
            public_url=p.public_url,
            model=p.model(),
            user=user,
            csrf=session.csrf,
            entry=entry,
            secret=secret,
            limits=limits,
            left=now_left,
            today=totals(r for r in rows if r["day"] == today),
            month=totals(rows),
            by_day=rows,
            day=today,
            stored=store is not None,
        )

    # -- answers --
    def _cookie(self, name: str, value: str, *, max_age: int | None = None) -> bytes:
        p = self.portal
        parts = [f"{name}={value}", f"Path={p.cookie_path}", "HttpOnly", "SameSite=Lax"]
        if p.secure:
            parts.append("Secure")
        if max_age is not None:  # the session's own: until the browser closes (we expire it)
            parts.append(f"Max-Age={max_age}")
        return "; ".join(parts).encode()

    def _login_cookie_left(self) -> bytes:
        """The login cookie once a sign-in came back: other tabs' states, or none."""
        if not self.other_logins:
            return self._cookie(LOGIN_COOKIE, "", max_age=0)
        signed = self.portal.sign("-".join(self.other_logins))
        return self._cookie(LOGIN_COOKIE, signed, max_age=600)

    def _page(self, status: int, html: str) -> Answer:
        return Answer(status, html.encode())

    def _refused(self, status: int, title: str, text: str) -> Answer:
        return self._page(status, pages.message(title, text, self.portal.base))

    async def _send(self, answer: Answer) -> None:
        headers = [
            (b"content-type", answer.content_type),
            (b"content-length", str(len(answer.body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"),
            (b"content-security-policy", CSP),
            (REQUEST_ID, self.head.request_id.encode()),
            *answer.headers,
        ]
        stream = self.stream
        with trio.move_on_after(self.portal.stall_timeout) as stalled:
            await stream.send_response(ResponseHead(answer.status, headers))
            await stream.send_data(answer.body, end_stream=True)
        if stalled.cancelled_caught:
            stream.reset(ResetCode.TIMEOUT, "the broker took no answer (stall timeout)")

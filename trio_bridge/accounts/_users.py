"""The portal's users, their sessions, sign-ins in progress, and the audit log: one SQLite file
(``[portal] users_file``), shared by the running connector and ``trio-bridge users``.

Blocking calls (a file): the connector calls every method in a worker thread
(``trio.to_thread.run_sync``); each call opens its own connection, so threads and the CLI's
process share the file through SQLite's locking (WAL). Session ids and sign-in states are kept
as SHA-256 hashes only: the file gives no one a session. Times are wall-clock Unix times (a
session outlives a restart).

A user is ``pending`` (waits for the operator), ``active`` or ``blocked``; ``key_name`` is the
name of their key in the keys file (``SecretStore``), ``limits`` what their keys get.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import CHANGE_ATTEMPTS, ChangedMeanwhile, SecretStore

PENDING, ACTIVE, BLOCKED = "pending", "active", "blocked"
#: how long a sign-in may take at the provider (its state is single-use and dies after this)
LOGIN_TTL = 600.0
#: sign-ins in progress at once (started, not back from the provider yet)
MAX_LOGINS = 10_000
#: sessions kept per user (their newest; a script signing in in a loop adds no more)
SESSIONS_PER_USER = 20
#: audit entries kept of each kind of event (the oldest of that kind are dropped)
AUDIT_KEPT = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    sub TEXT NOT NULL UNIQUE,
    email TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    groups TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL,
    key_name TEXT NOT NULL,
    limits TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    last_login REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL,
    csrf TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS logins (
    state_hash TEXT PRIMARY KEY,
    nonce TEXT NOT NULL,
    verifier TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    event TEXT NOT NULL,
    email TEXT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_event ON audit (event, seq);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id);
"""


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@attrs.frozen(kw_only=True)
class User:
    id: int
    sub: str
    email: str
    name: str
    groups: tuple[str, ...]
    state: str
    key_name: str
    limits: dict[str, Any]
    created: float
    last_login: float

    def doc(self) -> dict[str, Any]:
        """As JSON for the admin page and ``users list --json`` (no secret in it)."""
        return {
            "id": self.id,
            "email": self.email,
            "name": self.name,
            "groups": list(self.groups),
            "state": self.state,
            "key_name": self.key_name,
            "limits": self.limits,
            "created": self.created,
            "last_login": self.last_login,
        }


@attrs.frozen(kw_only=True)
class Session:
    user: User
    csrf: str
    expires: float


def _user(row: sqlite3.Row) -> User:
    return User(
        id=row["id"],
        sub=row["sub"],
        email=row["email"],
        name=row["name"],
        groups=tuple(json.loads(row["groups"])),
        state=row["state"],
        key_name=row["key_name"],
        limits=json.loads(row["limits"]),
        created=row["created"],
        last_login=row["last_login"],
    )


def key_name_for(user_id: int, email: str) -> str:
    """The name of a user's key in the keys file: ``u<id>-`` and their address, made safe."""
    return f"u{user_id}-" + re.sub(r"[^A-Za-z0-9._-]", "_", email)[:50]


class UserStore:
    """The portal's SQLite file. Every method is blocking (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            db = sqlite3.connect(path, timeout=5)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
            finally:
                db.close()
            path.chmod(0o600)  # who signed in, and their sessions (hashed)
        except sqlite3.Error as exc:
            raise ConfigError(f"{path}: cannot open the portal's users file: {exc}") from None

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.path}: cannot open the portal's users file: {exc}") from None
        try:
            db.row_factory = sqlite3.Row
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # -- users --
    def sign_in(
        self, sub: str, email: str, name: str, groups: tuple[str, ...], new_state: str
    ) -> tuple[User, bool]:
        """Record a sign-in of ``sub`` (created in ``new_state`` if new): (user, was new)."""
        now = time.time()  # wall clock
        with self._db() as db:
            row = db.execute("SELECT * FROM users WHERE sub = ?", (sub,)).fetchone()
            if row is None:
                cur = db.execute(
                    "INSERT INTO users (sub, email, name, groups, state, key_name, created,"
                    " last_login) VALUES (?, ?, ?, ?, ?, '', ?, ?)",
                    (sub, email, name, json.dumps(list(groups)), new_state, now, now),
                )
                uid = int(cur.lastrowid or 0)
                db.execute(
                    "UPDATE users SET key_name = ? WHERE id = ?", (key_name_for(uid, email), uid)
                )
                new = True
            else:
                db.execute(
                    "UPDATE users SET email = ?, name = ?, groups = ?, last_login = ? "
                    "WHERE sub = ?",
                    (email, name, json.dumps(list(groups)), now, sub),
                )
                new = False
            user = _user(db.execute("SELECT * FROM users WHERE sub = ?", (sub,)).fetchone())
        return user, new

    def users(self) -> list[User]:
        with self._db() as db:
            return [_user(r) for r in db.execute("SELECT * FROM users ORDER BY id")]

    def find(self, who: str) -> User:
        """A user by email address or id (ConfigError naming it if there is none)."""
        with self._db() as db:
            rows = db.execute(
                "SELECT * FROM users WHERE lower(email) = lower(?) OR CAST(id AS TEXT) = ?",
                (who, who),
            ).fetchall()
        if not rows:
            raise ConfigError(f"{self.path}: no portal user {who!r} (see: trio-bridge users list)")
        by_id = [r for r in rows if str(r["id"]) == who]
        if len(rows) > 1 and not by_id:  # two provider accounts with one address
            ids = ", ".join(str(r["id"]) for r in rows)
            raise ConfigError(
                f"{self.path}: {len(rows)} users have the address {who!r} (numbers {ids}): "
                "name one by its number"
            )
        return _user((by_id or rows)[0])

    def state_of(self, user_id: int) -> str | None:
        """A user's state now (None: no such user)."""
        with self._db() as db:
            row = db.execute("SELECT state FROM users WHERE id = ?", (user_id,)).fetchone()
        return None if row is None else str(row["state"])

    def set_state(self, user_id: int, state: str) -> None:
        """Set a user's state; blocking one also ends their sessions."""
        with self._db() as db:
            db.execute("UPDATE users SET state = ? WHERE id = ?", (state, user_id))
            if state == BLOCKED:
                db.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))

    def set_limits(self, user_id: int, limits: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute("UPDATE users SET limits = ? WHERE id = ?", (json.dumps(limits), user_id))

    # -- sessions --
    def new_session(self, user_id: int, session_id: str, csrf: str, ttl: float) -> None:
        now = time.time()  # wall clock
        with self._db() as db:
            db.execute("DELETE FROM sessions WHERE expires < ?", (now,))
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                (_hash(session_id), user_id, csrf, now, now + ttl),
            )
            db.execute(
                "DELETE FROM sessions WHERE user_id = ? AND rowid NOT IN (SELECT rowid FROM "
                "sessions WHERE user_id = ? ORDER BY created DESC, rowid DESC LIMIT ?)",
                (user_id, user_id, SESSIONS_PER_USER),
            )

    def session(self, session_id: str) -> Session | None:
        """The live session with that id and its user, or None (unknown or expired)."""
        now = time.time()  # wall clock
        with self._db() as db:
            row = db.execute(
                "SELECT s.csrf AS s_csrf, s.expires AS s_expires, u.* FROM sessions s "
                "JOIN users u ON u.id = s.user_id WHERE s.id_hash = ?",
                (_hash(session_id),),
            ).fetchone()
        if row is None or row["s_expires"] < now:
            return None
        return Session(user=_user(row), csrf=row["s_csrf"], expires=row["s_expires"])

    def end_session(self, session_id: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM sessions WHERE id_hash = ?", (_hash(session_id),))

    # -- sign-ins in progress --
    def start_login(self, state: str, nonce: str, verifier: str) -> None:
        """Keep a sign-in's state (hashed), nonce and verifier for LOGIN_TTL. At most
        MAX_LOGINS are kept: beyond, the oldest is dropped (anyone may start sign-ins, so a
        flood of them must neither grow the file nor keep everyone else out)."""
        now = time.time()  # wall clock
        with self._db() as db:
            db.execute("DELETE FROM logins WHERE created < ?", (now - LOGIN_TTL,))
            db.execute(
                "DELETE FROM logins WHERE rowid NOT IN "
                "(SELECT rowid FROM logins ORDER BY created DESC LIMIT ?)",
                (MAX_LOGINS - 1,),
            )
            db.execute(
                "INSERT INTO logins VALUES (?, ?, ?, ?)", (_hash(state), nonce, verifier, now)
            )

    def take_login(self, state: str) -> tuple[str, str] | None:
        """(nonce, PKCE verifier) of the sign-in with that state, once: the state is gone
        after (a replayed callback finds nothing); None if unknown or too old."""
        now = time.time()  # wall clock
        with self._db() as db:
            row = db.execute(
                "SELECT * FROM logins WHERE state_hash = ?", (_hash(state),)
            ).fetchone()
            db.execute("DELETE FROM logins WHERE state_hash = ?", (_hash(state),))
        if row is None or row["created"] < now - LOGIN_TTL:
            return None
        return row["nonce"], row["verifier"]

    # -- the audit log --
    def audit(self, event: str, email: str, actor: str, detail: str = "") -> None:
        """Note an event (sign-in, key made or revoked, a user approved or blocked); ``actor``:
        who did it ("user", "operator", "portal"). Never a secret in ``detail``."""
        now = time.time()  # wall clock
        with self._db() as db:
            db.execute(
                "INSERT INTO audit (time, event, email, actor, detail) VALUES (?, ?, ?, ?, ?)",
                (now, event, email, actor, detail),
            )
            # kept per kind of event: a flood of one (refused sign-ins, which anyone with an
            # account at the provider can cause) never pushes out the others
            db.execute(
                "DELETE FROM audit WHERE event = ? AND seq NOT IN "
                "(SELECT seq FROM audit WHERE event = ? ORDER BY seq DESC LIMIT ?)",
                (event, event, AUDIT_KEPT),
            )

    def audit_log(self, limit: int = 200, email: str | None = None) -> list[dict[str, Any]]:
        """The newest entries first."""
        with self._db() as db:
            if email is None:
                rows = db.execute("SELECT * FROM audit ORDER BY seq DESC LIMIT ?", (limit,))
            else:
                rows = db.execute(
                    "SELECT * FROM audit WHERE email = ? ORDER BY seq DESC LIMIT ?",
                    (email, limit),
                )
            return [dict(r) for r in rows]


# -- what the operator does (the CLI and the admin page) --
def block(users: UserStore, keys: SecretStore, user: User, actor: str) -> str:
    """Block ``user``: their sessions end, their key is revoked (in force within a second in
    a running connector). What was done, in words."""
    revoked = ""
    for attempt in range(CHANGE_ATTEMPTS):
        try:
            with keys.changing():  # the portal reads the state under it (Portal.change_key)
                users.set_state(user.id, BLOCKED)
                keys.reload()
                if any(not e.revoked for e in keys.entries_named(user.key_name)):
                    revoked = keys.revoke(user.key_name).id
            break
        except ChangedMeanwhile:  # a pool's keys changed between the read and the write
            if attempt == CHANGE_ATTEMPTS - 1:
                raise
    users.audit("user_blocked", user.email, actor, f"key {revoked} revoked" if revoked else "")
    return f"blocked {user.email}" + (f"; key {revoked} revoked" if revoked else "")


def approve(users: UserStore, user: User, actor: str) -> str:
    users.set_state(user.id, ACTIVE)
    users.audit("user_approved", user.email, actor)
    return f"approved {user.email}: they can make their key on the portal"


def set_limits(
    users: UserStore, keys: SecretStore, user: User, changes: dict[str, Any], actor: str
) -> str:
    """Set limits for ``user`` and their current key."""
    limits = {k: list(v) if k == "models" else v for k, v in {**user.limits, **changes}.items()}
    limits = {k: v for k, v in limits.items() if v is not None and v != []}
    users.set_limits(user.id, limits)
    if any(e.usable() for e in keys.entries_named(user.key_name)):
        keys.set_limits(user.key_name, dict(changes))
    users.audit("user_limits", user.email, actor, json.dumps(limits, sort_keys=True))
    return f"{user.email}: limits {json.dumps(limits, sort_keys=True)}"

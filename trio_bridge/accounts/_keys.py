"""Secret stores: users' API keys (connector side) and connector tokens (broker side).

A secret looks like ``tbk_<id>_<secret>`` (API key) or ``tbc_<id>_<secret>`` (connector
token): ``id`` is 8 public characters that name the entry in logs and metrics, ``secret`` 256
random bits. Only the SHA-256 of the whole string is stored, in a TOML file written by this
module alone (tomli-w, write to a temporary file, fsync, rename; mode 0600)::

    [[keys]]
    name = "alice"
    id = "q3k9x2mf"
    sha256 = "…64 hex digits…"
    created = "2026-11-27T07:00:00Z"
    routes = ["team-*"]                 # connector tokens: routes it may serve (globs)
    expires = "2026-11-28T07:00:00Z"    # optional: no longer valid from then (rotation)

A connector token written without ``routes`` (by a release before route binding) may serve
the ``default`` route only. ``rotate`` adds a new secret under the same name and lets the old
one expire after a grace period, so the connector can pick up the new one without downtime.

:meth:`SecretStore.verify` compares digests with :func:`hmac.compare_digest`, and re-reads the
file when it changed (checked at most every ``RELOAD_INTERVAL`` seconds), so ``revoke`` takes
effect on a running process without a restart.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import fnmatch
import functools
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import string
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import tomli_w
import trio

from trio_bridge._errors import ConfigError
from trio_bridge.accounts._limits import KeyLimits

log = logging.getLogger("trio_bridge.keys")

RELOAD_INTERVAL = 0.5
_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_LEN = 8
#: how long a revoked entry stays in the file (listed as revoked, named in refusals)
REVOKED_KEPT = 30 * 86400.0
MAX_PRESENTED = 256  # longer presented keys are rejected before hashing
DEFAULT_ROUTE = "default"
#: route patterns: route-name characters plus the glob characters ``*`` and ``?``
_ROUTE_PATTERN = re.compile(r"^[A-Za-z0-9_*?-][A-Za-z0-9_*?-]{0,62}$")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)  # wall clock


def _iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def sooner(a: str, b: str) -> str:
    """The earlier of two expiry times ("" = never)."""
    if not a or (b and _parse_iso(b) < _parse_iso(a)):
        return b
    return a


def _parse_iso(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@attrs.frozen
class SecretEntry:
    name: str
    id: str
    sha256: str
    created: str
    #: routes a connector token may serve (glob patterns); () = the default route only
    routes: tuple[str, ...] = ()
    #: ISO time from which the secret is no longer valid ("" = never)
    expires: str = ""
    #: API keys: this key's own limits (unset ones come from the file's [defaults])
    limits: KeyLimits = KeyLimits()
    #: ISO time it was revoked ("" = it was not): kept, hash only, for REVOKED_KEPT so that
    #: lists and refusals can say what happened to it; it never works again
    revoked: str = ""
    #: ISO time a rotation replaced it with a new secret of its name ("" = none did): valid
    #: until ``expires`` (the rotation's grace), then kept like a revoked one, REVOKED_KEPT, so
    #: that a pool's boxes can tell a store that lost the rotation (see accounts/_poolkeys.py)
    replaced: str = ""

    def expired(self, now: float | None = None) -> bool:
        if not self.expires:
            return False
        return (time.time() if now is None else now) >= _parse_iso(self.expires)  # wall clock

    def usable(self, now: float | None = None) -> bool:
        """Neither revoked nor expired."""
        return not self.revoked and not self.expired(now)

    def allows_route(self, route: str) -> bool:
        """True if this (connector token) entry may serve ``route``."""
        patterns = self.routes or (DEFAULT_ROUTE,)
        return any(fnmatch.fnmatchcase(route, p) for p in patterns)

    @property
    def route_text(self) -> str:
        return ", ".join(self.routes or (DEFAULT_ROUTE,))


def budget(entry: SecretEntry) -> str:
    """What an API key's limits count under (the limiter, the pool's store, its share of
    buffered bodies; fair slots and usage rows stay per secret id): its name, not its id,
    so that a rotation, or a new key of the name after a revocation, goes on with the day's
    and the minute's counts (a user could reset their budget by rotating their key in the
    portal)."""
    return entry.name


def check_route_patterns(routes: list[str]) -> tuple[str, ...]:
    """Validate ``--route`` patterns (route names, ``*`` and ``?`` globs)."""
    for r in routes:
        if not _ROUTE_PATTERN.match(r):
            raise ConfigError(
                f"invalid route {r!r} (letters, digits, '-', '_', and the globs '*' '?')"
            )
    return tuple(dict.fromkeys(routes))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def new_secret(prefix: str) -> tuple[str, str]:
    """A new (id, secret) pair; the secret embeds the id."""
    ident = "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LEN))
    return ident, f"{prefix}_{ident}_{secrets.token_urlsafe(32)}"


def secret_id(secret: str) -> str | None:
    """The public id part of a presented secret, or None if it is not shaped like one."""
    parts = secret.split("_", 2)
    if len(parts) != 3 or len(parts[1]) != _ID_LEN:
        return None
    return parts[1]


def check_private(path: os.PathLike[str] | str) -> None:
    """Refuse a secrets file that other users may read (or write)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if mode & 0o007:
        raise ConfigError(f"{path} is accessible to every user: run `chmod 600 {path}`")


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, mode 0600. Run as root, the new file keeps the
    owner of the file it replaces (or of its directory), so a service user can still read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if os.geteuid() == 0:
            owner = os.stat(path) if path.exists() else os.stat(path.parent)
            os.fchown(fd, owner.st_uid, owner.st_gid)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


_F = TypeVar("_F", bound=Callable[..., Any])
#: how many times a change is made in all when its write keeps losing to another's
CHANGE_ATTEMPTS = 5


class ChangedMeanwhile(ConfigError):
    """A change's write lost to another write (a store's compare-and-set on the version the
    change was read at): it is made again from the document read again."""


def _locked(method: _F) -> _F:
    """A change (read the file, change, write it) made whole under :meth:`SecretStore.changing`:
    the portal and the admin page change keys from several worker threads at once, and
    ``trio-bridge keys|users`` from another process meanwhile. A write that lost to another
    (:class:`ChangedMeanwhile`: a pool's store) is made again, read again first, up to
    CHANGE_ATTEMPTS times in all."""

    @functools.wraps(method)
    def locked(self: SecretStore, *args: Any, **kwargs: Any) -> Any:
        if self.changing_here():
            # within a caller's change (it checked something under the lock, e.g. that a
            # user is still active): made once; a lost write is the caller's to judge
            with self.changing():
                return method(self, *args, **kwargs)
        for _ in range(CHANGE_ATTEMPTS - 1):
            try:
                with self.changing():
                    return method(self, *args, **kwargs)
            except ChangedMeanwhile:
                pass  # read again, made again
        with self.changing():
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class SecretStore:
    """Hashes of the secrets in one managed file; ``prefix`` is ``"tbk"`` or ``"tbc"``.
    Its changes may come from several threads (the portal's): each is whole under a lock."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.prefix = prefix
        self._by_id: dict[str, SecretEntry] = {}
        #: entries by name, and the ``_by_id`` it was built from (rebuilt when that is replaced)
        self._by_name: tuple[dict[str, SecretEntry], dict[str, list[SecretEntry]]] = ({}, {})
        self._defaults = KeyLimits()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = -math.inf
        #: counts the reads of the file (what was checked against it is current while same)
        self.generation = 0
        #: why the file could not be re-read (the last good entries are in force); None if fine
        self.reload_error: str | None = None
        #: the file's stamp when it last failed to read (False: it did not)
        self._bad_stamp: tuple[int, int, int] | bool | None = False
        self.lock = threading.RLock()  # see changing()
        self._changing = threading.local()  # .depth: how deep this thread is in changing()
        self._flocked = False  # this store holds the file's lock (under self.lock)
        self.reload()

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Held by each change; a caller may hold it across a check and its changes (no other
        thread, nor another process's store of this file, changes the keys meanwhile)."""
        with self.lock, self._file_lock():
            here = self._changing
            here.depth = getattr(here, "depth", 0) + 1
            try:
                yield
            finally:
                here.depth -= 1

    def changing_here(self) -> bool:
        """This thread holds :meth:`changing` already."""
        return getattr(self._changing, "depth", 0) > 0

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """An exclusive flock on ``.<name>.lock`` beside the file, for one change (held
        under :attr:`lock`; a store that is not a file, or a lock file it cannot open, has
        the thread lock only)."""
        if self._flocked or not isinstance(self.path, Path):
            yield
            return
        lock = self.path.with_name(f".{self.path.name}.lock")
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            yield
            return
        try:
            if os.geteuid() == 0:  # the service user's, as atomic_write makes the file
                owner = os.stat(self.path if self.path.exists() else self.path.parent)
                with contextlib.suppress(OSError):
                    os.fchown(fd, owner.st_uid, owner.st_gid)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._flocked = True
            try:
                yield
            finally:
                self._flocked = False
        finally:
            os.close(fd)  # the flock goes with it

    # -- reading --
    def _load(self) -> dict[str, Any] | None:
        """The document (the file's TOML), or None if there is none yet."""
        check_private(self.path)
        try:
            with self.path.open("rb") as f:
                return tomllib.load(f)
        except FileNotFoundError:
            return None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{self.path}: invalid TOML: {exc}") from None
        except UnicodeDecodeError as exc:  # tomllib's, for bytes that are not UTF-8
            raise ConfigError(
                f"{self.path}: not UTF-8 (byte {exc.start}): save it as UTF-8 TOML"
            ) from None
        except OSError as exc:  # a folder, no permission, an I/O error
            raise ConfigError(f"{self.path}: cannot be read: {exc.strerror or exc}") from None

    def _save(self, data: bytes) -> None:
        """Replace the document with ``data`` (TOML)."""
        atomic_write(self.path, data)

    def _read(self) -> list[SecretEntry]:
        data = self._load()
        if data is None:
            return []
        entries, self._defaults = read_entries(data, str(self.path))
        return entries

    def reload(self) -> None:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        self._by_id = {e.id: e for e in self._read()}
        self._stamp = stamp
        self._checked = -math.inf  # the next maybe_reload (on trio's clock) looks again
        self.generation += 1

    def next_expiry(self, now: float) -> float:
        """The Unix time the next entry expires after ``now`` (inf: none will)."""
        times = [_parse_iso(e.expires) for e in self._by_id.values() if e.expires]
        return min((x for x in times if x > now), default=math.inf)

    def maybe_reload(self) -> None:
        """Re-read the file if it changed (cheap: one stat at most every RELOAD_INTERVAL of
        trio's clock; call it from trio). A file that cannot be read keeps the last good
        entries in force: said once at error level, and in :attr:`reload_error` until a good
        file is read."""
        now = trio.current_time()
        if now - self._checked < RELOAD_INTERVAL:
            return
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp and stamp != self._bad_stamp:
            try:
                self.reload()
            except ConfigError as exc:
                self._bad_stamp = stamp
                self.reload_error = str(exc)
                log.error(
                    "%s cannot be read, the %d entries read before stay in force until it "
                    "is fixed: %s",
                    self.path,
                    len(self._by_id),
                    exc,
                )
            else:
                if self.reload_error is not None:
                    log.info("%s is readable again (%d entries)", self.path, len(self._by_id))
                self.reload_error, self._bad_stamp = None, False
        self._checked = now

    def entries(self) -> list[SecretEntry]:
        """Every entry in the file, expired and revoked ones included, oldest first."""
        return sorted(self._by_id.values(), key=lambda e: e.created)

    def get(self, ident: str) -> SecretEntry | None:
        return self._by_id.get(ident)

    def entries_named(self, name: str) -> list[SecretEntry]:
        """The entries named ``name`` (a key's secrets: rotated, revoked), oldest first,
        without going through every entry (an index built once per version of the entries)."""
        by_id = self._by_id
        built_from, index = self._by_name
        if built_from is not by_id:
            index = {}
            for e in sorted(by_id.values(), key=lambda e: e.created):
                index.setdefault(e.name, []).append(e)
            self._by_name = (by_id, index)
        return index.get(name, [])

    @property
    def defaults(self) -> KeyLimits:
        """The file's ``[defaults]`` limits (for every key that does not set its own)."""
        return self._defaults

    def limits_for(self, entry: SecretEntry) -> KeyLimits:
        if self._defaults == _NO_LIMITS:  # the common case: nothing to merge
            return entry.limits
        return entry.limits.merged_over(self._defaults)

    def active_ids(self) -> set[str]:
        """Ids of the entries that are valid now (neither expired nor revoked)."""
        now = time.time()  # wall clock
        return {e.id for e in self._by_id.values() if e.usable(now)}

    def __len__(self) -> int:
        return len(self._by_id)

    def lookup(self, presented: str) -> SecretEntry | None:
        """The entry whose secret was presented, expired or revoked or not (the caller tells
        them apart: :meth:`SecretEntry.usable`), or None. Constant time in the secret."""
        self.maybe_reload()
        if not presented or len(presented) > MAX_PRESENTED:
            return None
        ident = secret_id(presented)
        entry = self._by_id.get(ident) if ident is not None else None
        expected = entry.sha256 if entry is not None else "0" * 64
        ok = hmac.compare_digest(_digest(presented), expected)
        return entry if ok else None

    def verify(self, presented: str) -> SecretEntry | None:
        """The valid (not expired, not revoked) entry matching a presented secret, or None."""
        entry = self.lookup(presented)
        if entry is None or not entry.usable():
            return None
        return entry

    # -- writing (CLI) --
    def _write(self, entries: list[SecretEntry], defaults: KeyLimits | None = None) -> None:
        """Write ``entries``: an expired one stays (listed as expired, its user told so, it
        can be extended) unless a newer entry of its name replaced it (an expired key added
        again); a revoked one, and a rotation's old secret, stay REVOKED_KEPT."""
        now = time.time()  # wall clock
        live = [e for e in entries if not e.revoked]
        last = {e.name: i for i, e in enumerate(live)}  # entries come oldest first
        keep = [
            e
            for e in entries
            if (
                _parse_iso(e.revoked) > now - REVOKED_KEPT
                if e.revoked
                else max(_parse_iso(e.replaced), _parse_iso(e.expires)) > now - REVOKED_KEPT
                if e.replaced and e.expired(now)
                else not e.expired(now) or e is live[last[e.name]]
            )
        ]
        doc: dict[str, Any] = {}
        defaults_doc = _limits_toml(self._defaults if defaults is None else defaults)
        if defaults_doc:
            doc["defaults"] = defaults_doc
        doc["keys"] = [_as_toml(e) for e in keep]
        header = b"# Managed by trio-bridge: SHA-256 hashes only. Edit with the CLI.\n"
        self._save(header + tomli_w.dumps(doc).encode())
        self.reload()

    @_locked
    def add(
        self,
        name: str,
        *,
        routes: tuple[str, ...] = (),
        limits: KeyLimits | None = None,
        expires: str = "",
    ) -> tuple[SecretEntry, str]:
        """Create a secret named ``name``; returns (entry, the secret to show once).
        ``routes``: what a connector token may serve (default: the default route)."""
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"invalid name {name!r} (letters, digits, '-', '_', '.')")
        self.reload()
        if any(e.name == name and e.usable() for e in self._by_id.values()):
            raise ConfigError(
                f"{self.path}: {name!r} exists already (revoke it first, or rotate it)"
            )
        return self._new(name, routes, self.entries(), limits or KeyLimits(), expires)

    def _new(
        self,
        name: str,
        routes: tuple[str, ...],
        keep: list[SecretEntry],
        limits: KeyLimits | None = None,
        expires: str = "",
    ) -> tuple[SecretEntry, str]:
        ident, secret = new_secret(self.prefix)
        entry = SecretEntry(
            name=name,
            id=ident,
            sha256=_digest(secret),
            created=_iso(_now()),
            routes=routes,
            limits=limits or KeyLimits(),
            expires=expires,
        )
        self._write([*keep, entry])
        return entry, secret

    @_locked
    def set_limits(self, name: str, changes: dict[str, Any]) -> SecretEntry:
        """Change some limits (``None`` clears one) or the expiry of the key ``name``. A
        rotation's old secret (replaced) can only end sooner: named by its id, a later end
        is refused; by the key's name, the change ends it too if sooner, never later."""
        changes = dict(changes)  # a change made again (lost write) needs the caller's whole
        self.reload()
        named = self._named(name)
        # the valid entries of that name; if it has only expired ones, its newest (extend it)
        matches = [e for e in named if not e.expired()] or named[-1:]
        expires = changes.pop("expires", None)
        for e in matches:
            if (
                e.replaced
                and e.id == name
                and expires is not None
                and sooner(e.expires, expires) != expires
            ):
                raise ConfigError(
                    f"{self.path}: key {e.id} was replaced by a rotation at {e.replaced}: "
                    f"its old secret can only end sooner than {e.expires or 'never'} "
                    "(use the new key, or add one)"
                )
        updated = []
        for e in self.entries():
            if e in matches:
                e = attrs.evolve(e, limits=attrs.evolve(e.limits, **changes))
                if expires is not None:
                    e = attrs.evolve(
                        e, expires=sooner(e.expires, expires) if e.replaced else expires
                    )
            updated.append(e)
        self._write(updated)
        changed = next(e for e in updated if e.id == matches[-1].id)
        # the write may drop it (expired, a newer entry of its name exists): as written
        return next((e for e in self.entries() if e.id == changed.id), changed)

    @_locked
    def set_defaults(self, changes: dict[str, Any]) -> KeyLimits:
        self.reload()
        defaults = attrs.evolve(self._defaults, **changes)
        self._write(self.entries(), defaults)
        return self._defaults

    @_locked
    def set_routes(self, name: str, routes: tuple[str, ...]) -> list[SecretEntry]:
        """Bind the entries named ``name`` to ``routes`` (connector tokens)."""
        self.reload()
        named = self._named(name)
        self._write([attrs.evolve(e, routes=routes) if e in named else e for e in self.entries()])
        return [e for e in self.entries() if e.name == name and not e.revoked]

    @_locked
    def rotate(self, name: str, grace: float) -> tuple[SecretEntry, str, str]:
        """A new secret for ``name`` (same routes); the current one stays valid for ``grace``
        seconds. Returns (new entry, the secret to show once, when the old one expires)."""
        self.reload()
        named = [e for e in self._named(name) if e.name == name]
        current = [e for e in named if not e.expired()] or named[-1:]  # an expired key too
        if not current:
            raise ConfigError(f"{self.path}: no entry named {name!r}")
        until = _iso(_now() + dt.timedelta(seconds=grace))
        now = _iso(_now())
        entries = [  # the others stay as they are (a revoked one of the name too)
            attrs.evolve(e, expires=sooner(e.expires, until), replaced=e.replaced or now)
            if e in current
            else e
            for e in self.entries()
        ]
        # the new secret keeps the key's end (an operator's trial, a portal user's key): a
        # rotation never lengthens a key's life; an end already passed is not kept (rotating
        # an expired key is how the CLI gives it a new start)
        ends = current[-1].expires if not current[-1].expired() else ""
        entry, secret = self._new(name, current[-1].routes, entries, current[-1].limits, ends)
        return entry, secret, until

    @_locked
    def revoke(self, name: str) -> SecretEntry:
        """Revoke every unrevoked entry named ``name`` (or with that id): they stay in the
        file marked revoked (REVOKED_KEPT), so lists and refusals can name them."""
        self.reload()
        matches = self._named(name)
        when = _iso(_now())
        self._write([attrs.evolve(e, revoked=when) if e in matches else e for e in self.entries()])
        return attrs.evolve(matches[-1], revoked=when)  # the newest (a rotation's new key)

    def _named(self, name: str) -> list[SecretEntry]:
        """The unrevoked entries named ``name`` (or with that id), oldest first; a
        ConfigError that says why if there is none."""
        named = [e for e in self.entries() if name in (e.name, e.id)]
        if not named:
            raise ConfigError(f"{self.path}: no entry named {name!r}")
        matches = [e for e in named if not e.revoked]
        if not matches:
            raise ConfigError(
                f"{self.path}: {name!r} was revoked at {named[-1].revoked}; a revoked secret "
                "never works again: add a new one"
            )
        return matches


_FIELDS = ("name", "id", "sha256", "created")


def read_entries(data: dict[str, Any], where: str) -> tuple[list[SecretEntry], KeyLimits]:
    """The entries and the ``[defaults]`` of a keys document (its TOML, parsed); a
    ConfigError that names ``where`` and the entry if one is wrong."""
    entries = []
    for i, item in enumerate(data.get("keys", [])):
        try:
            fields = {k: str(item[k]) for k in _FIELDS}
            routes = item.get("routes", [])
            if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
                raise TypeError
            expires = str(item.get("expires", ""))
            if expires:
                _parse_iso(expires)
            revoked = str(item.get("revoked", ""))
            replaced = str(item.get("replaced", ""))
            for when in (revoked, replaced):
                if when:
                    _parse_iso(when)
            limits = limits_from(item, f"{where}: keys.{i}")
            entries.append(
                SecretEntry(
                    **fields,
                    routes=tuple(routes),
                    expires=expires,
                    limits=limits,
                    revoked=revoked,
                    replaced=replaced,
                )
            )
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"{where}: keys.{i}: needs {', '.join(_FIELDS)} "
                "(routes: a list of strings; expires, revoked, replaced: ISO times)"
            ) from None
    return entries, limits_from(data.get("defaults", {}), f"{where}: defaults")


def _as_toml(e: SecretEntry) -> dict[str, Any]:
    doc: dict[str, Any] = {k: getattr(e, k) for k in _FIELDS}
    if e.routes:
        doc["routes"] = list(e.routes)
    if e.expires:
        doc["expires"] = e.expires
    if e.revoked:
        doc["revoked"] = e.revoked
    if e.replaced:
        doc["replaced"] = e.replaced
    doc.update(_limits_toml(e.limits))
    return doc


_NO_LIMITS = KeyLimits()
_COUNTS = ("concurrency", "rpm", "tokens_per_minute", "tokens_per_day")


def _limits_toml(limits: KeyLimits) -> dict[str, Any]:
    doc: dict[str, Any] = {k: getattr(limits, k) for k in _COUNTS if getattr(limits, k) is not None}
    if limits.models:
        doc["models"] = list(limits.models)
    if limits.priority != 1:
        doc["priority"] = limits.priority
    return doc


def limits_from(item: dict[str, Any], where: str) -> KeyLimits:
    """Limits from a keys-file table (an entry or ``[defaults]``); ConfigError naming the key."""
    values: dict[str, Any] = {}
    for k in _COUNTS:
        v = item.get(k)
        if v is not None:
            if type(v) is not int or v < 1:
                raise ConfigError(f"{where}.{k}: expected a positive integer, got {v!r}")
            values[k] = v
    models = item.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{where}.models: expected a list of model names (globs)")
    priority = item.get("priority", 1)
    if type(priority) is not int or not 1 <= priority <= 100:
        raise ConfigError(f"{where}.priority: expected an integer from 1 to 100, got {priority!r}")
    return KeyLimits(models=tuple(models), priority=priority, **values)


def admin_token(config: Any, token_file: str) -> str | None:
    """The admin pages' token: ``TRIO_BRIDGE_ADMIN_TOKEN``, else ``token_file`` (mode 0600),
    else None (no token: the admin endpoint relies on listening on loopback)."""
    token = os.environ.get("TRIO_BRIDGE_ADMIN_TOKEN")
    if token:
        return token
    if not token_file:
        return None
    path: Path = config.path(token_file)
    check_private(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"admin_token_file: {path}: no such file") from None
    if not token:
        raise ConfigError(f"admin_token_file: {path} is empty")
    return token

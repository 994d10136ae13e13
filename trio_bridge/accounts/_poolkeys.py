"""A pool's API keys: the keys file's document, kept in the store (SHA-256 hashes only), read
and replaced whole (:func:`fetch_keys`, :func:`put_keys`), and :class:`PoolKeys`, the
:class:`SecretStore` over it that connectors and the CLI use.

Revocations are monotonic. Each document a box reads from the store is merged with the one
it held (:func:`merge`): a key it knows revoked stays revoked, whatever the store's document
says, a key it knows replaced by a rotation stays replaced (its old secret ends when the
rotation said), and the keys (or a rotation's new key) it knows that the store's document
lacks are put back, so that a store that restarted empty and took the keys back from a box
that had missed changes (a revocation, a key added, a rotation) gets them again from the
boxes that saw them; the store's document wins for everything else (its own additions,
limits, defaults).
What the store's document lacks is written back by the box (:class:`PoolStore` in
``accounts/_pool.py``: compare-and-set on the version it read; a lost race merges again with
the next sync). In order, the documents the ``keys`` commands write never lack anything a box
knows (no command takes a usable key out of the document: a rotation keeps the old secret,
marked replaced, beside the new one; a revoked or replaced one leaves it REVOKED_KEPT after),
so a box that follows them writes nothing. A key edited out of the document by hand comes back
from the boxes that hold it: ``keys revoke`` is how a key leaves the pool.

Only keys still valid, or revoked within REVOKED_KEPT, are put back, and keys of the first
kind only by a box that read the store's document less than REVOKED_KEPT ago (else a key
revoked and dropped from the document meanwhile would come back from it). A revocation that
every live box has forgotten (REVOKED_KEPT after it) is not protected."""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import (
    REVOKED_KEPT,
    ChangedMeanwhile,
    SecretEntry,
    SecretStore,
    _as_toml,
    _limits_toml,
    _locked,
    _parse_iso,
    read_entries,
    sooner,
)
from trio_bridge.accounts._limits import KeyLimits
from trio_bridge.accounts._poolscripts import KEYS_DOC, KEYS_VERSION, PUT_KEYS

log = logging.getLogger("trio_bridge.pool")


async def fetch_keys(client: Any) -> tuple[bytes | None, bytes]:
    """The keys document and its version (b"" when there is none), read together (one MGET:
    a write between two reads would pair a document with another's version, and a change
    made from it would then win its compare-and-set against the newer one)."""
    doc, version = await client.mget((KEYS_DOC, KEYS_VERSION))
    return doc, version or b""


async def put_keys(client: Any, data: bytes, version: bytes) -> int:
    """Replace the keys document if its version is still ``version``: the new version, or
    -1 if another write came first."""
    script = client.register_script(PUT_KEYS)
    keys = (KEYS_DOC, KEYS_VERSION, KEYS_VERSION + ":n")
    return int(await script(keys=keys, args=(data, version, secrets.token_hex(8))))


@attrs.frozen
class Lacking:
    """What the store's keys document lacked that a box knew (key ids; public): the
    revocations it had undone, the keys it had lost (added before, or a rotation's new
    key: the rotated ones as the box knew them), or the whole document (the store held
    none)."""

    revoked: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    whole: bool = False
    #: the old secrets of rotations it had lost (marked replaced again, ending as then)
    replaced: tuple[str, ...] = ()


def merge(
    theirs: dict[str, SecretEntry], ours: dict[str, SecretEntry], *, fresh: bool, now: float
) -> tuple[dict[str, SecretEntry], Lacking | None]:
    """The store's entries (``theirs``) with what a box's (``ours``) knows that they lack,
    and what that was (None: nothing). Revoked stays revoked: an entry ``ours`` holds
    revoked is revoked in the result (one ``theirs`` dropped comes back, while
    REVOKED_KEPT): a revoked entry can never make a key usable, so putting it back is always
    safe. Replaced stays replaced, and ends at the soonest end known: a rotation's old
    secret can only end sooner (``SecretStore.set_limits`` refuses a later end), so an
    entry ``ours`` holds replaced is replaced in the result, ending at the earlier of the
    two ends, whichever box saw which change and in whatever order they come back. An
    entry ``theirs`` holds unreplaced is a rotation the store lost (its document is older:
    a store restarted empty, an old backup imported). One ``theirs`` dropped does not come
    back (dropped by hand, or by an older version's write: ended either way). If ``fresh``
    (``ours`` was read from the store within REVOKED_KEPT), a usable entry comes back if
    ``theirs`` holds no entry of its name at all (a key added that the store lost), or if
    its name's rotation was lost (the rotation's new secret). Nothing else of ``ours`` is
    taken: where ``theirs`` holds a name, its entries win."""
    out = dict(theirs)
    replaced: list[str] = []
    rotated: set[str] = set()  # names whose rotation the store lost
    for e in ours.values():
        have = out.get(e.id)
        if not e.replaced or have is None or have.revoked:
            continue
        ends = sooner(have.expires, e.expires)
        if have.replaced and ends == have.expires:
            continue
        if not have.replaced:
            rotated.add(e.name)
        out[e.id] = attrs.evolve(have, replaced=have.replaced or e.replaced, expires=ends)
        replaced.append(e.id)
    added: list[str] = []
    if fresh:
        names = {t.name for t in theirs.values()}
        for e in ours.values():
            if e.id not in theirs and e.usable(now) and (e.name not in names or e.name in rotated):
                out[e.id] = e
                added.append(e.id)
    revoked: list[str] = []
    for e in ours.values():
        if not e.revoked:
            continue
        have = out.get(e.id)
        if have is None:
            if _parse_iso(e.revoked) > now - REVOKED_KEPT:  # what SecretStore._write keeps
                out[e.id] = e
                revoked.append(e.id)
        elif not have.revoked:
            out[e.id] = attrs.evolve(have, revoked=e.revoked)
            revoked.append(e.id)
    if not added and not revoked and not replaced:  # (an entry of ours comes with one added)
        return theirs, None
    return out, Lacking(
        revoked=tuple(sorted(revoked)),
        added=tuple(sorted(added)),
        replaced=tuple(sorted(replaced)),
    )


def document(entries: list[SecretEntry], defaults: KeyLimits) -> bytes:
    """A keys document, as :meth:`SecretStore._write` writes one (without its trimming)."""
    doc: dict[str, Any] = {}
    if defaults_doc := _limits_toml(defaults):
        doc["defaults"] = defaults_doc
    doc["keys"] = [_as_toml(e) for e in sorted(entries, key=lambda e: e.created)]
    header = b"# Managed by trio-bridge: SHA-256 hashes only. Edit with the CLI.\n"
    return header + tomli_w.dumps(doc).encode()


def parse_keys(doc: bytes, where: str) -> tuple[dict[str, SecretEntry], KeyLimits]:
    """The entries (by id) and defaults of a keys document (a ConfigError if it cannot be
    read): the one parse of each version a box reads (a second of CPU for 20 000 keys)."""
    import tomllib

    try:
        data = tomllib.loads(doc.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: the keys document is invalid: {exc}") from None
    entries, defaults = read_entries(data, where)
    return {e.id: e for e in entries}, defaults


@attrs.frozen(eq=False)
class Held:
    """A version of the keys document as a box holds it: the document (None: the store held
    none), its version, its entries by id and defaults (never changed in place), and what
    the store's document of that version lacks (None: nothing; to be written back)."""

    doc: bytes | None = None
    version: bytes = b""
    by_id: dict[str, SecretEntry] = attrs.field(factory=dict)
    defaults: KeyLimits = KeyLimits()
    lacking: Lacking | None = None


@attrs.frozen(eq=False)
class Base:
    """What a document read is merged with (:meth:`PoolKeys.prepare`, on any thread): the
    version held, whether what it holds may be written back (:func:`merge`'s ``fresh``),
    and how many versions were put in force before (another since: this one is stale)."""

    held: Held
    fresh: bool
    count: int


class PoolKeys(SecretStore):
    """The API keys of a pool: the keys file's document, kept in the store (hashes only).

    In a connector, :class:`PoolStore` gives it each new version it read (:meth:`prepare` in
    a worker thread, then :meth:`install`), and ``fetch`` and ``put`` work from trio's worker
    threads (the portal changes keys there); for the CLI they are each a short ``trio.run``.
    ``fetch`` may return None (nothing read: the document in force stays). ``path`` is the
    store's address (no password).

    Each document read is merged with the one in force (:func:`merge`): :attr:`lacking`
    then says what the store's document lacks (None: nothing), for the caller to write
    back; a change made here (the portal's) writes it along.

    Threads: a change (:meth:`SecretStore.changing`: :attr:`lock`) reads the store's
    document itself and writes by compare-and-set on the version it read; a version the
    sync read is not put in force while a change holds the lock (:meth:`install` does not
    wait for it: a change holds it across ``trio.from_thread.run``), so what a change was
    made from stays in force until its write. A write that lost (the store's version moved
    on meanwhile) is :class:`ChangedMeanwhile`: the change is made again on the new one."""

    def __init__(
        self,
        where: str,
        *,
        fetch: Callable[[], tuple[bytes | None, bytes] | None] | None = None,
        put: Callable[[bytes, bytes], int] | None = None,
    ) -> None:
        self._fetch, self._put = fetch, put
        self._held = Held()
        self._count = 0  # versions put in force
        #: per thread: the version its change was read at (what its write compares with)
        self._read_at_version = threading.local()
        #: a version that could not be read (not read again: a fixed document is a new one)
        self._unreadable: bytes | None = None
        self.loaded = False
        #: when (wall clock) the document in force was last the store's, in full
        self.read_at = -math.inf
        super().__init__(Path(), "tbk")
        self.path = where  # type: ignore[assignment]  # a name in messages, not a file

    def _save(self, data: bytes) -> None:
        if self._put is None:
            raise ConfigError(f"{self.path}: keys are changed with the CLI, not by a connector")
        version = getattr(self._read_at_version, "version", self._held.version)
        if self._put(data, version) < 0:
            raise ChangedMeanwhile(
                f"{self.path}: the keys changed meanwhile (another `keys` command); run it again"
            )
        self.written()

    def reload(self) -> None:
        """Read the store's document and put it in force, merged. A change reads it first,
        under the lock: its write compares the store's version with the one read here, and
        no other version is put in force until then."""
        base = self.base()
        fetched = self._fetch() if self._fetch is not None else None
        if fetched is None:  # the document in force stays
            self._read_at_version.version = base.held.version
            return
        doc, version = fetched
        held = self.prepare(doc, version, base)
        with self.lock:
            if self._count == base.count:  # (else another thread put one in force: it stays)
                self._put_in_force(held)
            self._read_at_version.version = self._held.version

    def base(self) -> Base:
        """What a document read now is merged with (see :class:`Base`)."""
        held = self._held
        fresh = held.doc is not None and time.time() - self.read_at < REVOKED_KEPT  # wall clock
        return Base(held, fresh, self._count)

    @property
    def fresh(self) -> bool:
        """The document in force was the store's less than REVOKED_KEPT ago: what it holds
        that the store's lacks may be written back (see :func:`merge`)."""
        return self.base().fresh

    @property
    def held(self) -> Held:
        return self._held

    def wants(self, version: bytes) -> bool:
        """The store's version (polled): is its document to be read? (A new version, or none
        read yet; not one that could not be read.)"""
        if version == self._unreadable:
            return False
        return version != self._held.version or not self.loaded

    def confirm(self, version: bytes) -> None:
        """The store's version (polled) is the one in force: the document is current."""
        held = self._held
        if version == held.version and held.lacking is None:
            self.read_at = time.time()  # wall clock

    def prepare(self, doc: bytes | None, version: bytes, base: Base) -> Held:
        """The store's document ``doc`` of ``version``, merged with ``base`` (a ConfigError if
        it cannot be read). Parsed once, and not at all if it is the document held; touches
        nothing of this object's but its name (a worker thread may run it)."""
        ours = base.held
        if ours.doc is not None and doc == ours.doc:
            return attrs.evolve(ours, version=version, lacking=None)
        if doc is None:
            if ours.doc is None:
                return Held(version=version)
            if base.fresh:  # the store lost the document: ours goes back
                return attrs.evolve(ours, version=version, lacking=Lacking(whole=True))
            log.warning(
                "pool store %s holds no keys document; the %d keys this connector last read "
                "are older than the revocations the document keeps: not written back "
                "(`trio-bridge keys import` fills it)",
                self.path,
                len(ours.by_id),
            )
            return Held(version=version)
        theirs, defaults = parse_keys(doc, str(self.path))
        if ours.doc is None:
            return Held(doc, version, theirs, defaults)
        now = time.time()  # wall clock
        merged, lacking = merge(theirs, ours.by_id, fresh=base.fresh, now=now)
        if lacking is None:
            return Held(doc, version, theirs, defaults)
        return Held(document(list(merged.values()), defaults), version, merged, defaults, lacking)

    def _put_in_force(self, held: Held) -> None:
        """A readable version in force (under the lock; the sync's or a change's own read):
        whatever said the keys could not be read is over."""
        self._held = held
        self._by_id, self._defaults = held.by_id, held.defaults
        self._count += 1
        self.generation += 1
        if held.lacking is None:
            self.read_at = time.time()  # wall clock
        self._unreadable = None
        self.loaded = True
        if self.reload_error is not None:
            log.info("pool keys readable again (%d entries)", len(self._by_id))
        self.reload_error = None

    def install(self, held: Held, base: Base) -> bool:
        """Put in force a version the sync read and :meth:`prepare` merged with ``base``
        (the trio thread). Not if a change holds the lock (it reads the store itself), nor if
        another version was put in force since ``base``: False, the next sync reads again."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self._count != base.count:
                return False
            self._put_in_force(held)
        finally:
            self.lock.release()
        return True

    def unreadable(self, exc: ConfigError, version: bytes) -> None:
        """The document of ``version`` cannot be read: the last good keys stay in force
        (said once, and in :attr:`reload_error`); that version is not read again."""
        self._unreadable = version
        if self.reload_error != str(exc):
            log.error("pool keys cannot be read, the last good ones stay in force: %s", exc)
        self.reload_error = str(exc)

    def apply(self, doc: bytes | None, version: bytes) -> bool:
        """A version of the document read from the store, merged and put in force here and
        now (:meth:`prepare` and :meth:`install`); False if it was not."""
        base = self.base()
        try:
            held = self.prepare(doc, version, base)
        except ConfigError as exc:
            self.unreadable(exc, version)
            return False
        return self.install(held, base)

    def written(self, held: Held | None = None) -> None:
        """What the store's document of ``held`` (default: the one in force) lacked was
        written to it (the caller's compare-and-set won): said in one line (key ids only),
        and no longer lacking if ``held`` is still in force (the sync's write-back) or the
        caller holds the lock (a change's write)."""
        held = self._held if held is None else held
        lacking = held.lacking
        if lacking is None:
            return
        if self.lock.acquire(blocking=False):
            try:
                if self._held is held:
                    self._held = attrs.evolve(held, lacking=None)
            finally:
                self.lock.release()
        if lacking.whole:
            log.warning(
                "pool store %s held no keys document: the %d keys last read were written back",
                self.path,
                len(held.by_id),
            )
            return
        said = []
        if lacking.revoked:
            said.append(f"the revocation of key {', '.join(lacking.revoked)} restored")
        if lacking.replaced:
            said.append(
                f"the rotation of key {', '.join(lacking.replaced)} restored (the old secret "
                "ends as it did)"
            )
        if lacking.added:
            said.append(f"key {', '.join(lacking.added)} (added before it lost them) restored")
        log.warning(
            "pool store %s: its keys document lacked what this connector knew, written back: "
            "%s (a revoked key never works again)",
            self.path,
            "; ".join(said),
        )

    def maybe_reload(self) -> None:
        """Nothing to look at: :class:`PoolStore` applies new versions as it reads them."""

    @property
    def lacking(self) -> Lacking | None:
        """What the store's document lacks that the one in force holds (to be written back)."""
        return self._held.lacking

    @property
    def version(self) -> bytes:
        return self._held.version

    @_locked
    def merge(self, entries: list[SecretEntry], defaults: KeyLimits) -> list[SecretEntry]:
        """Add the ``entries`` whose ids it does not hold (``keys import``); ``defaults``
        apply if it has none. Returns the entries added."""
        self.reload()
        have = {e.id for e in self.entries()}
        new = [e for e in entries if e.id not in have]
        held = {e.name for e in self.entries() if e.usable()}
        if clash := sorted({e.name for e in new if e.usable() and e.name in held}):
            raise ConfigError(  # one name, one key: its limits count under its name
                f"{self.path}: the store already holds a usable key named "
                f"{', '.join(map(repr, clash))} (another id): two people would share its "
                "limits and usage; revoke one of them (or give it another name), then import again"
            )
        mine = self.defaults if self.defaults != KeyLimits() else defaults
        if new or mine != self.defaults:
            self._write([*self.entries(), *new], mine)
        return new

    @property
    def document(self) -> bytes | None:
        """The document in force (None before one was read)."""
        return self._held.doc

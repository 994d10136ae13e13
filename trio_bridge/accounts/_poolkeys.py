"""A pool's API keys: the keys file's document, kept in the store (SHA-256 hashes only), read
and replaced whole (:func:`fetch_keys`, :func:`put_keys`), and :class:`PoolKeys`, the
:class:`SecretStore` over it that connectors and the CLI use.

Revocations are monotonic. Each document a box reads from the store is merged with the one
it held (:func:`merge`): a key it knows revoked stays revoked, whatever the store's document
says, and the keys (or a rotation's new key) it knows that the store's document lacks are
put back, so that a store that restarted empty and took the keys back from a box that had
missed changes (a revocation, a key added, a rotation) gets them again from the boxes that
saw them; the store's document wins for everything else (its own additions, limits,
defaults; but the entries of a rotation it missed are taken as the box holds them).
What the store's document lacks is written back by the box (:class:`PoolStore` in
``accounts/_pool.py``: compare-and-set on the version it read; a lost race merges again with
the next sync). In order, the documents the ``keys`` commands write never lack anything a box
knows (no command takes a usable key out of the document but a rotation, whose new key of
the same name comes in by the same write; a revoked one leaves it after REVOKED_KEPT), so a
box that follows them writes nothing. A key edited out of the document by hand comes back
from the boxes that hold it: ``keys revoke`` is how a key leaves the pool.

Only keys still valid, or revoked within REVOKED_KEPT, are put back, and keys of the first
kind only by a box that read the store's document less than REVOKED_KEPT ago (else a key
revoked and dropped from the document meanwhile would come back from it). A revocation that
every live box has forgotten (REVOKED_KEPT after it) is not protected."""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import (
    REVOKED_KEPT,
    SecretEntry,
    SecretStore,
    _as_toml,
    _limits_toml,
    _parse_iso,
)
from trio_bridge.accounts._limits import KeyLimits
from trio_bridge.accounts._poolscripts import KEYS_DOC, KEYS_VERSION, PUT_KEYS

log = logging.getLogger("trio_bridge.pool")


async def fetch_keys(client: Any) -> tuple[bytes | None, bytes]:
    """The keys document and its version (b"" when there is none)."""
    return await client.get(KEYS_DOC), (await client.get(KEYS_VERSION)) or b""


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


def merge(
    theirs: dict[str, SecretEntry], ours: dict[str, SecretEntry], *, fresh: bool, now: float
) -> tuple[dict[str, SecretEntry], Lacking | None]:
    """The store's entries (``theirs``) with what a box's (``ours``) knows that they lack,
    and what that was (None: nothing). Revoked stays revoked: an entry ``ours`` holds
    revoked is revoked in the result (one ``theirs`` dropped comes back, while
    REVOKED_KEPT): a revoked entry can never make a key usable, so putting it back is always
    safe. If ``fresh`` (``ours`` was read from the store within REVOKED_KEPT), a usable entry
    comes back only if ``theirs`` holds no entry of its name at all (a key added that the
    store lost). Nothing else of ``ours`` is taken: where ``theirs`` holds a name, its
    entries win, as an operator's end of a key during a rotation's grace drops the old entry
    (putting it back undid that). A rotation the store lost is therefore not restored."""
    out = dict(theirs)
    added: list[str] = []
    if fresh:
        names = {t.name for t in theirs.values()}
        for e in ours.values():
            if e.id not in theirs and e.usable(now) and e.name not in names:
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
    if not added and not revoked:  # (an entry taken from ours comes with one added)
        return theirs, None
    return out, Lacking(revoked=tuple(sorted(revoked)), added=tuple(sorted(added)))


def document(entries: list[SecretEntry], defaults: KeyLimits) -> bytes:
    """A keys document, as :meth:`SecretStore._write` writes one (without its trimming)."""
    doc: dict[str, Any] = {}
    if defaults_doc := _limits_toml(defaults):
        doc["defaults"] = defaults_doc
    doc["keys"] = [_as_toml(e) for e in sorted(entries, key=lambda e: e.created)]
    header = b"# Managed by trio-bridge: SHA-256 hashes only. Edit with the CLI.\n"
    return header + tomli_w.dumps(doc).encode()


class PoolKeys(SecretStore):
    """The API keys of a pool: the keys file's document, kept in the store (hashes only).

    In a connector, :meth:`apply` gives it each new version that :class:`PoolStore` read, and
    ``fetch`` and ``put`` work from trio's worker threads (the portal changes keys there);
    for the CLI they are each a short ``trio.run``. ``fetch`` may return None (nothing read:
    the document in force stays). ``path`` is the store's address (no password).

    Each document read is merged with the one in force (:func:`merge`): :attr:`lacking`
    then says what the store's document lacks (None: nothing), for the caller to write
    back; a change made here (the portal's) writes it along."""

    def __init__(
        self,
        where: str,
        *,
        fetch: Callable[[], tuple[bytes | None, bytes] | None] | None = None,
        put: Callable[[bytes, bytes], int] | None = None,
    ) -> None:
        self._fetch, self._put = fetch, put
        self._doc: bytes | None = None
        self._version = b""
        self.loaded = False
        #: what the store's document lacks that the one in force holds (to be written back)
        self.lacking: Lacking | None = None
        #: when (wall clock) the document in force was last the store's, in full
        self.read_at = -math.inf
        super().__init__(Path(), "tbk")
        self.path = where  # type: ignore[assignment]  # a name in messages, not a file

    def _load(self) -> dict[str, Any] | None:
        if self._doc is None:
            return None
        import tomllib

        try:
            return tomllib.loads(self._doc.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path}: the keys document is invalid: {exc}") from None

    def _save(self, data: bytes) -> None:
        if self._put is None:
            raise ConfigError(f"{self.path}: keys are changed with the CLI, not by a connector")
        version = self._put(data, self._version)
        if version < 0:
            raise ConfigError(
                f"{self.path}: the keys changed meanwhile (another `keys` command); run it again"
            )
        self.written()

    def reload(self) -> None:
        fetched = self._fetch() if self._fetch is not None else None
        if fetched is not None:
            self._take(*fetched)
        self._by_id = {e.id: e for e in self._read()}
        self.generation += 1

    @property
    def fresh(self) -> bool:
        """The document in force was the store's less than REVOKED_KEPT ago: what it holds
        that the store's lacks may be written back (see :func:`merge`)."""
        return self._doc is not None and time.time() - self.read_at < REVOKED_KEPT  # wall clock

    def confirm(self) -> None:
        """The store's version is still the one in force (polled): the document is current."""
        if self.lacking is None:
            self.read_at = time.time()  # wall clock

    def _take(self, doc: bytes | None, version: bytes) -> None:
        """Put the store's document ``doc`` in force, merged with the one in force (a
        ConfigError, and nothing changed, if ``doc`` cannot be read)."""
        ours, lacking = self._doc, None
        if ours is not None and doc != ours:
            if doc is None:
                if self.fresh:  # the store lost the document: ours goes back
                    doc, lacking = ours, Lacking(whole=True)
                else:
                    log.warning(
                        "pool store %s holds no keys document; the %d keys this connector "
                        "last read are older than the revocations the document keeps: not "
                        "written back (`trio-bridge keys import` fills it)",
                        self.path,
                        len(self._by_id),
                    )
            else:
                now = time.time()  # wall clock
                theirs, defaults = _entries(doc, str(self.path))
                merged, lacking = merge(theirs, self._by_id, fresh=self.fresh, now=now)
                if lacking is not None:
                    doc = document(list(merged.values()), defaults)
        self._doc, self._version, self.lacking = doc, version, lacking
        if lacking is None:
            self.read_at = time.time()  # wall clock

    def written(self) -> None:
        """What the store's document lacked was written to it (the caller's compare-and-set
        won): said in one line (key ids only)."""
        lacking, self.lacking = self.lacking, None
        if lacking is None:
            return
        if lacking.whole:
            log.warning(
                "pool store %s held no keys document: the %d keys last read were written back",
                self.path,
                len(self._by_id),
            )
            return
        said = []
        if lacking.revoked:
            said.append(f"the revocation of key {', '.join(lacking.revoked)} restored")
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

    def apply(self, doc: bytes | None, version: bytes) -> None:
        """A version of the document read from the store; one that cannot be read keeps the
        last good keys in force (said once, and in :attr:`reload_error`)."""
        old = self._doc, self._version, self.lacking, self.read_at
        try:
            self._take(doc, version)
            self.reload()
        except ConfigError as exc:
            self._doc, self._version, self.lacking, self.read_at = old
            if self.reload_error != str(exc):
                log.error("pool keys cannot be read, the last good ones stay in force: %s", exc)
            self.reload_error = str(exc)
        else:
            self.loaded = True
            if self.reload_error is not None:
                log.info("pool keys readable again (%d entries)", len(self._by_id))
            self.reload_error = None

    @property
    def version(self) -> bytes:
        return self._version

    def merge(self, entries: list[SecretEntry], defaults: KeyLimits) -> list[SecretEntry]:
        """Add the ``entries`` whose ids it does not hold (``keys import``); ``defaults``
        apply if it has none. Returns the entries added."""
        self.reload()
        have = {e.id for e in self.entries()}
        new = [e for e in entries if e.id not in have]
        mine = self.defaults if self.defaults != KeyLimits() else defaults
        if new or mine != self.defaults:
            self._write([*self.entries(), *new], mine)
        return new

    @property
    def document(self) -> bytes | None:
        """The document in force (None before one was read)."""
        return self._doc


def _entries(doc: bytes, where: str) -> tuple[dict[str, SecretEntry], KeyLimits]:
    """The entries (by id) and defaults of a keys document (ConfigError if unreadable)."""
    keys = PoolKeys(where)
    keys._doc = doc
    keys.reload()
    return keys._by_id, keys.defaults

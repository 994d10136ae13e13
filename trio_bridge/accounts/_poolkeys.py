"""A pool's API keys: the keys file's document, kept in the store (SHA-256 hashes only), read
and replaced whole (:func:`fetch_keys`, :func:`put_keys`), and :class:`PoolKeys`, the
:class:`SecretStore` over it that connectors and the CLI use."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import SecretEntry, SecretStore
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


class PoolKeys(SecretStore):
    """The API keys of a pool: the keys file's document, kept in the store (hashes only).

    In a connector, :meth:`apply` gives it each new version that :class:`PoolStore` read, and
    ``fetch`` and ``put`` work from trio's worker threads (the portal changes keys there);
    for the CLI they are each a short ``trio.run``. ``fetch`` may return None (nothing read:
    the document in force stays). ``path`` is the store's address (no password)."""

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

    def reload(self) -> None:
        fetched = self._fetch() if self._fetch is not None else None
        if fetched is not None:
            self._doc, self._version = fetched
        self._by_id = {e.id: e for e in self._read()}
        self.generation += 1

    def maybe_reload(self) -> None:
        """Nothing to look at: :class:`PoolStore` applies new versions as it reads them."""

    def apply(self, doc: bytes | None, version: bytes) -> None:
        """A version of the document read from the store; one that cannot be read keeps the
        last good keys in force (said once, and in :attr:`reload_error`)."""
        old = self._doc, self._version
        self._doc, self._version = doc, version
        try:
            self.reload()
        except ConfigError as exc:
            self._doc, self._version = old
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

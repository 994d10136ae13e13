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

:meth:`SecretStore.verify` compares digests with :func:`hmac.compare_digest`, and re-reads the
file when it changed (checked at most every ``RELOAD_INTERVAL`` seconds), so ``revoke`` takes
effect on a running process without a restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
import string
import time
import tomllib
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from ._errors import ConfigError

RELOAD_INTERVAL = 0.5
_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_LEN = 8
MAX_PRESENTED = 256  # longer presented keys are rejected before hashing


@attrs.frozen
class SecretEntry:
    name: str
    id: str
    sha256: str
    created: str


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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


class SecretStore:
    """Hashes of the secrets in one managed file; ``prefix`` is ``"tbk"`` or ``"tbc"``."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.prefix = prefix
        self._by_id: dict[str, SecretEntry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self.reload()

    # -- reading --
    def _read(self) -> list[SecretEntry]:
        check_private(self.path)
        try:
            with self.path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            return []
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{self.path}: invalid TOML: {exc}") from None
        entries = []
        for i, item in enumerate(data.get("keys", [])):
            try:
                entries.append(SecretEntry(**{k: str(item[k]) for k in _FIELDS}))
            except (KeyError, TypeError):
                raise ConfigError(f"{self.path}: keys.{i}: needs {', '.join(_FIELDS)}") from None
        return entries

    def reload(self) -> None:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        self._by_id = {e.id: e for e in self._read()}
        self._stamp = stamp
        self._checked = time.monotonic()

    def maybe_reload(self) -> None:
        """Re-read the file if it changed (cheap: one stat at most every RELOAD_INTERVAL)."""
        now = time.monotonic()
        if now - self._checked < RELOAD_INTERVAL:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            try:
                self.reload()
            except ConfigError:
                pass  # keep serving with the last good set; `check` reports the problem

    def entries(self) -> list[SecretEntry]:
        return sorted(self._by_id.values(), key=lambda e: e.created)

    def __len__(self) -> int:
        return len(self._by_id)

    def verify(self, presented: str) -> SecretEntry | None:
        """The entry matching a presented secret, or None. Constant time in the secret."""
        self.maybe_reload()
        if not presented or len(presented) > MAX_PRESENTED:
            return None
        ident = secret_id(presented)
        entry = self._by_id.get(ident) if ident is not None else None
        expected = entry.sha256 if entry is not None else "0" * 64
        ok = hmac.compare_digest(_digest(presented), expected)
        return entry if ok and entry is not None else None

    # -- writing (CLI) --
    def _write(self, entries: list[SecretEntry]) -> None:
        doc: dict[str, Any] = {"keys": [attrs.asdict(e) for e in entries]}
        header = b"# Managed by trio-bridge: SHA-256 hashes only. Edit with the CLI.\n"
        atomic_write(self.path, header + tomli_w.dumps(doc).encode())
        self.reload()

    def add(self, name: str) -> tuple[SecretEntry, str]:
        """Create a secret named ``name``; returns (entry, the secret to show once)."""
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"invalid name {name!r} (letters, digits, '-', '_', '.')")
        self.reload()
        if any(e.name == name for e in self._by_id.values()):
            raise ConfigError(f"{self.path}: {name!r} exists already (revoke it first)")
        ident, secret = new_secret(self.prefix)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        entry = SecretEntry(name=name, id=ident, sha256=_digest(secret), created=now)
        self._write([*self.entries(), entry])
        return entry, secret

    def revoke(self, name: str) -> SecretEntry:
        self.reload()
        matches = [e for e in self._by_id.values() if name in (e.name, e.id)]
        if not matches:
            raise ConfigError(f"{self.path}: no entry named {name!r}")
        self._write([e for e in self.entries() if e not in matches])
        return matches[0]


_FIELDS = ("name", "id", "sha256", "created")

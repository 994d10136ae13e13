"""Reaching a pool's store: the client of ``connector.store`` (password, TLS, timeouts) and
what a failed round trip raises, for the connector and the CLI alike."""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING

import trio

from trio_bridge._config import Config
from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import check_private

if TYPE_CHECKING:
    import coredis

#: a round trip to the store that takes longer counts as a failure
ROUND_TRIP_TIMEOUT = 1.0


def store_errors() -> tuple[type[BaseException], ...]:
    """What a failed round trip raises (coredis's errors, the transport's, anyio's)."""
    import anyio
    from coredis.exceptions import RedisError

    return (
        RedisError,
        OSError,
        anyio.BrokenResourceError,
        anyio.ClosedResourceError,
        anyio.EndOfStream,
        trio.TooSlowError,
    )


def store_client(config: Config) -> coredis.Redis[bytes]:
    """A client for ``connector.store`` (password: ``store_password_file``, the environment
    variable TRIO_BRIDGE_STORE_PASSWORD, or the URL; TLS for ``rediss://``, verified with
    ``store_ca_file`` or the system CAs). ConfigError without the [redis] extra."""
    c = config.connector
    try:
        import coredis
        from coredis.exceptions import ConnectionError as StoreConnectionError
        from coredis.retry import ConstantRetryPolicy
    except ImportError:
        raise ConfigError(
            "connector.store needs the Redis client: pip install 'trio-bridge[redis]'"
        ) from None
    import urllib.parse

    parts = urllib.parse.urlsplit(c.store)
    password = os.environ.get("TRIO_BRIDGE_STORE_PASSWORD") or None
    if password is None and c.store_password_file:
        path = config.path(c.store_password_file)
        check_private(path)
        try:
            password = path.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(f"connector.store_password_file: {path}: {exc.strerror}") from None
    if password is None and parts.password:
        password = urllib.parse.unquote(parts.password)
    context = None
    if parts.scheme == "rediss":
        cafile = str(config.path(c.store_ca_file)) if c.store_ca_file else None
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"connector.store_ca_file: {cafile}: {exc}") from None
    return coredis.Redis(
        host=parts.hostname,
        port=parts.port or 6379,
        db=int(parts.path.strip("/") or 0),
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=password,
        ssl=context is not None,
        ssl_context=context,
        connect_timeout=ROUND_TRIP_TIMEOUT,
        stream_timeout=max(ROUND_TRIP_TIMEOUT, 5.0),
        # once, at once: a connection of the pool that the store closed (it restarted) is
        # dropped and a new one dialled; a store that is down fails fast all the same
        retry_policy=ConstantRetryPolicy((StoreConnectionError,), 1, delay=0),
        client_name="trio-bridge",
    )


def why_failed(exc: BaseException) -> str:
    """A failure in one line: its type and the start of its message."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

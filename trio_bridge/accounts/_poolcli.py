"""The CLI's side of a pool's store: ``keys``, ``usage`` and ``keys import`` (synchronous: each
call one short ``trio.run`` on its own connection)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio

from trio_bridge._config import Config, redact_url
from trio_bridge._errors import ConfigError, leaves
from trio_bridge.accounts._poolclient import store_client, store_errors, why_failed
from trio_bridge.accounts._poolkeys import PoolKeys, fetch_keys, put_keys
from trio_bridge.accounts._poolscripts import IMPORT, PREFIX
from trio_bridge.accounts._poolusage import read_usage
from trio_bridge.accounts._usagestore import COLUMNS


class StoreCLI:
    """``keys``, ``usage`` and ``keys import`` on the pool's store, from the command line."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.where = redact_url(config.connector.store)

    def _run(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)`` in a short ``trio.run``; a store that cannot be reached is a
        ConfigError (one line, no password), however coredis raised it (its client raises
        from inside an exception group)."""
        errors: tuple[type[BaseException], ...] = (*store_errors(), BaseExceptionGroup)

        async def main() -> Any:
            client = store_client(self.config)
            async with client:
                with trio.fail_after(10):
                    return await fn(client)

        try:
            return trio.run(main)
        except errors as exc:
            found = leaves(exc)
            if not all(isinstance(e, store_errors()) for e in found):
                raise
            raise ConfigError(f"pool store {self.where}: {why_failed(found[0])}") from None

    def keys(self) -> PoolKeys:
        return PoolKeys(
            self.where,
            fetch=lambda: self._run(fetch_keys),
            put=lambda data, version: self._run(lambda c: put_keys(c, data, version)),
        )

    def usage_rows(self, since_day: str) -> list[dict[str, Any]]:
        return list(self._run(lambda c: read_usage(c, since_day)))

    def import_usage(self, rows: list[dict[str, Any]]) -> bool:
        """Add a usage file's rows to the pool's usage (False: nothing new, every row was
        imported before). The store keeps what it imported of each row (tb:imported): a row
        imported again adds only what it grew by since, so the same file, or the same file
        grown, never counts a request twice."""
        counts = [
            [r["day"], r["key_id"], r["model"], column, r[column]]
            for r in rows
            for column in COLUMNS
            if r[column]
        ]

        async def add(client: Any) -> bool:
            script = client.register_script(IMPORT)
            added = 0
            await trio.lowlevel.checkpoint()
            for i in range(0, len(counts), 1000):  # the store is not held long by one call
                chunk = json.dumps(counts[i : i + 1000]).encode()
                added += int(await script(keys=(PREFIX + "imported",), args=(PREFIX, chunk)))
            return added > 0

        return bool(self._run(add))

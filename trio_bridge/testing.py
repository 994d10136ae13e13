"""pytest-trio helpers for integrators (registered as a pytest plugin via ``pytest11``).

Fixtures:

- ``test_model`` → a running :class:`~trio_bridge.TestModel` (``.url``, ``.model``).
- ``bridge`` → a running in-process broker + connector in front of the test model, as a
  :class:`Bridge`: ``base_url`` (e.g. ``http://127.0.0.1:PORT/v1`` without ``/v1``),
  ``api_key``, and handles to the parts.

Or build your own with :func:`open_bridge`::

    async def test_my_client():
        async with open_bridge(upstream_url="http://127.0.0.1:11434") as b:
            ...  # call b.base_url with b.api_key

Everything runs on 127.0.0.1 with port 0 and is torn down structurally when the ``async
with`` block (or the test) ends.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from ._broker import Broker
from ._config import Config, ConnectorConfig, LimitsConfig, RelayConfig, structure
from ._connector import Connector
from ._keys import SecretStore
from ._testmodel import TestModel


@attrs.define
class RunningModel:
    model: TestModel
    url: str


@attrs.define
class Bridge:
    base_url: str  # http://127.0.0.1:PORT (the broker's public side)
    api_key: str
    broker: Broker
    connector: Connector
    keys: SecretStore
    upstream_url: str
    model: TestModel | None
    broker_scope: trio.CancelScope
    connector_scope: trio.CancelScope

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"


@asynccontextmanager
async def run_test_model(*, token_delay: float = 0.005) -> AsyncIterator[RunningModel]:
    """Serve a :class:`TestModel` on 127.0.0.1, port 0."""
    model = TestModel(token_delay=token_delay)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(model.serve)
        yield RunningModel(model, f"http://{host}:{port}")
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_bridge(
    upstream_url: str | None = None,
    *,
    limits: dict[str, Any] | None = None,
    relay: dict[str, Any] | None = None,
    connector: dict[str, Any] | None = None,
    broker: dict[str, Any] | None = None,
    token_delay: float = 0.005,
) -> AsyncIterator[Bridge]:
    """Start broker + connector in this process (and a test model if no ``upstream_url``).

    ``limits``, ``relay``, ``connector`` and ``broker`` override config sections, with the
    same keys and units as ``bridge.toml``.
    """
    with tempfile.TemporaryDirectory(prefix="trio-bridge-") as tmp:
        async with trio.open_nursery() as nursery:
            model: TestModel | None = None
            if upstream_url is None:
                model = TestModel(token_delay=token_delay)
                host, port = await nursery.start(model.serve)
                upstream_url = f"http://{host}:{port}"
            config = Config(
                base_dir=tmp,
                limits=structure(limits or {}, LimitsConfig, source="limits"),
                relay=structure(
                    {"ping_interval": "5s", **(relay or {})}, RelayConfig, source="relay"
                ),
            )
            config = attrs.evolve(
                config,
                broker=structure(
                    {"queue_timeout": "2s", **(broker or {})}, type(config.broker), source="broker"
                ),
            )
            tokens = SecretStore(Path(tmp) / "tokens.toml", "tbc")
            _, token = tokens.add("test-connector")
            keys = SecretStore(Path(tmp) / "keys.toml", "tbk")
            _, api_key = keys.add("test-user")

            b = Broker(config, tokens)
            broker_scope = trio.CancelScope()

            async def run_broker(*, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                with broker_scope:
                    await b.serve("127.0.0.1:0", task_status=task_status)

            bhost, bport = await nursery.start(run_broker)
            base_url = f"http://{bhost}:{bport}"
            config = attrs.evolve(
                config,
                connector=structure(
                    {
                        "broker_urls": [f"ws://{bhost}:{bport}{config.broker.relay_path}"],
                        "local_url": upstream_url,
                        "name": "test-connector",
                        **(connector or {}),
                    },
                    ConnectorConfig,
                    source="connector",
                ),
            )
            c = Connector(config, keys=keys, token=token)
            connector_scope = trio.CancelScope()
            connector_done = trio.Event()

            async def run_connector() -> None:
                try:
                    with connector_scope:
                        await c.run()
                finally:
                    connector_done.set()

            nursery.start_soon(run_connector)
            with trio.fail_after(10):
                await c.connected.wait()
                while not b.registry.relays():  # noqa: ASYNC110
                    await trio.sleep(0.005)
            yield Bridge(
                base_url, api_key, b, c, keys, upstream_url, model, broker_scope, connector_scope
            )
            # Connector first, so its relay closes cleanly while the broker still answers.
            c.stop()
            with trio.move_on_after(5):
                await connector_done.wait()
            nursery.cancel_scope.cancel()


@pytest.fixture
async def test_model() -> AsyncIterator[RunningModel]:
    async with run_test_model() as running:
        yield running


@pytest.fixture
async def bridge() -> AsyncIterator[Bridge]:
    async with open_bridge() as b:
        yield b

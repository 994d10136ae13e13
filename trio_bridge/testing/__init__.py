"""pytest-trio helpers for integrators (registered as a pytest plugin via ``pytest11``).

Import path: ``trio_bridge.testing`` (the fixtures need no import: installing trio-bridge
registers them; they need ``pytest-trio`` with ``trio_mode = true``, or ``@pytest.mark.trio``).

Fixtures:

- ``test_model`` → a running :class:`~trio_bridge.TestModel` (``.url``, ``.model``).
- ``bridge`` → a running in-process broker + connector in front of the test model, as a
  :class:`Bridge`: ``base_url`` (``http://127.0.0.1:PORT``), ``openai_base_url`` (``…/v1``),
  ``api_key``, and handles to stop and restart each role (to test a client's reconnects).

Or build your own:

- :func:`open_bridge` — the same as the fixture, in front of any ``upstream_url``::

      async with open_bridge(upstream_url="http://127.0.0.1:11434") as b:
          ...  # call b.openai_base_url with b.api_key

- :func:`open_lab` — a :class:`Lab` to start any number of brokers, connectors and test models
  that share one connector token and one API key (HA and pool set-ups).

Everything runs on 127.0.0.1 with port 0 (unless you pass a port, e.g. to restart a broker on
the same address) and is torn down structurally when the ``async with`` block ends.

**Without sockets:** pass ``network=MemoryNetwork()`` to :func:`open_bridge` or
:func:`open_lab`: broker, connector, test model and your client (``bridge.client()``, an
``httpx.AsyncClient``; ``openai.AsyncOpenAI(http_client=bridge.client(), ...)``) talk through
memory, the whole bridge runs in one process with no port, and a test may run on trio's
``autojump_clock``: timeouts, backoffs and windows of minutes pass in no real time.

**Use an async client inside these tests** (``openai.AsyncOpenAI``, ``httpx.AsyncClient``):
the bridge runs in the test's own event loop, so a synchronous client (``openai.OpenAI``,
``requests``, ``httpx.get``) blocks the loop and the bridge can never answer it; the test
hangs until the client's timeout. If you must test sync code, run it in a thread::

      text = await trio.to_thread.run_sync(my_sync_function, bridge.openai_base_url)
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from trio_bridge._config import (
    BrokerConfig,
    Config,
    ConnectorConfig,
    InspectorConfig,
    LimitsConfig,
    RelayConfig,
    structure,
)
from trio_bridge._net import TCP, Network
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.broker._broker import Broker
from trio_bridge.cli._testmodel import TestModel
from trio_bridge.connector._connector import Connector
from trio_bridge.http._upstream import H11Transport
from trio_bridge.testing._memory import MemoryNetwork

__all__ = [
    "Bridge",
    "Lab",
    "MemoryNetwork",
    "RunningBroker",
    "RunningConnector",
    "RunningModel",
    "open_bridge",
    "open_lab",
    "run_test_model",
]


@attrs.define
class RunningModel:
    model: TestModel
    url: str
    stop: trio.CancelScope = attrs.field(repr=False, factory=trio.CancelScope)


@attrs.define
class RunningBroker:
    broker: Broker
    host: str
    port: int
    _scope: trio.CancelScope = attrs.field(repr=False)
    _done: trio.Event = attrs.field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def relay_url(self) -> str:
        return f"ws://{self.host}:{self.port}{self.broker.relay_path}"

    async def stop(self) -> None:
        """Stop the broker abruptly (like a crash: relays and requests are cut)."""
        self._scope.cancel()
        await self._done.wait()


@attrs.define
class RunningConnector:
    connector: Connector
    _scope: trio.CancelScope = attrs.field(repr=False)
    _done: trio.Event = attrs.field(repr=False)

    async def stop(self) -> None:
        """Stop at once: close relays cleanly, abort what is in flight."""
        self.connector.stop()
        with trio.move_on_after(5):
            await self._done.wait()
        self._scope.cancel()
        await self._done.wait()

    async def kill(self) -> None:
        """Stop abruptly (like a crash): relays are cut without a close handshake."""
        self._scope.cancel()
        await self._done.wait()

    async def drain(self, grace: float = 10.0) -> None:
        """Graceful stop: goaway, let in-flight requests finish, then stop."""
        await self.connector.drain(grace)
        await self._done.wait()


def _section(cls: type[Any], values: dict[str, Any] | None, name: str) -> Any:
    return structure(values or {}, cls, source=name)


class Lab:
    """Start brokers, connectors and test models in one nursery; they share a connector token
    (``token``, allowed on every route) and an API key (``api_key``)."""

    def __init__(self, nursery: trio.Nursery, directory: Path, network: Network = TCP) -> None:
        self.nursery = nursery
        self.dir = directory
        self.network = network
        self.tokens = SecretStore(directory / "tokens.toml", "tbc")
        # a lab's connectors may serve any route; tests of route binding add their own tokens
        _, self.token = self.tokens.add("lab-connector", routes=("*",))
        self.keys = SecretStore(directory / "keys.toml", "tbk")
        _, self.api_key = self.keys.add("lab-user")

    def config(
        self,
        *,
        broker: dict[str, Any] | None = None,
        connector: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        relay: dict[str, Any] | None = None,
        inspector: dict[str, Any] | None = None,
    ) -> Config:
        """A config with test-friendly defaults (short pings and queue), then the overrides."""
        return Config(
            inspector=_section(InspectorConfig, inspector, "inspector"),
            base_dir=str(self.dir),
            broker=_section(
                BrokerConfig,
                {"queue_timeout": "2s", "admin_listen": "127.0.0.1:0", **(broker or {})},
                "broker",
            ),
            connector=_section(
                ConnectorConfig, {"admin_listen": "127.0.0.1:0", **(connector or {})}, "connector"
            ),
            limits=_section(LimitsConfig, limits, "limits"),
            relay=_section(RelayConfig, {"ping_interval": "5s", **(relay or {})}, "relay"),
        )

    async def start_test_model(
        self,
        *,
        token_delay: float = 0.005,
        listen: str = "127.0.0.1:0",
        models: tuple[str, ...] | None = None,
    ) -> RunningModel:
        """A test model; ``models``: the ids it serves (others get 404), default any."""
        model = TestModel(token_delay=token_delay, models=models)
        running = RunningModel(model, "")

        async def run(*, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
            with running.stop:
                await model.serve(listen, network=self.network, task_status=task_status)

        host, port = await self.nursery.start(run)
        running.url = f"http://{host}:{port}"
        return running

    async def start_broker(
        self,
        listen: str = "127.0.0.1:0",
        *,
        broker: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        relay: dict[str, Any] | None = None,
    ) -> RunningBroker:
        config = self.config(broker=broker, limits=limits, relay=relay)
        b = Broker(config, self.tokens, network=self.network)
        scope, done = trio.CancelScope(), trio.Event()

        async def run(*, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
            try:
                with scope:
                    await b.serve(listen, task_status=task_status)
            finally:
                done.set()

        host, port = await self.nursery.start(run)
        return RunningBroker(b, host, port, scope, done)

    async def start_connector(
        self,
        brokers: list[RunningBroker] | list[str],
        upstream_url: str,
        *,
        wait: bool = True,
        connector: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        relay: dict[str, Any] | None = None,
        token: str | None = None,
        inspector: dict[str, Any] | None = None,
    ) -> RunningConnector:
        """Start a connector; with ``wait``, return once every broker registered it.
        ``token``: another connector token than the lab's (e.g. one bound to a route)."""
        urls = [b.relay_url if isinstance(b, RunningBroker) else b for b in brokers]
        config = self.config(
            connector={
                "broker_urls": urls,
                "local_url": upstream_url,
                "name": "lab-connector",
                **(connector or {}),
            },
            limits=limits,
            relay=relay,
            inspector=inspector,
        )
        c = Connector(config, keys=self.keys, token=token or self.token, network=self.network)
        scope, done = trio.CancelScope(), trio.Event()

        async def run() -> None:
            try:
                with scope:
                    await c.run()
            finally:
                done.set()

        self.nursery.start_soon(run)
        if wait:
            with trio.fail_after(10):  # noqa: ASYNC912  polls with sleeps until registered
                while len(c.relays) < len(urls):  # noqa: ASYNC110
                    await trio.sleep(0.005)
                for b in brokers:
                    if isinstance(b, RunningBroker):
                        while not any(r.name == c.name for r in b.broker.registry.relays()):  # noqa: ASYNC110
                            await trio.sleep(0.005)
        return RunningConnector(c, scope, done)  # noqa: ASYNC910  started the connector's task (wait=False)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` on this lab's network (``kwargs`` go to it)."""
        return httpx.AsyncClient(transport=H11Transport(network=self.network), **kwargs)


@asynccontextmanager
async def open_lab(*, network: Network = TCP) -> AsyncIterator[Lab]:
    """A :class:`Lab`; ``network``: ``MemoryNetwork()`` for one without sockets."""
    with tempfile.TemporaryDirectory(prefix="trio-bridge-lab-") as tmp:
        async with trio.open_nursery() as nursery:
            yield Lab(nursery, Path(tmp), network)
            nursery.cancel_scope.cancel()


@attrs.define
class Bridge:
    base_url: str  # http://127.0.0.1:PORT (the broker's public side)
    api_key: str
    lab: Lab
    running_broker: RunningBroker
    running_connector: RunningConnector
    upstream_url: str
    model: TestModel | None
    _connector_options: dict[str, Any] = attrs.field(repr=False, factory=dict)

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` that reaches this bridge (on its network: TCP, or memory)."""
        return self.lab.client(**kwargs)

    @property
    def broker(self) -> Broker:
        return self.running_broker.broker

    @property
    def connector(self) -> Connector:
        return self.running_connector.connector

    @property
    def keys(self) -> SecretStore:
        return self.lab.keys

    @property
    def broker_admin_url(self) -> str:
        host, port = self.broker.admin_address or ("", 0)
        return f"http://{host}:{port}"

    @property
    def connector_admin_url(self) -> str:
        host, port = self.connector.admin_address or ("", 0)
        return f"http://{host}:{port}"

    async def restart_broker(self, down_for: float = 0.0) -> None:
        """Crash the broker, wait ``down_for`` seconds, start it again on the same port; returns
        once the connector has reconnected."""
        old = self.running_broker
        await old.stop()
        await trio.sleep(down_for)
        self.running_broker = await self.lab.start_broker(f"{old.host}:{old.port}")
        with trio.fail_after(30):  # noqa: ASYNC912  polls with sleeps until registered
            while not self.running_broker.broker.registry.relays():  # noqa: ASYNC110
                await trio.sleep(0.01)

    async def restart_connector(self, down_for: float = 0.0) -> None:
        """Crash the connector, wait ``down_for`` seconds, start a new one."""
        await self.running_connector.kill()
        await trio.sleep(down_for)
        self.running_connector = await self.lab.start_connector(
            [self.running_broker], self.upstream_url, **self._connector_options
        )


@asynccontextmanager
async def open_bridge(
    upstream_url: str | None = None,
    *,
    limits: dict[str, Any] | None = None,
    relay: dict[str, Any] | None = None,
    connector: dict[str, Any] | None = None,
    broker: dict[str, Any] | None = None,
    token_delay: float = 0.005,
    network: Network = TCP,
) -> AsyncIterator[Bridge]:
    """Start broker + connector in this process (and a test model if no ``upstream_url``).

    ``limits``, ``relay``, ``connector`` and ``broker`` override config sections, with the
    same keys and units as ``bridge.toml``. ``network``: ``MemoryNetwork()`` to run without
    sockets (then call it with :meth:`Bridge.client`).
    """
    async with open_lab(network=network) as lab:
        model: TestModel | None = None
        if upstream_url is None:
            running_model = await lab.start_test_model(token_delay=token_delay)
            model, upstream_url = running_model.model, running_model.url
        rb = await lab.start_broker(broker=broker, limits=limits, relay=relay)
        options: dict[str, Any] = {"connector": connector, "limits": limits, "relay": relay}
        rc = await lab.start_connector([rb], upstream_url, **options)
        bridge = Bridge(rb.url, lab.api_key, lab, rb, rc, upstream_url, model, options)
        yield bridge
        # Connector first, so its relay closes cleanly while the broker still answers.
        await bridge.running_connector.stop()


@asynccontextmanager
async def run_test_model(*, token_delay: float = 0.005) -> AsyncIterator[RunningModel]:
    """Serve a :class:`TestModel` on 127.0.0.1, port 0."""
    async with open_lab() as lab:
        yield await lab.start_test_model(token_delay=token_delay)

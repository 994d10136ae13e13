from __future__ import annotations

import math
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).parent))

if TYPE_CHECKING:  # imported where used: a broken module then fails its tests, not collection
    from upstream import Upstream

    from trio_bridge._net import Network
    from trio_bridge.connector._connector import Connector

pytest_plugins = ["pytester"]  # inner pytest sessions for the plugin's own tests


@asynccontextmanager
async def memory_upstream(network: Network) -> AsyncIterator[tuple[Upstream, str]]:
    """tests/upstream.py's controllable LLM served on ``network`` (a ``MemoryNetwork``: our
    own HTTP server instead of hypercorn), as ``run_upstream()`` serves it on loopback."""
    from upstream import Upstream

    from trio_bridge.http._asgi import serve_app

    app = Upstream()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(partial(serve_app, app, "127.0.0.1:0", network=network))
        yield app, f"http://{host}:{port}"
        nursery.cancel_scope.cancel()


@contextmanager
def clock_held(clock: trio.testing.MockClock) -> Iterator[None]:
    """Hold the autojump clock still, to wait for a worker thread: the clock does not wait for
    threads, it would jump from deadline to deadline (pings, timeouts, windows) until the
    thread is done. Only around a wait that needs no deadline: nothing moves the clock here."""
    threshold = clock.autojump_threshold
    clock.autojump_threshold = math.inf
    try:
        yield
    finally:
        clock.autojump_threshold = threshold


async def usage_summary_read(connector: Connector, clock: trio.testing.MockClock) -> None:
    """Until the connector's usage summary is read (a worker thread at its start), the clock
    held still: ``/_bridge/usage`` waits for it, and the time a test counts starts after."""
    assert connector.usage_store is not None
    with clock_held(clock):
        await connector.usage_store.load()

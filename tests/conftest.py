from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).parent))

from upstream import Upstream

from trio_bridge._net import Network
from trio_bridge.http._asgi import serve_app

pytest_plugins = ["pytester"]  # inner pytest sessions for the plugin's own tests


@asynccontextmanager
async def memory_upstream(network: Network) -> AsyncIterator[tuple[Upstream, str]]:
    """tests/upstream.py's controllable LLM served on ``network`` (a ``MemoryNetwork``: our
    own HTTP server instead of hypercorn), as ``run_upstream()`` serves it on loopback."""
    app = Upstream()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(partial(serve_app, app, "127.0.0.1:0", network=network))
        yield app, f"http://{host}:{port}"
        nursery.cancel_scope.cancel()

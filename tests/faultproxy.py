"""A TCP fault proxy on loopback whose behaviour a test switches at run time.

Modes: ``"pass"`` forwards bytes; ``"blackhole"`` keeps every connection open but moves no more
bytes (a silent network: no FIN, no RST); ``"refuse"`` closes new connections at once.
``cut()`` closes every live connection (like a reset).
"""

from __future__ import annotations

import trio


class FaultProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "pass"
        self.port = 0
        self._scopes: set[trio.CancelScope] = set()
        self._flowing = trio.Event()
        self._flowing.set()

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == "blackhole":
            self._flowing = trio.Event()
        else:
            self._flowing.set()

    def cut(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.mode == "refuse":
            await client.aclose()
            return
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pipe, upstream, client, nursery.cancel_scope)
            finally:
                self._scopes.discard(scope)
        with trio.CancelScope(shield=True):
            await client.aclose()
            await upstream.aclose()

    async def _pipe(
        self, src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await src.receive_some(65536)
                if not data:
                    break
                await self._flowing.wait()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

"""A hostile broker for tests: the project's own sans-IO Session over trio-websocket, driven
by the test (open streams with any head, send body parts without an end, grant no credit,
stop reading), against a real connector started by the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from trio_bridge._errors import LocalProtocolError
from trio_bridge._frames import MAX_MESSAGE, MAX_PAYLOAD
from trio_bridge._protocol import Data, Event, RequestHead, Reset, Response, Session


class FakeBroker:
    """One connector's relay at a time. ``window``: the per-stream credit this broker grants
    the connector's answers (1: nearly none). Events the connector sends are kept in
    ``events``, per stream in ``status`` (the answer's status, or None for a reset) and
    ``body``."""

    def __init__(self, *, window: int = 256 * 1024) -> None:
        self.window = window
        self.url = ""
        self.session: Session | None = None
        self.ws: WebSocketConnection | None = None
        self.connected = trio.Event()
        self.closed = trio.Event()
        self.events: list[Event] = []
        self.status: dict[int, int | None] = {}
        self.body: dict[int, bytes] = {}
        self.reading = True  # False: the broker stops reading (its socket buffers fill up)
        self._changed = trio.Event()

    async def _handler(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        session = Session(opener=True, window=self.window, max_streams=100_000)
        try:
            session.receive_data(await ws.get_message())
            session.next_event()  # the connector's hello
            await ws.send_message(session.send_hello(role="broker"))
            self.session, self.ws = session, ws
            self.connected.set()
            while True:
                while not self.reading:
                    await trio.sleep(0.05)
                session.receive_data(await ws.get_message())
                while (ev := session.next_event()) is not None:
                    self._record(ev)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._wake()

    def _record(self, ev: Event) -> None:
        self.events.append(ev)
        if isinstance(ev, Response):
            self.status[ev.stream_id] = ev.head.status
        elif isinstance(ev, Data):
            self.body[ev.stream_id] = self.body.get(ev.stream_id, b"") + bytes(ev.data)
        elif isinstance(ev, Reset):
            self.status.setdefault(ev.stream_id, None)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def request(self, head: RequestHead, body: bytes = b"", *, end: bool = True) -> int:
        """Open a stream; send ``head`` and ``body`` (and the end, unless ``end`` is False)."""
        assert self.session is not None and self.ws is not None
        sid, frame = self.session.open_stream(head, end_stream=end and not body)
        await self.ws.send_message(frame)
        if body:
            await self.send_data(sid, body, end=end)
        return sid

    async def send_data(self, sid: int, data: bytes, *, end: bool = False) -> None:
        assert self.session is not None and self.ws is not None
        for i in range(0, len(data), MAX_PAYLOAD):
            last = i + MAX_PAYLOAD >= len(data)
            part = data[i : i + MAX_PAYLOAD]
            try:
                frame = self.session.send_data(sid, part, end_stream=end and last)
            except LocalProtocolError:
                return  # the connector already closed the stream (answered or reset it)
            await self.ws.send_message(frame)

    async def wait_answers(self, sids: list[int]) -> dict[int, int | None]:
        """Until each stream has an answer status or a reset (or the relay closed)."""
        while not all(s in self.status for s in sids) and not self.closed.is_set():
            await self._changed.wait()
        return {s: self.status.get(s, -1) for s in sids}


@asynccontextmanager
async def open_fake_broker(*, window: int = 256 * 1024) -> AsyncIterator[FakeBroker]:
    broker = FakeBroker(window=window)
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(
            lambda task_status: serve_websocket(
                broker._handler,
                "127.0.0.1",
                0,
                None,
                max_message_size=MAX_MESSAGE + 1024,
                task_status=task_status,
            )
        )
        broker.url = f"ws://127.0.0.1:{listener.port}/_bridge/relay"
        yield broker
        nursery.cancel_scope.cancel()

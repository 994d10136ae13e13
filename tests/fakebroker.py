"""A broker that answers nothing but reads everything: :mod:`hostilebroker`'s server with one
connector's relay read in the background, for tests that send requests and look at the
answers (statuses, bodies, resets) a real connector gives a broker that may be hostile
(``window=1``: it grants nearly no credit; ``reading = False``: it stops reading)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from hostilebroker import HostileConnection, open_hostile_broker
from trio_websocket import ConnectionClosed

from trio_bridge._errors import LocalProtocolError
from trio_bridge.relay._frames import MAX_PAYLOAD
from trio_bridge.relay._protocol import Data, Event, RequestHead, Reset, Response


class FakeBroker:
    """The first connector that dials; ``status`` per stream (the answer's status, or None for
    a reset), ``body`` per stream, every event in ``events``."""

    def __init__(self) -> None:
        self.url = ""
        self.conn: HostileConnection | None = None
        self.connected = trio.Event()
        self.closed = trio.Event()
        self.events: list[Event] = []
        self.status: dict[int, int | None] = {}
        self.body: dict[int, bytes] = {}
        self.reading = True
        self._changed = trio.Event()

    async def _read(self, conn: HostileConnection) -> None:
        self.conn = conn
        self.connected.set()
        try:
            while True:
                while not self.reading:
                    await trio.sleep(0.05)
                for ev in await conn.receive():
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
        assert self.conn is not None
        session = self.conn.session
        sid, frame = session.open_stream(head, end_stream=end and not body)
        await self.conn.send(frame)
        if body:
            await self.send_data(sid, body, end=end)
        return sid

    async def send_data(self, sid: int, data: bytes, *, end: bool = False) -> None:
        """Body bytes for stream ``sid``, within the connector's credit, in frames of at most
        MAX_PAYLOAD; nothing once the connector closed the stream."""
        assert self.conn is not None
        session = self.conn.session
        for i in range(0, len(data), MAX_PAYLOAD):
            last = i + MAX_PAYLOAD >= len(data)
            try:
                frame = session.send_data(sid, data[i : i + MAX_PAYLOAD], end_stream=end and last)
            except LocalProtocolError:
                return  # the connector already closed the stream (answered or reset it)
            await self.conn.send(frame)

    async def wait_answers(self, sids: list[int]) -> dict[int, int | None]:
        """Until each stream has an answer status or a reset (or the relay closed)."""
        while not all(s in self.status for s in sids) and not self.closed.is_set():
            await self._changed.wait()
        return {s: self.status.get(s, -1) for s in sids}


@asynccontextmanager
async def open_fake_broker(*, window: int = 256 * 1024) -> AsyncIterator[FakeBroker]:
    fb = FakeBroker()
    async with (
        open_hostile_broker(window=window, max_streams=100_000) as hb,
        trio.open_nursery() as nursery,
    ):
        fb.url = hb.url

        async def first() -> None:
            await fb._read(await hb.accept())

        nursery.start_soon(first)
        yield fb
        nursery.cancel_scope.cancel()

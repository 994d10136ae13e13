"""I/O: one relay connection, joining the sans-IO :class:`Session` to a WebSocket.

Tasks of one :class:`Relay` (all in the nursery of :meth:`Relay.run`):

- the **reader** (the task that called ``run``): receives messages, feeds the session, routes
  events to :class:`RelayStream` objects. It never blocks on a stream: each stream's buffer is
  bounded by the credit window it granted, so a slow consumer stalls only itself. It hands on
  at most ``EVENTS_PER_TURN`` events before it lets other tasks run (a message may hold
  100 000 tiny frames, and one read many messages); the session's budgets end a flood of
  frames that do no work (a protocol error: GOAWAY with the reason, then close).
- the **writer**: the only task that touches the socket for sending. Frames are appended to
  its queue synchronously; it sends everything that is ready as one WebSocket message
  (coalescing), at most ``MAX_MESSAGE`` bytes. Data senders wait while more than
  ``high_water`` bytes are queued; control frames (pong, window, reset) never wait. What it
  holds is bounded all the same: a peer that does not read what we send loses its relay once
  the queue passes ``max_queued`` bytes (each frame counted with ``FRAME_OVERHEAD`` for its
  object), or once a write has been blocked for ``2.5 × ping_interval`` (what the peer's own
  pinger allows us before it gives up on us).
- **liveness**, every ``ping_interval`` (:meth:`Relay.tick`, from the role's one shared
  :class:`Liveness` timer, or the relay's own): PING if nothing was received in the last
  interval (a relay with traffic sends none); if nothing at all has been received for
  ``2.5 × ping_interval`` the relay is declared dead. Each tick renews the session's budgets
  (:meth:`Session.new_interval`).
- on the connector, one **handler** task per incoming stream, each in its own cancel scope
  (hooked to ``RelayStream.on_reset``), cancelled when the stream is reset or the relay is lost.

Cancellation: cancelling ``run`` (or :meth:`Relay.close`) tears the relay down; every open
stream then fails with :class:`StreamReset` (code RELAY_LOST) and its ``on_reset`` hook runs.

Error handling: transport errors become :class:`RelayClosed`; a protocol violation by the peer
sends GOAWAY with the reason and closes the relay. Per-stream violations reset that stream only.
Control frames (PING, PONG, WINDOW, RESET, STATUS, GOAWAY) queued once the writer closed are
dropped, never an error: ``run`` returns its reason whichever task closed the relay first.

Modules: this one has :class:`Relay` (and :class:`Liveness`); the writer is in
:mod:`~trio_bridge.relay._writer`, a stream in :mod:`~trio_bridge.relay._stream`; the rules
(frames, streams, windows) are the sans-IO :mod:`~trio_bridge.relay._protocol`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable

import trio

from trio_bridge._errors import (
    HeadTooLarge,
    LocalProtocolError,
    RelayClosed,
    RelayRefused,
    RemoteProtocolError,
    StreamReset,
)
from trio_bridge.relay._frames import MAX_PAYLOAD, ResetCode
from trio_bridge.relay._protocol import (
    Data,
    GoAway,
    Hello,
    Ping,
    Request,
    RequestHead,
    Reset,
    Response,
    Session,
    Status,
    StreamError,
    WindowUpdate,
)
from trio_bridge.relay._stream import RelayStream
from trio_bridge.relay._writer import (
    MAX_QUEUED,
    MAX_QUEUED_OPENER,
    MessageTransport,
    Writer,
)

log = logging.getLogger("trio_bridge.relay")

StreamHandler = Callable[[RelayStream], Awaitable[None]]

HANDSHAKE_TIMEOUT = 10.0
#: how long run() gives the transport's close when it ends (the WebSocket bounds its own close
#: handshake at 2 s; this is the backstop for any transport)
TRANSPORT_CLOSE_TIMEOUT = 3.0
#: events the reader hands on before it lets other tasks run: a 1 MiB message may hold 100 000
#: frames, and reading them all in one go would hold the event loop for a tenth of a second
EVENTS_PER_TURN = 256


class Relay:
    """One relay connection. Create, then ``await nursery.start(relay.run)``.

    ``run`` performs the hello exchange (started value: the peer's :class:`Hello`), then serves
    until the connection ends or the relay is closed; it returns the reason as a string.

    Resource handling: received bytes waiting in streams are bounded by ``max_buffered``, bytes
    waiting to be sent by ``max_queued`` (default ``MAX_QUEUED_OPENER`` on the broker's side,
    ``MAX_QUEUED`` on the connector's); a peer that does not read loses its relay.
    """

    def __init__(
        self,
        transport: MessageTransport,
        session: Session,
        *,
        name: str = "",
        route: str = "",
        ready: bool = True,
        capacity: int = 0,
        ping_interval: float = 10.0,
        handler: StreamHandler | None = None,
        high_water: int = 512 * 1024,
        max_buffered: int = 64 * 1024 * 1024,
        max_queued: int | None = None,
        on_change: Callable[[Relay], None] | None = None,
        accept: Callable[[Hello], str | None] | None = None,
        models: tuple[str, ...] | None = None,
        priority: int = 0,
        liveness: Liveness | None = None,
    ) -> None:
        self.session = session
        #: the role's shared liveness timer (None: this relay runs its own)
        self._liveness = liveness
        #: received body bytes waiting in this relay's streams; above ``max_buffered`` the
        #: stream holding the most (the slowest reader) is reset
        self.buffered = 0
        self.max_buffered = max_buffered
        self.name = name  # for log lines
        #: what the acceptor (connector) says in its hello: its route and how many requests
        #: it serves at once (0: max_streams)
        self.route = route
        self.capacity = capacity
        self.local_ready = ready
        self.ping_interval = ping_interval
        self.peer: Hello | None = None
        self.peer_ready = True
        self.peer_draining = False
        #: the reason in the peer's GOAWAY, if one came (why the relay is ending)
        self.peer_goaway: str | None = None
        #: what this side's LLM serves (connector; sent in the hello and STATUS)
        self.local_models = models
        self.priority = priority
        #: what the peer's LLM serves, kept current by its STATUS frames (None: anything)
        self.peer_models: tuple[str, ...] | None = None
        self.peer_priority = 0
        self.closed_reason: str | None = None
        self.grant_threshold = max(1, session.window // 4)
        self._transport = transport
        if max_queued is None:
            max_queued = MAX_QUEUED_OPENER if session.opener else MAX_QUEUED
        if max_queued < high_water + 2 * MAX_PAYLOAD:
            raise ValueError("max_queued must leave room for a frame above high_water")
        self._writer = Writer(transport, high_water, max_queued, self._writer_overflow)
        self._handler = handler
        #: called (synchronously) when streams end, readiness or draining change, or the
        #: relay closes: an owner's hook, e.g. the broker's registry
        self.on_change = on_change
        #: opener side: judges the peer's hello; a string refuses it (sent as GOAWAY)
        self._accept = accept
        self._streams: dict[int, RelayStream] = {}
        self._ended = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._last_received = trio.current_time()
        self._ping_counter = 0

    # -- public --
    @property
    def in_flight(self) -> int:
        return len(self._streams)

    @property
    def queued(self) -> int:
        """Bytes waiting in the writer to be sent."""
        return self._writer.queued

    def open_stream(self, head: RequestHead, *, end_stream: bool) -> RelayStream:
        """Open a stream with ``head`` (opener side). Raises RelayClosed if not possible."""
        if self.closed_reason is not None:
            raise RelayClosed(self.closed_reason)
        try:
            stream_id, frame = self.session.open_stream(head, end_stream=end_stream)
        except HeadTooLarge:
            raise  # the request's fault, not the relay's
        except LocalProtocolError as exc:
            raise RelayClosed(str(exc)) from None
        stream = RelayStream(self, stream_id, head)
        stream.send_done = end_stream
        self._streams[stream_id] = stream
        self.send_frame(frame)
        return stream

    def reset_all(self, code: int, reason: str) -> None:
        """Reset every open stream (e.g. SHUTDOWN once the drain deadline passed)."""
        for stream in list(self._streams.values()):
            stream.reset(code, reason)

    def send_status(self, *, ready: bool, models: tuple[str, ...] | None = None) -> None:
        """Tell the peer our readiness (and our LLM's models, when they changed)."""
        self.local_ready = ready
        if models is not None:
            self.local_models = models
        if self.closed_reason is None and self.session.hello_sent:
            self._send_control(self.session.send_status(ready=ready, models=models))

    def send_goaway(self, reason: str) -> None:
        if self.closed_reason is None and not self.session.goaway_sent:
            self._send_control(self.session.send_goaway(reason))

    async def wait_flushed(self) -> None:
        """Return once every frame queued before the call (RESETs from :meth:`reset_all`, a
        GOAWAY, a STATUS) was written to the transport; at once if the relay is closed (what
        its writer held was dropped: the peer learns nothing more from this relay).

        A drain calls it instead of sleeping for its frames to go out. It waits as long as
        the peer does not read: callers bound it with their own deadline (``move_on_after``).

        Cancellation: safe; cancelling the wait changes nothing in the writer.
        """
        await self._writer.wait_flushed()

    async def wait_closed(self) -> None:
        """Return once ``run`` has finished (its streams failed, the transport closed)."""
        await self._ended.wait()

    def close_telling_peer(self, reason: str) -> None:
        """Send GOAWAY with ``reason`` through the writer, then close (within a second, in the
        relay's own task, so the peer learns why). Does not wait."""
        if self.closed_reason is not None or self._nursery is None:
            self.close(reason)
            return

        async def goaway_then_close() -> None:
            await self._goaway(reason)
            self.close(reason)

        self._nursery.start_soon(goaway_then_close)

    def close(self, reason: str) -> None:
        """Tear the relay down (idempotent; does not wait). Its streams learn why (RELAY_LOST)
        before its tasks are cancelled, so their handlers end knowing it; what they buffered
        stays readable until :meth:`run` fails them."""
        if self.closed_reason is None:
            self.closed_reason = reason
        self._writer.close(reason)
        for stream in self._streams.values():
            if stream.reset_error is None:
                stream.reset_error = StreamReset(
                    ResetCode.RELAY_LOST, f"relay lost: {self.closed_reason}"
                )
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[Hello] = trio.TASK_STATUS_IGNORED) -> str:
        started = refused = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_loop)
                try:
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        hello = await self._handshake()
                    task_status.started(hello)
                    started = True
                    self.session.new_interval(self.ping_interval)  # budgets per interval
                    if self._liveness is not None:
                        self._liveness.add(self)
                    else:
                        nursery.start_soon(self._pinger)
                    await self._read_loop()
                except trio.TooSlowError:
                    self.close("handshake timeout")
                except RelayClosed as exc:
                    self.close(exc.reason)
                    refused = isinstance(exc, RelayRefused)
                except RemoteProtocolError as exc:
                    log.warning("relay protocol error: %s", exc, extra={"relay": self.name})
                    await self._goaway(str(exc))
                    self.close(f"protocol error: {exc}")
        finally:
            if self._liveness is not None:
                self._liveness.discard(self)
            reason = self.closed_reason or "closed"
            self.closed_reason = reason
            self._writer.close(reason)
            for stream in list(self._streams.values()):
                stream.fail(ResetCode.RELAY_LOST, f"relay lost: {reason}")
            self._streams.clear()
            if self.on_change is not None:
                self.on_change(self)  # before the close handshake, which may take a while
            # shielded: the close runs even when run() was cancelled; bounded: a close
            # handshake with a peer that stopped reading never ends (the transport is
            # closed all the same when it is cut short)
            with trio.move_on_after(TRANSPORT_CLOSE_TIMEOUT, shield=True):
                await self._transport.aclose()
            self._ended.set()
        if not started:
            raise RelayRefused(reason) if refused else RelayClosed(reason)
        return reason

    # -- for its streams: the only part of the relay a RelayStream uses --
    def send_frame(self, frame: bytes) -> None:
        """Queue an encoded frame (a head, DATA) for the single writer (never blocks); raises
        RelayClosed once the writer closed."""
        self._writer.put_nowait(frame)

    def _send_control(self, frame: bytes) -> None:
        """Queue a control frame (PING, PONG, WINDOW, RESET, STATUS, GOAWAY); a no-op once the
        writer closed: the relay is ending, and nothing more reaches the peer through it."""
        writer = self._writer
        if writer.closed is None:
            writer.put_nowait(frame)

    @property
    def writer_has_space(self) -> bool:
        return self._writer.has_space

    async def wait_writer_space(self) -> None:
        """Wait until the writer is below its high-water mark; RelayClosed once closed."""
        await self._writer.wait_space()

    def unhold(self, n: int) -> None:
        """``n`` buffered bytes were consumed (or dropped) by a stream."""
        self.buffered -= n

    def grant(self, stream_id: int, increment: int) -> None:
        """Credit the peer with ``increment`` more bytes on a stream. A closed relay grants
        nothing: its streams are failing with RELAY_LOST, and a reader that consumes what
        was buffered before the loss must not see RelayClosed from here."""
        if self.closed_reason is None:
            self._send_control(self.session.send_window_update(stream_id, increment))

    def stream_ended(self, stream: RelayStream) -> None:
        """A stream finished both ways: it leaves the relay."""
        stream.detach()
        self._streams.pop(stream.id, None)
        if self.on_change is not None:
            self.on_change(self)

    def hold(self, n: int) -> None:
        """A stream buffered ``n`` received bytes; past ``max_buffered`` the stream holding
        the most (the slowest reader) is reset."""
        self.buffered += n
        if self.buffered > self.max_buffered:
            victim = max(self._streams.values(), key=lambda st: st.held, default=None)
            if victim is not None and victim.held:
                log.warning(
                    "relay buffers over %d bytes: resetting stream %d, the slowest reader "
                    "(%d bytes waiting)",
                    self.max_buffered,
                    victim.id,
                    victim.held,
                    extra={"relay": self.name, "request_id": _rid(victim)},
                )
                victim.reset(ResetCode.FLOW_CONTROL, "relay buffers full: slowest reader shed")

    def reset_stream(self, stream: RelayStream, code: int, reason: str) -> None:
        """Fail ``stream`` here and tell the peer (RESET), unless the relay is gone."""
        stream.fail(code, reason)
        self._streams.pop(stream.id, None)
        if self.closed_reason is None:
            self._send_control(self.session.send_reset(stream.id, code, reason))
        if self.on_change is not None:
            self.on_change(self)

    # -- internals --
    def _writer_overflow(self, reason: str) -> None:
        # the peer does not read: a GOAWAY would only wait behind the rest
        log.warning("closing the relay: %s", reason, extra={"relay": self.name})
        self.close(reason)

    async def _write_loop(self) -> None:  # noqa: ASYNC910  a task's body: nobody awaits it
        try:
            await self._writer.run()
        except RelayClosed as exc:
            self.close(exc.reason)

    async def _goaway(self, reason: str) -> None:
        """Tell the peer why, through the single writer (never beside it: a write of its cut
        midway would leave half a message on the transport); at most a second."""
        with trio.move_on_after(1):
            self._send_control(self.session.send_goaway(reason))
            await self._writer.wait_flushed()

    async def _handshake(self) -> Hello:
        role = "broker" if self.session.opener else "connector"
        if not self.session.opener:
            self.send_frame(
                self.session.send_hello(
                    role=role,
                    name=self.name,
                    route=self.route,
                    ready=self.local_ready,
                    capacity=self.capacity,
                    models=self.local_models,
                    priority=self.priority,
                )
            )
        while True:
            self.session.receive_data(await self._transport.receive_message())
            event = self.session.next_event()
            if isinstance(event, GoAway):
                raise RelayRefused(event.reason)
            if isinstance(event, Hello):
                break
            if event is not None:  # pragma: no cover - session enforces HELLO first
                raise RemoteProtocolError("expected HELLO")
        if self._accept is not None and (refusal := self._accept(event)) is not None:
            # Nothing else was sent yet: the GOAWAY goes straight out, before the close.
            await self._transport.send_message(self.session.send_goaway(refusal))
            raise RelayRefused(refusal)
        self.peer = event
        self.peer_ready = event.ready
        self.peer_models = event.models
        self.peer_priority = event.priority
        if self.session.opener:
            self.send_frame(self.session.send_hello(role=role))
        self._last_received = trio.current_time()
        # Frames that arrived in the same message as the hello: the read loop's first turn.
        return event

    async def _read_loop(self) -> None:
        receive = self._transport.receive_message
        session = self.session
        budget = EVENTS_PER_TURN
        while True:
            budget = self._dispatch_pending(budget)
            if not budget:
                # EVENTS_PER_TURN events handed on, from one message of many frames or from
                # many messages (a transport hands out what one read brought without a
                # schedule point): the rest after the other tasks had a turn
                await trio.lowlevel.checkpoint()
                budget = EVENTS_PER_TURN
                continue
            data = await receive()
            self._last_received = trio.current_time()
            session.receive_data(data)

    def _dispatch_pending(self, budget: int) -> int:
        """Hand the events the session parsed to their streams (or act on them), at most
        ``budget``; what is left of it (0: more may be waiting)."""
        streams = self._streams
        next_event = self.session.next_event
        for i in range(budget):
            ev = next_event()
            if ev is None:
                return budget - i
            if isinstance(ev, Data):  # the hot path first
                if (stream := streams.get(ev.stream_id)) is not None:
                    stream.deliver(ev.data, ev.end_stream)
            elif isinstance(ev, Response):
                if (stream := streams.get(ev.stream_id)) is not None:
                    stream.response_head = ev.head
                    stream.deliver(b"", ev.end_stream)
            elif isinstance(ev, WindowUpdate):
                if (stream := streams.get(ev.stream_id)) is not None:
                    stream.wake()
            elif isinstance(ev, Request):
                self._on_request(ev)
            elif isinstance(ev, Reset | StreamError):
                self._on_reset(ev)
            elif isinstance(ev, Ping):  # the session keeps their number within its budget
                self._send_control(self.session.send_pong(ev.opaque))
            elif isinstance(ev, GoAway | Status):
                self._on_peer_state(ev)
            # Pong: nothing to do, _last_received is already updated
        return 0

    def _on_reset(self, ev: Reset | StreamError) -> None:
        if isinstance(ev, StreamError):  # the peer broke a stream's rules: we reset it
            # refusals are normal under load (and a flood of them must not flood the log)
            level = logging.DEBUG if ev.code == ResetCode.REFUSED else logging.WARNING
            log.log(level, "stream %d reset: %s", ev.stream_id, ev.reason,
                    extra={"relay": self.name})  # fmt: skip
            self._send_control(self.session.send_reset(ev.stream_id, ev.code, ev.reason))
        stream = self._streams.pop(ev.stream_id, None)
        if stream is None:
            return
        stream.fail(ev.code, ev.reason or "reset by peer")
        if self.on_change is not None:  # its slot is free
            self.on_change(self)

    def _on_peer_state(self, ev: GoAway | Status) -> None:
        if isinstance(ev, GoAway):
            self.peer_draining = True
            self.peer_goaway = ev.reason
            log.info("peer going away: %s", ev.reason, extra={"relay": self.name})
        else:
            self.peer_ready = ev.ready
            if ev.models is not None:
                self.peer_models = ev.models
        if self.on_change is not None:
            self.on_change(self)

    def _on_request(self, ev: Request) -> None:
        stream = RelayStream(self, ev.stream_id, ev.head)
        stream.recv_done = ev.end_stream
        self._streams[ev.stream_id] = stream
        if self._handler is None or self._nursery is None:
            self.reset_stream(stream, ResetCode.REFUSED, "no handler")
            return
        self._nursery.start_soon(self._run_handler, stream)

    async def _run_handler(self, stream: RelayStream) -> None:  # noqa: ASYNC910  a task's body
        assert self._handler is not None
        try:
            with trio.CancelScope() as scope:  # noqa: ASYNC912  on_reset cancels the handler
                stream.on_reset = scope.cancel
                if stream.reset_error is None:
                    await self._handler(stream)
        except StreamReset:
            pass  # the stream ended under the handler (peer reset, relay lost): not a failure
        except Exception:
            log.exception("stream handler failed", extra={"request_id": _rid(stream)})
            stream.reset(ResetCode.INTERNAL_ERROR, "internal error")
        finally:
            stream.on_reset = None
            if not stream.finished:
                if stream.send_done:
                    # Response complete; tell the peer to stop sending the request body.
                    stream.reset(ResetCode.NO_ERROR, "response complete")
                else:
                    stream.reset(ResetCode.CANCEL, "handler ended early")

    async def _pinger(self) -> None:
        """This relay's own liveness timer, when the role gave it no shared one."""
        while True:
            await trio.sleep(self.ping_interval)
            self.tick(trio.current_time())

    def tick(self, now: float) -> None:
        """One look at this relay, every ``ping_interval`` (its own timer, or the role's
        :class:`Liveness`): renew the session's budgets; close it if nothing came for
        2.5 intervals, or if a write has been blocked that long; PING the peer only if
        nothing came in the last interval (a relay with traffic needs no probe: the peer
        answers every PING, so each side hears the other either way)."""
        interval = self.ping_interval
        dead_after = 2.5 * interval
        silent = now - self._last_received
        if silent > dead_after:
            self.close(f"no answer for {silent:.1f}s (ping timeout)")
            return
        since = self._writer.writing_since
        if since is not None and now - since > dead_after:
            # it keeps sending but does not read: as dead as a silent one, and a GOAWAY
            # would wait behind the blocked write
            reason = f"peer not reading: a write blocked for {now - since:.1f}s"
            log.warning("closing the relay: %s", reason, extra={"relay": self.name})
            self.close(reason)
            return
        self.session.new_interval(interval)
        if silent >= interval:
            self._ping_counter += 1
            self._send_control(self.session.send_ping(struct.pack("!Q", self._ping_counter)))


class Liveness:
    """One timer for every relay of a role (instead of a task each): every ``interval`` it
    calls :meth:`Relay.tick` on each relay that is up. Run :meth:`run` in the role's nursery and
    pass it to each :class:`Relay` (``liveness=``); a relay adds itself once its handshake is
    done and leaves when it ends."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._relays: dict[Relay, None] = {}  # insertion-ordered

    def __len__(self) -> int:
        return len(self._relays)

    def add(self, relay: Relay) -> None:
        self._relays[relay] = None

    def discard(self, relay: Relay) -> None:
        self._relays.pop(relay, None)

    async def run(self) -> None:
        """Tick every relay every ``interval`` until cancelled."""
        while True:
            await trio.sleep(self.interval)
            now = trio.current_time()
            for relay in list(self._relays):
                relay.tick(now)


def _rid(stream: RelayStream) -> str:
    return stream.request_head.request_id if stream.request_head is not None else "-"


__all__ = [
    "Liveness",
    "MessageTransport",
    "Relay",
    "RelayStream",
]

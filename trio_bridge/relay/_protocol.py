"""Relay session state machine (sans-IO: no trio, no network).

One :class:`Session` per relay connection and side. The broker's session is the *opener*
(it opens one stream per public request); the connector's is the *acceptor*. Feed received bytes
with :meth:`Session.receive_data` and take events out with :meth:`Session.next_event`; produce
bytes to send with the ``send_*`` methods. The wire format is documented in ``_frames``.

Stream life cycle (per side; "send" is this side's direction, "recv" the peer's)::

    opener:   open_stream ─▶ send open (unless END) ─ data…END ─▶ send closed
              recv: RESPONSE head ─▶ DATA…END ─▶ recv closed
    acceptor: REQUEST head ─▶ recv open (unless END) ─ DATA…END ─▶ recv closed
              send: send_response ─▶ send_data…END ─▶ send closed
    either:   RESET sent or received ─▶ both closed at once

A stream is forgotten once both directions are closed. Frames that arrive for a forgotten
stream (id at or below the highest id seen) are dropped silently: they were in flight when we
reset it. A frame for an id never opened is a relay error.

Errors: a violation that concerns one stream yields a :class:`StreamError` event (the stream is
already closed here; the caller must send the RESET with :meth:`Session.send_reset`). A
violation that concerns the relay raises :class:`RemoteProtocolError` from ``next_event``;
the caller should send GOAWAY with the reason and close. Illegal local actions raise
:class:`LocalProtocolError`.

Budgets: frames that do no work for their receiver cost it as much to decode as any other, so
a peer may send only so many of them per *interval* (the caller renews the budgets with
:meth:`Session.new_interval`; the relay does at each ping interval). More is a flood: a
:class:`RemoteProtocolError` that costs the flooder its relay, instead of costing the other
streams their latency.

- **control frames**: at most ``max_control`` (:data:`MAX_CONTROL_PER_INTERVAL`) of *each* of
  PING, PONG, STATUS and GOAWAY. An honest peer sends one PING and at most one PONG per
  interval, a STATUS when its LLM's state changes, one GOAWAY in a relay's life.
- **frames that change nothing**: at most ``max_noop`` (:data:`MAX_NOOP_PER_INTERVAL`) of
  DATA, RESPONSE, RESET and WINDOW frames for a stream that is gone here (but DATA within the
  credit a stream still had when we reset it is the honest crossing of that RESET, and free);
  WINDOW on a stream we no longer send on; WINDOW that grants less than a quarter of the
  peer's window or more credit than we used (an honest receiver grants what its reader
  consumed, in steps of at least a quarter of its window: ``RelayStream._consumed``); empty
  DATA without END_STREAM; and REQUESTs refused (beyond ``max_streams``, or after our
  GOAWAY). An honest peer sends a few: the frames that crossed a RESET or an END on the wire.
  Budgets are per :data:`BUDGET_INTERVAL` seconds and scale up with a longer interval.

What a JSON payload may hold (HELLO, REQUEST, RESPONSE, STATUS): anything else is a
:class:`RemoteProtocolError` (GOAWAY with the reason), never another exception:

- the payload is UTF-8 (strict: no encoded surrogates, no byte order mark, never UTF-16/32) and
  one JSON object; nesting deeper than the parser's recursion limit is refused, and the shapes
  below nest three levels (keys this side does not know are ignored, whatever they hold);
- REQUEST: ``id`` 1-128 of ``[A-Za-z0-9._:-]`` (the rule for client-sent request ids,
  ``_http._SANE_ID``); ``method`` an HTTP token (RFC 9110 ``tchar``), at most 32 characters;
  ``target`` printable ASCII (0x21-0x7e), 1 to ``MAX_TARGET`` characters (what the target may
  *mean* is ``_target``'s rule, applied by both roles per request, not the relay's);
- REQUEST and RESPONSE ``headers``: a list of ``[name, value]``; a name is a token, a value
  latin-1 text without CR, LF or NUL; RESPONSE ``status`` an integer 100-999;
- HELLO ``role``, ``name``, ``route`` (at most 256 characters) and model names (HELLO and
  STATUS: at most ``MAX_MODELS`` of 1-256 characters) are printable text: no control or format
  characters, no lone surrogates. A sender leaves out model names this rule refuses (an LLM may
  list anything; the relay must not fail over one odd name).

Reasons (GOAWAY at most 1024 bytes, RESET 256) are decoded as ``_frames.shown_text``: never an
error, never a control character.

DATA frames that carry bytes are not counted: flow control bounds them (a peer sending its
credit one byte per frame costs the relay more CPU, not more memory; the relay hands a message's
events on in slices so that such a message cannot hold the event loop either).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from trio_bridge._errors import HeadTooLarge, LocalProtocolError, RemoteProtocolError
from trio_bridge.relay._frames import (
    FLAG_END_STREAM,
    MAX_PAYLOAD,
    MAX_WINDOW,
    VERSION,
    Frame,
    FrameDecoder,
    FrameType,
    Payload,
    ResetCode,
    decode_goaway,
    decode_reset,
    decode_window,
    encode_frame,
    encode_goaway,
    encode_reset,
    encode_window,
)
from trio_bridge.relay._heads import (
    RequestHead,
    ResponseHead,
    decode_request_head,
    decode_response_head,
    encode_request_head,
    encode_response_head,
    load_json,
    printable,
)

DEFAULT_WINDOW = 256 * 1024
#: PINGs, PONGs, STATUS and GOAWAY frames (each) a peer may send per interval (see "Budgets")
MAX_CONTROL_PER_INTERVAL = 100
#: frames that change nothing a peer may send per interval (see "Budgets")
MAX_NOOP_PER_INTERVAL = 10_000
#: the budgets above are for an interval this long (a longer one scales them up)
BUDGET_INTERVAL = 5.0
#: streams whose leftover receive credit is remembered after we reset them
MAX_GONE_CREDIT = 4096
_CONTROL = (FrameType.PING, FrameType.PONG, FrameType.STATUS, FrameType.GOAWAY)


# ---- events --------------------------------------------------------------------------------


@attrs.define(slots=True)
class Hello:
    version: int
    role: str
    window: int
    max_streams: int
    name: str = ""
    route: str = ""
    ready: bool = True
    capacity: int = 0  # requests the connector serves at once (0: max_streams)
    probe: bool = False  # `trio-bridge check`: judge this hello, then close; serve nothing
    #: models the connector's LLM serves; None: not said (an older connector: serves anything)
    models: tuple[str, ...] | None = None
    priority: int = 0  # the broker prefers connectors with a higher priority while they are up


@attrs.define(slots=True)
class Request:
    stream_id: int
    head: RequestHead
    end_stream: bool


@attrs.define(slots=True)
class Response:
    stream_id: int
    head: ResponseHead
    end_stream: bool


@attrs.define(slots=True)
class Data:
    stream_id: int
    data: bytes
    end_stream: bool


@attrs.define(slots=True)
class Reset:
    stream_id: int
    code: int
    reason: str


@attrs.define(slots=True)
class StreamError:
    """The peer broke the protocol on one stream; it is closed here, send the RESET."""

    stream_id: int
    code: int
    reason: str


@attrs.define(slots=True)
class WindowUpdate:
    stream_id: int
    increment: int


@attrs.define(slots=True)
class GoAway:
    reason: str


@attrs.define(slots=True)
class Ping:
    opaque: bytes


@attrs.define(slots=True)
class Pong:
    opaque: bytes


@attrs.define(slots=True)
class Status:
    ready: bool
    models: tuple[str, ...] | None = None  # None: unchanged / not said


Event = (
    Hello
    | Request
    | Response
    | Data
    | Reset
    | StreamError
    | WindowUpdate
    | GoAway
    | Ping
    | Pong
    | Status
)


# ---- the hello ---------------------------------------------------------------------------


def _decode_hello(payload: bytes) -> Hello:
    obj = load_json(payload, "HELLO")
    version = obj.get("version")
    if type(version) is not int:
        raise RemoteProtocolError("HELLO: version must be an integer")
    if version != VERSION:
        raise RemoteProtocolError(
            f"unsupported relay protocol version {version} (this side speaks {VERSION})"
        )
    window, max_streams = obj.get("window"), obj.get("max_streams")
    if type(window) is not int or not 1 <= window <= MAX_WINDOW:
        raise RemoteProtocolError("HELLO: window out of range")
    if type(max_streams) is not int or not 1 <= max_streams <= 1_000_000:
        raise RemoteProtocolError("HELLO: max_streams out of range")
    role, name, route, ready = (
        obj.get("role"),
        obj.get("name", ""),
        obj.get("route", ""),
        obj.get("ready", True),
    )
    if not (printable(role) and printable(name) and printable(route)):
        raise RemoteProtocolError("HELLO: role, name and route must be short printable text")
    if not isinstance(ready, bool):
        raise RemoteProtocolError("HELLO: ready must be a boolean")
    capacity = obj.get("capacity", 0)
    if type(capacity) is not int or not 0 <= capacity <= 1_000_000:
        raise RemoteProtocolError("HELLO: capacity out of range")
    probe = obj.get("probe", False)
    if not isinstance(probe, bool):
        raise RemoteProtocolError("HELLO: probe must be a boolean")
    priority = obj.get("priority", 0)
    if type(priority) is not int or not -1000 <= priority <= 1000:
        raise RemoteProtocolError("HELLO: priority out of range")
    models = _decode_models(obj.get("models"), "HELLO")
    assert isinstance(role, str) and isinstance(name, str) and isinstance(route, str)
    return Hello(
        version, role, window, max_streams, name, route, ready, capacity, probe, models, priority
    )


MAX_MODELS = 1000


def _model_name(m: Any) -> bool:
    return printable(m) and m != ""


def _decode_models(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if type(value) is not list or len(value) > MAX_MODELS or not all(map(_model_name, value)):
        raise RemoteProtocolError(
            f"{what}: models must be a list of at most {MAX_MODELS} names of printable text"
        )
    return tuple(value)


def _models_to_send(models: tuple[str, ...]) -> list[str]:
    """What the rule lets through of ``models`` (an LLM may list anything)."""
    return [m for m in models if _model_name(m)][:MAX_MODELS]


# ---- the state machine --------------------------------------------------------------------


class _Stream:
    __slots__ = (
        "head_received",
        "head_sent",
        "recv_open",
        "recv_window",
        "send_open",
        "send_window",
    )

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_open = True
        self.recv_open = True
        self.head_sent = False
        self.head_received = False
        self.send_window = send_window
        self.recv_window = recv_window


class Session:
    """The relay protocol state of one side of one relay connection.

    ``opener`` is True on the broker (it opens streams) and False on the connector.
    ``window`` is the per-stream receive window this side advertises; ``max_streams`` the
    number of concurrently open streams it accepts (acceptor) or advertises (opener).
    ``max_control`` and ``max_noop``: the budgets per interval (see the module docstring).
    """

    def __init__(
        self,
        *,
        opener: bool,
        window: int = DEFAULT_WINDOW,
        max_streams: int = 1000,
        max_control: int = MAX_CONTROL_PER_INTERVAL,
        max_noop: int = MAX_NOOP_PER_INTERVAL,
    ) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError("window out of range")
        self.opener = opener
        self.window = window
        self.max_streams = max_streams
        self.max_control = max_control
        self.max_noop = max_noop
        self._control_limit, self._noop_limit = max_control, max_noop
        #: receive credit of streams we reset while the peer could still send (bounded)
        self._gone_credit: dict[int, int] = {}
        #: control frames received this interval, per type
        self.control_frames = dict.fromkeys(_CONTROL, 0)
        #: frames that changed nothing received this interval
        self.noop_frames = 0
        self.peer_hello: Hello | None = None
        self.hello_sent = False
        self.goaway_received = False
        self.goaway_sent = False
        self._decoder = FrameDecoder()
        self._streams: dict[int, _Stream] = {}
        self._highest_id = 0  # highest stream id opened (by us as opener, or by the peer)

    # -- introspection --
    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def send_window(self, stream_id: int) -> int:
        """Bytes this side may send on the stream now (0 if it is closed)."""
        s = self._streams.get(stream_id)
        return s.send_window if s is not None and s.send_open else 0

    @property
    def ready_to_open(self) -> bool:
        return (
            self.opener
            and self.hello_sent
            and self.peer_hello is not None
            and not self.goaway_received
            and not self.goaway_sent
        )

    # -- sending --
    def send_hello(
        self,
        *,
        role: str,
        name: str = "",
        route: str = "",
        ready: bool = True,
        capacity: int = 0,
        probe: bool = False,
        models: tuple[str, ...] | None = None,
        priority: int = 0,
    ) -> bytes:
        if self.hello_sent:
            raise LocalProtocolError("HELLO already sent")
        self.hello_sent = True
        payload = {
            "version": VERSION,
            "role": role,
            "window": self.window,
            "max_streams": self.max_streams,
            "name": name,
            "route": route,
            "ready": ready,
            "capacity": capacity,
        }
        if probe:
            payload["probe"] = True
        if models is not None:
            payload["models"] = _models_to_send(models)
        if priority:
            payload["priority"] = priority
        return encode_frame(FrameType.HELLO, 0, json.dumps(payload).encode())

    def open_stream(self, head: RequestHead, *, end_stream: bool) -> tuple[int, bytes]:
        """Open a new stream with a request head. Returns (stream id, bytes to send)."""
        if not self.ready_to_open:
            raise LocalProtocolError("cannot open a stream (no hello yet, or going away)")
        assert self.peer_hello is not None
        if len(self._streams) >= self.peer_hello.max_streams:
            raise LocalProtocolError("peer's max_streams reached")
        payload = encode_request_head(head)
        if len(payload) > MAX_PAYLOAD:  # nothing changed: the caller answers the client
            raise HeadTooLarge(f"the request head is {len(payload)} bytes encoded")
        stream_id = self._highest_id + 1
        self._highest_id = stream_id
        s = _Stream(self.peer_hello.window, self.window)
        s.head_sent = True
        s.send_open = not end_stream
        self._streams[stream_id] = s
        flags = FLAG_END_STREAM if end_stream else 0
        return stream_id, encode_frame(FrameType.REQUEST, stream_id, payload, flags)

    def send_response(self, stream_id: int, head: ResponseHead, *, end_stream: bool) -> bytes:
        s = self._local_stream(stream_id)
        if self.opener:
            raise LocalProtocolError("the opener does not send responses")
        if s.head_sent:
            raise LocalProtocolError("response head already sent")
        s.head_sent = True
        frame = encode_frame(
            FrameType.RESPONSE,
            stream_id,
            encode_response_head(head),
            FLAG_END_STREAM if end_stream else 0,
        )
        if end_stream:
            self._close_send(stream_id, s)
        return frame

    def send_data(self, stream_id: int, data: Payload, *, end_stream: bool = False) -> bytes:
        """Encode ``data`` as one DATA frame. ``len(data)`` must fit the window and MAX_PAYLOAD."""
        s = self._local_stream(stream_id)
        if not s.head_sent:
            raise LocalProtocolError("DATA before the head")
        n = len(data)
        if n > s.send_window:
            raise LocalProtocolError(f"DATA of {n} bytes exceeds the send window {s.send_window}")
        if n > MAX_PAYLOAD:
            raise LocalProtocolError("DATA larger than MAX_PAYLOAD")
        s.send_window -= n
        frame = encode_frame(FrameType.DATA, stream_id, data, FLAG_END_STREAM if end_stream else 0)
        if end_stream:
            self._close_send(stream_id, s)
        return frame

    def send_reset(self, stream_id: int, code: int, reason: str) -> bytes:
        """Reset a stream (idempotent on a stream that is already closed)."""
        if not 0 < stream_id <= self._highest_id:
            raise LocalProtocolError(f"RESET on stream {stream_id} that was never opened")
        s = self._streams.pop(stream_id, None)
        if s is not None and s.recv_open and s.head_received:
            # the peer may have sent up to this much before it sees the RESET: DATA within it
            # is the honest crossing of a reset, not a flood
            gone = self._gone_credit
            gone[stream_id] = s.recv_window
            if len(gone) > MAX_GONE_CREDIT:
                del gone[next(iter(gone))]
        return encode_reset(stream_id, code, reason)

    def send_window_update(self, stream_id: int, increment: int) -> bytes:
        """Grant the peer ``increment`` more bytes; b"" if the stream no longer receives."""
        s = self._streams.get(stream_id)
        if s is None or not s.recv_open:
            return b""
        if increment < 1 or s.recv_window + increment > MAX_WINDOW:
            raise LocalProtocolError("window increment out of range")
        s.recv_window += increment
        return encode_window(stream_id, increment)

    def send_goaway(self, reason: str) -> bytes:
        self.goaway_sent = True
        return encode_goaway(reason)

    def send_ping(self, opaque: bytes) -> bytes:
        if len(opaque) != 8:
            raise LocalProtocolError("PING payload must be 8 bytes")
        return encode_frame(FrameType.PING, 0, opaque)

    def send_pong(self, opaque: bytes) -> bytes:
        return encode_frame(FrameType.PONG, 0, opaque)

    def send_status(self, *, ready: bool, models: tuple[str, ...] | None = None) -> bytes:
        if self.opener:
            raise LocalProtocolError("only the connector sends STATUS")
        doc: dict[str, Any] = {"ready": ready}
        if models is not None:
            doc["models"] = _models_to_send(models)
        return encode_frame(FrameType.STATUS, 0, json.dumps(doc).encode())

    def _local_stream(self, stream_id: int) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None or not s.send_open:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        return s

    def _close_send(self, stream_id: int, s: _Stream) -> None:
        s.send_open = False
        if not s.recv_open:
            del self._streams[stream_id]

    def _close_recv(self, stream_id: int, s: _Stream) -> None:
        s.recv_open = False
        if not s.send_open:
            del self._streams[stream_id]

    # -- receiving --
    def receive_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)

    def new_interval(self, seconds: float | None = None) -> None:
        """Renew the budgets: a new interval begins (the relay calls this each ping interval).
        ``seconds``: its length; budgets are per BUDGET_INTERVAL seconds and grow with longer
        intervals (a peer pinging every 5 s is honest whatever our own interval is)."""
        self.control_frames = dict.fromkeys(_CONTROL, 0)
        self.noop_frames = 0
        if seconds is not None:
            scale = max(1.0, seconds / BUDGET_INTERVAL)
            self._control_limit = int(self.max_control * scale)
            self._noop_limit = int(self.max_noop * scale)

    def _control(self, t: FrameType) -> None:
        n = self.control_frames[t] = self.control_frames[t] + 1
        if n > self._control_limit:
            raise RemoteProtocolError(
                f"{t.name.lower()} flood: more than {self._control_limit} {t.name} frames in "
                "one interval"
            )

    def _noop(self, what: str) -> None:
        """Count a frame that changed nothing here (``what``: which, for the error)."""
        self.noop_frames += 1
        if self.noop_frames > self._noop_limit:
            raise RemoteProtocolError(
                f"flood of frames that change nothing: more than {self._noop_limit} in one "
                f"interval (the last: {what})"
            )

    def next_event(self) -> Event | None:
        """The next event, or None when more data is needed.

        Raises RemoteProtocolError when the peer broke the relay; the session is then dead.
        """
        while True:
            frame = self._decoder.next_frame()
            if frame is None:
                return None
            event = self._handle(frame)
            if event is not None:
                return event

    def _handle(self, f: Frame) -> Event | None:
        t = f.type
        if self.peer_hello is None:
            if t is not FrameType.HELLO:
                if t is FrameType.GOAWAY:
                    self._control(t)
                    return GoAway(decode_goaway(f.payload))
                raise RemoteProtocolError(f"expected HELLO, got {t.name}")
            self.peer_hello = _decode_hello(f.payload)
            return self.peer_hello
        if t is FrameType.DATA:
            return self._on_data(f)
        if t is FrameType.WINDOW:
            return self._on_window(f)
        if t is FrameType.RESET:
            code, reason = decode_reset(f.payload)
            if self._peer_stream(f.stream_id) is None:
                self._noop("RESET of a closed stream")
                return None
            del self._streams[f.stream_id]
            return Reset(f.stream_id, code, reason)
        if t is FrameType.REQUEST:
            return self._on_request(f)
        if t is FrameType.RESPONSE:
            return self._on_response(f)
        if t is FrameType.PING:
            self._control(t)
            if len(f.payload) != 8:
                raise RemoteProtocolError("PING payload must be 8 bytes")
            return Ping(f.payload)
        if t is FrameType.PONG:
            self._control(t)
            if len(f.payload) != 8:
                raise RemoteProtocolError("PONG payload must be 8 bytes")
            return Pong(f.payload)
        if t is FrameType.GOAWAY:
            self._control(t)
            self.goaway_received = True
            return GoAway(decode_goaway(f.payload))
        if t is FrameType.STATUS:
            return self._on_status(f)
        assert t is FrameType.HELLO
        raise RemoteProtocolError("second HELLO")

    def _on_window(self, f: Frame) -> Event | None:
        s = self._peer_stream(f.stream_id)
        increment = decode_window(f.payload)
        if s is None or not s.send_open:
            self._noop("WINDOW on a stream we no longer send on")
            return None
        window = s.send_window + increment
        if window > MAX_WINDOW:
            del self._streams[f.stream_id]
            return StreamError(f.stream_id, ResetCode.FLOW_CONTROL, "window overflow")
        peer_window = self.peer_window
        if increment < peer_window >> 2 or window > peer_window:
            # credit in crumbs, or credit for bytes we never sent: honest receivers do neither
            self._noop("WINDOW granting less than a quarter of the window or unused credit")
        s.send_window = window
        return WindowUpdate(f.stream_id, increment)

    def _on_status(self, f: Frame) -> Status:
        if not self.opener:
            raise RemoteProtocolError("STATUS from the broker")
        self._control(FrameType.STATUS)
        obj = load_json(f.payload, "STATUS")
        ready = obj.get("ready")
        if not isinstance(ready, bool):
            raise RemoteProtocolError("STATUS: ready must be a boolean")
        return Status(ready, _decode_models(obj.get("models"), "STATUS"))

    def _peer_stream(self, stream_id: int) -> _Stream | None:
        """The stream a peer frame refers to; None if it was closed; error if never opened."""
        s = self._streams.get(stream_id)
        if s is None and stream_id > self._highest_id:
            raise RemoteProtocolError(f"frame for stream {stream_id} that was never opened")
        return s

    def _on_data(self, f: Frame) -> Event | None:
        s = self._peer_stream(f.stream_id)
        if s is None:
            left = self._gone_credit.get(f.stream_id)
            n = len(f.payload)
            if left is not None and n <= left and (n or f.end_stream):
                if f.end_stream:
                    del self._gone_credit[f.stream_id]
                else:
                    self._gone_credit[f.stream_id] = left - n
                return None  # sent before the peer saw our RESET, within its credit
            self._noop("DATA on a closed stream")
            return None
        if not s.recv_open:
            del self._streams[f.stream_id]
            return StreamError(f.stream_id, ResetCode.PROTOCOL_ERROR, "DATA after end of stream")
        if not s.head_received:
            del self._streams[f.stream_id]
            return StreamError(f.stream_id, ResetCode.PROTOCOL_ERROR, "DATA before the head")
        n = len(f.payload)
        if n > s.recv_window:
            del self._streams[f.stream_id]
            return StreamError(f.stream_id, ResetCode.FLOW_CONTROL, "DATA beyond the window")
        end = f.end_stream
        if not n and not end:
            self._noop("empty DATA")
            return None
        s.recv_window -= n
        if end:
            self._close_recv(f.stream_id, s)
        return Data(f.stream_id, f.payload, end)

    def _on_request(self, f: Frame) -> Event | None:
        if self.opener:
            raise RemoteProtocolError("REQUEST sent to the broker")
        if self.goaway_sent and f.stream_id > self._highest_id:
            # We said we take no new streams; the peer may not have seen it yet.
            self._highest_id = f.stream_id
            self._noop("REQUEST after our GOAWAY")
            return StreamError(f.stream_id, ResetCode.REFUSED, "connector is draining")
        if f.stream_id <= self._highest_id:
            raise RemoteProtocolError(f"stream id {f.stream_id} reused or out of order")
        self._highest_id = f.stream_id
        head = decode_request_head(f.payload)
        if len(self._streams) >= self.max_streams:
            self._noop("REQUEST beyond max_streams")
            return StreamError(f.stream_id, ResetCode.REFUSED, "too many concurrent streams")
        s = _Stream(self.peer_window, self.window)
        s.head_received = True
        self._streams[f.stream_id] = s
        if f.end_stream:
            s.recv_open = False
        return Request(f.stream_id, head, f.end_stream)

    def _on_response(self, f: Frame) -> Event | None:
        if not self.opener:
            raise RemoteProtocolError("RESPONSE sent to the connector")
        s = self._peer_stream(f.stream_id)
        if s is None:
            self._noop("RESPONSE on a closed stream")
            return None
        if s.head_received:
            del self._streams[f.stream_id]
            return StreamError(f.stream_id, ResetCode.PROTOCOL_ERROR, "second RESPONSE head")
        head = decode_response_head(f.payload)
        s.head_received = True
        if f.end_stream:
            self._close_recv(f.stream_id, s)
        return Response(f.stream_id, head, f.end_stream)

    @property
    def peer_window(self) -> int:
        assert self.peer_hello is not None
        return self.peer_hello.window


__all__ = [
    "BUDGET_INTERVAL",
    "DEFAULT_WINDOW",
    "MAX_CONTROL_PER_INTERVAL",
    "MAX_GONE_CREDIT",
    "MAX_MODELS",
    "MAX_NOOP_PER_INTERVAL",
    "Data",
    "Event",
    "GoAway",
    "Hello",
    "Ping",
    "Pong",
    "Request",
    "RequestHead",
    "Reset",
    "Response",
    "ResponseHead",
    "Session",
    "Status",
    "StreamError",
    "WindowUpdate",
    "decode_request_head",
    "decode_response_head",
    "encode_request_head",
    "encode_response_head",
]

"""Relay frame codec (sans-IO: no trio, no network).

Wire format, version 1
======================

The relay is one WebSocket connection (binary messages only) from the connector to the broker,
at the broker's reserved path ``/_bridge/relay``. The connector authenticates in the upgrade
request (``Authorization: Bearer <connector token>``); a wrong token gets HTTP 401 and never a
relay. Each WebSocket message carries one or more whole frames back to back; a sender may
coalesce any frames that are ready at the same time into one message (at most
``MAX_MESSAGE`` bytes). A frame never spans two messages, but the decoder below does not rely on
that: it is a byte-stream decoder that works under any chunking.

Every frame is a 10-byte header followed by ``length`` payload bytes::

    0      1      2              6              10
    +------+------+--------------+--------------+-------------------+
    | type | flags| stream id    | length       | payload ...       |
    | u8   | u8   | u32 BE       | u32 BE       | `length` bytes    |
    +------+------+--------------+--------------+-------------------+

``length`` must not exceed ``MAX_PAYLOAD`` (64 KiB); larger is a protocol error. Unknown types,
unknown flag bits and a stream id of the wrong kind (0 for stream frames, non-zero for relay
frames) are protocol errors. Flag bit 0x01 is END_STREAM (on REQUEST, RESPONSE and DATA).

=====  ==========  ======  ===============================================================
type   name        stream  payload
=====  ==========  ======  ===============================================================
0x01   HELLO       0       UTF-8 JSON object: ``{"version": 1, "role": "connector"|"broker",
                           "window": <initial per-stream receive window, bytes>,
                           "max_streams": <n>, "name": str, "route": str, "ready": bool,
                           "capacity": <requests served at once; 0 = max_streams>,
                           "probe": true (optional: a `check`; the broker answers HELLO
                           or GOAWAY, then serves nothing on it), "models": [names]
                           (optional: what the LLM serves; absent = anything),
                           "priority": int (optional, default 0: preferred while up)}``.
                           Unknown keys are ignored (new optional keys stay compatible).
                           The first frame each way. The connector sends first; the broker
                           answers with its own HELLO or a GOAWAY naming the reason
                           (e.g. another major version) and closes.
0x02   REQUEST     id      UTF-8 JSON request head ``{"method", "target", "headers":
                           [[name, value], ...], "id": correlation id}``; header names and
                           values are latin-1 decoded strings. Broker → connector only; opens
                           stream ``id``. Ids are chosen by the broker, strictly increasing.
0x03   RESPONSE    id      UTF-8 JSON response head ``{"status": int, "headers": [...]}``.
                           Connector → broker only, at most once per stream.
0x04   DATA        id      raw body bytes (request body broker → connector, response body
                           connector → broker). Never JSON, never re-encoded.
0x05   RESET       id      u16 BE code + UTF-8 reason (≤ 256 bytes). Ends the stream both
                           ways. Codes: see ``ResetCode``.
0x06   WINDOW      id      u32 BE increment (1 .. 2^31-1) of the peer's send window on the
                           stream.
0x07   GOAWAY      0       UTF-8 reason (≤ 1024 bytes). The sender takes no new streams
                           (connector draining, or broker refusing the hello); streams already
                           open continue.
0x08   PING        0       8 opaque bytes; answer with PONG carrying the same bytes.
0x09   PONG        0       8 opaque bytes.
0x0A   STATUS      0       UTF-8 JSON ``{"ready": bool, "models": [names] (optional)}``:
                           the connector's readiness or its LLM's models changed.
=====  ==========  ======  ===============================================================

Reasons (RESET, GOAWAY) are shown to people and written to logs: a receiver decodes them as
UTF-8 with every invalid sequence and every character that is not printable (controls, format
characters, separators other than the space) replaced by U+FFFD. What JSON payloads may hold is
``_protocol``'s rule (see its docstring).

Flow control works like HTTP/2's per-stream windows: a side may send DATA on a stream only
while the byte count stays within the window its peer advertised (HELLO ``window``, then
WINDOW increments). Exceeding it is a stream error (RESET with FLOW_CONTROL). Heads and control
frames are not flow controlled; their sizes are bounded by ``MAX_PAYLOAD``.
"""

from __future__ import annotations

import enum
import struct

from trio_bridge._errors import RemoteProtocolError

VERSION = 1
HEADER = struct.Struct("!BBII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 64 * 1024
#: WebSocket message cap set explicitly on both ends (trio-websocket defaults to 1 MiB).
MAX_MESSAGE = 1024 * 1024
MAX_RESET_REASON = 256
MAX_GOAWAY_REASON = 1024
MAX_WINDOW = 2**31 - 1

FLAG_END_STREAM = 0x01


class FrameType(enum.IntEnum):
    HELLO = 0x01
    REQUEST = 0x02
    RESPONSE = 0x03
    DATA = 0x04
    RESET = 0x05
    WINDOW = 0x06
    GOAWAY = 0x07
    PING = 0x08
    PONG = 0x09
    STATUS = 0x0A


class ResetCode(enum.IntEnum):
    NO_ERROR = 0  # response complete; stop sending the rest of the request body
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    CANCEL = 3  # the client went away
    REFUSED = 4  # not processed at all: safe to retry elsewhere
    TIMEOUT = 5
    UPSTREAM_ERROR = 6  # the LLM failed mid-response
    FLOW_CONTROL = 7
    SHUTDOWN = 8
    TOO_LARGE = 9  # request body over the limit
    RELAY_LOST = 10  # never on the wire: the relay itself went away


_STREAM_TYPES = frozenset(
    {FrameType.REQUEST, FrameType.RESPONSE, FrameType.DATA, FrameType.RESET, FrameType.WINDOW}
)
_FLAGS_ALLOWED = {
    FrameType.REQUEST: FLAG_END_STREAM,
    FrameType.RESPONSE: FLAG_END_STREAM,
    FrameType.DATA: FLAG_END_STREAM,
}
_TYPE_BY_VALUE = {t.value: t for t in FrameType}
_RESET = struct.Struct("!H")
_U32 = struct.Struct("!I")


class Frame:
    """One decoded frame. ``payload`` is a ``bytes`` object (never a view)."""

    __slots__ = ("flags", "payload", "stream_id", "type")

    def __init__(self, type: FrameType, flags: int, stream_id: int, payload: bytes) -> None:
        self.type = type
        self.flags = flags
        self.stream_id = stream_id
        self.payload = payload

    @property
    def end_stream(self) -> bool:
        return bool(self.flags & FLAG_END_STREAM)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and (
            (self.type, self.flags, self.stream_id, self.payload)
            == (other.type, other.flags, other.stream_id, other.payload)
        )

    def __repr__(self) -> str:
        return (
            f"Frame({self.type.name}, flags={self.flags:#x}, stream={self.stream_id}, "
            f"payload={self.payload[:40]!r}{'...' if len(self.payload) > 40 else ''})"
        )


#: what a payload may be: a slice of a big body travels as a memoryview until encoded
Payload = bytes | bytearray | memoryview


def encode_frame(type: FrameType, stream_id: int, payload: Payload = b"", flags: int = 0) -> bytes:
    """Encode one frame (header and payload in one copy). Raises ValueError for sizes the
    format cannot carry."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(type, flags, stream_id, len(payload)) + payload


def encode_reset(stream_id: int, code: int, reason: str) -> bytes:
    raw = reason.encode("utf-8", "replace")[:MAX_RESET_REASON]
    return encode_frame(FrameType.RESET, stream_id, _RESET.pack(code) + raw)


def encode_goaway(reason: str) -> bytes:
    """A GOAWAY frame; a reason over MAX_GOAWAY_REASON bytes is cut (at a character)."""
    raw = reason.encode("utf-8", "replace")
    if len(raw) > MAX_GOAWAY_REASON:
        raw = raw[:MAX_GOAWAY_REASON].decode("utf-8", "ignore").encode()
    return encode_frame(FrameType.GOAWAY, 0, raw)


def shown_text(raw: bytes) -> str:
    """A peer's reason as text fit for a log line: UTF-8, anything invalid or not printable
    replaced by U+FFFD (no terminal escapes, no line breaks, no lone surrogates)."""
    text = raw.decode("utf-8", "replace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def decode_goaway(payload: bytes) -> str:
    if len(payload) > MAX_GOAWAY_REASON:
        raise RemoteProtocolError(f"GOAWAY reason over {MAX_GOAWAY_REASON} bytes")
    return shown_text(payload)


def encode_window(stream_id: int, increment: int) -> bytes:
    return encode_frame(FrameType.WINDOW, stream_id, _U32.pack(increment))


def decode_reset(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2 or len(payload) > 2 + MAX_RESET_REASON:
        raise RemoteProtocolError("malformed RESET payload")
    (code,) = _RESET.unpack_from(payload)
    return code, shown_text(payload[2:])


def decode_window(payload: bytes) -> int:
    if len(payload) != 4:
        raise RemoteProtocolError("malformed WINDOW payload")
    increment: int = _U32.unpack(payload)[0]
    if not 1 <= increment <= MAX_WINDOW:
        raise RemoteProtocolError(f"WINDOW increment {increment} out of range")
    return increment


class FrameDecoder:
    """Incremental decoder: feed bytes in any chunking, take whole frames out.

    Invariant: ``_buf[_pos:]`` holds the undecoded bytes; it never grows past one frame header
    plus ``MAX_PAYLOAD`` beyond what the caller fed in a single call, because frames are
    validated as soon as their header is complete.
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def receive_data(self, data: bytes) -> None:
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos :] + data
        else:
            self._buf = data
        self._pos = 0

    @property
    def pending(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buf) - self._pos

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more data is needed.

        Raises RemoteProtocolError (and nothing else) for a malformed frame; the decoder is
        then unusable.
        """
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        type_value, flags, stream_id, length = HEADER.unpack_from(buf, pos)
        frame_type = _TYPE_BY_VALUE.get(type_value)
        if frame_type is None:
            raise RemoteProtocolError(f"unknown frame type {type_value:#x}")
        if length > MAX_PAYLOAD:
            raise RemoteProtocolError(f"frame length {length} exceeds {MAX_PAYLOAD}")
        if flags & ~_FLAGS_ALLOWED.get(frame_type, 0):
            raise RemoteProtocolError(f"invalid flags {flags:#x} on {frame_type.name}")
        if (stream_id != 0) != (frame_type in _STREAM_TYPES):
            raise RemoteProtocolError(f"{frame_type.name} frame on stream {stream_id}")
        end = pos + HEADER_SIZE + length
        if end > len(buf):
            return None
        self._pos = end
        return Frame(frame_type, flags, stream_id, buf[pos + HEADER_SIZE : end])

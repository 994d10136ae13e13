"""The frame codec: round trip under any chunking; garbage raises only RemoteProtocolError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_bridge._errors import RemoteProtocolError
from trio_bridge.relay._frames import (
    FLAG_END_STREAM,
    HEADER,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameType,
    decode_reset,
    decode_window,
    encode_frame,
    encode_reset,
    encode_window,
)

STREAM_TYPES = [
    FrameType.REQUEST,
    FrameType.RESPONSE,
    FrameType.DATA,
    FrameType.RESET,
    FrameType.WINDOW,
]
RELAY_TYPES = [t for t in FrameType if t not in STREAM_TYPES]


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    t = draw(st.sampled_from(list(FrameType)))
    sid = draw(st.integers(1, 2**32 - 1)) if t in STREAM_TYPES else 0
    flags = (
        draw(st.sampled_from([0, FLAG_END_STREAM]))
        if t in (FrameType.REQUEST, FrameType.RESPONSE, FrameType.DATA)
        else 0
    )
    payload = draw(st.binary(max_size=300))
    return Frame(t, flags, sid, payload)


def decode_all(decoder: FrameDecoder) -> list[Frame]:
    out = []
    while (f := decoder.next_frame()) is not None:
        out.append(f)
    return out


@given(st.lists(frames(), max_size=20), st.data())
def test_frames_round_trip_under_any_chunking(fs: list[Frame], data: st.DataObject) -> None:
    wire = b"".join(encode_frame(f.type, f.stream_id, f.payload, f.flags) for f in fs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = FrameDecoder()
    got: list[Frame] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        decoder.receive_data(wire[prev:cut])
        prev = cut
        got.extend(decode_all(decoder))
    assert got == fs
    assert decoder.pending == 0


@settings(max_examples=500)
@given(st.binary(max_size=2000))
def test_garbage_decodes_or_raises_only_the_protocol_error(garbage: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(garbage)
    try:
        frames_out = decode_all(decoder)
    except RemoteProtocolError:
        return
    # whatever decoded must re-encode to a prefix of the input
    wire = b"".join(encode_frame(f.type, f.stream_id, f.payload, f.flags) for f in frames_out)
    assert garbage.startswith(wire)


def test_absurd_length_is_rejected_from_the_header_alone() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(HEADER.pack(FrameType.DATA, 0, 1, 2**32 - 1))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decoder.next_frame()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (HEADER.pack(0x7F, 0, 0, 0), "unknown frame type"),
        (HEADER.pack(FrameType.DATA, 0, 0, 0), "on stream 0"),
        (HEADER.pack(FrameType.PING, 0, 3, 8), "on stream 3"),
        (HEADER.pack(FrameType.DATA, 0x80, 1, 0), "invalid flags"),
        (HEADER.pack(FrameType.WINDOW, FLAG_END_STREAM, 1, 4), "invalid flags"),
    ],
)
def test_malformed_headers_are_rejected(raw: bytes, match: str) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(raw)
    with pytest.raises(RemoteProtocolError, match=match):
        decoder.next_frame()


def test_encoder_refuses_oversized_payload() -> None:
    with pytest.raises(ValueError):
        encode_frame(FrameType.DATA, 1, b"x" * (MAX_PAYLOAD + 1))


@given(st.integers(0, 65535), st.text(max_size=300))
def test_reset_round_trip(code: int, reason: str) -> None:
    frame = encode_reset(5, code, reason)
    decoder = FrameDecoder()
    decoder.receive_data(frame)
    f = decoder.next_frame()
    assert f is not None
    got_code, got_reason = decode_reset(f.payload)
    assert got_code == code
    shown = reason.encode("utf-8", "replace")[:256].decode("utf-8", "replace")
    assert "".join(c if c.isprintable() else "\ufffd" for c in shown) == got_reason
    assert got_reason.isprintable() or not got_reason


def test_window_increment_bounds() -> None:
    assert decode_window(encode_window(1, 10)[HEADER.size :]) == 10
    for bad in (b"\x00\x00\x00\x00", b"\x80\x00\x00\x00", b"\x00\x01"):
        with pytest.raises(RemoteProtocolError):
            decode_window(bad)

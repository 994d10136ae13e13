"""The relay session state machine, driven without any I/O."""

from __future__ import annotations

import json

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_bridge._errors import LocalProtocolError, RemoteProtocolError
from trio_bridge._frames import FLAG_END_STREAM, FrameType, ResetCode, encode_frame
from trio_bridge._protocol import (
    MAX_CONTROL_PER_INTERVAL,
    MAX_NOOP_PER_INTERVAL,
    Data,
    Event,
    GoAway,
    Hello,
    Request,
    RequestHead,
    Reset,
    Response,
    ResponseHead,
    Session,
    StreamError,
    WindowUpdate,
    encode_request_head,
)

HEAD = RequestHead(
    "POST", "/v1/chat/completions?x=1", [(b"content-type", b"application/json")], "rid-1"
)


def events(session: Session, data: bytes) -> list[Event]:
    session.receive_data(data)
    out = []
    while (ev := session.next_event()) is not None:
        out.append(ev)
    return out


def pair(window: int = 1024, max_streams: int = 100) -> tuple[Session, Session]:
    broker = Session(opener=True, window=window, max_streams=max_streams)
    connector = Session(opener=False, window=window, max_streams=max_streams)
    [hello] = events(broker, connector.send_hello(role="connector", name="c1", route="r"))
    assert isinstance(hello, Hello) and hello.name == "c1" and hello.route == "r"
    [hello] = events(connector, broker.send_hello(role="broker"))
    assert isinstance(hello, Hello)
    return broker, connector


def test_request_and_response_round_trip_with_heads_and_bodies() -> None:
    broker, connector = pair()
    sid, wire = broker.open_stream(HEAD, end_stream=False)
    wire += broker.send_data(sid, b"hello ", end_stream=False)
    wire += broker.send_data(sid, b"world", end_stream=True)
    evs = events(connector, wire)
    assert evs == [
        Request(sid, HEAD, False),
        Data(sid, b"hello ", False),
        Data(sid, b"world", True),
    ]
    wire = connector.send_response(sid, ResponseHead(200, [(b"x", b"\xff")]), end_stream=False)
    wire += connector.send_data(sid, b"answer", end_stream=True)
    evs = events(broker, wire)
    assert evs == [
        Response(sid, ResponseHead(200, [(b"x", b"\xff")]), False),
        Data(sid, b"answer", True),
    ]
    assert broker.open_streams == 0 and connector.open_streams == 0


def test_streams_cannot_open_before_the_hello_exchange() -> None:
    broker = Session(opener=True)
    with pytest.raises(LocalProtocolError):
        broker.open_stream(HEAD, end_stream=True)


def test_first_frame_must_be_hello() -> None:
    connector = Session(opener=False)
    with pytest.raises(RemoteProtocolError, match="expected HELLO"):
        events(connector, encode_frame(FrameType.PING, 0, b"12345678"))


def test_other_major_version_is_refused_with_a_reason() -> None:
    broker = Session(opener=True)
    hello = json.dumps({"version": 2, "role": "connector", "window": 10, "max_streams": 1})
    with pytest.raises(RemoteProtocolError, match="unsupported relay protocol version 2"):
        events(broker, encode_frame(FrameType.HELLO, 0, hello.encode()))


def test_reused_stream_id_is_a_relay_error() -> None:
    broker, connector = pair()
    _, wire = broker.open_stream(HEAD, end_stream=True)
    events(connector, wire)
    with pytest.raises(RemoteProtocolError, match="reused"):
        events(connector, wire)


def test_frame_for_a_stream_never_opened_is_a_relay_error() -> None:
    _, connector = pair()
    with pytest.raises(RemoteProtocolError, match="never opened"):
        events(connector, encode_frame(FrameType.DATA, 7, b"x"))


def test_data_after_end_of_stream_resets_only_that_stream() -> None:
    broker, connector = pair()
    sid, wire = broker.open_stream(HEAD, end_stream=True)
    sid2, wire2 = broker.open_stream(HEAD, end_stream=False)
    events(connector, wire + wire2)
    [err] = events(connector, encode_frame(FrameType.DATA, sid, b"late"))
    assert isinstance(err, StreamError) and err.code == ResetCode.PROTOCOL_ERROR
    assert not connector.is_open(sid) and connector.is_open(sid2)
    # the relay keeps working for the other stream
    assert events(connector, broker.send_data(sid2, b"ok", end_stream=True)) == [
        Data(sid2, b"ok", True)
    ]


def test_sender_cannot_exceed_the_window() -> None:
    broker, _ = pair(window=10)
    sid, _ = broker.open_stream(HEAD, end_stream=False)
    broker.send_data(sid, b"x" * 10)
    assert broker.send_window(sid) == 0
    with pytest.raises(LocalProtocolError, match="window"):
        broker.send_data(sid, b"x")


def test_peer_overrunning_the_window_gets_a_flow_control_reset() -> None:
    broker, connector = pair(window=10)
    sid, wire = broker.open_stream(HEAD, end_stream=False)
    events(connector, wire)
    [err] = events(connector, encode_frame(FrameType.DATA, sid, b"x" * 11))
    assert isinstance(err, StreamError) and err.code == ResetCode.FLOW_CONTROL


def test_window_update_restores_credit() -> None:
    broker, connector = pair(window=10)
    sid, wire = broker.open_stream(HEAD, end_stream=False)
    events(connector, wire + broker.send_data(sid, b"x" * 10))
    [upd] = events(broker, connector.send_window_update(sid, 6))
    assert upd == WindowUpdate(sid, 6)
    assert broker.send_window(sid) == 6


def test_window_overflow_from_peer_is_a_stream_error() -> None:
    broker, connector = pair(window=10)
    sid, wire = broker.open_stream(HEAD, end_stream=False)
    events(connector, wire)
    [err] = events(broker, encode_frame(FrameType.WINDOW, sid, (2**31 - 1).to_bytes(4, "big")))
    assert isinstance(err, StreamError) and err.code == ResetCode.FLOW_CONTROL


def test_reset_closes_both_directions_and_late_frames_are_dropped() -> None:
    broker, connector = pair()
    sid, wire = broker.open_stream(HEAD, end_stream=False)
    events(connector, wire)
    [rst] = events(connector, broker.send_reset(sid, ResetCode.CANCEL, "client went away"))
    assert rst == Reset(sid, ResetCode.CANCEL, "client went away")
    with pytest.raises(LocalProtocolError):
        connector.send_response(sid, ResponseHead(200, []), end_stream=True)
    # a DATA frame that was in flight when the reset crossed it is dropped silently
    assert events(broker, encode_frame(FrameType.DATA, sid, b"late")) == []


def test_response_is_refused_from_the_broker_and_request_from_the_connector() -> None:
    broker, connector = pair()
    with pytest.raises(RemoteProtocolError):
        events(broker, encode_frame(FrameType.REQUEST, 1, b"{}"))
    with pytest.raises(RemoteProtocolError):
        events(connector, encode_frame(FrameType.RESPONSE, 1, b"{}"))


def test_second_response_head_resets_the_stream() -> None:
    broker, connector = pair()
    sid, wire = broker.open_stream(HEAD, end_stream=True)
    events(connector, wire)
    head = connector.send_response(sid, ResponseHead(200, []), end_stream=False)
    events(broker, head)
    [err] = events(broker, head)
    assert isinstance(err, StreamError)


def test_max_streams_refuses_extra_streams() -> None:
    broker, connector = pair(max_streams=1)
    connector.max_streams = 1
    sid1, w1 = broker.open_stream(HEAD, end_stream=False)
    with pytest.raises(LocalProtocolError, match="max_streams"):
        broker.open_stream(HEAD, end_stream=False)
    events(connector, w1)
    # a peer ignoring the limit gets a REFUSED reset
    [err] = events(
        connector,
        encode_frame(
            FrameType.REQUEST, sid1 + 1, b'{"method":"GET","target":"/","headers":[],"id":"x"}'
        ),
    )
    assert isinstance(err, StreamError) and err.code == ResetCode.REFUSED


def test_goaway_stops_new_streams_but_not_open_ones() -> None:
    broker, connector = pair()
    sid, wire = broker.open_stream(HEAD, end_stream=True)
    events(connector, wire)
    [ga] = events(broker, connector.send_goaway("draining"))
    assert ga == GoAway("draining")
    with pytest.raises(LocalProtocolError):
        broker.open_stream(HEAD, end_stream=True)
    evs = events(broker, connector.send_response(sid, ResponseHead(204, []), end_stream=True))
    assert evs == [Response(sid, ResponseHead(204, []), True)]


@pytest.mark.parametrize(
    "payload",
    [
        b"[]",
        b"not json",
        b'{"method":1}',
        b'{"method":"GET","target":"/","headers":[["a"]],"id":"x"}',
        b'{"method":"GET","target":"/","headers":[["\\u0100","v"]],"id":"x"}',
    ],
)
def test_malformed_request_heads_are_relay_errors(payload: bytes) -> None:
    _, connector = pair()
    with pytest.raises(RemoteProtocolError):
        events(connector, encode_frame(FrameType.REQUEST, 1, payload, FLAG_END_STREAM))


class RelayMachine(RuleBasedStateMachine):
    """Honest peers doing random legal things never see a protocol error, and every byte
    sent on a stream arrives in order exactly once, whatever the interleaving."""

    def __init__(self) -> None:
        super().__init__()
        self.broker, self.connector = pair(window=64, max_streams=8)
        self.to_connector = b""
        self.to_broker = b""
        self.sent: dict[int, bytes] = {}  # request bytes per stream
        self.received: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.reset: set[int] = set()

    @precondition(lambda self: self.broker.open_streams < 8)
    @rule(end=st.booleans())
    def open(self, end: bool) -> None:
        sid, wire = self.broker.open_stream(HEAD, end_stream=end)
        self.to_connector += wire
        self.sent[sid] = b""
        if end:
            self.ended.add(sid)

    @rule(data=st.data(), n=st.integers(0, 100), end=st.booleans())
    def send(self, data: st.DataObject, n: int, end: bool) -> None:
        live = [s for s in self.sent if s not in self.ended and s not in self.reset]
        if not live:
            return
        sid = data.draw(st.sampled_from(live))
        n = min(n, self.broker.send_window(sid))
        chunk = bytes([sid % 256]) * n
        self.to_connector += self.broker.send_data(sid, chunk, end_stream=end)
        self.sent[sid] += chunk
        if end:
            self.ended.add(sid)

    @rule(data=st.data())
    def reset_one(self, data: st.DataObject) -> None:
        live = [s for s in self.sent if s not in self.reset]
        if live:
            sid = data.draw(st.sampled_from(live))
            self.to_connector += self.broker.send_reset(sid, ResetCode.CANCEL, "x")
            self.reset.add(sid)

    @rule(k=st.integers(1, 200))
    def deliver_to_connector(self, k: int) -> None:
        part, self.to_connector = self.to_connector[:k], self.to_connector[k:]
        for ev in events(self.connector, part):
            assert not isinstance(ev, StreamError), ev
            if isinstance(ev, Data):
                self.received[ev.stream_id] = self.received.get(ev.stream_id, b"") + ev.data
                if ev.data:
                    self.to_broker += self.connector.send_window_update(ev.stream_id, len(ev.data))
            elif isinstance(ev, Request):
                self.received.setdefault(ev.stream_id, b"")

    @rule()
    def deliver_to_broker(self) -> None:
        for ev in events(self.broker, self.to_broker):
            assert isinstance(ev, WindowUpdate | Reset), ev
        self.to_broker = b""

    @invariant()
    def bytes_arrive_in_order_and_once(self) -> None:
        for sid, got in self.received.items():
            if sid not in self.reset:
                assert self.sent[sid].startswith(got)

    @invariant()
    def windows_never_negative(self) -> None:
        for sid in self.sent:
            assert self.broker.send_window(sid) >= 0


TestRelayMachine = RelayMachine.TestCase


# -- budgets: frames that do no work here are rate-limited per interval ----------------------

PING = encode_frame(FrameType.PING, 0, b"12345678")
PONG = encode_frame(FrameType.PONG, 0, b"12345678")
STATUS = encode_frame(FrameType.STATUS, 0, b'{"ready":true}')
GOAWAY = encode_frame(FrameType.GOAWAY, 0, b"bye")


@pytest.mark.parametrize(
    ("frame", "flood"),
    [
        (PING, "ping flood"),
        (PONG, "pong flood"),
        (STATUS, "status flood"),
        (GOAWAY, "goaway flood"),
    ],
)
def test_more_control_frames_than_the_budget_in_one_interval_is_a_relay_error(
    frame: bytes, flood: str
) -> None:
    broker, _ = pair()  # the broker's session: the only one that takes STATUS
    assert len(events(broker, frame * MAX_CONTROL_PER_INTERVAL)) == MAX_CONTROL_PER_INTERVAL
    with pytest.raises(RemoteProtocolError, match=flood):
        events(broker, frame)


def test_the_control_budget_is_renewed_every_interval() -> None:
    broker, connector = pair()
    for _ in range(5):
        events(broker, PONG * MAX_CONTROL_PER_INTERVAL + STATUS * MAX_CONTROL_PER_INTERVAL)
        events(connector, PING * MAX_CONTROL_PER_INTERVAL)
        broker.new_interval()
        connector.new_interval()


def _open(broker: Session, connector: Session, end_stream: bool = False) -> int:
    sid, wire = broker.open_stream(HEAD, end_stream=end_stream)
    events(connector, wire)
    return sid


def _noop_floods() -> dict[str, tuple[bool, object]]:
    """Frames that change nothing for their receiver; (sent to the broker?, a builder)."""

    def window_on_a_reset_stream(b: Session, c: Session) -> bytes:
        sid = _open(b, c)
        events(c, b.send_reset(sid, ResetCode.CANCEL, "x"))
        return encode_frame(FrameType.WINDOW, sid, (1024).to_bytes(4, "big"))

    def tiny_window_increments(b: Session, c: Session) -> bytes:
        sid = _open(b, c)
        return encode_frame(FrameType.WINDOW, sid, (1).to_bytes(4, "big"))

    def window_beyond_what_was_sent(b: Session, c: Session) -> bytes:
        sid = _open(b, c)  # nothing sent: the whole window is still there
        return encode_frame(FrameType.WINDOW, sid, (512).to_bytes(4, "big"))

    def window_after_our_end(b: Session, c: Session) -> bytes:
        sid = _open(b, c, end_stream=True)
        return encode_frame(FrameType.WINDOW, sid, (512).to_bytes(4, "big"))

    def reset_of_a_forgotten_stream(b: Session, c: Session) -> bytes:
        sid = _open(b, c)
        events(b, c.send_reset(sid, ResetCode.CANCEL, "x"))
        return encode_frame(FrameType.RESET, sid, b"\x00\x03")

    def data_on_a_forgotten_stream(b: Session, c: Session) -> bytes:
        sid = _open(b, c)
        events(b, c.send_reset(sid, ResetCode.CANCEL, "x"))
        return encode_frame(FrameType.DATA, sid, b"late")

    def empty_data(b: Session, c: Session) -> bytes:
        sid = _open(b, c)
        events(b, c.send_response(sid, ResponseHead(200, []), end_stream=False))
        return encode_frame(FrameType.DATA, sid, b"")

    return {
        "WINDOW on a reset stream": (True, window_on_a_reset_stream),
        "WINDOW increments of one byte": (True, tiny_window_increments),
        "WINDOW beyond what was sent": (True, window_beyond_what_was_sent),
        "WINDOW after our END": (True, window_after_our_end),
        "RESET of a forgotten stream": (True, reset_of_a_forgotten_stream),
        "DATA on a forgotten stream": (True, data_on_a_forgotten_stream),
        "empty DATA": (True, empty_data),
    }


@pytest.mark.parametrize("case", list(_noop_floods()))
def test_more_frames_that_change_nothing_than_the_budget_is_a_relay_error(case: str) -> None:
    broker, connector = pair(window=1024)
    _, build = _noop_floods()[case]
    frame = build(broker, connector)  # type: ignore[operator]
    events(broker, frame * MAX_NOOP_PER_INTERVAL)
    with pytest.raises(RemoteProtocolError, match="frames that change nothing"):
        events(broker, frame)


def test_requests_refused_beyond_max_streams_count_as_frames_that_change_nothing() -> None:
    broker, connector = pair(max_streams=1)
    connector.max_streams = 1
    _open(broker, connector)
    refused = b"".join(
        encode_frame(FrameType.REQUEST, sid, encode_request_head(HEAD), FLAG_END_STREAM)
        for sid in range(2, MAX_NOOP_PER_INTERVAL + 2)
    )
    evs = events(connector, refused)
    assert all(isinstance(e, StreamError) and e.code == ResetCode.REFUSED for e in evs)
    with pytest.raises(RemoteProtocolError, match="frames that change nothing"):
        events(
            connector,
            encode_frame(
                FrameType.REQUEST,
                MAX_NOOP_PER_INTERVAL + 2,
                encode_request_head(HEAD),
                FLAG_END_STREAM,
            ),
        )


def test_honest_credit_grants_are_not_counted_against_the_budget() -> None:
    """A receiver grants what its reader consumed once it reaches a quarter of its window
    (RelayStream._consumed): such WINDOW frames do work and are never counted."""
    broker, connector = pair(window=1024)
    sid = _open(broker, connector)
    for _ in range(MAX_NOOP_PER_INTERVAL + 1):
        events(connector, broker.send_data(sid, b"x" * 256))
        [upd] = events(broker, connector.send_window_update(sid, 256))
        assert upd == WindowUpdate(sid, 256)
    assert broker.noop_frames == 0

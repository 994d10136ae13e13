"""The relay session state machine, driven without any I/O."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_bridge._errors import LocalProtocolError, RemoteProtocolError
from trio_bridge.relay._frames import FLAG_END_STREAM, FrameType, ResetCode, encode_frame
from trio_bridge.relay._protocol import (
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
    Status,
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


# -- what a JSON payload may hold: one rule, the protocol error for the rest -------------------


def request_payload(**changes: object) -> bytes:
    doc: dict[str, object] = {
        "method": "POST",
        "target": "/v1/chat/completions?x=1",
        "headers": [["content-type", "application/json"]],
        "id": "rid-1",
    }
    doc.update(changes)
    return json.dumps(doc).encode()


GOOD_REQUESTS = {
    "plain": request_payload(),
    "every id character": request_payload(id="Az09._:-" + "x" * 120),
    "every method character": request_payload(method="!#$%&'*+-.^_`|~09AZaz"),
    "a 16 KiB target": request_payload(target="/" + "a" * (16 * 1024 - 1)),
    "obs-text and a tab in a value": request_payload(headers=[["x-a", "\u00ff\tb"]]),
    "an unknown key": request_payload(extra={"ignored": [1, 2]}),
}
BAD_REQUESTS = {
    "an empty id": request_payload(id=""),
    "an id of 129 characters": request_payload(id="x" * 129),
    "a space in the id": request_payload(id="a b"),
    "a newline at the end of the id": request_payload(id="rid\n"),
    "a lone surrogate in the id": request_payload(id="rid\ud800"),
    "a lone surrogate in the method": request_payload(method="GET\udc00"),
    "a method of 33 characters": request_payload(method="G" * 33),
    "a space in the method": request_payload(method="G T"),
    "an empty method": request_payload(method=""),
    "an empty target": request_payload(target=""),
    "a space in the target": request_payload(target="/a b"),
    "a control character in the target": request_payload(target="/a\x7f"),
    "non-ASCII in the target": request_payload(target="/\u00e9"),
    "a target over 16 KiB": request_payload(target="/" + "a" * (16 * 1024)),
    "a header name that is not a token": request_payload(headers=[["x a", "v"]]),
    "an empty header name": request_payload(headers=[["", "v"]]),
    "CR in a header value": request_payload(headers=[["x-a", "a\rb"]]),
    "LF in a header value": request_payload(headers=[["x-a", "a\nb"]]),
    "NUL in a header value": request_payload(headers=[["x-a", "a\x00b"]]),
    "a lone surrogate in a header value": request_payload(headers=[["x-a", "\udfff"]]),
    "a header value outside latin-1": request_payload(headers=[["x-a", "\u0100"]]),
    "no headers": b'{"method":"GET","target":"/","id":"x"}',
    "encoded surrogates (not UTF-8)": b'{"method":"GET","target":"/","headers":[],'
    b'"id":"\xed\xa0\x80"}',
    "UTF-16": request_payload().decode().encode("utf-16"),
    "a byte order mark": b"\xef\xbb\xbf" + request_payload(),
    "deep nesting": b'{"method":"GET","target":"/","headers":[],"id":"x","e":'
    + b"[" * 30_000
    + b"]" * 30_000
    + b"}",
    "deep nesting, cut short": b"[" * 60_000,
    "a huge number": request_payload(extra=int("9" * 4000)).replace(b"9" * 4000, b"9" * 5000),
}


@pytest.mark.parametrize("case", list(GOOD_REQUESTS))
def test_request_heads_within_the_rule_are_accepted(case: str) -> None:
    _, connector = pair()
    [req] = events(connector, encode_frame(FrameType.REQUEST, 1, GOOD_REQUESTS[case], 1))
    assert isinstance(req, Request)


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_request_heads_outside_the_rule_are_relay_errors(case: str) -> None:
    _, connector = pair()
    with pytest.raises(RemoteProtocolError, match="REQUEST"):
        events(connector, encode_frame(FrameType.REQUEST, 1, BAD_REQUESTS[case], 1))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b'{"status":200,"headers":[["x a","v"]]}', "header"),
        (b'{"status":200,"headers":[["x","a\\r\\nset-cookie: y"]]}', "header"),
        (b'{"status":200,"headers":[]' + b',"e":' + b"[" * 30_000 + b"]" * 30_000 + b"}", "JSON"),
    ],
)
def test_response_heads_outside_the_rule_are_relay_errors(payload: bytes, match: str) -> None:
    broker, connector = pair()
    sid = _open(broker, connector, end_stream=True)
    with pytest.raises(RemoteProtocolError, match=match):
        events(broker, encode_frame(FrameType.RESPONSE, sid, payload))


def hello_payload(**changes: object) -> bytes:
    doc: dict[str, object] = {"version": 1, "role": "connector", "window": 10, "max_streams": 1}
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "payload",
    [
        hello_payload(name="evil\ud800"),
        hello_payload(route="a\nb"),
        hello_payload(role="\x1b[31mred"),
        hello_payload(models=["ok", "bad\udc80"]),
        hello_payload(models=["tab\there"]),
        b'{"version":1,"role":"connector","window":10,"max_streams":1,"e":' + b"{" * 30_000 + b"}",
    ],
)
def test_hellos_outside_the_rule_are_relay_errors(payload: bytes) -> None:
    broker = Session(opener=True)
    with pytest.raises(RemoteProtocolError, match="HELLO"):
        events(broker, encode_frame(FrameType.HELLO, 0, payload))


def test_status_with_a_model_name_outside_the_rule_is_a_relay_error() -> None:
    broker, _ = pair()
    with pytest.raises(RemoteProtocolError, match="STATUS"):
        events(broker, encode_frame(FrameType.STATUS, 0, b'{"ready":true,"models":["a\\u0000"]}'))


def test_a_sender_leaves_out_model_names_the_rule_refuses() -> None:
    """An LLM may list anything; the relay must not fail over one odd name."""
    broker = Session(opener=True)
    connector = Session(opener=False)
    wire = connector.send_hello(role="connector", models=("good", "bad\n", "\ud800", "x" * 257))
    [hello] = events(broker, wire)
    assert isinstance(hello, Hello) and hello.models == ("good",)
    events(connector, broker.send_hello(role="broker"))
    [status] = events(broker, connector.send_status(ready=True, models=("a", "b\x00")))
    assert status == Status(True, ("a",))


def test_a_goaway_reason_is_capped_and_shown_without_control_characters() -> None:
    broker, connector = pair()
    [ga] = events(broker, encode_frame(FrameType.GOAWAY, 0, b"bye\x1b[2J\n\xff" + b"x" * 1000))
    assert ga == GoAway("bye\ufffd[2J\ufffd\ufffd" + "x" * 1000)
    with pytest.raises(RemoteProtocolError, match="GOAWAY"):
        events(connector, encode_frame(FrameType.GOAWAY, 0, b"x" * 1025))
    # and what we send fits: a long reason is cut, never refused
    [ga] = events(connector, broker.send_goaway("\u00e9" * 2000))
    assert isinstance(ga, GoAway) and len(ga.reason.encode()) <= 1024


def test_a_reset_reason_is_shown_without_control_characters() -> None:
    broker, connector = pair()
    sid = _open(broker, connector)
    [rst] = events(connector, encode_frame(FrameType.RESET, sid, b"\x00\x03bad\r\nnews"))
    assert rst == Reset(sid, ResetCode.CANCEL, "bad\ufffd\ufffdnews")


# -- properties: any bytes decode or raise the protocol error, and what decodes is sane ------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@st.composite
def json_heads(draw: st.DrawFn) -> bytes:
    """Heads near the rule: its keys with values of any JSON shape and any text."""
    text = st.text(max_size=40) | st.text(_TOKEN_CHARS, min_size=1, max_size=40)
    header = st.lists(text | json_values, min_size=0, max_size=3)
    doc = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "method": text | json_values,
                "target": text | json_values,
                "id": text | json_values,
                "headers": st.lists(header, max_size=4) | json_values,
                "status": st.integers(0, 1000) | json_values,
                "ready": st.booleans() | json_values,
                "models": st.lists(text, max_size=3) | json_values,
            },
        )
    )
    raw = json.dumps(doc, ensure_ascii=draw(st.booleans()), allow_nan=True)
    return raw.encode("utf-8", "surrogatepass")


def assert_sane(ev: Event) -> None:
    """What the rule promises about a decoded event."""
    if isinstance(ev, Request):
        h = ev.head
        assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", h.request_id)
        assert re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}", h.method)
        assert re.fullmatch(r"[\x21-\x7e]{1,16384}", h.target)
    if isinstance(ev, Request | Response):
        heads = ev.head.headers
        for name, value in heads:
            assert re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name)
            assert not set(value) & {0, 10, 13}
    if isinstance(ev, Status | Hello) and ev.models is not None:
        assert all(m.isprintable() for m in ev.models)
    if isinstance(ev, GoAway | Reset | StreamError):
        assert ev.reason.isprintable() or not ev.reason


@settings(max_examples=300, deadline=None)  # a shared machine: no per-example timing
@given(
    st.booleans(),
    st.lists(
        st.tuples(st.sampled_from(list(FrameType)), st.integers(0, 3), json_heads() | st.binary()),
        max_size=8,
    ),
    st.binary(max_size=200),
    st.integers(1, 64),
)
def test_any_frames_decode_within_the_rule_or_raise_the_protocol_error(
    opener: bool, frames: list[tuple[FrameType, int, bytes]], garbage: bytes, step: int
) -> None:
    """Frames with well-formed headers and payloads near the rule, then garbage, in any
    chunking: every event the session gives satisfies the rule, and nothing but
    RemoteProtocolError is raised."""
    broker, connector = pair()
    session = broker if opener else connector
    if not opener:
        for _ in range(3):
            events(connector, broker.open_stream(HEAD, end_stream=False)[1])
    else:
        for _ in range(3):
            broker.open_stream(HEAD, end_stream=False)
    wire = b"".join(
        encode_frame(t, sid, payload[: 64 * 1024], flags & (1 if t in (2, 3, 4) else 0))
        if (sid != 0) == (t in (2, 3, 4, 5, 6))
        else encode_frame(t, 0 if sid else 1, payload[: 64 * 1024])
        for t, sid, payload in frames
        for flags in [sid & 1]
    )
    wire += garbage
    try:
        for i in range(0, len(wire), step):
            for ev in events(session, wire[i : i + step]):
                assert_sane(ev)
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(json_heads(), st.sampled_from([FrameType.REQUEST, FrameType.RESPONSE, FrameType.STATUS]))
def test_any_json_head_decodes_within_the_rule_or_raises_the_protocol_error(
    payload: bytes, t: FrameType
) -> None:
    broker, connector = pair()
    if t is FrameType.REQUEST:
        session, sid = connector, 1
    else:
        session, sid = broker, (_open(broker, connector) if t is FrameType.RESPONSE else 0)
    try:
        evs = events(session, encode_frame(t, sid, payload[: 64 * 1024]))
    except RemoteProtocolError:
        return
    for ev in evs:
        assert_sane(ev)


head_text = st.text(_TOKEN_CHARS, min_size=1, max_size=20)


@given(
    st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True),
    st.text(_TOKEN_CHARS, min_size=1, max_size=32),
    st.from_regex(r"[\x21-\x7e]{1,200}", fullmatch=True),
    st.lists(
        st.tuples(head_text, st.binary(max_size=30).map(lambda b: b.translate(None, b"\r\n\x00")))
    ),
)
def test_request_heads_within_the_rule_round_trip(
    rid: str, method: str, target: str, headers: list[tuple[str, bytes]]
) -> None:
    broker, connector = pair()
    head = RequestHead(method, target, [(n.encode(), v) for n, v in headers], rid)
    [req] = events(connector, broker.open_stream(head, end_stream=True)[1])
    assert isinstance(req, Request) and req.head == head


def _pair() -> tuple[Session, Session]:
    opener, other = Session(opener=True), Session(opener=False)
    other.receive_data(opener.send_hello(role="broker"))
    other.next_event()
    opener.receive_data(other.send_hello(role="connector"))
    opener.next_event()
    return opener, other


def test_data_within_the_credit_of_a_stream_we_reset_is_not_a_flood() -> None:
    opener, other = _pair()
    head = RequestHead("POST", "/x", [], "rid")
    sid, wire = opener.open_stream(head, end_stream=False)
    other.receive_data(wire)
    assert other.next_event() is not None
    other.send_reset(sid, ResetCode.CANCEL, "answered early")
    # the opener sent these before it saw the RESET: one byte each, within its credit
    other.receive_data(b"".join(opener.send_data(sid, b"x") for _ in range(20_000)))
    while other.next_event() is not None:
        pass
    assert other.noop_frames == 0


def test_a_head_too_large_for_a_frame_changes_nothing() -> None:
    from trio_bridge._errors import HeadTooLarge

    opener, _ = _pair()
    head = RequestHead("GET", "/x", [(b"x-big", b"\xff" * 20_000)], "rid")
    with pytest.raises(HeadTooLarge):
        opener.open_stream(head, end_stream=True)
    assert opener.open_streams == 0
    sid, _ = opener.open_stream(RequestHead("GET", "/x", [], "rid"), end_stream=True)
    assert sid == 1


def test_budgets_grow_with_a_longer_interval() -> None:
    _, other = _pair()
    other.new_interval(60.0)  # the receiver pings once a minute; the peer every 5 s
    for n in range(12 * 10):
        other.receive_data(encode_frame(FrameType.PING, 0, n.to_bytes(8, "big")))
        while other.next_event() is not None:
            pass

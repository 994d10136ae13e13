"""Coverage-guided fuzzing of the relay codec and session (atheris).

Invariant: any bytes fed to a session (either side, after a valid hello) either decode into
events or raise RemoteProtocolError; never another exception, never unbounded memory. And what
decodes keeps the rule (``_protocol``'s docstring): request ids, methods, targets and header
names are plain ASCII of their alphabets, header values hold no CR, LF or NUL, every text is
printable (no control characters, no lone surrogates).

    pip install atheris
    python tests/fuzz/fuzz_relay.py -runs=20000          # what CI runs (a few seconds)
    python tests/fuzz/fuzz_relay.py -max_total_time=3600 # a longer hunt
"""

from __future__ import annotations

import json
import re
import sys

import atheris

with atheris.instrument_imports():
    from trio_bridge._errors import RemoteProtocolError
    from trio_bridge.relay._frames import FrameDecoder, FrameType, encode_frame
    from trio_bridge.relay._protocol import (
        GoAway,
        Hello,
        Request,
        Reset,
        Response,
        Session,
        Status,
        StreamError,
    )

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"[\x21-\x7e]{1,16384}")


def check(ev: object) -> None:
    """What the rule promises about a decoded event."""
    if isinstance(ev, Request):
        h = ev.head
        assert _ID.fullmatch(h.request_id) and _TARGET.fullmatch(h.target), h
        assert _TOKEN.fullmatch(h.method) and len(h.method) <= 32, h
    if isinstance(ev, Request | Response):
        for name, value in ev.head.headers:
            assert _TOKEN.fullmatch(name.decode("latin-1")), name
            assert not set(value) & {0, 10, 13}, value
    if isinstance(ev, Hello):
        assert all(x.isprintable() for x in (ev.role, ev.name, ev.route)), ev
    if isinstance(ev, Hello | Status) and ev.models is not None:
        assert all(m and m.isprintable() for m in ev.models), ev
    if isinstance(ev, GoAway | Reset | StreamError):
        assert ev.reason.isprintable() or not ev.reason, ev


HELLO = encode_frame(
    FrameType.HELLO,
    0,
    json.dumps({"version": 1, "role": "x", "window": 1 << 20, "max_streams": 8}).encode(),
)


def one_input(data: bytes) -> None:
    if not data:
        return
    opener = data[0] & 1
    session = Session(opener=bool(opener), window=4096, max_streams=8)
    if opener:
        session.send_hello(role="broker")
    session.receive_data(HELLO)
    session.next_event()
    rest = data[1:]
    step = 1 + (data[0] >> 1) % 64
    try:
        for i in range(0, len(rest), step):
            session.receive_data(rest[i : i + step])
            for _ in range(10_000):
                ev = session.next_event()
                if ev is None:
                    break
                check(ev)
    except RemoteProtocolError:
        return
    decoder = FrameDecoder()
    decoder.receive_data(rest)
    try:
        while decoder.next_frame() is not None:
            pass
    except RemoteProtocolError:
        pass
    assert decoder.pending <= len(rest)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()

"""Coverage-guided fuzzing of the relay codec and session (atheris).

Invariant: any bytes fed to a session (either side, after a valid hello) either decode into
events or raise RemoteProtocolError; never another exception, never unbounded memory.

    pip install atheris
    python tests/fuzz/fuzz_relay.py -runs=20000          # what CI runs (a few seconds)
    python tests/fuzz/fuzz_relay.py -max_total_time=3600 # a longer hunt
"""

from __future__ import annotations

import json
import sys

import atheris

with atheris.instrument_imports():
    from trio_bridge._errors import RemoteProtocolError
    from trio_bridge._frames import FrameDecoder, FrameType, encode_frame
    from trio_bridge._protocol import Session

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
                if session.next_event() is None:
                    break
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

"""A hostile connector that floods a broker with control frames, in a process of its own.

    python tests/floodpeer.py RELAY_URL TOKEN KIND SECONDS

It connects with a valid connector token (route ``flood``), says hello, then sends 1 MB
messages made of one kind of control frame (``pong``: 8-byte PONGs, ``status``: STATUS
``{"ready":true}``, ``ping``: PINGs) as fast as the broker takes them. When the broker drops the
relay it dials again at once (what an attacker would do), until SECONDS have passed. It prints
how many relays it opened and how many flood messages it sent, as one JSON line.

A process of its own, so that the flood's own CPU (masking 1 MB messages) is not spent in the
event loop whose latency a test measures.
"""

from __future__ import annotations

import json
import sys

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from trio_bridge.relay._frames import MAX_MESSAGE, FrameType, encode_frame
from trio_bridge.relay._protocol import Session

FRAMES = {
    "pong": encode_frame(FrameType.PONG, 0, b"12345678"),
    "ping": encode_frame(FrameType.PING, 0, b"12345678"),
    "status": encode_frame(FrameType.STATUS, 0, b'{"ready":true}'),
}


def flood_message(kind: str) -> bytes:
    frame = FRAMES[kind]
    return frame * ((MAX_MESSAGE - 64) // len(frame))


async def flood(url: str, token: str, kind: str, seconds: float) -> dict[str, int]:
    message = flood_message(kind)
    relays = messages = 0
    with trio.move_on_after(seconds):
        while True:
            try:
                async with open_websocket_url(
                    url,
                    extra_headers=[(b"authorization", b"Bearer " + token.encode())],
                    max_message_size=MAX_MESSAGE + 1024,
                ) as ws:
                    relays += 1
                    hello = Session(opener=False).send_hello(
                        role="connector", name="flood", route="flood"
                    )
                    await ws.send_message(hello)
                    while True:
                        await ws.send_message(message)
                        messages += 1
                        if messages == 1:
                            print("flooding", flush=True)
            except (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError):
                await trio.lowlevel.checkpoint()  # dropped: dial again at once
    return {"relays": relays, "messages": messages}


def main() -> None:
    url, token, kind, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    print(json.dumps(trio.run(flood, url, token, kind, seconds)), flush=True)


if __name__ == "__main__":
    main()

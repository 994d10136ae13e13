"""A fast fake OpenAI-compatible LLM for benchmarks: trio + h11, keep-alive, no framework.

    python bench/fakellm.py PORT

- ``POST /v1/chat/completions`` with ``"stream": false`` → a small JSON answer at once.
- with ``"stream": true`` → ``n`` SSE chunks (``?n=50``) ``delay_ms`` apart (``&delay_ms=20``).
- ``POST /upload`` → reads the whole body, answers its length.
- ``GET /forever`` → an SSE chunk every 10 ms until the client goes away; the time the
  connection closed is appended to the file named by the env var ``FAKELLM_CLOSE_LOG``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from urllib.parse import parse_qs

import h11
import trio

SMALL = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":" tok"},"finish_reason":null}]}\n\n'
)


async def handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                if event is h11.PAUSED and conn.our_state is h11.DONE:
                    conn.start_next_cycle()
                    continue
                return
            if not isinstance(event, h11.Request):
                continue
            target = event.target.decode()
            path, _, query = target.partition("?")
            params = {k: v[0] for k, v in parse_qs(query).items()}
            body = bytearray()
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
            if path == "/forever":
                await forever(stream, conn)
                return
            if path == "/upload":
                out = json.dumps({"received": len(body)}).encode()
                await send_whole(stream, conn, out, b"application/json")
            elif b'"stream": true' in body or b'"stream":true' in body:
                await sse(stream, conn, int(params.get("n", 50)), float(params.get("delay_ms", 20)))
            else:
                await send_whole(stream, conn, SMALL, b"application/json")
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
        return
    finally:
        await stream.aclose()


async def send_whole(
    stream: trio.SocketStream, conn: h11.Connection, body: bytes, ctype: bytes
) -> None:
    head = h11.Response(
        status_code=200,
        headers=[(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
    )
    await stream.send_all(
        conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    )


async def sse(stream: trio.SocketStream, conn: h11.Connection, n: int, delay_ms: float) -> None:
    head = h11.Response(
        status_code=200,
        headers=[(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")],
    )
    await stream.send_all(conn.send(head))
    for i in range(n):
        if i and delay_ms:
            await trio.sleep(delay_ms / 1000)
        await stream.send_all(conn.send(h11.Data(data=CHUNK)))
    await stream.send_all(
        conn.send(h11.Data(data=b"data: [DONE]\n\n")) + conn.send(h11.EndOfMessage())
    )


async def forever(stream: trio.SocketStream, conn: h11.Connection) -> None:
    head = h11.Response(
        status_code=200,
        headers=[(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")],
    )
    await stream.send_all(conn.send(head))
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            try:
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            while True:
                await stream.send_all(conn.send(h11.Data(data=CHUNK)))
                await trio.sleep(0.01)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            nursery.cancel_scope.cancel()
    log = os.environ.get("FAKELLM_CLOSE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{time.time()}\n")


async def main(port: int) -> None:
    await trio.serve_tcp(handle, port, host="127.0.0.1")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))

"""Reads and writes on the hot paths' sockets with fewer trips through trio's scheduler.

``trio.SocketStream`` tries every call first and yields after it: a write that the kernel takes
at once still costs a full schedule point (and two context managers), and a read on an idle
connection (the usual case: the next request, the next token) first fails with ``EAGAIN`` and
then waits. On the relay's hot paths (the public server, the WebSocket, the call to the LLM)
that is one or two extra task switches per message. Here:

- :func:`write_now` writes what the kernel takes right away, without waiting; the caller sends
  the rest (if any) with the stream's own ``send_all``, which waits, times out and reports
  errors as usual. A caller checks for cancellation first
  (``trio.lowlevel.checkpoint_if_cancelled``), so a cancelled task writes nothing.
- :func:`receive_some` waits until the socket is readable, then reads: one wait, no failed
  read. It is a checkpoint (the wait is), as ``receive_some`` is. It reads into one buffer
  per thread and copies out what came: ``recv(262144)`` allocates (and gives back) 256 KiB
  for every read, which made a read of a 300-byte message ~6x dearer than a 64 KiB one
  (measured: 19 vs 3 µs; here 3 µs at any size).

Anything that is not a plain ``trio.SocketStream`` (TLS, test streams) takes the stream's own
methods. Errors: a broken connection raises ``OSError`` (as the socket calls do); a stream
closed by another task raises ``trio.ClosedResourceError``, as trio's own methods do.
"""

from __future__ import annotations

import os
import sys
import threading

import trio

_FAST = sys.platform != "win32"  # os.readv / os.write on a socket: POSIX only
_BUFFER_SIZE = 256 * 1024


class _Buffers(threading.local):
    """The read buffer of a thread (each trio loop has its own: a read and the copy out of
    the buffer happen without a checkpoint in between, so one buffer serves a whole loop)."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(_BUFFER_SIZE))


_buffers = _Buffers()


def _fd(stream: trio.abc.Stream) -> int:
    """The socket's file descriptor when ``stream`` is a plain socket stream, else -1."""
    if _FAST and type(stream) is trio.SocketStream:
        return stream.socket.fileno()  # -1 once closed
    return -1


def write_now(stream: trio.abc.Stream, data: bytes | bytearray | memoryview) -> int:
    """Write as much of ``data`` as the kernel takes without waiting; the count written (0 for
    a stream that is not a plain socket, or a full send buffer)."""
    fd = _fd(stream)
    if fd < 0:
        return 0
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


async def send_all(stream: trio.abc.Stream, data: bytes | bytearray | memoryview) -> None:
    """``stream.send_all(data)``, without a schedule point when the kernel takes it all."""
    await trio.lowlevel.checkpoint_if_cancelled()
    sent = write_now(stream, data)
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:] if sent else data)


async def receive_some(stream: trio.abc.Stream, max_bytes: int) -> bytes | bytearray:
    """``stream.receive_some(max_bytes)``: wait for data, then read it (b"" at EOF; at most
    256 KiB at a time)."""
    fd = _fd(stream)
    if fd < 0:
        return await stream.receive_some(max_bytes)
    while True:
        await trio.lowlevel.wait_readable(fd)
        view = _buffers.view
        try:
            n = os.readv(fd, [view[:max_bytes]])
        except BlockingIOError:  # pragma: no cover - a spurious wake-up
            continue
        return view[:n].tobytes()

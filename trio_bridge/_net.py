"""Where the roles' bytes go: :class:`Network` opens streams to ``host:port`` and listeners on
them. The roles use :data:`TCP` (the machine's sockets) unless given another:
``trio_bridge.testing.MemoryNetwork`` runs a whole bridge in one process without a socket, so
its tests run on trio's autojump clock.

The rest of the package never calls ``trio.open_tcp_stream`` / ``open_tcp_listeners`` itself.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Protocol

import trio

Listener = trio.abc.Listener[trio.abc.Stream]


class Network(Protocol):
    async def open_stream(self, host: str, port: int) -> trio.abc.Stream:
        """A connected stream to ``host:port``; ``OSError`` if nothing listens there."""
        ...

    async def open_listeners(self, host: str, port: int) -> list[Listener]:
        """Listeners on ``host:port`` (port 0: any free one; see :func:`listener_address`)."""
        ...


class _TCP:
    """The machine's TCP sockets."""

    async def open_stream(self, host: str, port: int) -> trio.abc.Stream:
        """``trio.open_tcp_stream(host, port)``, without its resolver and happy-eyeballs
        tasks when ``host`` is an IP address (the usual ``local_url``): a new connection
        costs ~120 instead of ~280 µs of CPU (measured, accept and close included), and under
        a burst of new streams the connector opens many. Raises OSError when it fails."""
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:  # a name: resolve it, try each address
            return await trio.open_tcp_stream(host, port)
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def open_listeners(self, host: str, port: int) -> list[Listener]:
        listeners = await trio.open_tcp_listeners(port, host=host or None, backlog=1024)
        return list(listeners)


TCP: Network = _TCP()


def listener_address(listener: Listener) -> tuple[str, int]:
    """The (host, port) a listener is bound to."""
    address = getattr(listener, "address", None)  # a MemoryNetwork's listener
    if address is not None:
        return address  # type: ignore[no-any-return]
    sock = listener.socket  # type: ignore[attr-defined]
    host, port = sock.getsockname()[:2]
    return host, port


def peer_address(stream: trio.abc.Stream) -> str:
    """The IP address of the other end of an accepted stream (``OSError`` if it is gone)."""
    peer = getattr(stream, "peer", None)  # a MemoryNetwork's stream
    if peer is not None:
        return str(peer)
    return str(stream.socket.getpeername()[0])  # type: ignore[attr-defined]


def refused(host: str, port: int) -> OSError:
    return ConnectionRefusedError(errno.ECONNREFUSED, f"connection refused: {host}:{port}")

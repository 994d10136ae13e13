"""Small network helpers shared by the tests."""

from __future__ import annotations

import random
import socket
import time


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152  # the IANA range (macOS, BSD)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago, taken at random from below the kernel's
    range for outgoing connections: a port from that range (what binding port 0 gives) can be
    taken by a client connection of a test running in parallel before the server started for
    this one binds it ("address already in use", seen in CI)."""
    high = _ephemeral_low() - 1
    for _ in range(200):
        port = random.randint(max(1024, high - 12000), high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # pragma: no cover - 200 taken ports in a row
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float) -> None:
    """Block until something listens on 127.0.0.1:``port`` (a process started by a test)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on port {port}"
            time.sleep(0.05)

"""sd_notify: the roles tell systemd how they are, with no dependency: a few ``KEY=value`` lines
in a datagram to ``$NOTIFY_SOCKET``. The roles send ``READY=1`` once they serve, ``STATUS=…``
with their connection state, ``WATCHDOG=1`` from the event loop every ``WATCHDOG_USEC / 2`` (so a
wedged loop gets the process restarted), and ``STOPPING=1`` when they start draining.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import trio

log = logging.getLogger("trio_bridge.service")


class Notifier:
    """sd_notify client; every method is a no-op when not run by systemd (no NOTIFY_SOCKET)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]
        elif path.startswith("/"):
            self.address = path
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> None:
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def stopping(self, status: str = "draining") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    async def watchdog_loop(self, status: Callable[[], str] | None = None) -> None:
        """Send WATCHDOG=1 (and the current STATUS) from the event loop until cancelled."""
        if self.address is None:
            return  # noqa: ASYNC910  not run by systemd: nothing to send
        interval = self.watchdog_interval or 5.0
        while True:
            lines = ["WATCHDOG=1"] if self.watchdog_interval else []
            if status is not None:
                lines.append(f"STATUS={status()}")
            if lines:
                self.notify(*lines)
            await trio.sleep(interval)

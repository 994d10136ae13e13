"""The error tree of trio_bridge.

::

    BridgeError                      base of everything the package raises
    ├── ConfigError                  bad bridge.toml / key file, a port in use: one line
    ├── ProtocolError                relay protocol violation (sans-IO layer)
    │   ├── LocalProtocolError       we tried something illegal (a bug on our side)
    │   │   └── HeadTooLarge         a request head too large for one frame (answer 431)
    │   └── RemoteProtocolError      the peer did (close the relay, log the reason)
    ├── RelayClosed                  the relay is gone; .reason says why
    │   └── RelayRefused             the peer refused the hello (GOAWAY before HELLO)
    ├── RelayRejected                a dial answered with an HTTP status, not a WebSocket
    ├── StreamReset                  a stream was reset; .code and .reason from the reset frame
    ├── ClientError                  the public client's side of a request (broker)
    │   ├── ClientDisconnected       it went away before its body was read
    │   │   └── BodyTooSlow          its body came slower than min_body_rate
    │   ├── BadBody                  its body breaks HTTP framing (answered 400)
    │   └── BadTarget                a method or target that is never relayed (400/405/414)
    └── QueueFull                    a bounded queue is full (broker: 503; connector: 429)

Private control flow inside one module (``_TooLarge``, ``_HeadError``, ``_NothingReceived``)
subclasses BridgeError too, and never leaves its module.

Foreign exceptions are translated into these at one boundary each: ``_ws.py`` for wsproto,
``_server.py`` for h11 on the public side, ``_upstream.py`` (to httpx's tree) and
``_connector.py`` for the LLM connection.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


class BridgeError(Exception):
    """Base class of every error trio_bridge raises on purpose."""


class ConfigError(BridgeError):
    """The configuration (or a machine-managed key file) is unusable.

    ``str(err)`` is a single line that names the offending key.
    """


class ProtocolError(BridgeError):
    """A relay protocol violation."""


class LocalProtocolError(ProtocolError):
    """We attempted something the relay protocol forbids (a bug in the caller)."""


class HeadTooLarge(LocalProtocolError):
    """A request head that does not fit in one relay frame once encoded: nothing was sent or
    changed; the broker answers 431."""


class RemoteProtocolError(ProtocolError):
    """The peer violated the relay protocol; the relay must be closed."""


class RelayClosed(BridgeError):
    """The relay connection ended; ``reason`` tells why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RelayRefused(RelayClosed):
    """The peer refused the relay in the handshake (e.g. a route the token may not serve);
    ``reason`` is the peer's text. Retrying at once will not help."""


class StreamReset(BridgeError):
    """The stream was reset (by the peer, by us, or because the relay went away)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"stream reset ({code}): {reason}")
        self.code = code
        self.reason = reason


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


_BIND_ERRORS = {
    errno.EADDRINUSE: "address already in use (another process listens there)",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "no such address on this machine",
}


@contextlib.contextmanager
def listening(option: str, value: str) -> Iterator[None]:
    """Turn a failure to listen on ``value`` into a one-line ConfigError naming ``option``
    (trio and hypercorn report it as an OSError, possibly inside exception groups)."""
    try:
        yield
    except BaseException as exc:
        found = [e for e in leaves(exc) if isinstance(e, OSError)]
        if not found or len(found) != len(leaves(exc)):
            raise
        err = found[0]
        why = _BIND_ERRORS.get(err.errno or 0, err.strerror or str(err))
        raise ConfigError(f"cannot listen on {value}: {why}; change {option}") from None


class RelayRejected(BridgeError):
    """A relay dial got an HTTP answer instead of the WebSocket upgrade (``status``,
    ``body``: a 401 for a bad token, a 404 at a wrong path, ...)."""

    def __init__(self, status: int, body: bytes = b"") -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class ClientError(BridgeError):
    """About the public client of a request (the broker's side)."""


class UnsendableAnswer(BridgeError):
    """An answer HTTP/1.1 cannot carry: a head the server refuses (nothing of it was written:
    the connection can still answer), or body data that breaks the head's framing (the
    connection cannot go on). Not the client's doing: the fault of whoever made the answer."""


class ClientDisconnected(ClientError):
    """The client closed its connection (or broke the protocol) before its body was read."""


class BodyTooSlow(ClientDisconnected):
    """The client sent its body slower than ``min_body_rate``."""


class BadBody(ClientError):
    """The request body breaks HTTP framing (e.g. a bad chunk); the server answers 400."""


class QueueFull(BridgeError):
    """More requests wait than the queue's bound allows."""

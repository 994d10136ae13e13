"""The error tree of trio_bridge.

::

    BridgeError                      base of everything we raise on purpose
    ├── ConfigError                  bad bridge.toml / key file; .key names the offending key
    ├── ProtocolError                relay protocol violation (sans-IO layer)
    │   ├── LocalProtocolError       we tried something illegal (a bug on our side)
    │   └── RemoteProtocolError      the peer did (close the relay, log the reason)
    ├── RelayClosed                  the relay is gone; .reason says why
    │   └── RelayRefused             the peer refused the hello (GOAWAY before HELLO)
    └── StreamReset                  a stream was reset; .code and .reason from the reset frame

Foreign exceptions are translated into these at one boundary each: ``_ws.py`` for wsproto,
``_server.py`` for h11 on the public side, ``_upstream.py`` (to httpx's tree) and
``_connector.py`` for the LLM connection.
"""

from __future__ import annotations


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

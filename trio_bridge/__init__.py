"""trio_bridge: offer a local LLM's OpenAI-compatible API to the outside world.

A *connector* beside the LLM dials out a persistent, multiplexed relay to a public *broker*;
the broker forwards every HTTP request through it; the connector checks the API key and
forwards the request byte-exact to the LLM, streaming the answer back as it is generated.

Layout: folders in layers; a module imports only from its own folder and from the layers
below it (``tests/test_layout.py`` holds the rule):

- base: ``_errors`` (the error tree), ``_config``, ``_observe`` (logs, metrics), ``_backoff``,
  ``_notify`` (sd_notify).
- ``relay/`` and ``http/``, which know nothing of roles. ``relay``: ``_frames`` (the wire
  format) and ``_protocol`` (the relay session: streams, credit windows, goaway) are sans-IO
  (no trio, no sockets); ``_relay`` runs a session over any message transport. ``http``: the
  public HTTP/1.1 server (``_server``, h11), the WebSocket both ends (``_ws``, wsproto), the
  lean upstream client (``_upstream``), the request-target rule (``_target``) and header
  helpers (``_messages``), both sans-IO; the admin endpoints' ASGI runner (``_asgi``).
- ``accounts/``: key and token files (``_keys``), per-key limits (``_limits``, sans-IO), token
  counts read from answers (``_usage``, sans-IO), the usage store (``_usagestore``, SQLite).
- ``admin/``: admin endpoints and pages, the inspector's records.
- ``broker/`` and ``connector/``: the two roles; they never import each other.
- ``cli/``: sub-commands, service files, the built-in test model; then ``testing`` (the
  pytest plugin) and this module on top.
"""

from __future__ import annotations

from trio_bridge._config import Config, load_config
from trio_bridge._errors import (
    BadBody,
    BodyTooSlow,
    BridgeError,
    ClientDisconnected,
    ClientError,
    ConfigError,
    LocalProtocolError,
    ProtocolError,
    QueueFull,
    RelayClosed,
    RelayRefused,
    RelayRejected,
    RemoteProtocolError,
    StreamReset,
)
from trio_bridge._version import __version__
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.broker._broker import Broker
from trio_bridge.broker._registry import ConnectorHandle, Registry
from trio_bridge.cli._testmodel import TestModel
from trio_bridge.connector._connector import Connector

__all__ = [
    "BadBody",
    "BodyTooSlow",
    "BridgeError",
    "Broker",
    "ClientDisconnected",
    "ClientError",
    "Config",
    "ConfigError",
    "Connector",
    "ConnectorHandle",
    "LocalProtocolError",
    "ProtocolError",
    "QueueFull",
    "Registry",
    "RelayClosed",
    "RelayRefused",
    "RelayRejected",
    "RemoteProtocolError",
    "SecretStore",
    "StreamReset",
    "TestModel",
    "__version__",
    "load_config",
]

"""trio_bridge: offer a local LLM's OpenAI-compatible API to the outside world.

A *connector* beside the LLM dials out a persistent, multiplexed relay to a public *broker*;
the broker forwards every HTTP request through it; the connector checks the API key and
forwards the request byte-exact to the LLM, streaming the answer back as it is generated.

Layout: one flat package of private modules, in three layers (a module imports only from its
own layer or below). Flat, not sub-packages, because each layer is a handful of modules and
the imports already show the layering; sub-packages would add names, not structure.

- sans-IO (no trio, no sockets): ``_frames`` (the wire format), ``_protocol`` (the relay
  session: streams, credit windows, goaway), ``_limits`` (per-key limits, the fair queue),
  ``_usage`` (token counts read from a copy of an answer), ``_http`` (header helpers, error
  bodies), ``_backoff``, ``_config``, ``_errors`` (the error tree).
- I/O joints: ``_relay`` (a session on a WebSocket: reader, single writer, pinger; knows no
  role), ``_ws`` (wsproto both ends), ``_server`` (the broker's public HTTP/1.1 server on h11),
  ``_upstream`` (httpx on a lean h11 transport to the LLM), ``_asgi`` / ``_admin`` / ``_ui``
  (admin endpoints and pages on hypercorn), ``_slots`` (the LLM's slots), ``_usagestore``
  (SQLite), ``_keys`` (key and token files), ``_observe`` (logs, metrics), ``_service``.
- roles: ``_broker`` (public requests, the relay endpoint) with ``_registry`` (its connectors),
  ``_connector`` (keys, limits, forwarding) with ``_inspect`` (the inspector's records);
  ``_cli``, ``_testmodel`` and ``testing`` (the pytest plugin) on top.
"""

from __future__ import annotations

from ._broker import Broker
from ._config import Config, load_config
from ._connector import Connector
from ._errors import (
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
from ._keys import SecretStore
from ._registry import ConnectorHandle, Registry
from ._testmodel import TestModel
from ._version import __version__

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

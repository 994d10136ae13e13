"""trio_bridge: offer a local LLM's OpenAI-compatible API to the outside world.

A *connector* beside the LLM dials out a persistent, multiplexed relay to a public *broker*;
the broker forwards every HTTP request through it; the connector checks the API key and
forwards the request byte-exact to the LLM, streaming the answer back as it is generated.
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

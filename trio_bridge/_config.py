"""Configuration: ``bridge.toml`` → frozen attrs classes through a strict cattrs converter.

Durations accept ``"250ms"``, ``"10s"``, ``"5m"``, ``"1h"`` or a bare number of seconds; sizes
accept ``"512KiB"``, ``"16MiB"``, ``"1GB"`` or a bare number of bytes. A wrong key or type is a
:class:`ConfigError` whose message is one line naming the key, e.g.
``broker.queue_timeout: invalid duration 'soon' (use e.g. "10s", "250ms", "5m")``.
Relative file paths are resolved against the directory of the config file.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from trio_bridge._errors import ConfigError

T = TypeVar("T")


class Duration(float):
    """Seconds, parsed from a human duration."""


class Size(int):
    """Bytes, parsed from a human size."""


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"invalid duration {value!r} (negative)")
        return Duration(value)
    if isinstance(value, str) and (m := _DURATION_RE.match(value)):
        return Duration(float(m.group(1)) * _DURATION_UNITS[m.group(2)])
    raise ValueError(f'invalid duration {value!r} (use e.g. "10s", "250ms", "5m")')


def parse_size(value: object) -> Size:
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r} (negative)")
        return Size(value)
    if isinstance(value, str) and (m := _SIZE_RE.match(value)):
        unit = (m.group(2) or "b").lower()
        return Size(int(float(m.group(1)) * _SIZE_UNITS[unit]))
    raise ValueError(f'invalid size {value!r} (use e.g. "16MiB", "512KiB", or bytes)')


def parse_hostport(value: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` / ``"[::1]:8080"`` → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"invalid address {value!r} (use host:port)")
    return host.strip("[]"), int(port)


def _check_hostport(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value == "" and attribute.name == "admin_listen":
        return  # "" turns the admin endpoint off
    try:
        parse_hostport(value)
    except ValueError as exc:
        raise ValueError(f"{attribute.name}: {exc}") from None


_ADMIN_HOST = re.compile(
    r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?)(:\d{1,5})?$"
)


def _check_hosts(_inst: object, attribute: attrs.Attribute[Any], value: list[str]) -> None:
    for host in value:
        if not isinstance(host, str) or not _ADMIN_HOST.match(host):
            raise ValueError(
                f"{attribute.name}: invalid host name {host!r} (a name or address as typed "
                'in the browser, e.g. "gpu1.lan" or "10.0.0.5")'
            )


def _check_level(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value.lower() not in {"debug", "info", "warning", "error"}:
        raise ValueError(
            f"{attribute.name}: invalid level {value!r} (debug, info, warning or error)"
        )


def _check_format(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in {"auto", "json", "text"}:
        raise ValueError(f"{attribute.name}: invalid format {value!r} (auto, json or text)")


def _check_url(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"{attribute.name}: invalid URL {value!r} (use http://host:port)")


def _host_port(url: str) -> tuple[str, int]:
    """(host, port) of an http(s)/ws(s) URL, with the scheme's default port and the
    loopback names folded (localhost, 127.0.0.1 and ::1 are one host here)."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if host in ("localhost", "::1") or host.startswith("127."):
        host = "loopback"
    default = 443 if parts.scheme in ("https", "wss") else 80
    try:
        port = parts.port or default
    except ValueError:
        port = default
    return host, port


def _check_local_url(inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    _check_url(inst, attribute, value)
    for broker in inst.broker_urls:
        if _host_port(value) == _host_port(broker):
            raise ValueError(
                f"{attribute.name}: {value} is the broker's address ({broker}), not the LLM's: "
                "the connector would send each request back to the broker. Set local_url to "
                "the LLM server beside the connector (e.g. http://127.0.0.1:11434 for Ollama, "
                ":8080 for llama.cpp, :8000 for vLLM)"
            )


def redact_url(url: str) -> str:
    """``url`` without its password (for messages: a store URL may carry one). Whatever
    stands before the last "@" is the user and password, even when the password holds a
    "/", "?" or "#" (then urlsplit sees no password at all)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not colon and not any(c in userinfo for c in "/?#"):
        return url  # a user name alone
    return f"{scheme}://{user if colon else ''}:***@{host}"


def _check_store(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value == "":
        return  # this connector's own files
    shown = redact_url(value)
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port  # a port that is not a number raises ValueError
        db = parts.path.strip("/")
    except ValueError:
        db, parts = "x", urllib.parse.urlsplit("")
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or (db and not db.isdigit()):
        raise ValueError(
            f"{attribute.name}: invalid store {shown!r} (use redis://host:6379/0, or "
            'rediss://host:6380/0 for TLS; "" keeps this connector\'s own files)'
        )


def _check_ws_urls(_inst: object, attribute: attrs.Attribute[Any], value: list[str]) -> None:
    if not value:
        raise ValueError(f"{attribute.name}: at least one broker URL is needed")
    for url in value:
        if not re.match(r"^wss?://[^/\s]+", url):
            raise ValueError(
                f"{attribute.name}: invalid broker URL {url!r} (use ws://host:port/_bridge/relay)"
            )


def _check_aliases(
    _inst: object, attribute: attrs.Attribute[Any], value: dict[str, list[str]]
) -> None:
    for name, chain in value.items():
        if not chain:
            raise ValueError(f"{attribute.name}: {name!r} needs at least one model")


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name}: must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class LimitsConfig:
    max_body: Size = Size(16 * 1024**2)
    #: request head (request line + headers) in bytes: 431 beyond (broker)
    max_header_bytes: Size = attrs.field(default=Size(32 * 1024), validator=_positive)
    max_headers: int = attrs.field(default=100, validator=_positive)  # 431 beyond
    max_uri: Size = attrs.field(default=Size(8 * 1024), validator=_positive)  # 414 beyond
    #: public requests in progress at once (broker): 503 beyond
    max_requests: int = attrs.field(default=1000, validator=_positive)
    #: idle keep-alive connections are closed after this (broker)
    keep_alive_timeout: Duration = attrs.field(default=Duration(15), validator=_positive)
    #: a request head (or a TLS handshake) must arrive within this: 408 beyond (slowloris)
    head_timeout: Duration = attrs.field(default=Duration(10), validator=_positive)
    #: a request body must arrive at least this fast (bytes per second, on average, after
    #: head_timeout of grace); slower uploads are cut (broker)
    min_body_rate: Size = attrs.field(default=Size(1024), validator=_positive)
    #: open public connections (broker): 503 beyond
    max_connections: int = attrs.field(default=10_000, validator=_positive)
    #: open public connections from one client address (broker; trusted_proxies are exempt):
    #: 429 beyond
    max_connections_per_address: int = attrs.field(default=256, validator=_positive)
    #: a client that reads nothing for this long while its answer waits is cut (connector:
    #: the LLM call ends; broker: one write not taken for this long closes the connection)
    stall_timeout: Duration = attrs.field(default=Duration(60), validator=_positive)
    connect_timeout: Duration = attrs.field(default=Duration(5), validator=_positive)
    first_byte_timeout: Duration = attrs.field(default=Duration(300), validator=_positive)
    idle_timeout: Duration = attrs.field(default=Duration(120), validator=_positive)
    shutdown_grace: Duration = Duration(60)  # 0: abort in-flight requests at once


@attrs.frozen(kw_only=True)
class LogConfig:
    level: str = attrs.field(default="info", validator=_check_level)
    #: "auto": readable text on a terminal, one JSON object per line otherwise (journald,
    #: files, pipes); or force "json" / "text"
    format: str = attrs.field(default="auto", validator=_check_format)


@attrs.frozen(kw_only=True)
class RelayConfig:
    """Relay tuning shared by both roles (defaults suit nearly everyone)."""

    #: per-stream receive window the broker advertises: how much of an answer may be in flight
    #: toward (and buffered for) one client
    window: Size = attrs.field(default=Size(256 * 1024), validator=_positive)
    #: per-stream receive window the connector advertises: how much of a request body may be in
    #: flight toward it (bigger: uploads are not held up by credit round trips; at most
    #: max_concurrent streams receive bodies at once)
    request_window: Size = attrs.field(default=Size(1024 * 1024), validator=_positive)
    #: body bytes one relay may hold for readers that are slower than their senders; beyond
    #: it, the stream holding the most (the slowest reader) is reset
    max_buffered: Size = attrs.field(default=Size(64 * 1024 * 1024), validator=_positive)
    max_streams: int = attrs.field(default=1000, validator=_positive)
    ping_interval: Duration = attrs.field(default=Duration(5), validator=_positive)


@attrs.frozen(kw_only=True)
class BrokerConfig:
    listen: str = attrs.field(default="0.0.0.0:8080", validator=_check_hostport)
    admin_listen: str = attrs.field(default="127.0.0.1:9180", validator=_check_hostport)
    connector_tokens_file: str = "tokens.toml"
    relay_path: str = "/_bridge/relay"
    #: how long a request waits for a connector with free capacity, then 503
    queue_timeout: Duration = Duration(10)
    #: requests waiting at once (all routes); more get 503 at once
    max_queue: int = attrs.field(default=100, validator=_positive)
    #: when the route's connectors report their LLM down: wait (true) or 503 at once (false)
    queue_when_not_ready: bool = False
    #: with "example.com", a request for Host gpu1.example.com goes to route "gpu1"
    route_domain: str = ""
    #: proxies (IPs or CIDRs, e.g. your Caddy/nginx) whose X-Forwarded-For is believed; from
    #: anyone else, client-sent X-Forwarded-For / Forwarded / X-Real-IP are dropped
    trusted_proxies: list[str] = attrs.field(factory=list)
    #: set when a TLS-terminating proxy (Caddy, nginx) is in front: `check` stops warning
    behind_tls_proxy: bool = False
    #: serve TLS directly (PEM files); the usual set-up is a proxy in front instead
    tls_cert: str = ""
    tls_key: str = ""
    #: refused connector tokens per source address and minute, then 429 without checking
    max_token_failures: int = attrs.field(default=10, validator=_positive)
    #: a file holding a token the admin endpoint then requires (except /healthz, /readyz);
    #: for operators who expose admin_listen beyond loopback
    admin_token_file: str = ""
    #: names the admin pages may be opened by besides localhost and IP addresses (a proxy's
    #: or the machine's DNS name); any other Host is refused (421), against DNS rebinding
    admin_hosts: list[str] = attrs.field(factory=list, validator=_check_hosts)
    #: model aliases and fallback chains, e.g. coder = ["qwen2.5-coder:32b", "qwen2.5-coder:7b"]:
    #: a request for "coder" goes to the first that a connector serves, and to the next if that
    #: fails before answering
    aliases: dict[str, list[str]] = attrs.field(factory=dict, validator=_check_aliases)


def _check_methods(_inst: object, attr: attrs.Attribute[Any], value: list[str]) -> None:
    for m in value:
        if m in ("TRACE", "CONNECT") or not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}", m):
            raise ValueError(f"{attr.name}: {m!r} is not a method that may be relayed")


@attrs.frozen(kw_only=True)
class ConnectorConfig:
    broker_urls: list[str] = attrs.field(
        factory=lambda: ["ws://127.0.0.1:8080/_bridge/relay"], validator=_check_ws_urls
    )
    token_file: str = "connector.token"
    local_url: str = attrs.field(default="http://127.0.0.1:11434", validator=_check_local_url)
    admin_listen: str = attrs.field(default="127.0.0.1:9181", validator=_check_hostport)
    api_keys_file: str = "keys.toml"
    #: a file holding a token the admin endpoint then requires (except /healthz, /readyz)
    admin_token_file: str = ""
    #: names the admin pages may be opened by besides localhost and IP addresses (see broker)
    admin_hosts: list[str] = attrs.field(factory=list, validator=_check_hosts)
    #: a key the LLM server itself wants (llama.cpp / vLLM --api-key); read from this file or
    #: from the environment variable TRIO_BRIDGE_UPSTREAM_KEY.
    upstream_api_key_file: str = ""
    max_concurrent: int = attrs.field(default=10, validator=_positive)
    #: requests waiting for one of the LLM's max_concurrent slots, served round-robin across
    #: API keys (weighted by their priority); beyond, 429
    max_queue: int = attrs.field(default=100, validator=_positive)
    #: usage per key, model and day (SQLite), relative to this file; "" keeps none
    usage_file: str = "usage.sqlite3"
    #: counts are written this often: a crash loses at most this much of them
    usage_flush_interval: Duration = attrs.field(default=Duration(2), validator=_positive)
    name: str = ""
    route: str = "default"
    #: the models the LLM serves, told to the broker (it routes by the request's "model");
    #: empty: asked from the LLM (/v1/models, else /api/tags) at start and on every probe
    models: list[str] = attrs.field(factory=list)
    #: among the route's connectors that serve a model, the broker prefers a higher priority
    #: while it is up and has room ("prefer the big box")
    priority: int = 0
    #: CA bundle (PEM) to verify wss:// brokers with, e.g. a private CA; default: system CAs
    broker_ca_file: str = ""
    #: LLM health probe: any HTTP answer below 500 means "up"
    health_path: str = "/v1/models"
    health_interval: Duration = attrs.field(default=Duration(5), validator=_positive)
    #: the HTTP methods relayed to the LLM (others: 405); TRACE and CONNECT never are
    methods: list[str] = attrs.field(
        factory=lambda: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        validator=_check_methods,
    )
    #: tell systemd READY=1 once the first relay is up ("relay") or at once ("start")
    notify_ready: str = attrs.field(
        default="relay", validator=attrs.validators.in_(("relay", "start"))
    )
    #: the pool's shared store (docs/pool.md): API keys, limits, limit windows and usage of
    #: every connector naming it; "redis://host:6379/0" or "rediss://…" (TLS). "" (default):
    #: this connector's own files (api_keys_file, usage_file)
    store: str = attrs.field(default="", validator=_check_store)
    #: the store's password (mode 0600), or TRIO_BRIDGE_STORE_PASSWORD; "" = none or in the URL
    store_password_file: str = ""
    #: CA bundle (PEM) to verify a rediss:// store with (a private CA); default: system CAs
    store_ca_file: str = ""
    #: the store unreachable: "open" admits on this connector's own counts meanwhile,
    #: "closed" refuses new requests (503 store_unavailable); docs/pool.md
    on_store_failure: str = attrs.field(
        default="open", validator=attrs.validators.in_(("open", "closed"))
    )


@attrs.frozen(kw_only=True)
class InspectorConfig:
    """The connector's request inspector (its admin page). Bodies only when opted in: in
    memory, bounded, never written to disk or sent to the broker."""

    capture_bodies: bool = False
    #: requests kept for the page (newest first)
    max_requests: int = attrs.field(default=500, validator=_positive)
    #: of each request and answer body, at most this much is kept (the rest: truncated)
    max_body_bytes: Size = attrs.field(default=Size(64 * 1024), validator=_positive)
    #: requests whose bodies are kept, and their bytes in all (the oldest are dropped)
    max_captured: int = attrs.field(default=100, validator=_positive)
    max_captured_bytes: Size = attrs.field(default=Size(16 * 1024 * 1024), validator=_positive)


def _check_new_users(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in {"approve", "auto"}:
        raise ValueError(f"{attribute.name}: invalid value {value!r} (approve or auto)")


@attrs.frozen(kw_only=True)
class PortalConfig:
    """``[portal]``: the self-service portal at ``/_bridge/portal/`` (docs/portal.md); off
    unless ``enabled``. Sign-in with OpenID Connect; needs ``pip install 'trio-bridge[portal]'``."""

    enabled: bool = False
    #: where users reach the portal's broker, as they type it, e.g. "https://llm.example.com/"
    #: or "https://llm.example.com/r/team/" (the redirect URI is this + "_bridge/portal/callback")
    public_url: str = ""
    #: the OpenID provider's issuer URL (its discovery document is under it)
    issuer: str = ""
    client_id: str = ""
    #: a file holding the client secret (mode 0600); "" for a public client (PKCE only)
    client_secret_file: str = ""
    token_auth: str = "client_secret_basic"  # or "client_secret_post"
    scopes: list[str] = attrs.field(factory=lambda: ["openid", "email", "profile"])
    #: who may sign in: an email in one of these domains, one of these addresses, or a member
    #: of one of these groups (``groups_claim`` of the ID token)
    allowed_domains: list[str] = attrs.field(factory=list)
    allowed_emails: list[str] = attrs.field(factory=list)
    allowed_groups: list[str] = attrs.field(factory=list)
    groups_claim: str = "groups"
    #: "approve": a new user waits for the operator (``trio-bridge users approve``); "auto":
    #: a new user may make their key at once, one click on their page ([defaults] limits)
    new_users: str = attrs.field(default="approve", validator=_check_new_users)
    #: users, sessions and the audit log (SQLite), and the key that signs session cookies
    users_file: str = "portal.sqlite3"
    secret_file: str = "portal.secret"
    session_ttl: Duration = attrs.field(default=Duration(12 * 3600), validator=_positive)
    #: the model named in the snippets and the chat page ("" : the LLM's first)
    model: str = ""


@attrs.frozen(kw_only=True)
class Config:
    broker: BrokerConfig = attrs.field(factory=BrokerConfig)
    connector: ConnectorConfig = attrs.field(factory=ConnectorConfig)
    limits: LimitsConfig = attrs.field(factory=LimitsConfig)
    relay: RelayConfig = attrs.field(factory=RelayConfig)
    log: LogConfig = attrs.field(factory=LogConfig)
    inspector: InspectorConfig = attrs.field(factory=InspectorConfig)
    portal: PortalConfig = attrs.field(factory=PortalConfig)
    #: directory relative paths are resolved against (not a TOML key)
    base_dir: str = attrs.field(default=".", metadata={"internal": True})
    #: the sections the file had (not a TOML key): which roles it configures
    sections: tuple[str, ...] = attrs.field(default=(), metadata={"internal": True})

    @property
    def source(self) -> str:
        return self._source or "built-in defaults"

    _source: str = attrs.field(default="", metadata={"internal": True}, alias="source_path")

    def configures(self, role: str) -> bool:
        """True if the file has a ``[role]`` section (built-in defaults configure both)."""
        return not self.sections or role in self.sections

    def path(self, name: str) -> Path:
        """Resolve a file name from the config against the config file's directory."""
        p = Path(os.path.expanduser(name))
        return p if p.is_absolute() else Path(self.base_dir) / p


def _strict(kind: type[T]) -> Any:
    def hook(value: object, _type: object) -> T:
        if type(value) is not kind and not (kind is float and type(value) is int):
            raise ValueError(f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return kind(value)  # type: ignore[call-arg]

    return hook


def _string_list(value: object, _type: object) -> list[str]:
    if isinstance(value, str):
        raise ValueError(f'expected a list of strings, e.g. ["{value}"], got a string')
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise ValueError(f"{i}: expected str, got {type(v).__name__} {v!r}")
    return list(value)


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    for kind in (str, int, float, bool):
        conv.register_structure_hook(kind, _strict(kind))
    conv.register_structure_hook_func(lambda t: t == list[str], _string_list)
    conv.register_structure_hook(Duration, lambda v, _t: parse_duration(v))
    conv.register_structure_hook(Size, lambda v, _t: parse_size(v))
    return conv


def _one_line(exc: BaseException, source: str) -> str:
    """The first leaf error of a cattrs exception tree as `a.b.c: message`."""

    def walk(e: BaseException, path: list[str]) -> tuple[list[str], BaseException]:
        if isinstance(e, ForbiddenExtraKeysError):
            return path, e
        if isinstance(e, ClassValidationError | cattrs.IterableValidationError):
            for sub in e.exceptions:
                note = getattr(sub, "__notes__", [""])[0] if hasattr(sub, "__notes__") else ""
                m = re.search(r"@ (?:attribute|index) (\w+)", note)
                return walk(sub, [*path, m.group(1)] if m else path)
        return path, e

    path, leaf = walk(exc, [])
    if isinstance(leaf, ForbiddenExtraKeysError):
        keys = ", ".join(".".join([*path, k]) for k in sorted(leaf.extra_fields))
        hint = ""
        known = [f.name for f in attrs.fields(leaf.cl)] if attrs.has(leaf.cl) else []
        for k in sorted(leaf.extra_fields):
            if close := difflib.get_close_matches(k, known, n=1):
                hint = f" (did you mean {'.'.join([*path, close[0]])}?)"
                break
        return f"{source}: unknown key {keys}{hint}"
    if isinstance(leaf, KeyError):
        return f"{source}: {'.'.join(path) or 'config'}: missing required key"
    msg = str(leaf)
    if isinstance(leaf, ValueError) and (m := re.match(r"^(\w+): (.*)$", msg)):
        path, msg = [*path, m.group(1)], m.group(2)
    return f"{source}: {'.'.join(path) or 'config'}: {msg}"


def structure(data: dict[str, Any], cls: type[T], *, source: str = "config") -> T:
    """Structure ``data`` into ``cls`` strictly; ConfigError (one line) on any problem."""
    try:
        return make_converter().structure(data, cls)
    except (ClassValidationError, ForbiddenExtraKeysError, cattrs.IterableValidationError) as exc:
        raise ConfigError(_one_line(exc, source)) from None
    except (ValueError, TypeError) as exc:  # attrs validators outside cattrs' grouping
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read a ``bridge.toml``. ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    for internal in ("base_dir", "sections", "source_path"):
        if internal in data:
            raise ConfigError(f"{p}: unknown key {internal}")
    sections = tuple(k for k in ("broker", "connector") if isinstance(data.get(k), dict))
    config = structure(data, Config, source=str(p))
    return attrs.evolve(
        config, base_dir=str(p.resolve().parent), sections=sections, source_path=str(p)
    )

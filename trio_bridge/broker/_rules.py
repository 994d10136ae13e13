"""What the broker believes about a public request and what it refuses, as rules over its head:
who the client is (``trusted_proxies``), which route it asks for, what must never reach a
connector, which headers travel on; and the count of limit hits on the public side.

No I/O here but the clock of :class:`LimitHits` and a log line.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
from typing import Any, NamedTuple

import trio

from trio_bridge._config import LimitsConfig
from trio_bridge._observe import Metrics
from trio_bridge.broker._registry import DEFAULT_ROUTE
from trio_bridge.http._messages import carries_secret, header, strip_hop_by_hop
from trio_bridge.http._server import Request
from trio_bridge.http._target import BadTarget, check_method

log = logging.getLogger("trio_bridge.broker")

#: headers a connector or LLM might believe about the client (compared with ``_`` read as
#: ``-``, as WSGI/CGI servers merge the two); from clients only through trusted_proxies
_FORWARDING = frozenset(
    {
        b"forwarded",
        b"via",
        b"x-real-ip",
        b"x-client-ip",
        b"client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"cf-connecting-ipv6",
        b"cf-ipcountry",
        b"fastly-client-ip",
        b"akamai-client-ip",
        b"x-cluster-client-ip",
        b"x-original-forwarded-for",
        b"x-originating-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-proxyuser-ip",
        b"x-azure-clientip",
        b"x-appengine-user-ip",
        b"x-envoy-external-address",
    }
)
_FORWARDING_PREFIX = b"x-forwarded-"
#: the bridge's own header namespace: only the bridge sets these, never a client or a proxy
BRIDGE_NAMESPACE = b"x-trio-bridge-"
ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
LIMIT_LOG_EVERY = 10.0  # seconds between two log lines about the same limit


def _without_port(addr: str) -> str:
    """``1.2.3.4:5678`` → ``1.2.3.4``, ``[::1]:80`` → ``::1`` (some proxies add the port)."""
    if addr.startswith("["):
        return addr[1:].partition("]")[0]
    if addr.count(":") == 1:
        return addr.partition(":")[0]
    return addr


def _forwarding(name: bytes) -> bool:
    """Whether a (lower-case) header name is a forwarding header, in any ``_`` spelling."""
    name = name.replace(b"_", b"-")
    return name in _FORWARDING or name.startswith(_FORWARDING_PREFIX)


class Trust:
    """The proxies in front of the broker (``trusted_proxies``): what they say about the client
    is believed, nobody else's."""

    def __init__(self, networks: list[str]) -> None:
        self.networks = [ipaddress.ip_network(p, strict=False) for p in networks]

    def trusted(self, addr: str) -> bool:
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def client_address(self, req: Request) -> str:
        """The client's address: the peer's, or behind a trusted proxy the rightmost address
        of X-Forwarded-For that is not a trusted proxy (what a client writes to the left of it
        is not believed)."""
        peer = req.client
        if not (peer and self.trusted(peer)):
            return peer
        hops = b",".join(v for k, v in req.headers if k == b"x-forwarded-for").split(b",")
        for hop in reversed(hops):
            addr = _without_port(hop.strip().decode("latin-1"))
            if not addr:
                continue
            if not self.trusted(addr):
                return addr[:64]
        return peer

    def forwarded_headers(self, req: Request) -> list[tuple[bytes, bytes]]:
        """The request's headers as they go to the connector: hop-by-hop headers out;
        client-sent forwarding headers (``Forwarded``, ``X-Forwarded-*``, ``X-Real-IP``…) only
        from trusted proxies, the bridge's own ``X-Trio-Bridge-*`` namespace from nobody; our
        own X-Forwarded-For (the peer's address) and X-Forwarded-Proto added."""
        headers = [
            (k, v)
            for k, v in strip_hop_by_hop(req.headers, also=frozenset({b"host"}))
            if not k.startswith(BRIDGE_NAMESPACE)
        ]
        peer = req.client
        trusted = bool(peer and self.trusted(peer))
        prior = b""
        if trusted:
            prior = b", ".join(v for k, v in headers if k == b"x-forwarded-for")
        else:
            headers = [kv for kv in headers if not _forwarding(kv[0])]
        headers = [kv for kv in headers if kv[0].replace(b"_", b"-") != b"x-forwarded-for"]
        if peer:
            headers.append((b"x-forwarded-for", (prior + b", " if prior else b"") + peer.encode()))
        if not trusted or not any(k == b"x-forwarded-proto" for k, _ in headers):
            headers = [kv for kv in headers if kv[0] != b"x-forwarded-proto"]
            headers.append((b"x-forwarded-proto", req.scheme.encode()))
        return headers


def route_of(req: Request, route_domain: str) -> tuple[str, str]:
    """(route, target to forward): ``/r/<route>/…`` (prefix stripped), else
    ``<route>.<route_domain>`` by Host, else the default route."""
    path, qsep, query = req.target.decode("latin-1").partition("?")
    route = DEFAULT_ROUTE
    if path.startswith("/r/"):
        name, sep, rest = path[3:].partition("/")
        if name and ROUTE_NAME.match(name):
            route, path = name, "/" + rest if sep else "/"
    elif route_domain:
        host = (header(req.headers, b"host") or b"").decode("latin-1").lower()
        host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        label, dot, domain = host.partition(".")
        if dot and domain == route_domain and ROUTE_NAME.match(label):
            route = label
    return route, path + qsep + query


def not_for_connectors(req: Request, relay_path: str, token_mark: bytes) -> tuple[int, str] | None:
    """A request that must never reach a connector, as (status, message), or None: anything at
    the relay path (a connector dialing a wrong URL would send its token), WebSocket upgrades
    (no pass-through yet), and connector tokens (``token_mark``: what they start with)
    presented as keys."""
    if req.path == relay_path or req.path.startswith(relay_path.rstrip("/") + "/"):
        if req.is_websocket:
            return 404, f"no relay endpoint at this path; the relay endpoint is {relay_path}"
        return 400, f"the relay endpoint {relay_path} needs a WebSocket upgrade"
    if req.is_websocket:
        return 404, (
            f"no WebSocket endpoint at this path (the relay endpoint is {relay_path}); "
            "WebSocket pass-through to the LLM is not supported"
        )
    if carries_secret(req.headers, req.target, token_mark):
        return 401, (
            "a connector token was presented as an API key; it is not forwarded. "
            "Connector tokens belong in the connector's token_file"
        )
    return None


class Refusal(NamedTuple):
    """An answer the broker gives instead of relaying: an OpenAI-shaped error."""

    status: int
    message: str
    retry_after: int | None = None
    code: str | None = None  # the error's code (else one from the status)


def model_not_found(model: str | None, served: dict[str, list[str]] | None) -> Refusal:
    """The 404 for a model no connector of the route serves, naming those that are."""
    return Refusal(
        404,
        f"the model {str(model)[:128]!r} does not exist on this route; available: "
        + ", ".join(sorted(served or ())[:50]),
        code="model_not_found",
    )


def head_refusal(
    req: Request,
    limits: LimitsConfig,
    relay_path: str,
    token_mark: bytes,
    in_flight: int,
    hit: LimitHits,
) -> Refusal | None:
    """Why the request's head alone rules it out, or None: a method that is never relayed,
    what must not reach a connector (:func:`not_for_connectors`), a limit it breaks (counted
    with ``hit``), a declared body over ``max_body``."""
    try:  # the one rule for what may be relayed (the connector applies it again)
        check_method(req.method)
    except BadTarget as exc:
        return Refusal(exc.status, str(exc))
    refused = not_for_connectors(req, relay_path, token_mark)
    if refused is not None:
        return Refusal(*refused)
    if len(req.headers) > limits.max_headers:
        hit("headers")
        return Refusal(431, f"too many header facts (limit {limits.max_headers})")
    if len(req.target) > limits.max_uri:
        hit("uri")
        return Refusal(414, "request target too long")
    if in_flight > limits.max_requests:
        hit("requests")
        return Refusal(503, "too many requests in progress; retry later", 1)
    declared = header(req.headers, b"content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > int(limits.max_body)):
        if declared.isdigit():
            hit("body")
            return Refusal(413, "request body too large")
        return Refusal(400, "invalid Content-Length")
    return None


def with_length(
    headers: list[tuple[bytes, bytes]], body: bytes, original: bytes
) -> list[tuple[bytes, bytes]]:
    """``headers`` for ``body`` where it replaced ``original`` (a rewritten model)."""
    if body is original:
        return headers
    out = [kv for kv in headers if kv[0] != b"content-length"]
    out.append((b"content-length", str(len(body)).encode()))
    return out


def model_list_answer(
    path: str, served: dict[str, list[str]], headers: list[tuple[bytes, bytes]]
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers, body) of ``/v1/models`` (Ollama's ``/api/tags`` for that path) listing the
    models of every connector of a route, each with the connectors that serve it; ``headers``:
    a connector's answer to the same request, whose length and type are replaced."""
    doc: dict[str, Any]
    if path.startswith("/api/tags"):
        doc = {
            "models": [{"name": m, "model": m, "connectors": sorted(c)}
                       for m, c in sorted(served.items())]
        }  # fmt: skip
    else:
        doc = {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "trio-bridge",
                 "connectors": sorted(c)}
                for m, c in sorted(served.items())
            ],
        }  # fmt: skip
    body = json.dumps(doc).encode()
    out = [kv for kv in headers if kv[0].lower() not in (b"content-length", b"content-type")]
    out += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return out, body


class LimitHits:
    """Hits of the public side's limits: counted in the metrics, logged at most once per limit
    every ``LIMIT_LOG_EVERY`` seconds (with the number of hits in between)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._logged: dict[str, tuple[float, int]] = {}  # bounded: limits have fixed names

    def __call__(self, name: str) -> None:
        self._metrics.limit_hits.labels("broker", name).inc()
        now = trio.current_time()
        last, suppressed = self._logged.get(name, (-math.inf, 0))
        if now - last >= LIMIT_LOG_EVERY:
            more = f" (and {suppressed} more since the last line)" if suppressed else ""
            log.warning("limit hit: %s%s", name, more, extra={"limit": name})
            self._logged[name] = (now, 0)
        else:
            self._logged[name] = (last, suppressed + 1)

"""The broker role: the public HTTP port, the relay endpoint, and the connector registry.

One handler on the public server (``_server``, trio + h11) serves both: a WebSocket upgrade at
``relay_path`` with a valid connector token becomes a relay; every other request is sent
through a relay to a connector of its route, in its own nursery (the *request scope*):

    client ──▶ _http: limits, pick relay (wait ≤ queue_timeout) ──▶ open stream
                 ├─ task: pump request body into the stream, then watch for client disconnect
                 └─ main: response head → chunks → client, as they arrive

Cancellation: a client disconnect resets the stream (CANCEL); the connector then cancels its
upstream call. A stream reset after the response head aborts the client's response (the
connection is closed without a terminating chunk), so a truncated answer never looks complete.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
import ssl
import time
from collections import OrderedDict
from functools import partial
from typing import Any

import attrs
import trio

from trio_bridge._config import Config, parse_hostport
from trio_bridge._errors import (
    BadBody,
    ClientDisconnected,
    ConfigError,
    HeadTooLarge,
    QueueFull,
    RelayClosed,
    StreamReset,
    listening,
)
from trio_bridge._notify import Notifier
from trio_bridge._observe import (
    Facts,
    Metrics,
    RecentStats,
    bridge_outcome,
    is_error,
    log_request,
    reset_reason,
    status_class,
)
from trio_bridge._version import __version__
from trio_bridge.accounts._keys import SecretEntry, SecretStore, admin_token, secret_id
from trio_bridge.admin._admin import AdminApp
from trio_bridge.admin._ui import Pages
from trio_bridge.broker._registry import DEFAULT_ROUTE, ConnectorHandle, Registry
from trio_bridge.http._asgi import serve_app
from trio_bridge.http._messages import (
    MODEL_LISTS,
    carries_secret,
    error_body,
    error_response,
    header,
    presented_key,
    request_id_from,
    request_model,
    strip_hop_by_hop,
    with_model,
)
from trio_bridge.http._server import Request, ServerLimits, serve_http
from trio_bridge.http._target import DEFAULT_METHODS, BadTarget, check_method, check_target
from trio_bridge.relay._frames import MAX_MESSAGE, MAX_PAYLOAD, ResetCode
from trio_bridge.relay._protocol import Hello, RequestHead, ResponseHead, Session
from trio_bridge.relay._relay import HANDSHAKE_TIMEOUT, Relay, RelayStream

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


#: the bridge's own header namespace: only the bridge sets these, never a client or a proxy
BRIDGE_NAMESPACE = b"x-trio-bridge-"
MAX_ATTEMPTS = 3
#: what _respond returns when the connector REFUSED the stream (never processed: try another)
_RETRY = "retry elsewhere"
#: what _respond returns when a fallback model may be tried (nothing reached the client)
_FALLBACK = "fall back"
#: a route with no connector for this long (or never, since the broker started this long ago)
#: gets 503 at once instead of waiting queue_timeout for one
ROUTE_MEMORY = 60.0
MAX_ROUTE_STATS = 100  # routes with recent figures on the admin page
RETRY_AFTER_NOT_READY = 5
_ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_INITIAL_BODY = MAX_PAYLOAD  # bodies up to this size travel with the head in one message
WATCH_AFTER = 0.02  # watch for client disconnects once an answer takes longer than this

_RESET_STATUS = {
    ResetCode.TIMEOUT: (504, "the LLM did not answer in time"),
    ResetCode.TOO_LARGE: (413, "request body too large"),
    ResetCode.REFUSED: (503, "the connector refused the request; retry"),
    ResetCode.SHUTDOWN: (503, "the connector is shutting down; retry"),
    ResetCode.RELAY_LOST: (502, "the connection to the LLM's connector was lost"),
}


class Broker:
    """The broker role: the public HTTP server's handler (relay endpoint and relayed requests),
    the connector registry, and its state."""

    def __init__(self, config: Config, tokens: SecretStore | None = None) -> None:
        self.config = config
        self.tokens = tokens or SecretStore(config.path(config.broker.connector_tokens_file), "tbc")
        #: what every connector token starts with: a request carrying it is never relayed
        self._token_mark = f"{self.tokens.prefix}_".encode()
        bc = config.broker
        self.registry = Registry(max_queue=bc.max_queue)
        self.relay_path = bc.relay_path
        self.max_body = int(config.limits.max_body)
        self.queue_timeout = float(bc.queue_timeout)
        self.queue_when_not_ready = bc.queue_when_not_ready
        self.route_domain = bc.route_domain.lower().strip(".")
        #: model aliases and fallback chains: a request for the key tries each in turn
        self.aliases: dict[str, list[str]] = dict(bc.aliases)
        self.started = time.time()
        self.draining = False
        self.admin_address: tuple[str, int] | None = None
        self.in_flight = 0
        self.metrics = Metrics("broker")
        self.stats = RecentStats()
        self.route_stats: dict[str, RecentStats] = {}  # per route, for the admin page
        self.metrics.in_flight.labels("broker").set_function(lambda: self.in_flight)
        self.metrics.queued.labels("broker").set_function(lambda: self.registry.queued)
        self.notifier = Notifier()
        self._stop = trio.Event()
        self._drained = trio.Event()  # draining, and the last request ended
        self.limits = config.limits
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in bc.trusted_proxies]
        self._token_failures: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._limit_log: dict[str, tuple[float, int]] = {}

    def _token_failures_exceeded(self, addr: str) -> bool:
        now = trio.current_time()
        start, n = self._token_failures.get(addr, (now, 0))
        return now - start < 60 and n >= self.config.broker.max_token_failures

    def _count_token_failure(self, addr: str) -> None:
        now = trio.current_time()
        start, n = self._token_failures.pop(addr, (now, 0))
        if now - start >= 60:
            start, n = now, 0
        self._token_failures[addr] = (start, n + 1)
        while len(self._token_failures) > 10_000:  # bounded memory
            self._token_failures.popitem(last=False)

    async def drain(self, grace: float | None = None) -> None:
        """Graceful stop: new requests get 503 (readyz too), in-flight ones run to completion
        for up to ``grace`` (``shutdown_grace``), the rest are reset with reason "shutdown",
        then :meth:`serve` returns."""
        if grace is None:
            grace = float(self.config.limits.shutdown_grace)
        self.draining = True
        self.notifier.stopping(f"draining; {self.in_flight} in flight")
        log.info("draining: refusing new requests; %d in flight", self.in_flight)
        with trio.move_on_after(grace):
            if self.in_flight:
                await self._drained.wait()  # set by the last request to end
        if self.in_flight:
            log.warning("grace period over: aborting %d requests", self.in_flight)
        for handle in self.registry.connectors():
            handle.relay.reset_all(ResetCode.SHUTDOWN, "broker shutting down")
        await trio.sleep(0.05)  # let the aborts reach their clients
        self._stop.set()

    def _pages(self) -> Pages:
        return Pages(
            "broker",
            token=admin_token(self.config, self.config.broker.admin_token_file),
            apis={"/api/routes": lambda q: self.routes_overview()},
        )

    def routes_overview(self) -> dict[str, Any]:
        """Routes with their connectors and the last five minutes' figures (admin page)."""
        routes: dict[str, Any] = {}
        for h in self.registry.connectors():
            r = routes.setdefault(h.route, {"connectors": []})
            r["connectors"].append(
                {
                    "name": h.name,
                    "models": list(h.models) if h.models is not None else None,
                    "priority": h.priority,
                    "ready": h.ready,
                    "draining": h.draining,
                    "in_flight": h.in_flight,
                    "capacity": h.capacity,
                    "connected_since": h.connected_since,
                }
            )
        for route, stats in self.route_stats.items():
            r = routes.setdefault(route, {"connectors": []})
            r["recent"] = stats.summary()
            r["series"] = stats.series()
        for route, r in routes.items():
            r["queued"] = self.registry.queued_for(route)
        return {
            "now": time.time(),
            "draining": self.draining,
            "in_flight": self.in_flight,
            "queued": self.registry.queued,
            "aliases": self.aliases,
            "routes": dict(sorted(routes.items())),
        }

    def status_line(self) -> str:
        relays = self.registry.connectors()
        ready = sum(1 for h in relays if h.ready)
        state = "draining" if self.draining else "serving"
        return (
            f"{state}; {len(relays)} connectors ({ready} ready); in flight {self.in_flight}; "
            f"queued {self.registry.queued}"
        )

    def ready(self) -> bool:
        return not self.draining

    def status(self) -> dict[str, Any]:
        routes: dict[str, list[dict[str, Any]]] = {}
        for h in self.registry.connectors():
            routes.setdefault(h.route, []).append(
                {
                    "connector": h.name,
                    "token_id": h.token_id,
                    "ready": h.ready,
                    "draining": h.draining,
                    "in_flight": h.in_flight,
                    "capacity": h.capacity,
                    "connected_since": h.connected_since,
                }
            )
        return {
            "role": "broker",
            "version": __version__,
            "ready": self.ready(),
            "started": self.started,
            "in_flight": self.in_flight,
            "queued": self.registry.queued,
            "routes": routes,
            "recent": self.stats.summary(),
        }

    def server_limits(self) -> ServerLimits:
        lim = self.limits
        return ServerLimits(
            max_header_bytes=int(lim.max_header_bytes),
            head_timeout=float(lim.head_timeout),
            keep_alive_timeout=float(lim.keep_alive_timeout),
            min_body_rate=max(1, int(lim.min_body_rate)),
            max_connections=lim.max_connections,
            max_connections_per_address=lim.max_connections_per_address,
            send_timeout=float(lim.stall_timeout),
            exempt=tuple(self.trusted),
        )

    def limit_hit(self, name: str) -> None:
        """Count a hit of a public-side limit; log it, at most once per limit every 10 s."""
        self.metrics.limit_hits.labels("broker", name).inc()
        now = trio.current_time()
        last, suppressed = self._limit_log.get(name, (-math.inf, 0))
        if now - last >= 10:
            more = f" (and {suppressed} more since the last line)" if suppressed else ""
            log.warning("limit hit: %s%s", name, more, extra={"limit": name})
            self._limit_log[name] = (now, 0)
        else:
            self._limit_log[name] = (last, suppressed + 1)

    async def serve(
        self,
        listen: str | None = None,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the public port (and the admin endpoint on ``admin_listen``, if set) until
        cancelled; started value: the bound public (host, port)."""
        self.registry.born = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_tokens)
            if self.config.broker.admin_listen:
                hosts = [self.config.broker.admin_listen, *self.config.broker.admin_hosts]
                admin = AdminApp(self.metrics, self.ready, self.status, self._pages(), hosts=hosts)
                with listening("broker.admin_listen", self.config.broker.admin_listen):
                    self.admin_address = await nursery.start(
                        serve_app, admin, self.config.broker.admin_listen
                    )
            bc = self.config.broker
            ssl_context = self._ssl_context()
            host, port = parse_hostport(listen or bc.listen)
            with listening("broker.listen", listen or bc.listen):
                addr = await nursery.start(
                    partial(
                        serve_http,
                        self.handle,
                        host,
                        port,
                        self.server_limits(),
                        ssl_context=ssl_context,
                        on_limit=self.limit_hit,
                    )
                )
            scheme = "https" if ssl_context is not None else "http"
            log.info(
                "listening on %s://%s:%d (public API; relay at %s)%s",
                scheme,
                *addr[:2],
                self.relay_path,
                f"; admin on http://{self.admin_address[0]}:{self.admin_address[1]}"
                if self.admin_address
                else "",
            )
            self.notifier.ready(self.status_line())
            nursery.start_soon(self.notifier.watchdog_loop, self.status_line)
            task_status.started(addr)
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The public port's TLS context (``tls_cert`` + ``tls_key``), or None for plain HTTP."""
        bc = self.config.broker
        if not (bc.tls_cert or bc.tls_key):
            return None
        if not (bc.tls_cert and bc.tls_key):
            raise ConfigError("broker.tls_cert and broker.tls_key go together")
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(
            str(self.config.path(bc.tls_cert)), str(self.config.path(bc.tls_key))
        )
        ssl_context.set_alpn_protocols(["http/1.1"])
        return ssl_context

    async def _watch_tokens(self) -> None:
        """Close relays whose connector token was revoked, expired (after a rotation) or no
        longer allows their route (checked every second)."""
        while True:
            await trio.sleep(1.0)
            self.tokens.maybe_reload()
            valid = self.tokens.active_ids()
            for h in self.registry.connectors():
                entry = self.tokens.get(h.token_id)
                if entry is None:
                    why = "connector token revoked"
                elif h.token_id not in valid:
                    why = "connector token expired (rotated)"
                elif not entry.allows_route(h.route):
                    why = f"connector token no longer allows route {h.route!r}"
                else:
                    continue
                log.warning(
                    "closing relay: %s",
                    why,
                    extra={"connector": h.name, "token_id": h.token_id},
                )
                h.relay.close_telling_peer(why)

    async def handle(self, req: Request) -> None:
        """The public server's handler: the relay endpoint or a request to relay."""
        if req.is_websocket and req.path == self.relay_path:
            await self._relay_endpoint(req)
        else:
            await self._http(req)

    # -- relay endpoint --
    async def _relay_endpoint(self, req: Request) -> None:
        """A connector's WebSocket upgrade: its token, then the hello, then the relay serves
        until it ends (its connector registered meanwhile)."""
        entry = await self._connector_token(req)
        if entry is None:
            return
        judge = _HelloJudge(entry)
        transport = await req.accept_websocket(MAX_MESSAGE + 1024)
        rc = self.config.relay
        relay = Relay(
            transport,
            Session(opener=True, window=int(rc.window), max_streams=rc.max_streams),
            ping_interval=float(rc.ping_interval),
            max_buffered=int(rc.max_buffered),
            accept=judge,
        )
        extra = {"peer": req.client, "token_id": entry.id}
        async with trio.open_nursery() as nursery:
            try:
                hello = await nursery.start(relay.run)
            except RelayClosed as exc:
                self.metrics.relays_refused.labels("broker", judge.refused or "handshake").inc()
                why = "relay refused: %s" if judge.refused else "relay handshake failed: %s"
                log.warning(why, exc.reason, extra=extra)
                return
            if hello.probe:  # `trio-bridge check`: the token and route are fine; serve nothing
                log.info("relay check passed", extra={**extra, "route": hello.route})
                with trio.move_on_after(HANDSHAKE_TIMEOUT):
                    await relay.wait_closed()  # the checker hangs up once it has our HELLO
                relay.close("check done")
                return
            handle = self._register(relay, hello, entry)
            log.info("relay connected", extra={**extra, "connector": handle.name,
                                               "route": handle.route})  # fmt: skip
        self.registry.remove(handle)
        self._count_relays(handle.route)
        log.info(
            "relay disconnected: %s",
            relay.closed_reason,
            extra={"connector": handle.name, "route": handle.route},
        )

    async def _connector_token(self, req: Request) -> SecretEntry | None:
        """The token entry of a relay upgrade, or None once it was refused (401 / 429).

        A valid token is always accepted. Refused tokens are counted per client address (the
        one ``trusted_proxies`` reveal, not the proxy's) and per token id; past
        ``max_token_failures`` a minute on either, further bad tokens get 429 and no log line
        of their own: guessing is slowed where it comes from, never the fleet."""
        token = presented_key(req.headers)
        entry = self.tokens.verify(token) if token is not None else None
        if entry is not None:
            return entry
        client = self.client_address(req)
        ident = secret_id(token) if token is not None else None
        counted = [f"addr {client}"] + ([f"id {ident}"] if ident is not None else [])
        limited = any(self._token_failures_exceeded(c) for c in counted)
        for c in counted:
            self._count_token_failure(c)
        self.metrics.auth_failures.labels("broker").inc()
        if limited:
            self.metrics.relays_refused.labels("broker", "rate_limited").inc()
            await _deny(req, 429, "too many refused connector tokens; retry later")
            return None
        self.metrics.relays_refused.labels("broker", "bad_token").inc()
        log.warning("relay refused: bad connector token", extra={"peer": client})
        await _deny(req, 401, "invalid connector token")
        return None

    def client_address(self, req: Request) -> str:
        """The client's address: the peer's, or behind ``trusted_proxies`` the rightmost
        address of X-Forwarded-For that is not a trusted proxy (what a client writes to the
        left of it is not believed)."""
        peer = req.client
        if not (peer and self._trusted(peer)):
            return peer
        hops = b",".join(v for k, v in req.headers if k == b"x-forwarded-for").split(b",")
        for hop in reversed(hops):
            addr = _without_port(hop.strip().decode("latin-1"))
            if not addr:
                continue
            if not self._trusted(addr):
                return addr[:64]
        return peer

    def _trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def _register(self, relay: Relay, hello: Hello, entry: SecretEntry) -> ConnectorHandle:
        relay.name = hello.name or entry.name  # for the relay's own log lines
        handle = ConnectorHandle(
            relay,
            name=relay.name,
            route=hello.route or DEFAULT_ROUTE,
            token_id=entry.id,
            capacity=hello.capacity or hello.max_streams,
            connected_since=time.time(),
        )
        relay.on_change = lambda _relay: self.registry.changed(handle)
        self.registry.add(handle)
        self._count_relays(handle.route)
        return handle

    # -- public requests --
    async def _http(self, req: Request) -> None:
        ex = _Exchange(request_id_from(req.headers), req)
        facts = ex.facts
        if self.draining:
            facts.outcome = await self._error(
                ex, facts, 503, "the broker is shutting down; retry", retry_after=1
            )
            log_request("broker", facts)
            return
        self.in_flight += 1
        try:
            async with trio.open_nursery() as nursery:
                ex.nursery = nursery
                try:
                    facts.outcome = await self._forward(ex, facts)
                except BadBody as exc:
                    facts.outcome = await self._error(ex, facts, 400, str(exc))
                except ClientDisconnected:
                    facts.outcome = "client_gone"
                nursery.cancel_scope.cancel()
        finally:
            if ex.stream is not None and not ex.stream.finished:
                ex.stream.reset(ResetCode.CANCEL, "client went away")
            self.in_flight -= 1
            if self.draining and not self.in_flight:
                self._drained.set()
            if facts.outcome is None:
                facts.outcome = "cancelled"
            facts.bytes_in = ex.body_size
            facts.ended = time.monotonic()
            if ex.stream is not None and ex.stream.reset_error is not None:
                code = ex.stream.reset_error.code
                if code != ResetCode.NO_ERROR:
                    ex.reset_code = code
            self._account(ex, facts)
            log_request("broker", facts)

    def _count_relays(self, route: str) -> None:
        self.metrics.relays.labels("broker", route).set(len(self.registry.connectors(route)))

    def _account(self, ex: _Exchange, facts: Facts) -> None:
        m, route = self.metrics, facts.route or DEFAULT_ROUTE
        label = self.registry.metric_label(route)
        status, outcome = facts.status, facts.outcome or "cancelled"
        duration, ttfb = facts.duration, facts.ttfb
        m.child(m.requests, "broker", label, status_class(status), outcome).inc()
        m.child(m.duration, "broker", label).observe(duration)
        if ttfb is not None:
            m.child(m.ttfb, "broker", label).observe(ttfb)
        m.child(m.bytes, "broker", "in").inc(ex.body_size)
        m.child(m.bytes, "broker", "out").inc(facts.bytes_out)
        if ex.reset_code is not None:
            m.child(m.resets, "broker", reset_reason(ex.reset_code)).inc()
        error = is_error(outcome, status)
        self.stats.add(duration, ttfb, error)
        if route in self.route_stats or len(self.route_stats) < MAX_ROUTE_STATS:
            self.route_stats.setdefault(route, RecentStats()).add(duration, ttfb, error)
        m.count_model(facts.model, outcome, ttfb)

    def _start_reader(self, ex: _Exchange) -> None:
        if not ex.reader_started:
            ex.reader_started = True
            assert ex.nursery is not None
            ex.nursery.start_soon(self._read_request, ex)

    async def _read_request(self, ex: _Exchange) -> None:
        """Feed the rest of the body into the stream (or discard it once the stream is gone
        or the body is over the limit), then watch for the client going away."""
        req = ex.req
        try:
            while not ex.body_done:
                chunk = await req.receive_body()
                ex.body_size += len(chunk)
                done = not chunk
                if ex.body_size > self.max_body:
                    if ex.stream is not None:
                        ex.stream.reset(ResetCode.TOO_LARGE, "request body too large")
                    ex.too_large = True
                    return  # the server discards the rest (bounded) once we answered
                if ex.stream is not None and ex.stream.reset_error is None:
                    try:
                        await ex.stream.send_data(chunk, end_stream=done)
                    except StreamReset:
                        pass  # the connector answered already or the stream failed: discard
                ex.body_done = done
        except BadBody as exc:
            ex.bad_body = str(exc)
            self._client_gone(ex, str(exc))
            return
        except ClientDisconnected as exc:
            self._client_gone(ex, str(exc))
            return
        await req.wait_disconnect()
        self._client_gone(ex, "client disconnected")

    def _client_gone(self, ex: _Exchange, reason: str) -> None:
        ex.client_gone = True
        if ex.stream is not None:
            ex.stream.reset(ResetCode.CANCEL, reason)

    async def _error(
        self,
        ex: _Exchange,
        facts: Facts,
        status: int,
        message: str,
        retry_after: int | None = None,
        code: str | None = None,
    ) -> str:
        facts.status = status
        ex.facts.head_at = time.monotonic()
        s, h, body = error_response(
            status, message, ex.request_id, retry_after=retry_after, code=code
        )
        if not ex.body_done:
            h.append((b"connection", b"close"))
        await ex.req.respond(s, h, body, end=True)
        return bridge_outcome(status)

    def _not_for_connectors(self, req: Request) -> tuple[int, str] | None:
        """A request that must never reach a connector, as (status, message), or None:
        anything at the relay path (a connector dialing a wrong URL would send its token),
        WebSocket upgrades (no pass-through yet), and connector tokens presented as keys."""
        relay = self.relay_path
        if req.path == relay or req.path.startswith(relay.rstrip("/") + "/"):
            if req.is_websocket:
                return 404, f"no relay endpoint at this path; the relay endpoint is {relay}"
            return 400, f"the relay endpoint {relay} needs a WebSocket upgrade"
        if req.is_websocket:
            return 404, (
                f"no WebSocket endpoint at this path (the relay endpoint is {relay}); "
                "WebSocket pass-through to the LLM is not supported"
            )
        if carries_secret(req.headers, req.target, self._token_mark):
            return 401, (
                "a connector token was presented as an API key; it is not forwarded. "
                "Connector tokens belong in the connector's token_file"
            )
        return None

    def _refusal(self, req: Request) -> tuple[int, str] | None:
        """A limit the request head breaks, as (status, message), or None."""
        lim = self.limits
        if len(req.headers) > lim.max_headers:
            self.limit_hit("headers")
            return 431, f"too many header facts (limit {lim.max_headers})"
        if len(req.target) > lim.max_uri:
            self.limit_hit("uri")
            return 414, "request target too long"
        if self.in_flight > lim.max_requests:
            self.limit_hit("requests")
            return 503, "too many requests in progress; retry later"
        return None

    def _forwarded_headers(self, req: Request) -> list[tuple[bytes, bytes]]:
        """Hop-by-hop headers out; client-sent forwarding headers (``Forwarded``,
        ``X-Forwarded-*``, ``X-Real-IP``…) only from trusted proxies, the bridge's own
        ``X-Trio-Bridge-*`` namespace from nobody; our own X-Forwarded-For (the peer's address)
        and X-Forwarded-Proto added."""
        headers = [
            (k, v)
            for k, v in strip_hop_by_hop(req.headers, also=frozenset({b"host"}))
            if not k.startswith(BRIDGE_NAMESPACE)
        ]
        peer = req.client
        trusted = bool(peer and self.trusted and self._trusted(peer))
        prior = b""
        if trusted:
            prior = b", ".join(v for k, v in headers if k == b"x-forwarded-for")
        else:
            headers = [(k, v) for k, v in headers if not _forwarding(k)]
        headers = [(k, v) for k, v in headers if k.replace(b"_", b"-") != b"x-forwarded-for"]
        if peer:
            headers.append((b"x-forwarded-for", (prior + b", " if prior else b"") + peer.encode()))
        if not trusted or not any(k == b"x-forwarded-proto" for k, _ in headers):
            headers = [(k, v) for k, v in headers if k != b"x-forwarded-proto"]
            headers.append((b"x-forwarded-proto", req.scheme.encode()))
        return headers

    async def _forward(self, ex: _Exchange, facts: Facts) -> str:
        """Check the request's head, read the first part of its body, pick the model
        candidates, and send it to a connector of its route."""
        refused = await self._check_head(ex, facts)
        if refused is not None:
            return refused
        first = await self._first_body_part(ex)
        if ex.body_size > self.max_body:
            self.limit_hit("body")
            return await self._error(ex, facts, 413, "request body too large")
        req = ex.req
        route, target = self._route(req)
        facts.route = route
        try:  # what goes to the connector (after /r/<route> is taken off) passes the rule
            check_target(target)
        except BadTarget as exc:
            return await self._error(ex, facts, exc.status, str(exc))
        picked = await self._pick_candidates(ex, facts, route, first)
        if isinstance(picked, str):
            return picked  # answered with an error
        model, candidates, served = picked
        ex.merge_models = (
            req.method == "GET" and target.split("?", 1)[0] in MODEL_LISTS and served is not None
            and len({n for names in served.values() for n in names}) > 1
        )  # fmt: skip
        headers = self._forwarded_headers(req)
        for n, candidate in enumerate(candidates):
            body = first if candidate == model else with_model(first, candidate)
            if candidate or model:
                facts.model = candidate or model
            head = RequestHead(
                req.method, target, _with_length(headers, body, first), ex.request_id
            )
            outcome = await self._to_route(
                ex, facts, route, head, body, candidate, last=n == len(candidates) - 1
            )
            if outcome != _FALLBACK:
                return outcome
            log.info(
                "model %s failed before answering; trying %s",
                candidate,
                candidates[n + 1],
                extra={"request_id": ex.request_id, "route": route},
            )
        raise AssertionError("the last candidate never falls back")  # pragma: no cover

    async def _pick_candidates(
        self, ex: _Exchange, facts: Facts, route: str, first: bytes
    ) -> tuple[str | None, list[str | None], dict[str, list[str]] | None] | str:
        """The route's model candidates (see ``_candidates``), or the outcome of the 503
        (route unknown) or 404 (model not served there) answered instead."""
        if not self.registry.seen_within(route, max(ROUTE_MEMORY, self.queue_timeout)):
            # Waiting queue_timeout only helps across short gaps (a connector re-dialling).
            return await self._error(
                ex,
                facts,
                503,
                f"no connector serves route {route!r} (none connected recently); retry later",
                retry_after=RETRY_AFTER_NOT_READY,
            )
        model, candidates, served = self._candidates(ex, route, first)
        if candidates:
            return model, candidates, served
        facts.model = model
        return await self._error(
            ex,
            facts,
            404,
            f"the model {str(model)[:128]!r} does not exist on this route; available: "
            + ", ".join(sorted(served or ())[:50]),
            code="model_not_found",
        )

    async def _check_head(self, ex: _Exchange, facts: Facts) -> str | None:
        """Answer (and return the outcome of) a request its head already rules out."""
        req = ex.req
        if req.method == "OPTIONS" and req.target == b"*":  # the server's own, never relayed
            facts.status = 204
            ex.facts.head_at = time.monotonic()
            allow = ", ".join(DEFAULT_METHODS).encode()
            await ex.req.respond(
                204, [(b"allow", allow), (b"x-request-id", ex.request_id.encode())], end=True
            )
            return "ok"
        try:  # the one rule for what may be relayed (the connector applies it again)
            check_method(req.method)
        except BadTarget as exc:
            return await self._error(ex, facts, exc.status, str(exc))
        refusal = self._not_for_connectors(req)
        if refusal is not None:
            return await self._error(ex, facts, *refusal)
        refusal = self._refusal(req)
        if refusal is not None:
            status, message = refusal
            return await self._error(
                ex, facts, status, message, retry_after=1 if status == 503 else None
            )
        declared = header(req.headers, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            if declared.isdigit():
                self.limit_hit("body")
                return await self._error(ex, facts, 413, "request body too large")
            return await self._error(ex, facts, 400, "invalid Content-Length")
        return None

    async def _first_body_part(self, ex: _Exchange) -> bytes:
        """Up to 64 KiB of the body, so a small request travels as one relay message."""
        parts: list[bytes | bytearray] = []
        while ex.body_size < _INITIAL_BODY:
            chunk = await ex.req.receive_body()
            if not chunk:
                ex.body_done = True
                break
            parts.append(chunk)
            ex.body_size += len(chunk)
        return b"".join(parts)

    def _candidates(
        self, ex: _Exchange, route: str, first: bytes
    ) -> tuple[str | None, list[str | None], dict[str, list[str]] | None]:
        """(the requested model, the models to try in order, what the route serves). An empty
        list: no connector serves it (404). One box, or a pool of identical ones, is not
        routed by model: its LLM decides about names it does not list (llama.cpp answers
        any); routing by model starts with a second set of models."""
        by_model = not self.registry.one_model_set(route)
        served = self.registry.models(route) if by_model else None  # None: no 404s
        model = request_model(first) if ex.body_done and (by_model or self.aliases) else None
        candidates: list[str | None] = list(self.aliases.get(model, [model])) if model else [None]
        if served is not None and model is not None:
            candidates = [c for c in candidates if c in served]
        return model, candidates, served

    async def _to_route(
        self,
        ex: _Exchange,
        facts: Facts,
        route: str,
        head: RequestHead,
        first: bytes,
        model: str | None,
        *,
        last: bool,
    ) -> str:
        """Send the request to a connector of ``route`` that serves ``model``; a stream the
        connector REFUSED was never processed, so it goes to another one (we hold the body)."""
        for _attempt in range(MAX_ATTEMPTS):
            handle = await self._acquire(ex, facts, route, model)
            if isinstance(handle, str):
                return handle  # answered with an error
            facts.connector = handle.name
            try:
                stream = handle.relay.open_stream(head, end_stream=ex.body_done and not first)
            except RelayClosed:
                continue
            except HeadTooLarge:
                return await self._error(ex, facts, 431, "request head too large for the relay")
            finally:
                self.registry.release(handle)
            ex.stream = stream
            if first:
                # queued behind the head without a checkpoint: one relay message for both
                try:
                    await stream.send_data(first, end_stream=ex.body_done)
                except StreamReset:
                    pass  # answered below from the reset
            if not ex.body_done:
                self._start_reader(ex)  # the rest of the upload goes into the stream
            outcome = await self._respond(
                ex, facts, may_retry=ex.body_done, may_fall_back=ex.body_done and not last
            )
            facts.bytes_out = stream.bytes_received
            if outcome != _RETRY:
                return outcome
        return await self._error(ex, facts, 503, "every connector refused; retry", retry_after=1)

    async def _acquire(
        self, ex: _Exchange, facts: Facts, route: str, model: str | None
    ) -> ConnectorHandle | str:
        """A connector of ``route`` with a free slot (waiting in the route's queue up to
        ``queue_timeout``), or the outcome of the error answered instead."""
        if self.registry.not_ready(route) and not self.queue_when_not_ready:
            return await self._error(
                ex,
                facts,
                503,
                "the LLM behind this route is not ready; retry later",
                retry_after=RETRY_AFTER_NOT_READY,
            )
        waited = time.monotonic()
        # a free connector (the usual case) is taken without a cancel scope for the wait
        handle = self.registry.try_acquire(route, model)
        try:
            if handle is None:
                with trio.CancelScope(deadline=trio.current_time() + self.queue_timeout):
                    handle = await self.registry.acquire(route, model)
        except QueueFull:
            self.limit_hit("queue")
            return await self._error(
                ex,
                facts,
                503,
                "too many requests are waiting for this route; retry later",
                retry_after=1,
            )
        m = self.metrics
        m.child(m.queue_wait, "broker", self.registry.metric_label(route)).observe(
            time.monotonic() - waited
        )
        if handle is None:
            return await self._error(
                ex,
                facts,
                503,
                "no connector is available for this route; retry later",
                retry_after=max(1, int(self.queue_timeout)),
            )
        return handle

    async def _merged_models(self, ex: _Exchange, facts: Facts, head: ResponseHead) -> str:
        """A connector accepted the key for ``/v1/models`` (``/api/tags``): answer with the
        models of every connector of the route instead of that one's list."""
        stream = ex.stream
        assert stream is not None
        size = 0
        while chunk := await stream.receive_data():  # read and dropped (bounded by the window)
            size += len(chunk)
        served = self.registry.models(facts.route or DEFAULT_ROUTE) or {}
        path = ex.req.path.removeprefix(f"/r/{(facts.route or '')}")
        if path.startswith("/api/tags"):
            doc: dict[str, Any] = {
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
        headers = [
            (k, v) for k, v in head.headers if k.lower() not in (b"content-length", b"content-type")
        ]
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        facts.status = 200
        ex.facts.head_at = time.monotonic()
        await ex.req.respond(200, headers, body, end=True)
        return "ok"

    def _route(self, req: Request) -> tuple[str, str]:
        """(route, target to forward): ``/r/<route>/…`` (prefix stripped), else
        ``<route>.<route_domain>`` by Host, else the default route."""
        path, qsep, query = req.target.decode("latin-1").partition("?")
        route = DEFAULT_ROUTE
        if path.startswith("/r/"):
            name, sep, rest = path[3:].partition("/")
            if name and _ROUTE_NAME.match(name):
                route, path = name, "/" + rest if sep else "/"
        elif self.route_domain:
            host = (header(req.headers, b"host") or b"").decode("latin-1").lower()
            host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            label, dot, domain = host.partition(".")
            if dot and domain == self.route_domain and _ROUTE_NAME.match(label):
                route = label
        return route, path + qsep + query

    async def _respond(
        self, ex: _Exchange, facts: Facts, *, may_retry: bool, may_fall_back: bool
    ) -> str:
        """Answer the client from the stream; the outcome (or _RETRY / _FALLBACK: nothing
        reached the client, try another connector / the next candidate model)."""
        stream = ex.stream
        assert stream is not None
        try:
            head = await self._response_head(ex)
        except StreamReset as exc:
            return await self._answer_reset(ex, facts, exc, may_retry, may_fall_back)
        if may_fall_back and head.status in (502, 503, 504):
            stream.reset(ResetCode.CANCEL, "falling back to another model")
            return _FALLBACK
        if ex.merge_models and head.status == 200:
            return await self._merged_models(ex, facts, head)
        facts.status = head.status
        facts.head_at = time.monotonic()
        try:
            await self._relay_answer(ex, stream, head)
        except StreamReset as exc:
            # Abort: returning without the end makes the server close the connection, so the
            # client sees an incomplete response, never a complete one.
            facts.reset = exc.reason
            return "client_gone" if ex.client_gone else "aborted"
        return "ok"

    async def _response_head(self, ex: _Exchange) -> ResponseHead:
        stream = ex.stream
        assert stream is not None
        # Most small answers are back within a couple of milliseconds: only then start
        # the task that watches for the client going away (it costs a task and a poll
        # registration per request). Cancel latency grows by at most this wait.
        if stream.response_head is None and not ex.reader_started:
            with trio.CancelScope(deadline=trio.current_time() + WATCH_AFTER):
                await stream.receive_response_head()
            if stream.response_head is None:
                self._start_reader(ex)
        return await stream.receive_response_head()

    async def _answer_reset(
        self,
        ex: _Exchange,
        facts: Facts,
        exc: StreamReset,
        may_retry: bool,
        may_fall_back: bool,
    ) -> str:
        """The stream was reset before its answer began: say why, or try elsewhere."""
        if ex.bad_body:
            return await self._error(ex, facts, 400, ex.bad_body)
        if ex.client_gone:
            return "client_gone"
        if may_retry and exc.code == ResetCode.REFUSED:
            return _RETRY
        if ex.too_large:
            return await self._error(ex, facts, 413, "request body too large")
        if may_fall_back:
            return _FALLBACK  # nothing reached the client: the next candidate model
        status, message = _RESET_STATUS.get(
            exc.code,
            (502, "the connector failed to answer"),  # type: ignore[call-overload]
        )
        return await self._error(
            ex, facts, status, message, retry_after=1 if status == 503 else None
        )

    async def _relay_answer(self, ex: _Exchange, stream: RelayStream, head: ResponseHead) -> None:
        """Write the head and the body to the client as they arrive; StreamReset if the
        stream is reset before its end."""
        req = ex.req
        # What already arrived goes out with the head, in one write.
        first, done = stream.take_ready()
        await req.respond(head.status, head.headers, first, end=done)
        if done:
            return
        self._start_reader(ex)  # a streamed answer: watch for the client going away
        # A reset of an unfinished answer must also stop a write that is blocked on a
        # client who stopped reading (the connector resets after its stall_timeout):
        # otherwise this request and its connection would stay forever.
        # The same scope bounds each write by the send timeout (one scope per answer, not
        # one per chunk).
        with trio.CancelScope() as writing:
            stream.on_reset = lambda: None if stream.recv_done else writing.cancel()
            while chunk := await stream.receive_data():
                more, done = stream.take_ready()
                await req.send(chunk + more if more else chunk, end=done, within=writing)
                if done:
                    return
        if writing.cancelled_caught:
            if stream.reset_error is not None:
                raise stream.reset_error
            assert req.send_timed_out
            raise ClientDisconnected("the client stopped reading (send timeout)")
        await req.end()


@attrs.define(slots=True, eq=False)
class _Exchange:
    """What the tasks of one public request share: its facts (logged and counted at the end)
    and the state of its body and stream."""

    request_id: str
    req: Request
    facts: Facts = attrs.field(init=False)
    nursery: trio.Nursery | None = None
    stream: RelayStream | None = None
    body_size: int = 0
    body_done: bool = attrs.field(init=False)
    reader_started: bool = False  # the task reading the rest of the body / watching the client
    client_gone: bool = False
    bad_body: str = ""
    too_large: bool = False
    merge_models: bool = False  # answer /v1/models with the route's merged list
    reset_code: int | None = None

    def __attrs_post_init__(self) -> None:
        self.facts = Facts(self.request_id, self.req.method, self.req.path)
        self.body_done = self.req.body_done


class _HelloJudge:
    """The broker's verdict on a connector's hello: the route it asks for must be a valid
    name its token may serve. ``refused`` keeps the metric label of a refusal."""

    def __init__(self, entry: SecretEntry) -> None:
        self.entry = entry
        self.refused = ""

    def __call__(self, hello: Hello) -> str | None:
        entry, route = self.entry, hello.route or DEFAULT_ROUTE
        if not _ROUTE_NAME.match(route):
            self.refused = "bad_route"
            return f"invalid route name {route[:64]!r}"
        if not entry.allows_route(route):
            self.refused = "route_not_allowed"
            return (
                f"route {route!r} is not allowed for connector token {entry.name!r} (id "
                f"{entry.id}; it may serve: {entry.route_text}); on the broker: "
                f"trio-bridge tokens set {entry.name} --route {route}"
            )
        return None


def _with_length(
    headers: list[tuple[bytes, bytes]], body: bytes, original: bytes
) -> list[tuple[bytes, bytes]]:
    """``headers`` for ``body`` where it replaced ``original`` (a rewritten model)."""
    if body is original:
        return headers
    out = [(k, v) for k, v in headers if k != b"content-length"]
    out.append((b"content-length", str(len(body)).encode()))
    return out


async def _deny(req: Request, status: int, message: str) -> None:
    body = error_body(message, "invalid_request_error", "relay_refused")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await req.respond(status, headers, body, end=True)

"""The broker's relay endpoint: connectors dial it (a WebSocket upgrade at ``relay_path``), show
a connector token, say hello, and are registered for their route while the relay lasts.

    upgrade ──▶ token (refusals counted per client address and per token id: 401, then 429)
            ──▶ hello judged (a valid route its token may serve) ──▶ registered ──▶ relay runs
            ──▶ unregistered when it ends

:class:`RelayEndpoint` also watches the token file: a relay whose token was revoked, rotated
out, or no longer allows its route is closed, telling the connector why.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict

import trio

from trio_bridge._config import Config
from trio_bridge._errors import RelayClosed
from trio_bridge._observe import Metrics
from trio_bridge.accounts._keys import SecretEntry, SecretStore, secret_id
from trio_bridge.broker._registry import DEFAULT_ROUTE, ConnectorHandle, Registry
from trio_bridge.broker._rules import ROUTE_NAME, Trust
from trio_bridge.http._messages import error_body, presented_key
from trio_bridge.http._server import Request
from trio_bridge.relay._frames import MAX_MESSAGE
from trio_bridge.relay._protocol import Hello, Session
from trio_bridge.relay._relay import HANDSHAKE_TIMEOUT, Liveness, Relay

log = logging.getLogger("trio_bridge.broker")

FAILURE_WINDOW = 60.0  # refused tokens are counted per client address and token id this long
MAX_FAILURE_KEYS = 10_000  # addresses and token ids remembered (the oldest forgotten first)
TOKEN_CHECK_EVERY = 1.0  # seconds between two looks at the token file


class FailureWindows:
    """Refusals per key (a client address, a token id) in windows of ``FAILURE_WINDOW``
    seconds of trio's clock; at most ``MAX_FAILURE_KEYS`` keys (memory is bounded)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def exceeded(self, key: str) -> bool:
        """True if ``key`` had ``limit`` refusals in its current window."""
        now = trio.current_time()
        start, n = self._windows.get(key, (now, 0))
        return now - start < FAILURE_WINDOW and n >= self.limit

    def count(self, key: str) -> None:
        now = trio.current_time()
        start, n = self._windows.pop(key, (now, 0))
        if now - start >= FAILURE_WINDOW:
            start, n = now, 0
        self._windows[key] = (start, n + 1)
        while len(self._windows) > MAX_FAILURE_KEYS:
            self._windows.popitem(last=False)


class _HelloJudge:
    """The broker's verdict on a connector's hello: the route it asks for must be a valid
    name its token may serve. ``refused`` keeps the metric label of a refusal."""

    def __init__(self, entry: SecretEntry) -> None:
        self.entry = entry
        self.refused = ""

    def __call__(self, hello: Hello) -> str | None:
        entry, route = self.entry, hello.route or DEFAULT_ROUTE
        if not ROUTE_NAME.match(route):
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


class RelayEndpoint:
    """Accepts connectors' relays and keeps the registry in step with them.

    Error handling: a refused token is answered (401, 429) and counted; a refused hello or a
    failed handshake closes that relay and is counted; neither reaches the caller.
    Cancellation: cancelling :meth:`serve` (the broker stopping) ends that relay at once.
    """

    def __init__(
        self,
        config: Config,
        tokens: SecretStore,
        registry: Registry,
        metrics: Metrics,
        trust: Trust,
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.registry = registry
        self.metrics = metrics
        self.trust = trust
        self.failures = FailureWindows(config.broker.max_token_failures)
        #: one liveness timer for every connector's relay (run by the broker)
        self.liveness = Liveness(float(config.relay.ping_interval))
        #: set by :meth:`go_away` (the broker drains): new relays are refused with 503
        self.going_away: str | None = None

    def go_away(self, reason: str) -> None:
        """Tell every connector this broker is going (GOAWAY with ``reason``: its streams in
        flight finish; it knows the coming close is planned), and refuse new relays."""
        self.going_away = reason
        for h in self.registry.connectors():
            h.relay.send_goaway(reason)

    async def serve(self, req: Request) -> None:
        """A connector's WebSocket upgrade: its token, then the hello, then the relay serves
        until it ends (its connector registered meanwhile)."""
        if self.going_away is not None:  # a load balancer's other brokers are to get it
            await _deny(req, 503, f"{self.going_away}: dial again later", retry_after=5)
            return
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
            liveness=self.liveness,
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
        entry = self.tokens.lookup(token) if token is not None else None
        if entry is not None and entry.usable():
            return entry  # noqa: ASYNC910  a valid token: the upgrade that follows awaits
        client = self.trust.client_address(req)
        ident = entry.id if entry is not None else secret_id(token) if token else None
        counted = [f"addr {client}"] + ([f"id {ident}"] if ident is not None else [])
        limited = any(self.failures.exceeded(c) for c in counted)
        for c in counted:
            self.failures.count(c)
        self.metrics.auth_failures.labels("broker").inc()
        if limited:
            self.metrics.relays_refused.labels("broker", "rate_limited").inc()
            await _deny(req, 429, "too many refused connector tokens; retry later")
            return None
        self.metrics.relays_refused.labels("broker", "bad_token").inc()
        if entry is None:
            log.warning("relay refused: bad connector token", extra={"peer": client})
            await _deny(req, 401, "invalid connector token")
            return None
        why = (
            f"revoked at {entry.revoked}"
            if entry.revoked
            else f"replaced at {entry.replaced}, expired at {entry.expires}"
            if entry.replaced
            else f"expired at {entry.expires}"
        )
        log.warning(
            "relay refused: connector token %r %s",
            entry.name,
            why,
            extra={"peer": client, "token_id": entry.id},
        )
        await _deny(req, 401, f"this connector token was {why}: ask the broker's operator")
        return None

    def _register(self, relay: Relay, hello: Hello, entry: SecretEntry) -> ConnectorHandle:
        relay.name = hello.name or entry.name  # for the relay's own log lines
        handle = ConnectorHandle(
            relay,
            name=relay.name,
            route=hello.route or DEFAULT_ROUTE,
            token_id=entry.id,
            capacity=hello.capacity or hello.max_streams,
            connected_since=time.time(),  # wall clock: shown to people
        )
        relay.on_change = lambda _relay: self.registry.changed(handle)
        self.registry.add(handle)
        self._count_relays(handle.route)
        return handle

    def _count_relays(self, route: str) -> None:
        self.metrics.relays.labels("broker", route).set(len(self.registry.connectors(route)))

    async def watch_tokens(self) -> None:
        """Close relays whose connector token was revoked, expired (after a rotation) or no
        longer allows their route. Looked at every second, but the connectors are gone
        through only when the tokens file changed or a token's expiry passed (a relay's token
        was checked when it dialled): thousands of idle relays cost nothing here. Runs until
        cancelled."""
        generation, recheck_at = -1, -math.inf
        while True:
            await trio.sleep(TOKEN_CHECK_EVERY)
            self.tokens.maybe_reload()
            now = time.time()  # wall clock: expiry times are dates
            if self.tokens.generation == generation and now < recheck_at:
                continue
            generation, recheck_at = self.tokens.generation, self.tokens.next_expiry(now)
            self._close_unauthorised()

    def _close_unauthorised(self) -> None:
        valid = self.tokens.active_ids()
        for h in self.registry.connectors():
            entry = self.tokens.get(h.token_id)
            if entry is None or entry.revoked:
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


async def _deny(req: Request, status: int, message: str, retry_after: int | None = None) -> None:
    body = error_body(message, "invalid_request_error", "relay_refused")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await req.respond(status, headers, body, end=True)

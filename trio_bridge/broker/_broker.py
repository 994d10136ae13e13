"""The broker role: the public HTTP port, the relay endpoint, and the connector registry.

One public server (``http._server``, trio + h11) serves both: a WebSocket upgrade at
``relay_path`` goes to the relay endpoint (:class:`~trio_bridge.broker._relays.RelayEndpoint`:
a connector's token, hello, registration); every other request is one
:class:`~trio_bridge.broker._exchange.Exchange`, relayed to a connector of its route. The role
object wires them together, serves, drains, and reports (status, readiness, the admin pages).

Shutdown (:meth:`Broker.drain`): new requests get 503 (readyz too) → in-flight ones run to
completion for up to the grace period → the rest are aborted with reason "shutdown" (a 503,
or an answer cut short) → once those aborts reached their clients (bounded by
``ABORT_DEADLINE``), :meth:`Broker.serve` returns.
"""

from __future__ import annotations

import logging
import ssl
import time
from functools import partial
from typing import Any

import trio

from trio_bridge._config import Config, parse_hostport
from trio_bridge._errors import ConfigError, listening
from trio_bridge._net import TCP, Network
from trio_bridge._notify import Notifier
from trio_bridge._observe import Metrics, RecentStats
from trio_bridge._version import __version__
from trio_bridge.accounts._keys import SecretStore, admin_token
from trio_bridge.admin._admin import AdminApp
from trio_bridge.admin._ui import Pages
from trio_bridge.broker._exchange import Exchange
from trio_bridge.broker._exchanges import Exchanges
from trio_bridge.broker._registry import ConnectorHandle, Registry
from trio_bridge.broker._relays import RelayEndpoint
from trio_bridge.broker._rules import LimitHits, Trust
from trio_bridge.http._asgi import serve_app
from trio_bridge.http._server import Request, ServerLimits, serve_http

log = logging.getLogger("trio_bridge.broker")

#: how long a drain waits, after aborting what outlived the grace period, for those aborts to
#: reach their clients and the resets their connectors, before it stops serving
ABORT_DEADLINE = 1.0


class Broker:
    """The broker role: the public server's handler (relay endpoint and relayed requests),
    the connector registry, and its state."""

    def __init__(
        self, config: Config, tokens: SecretStore | None = None, *, network: Network = TCP
    ) -> None:
        self.config = config
        #: where it listens (the machine's TCP; tests: trio_bridge.testing.MemoryNetwork)
        self.network = network
        bc = config.broker
        self.tokens = tokens or SecretStore(config.path(bc.connector_tokens_file), "tbc")
        self.registry = Registry(max_queue=bc.max_queue)
        self.relay_path = bc.relay_path
        self.started = time.time()  # wall clock: shown to people
        self.admin_address: tuple[str, int] | None = None
        self.metrics = Metrics("broker")
        self.notifier = Notifier()
        self.limits = config.limits
        self.trust = Trust(bc.trusted_proxies)
        self.limit_hit = LimitHits(self.metrics)
        self.relays = RelayEndpoint(config, self.tokens, self.registry, self.metrics, self.trust)
        self.exchanges = Exchanges(
            config,
            self.registry,
            self.metrics,
            self.limit_hit,
            self.trust,
            token_mark=f"{self.tokens.prefix}_".encode(),
        )
        #: the last five minutes (status, admin page), all routes and per route
        self.stats: RecentStats = self.exchanges.stats
        self.route_stats: dict[str, RecentStats] = self.exchanges.route_stats
        self.aliases = self.exchanges.aliases
        self.metrics.in_flight.labels("broker").set_function(lambda: self.in_flight)
        self.metrics.queued.labels("broker").set_function(lambda: self.registry.queued)
        self._stop = trio.Event()

    @property
    def in_flight(self) -> int:
        return self.exchanges.in_flight

    @property
    def draining(self) -> bool:
        return self.exchanges.draining

    async def handle(self, req: Request) -> None:
        """The public server's handler: the relay endpoint or a request to relay."""
        if req.is_websocket and req.path == self.relay_path:
            await self.relays.serve(req)
        else:
            await Exchange(self.exchanges, req).run()

    async def serve(
        self,
        listen: str | None = None,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the public port (and the admin endpoint on ``admin_listen``, if set) until
        cancelled or drained; started value: the bound public (host, port)."""
        self.registry.born = trio.current_time()
        bc = self.config.broker
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.relays.watch_tokens)
            nursery.start_soon(self.relays.liveness.run)
            if bc.admin_listen:
                hosts = [bc.admin_listen, *bc.admin_hosts]
                admin = AdminApp(
                    self.metrics,
                    self.ready,
                    self.status,
                    self._pages(),
                    hosts=hosts,
                    detail=self.readiness,
                )
                with listening("broker.admin_listen", bc.admin_listen):
                    self.admin_address = await nursery.start(
                        partial(serve_app, admin, bc.admin_listen, network=self.network)
                    )
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
                        network=self.network,
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

    async def drain(self, grace: float | None = None) -> None:
        """Graceful stop: new requests get 503 (readyz too), in-flight ones run to completion
        for up to ``grace`` (``shutdown_grace``); the rest are aborted with reason "shutdown"
        (503 if nothing was sent yet, else the answer is cut short, and their streams are
        reset); once they ended (at most ``ABORT_DEADLINE`` later), :meth:`serve` returns."""
        if grace is None:
            grace = float(self.config.limits.shutdown_grace)
        exchanges = self.exchanges
        exchanges.draining = True
        self.relays.go_away("broker draining")
        self.notifier.stopping(f"draining; {self.in_flight} in flight")
        log.info("draining: refusing new requests; %d in flight", self.in_flight)
        with trio.move_on_after(grace):
            await exchanges.wait_idle()
        if self.in_flight:
            log.warning("grace period over: aborting %d requests", self.in_flight)
            exchanges.abort_all("broker shutting down")
        with trio.move_on_after(ABORT_DEADLINE):
            await exchanges.wait_idle()  # their answers were written, their resets queued
            for handle in self.registry.connectors():
                await handle.relay.wait_flushed()  # the resets are on the wire
        self._stop.set()

    def ready(self) -> bool:
        """Serving (not draining). Not tied to connectors: they dial this same port, often
        through the same load balancer, which would keep them out while it is not ready."""
        return not self.draining

    def problems(self) -> list[str]:
        """What keeps requests from being served though the broker is ready."""
        found = []
        relays = self.registry.connectors()
        if not relays:
            found.append(
                "no connector is connected: every API request gets 503 (connectors dial "
                "this broker's public port at /_bridge/relay with a token from `trio-bridge "
                "tokens add`)"
            )
        elif not any(h.ready for h in relays):
            found.append(f"no connector's LLM is ready ({len(relays)} connected)")
        if self.tokens.reload_error is not None:
            found.append(f"connector tokens file: {self.tokens.reload_error}")
        return found

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` says beside ``ready``."""
        return {"problems": self.problems()}

    def status_line(self) -> str:
        relays = self.registry.connectors()
        ready = sum(1 for h in relays if h.ready)
        state = "draining" if self.draining else "serving"
        return (
            f"{state}; {len(relays)} connectors ({ready} ready); in flight {self.in_flight}; "
            f"queued {self.registry.queued}"
        )

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
                    **_health(h),
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
            "problems": self.problems(),
        }

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
                    **_health(h),
                }
            )
        for route, stats in self.route_stats.items():
            r = routes.setdefault(route, {"connectors": []})
            r["recent"] = stats.summary()
            r["series"] = stats.series()
        for route, r in routes.items():
            r["queued"] = self.registry.queued_for(route)
        return {
            "now": time.time(),  # wall clock: shown to people
            "draining": self.draining,
            "problems": self.problems(),
            "in_flight": self.in_flight,
            "queued": self.registry.queued,
            "aliases": self.aliases,
            "routes": dict(sorted(routes.items())),
        }

    def _pages(self) -> Pages:
        return Pages(
            "broker",
            token=admin_token(self.config, self.config.broker.admin_token_file),
            apis={"/api/routes": lambda q: self.routes_overview()},
        )

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
            exempt=tuple(self.trust.networks),
        )

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


def _health(h: ConnectorHandle) -> dict[str, Any]:
    """A connector's passive health, for status and the broker page."""
    left = h.ejected_until - trio.current_time()
    return {
        "answers": h.answers,
        "failed": h.failed,
        "ejected_for_s": round(left, 1) if left > 0 else 0,
    }

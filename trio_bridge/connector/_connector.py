"""The connector role: its parts, wired. :class:`RelayKeeper` dials the brokers and keeps the
relays up, :class:`LLMWatch` follows the LLM's health and models, each relayed stream becomes a
:class:`RelayedRequest` (key, limits, body, slot, LLM, answer) through the :class:`Forwarder`,
and :class:`Accounting` writes each request's end down; the usage store flushes on its own.

Cancellation: :meth:`Connector.run` owns every task; cancelling it stops them all (relays close
without the WebSocket close handshake); :meth:`Connector.stop` closes them cleanly and
:meth:`Connector.drain` first lets in-flight requests finish.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import trio

from trio_bridge._config import Config
from trio_bridge._errors import ConfigError, listening
from trio_bridge._net import TCP, Network
from trio_bridge._notify import Notifier
from trio_bridge._observe import Metrics, quiet_third_party_loggers
from trio_bridge._version import __version__
from trio_bridge.accounts._keys import SecretStore, budget
from trio_bridge.accounts._limits import Limiter
from trio_bridge.accounts._pool import PoolStore
from trio_bridge.accounts._usagestore import KnownModels, UsageBook, UsageStore, utc_day
from trio_bridge.admin._admin import AdminApp
from trio_bridge.admin._inspect import Inspector
from trio_bridge.connector._accounting import Accounting
from trio_bridge.connector._body import KEY_FAILURES_PER_WINDOW, RelayGuard
from trio_bridge.connector._forwarder import Forwarder
from trio_bridge.connector._llm import LLMWatch
from trio_bridge.connector._pages import pages
from trio_bridge.connector._relays import RelayKeeper, probe_relay, read_secret_file
from trio_bridge.connector._slots import FairSlots
from trio_bridge.http._asgi import serve_app
from trio_bridge.http._upstream import H11Transport
from trio_bridge.relay._frames import ResetCode
from trio_bridge.relay._relay import Relay, RelayStream

#: seconds between two looks at the keys file (a request also looks)
KEYS_CHECK_EVERY = 1.0

if TYPE_CHECKING:
    from trio_bridge.connector._portal import Portal

__all__ = ["KEY_FAILURES_PER_WINDOW", "Connector", "open_usage_store", "probe_relay",
           "read_secret_file"]  # fmt: skip

log = logging.getLogger("trio_bridge.connector")

#: how long a drain waits for the resets it sent to be written to the brokers
FLUSH_TIMEOUT = 1.0


def open_usage_store(
    config: Config, *, models: KnownModels | None = None, metrics: Metrics | None = None
) -> UsageStore:
    """The connector's usage store; a file it cannot open is a one-line ConfigError.
    ``models``: the models the connector knows now (default: the configured ``models``);
    ``metrics``: where the store's flush counters go."""
    path = config.path(config.connector.usage_file)
    configured = tuple(config.connector.models) or None
    try:
        return UsageStore(
            path,
            float(config.connector.usage_flush_interval),
            models=models or (lambda: configured),
            registry=metrics.registry if metrics is not None else None,
        )
    except (sqlite3.Error, OSError) as exc:
        raise ConfigError(
            f'connector.usage_file: cannot open {path}: {exc} (a writable place, or "" to '
            "keep no usage)"
        ) from None


def _upstream_auth(config: Config, upstream_key: str | None) -> tuple[bytes, bytes] | None:
    c = config.connector
    if upstream_key is None:
        upstream_key = os.environ.get("TRIO_BRIDGE_UPSTREAM_KEY") or (
            read_secret_file(config.path(c.upstream_api_key_file), "upstream_api_key_file")
            if c.upstream_api_key_file
            else None
        )
    return (b"authorization", b"Bearer " + upstream_key.encode()) if upstream_key else None


def is_portal(target: str) -> bool:
    path = target.split("?", 1)[0]
    return path == "/_bridge/portal" or path.startswith("/_bridge/portal/")


def _open_portal(config: Config, conn: Connector) -> Portal | None:
    """The portal when ``[portal] enabled`` (its libraries are the ``[portal]`` extra)."""
    if not config.portal.enabled:
        return None
    try:
        from trio_bridge.connector._portal import Portal
    except ImportError as exc:
        raise ConfigError(
            f"portal: enabled, but {exc.name} is missing: pip install 'trio-bridge[portal]'"
        ) from None
    return Portal(
        config,
        keys=conn.keys,
        limiter=conn.limiter,
        pool=conn.pool,
        # the portal reads load(), loaded and rows(), which the pool's store has too
        usage_store=cast("UsageStore | None", conn.usage_store),
        models=lambda: conn.llm.models,
    )


class Connector:
    """The connector: relays to brokers, the LLM behind them, and everything in between."""

    def __init__(
        self,
        config: Config,
        *,
        keys: SecretStore | None = None,
        token: str | None = None,
        upstream_key: str | None = None,
        network: Network = TCP,
    ) -> None:
        """``network``: how the brokers and the LLM are reached (the machine's TCP; tests:
        trio_bridge.testing.MemoryNetwork)."""
        c = config.connector
        quiet_third_party_loggers()
        self.config = config
        self.network = network
        self.limits = config.limits
        self.metrics = Metrics("connector")
        #: the pool's shared store (connector.store): keys, limits and usage live there
        self.pool = (
            PoolStore(config, models=lambda: self.llm.models, registry=self.metrics.registry)
            if c.store
            else None
        )
        self.keys = (
            self.pool.keys
            if self.pool is not None
            else keys or SecretStore(config.path(c.api_keys_file), "tbk")
        )
        self.name = c.name or os.uname().nodename
        self.local_url = c.local_url.rstrip("/")
        self.started = time.time()  # wall clock
        self.draining = False
        self.admin_address: tuple[str, int] | None = None
        self.notifier = Notifier()
        self._drained = trio.Event()  # draining, and the last request ended
        self._up_or_stopping = trio.Event()  # a first relay is up, or stop() came first
        self._llm_noted: bool | None = None
        ic = config.inspector
        self.inspector = Inspector(
            capture_bodies=ic.capture_bodies,
            max_records=ic.max_requests,
            max_body_bytes=int(ic.max_body_bytes),
            max_captured=ic.max_captured,
            max_captured_bytes=int(ic.max_captured_bytes),
        )
        upstream_auth = _upstream_auth(config, upstream_key)
        # httpx's models on a lean h11 transport (httpcore's pool costs ~0.5 ms per request),
        # called directly: no cookies, redirects or auth to apply, and an AsyncClient's
        # per-request bookkeeping was a third of what httpx cost. As many idle connections
        # are kept as requests may be at the LLM at once: a burst of max_concurrent streams
        # finds them open (capped at 32, a burst of 100 opened ~68 new ones each time).
        self.transport = H11Transport(
            connect_timeout=float(config.limits.connect_timeout),
            max_idle=c.max_concurrent,
            network=network,
        )
        self.llm = LLMWatch(config, self.transport, upstream_auth, self._llm_changed)
        self._usage_file = (
            open_usage_store(config, models=lambda: self.llm.models, metrics=self.metrics)
            if c.usage_file and self.pool is None
            else None
        )
        #: where usage is counted and read (pages, /_bridge/usage): the pool's store, else
        #: the usage file (None: nowhere)
        self.usage_store: UsageBook | None = self.pool or self._usage_file
        self.accounting = Accounting(c.route, self.metrics, self.inspector, self.usage_store)
        # with a pool, this connector's own counts serve only while the store is unreachable
        self.limiter = self.pool.local if self.pool is not None else Limiter()
        if self._usage_file is not None:  # daily budgets go on where they were
            wall = time.time()  # wall clock
            for key_id, tokens in self._usage_file.tokens_on(utc_day(wall)).items():
                entry = self.keys.get(key_id)  # counted under its name (rotations)
                self.limiter.seed_today(budget(entry) if entry else key_id, tokens, wall)
        self.slots = FairSlots(c.max_concurrent, c.max_queue, on_wait=self.accounting.waited)
        self.forwarder = Forwarder(
            config,
            keys=self.keys,
            limiter=self.limiter,
            slots=self.slots,
            transport=self.transport,
            llm=self.llm,
            inspector=self.inspector,
            accounting=self.accounting,
            usage_store=self.usage_store,
            upstream_auth=upstream_auth,
            pool=self.pool,
        )
        #: the self-service portal (``[portal]``; None when off)
        self.portal = _open_portal(config, self)
        self.keeper = RelayKeeper(
            config,
            name=self.name,
            llm=self.llm,
            handler=self.handle_stream,
            metrics=self.metrics,
            inspector=self.inspector,
            on_change=self._relays_changed,
            token=token,
            network=network,
        )
        self.metrics.in_flight.labels("connector").set_function(lambda: self.in_flight)
        self.metrics.queued.labels("connector").set_function(lambda: self.slots.queued)

    # -- what others look at --
    @property
    def relays(self) -> dict[str, Relay]:
        return self.keeper.relays

    @property
    def relay_states(self) -> dict[str, dict[str, Any]]:
        return self.keeper.states

    @property
    def relay_guards(self) -> dict[str, RelayGuard]:
        return self.keeper.guards

    @property
    def connected(self) -> trio.Event:
        return self.keeper.connected

    @property
    def stats(self) -> Any:
        return self.accounting.stats

    @property
    def usage(self) -> dict[str, dict[str, list[int]]]:
        return self.accounting.usage

    @property
    def llm_ready(self) -> bool:
        return self.llm.ready

    @property
    def models(self) -> tuple[str, ...] | None:
        return self.llm.models

    @property
    def in_flight(self) -> int:
        return self.keeper.in_flight

    def read_token(self) -> str:
        return self.keeper.read_token()

    async def handle_stream(self, stream: RelayStream, guard: RelayGuard | None = None) -> None:
        """One relayed request, start to end (see :class:`RelayedRequest`); the portal's
        pages (``/_bridge/portal/``) are answered by the portal."""
        head = stream.request_head
        if self.portal is not None and head is not None and is_portal(head.target):
            await self.portal.handle(stream)
            return
        await self.forwarder.handle_stream(stream, guard)

    def ready(self) -> bool:
        """Relay up to at least one broker AND the LLM answers (and not draining)."""
        return bool(self.relays) and self.llm.ready and not self.draining

    def not_ready_because(self) -> list[str]:
        """Why :meth:`ready` is False (empty when it is True)."""
        why = []
        if self.draining:
            why.append("draining")
        if not self.relays:
            errors = [st["last_error"] for st in self.relay_states.values() if st["last_error"]]
            why.append("no relay to a broker is up" + (f" ({errors[0]})" if errors else ""))
        if not self.llm.ready:
            why.append(f"the LLM is down ({self.llm.last_error})")
        return why

    def problems(self) -> list[str]:
        """What is wrong without stopping it serving (the keys file, the usage store)."""
        if self.pool is not None:  # the pool's store (and its keys)
            out = self.pool.problems()
        elif self.keys.reload_error is not None:
            out = [f"keys file: {self.keys.reload_error} (the last good keys are in force)"]
        else:
            out = []
        store = self._usage_file
        if store is not None and store.last_error is not None:
            out.append(f"usage store: {store.last_error} (rows kept in memory, retried)")
        return out

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` says beside ``ready``."""
        return {"not_ready_because": self.not_ready_because(), "problems": self.problems()}

    def status_line(self) -> str:
        n = len(self.config.connector.broker_urls)
        state = "draining; " if self.draining else ""
        llm = "up" if self.llm.ready else "DOWN"
        line = f"{state}relays {len(self.relays)}/{n} up; LLM {llm}; in flight {self.in_flight}"
        if problems := self.problems():
            line += f"; {len(problems)} problem(s): {problems[0]}"
        return line

    def status(self) -> dict[str, Any]:
        llm = self.llm
        return {
            "role": "connector",
            "version": __version__,
            "name": self.name,
            "route": self.config.connector.route,
            "ready": self.ready(),
            "draining": self.draining,
            "started": self.started,
            "llm": {
                "url": self.local_url,
                "up": llm.ready,
                "since": llm.since,
                "last_error": llm.last_error,
            },
            "relays": [
                {
                    "broker": url,
                    **state,
                    "in_flight": r.in_flight if (r := self.relays.get(url)) else 0,
                }
                for url, state in self.relay_states.items()
            ],
            "in_flight": self.in_flight,
            "max_concurrent": self.config.connector.max_concurrent,
            "recent": self.stats.summary(),
            "tokens": self.accounting.tokens_status(),
            **self.readiness(),
        }

    # -- changes --
    def _llm_changed(self) -> None:
        up = self.llm.ready
        self.metrics.upstream_up.labels("connector").set(1 if up else 0)
        if self._llm_noted is not up:
            self._llm_noted = up
            self.inspector.state("llm", "up" if up else "down")
        self.keeper.tell()
        self.notifier.status(self.status_line())  # systemctl status shows it at once

    def _relays_changed(self) -> None:
        if self.keeper.connected.is_set() and not self._up_or_stopping.is_set():
            self._up_or_stopping.set()
            self.notifier.ready(self.status_line())
        if self.draining and not self.in_flight:
            self._drained.set()
        self.notifier.status(self.status_line())

    # -- life --
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one relay per broker URL until :meth:`stop` or cancellation. Started (for
        ``nursery.start``) once the first relay is up, or at a stop before that."""
        c = self.config.connector
        try:
            async with trio.open_nursery() as outer:
                if c.admin_listen:
                    admin = AdminApp(
                        self.metrics,
                        self.ready,
                        self.status,
                        pages(self),
                        hosts=[c.admin_listen, *c.admin_hosts],
                        detail=self.readiness,
                    )
                    with listening("connector.admin_listen", c.admin_listen):
                        self.admin_address = await outer.start(
                            partial(serve_app, admin, c.admin_listen, network=self.network)
                        )
                    log.info("admin endpoint on http://%s:%d", *self.admin_address)
                with trio.move_on_after(float(self.limits.connect_timeout)):
                    await self.llm.first_look()
                outer.start_soon(self.llm.run)
                outer.start_soon(self.keeper.liveness.run)
                if self.pool is not None:  # the keys read (or tried) before any relay
                    await outer.start(self.pool.run)
                else:
                    outer.start_soon(self._watch_keys)
                if self._usage_file is not None:
                    outer.start_soon(self._usage_file.run)
                outer.start_soon(self.notifier.watchdog_loop, self.status_line)
                if c.notify_ready == "start":
                    self.notifier.ready(self.status_line())
                async with trio.open_nursery() as relays:
                    for url in c.broker_urls:
                        relays.start_soon(self.keeper.keep, url)
                    await self._up_or_stopping.wait()
                    task_status.started()
                outer.cancel_scope.cancel()  # every relay ended after stop()
        finally:
            with trio.move_on_after(2, shield=True):
                await self.transport.aclose()
                if self.portal is not None:
                    await self.portal.aclose()
                if self._usage_file is not None:
                    await self._usage_file.flush()  # what ended after the last flush

    async def _watch_keys(self) -> None:
        """Look at the keys file every KEYS_CHECK_EVERY even when no request comes: a file
        that cannot be read is logged and in ``problems`` when it happens, and a fixed one
        leaves them, not at the next request. Runs until cancelled."""
        while True:
            await trio.sleep(KEYS_CHECK_EVERY)
            self.keys.maybe_reload()

    def stop(self) -> None:
        """Close every relay cleanly (WebSocket close handshake) and make ``run`` return.

        Cancelling ``run`` instead also works; each relay then closes without the WebSocket
        close handshake.
        """
        self._up_or_stopping.set()
        self.keeper.stop("connector stopping")

    def last_words(self) -> None:
        """Before a hard stop (any thread, the event loop possibly stuck): write the usage
        not yet written."""
        if self.pool is not None and not self.pool.write_now():
            log.error("usage not written to the pool store before the hard stop")
        if self._usage_file is not None and not self._usage_file.write_now():
            log.error("usage not written before the hard stop (the file is busy or failing)")

    async def drain(self, grace: float | None = None) -> None:
        """Graceful stop: tell every broker we take no new requests (GOAWAY), let in-flight
        requests finish for up to ``grace`` seconds (``shutdown_grace``), then :meth:`stop`."""
        await trio.lowlevel.checkpoint()
        if grace is None:
            grace = float(self.limits.shutdown_grace)
        self.draining = True
        log.info("draining: no new requests; waiting for %d in flight", self.in_flight)
        self.keeper.goaway("connector draining")
        self.notifier.stopping(f"draining; {self.in_flight} in flight")
        with trio.move_on_after(grace):  # noqa: ASYNC912  waits only while requests are in flight
            if self.in_flight:
                await self._drained.wait()  # set when the last stream leaves its relay
        if self.in_flight:
            log.warning("grace period over: aborting %d requests", self.in_flight)
        reset = self.keeper.reset_all(ResetCode.SHUTDOWN, "connector shutting down")
        with trio.move_on_after(FLUSH_TIMEOUT):  # noqa: ASYNC912  waits only for relays that were up; the resets reach the brokers first
            for relay in reset:
                await relay.wait_flushed()
        self.stop()

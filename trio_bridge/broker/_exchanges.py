"""What the broker's public requests share: settings, the registry, metrics and recent
figures; the decisions that need them (which models to try, a connector with room, how to
count a finished request); and which requests are in flight, so a draining broker can wait
for them and abort the rest. Each request is an ``Exchange`` (``_exchange``), which calls
into this module, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from trio_bridge._config import Config
from trio_bridge._errors import QueueFull
from trio_bridge._observe import (
    Facts,
    Metrics,
    RecentStats,
    is_error,
    reset_reason,
    status_class,
)
from trio_bridge.broker._registry import DEFAULT_ROUTE, ConnectorHandle, Registry
from trio_bridge.broker._rules import LimitHits, Refusal, Trust
from trio_bridge.http._messages import request_model

#: a route with no connector for this long (or never, since the broker started this long ago)
#: gets 503 at once instead of waiting queue_timeout for one
ROUTE_MEMORY = 60.0
MAX_ROUTE_STATS = 100  # routes with recent figures on the admin page
RETRY_AFTER_NOT_READY = 5
#: the metric label of a model no connector announced and no alias names (any client can
#: name any model: its names must not take the label slots of real ones)
UNKNOWN_MODEL = "unknown"

#: (the requested model, the models to try in order, what the route serves)
Candidates = tuple[str | None, list[str | None], dict[str, list[str]] | None]


class Abortable(Protocol):
    def abort(self, reason: str) -> None: ...


class Exchanges:
    """What the public requests share: settings, the registry, metrics and recent figures;
    and the requests in flight (:meth:`wait_idle`, :meth:`abort_all` for a drain)."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        metrics: Metrics,
        limit_hit: LimitHits,
        trust: Trust,
        token_mark: bytes,
    ) -> None:
        bc = config.broker
        self.registry = registry
        self.metrics = metrics
        self.limit_hit = limit_hit
        self.trust = trust
        #: what every connector token starts with: a request carrying it is never relayed
        self.token_mark = token_mark
        self.limits = config.limits
        self.relay_path = bc.relay_path
        self.max_body = int(config.limits.max_body)
        self.queue_timeout = float(bc.queue_timeout)
        self.queue_when_not_ready = bc.queue_when_not_ready
        self.route_domain = bc.route_domain.lower().strip(".")
        #: model aliases and fallback chains: a request for the key tries each in turn
        self.aliases: dict[str, list[str]] = dict(bc.aliases)
        self._alias_names = frozenset(self.aliases).union(*self.aliases.values())
        self.stats = RecentStats()
        self.route_stats: dict[str, RecentStats] = {}  # per route, for the admin page
        #: new requests get 503 (the broker is draining)
        self.draining = False
        self._live: set[Abortable] = set()
        self._idle: trio.Event | None = None  # set when the last one leaves

    @property
    def in_flight(self) -> int:
        return len(self._live)

    def enter(self, ex: Abortable) -> None:
        self._live.add(ex)

    def leave(self, ex: Abortable) -> None:
        self._live.discard(ex)
        if not self._live and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:  # noqa: ASYNC910  nothing in flight: nothing to wait for
        """Return once no request is in flight."""
        while self._live:
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()

    def abort_all(self, reason: str) -> None:
        """Abort every request in flight (see ``Exchange.abort``)."""
        for ex in list(self._live):
            ex.abort(reason)

    def unknown_route(self, route: str) -> Refusal | None:
        """A 503 for a route no connector served recently, or None: waiting queue_timeout
        only helps across short gaps (a connector re-dialling)."""
        if self._wait_until(route) is not None:
            return None
        if not self.registry.connectors():
            return Refusal(503, "no connector is connected to this broker; retry later",
                           RETRY_AFTER_NOT_READY)  # fmt: skip
        return Refusal(503, f"no connector serves route {route!r} (none connected recently); "
                       "retry later", RETRY_AFTER_NOT_READY)  # fmt: skip

    def _wait_until(self, route: str) -> float | None:
        return self.registry.wait_until(route, max(ROUTE_MEMORY, self.queue_timeout))

    def candidates(self, route: str, first: bytes, body_done: bool) -> Candidates:
        """(the requested model, the models to try in order, what the route serves). An empty
        list: no connector serves it (404). One box, or a pool of identical ones, is not
        routed by model: its LLM decides about names it does not list (llama.cpp answers
        any); routing by model starts with a second set of models."""
        by_model = not self.registry.one_model_set(route)
        served = self.registry.models(route) if by_model else None  # None: no 404s
        model = request_model(first) if body_done and (by_model or self.aliases) else None
        candidates: list[str | None] = list(self.aliases.get(model, [model])) if model else [None]
        if served is not None and model is not None:
            candidates = [c for c in candidates if c in served]
        return model, candidates, served

    async def acquire(
        self,
        route: str,
        model: str | None,
        waiting: Callable[[trio.CancelScope], None] | None = None,
    ) -> ConnectorHandle | Refusal:
        """A connector of ``route`` with a free slot, reserved (waiting in the route's queue up
        to ``queue_timeout``), or why there is none. ``waiting``: told the wait's scope when
        there is a wait (cancelling it ends the wait: no connector)."""
        if self.registry.not_ready(route) and not self.queue_when_not_ready:
            return Refusal(503, "the LLM behind this route is not ready; retry later",  # noqa: ASYNC910  refused at once, by rule
                           RETRY_AFTER_NOT_READY)  # fmt: skip
        waited = trio.current_time()
        # a free connector (the usual case) is taken without a cancel scope for the wait
        handle = self.registry.try_acquire(route, model)
        try:
            if handle is None:
                until = self._wait_until(route)
                deadline = min(waited + self.queue_timeout, waited if until is None else until)
                with trio.CancelScope(deadline=deadline) as wait:
                    if waiting is not None:
                        waiting(wait)
                    handle = await self.registry.acquire(route, model)
        except QueueFull:
            self.limit_hit("queue")
            return Refusal(503, "too many requests are waiting for this route; retry later", 1)  # noqa: ASYNC910  the queue is full: refused at once
        m = self.metrics
        m.child(m.queue_wait, "broker", self.registry.metric_label(route)).observe(
            trio.current_time() - waited
        )
        if handle is None:
            if not self.registry.connectors(route):  # it left (and did not dial again)
                return Refusal(503, "no connector of this route is connected (waited "  # noqa: ASYNC910  the wait for a connector (awaited) ran out
                               f"{self.queue_timeout:g} s for one); retry later",
                               RETRY_AFTER_NOT_READY)  # fmt: skip
            return Refusal(503, "no connector is available for this route; retry later",  # noqa: ASYNC910  the wait for a connector (awaited) ran out
                           max(1, int(self.queue_timeout)))  # fmt: skip
        return handle  # noqa: ASYNC910  a free connector: taken without waiting

    def account(self, facts: Facts, reset_code: int | None) -> None:
        """Count a finished request in the metrics and the recent figures."""
        m, route = self.metrics, facts.route or DEFAULT_ROUTE
        label = self.registry.metric_label(route)
        status, outcome = facts.status, facts.outcome or "cancelled"
        duration, ttfb = facts.duration, facts.ttfb
        m.child(m.requests, "broker", label, status_class(status), outcome).inc()
        m.child(m.duration, "broker", label).observe(duration)
        if ttfb is not None:
            m.child(m.ttfb, "broker", label).observe(ttfb)
        m.child(m.bytes, "broker", "in").inc(facts.bytes_in)
        m.child(m.bytes, "broker", "out").inc(facts.bytes_out)
        if reset_code is not None:
            m.child(m.resets, "broker", reset_reason(reset_code)).inc()
        error = is_error(outcome, status)
        self.stats.add(duration, ttfb, error)
        if route in self.route_stats or len(self.route_stats) < MAX_ROUTE_STATS:
            self.route_stats.setdefault(route, RecentStats()).add(duration, ttfb, error)
        if facts.model:
            m.count_model(self.model_label(facts.model), outcome, ttfb)

    def model_label(self, model: str) -> str:
        """``model`` as a metric label: itself if a connector announced it or an alias names
        it, else ``UNKNOWN_MODEL``."""
        if model in self._alias_names or self.registry.announced(model):
            return model
        return UNKNOWN_MODEL

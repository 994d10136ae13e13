"""The broker's view of its connectors: a :class:`ConnectorHandle` per relay, grouped by route,
and a FIFO of requests waiting for one with room.

The relay (``_relay``) knows nothing of this: which token opened it, since when it serves,
how many requests were promised to it, whether it may take one more are the broker's business
and live here. The broker tells the registry about every change that can free room or make a
connector eligible (:meth:`Registry.changed`), through the relay's ``on_change`` hook.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import attrs
import trio

from trio_bridge._errors import QueueFull
from trio_bridge.relay._relay import Relay

log = logging.getLogger("trio_bridge.broker")
DEFAULT_ROUTE = "default"
#: passive health: failed answers in a row that eject a connector, for how long at first
#: (seconds; doubled at each ejection in a row), at most
EJECT_AFTER = 5
EJECT_FOR = 10.0
EJECT_MAX = 300.0
#: how long a freshly started broker waits for connectors it never saw (they re-dial a
#: restarted broker within their first backoff steps); later a route with none gets 503 at once
BORN_GRACE = 10.0
MAX_ANNOUNCED = 10_000  # model names remembered as announced (see Registry.announced)


@attrs.define(eq=False)
class ConnectorHandle:
    """One connector's relay, as the broker sees it."""

    relay: Relay
    name: str
    route: str
    token_id: str
    #: requests it serves at once: its LLM slots plus its own queue (from its hello)
    capacity: int
    connected_since: float
    #: requests promised to it that have not opened their stream yet
    reserved: int = 0
    #: passive health (as Envoy's outlier detection): answers that failed in a row, and
    #: until when (trio's clock) it gets no new request after too many of them
    failures_in_a_row: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    answers: int = 0
    failed: int = 0

    def answered(self, ok: bool, now: float) -> None:
        """An answer from this connector ended: a failure (a 5xx from behind it, a broken
        answer, no answer in time) or not. EJECT_AFTER failures in a row keep new requests
        away from it for EJECT_FOR seconds, doubling with each ejection (at most
        EJECT_MAX); a good answer resets the count and the doubling. Failures while it is
        ejected (answers already in flight) do not lengthen the ejection."""
        self.answers += 1
        if ok:
            self.failures_in_a_row = 0
            self.ejections = 0
            return
        self.failed += 1
        if self.ejected(now):  # a request sent before the ejection: it is out already
            return
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= EJECT_AFTER:
            self.ejections += 1
            self.failures_in_a_row = 0
            self.ejected_until = now + min(EJECT_MAX, EJECT_FOR * 2 ** (self.ejections - 1))
            log.warning(
                "connector %s ejected for %.0f s: its last %d answers failed",
                self.name,
                self.ejected_until - now,
                EJECT_AFTER,
                extra={"connector": self.name, "route": self.route},
            )

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    @property
    def in_flight(self) -> int:
        return self.relay.in_flight

    @property
    def load(self) -> int:
        return self.relay.in_flight + self.reserved

    @property
    def live(self) -> bool:
        return self.relay.closed_reason is None

    @property
    def ready(self) -> bool:
        """Its LLM answers (as the connector last said)."""
        return self.relay.peer_ready

    @property
    def draining(self) -> bool:
        return self.relay.peer_draining

    @property
    def models(self) -> tuple[str, ...] | None:
        """What its LLM serves; None: it never said (an older connector: anything)."""
        return self.relay.peer_models

    @property
    def priority(self) -> int:
        return self.relay.peer_priority

    @property
    def usable(self) -> bool:
        """True if a new request may be sent to it now."""
        relay = self.relay
        return (
            relay.closed_reason is None
            and relay.session.ready_to_open
            and relay.peer_ready
            and not relay.peer_draining
            and relay.peer is not None
            and self.load < min(self.capacity, relay.peer.max_streams)
        )

    def serves(self, model: str | None) -> bool:
        """True if it serves ``model`` (one that never said serves anything)."""
        return model is None or self.models is None or model in self.models


class _Waiter:
    __slots__ = ("event", "handle", "model", "route")

    def __init__(self, route: str, model: str | None) -> None:
        self.route = route
        self.model = model
        self.handle: ConnectorHandle | None = None
        self.event = trio.Event()


class Registry:
    """Connectors by route, and a FIFO of requests waiting for one with free capacity.

    A request takes a *reservation* on a connector (:meth:`acquire`) and gives it back with
    :meth:`release` once its stream is open (or it gave up). A connector is eligible while it
    is ready, not draining, and its streams plus reservations stay below its capacity.
    Whenever something changes (a connector comes or goes, a stream ends, readiness flips),
    the waiters are served in arrival order.
    """

    def __init__(self, max_queue: int = 100) -> None:
        self.max_queue = max_queue
        self._by_route: dict[str, list[ConnectorHandle]] = {}
        self._waiters: deque[_Waiter] = deque()
        self._last_seen: dict[str, float] = {}  # route → when a connector of it was last here
        #: when the broker started serving (set by Broker.serve; else the first question)
        self.born: float | None = None
        self._announced: set[str] = set()  # models connectors announced (bounded)

    def add(self, handle: ConnectorHandle) -> None:
        self._by_route.setdefault(handle.route, []).append(handle)
        self._last_seen[handle.route] = trio.current_time()
        self.changed(handle)

    def remove(self, handle: ConnectorHandle) -> None:
        self._drop(handle)
        self.changed()

    def _drop(self, handle: ConnectorHandle) -> None:
        handles = self._by_route.get(handle.route, [])
        if handle in handles:
            self._remember(handle.models)
            handles.remove(handle)
            self._last_seen[handle.route] = trio.current_time()
        if not handles:
            self._by_route.pop(handle.route, None)

    def connectors(self, route: str | None = None) -> list[ConnectorHandle]:
        if route is not None:
            return list(self._by_route.get(route, ()))
        return [h for hs in self._by_route.values() for h in hs]

    relays = connectors  # the name the pytest plugin's users know

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def queued_for(self, route: str) -> int:
        """Requests waiting for a connector of ``route``."""
        return sum(1 for w in self._waiters if w.route == route)

    def metric_label(self, route: str) -> str:
        """``route`` as a metric label: itself if a connector of it was ever here (routes are
        bounded by tokens), else "unknown" (any client can name any route in a path)."""
        return route if route in self._last_seen else "unknown"

    def announced(self, model: str) -> bool:
        """True if a connector announced ``model`` (one connected now, or one that left since
        the broker started and had said it): names a client merely asked for are not."""
        if model in self._announced:
            return True
        for handles in self._by_route.values():
            for h in handles:
                if h.models is not None and model in h.models:
                    self._remember(h.models)
                    return True
        return False

    def _remember(self, models: tuple[str, ...] | None) -> None:
        for m in models or ():
            if len(self._announced) >= MAX_ANNOUNCED:
                return
            self._announced.add(m)

    def wait_until(self, route: str, memory: float) -> float | None:
        """Until when (trio's clock) a request may wait for a connector of ``route``: inf if
        it has one or had one in the last ``memory`` seconds (queue_timeout alone bounds the
        wait), the end of BORN_GRACE while the broker is young (connectors re-dial a
        restarted broker within seconds), else None: none is to be expected, answer now."""
        if self._by_route.get(route):
            return math.inf
        now = trio.current_time()
        if self.born is None:
            self.born = now
        if now - self._last_seen.get(route, -math.inf) < memory:
            return math.inf
        if now - self.born < BORN_GRACE:
            return self.born + BORN_GRACE
        return None

    def pick(self, route: str, model: str | None = None) -> ConnectorHandle | None:
        """The eligible connector of ``route`` that serves ``model``: the highest priority
        first (a preferred box takes requests while it is up and has room), then the least
        load."""
        best: ConnectorHandle | None = None
        now = trio.current_time()
        ejected = False
        for h in self._by_route.get(route, ()):
            if not h.usable or not h.serves(model):
                continue
            key = (h.ejected(now), -h.priority, h.load)  # an ejected one only if all are
            if best is None or key < (ejected, -best.priority, best.load):
                best, ejected = h, key[0]
        return best

    def one_model_set(self, route: str) -> bool:
        """True if every live connector of ``route`` said the same models."""
        return len({h.models for h in self._by_route.get(route, ()) if h.live}) <= 1

    def models(self, route: str) -> dict[str, list[str]] | None:
        """Model → names of the live connectors of ``route`` that serve it; None if one of
        them serves anything (it never said what) or the route has no connector."""
        live = [h for h in self._by_route.get(route, ()) if h.live]
        if not live or any(h.models is None for h in live):
            return None
        out: dict[str, list[str]] = {}
        for h in live:
            for m in h.models or ():
                out.setdefault(m, []).append(h.name)
        return out

    def not_ready(self, route: str) -> bool:
        """True if connectors serve ``route`` but none of them has its LLM up."""
        live = [h for h in self._by_route.get(route, ()) if h.live and not h.draining]
        return bool(live) and not any(h.ready for h in live)

    def changed(self, handle: ConnectorHandle | None = None) -> None:
        """Something changed that may make a connector eligible: serve the waiters."""
        if handle is not None and not handle.live:
            self._drop(handle)  # a dead relay leaves at once, not after its close handshake
        for w in list(self._waiters):
            h = self.pick(w.route, w.model)
            if h is not None:
                h.reserved += 1
                w.handle = h
                w.event.set()
                self._waiters.remove(w)

    def release(self, handle: ConnectorHandle) -> None:
        handle.reserved -= 1
        self.changed(handle)

    def try_acquire(self, route: str, model: str | None = None) -> ConnectorHandle | None:
        """:meth:`acquire` without waiting: a reserved connector, or None when none is free
        now (or others of ``route`` are already waiting: they come first)."""
        if any(w.route == route for w in self._waiters):
            return None
        h = self.pick(route, model)
        if h is not None:
            h.reserved += 1
        return h

    async def acquire(self, route: str, model: str | None = None) -> ConnectorHandle:
        """Reserve a connector of ``route`` that serves ``model``, waiting in FIFO order (bound
        the wait with a cancel scope: ``trio.move_on_after(queue_timeout)``).

        Raises QueueFull if ``max_queue`` requests already wait. The caller must
        :meth:`release` what it got. Cancellation: a connector reserved for us at that very
        moment is given back.
        """
        h = self.try_acquire(route, model)
        if h is not None:
            return h  # noqa: ASYNC910  a free connector: taken without waiting
        if len(self._waiters) >= self.max_queue:
            raise QueueFull
        w = _Waiter(route, model)
        self._waiters.append(w)
        try:
            await w.event.wait()
        except BaseException:
            if w.handle is not None:
                self.release(w.handle)
            raise
        finally:
            if w in self._waiters:
                self._waiters.remove(w)
        assert w.handle is not None  # the event is set only with a handle
        return w.handle

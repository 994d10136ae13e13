"""Keeping the relays up: per broker URL one task dials, serves the relay for its whole life,
and dials again with backoff (full jitter; a refused token, route or path slowly, as it needs a
human). A rotated ``token_file`` is taken up at the first moment a relay has nothing in flight.

Each incoming stream runs the connector's handler in its own cancel scope (see
``relay/_relay.py``); the keeper only hands it the relay's :class:`RelayGuard`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from trio_bridge._backoff import Backoff
from trio_bridge._config import Config
from trio_bridge._errors import (
    ConfigError,
    RelayClosed,
    RelayRefused,
    RelayRejected,
    RemoteProtocolError,
)
from trio_bridge._net import TCP, Network
from trio_bridge._observe import Metrics
from trio_bridge.accounts._keys import check_private
from trio_bridge.admin._inspect import Inspector
from trio_bridge.connector._body import RelayGuard
from trio_bridge.connector._llm import LLMWatch
from trio_bridge.http._ws import WebSocket, connect_websocket
from trio_bridge.relay._frames import MAX_MESSAGE
from trio_bridge.relay._protocol import GoAway, Hello, Session
from trio_bridge.relay._relay import Liveness, Relay, RelayStream

log = logging.getLogger("trio_bridge.connector")

TOKEN_CHECK_INTERVAL = 2.0  # how often an up relay looks for a rotated token_file
ROTATED = "connector token rotated"

Handler = Callable[[RelayStream, RelayGuard], Awaitable[None]]


def read_secret_file(path: os.PathLike[str] | str, what: str) -> str:
    check_private(path)
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path}: no such file") from None
    if not value:
        raise ConfigError(f"{what}: {path} is empty")
    return value


@attrs.frozen
class RelayEnd:
    """How one relay (or one dial) ended: the reason to log, whether the broker refused us
    (retry slowly), and how long it was up."""

    reason: str
    refused: bool = False
    up_for: float | None = None


class RelayKeeper:
    """The relays to every broker URL: ``relays`` (those up, by URL), ``states`` (for status
    pages), ``guards`` (what each broker's relay may cost). ``on_change`` is called whenever
    a relay comes up, goes down or its streams change (the connector's drain waits on it)."""

    def __init__(
        self,
        config: Config,
        *,
        name: str,
        llm: LLMWatch,
        handler: Handler,
        metrics: Metrics,
        inspector: Inspector,
        on_change: Callable[[], None],
        token: str | None = None,
        network: Network = TCP,
    ) -> None:
        c = config.connector
        self._network = network
        self.config = config
        self.name = name
        self._llm = llm
        self._handler = handler
        self._metrics = metrics
        self._inspector = inspector
        self._on_change = on_change
        self._fixed_token = token
        self.read_token()  # a missing or unreadable token fails at start
        self._ssl_context = ssl.create_default_context(
            cafile=str(config.path(c.broker_ca_file)) if c.broker_ca_file else None
        )
        self._connect_timeout = float(config.limits.connect_timeout)
        self.relays: dict[str, Relay] = {}
        self.guards: dict[str, RelayGuard] = {}
        now = time.time()  # wall clock
        self.states: dict[str, dict[str, Any]] = {
            url: {"state": "connecting", "since": now, "last_error": "", "reconnects": 0}
            for url in c.broker_urls
        }
        #: one liveness timer for all the relays (run by the connector)
        self.liveness = Liveness(float(config.relay.ping_interval))
        self.connected = trio.Event()  # set once the first relay is up
        self.stopping = False
        self.draining = False
        self._stop = trio.Event()

    def read_token(self) -> str:
        """The connector token as it is now: ``TRIO_BRIDGE_TOKEN``, else ``token_file``
        (re-read before every dial, so a rotated token is used without a restart)."""
        if self._fixed_token is not None:
            return self._fixed_token
        return os.environ.get("TRIO_BRIDGE_TOKEN") or read_secret_file(
            self.config.path(self.config.connector.token_file), "connector.token_file"
        )

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.relays.values())

    def tell(self) -> None:
        """Send the LLM's state (ready, models) to every broker."""
        for relay in list(self.relays.values()):
            relay.send_status(ready=self._llm.ready, models=self._llm.models)

    def goaway(self, reason: str) -> None:
        """No new requests on any relay (those in flight go on)."""
        self.draining = True
        for relay in list(self.relays.values()):
            relay.send_goaway(reason)

    def reset_all(self, code: int, reason: str) -> list[Relay]:
        """Reset every stream of every relay; the relays it reset (to wait for their writers)."""
        relays = list(self.relays.values())
        for relay in relays:
            relay.reset_all(code, reason)
        return relays

    def stop(self, reason: str) -> None:
        """Close every relay (WebSocket close handshake) and dial no more."""
        self.stopping = True
        self._stop.set()
        for relay in list(self.relays.values()):
            relay.close(reason)

    async def keep(self, url: str) -> None:
        """Dial ``url`` and serve on it; re-dial forever with backoff (refusals slowly)."""
        backoff = Backoff()
        slow = Backoff(base=5.0, cap=60.0, floor=5.0)  # refusals need a human: every 5-60 s
        await trio.lowlevel.checkpoint()
        while not self.stopping:
            end = await self._one_relay(url)
            if end.up_for is not None:
                backoff.connected_for(end.up_for)
            if end.reason == ROTATED:
                continue  # at once, with the new token
            if self.stopping:
                log.info("relay closed: %s", end.reason, extra={"broker": url})
                return
            delay = (slow if end.refused else backoff).next_delay()
            self._down(url, end.reason, delay)
            with trio.move_on_after(delay):
                await self._stop.wait()

    async def _one_relay(self, url: str) -> RelayEnd:
        """One dial and, if it worked, the relay's whole life; how it ended (never raises but
        for cancellation: the connector never gives up on a broker)."""
        try:
            token = self.read_token()
            with trio.fail_after(self._connect_timeout):
                ws = await connect_websocket(
                    url,
                    headers=[(b"authorization", b"Bearer " + token.encode())],
                    max_message=MAX_MESSAGE + 1024,
                    ssl_context=self._ssl_context,
                    network=self._network,
                )
            try:
                return await self._serve(url, ws, token)
            finally:
                await ws.aclose()
        except RelayRejected as exc:
            end = RelayEnd(_rejection(url, exc), refused=True)
        except ConfigError as exc:  # the token file went missing, empty or readable
            end = RelayEnd(f"connector token: {exc}", refused=True)
        except trio.TooSlowError:
            end = RelayEnd(f"cannot reach broker: no answer within {self._connect_timeout:g}s")
        except (OSError, trio.BrokenResourceError) as exc:  # ssl.SSLError is an OSError
            end = RelayEnd(f"cannot reach broker: {_connect_failure(exc)}")
        except (RelayClosed, RemoteProtocolError) as exc:
            end = RelayEnd(f"relay handshake failed: {exc}")
        except Exception as exc:
            log.exception("relay failed unexpectedly", extra={"broker": url})
            end = RelayEnd(f"unexpected error: {exc!r}")
        await trio.lowlevel.checkpoint()  # a dial that failed at once (no token) included
        return end

    def _new_relay(self, url: str, ws: WebSocket) -> Relay:
        c, rc = self.config.connector, self.config.relay
        guard = self.guards[url] = RelayGuard(int(rc.max_buffered))
        handler = self._handler

        async def handle(stream: RelayStream) -> None:
            await handler(stream, guard)

        return Relay(
            ws,
            Session(opener=False, window=int(rc.request_window), max_streams=rc.max_streams),
            name=self.name,
            route=c.route,
            ready=self._llm.ready,
            # requests beyond the LLM's slots wait here, in the fair queue (keys are known
            # here, not at the broker)
            capacity=c.max_concurrent + c.max_queue,
            models=self._llm.models,
            priority=c.priority,
            ping_interval=float(rc.ping_interval),
            max_buffered=int(rc.max_buffered),
            handler=handle,
            on_change=lambda r: self._changed(url, r),
            liveness=self.liveness,
        )

    def _changed(self, url: str, relay: Relay) -> None:
        if relay.closed_reason is not None and self.relays.get(url) is relay:
            del self.relays[url]  # at once, not after the close handshake
        self._on_change()

    async def _serve(self, url: str, ws: WebSocket, token: str) -> RelayEnd:
        """The hello, then serve until the relay ends."""
        relay = self._new_relay(url, ws)
        if self.stopping:
            await trio.lowlevel.checkpoint()
            return RelayEnd("connector stopping")
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(relay.run)
            except RelayRefused as exc:
                return RelayEnd(f"broker refused the relay: {exc.reason}", refused=True)
            except RelayClosed as exc:
                return RelayEnd(exc.reason)
            nursery.start_soon(self._follow_token, relay, token)
            up_since = trio.current_time()
            self._up(url, relay)
        self.relays.pop(url, None)
        reason = relay.closed_reason or "closed"
        if relay.peer_goaway is not None:  # the broker said why before it closed
            reason = f"broker going away: {relay.peer_goaway}"
        return RelayEnd(reason, up_for=trio.current_time() - up_since)

    def _up(self, url: str, relay: Relay) -> None:
        self.relays[url] = relay
        llm = self._llm
        if (relay.local_ready, relay.local_models) != (llm.ready, llm.models):
            relay.send_status(ready=llm.ready, models=llm.models)  # changed meanwhile
        if self.draining:
            relay.send_goaway("connector draining")
        st = self.states[url]
        if st["state"] != "connecting":
            st["reconnects"] += 1
            self._metrics.reconnects.labels("connector", url).inc()
        st.update(state="connected", since=time.time())  # wall clock
        self._metrics.relay_connected.labels("connector", url).set(1)
        log.info("relay connected", extra={"broker": url})
        self._inspector.state(url, "up")
        self.connected.set()
        self._on_change()

    def _down(self, url: str, reason: str, delay: float) -> None:
        st = self.states[url]
        if st["state"] == "connected" or not st["last_error"]:
            st["since"] = time.time()  # wall clock
        st.update(state="reconnecting", last_error=reason, next_attempt_in=round(delay, 3))
        self._metrics.relay_connected.labels("connector", url).set(0)
        self._inspector.state(url, "down")
        log.warning("relay down: %s; reconnecting in %.2fs", reason, delay, extra={"broker": url})
        self._on_change()

    async def _follow_token(self, relay: Relay, token: str) -> None:
        """After a rotation (a new token in ``token_file``), re-dial with it at the first
        moment this relay has nothing in flight; the old token keeps it up until then."""
        while True:
            with trio.move_on_after(TOKEN_CHECK_INTERVAL):
                await relay.wait_closed()
                return
            try:
                current = self.read_token()
            except ConfigError:
                continue  # keep the relay; the next dial reports the problem
            if current != token and relay.in_flight == 0:
                log.info("connector token changed: re-dialling with the new one")
                relay.close(ROTATED)
                return


async def probe_relay(
    url: str,
    token: str,
    *,
    route: str,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[bool, str]:
    """Dial ``url`` and do a real relay handshake with ``token`` and ``route`` (a HELLO marked
    as a probe, which the broker judges and answers but never registers or sends requests
    on). Returns (ok, a one-line diagnosis); never raises for a network or broker problem.
    No timeout of its own: bound it with a cancel scope (``trio.move_on_after``)."""
    ws = None
    failure = ""
    try:
        ws = await connect_websocket(
            url,
            headers=[(b"authorization", b"Bearer " + token.encode())],
            max_message=MAX_MESSAGE + 1024,
            ssl_context=ssl_context,
        )
        session = Session(opener=False)
        await ws.send_message(session.send_hello(role="connector", route=route, probe=True))
        while (event := session.next_event()) is None:
            session.receive_data(await ws.receive_message())
    except RelayRejected as exc:
        failure = _rejection(url, exc)
    except (OSError, trio.BrokenResourceError) as exc:
        failure = f"cannot reach broker: {_connect_failure(exc)}"
    except RelayClosed as exc:
        failure = f"the broker closed the connection during the handshake ({exc.reason})"
    except RemoteProtocolError as exc:
        failure = f"not a trio-bridge relay endpoint ({exc})"
    finally:
        if ws is not None:
            await ws.aclose()
    await trio.lowlevel.checkpoint()
    if failure:
        return False, failure
    if isinstance(event, GoAway):
        return False, f"broker refused the relay: {event.reason}"
    if isinstance(event, Hello):
        return True, f"relay handshake OK (token accepted for route {route!r})"
    return False, f"unexpected first frame from the broker: {type(event).__name__}"


def _rejection(url: str, exc: RelayRejected) -> str:
    """One line for a dial the broker answered with an HTTP status instead of a relay."""
    if exc.status == 404:
        expected, message = "/_bridge/relay", ""
        with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
            message = str(json.loads(exc.body)["error"]["message"])
        if "this is an admin endpoint" in message:  # what a role's admin port answers
            return (
                "this is an admin port, not the broker's public port: the relay is on the "
                "port the broker serves its API on (broker.listen, or its TLS proxy's), "
                "not on admin_listen"
            )
        if m := re.search(r"relay endpoint is (/[^\s;,)]*)", message):
            expected = m.group(1).rstrip(".")
        return f"no relay endpoint at this URL ({url}; expected a path like …{expected})"
    said = _brokers_reason(exc.body)
    if exc.status in (401, 403):  # the broker says which: a bad token, revoked, expired, ...
        told = f": {said}" if said else ""
        return f"broker refused the relay: HTTP {exc.status} (check the connector token){told}"
    if exc.status == 429:
        return "broker refused the relay: HTTP 429 (too many refused tokens from this address)"
    if said:  # a broker's own refusal (e.g. 503 while it drains): its reason, not a guess
        return f"broker refused the relay: HTTP {exc.status}: {said}"
    return (
        f"broker refused the relay: HTTP {exc.status} (is {url} the broker's relay URL, "
        "ws(s)://HOST/_bridge/relay on its public port?)"
    )


def _brokers_reason(body: bytes) -> str | None:
    """The message of a broker's relay refusal (code relay_refused), or None (an answer from
    something else: a proxy's page, another server)."""
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        error = json.loads(body)["error"]
        if error["code"] == "relay_refused":
            return str(error["message"])[:300]
    return None


#: what OpenSSL says when a wss:// dial gets a plain HTTP answer
_PLAIN_ANSWER_TO_TLS = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG"})


def _connect_failure(exc: BaseException) -> str:
    """A one-line reason for a failed dial (trio wraps the per-address errors in a group and
    TLS errors in BrokenResourceError)."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return str(cause.exceptions[0])
    if isinstance(cause, ssl.SSLError) and cause.reason in _PLAIN_ANSWER_TO_TLS:
        return (
            "TLS handshake failed: the server answered in plain HTTP (a broker without TLS "
            "takes ws://; wss:// needs TLS on that port: the broker's tls_cert or a proxy "
            "such as Caddy in front)"
        )
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate refused: {cause.verify_message} (is the broker's certificate "
            "trusted? see broker_ca_file)"
        )
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(exc) or type(exc).__name__

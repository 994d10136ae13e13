"""The connector role: dial the broker(s), check API keys, forward each stream to the LLM.

Per broker URL one task keeps a relay up forever (backoff with full jitter; a refused token
is retried slowly). Each incoming stream runs :meth:`Connector.handle_stream` in its own cancel
scope (see ``_relay``), which holds the httpx call to the LLM: when the broker resets the
stream (client gone) or the relay is lost, the scope is cancelled and httpx closes the upstream
connection, so the LLM stops generating.

httpx exceptions are mapped here and only here: before the response head they become an
OpenAI-shaped 502 (LLM unreachable or broken) or 504 (no first byte in time); after it, a
RESET (UPSTREAM_ERROR or TIMEOUT) that makes the broker abort the client's response.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import trio

from trio_bridge._backoff import Backoff
from trio_bridge._config import Config
from trio_bridge._errors import (
    BridgeError,
    ConfigError,
    QueueFull,
    RelayClosed,
    RelayRefused,
    RelayRejected,
    RemoteProtocolError,
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
    quiet_third_party_loggers,
    reset_reason,
    status_class,
)
from trio_bridge._version import __version__
from trio_bridge.accounts._keys import SecretEntry, SecretStore, admin_token, check_private
from trio_bridge.accounts._limits import KeyLimits, Limiter
from trio_bridge.accounts._usage import UsageSniffer
from trio_bridge.accounts._usagestore import KnownModels, UsageStore, utc_day
from trio_bridge.admin._admin import AdminApp
from trio_bridge.admin._inspect import Inspector, RequestRecord, scrub
from trio_bridge.admin._ui import Pages
from trio_bridge.connector._slots import FairSlots
from trio_bridge.http._asgi import serve_app
from trio_bridge.http._messages import (
    KEY_HEADERS,
    MODEL_LISTS,
    REQUEST_ID,
    ModelUnknown,
    declared_model,
    error_response,
    header,
    model_ids,
    new_request_id,
    presented_key,
    strip_hop_by_hop,
)
from trio_bridge.http._target import BadTarget, LLMBase, check_method
from trio_bridge.http._upstream import H11Transport, close_response
from trio_bridge.http._ws import WebSocket, connect_websocket
from trio_bridge.relay._frames import MAX_MESSAGE, ResetCode
from trio_bridge.relay._protocol import GoAway, Hello, RequestHead, ResponseHead, Session
from trio_bridge.relay._relay import Relay, RelayStream

log = logging.getLogger("trio_bridge.connector")

_DROP_UPSTREAM = KEY_HEADERS | {REQUEST_ID, b"host", b"expect"}
_DROP_DOWNSTREAM = frozenset({REQUEST_ID})
TOKEN_CHECK_INTERVAL = 2.0  # how often an up relay looks for a rotated token_file
ROTATED = "connector token rotated"
_CANCEL_OUTCOME: dict[int, str] = {
    ResetCode.CANCEL: "client_gone",
    ResetCode.RELAY_LOST: "relay_lost",
}


#: the inspector's outcome for a 5xx answer of the LLM's own (relayed as it was)
LLM_ERROR = "llm_error"
#: request bodies up to this size are read for their "model" when the answer names none
_MODEL_SCAN_LIMIT = 256 * 1024


def _model_named(body: bytes) -> str | None:
    """The ``"model"`` a request body names, for accounting only (the inspector, usage, the
    log line), when the LLM's answer named none (an error answer, say); None if it cannot be
    read with certainty or the body is large (parsing it is not worth its CPU here)."""
    if len(body) > _MODEL_SCAN_LIMIT:
        return None
    try:
        return declared_model(body, None)
    except ModelUnknown:
        return None


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


class _BodyRefused(BridgeError):
    """A request body the connector stops reading: answered ``status`` (or reset with
    ``code`` once the LLM call started)."""

    status = 400
    code = ResetCode.CANCEL
    message = ""


class _TooLarge(_BodyRefused):
    status, code, message = 413, ResetCode.TOO_LARGE, "request body too large"


class _TooSlow(_BodyRefused):
    status, code = 408, ResetCode.TIMEOUT
    message = "the request body came too slowly"


class _OverBudget(_BodyRefused):
    status, code = 503, ResetCode.REFUSED
    message = "too many request bodies are held for this broker; retry shortly"


class _KeyOverBudget(_BodyRefused):
    status, code = 429, ResetCode.REFUSED
    message = "this API key has too many request bodies in progress; retry when one finishes"


#: failed key checks one relay may cause in KEY_FAILURE_WINDOW seconds; beyond, invalid keys
#: get 429 and no log line of their own (one summary line per window)
KEY_FAILURES_PER_WINDOW = 50
KEY_FAILURE_WINDOW = 10.0


class _RelayGuard:
    """What one relay's requests may cost the connector, whoever sends them: bytes of whole
    request bodies held at once (``take`` / ``give``; a hostile broker cannot make the
    connector buffer more than ``limit`` for it, and one key not more than half of it, so
    other keys on the same broker still get through), and failed key checks answered and
    logged one by one."""

    __slots__ = ("by_key", "failures", "limit", "unlogged", "used", "window_start")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.by_key: dict[str, int] = {}
        self.window_start = -math.inf
        self.failures = 0
        self.unlogged = 0

    def take(self, n: int, key: str) -> None:
        """Count ``n`` more bytes held for ``key``; raises _KeyOverBudget (the key's share,
        half the limit) or _OverBudget (the relay's) and counts nothing then."""
        held = self.by_key.get(key, 0)
        if held + n > self.limit // 2:
            raise _KeyOverBudget
        if self.used + n > self.limit:
            raise _OverBudget
        self.used += n
        self.by_key[key] = held + n

    def give(self, n: int, key: str) -> None:
        """``n`` bytes held for ``key`` are no longer held."""
        if n:
            self.used -= n
            left = self.by_key[key] - n
            if left:
                self.by_key[key] = left
            else:
                del self.by_key[key]

    def key_failed(self, now: float) -> bool:
        """Count a failed key check; False once this window's budget is spent (the caller
        answers 429 and logs nothing for it)."""
        if now - self.window_start >= KEY_FAILURE_WINDOW:
            if self.unlogged:
                log.warning(
                    "%d more failed key checks from one broker in %.0f s were refused with "
                    "429 and not logged one by one",
                    self.unlogged,
                    KEY_FAILURE_WINDOW,
                )
            self.window_start, self.failures, self.unlogged = now, 0, 0
        self.failures += 1
        if self.failures <= KEY_FAILURES_PER_WINDOW:
            return True
        self.unlogged += 1
        return False


USAGE_PATH = "/_bridge/usage"  # answered by the connector itself, for the key presented


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


def _int(query: dict[str, list[str]], name: str, default: int) -> int:
    try:
        return max(1, min(1000, int(query.get(name, [str(default)])[0])))
    except ValueError:
        return default


def _seq(text: str) -> int:
    return int(text) if text.isdigit() else -1


def _totals(rows: Any) -> dict[str, int]:
    out = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0, "refused": 0}
    for r in rows:
        for k in out:
            out[k] += r[k]
    return out


@attrs.frozen
class _RelayEnd:
    """How one relay (or one dial) ended: the reason to log, whether the broker refused us
    (retry slowly), and how long it was up."""

    reason: str
    refused: bool = False
    up_for: float | None = None


@attrs.define
class _Call:
    """What one request of a key uses, for its counters when it ends: the key's limits once
    it is admitted, and the usage store's row for every request of a valid key."""

    facts: Facts
    rec: RequestRecord | None = None
    key_id: str = ""
    limits: KeyLimits = attrs.field(factory=KeyLimits)
    #: in the usage store when it ends (a valid key; not ``/_bridge/usage``)
    counted: bool = False
    #: admitted by the key's limits (their counters are released when it ends)
    admitted: bool = False
    model: str | None = None
    #: the whole request body, when it was read whole (its "model", if the answer names none)
    body: bytes | None = None
    sniffer: UsageSniffer | None = None
    first_chunk: float | None = None
    last_chunk: float | None = None
    prompt: int = 0
    completion: int = 0
    estimated: bool = False

    def tokens(self, request_bytes: int) -> tuple[int, int, bool]:
        """(prompt, completion, estimated): as the LLM reported them; else estimated: one
        completion token per streamed event, prompt = request bytes / 4."""
        s = self.sniffer
        if s is not None and s.prompt_tokens is not None and s.completion_tokens is not None:
            return s.prompt_tokens, s.completion_tokens, False
        if s is None or not s.streamed:
            return 0, 0, False  # no answer, or one that is not a generation (e.g. /v1/models)
        return request_bytes // 4, s.events, True


class Connector:
    """The connector's state: key store, HTTP client to the LLM, relays to brokers."""

    def __init__(
        self,
        config: Config,
        *,
        keys: SecretStore | None = None,
        token: str | None = None,
        upstream_key: str | None = None,
    ) -> None:
        c = config.connector
        quiet_third_party_loggers()
        self.config = config
        self.keys = keys or SecretStore(config.path(c.api_keys_file), "tbk")
        self._fixed_token = token
        self._token = self.read_token()  # a missing or unreadable token fails at start
        if upstream_key is None:
            upstream_key = os.environ.get("TRIO_BRIDGE_UPSTREAM_KEY") or (
                read_secret_file(config.path(c.upstream_api_key_file), "upstream_api_key_file")
                if c.upstream_api_key_file
                else None
            )
        self._upstream_auth = (
            (b"authorization", b"Bearer " + upstream_key.encode()) if upstream_key else None
        )
        self.local_url = c.local_url.rstrip("/")
        #: where every relayed request goes: local_url's scheme, host, port and path
        self.llm_base = LLMBase(c.local_url)
        self._methods = frozenset(c.methods)
        #: LLM URLs by request target: an API has a handful of paths, and checking and
        #: building one costs ~20 µs (a third of building the request)
        self._urls: dict[str, httpx.URL] = {}
        self._ssl_context = ssl.create_default_context(
            cafile=str(config.path(c.broker_ca_file)) if c.broker_ca_file else None
        )
        self.name = c.name or os.uname().nodename
        self.max_body = int(config.limits.max_body)
        self.limits = config.limits
        self.relays: dict[str, Relay] = {}
        #: what each broker's relay may cost (bodies held, failed key checks), by broker URL
        self.relay_guards: dict[str, _RelayGuard] = {}
        self.connected = trio.Event()  # set once the first relay is up
        self.stopping = False
        self.draining = False
        self.llm_ready = False
        self.llm_state_since = time.time()
        self.llm_last_error = "not probed yet"
        #: the LLM's models as last learned (None: not known; brokers send anything)
        self.models: tuple[str, ...] | None = tuple(c.models) if c.models else None
        self._stop = trio.Event()
        self._drained = trio.Event()  # draining, and the last request ended
        self._up_or_stopping = trio.Event()  # a first relay is up, or stop() came first
        self._probe_now = trio.Event()
        self.started = time.time()
        self.admin_address: tuple[str, int] | None = None
        self.metrics = Metrics("connector")
        self.stats = RecentStats()
        self.usage: dict[str, dict[str, list[int]]] = {}  # key id → model → [prompt, completion]
        self.relay_states: dict[str, dict[str, Any]] = {
            url: {"state": "connecting", "since": self.started, "last_error": "", "reconnects": 0}
            for url in c.broker_urls
        }
        self.metrics.in_flight.labels("connector").set_function(lambda: self.in_flight)
        self.notifier = Notifier()

        ic = config.inspector
        self.inspector = Inspector(
            capture_bodies=ic.capture_bodies,
            max_records=ic.max_requests,
            max_body_bytes=int(ic.max_body_bytes),
            max_captured=ic.max_captured,
            max_captured_bytes=int(ic.max_captured_bytes),
        )
        self.limiter = Limiter()
        self.slots = FairSlots(c.max_concurrent, c.max_queue, on_wait=self._waited)
        self.metrics.queued.labels("connector").set_function(lambda: self.slots.queued)
        self.usage_store = (
            open_usage_store(config, models=lambda: self.models, metrics=self.metrics)
            if c.usage_file
            else None
        )
        if self.usage_store is not None:  # daily budgets go on where they were
            now = time.time()
            for key_id, tokens in self.usage_store.tokens_on(utc_day(now)).items():
                self.limiter.seed_today(key_id, tokens, now)
        # httpx's models on a lean h11 transport (httpcore's pool costs ~0.5 ms per request),
        # called directly: no cookies, redirects or auth to apply, and an AsyncClient's
        # per-request bookkeeping was a third of what httpx cost.
        self.transport = H11Transport(
            connect_timeout=float(config.limits.connect_timeout),
            max_idle=min(c.max_concurrent, 32),
        )

    def read_token(self) -> str:
        """The connector token as it is now: ``TRIO_BRIDGE_TOKEN``, else ``token_file``
        (re-read before every dial, so a rotated token is used without a restart)."""
        if self._fixed_token is not None:
            return self._fixed_token
        return os.environ.get("TRIO_BRIDGE_TOKEN") or read_secret_file(
            self.config.path(self.config.connector.token_file), "connector.token_file"
        )

    # -- the admin page (inspector) --
    def _pages(self) -> Pages:
        ins = self.inspector
        return Pages(
            "connector",
            token=admin_token(self.config, self.config.connector.admin_token_file),
            apis={
                "/api/requests": lambda q: {
                    "requests": ins.recent(_int(q, "limit", 200)),
                    "capture_bodies": ins.capture_bodies,
                },
                "/api/usage": lambda q: self.usage_summary(),
                "/api/timeline": lambda q: {
                    "now": time.time(),
                    "since": self.started,
                    "events": [{"time": t, "what": w, "state": st} for t, w, st in ins.timeline],
                    "queue": {"waiting": self.slots.queued, "at_llm": self.slots.busy},
                    "llm": "up" if self.llm_ready else "down",
                    "relays": {url: st["state"] for url, st in self.relay_states.items()},
                },
            },
            details=lambda seq: r.detail() if (r := ins.get(_seq(seq))) else None,
            events=ins.subscription,
            actions={"/api/replay/": self.replay},
        )

    def usage_summary(self) -> dict[str, Any]:
        """Tokens and requests per key and per model: today, 7 and 30 days (usage store), or
        since the start (in-memory counters) when there is no store."""
        names = {e.id: e.name for e in self.keys.entries()}
        if self.usage_store is None:
            per_key = {
                names.get(k, k): {"tokens": sum(p + c for p, c in models.values())}
                for k, models in self.usage.items()
            }
            return {"stored": False, "periods": {"since start": {"keys": per_key, "models": {}}}}
        now = time.time()
        rows = self.usage_store.rows(since_day=utc_day(now - 29 * 86400))
        periods: dict[str, Any] = {}
        for label, days in (("today", 0), ("7 days", 6), ("30 days", 29)):
            since = utc_day(now - days * 86400)
            keys: dict[str, dict[str, int]] = {}
            models: dict[str, dict[str, int]] = {}
            for r in rows:
                if r["day"] < since:
                    continue
                for table, name in (
                    (keys, names.get(r["key_id"], r["key_id"])),
                    (models, r["model"]),
                ):
                    t = table.setdefault(
                        name, {"requests": 0, "tokens": 0, "errors": 0, "refused": 0}
                    )
                    t["requests"] += r["requests"]
                    t["tokens"] += r["prompt_tokens"] + r["completion_tokens"]
                    t["errors"] += r["errors"]
                    t["refused"] += r["refused"]
            periods[label] = {"keys": keys, "models": models}
        return {"stored": True, "periods": periods}

    async def replay(self, seq_text: str) -> tuple[int, dict[str, Any]]:
        """Send a captured request to the LLM again (from the admin page; not through a
        broker); the answer becomes a new inspector entry."""
        old = self.inspector.get(_seq(seq_text.strip("/")))
        if old is None:
            return 404, {"error": "no such request (or no longer kept)"}
        if old.request_body is None or old.request_truncated or not old.target:
            return 409, {
                "error": "its body was not captured in full: set [inspector] capture_bodies"
            }
        rec = self.inspector.start(new_request_id(), old.method, old.path)
        rec.key_id, rec.key_name, rec.model, rec.replay_of = (
            old.key_id,
            "replay",
            old.model,
            old.request_id,
        )
        rec.request_headers = list(old.forward_headers)
        rec.request_body = old.request_body
        headers = [(k, v) for k, v in old.forward_headers if k != REQUEST_ID]
        headers.append((REQUEST_ID, rec.request_id.encode()))
        if self._upstream_auth is not None:
            headers.append(self._upstream_auth)
        t0 = trio.current_time()
        try:
            with trio.fail_after(float(self.limits.first_byte_timeout)):
                async with self.slots.slot("replay"):
                    r = await self.transport.handle_async_request(
                        httpx.Request(old.method, self._url_for(old.target), headers=headers,
                                      content=old.request_body)
                    )  # fmt: skip
                    rec.ttfb_ms = round((trio.current_time() - t0) * 1000, 3)
                    try:
                        async for chunk in r.stream:  # type: ignore[union-attr]
                            rec.response_body, rec.response_truncated = self.inspector.capture(
                                chunk, rec.response_body
                            )
                            rec.bytes_out += len(chunk)
                    finally:
                        await r.aclose()
        except (trio.TooSlowError, httpx.HTTPError) as exc:
            rec.outcome = "upstream_error"
            rec.reset = type(exc).__name__
            self.inspector.finish(rec)
            return 502, {"error": f"the LLM did not answer: {type(exc).__name__}", "seq": rec.seq}
        rec.status, rec.outcome = r.status_code, "ok"
        rec.response_headers = scrub(r.headers.raw)
        rec.duration_ms = round((trio.current_time() - t0) * 1000, 3)
        self.inspector.finish(rec)
        return 200, {"status": r.status_code, "seq": rec.seq}

    def status_line(self) -> str:
        n = len(self.config.connector.broker_urls)
        state = "draining; " if self.draining else ""
        llm = "up" if self.llm_ready else "DOWN"
        return f"{state}relays {len(self.relays)}/{n} up; LLM {llm}; in flight {self.in_flight}"

    def stop(self) -> None:
        """Close every relay cleanly (WebSocket close handshake) and make ``run`` return.

        Cancelling ``run`` instead also works; each relay then closes without the WebSocket
        close handshake.
        """
        self.stopping = True
        self._stop.set()
        self._up_or_stopping.set()
        for relay in list(self.relays.values()):
            relay.close("connector stopping")

    async def drain(self, grace: float | None = None) -> None:
        """Graceful stop: tell every broker we take no new requests (GOAWAY), let in-flight
        requests finish for up to ``grace`` seconds (``shutdown_grace``), then :meth:`stop`."""
        if grace is None:
            grace = float(self.limits.shutdown_grace)
        self.draining = True
        log.info("draining: no new requests; waiting for %d in flight", self.in_flight)
        for relay in list(self.relays.values()):
            relay.send_goaway("connector draining")
        self.notifier.stopping(f"draining; {self.in_flight} in flight")
        with trio.move_on_after(grace):
            if self.in_flight:
                await self._drained.wait()  # set when the last stream leaves its relay
        if self.in_flight:
            log.warning("grace period over: aborting %d requests", self.in_flight)
        for relay in list(self.relays.values()):
            relay.reset_all(ResetCode.SHUTDOWN, "connector shutting down")
        await trio.sleep(0.05)  # let the resets reach the brokers
        self.stop()

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.relays.values())

    def ready(self) -> bool:
        """Relay up to at least one broker AND the LLM answers (and not draining)."""
        return bool(self.relays) and self.llm_ready and not self.draining

    def status(self) -> dict[str, Any]:
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
                "up": self.llm_ready,
                "since": self.llm_state_since,
                "last_error": self.llm_last_error,
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
            "tokens": {
                key: {model: {"prompt": p, "completion": c} for model, (p, c) in models.items()}
                for key, models in self.usage.items()
            },
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one relay per broker URL until :meth:`stop` or cancellation. Started (for
        ``nursery.start``) once the first relay is up, or at a stop before that."""
        try:
            async with trio.open_nursery() as outer:
                if self.config.connector.admin_listen:
                    listen = self.config.connector.admin_listen
                    hosts = [listen, *self.config.connector.admin_hosts]
                    admin = AdminApp(
                        self.metrics, self.ready, self.status, self._pages(), hosts=hosts
                    )
                    with listening("connector.admin_listen", listen):
                        self.admin_address = await outer.start(serve_app, admin, listen)
                    log.info("admin endpoint on http://%s:%d", *self.admin_address)
                with trio.move_on_after(float(self.limits.connect_timeout)):
                    self._set_llm(*await self._probe_llm())
                    if self.llm_ready:
                        await self._learn_models()
                outer.start_soon(self._watch_llm)
                if self.usage_store is not None:
                    outer.start_soon(self.usage_store.run)
                outer.start_soon(self.notifier.watchdog_loop, self.status_line)
                if self.config.connector.notify_ready == "start":
                    self.notifier.ready(self.status_line())
                async with trio.open_nursery() as relays:
                    for url in self.config.connector.broker_urls:
                        relays.start_soon(self.keep_relay, url)
                    await self._up_or_stopping.wait()
                    task_status.started()
                outer.cancel_scope.cancel()  # every relay ended after stop()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self.transport.aclose()
                if self.usage_store is not None:
                    await self.usage_store.flush()  # what ended after the last flush

    # -- LLM health --
    async def _probe_llm(self) -> tuple[bool, str]:
        """(up, reason): up if the LLM answers ``health_path`` with a status below 500."""
        headers = [self._upstream_auth] if self._upstream_auth is not None else []
        url = self.local_url + self.config.connector.health_path
        try:
            with trio.fail_after(float(self.limits.connect_timeout) + 5):
                r = await self.transport.handle_async_request(
                    httpx.Request("GET", url, headers=headers)
                )
                try:
                    await r.aread()
                finally:
                    await r.aclose()
        except trio.TooSlowError:
            return False, "health probe timed out"
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if r.status_code >= 500:
            return False, f"health probe answered HTTP {r.status_code}"
        return True, f"answers HTTP {r.status_code}"

    def _set_llm(self, up: bool, reason: str) -> None:
        if up == self.llm_ready and self.llm_last_error != "not probed yet":
            return
        self.llm_ready = up
        self.metrics.upstream_up.labels("connector").set(1 if up else 0)
        self.llm_state_since = time.time()
        self.llm_last_error = "" if up else reason
        if up:
            log.info("LLM is up: %s", reason, extra={"llm": self.local_url})
        else:
            log.warning("LLM is down: %s", reason, extra={"llm": self.local_url})
        self.inspector.state("llm", "up" if up else "down")
        for relay in list(self.relays.values()):
            relay.send_status(ready=up)
        self.notifier.status(self.status_line())  # systemctl status shows it at once

    def llm_failed(self, reason: str) -> None:
        """A request could not reach the LLM: report not-ready now and probe at once."""
        self._set_llm(False, reason)
        self._probe_now.set()

    async def _learn_models(self) -> None:
        """What the LLM serves (``models`` in the config, else asked), told to the brokers
        when it changes; unknown (None) leaves the brokers sending it anything."""
        configured = self.config.connector.models
        models = tuple(configured) if configured else await self._discover_models()
        if models is None or models == self.models:
            return
        self.models = models
        log.info("LLM models: %s", ", ".join(models) or "(none)", extra={"llm": self.local_url})
        for relay in list(self.relays.values()):
            relay.send_status(ready=self.llm_ready, models=models)

    async def _discover_models(self) -> tuple[str, ...] | None:
        """Model ids from OpenAI's ``/v1/models``, else Ollama's ``/api/tags``; None if
        neither answers with a list."""
        headers = [self._upstream_auth] if self._upstream_auth is not None else []
        for path in MODEL_LISTS:
            try:
                with trio.fail_after(float(self.limits.connect_timeout) + 5):
                    r = await self.transport.handle_async_request(
                        httpx.Request("GET", self.local_url + path, headers=headers)
                    )
                    try:
                        body = await r.aread()
                    finally:
                        await r.aclose()
            except (trio.TooSlowError, httpx.HTTPError):
                continue
            if (ids := model_ids(path, r.status_code, body)) is not None:
                return tuple(dict.fromkeys(n for n in ids if 0 < len(n) <= 256))[:1000]
        return None

    async def _watch_llm(self) -> None:
        interval = float(self.config.connector.health_interval)
        backoff = Backoff(base=0.5, cap=interval)
        while True:
            self._set_llm(*await self._probe_llm())
            if self.llm_ready:
                await self._learn_models()
                backoff.attempt = 0
                delay = interval
            else:
                delay = max(0.25, backoff.next_delay())
            with trio.move_on_after(delay):
                await self._probe_now.wait()
            self._probe_now = trio.Event()

    # -- relays --
    def _relay_changed(self, url: str, relay: Relay) -> None:
        if relay.closed_reason is not None and self.relays.get(url) is relay:
            del self.relays[url]  # at once, not after the close handshake
        if self.draining and not self.in_flight:
            self._drained.set()

    async def keep_relay(self, url: str) -> None:
        """Dial ``url`` and serve on it; re-dial forever with backoff (refusals slowly)."""
        backoff = Backoff()
        # refusals (token, route, path) need a human: retry every 5-60 s, not in a loop
        slow = Backoff(base=5.0, cap=60.0, floor=5.0)
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
            self._relay_down(url, end.reason, delay)
            with trio.move_on_after(delay):
                await self._stop.wait()

    async def _one_relay(self, url: str) -> _RelayEnd:
        """One dial and, if it worked, the relay's whole life; how it ended (never raises but
        for cancellation: the connector never gives up on a broker)."""
        try:
            token = self.read_token()
            with trio.fail_after(float(self.limits.connect_timeout)):
                ws = await connect_websocket(
                    url,
                    headers=[(b"authorization", b"Bearer " + token.encode())],
                    max_message=MAX_MESSAGE + 1024,
                    ssl_context=self._ssl_context,
                )
            try:
                return await self._serve_relay(url, ws, token)
            finally:
                await ws.aclose()
        except RelayRejected as exc:
            return _RelayEnd(_rejection(url, exc), refused=True)
        except ConfigError as exc:  # the token file went missing, empty or readable
            return _RelayEnd(f"connector token: {exc}", refused=True)
        except trio.TooSlowError:
            return _RelayEnd(
                f"cannot reach broker: no answer within {self.limits.connect_timeout}s"
            )
        except (OSError, trio.BrokenResourceError) as exc:  # ssl.SSLError is an OSError
            return _RelayEnd(f"cannot reach broker: {_connect_failure(exc)}")
        except (RelayClosed, RemoteProtocolError) as exc:
            return _RelayEnd(f"relay handshake failed: {exc}")
        except Exception as exc:
            log.exception("relay failed unexpectedly", extra={"broker": url})
            return _RelayEnd(f"unexpected error: {exc!r}")

    def _new_relay(self, url: str, ws: WebSocket) -> Relay:
        c, rc = self.config.connector, self.config.relay
        guard = self.relay_guards[url] = _RelayGuard(int(rc.max_buffered))
        return Relay(
            ws,
            Session(opener=False, window=int(rc.request_window), max_streams=rc.max_streams),
            name=self.name,
            route=c.route,
            ready=self.llm_ready,
            # requests beyond the LLM's slots wait here, in the fair queue (keys are known
            # here, not at the broker)
            capacity=c.max_concurrent + c.max_queue,
            models=self.models,
            priority=c.priority,
            ping_interval=float(rc.ping_interval),
            max_buffered=int(rc.max_buffered),
            handler=functools.partial(self.handle_stream, guard=guard),
            on_change=lambda r: self._relay_changed(url, r),
        )

    async def _serve_relay(self, url: str, ws: WebSocket, token: str) -> _RelayEnd:
        """The hello, then serve until the relay ends."""
        relay = self._new_relay(url, ws)
        if self.stopping:
            return _RelayEnd("connector stopping")
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(relay.run)
            except RelayRefused as exc:
                return _RelayEnd(f"broker refused the relay: {exc.reason}", refused=True)
            except RelayClosed as exc:
                return _RelayEnd(exc.reason)
            nursery.start_soon(self._follow_token, relay, token)
            up_since = time.monotonic()
            self._relay_up(url, relay)
        self.relays.pop(url, None)
        reason = relay.closed_reason or "closed"
        if relay.peer_goaway is not None:  # the broker said why before it closed
            reason = f"broker going away: {relay.peer_goaway}"
        return _RelayEnd(reason, up_for=time.monotonic() - up_since)

    def _relay_up(self, url: str, relay: Relay) -> None:
        self.relays[url] = relay
        if (relay.local_ready, relay.local_models) != (self.llm_ready, self.models):
            relay.send_status(ready=self.llm_ready, models=self.models)  # changed meanwhile
        if self.draining:
            relay.send_goaway("connector draining")
        if not self.connected.is_set():
            self.notifier.ready(self.status_line())
        self.connected.set()
        self._up_or_stopping.set()
        st = self.relay_states[url]
        if st["state"] != "connecting":
            st["reconnects"] += 1
            self.metrics.reconnects.labels("connector", url).inc()
        st.update(state="connected", since=time.time())
        self.notifier.status(self.status_line())
        self.metrics.relay_connected.labels("connector", url).set(1)
        log.info("relay connected", extra={"broker": url})
        self.inspector.state(url, "up")

    def _relay_down(self, url: str, reason: str, delay: float) -> None:
        st = self.relay_states[url]
        if st["state"] == "connected" or not st["last_error"]:
            st["since"] = time.time()
        st.update(state="reconnecting", last_error=reason, next_attempt_in=round(delay, 3))
        self.metrics.relay_connected.labels("connector", url).set(0)
        self.inspector.state(url, "down")
        self.notifier.status(self.status_line())
        log.warning("relay down: %s; reconnecting in %.2fs", reason, delay, extra={"broker": url})

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

    # -- one request --
    async def handle_stream(self, stream: RelayStream, guard: _RelayGuard | None = None) -> None:
        """One relayed request, start to end; ``guard``: what its relay may cost (bodies
        held, failed key checks)."""
        head = stream.request_head
        assert head is not None
        facts = Facts(head.request_id, head.method, head.target.split("?", 1)[0])
        facts.route = self.config.connector.route
        rec = self.inspector.start(head.request_id, head.method, facts.path)
        call = _Call(facts, rec)
        try:
            if guard is None:
                guard = _RelayGuard(int(self.config.relay.max_buffered))
            facts.outcome = await self._forward(stream, call, guard)
        finally:
            if facts.outcome is None:
                code = stream.reset_error.code if stream.reset_error is not None else -1
                facts.outcome = _CANCEL_OUTCOME.get(code, "cancelled")
            facts.ended = time.monotonic()
            facts.bytes_in, facts.bytes_out = stream.bytes_received, stream.bytes_sent
            reset_code = None
            if stream.reset_error is not None and stream.reset_error.code != ResetCode.NO_ERROR:
                facts.reset = stream.reset_error.reason
                reset_code = stream.reset_error.code
            if call.counted:
                self._record_usage(call)
            self._account(facts, reset_code)
            self._inspected(rec, facts)
            if facts.limit != "key_failures":  # those are summed up per relay instead
                log_request("connector", facts)

    def _inspected(self, rec: RequestRecord, facts: Facts) -> None:
        """The end of a request, for the inspector (cheap: a few attribute copies)."""
        rec.status = facts.status
        rec.outcome = facts.outcome or ""
        if rec.outcome == "ok" and (facts.status or 0) >= 500:
            # relayed as it was, and an error by its status (is_error): say so where an
            # operator scans for trouble (the log line and the metrics keep outcome "ok")
            rec.outcome = LLM_ERROR
        rec.reset = facts.reset or ""
        rec.model = rec.model or facts.model or ""
        rec.duration_ms = round(facts.duration * 1000, 3)
        ttfb = facts.ttfb
        rec.ttfb_ms = None if ttfb is None else round(ttfb * 1000, 3)
        rec.bytes_in, rec.bytes_out = facts.bytes_in, facts.bytes_out
        self.inspector.finish(rec)

    def _account(self, facts: Facts, reset_code: int | None) -> None:
        m, route = self.metrics, self.config.connector.route
        status, outcome = facts.status, facts.outcome or "cancelled"
        duration, ttfb = facts.duration, facts.ttfb
        m.child(m.requests, "connector", route, status_class(status), outcome).inc()
        m.child(m.duration, "connector", route).observe(duration)
        if ttfb is not None:
            m.child(m.ttfb, "connector", route).observe(ttfb)
        m.child(m.bytes, "connector", "in").inc(facts.bytes_in)
        m.child(m.bytes, "connector", "out").inc(facts.bytes_out)
        if reset_code is not None:
            m.child(m.resets, "connector", reset_reason(reset_code)).inc()
        if status == 401 and outcome == "refused":
            m.child(m.auth_failures, "connector").inc()
        error = is_error(outcome, status)
        self.stats.add(duration, ttfb, error)
        m.count_model(facts.model, outcome, ttfb)

    def _waited(self, key_id: str, seconds: float) -> None:
        self.metrics.child(self.metrics.key_queue_wait, key_id).observe(seconds)

    async def _self_service(
        self, stream: RelayStream, facts: Facts, entry: SecretEntry, limits: KeyLimits
    ) -> str:
        """``GET /_bridge/usage``: the presented key's limits, what is left now, and its
        usage today and over the last 30 days (JSON), answered here, not by the LLM.

        A request of that key: refused (429) beyond its concurrency or requests per minute,
        and counted in them ("now" includes it); not by its token limits (it uses none, and
        a key out of tokens may still see why). Built from the usage store's in-memory
        summary of this key alone (bounded: 30 days × its models), never from the file."""
        now = time.time()
        tokenless = attrs.evolve(limits, tokens_per_minute=None, tokens_per_day=None)
        refused = await self._admit(stream, facts, entry.id, tokenless, limits, now)
        if refused is not None:
            return refused
        try:
            return await self._usage_answer(stream, facts, entry, limits, now)
        finally:
            self.limiter.finish(entry.id, 0, time.time())

    async def _usage_answer(
        self,
        stream: RelayStream,
        facts: Facts,
        entry: SecretEntry,
        limits: KeyLimits,
        now: float,
    ) -> str:
        """The JSON of :meth:`_self_service` (the key admitted)."""
        rows: list[dict[str, Any]] = []
        if self.usage_store is not None:
            with trio.move_on_after(5):  # the summary is read at start, in a worker thread
                await self.usage_store.load()
            if not self.usage_store.loaded:
                return await self._reply_error(
                    stream, facts, 503, "usage is still being read; retry shortly", retry_after=1
                )
            rows = self.usage_store.rows(since_day=utc_day(now - 29 * 86400), key_ids=[entry.id])
        today = utc_day(now)
        doc = {
            "key": {"name": entry.name, "id": entry.id, "expires": entry.expires or None},
            "limits": {
                "concurrency": limits.concurrency,
                "requests_per_minute": limits.rpm,
                "tokens_per_minute": limits.tokens_per_minute,
                "tokens_per_day": limits.tokens_per_day,
                "models": list(limits.models) or None,
                "priority": limits.priority,
            },
            "now": self.limiter.snapshot(entry.id, limits, now),
            "today": _totals(r for r in rows if r["day"] == today),
            "last_30_days": _totals(rows),
            "by_day": [{k: v for k, v in r.items() if k != "key_id"} for r in rows],
            "stored": self.usage_store is not None,
        }
        body = json.dumps(doc, indent=1).encode()
        facts.status = 200
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (REQUEST_ID, facts.request_id.encode()),
            (b"cache-control", b"no-store"),
        ]
        sent = await self._send_whole(stream, ResponseHead(200, headers), body)
        return "ok" if sent else "client_stalled"

    def _count_usage(self, call: _Call, t0: float, *, streamed: bool) -> None:
        sniffer = call.sniffer
        assert sniffer is not None
        sniffer.finish()
        key_id = call.key_id
        p, c = sniffer.prompt_tokens, sniffer.completion_tokens
        call.model = call.model or sniffer.model
        if call.model:
            call.facts.model = call.model
        model = self.metrics.model_label(sniffer.model or call.model or "unknown")
        if p is not None and c is not None:
            self.metrics.child(self.metrics.tokens, key_id, model, "prompt").inc(p)
            self.metrics.child(self.metrics.tokens, key_id, model, "completion").inc(c)
            per_key = self.usage.setdefault(key_id, {})
            counts = per_key.setdefault(model, [0, 0])
            counts[0] += p
            counts[1] += c
        first_chunk, last_chunk = call.first_chunk, call.last_chunk
        if streamed and first_chunk is not None:
            self.metrics.child(self.metrics.ttft, model).observe(first_chunk - t0)
            # without usage in the stream, its events stand for tokens (one per event)
            n = c if c is not None else sniffer.events
            if n > 1 and last_chunk is not None and last_chunk > first_chunk:
                self.metrics.child(self.metrics.tps, model).observe(n / (last_chunk - first_chunk))

    async def _reply_error(
        self,
        stream: RelayStream,
        facts: Facts,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        code: str | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> str:
        """Answer with a bridge-made error; a broker that takes no part of it within
        ``stall_timeout`` gets the stream reset instead (nothing waits on it for ever)."""
        facts.status = status
        _, headers, body = error_response(
            status, message, facts.request_id, retry_after=retry_after, code=code
        )
        if not await self._send_whole(stream, ResponseHead(status, headers + (extra or [])), body):
            return "client_stalled"
        return bridge_outcome(status)

    async def _send_whole(self, stream: RelayStream, head: ResponseHead, body: bytes) -> bool:
        """Send an answer the connector made itself; a broker that takes no part of it within
        ``stall_timeout`` gets the stream reset instead (False): nothing waits on it for ever."""
        with trio.move_on_after(float(self.limits.stall_timeout)) as stalled:
            await stream.send_response(head)
            await stream.send_data(body, end_stream=True)
        if stalled.cancelled_caught:
            stream.reset(ResetCode.TIMEOUT, "the broker took no answer (stall timeout)")
            return False
        return True

    async def _forward(self, stream: RelayStream, call: _Call, guard: _RelayGuard) -> str:
        """Check the key and its limits, then relay the request to the LLM (or answer
        ``/_bridge/usage``); the key's counters are released when the answer ends."""
        head = stream.request_head
        assert head is not None
        facts, rec = call.facts, call.rec
        assert rec is not None
        presented = presented_key(head.headers)
        entry = self.keys.verify(presented) if presented is not None else None
        if entry is None:
            if not guard.key_failed(trio.current_time()):
                facts.limit = "key_failures"
                self.metrics.limit_hits.labels("connector", "key_failures").inc()
                return await self._reply_error(
                    stream, facts, 429, "too many failed key checks; retry later", retry_after=5
                )
            return await self._reply_error(
                stream,
                facts,
                401,
                "missing API key" if presented is None else "invalid API key",
            )
        facts.key_id = entry.id
        rec.key_id, rec.key_name = entry.id, entry.name
        rec.request_headers = scrub(head.headers)
        limits = self.keys.limits_for(entry)
        if head.target.split("?", 1)[0] == USAGE_PATH:
            return await self._self_service(stream, facts, entry, limits)
        # from here on, whatever the answer, a request of this key in its usage
        call.key_id, call.limits, call.counted = entry.id, limits, True
        try:  # the one rule for what may reach the LLM (the broker's word is not taken)
            check_method(head.method, self._methods)
            url = self._url_for(head.target)
        except BadTarget as exc:
            return await self._reply_error(stream, facts, exc.status, str(exc))
        declared = header(head.headers, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await self._reply_error(stream, facts, 413, "request body too large")
        # the key's limits apply before anything of the body is read or held
        refused = await self._admit(stream, facts, entry.id, limits, limits, time.time())
        if refused is not None:
            return refused
        call.admitted = True
        held = 0
        try:
            try:
                body = await self._request_body(stream, facts, entry.id, limits, guard)
            except _BodyRefused as exc:
                return await self._reply_error(stream, facts, exc.status, exc.message)
            if isinstance(body, str):
                return body  # refused
            content, call.model = body
            if isinstance(content, bytes):
                held = len(content)  # taken from the budget while read: given back at the end
                call.body = content
            if self.inspector.capture_bodies:
                content = self._capture_request(rec, content)
            return await self._to_llm(stream, facts, call, url, content)
        finally:
            guard.give(held, entry.id)
            self._finish_call(call, stream)

    async def _admit(
        self,
        stream: RelayStream,
        facts: Facts,
        key_id: str,
        limits: KeyLimits,
        shown: KeyLimits,
        now: float,
    ) -> str | None:
        """Count a request of ``key_id`` in under ``limits`` (None), or answer the 429 and
        return its outcome (rate-limit headers from ``shown``)."""
        refusal = self.limiter.admit(key_id, limits, now)
        if refusal is None:
            return None
        facts.limit = refusal.limit
        self.metrics.limit_hits.labels("connector", refusal.limit).inc()
        return await self._reply_error(
            stream,
            facts,
            429,
            refusal.message,
            retry_after=refusal.retry_after,
            extra=self.limiter.headers(key_id, shown, now),
        )

    async def _request_body(
        self,
        stream: RelayStream,
        facts: Facts,
        key_id: str,
        limits: KeyLimits,
        guard: _RelayGuard,
    ) -> tuple[bytes | AsyncIterator[bytes], str | None] | str:
        """The body to send on (read whole when it is complete or the key has a model
        allowlist, which needs the "model" before anything is sent) and its model; or the
        outcome of the 400 / 403 answered for a model that cannot be read or that the key may
        not use. Raises :class:`_BodyRefused` (too large, too slow, over the relay's budget)."""
        if not (stream.recv_done or limits.models):
            return self._body(stream), None
        content = await self._read_body(stream, guard, key_id)
        if not limits.models:
            return content, None
        try:
            encoding = header(stream.request_head.headers, b"content-encoding")  # type: ignore[union-attr]
            model = declared_model(content, encoding)
        except ModelUnknown as exc:
            guard.give(len(content), key_id)  # refused: nothing is held for it
            return await self._reply_error(stream, facts, 400, str(exc), code="model_unknown")
        if limits.allows_model(model):
            return content, model
        guard.give(len(content), key_id)
        return await self._reply_error(
            stream,
            facts,
            403,
            f"this API key may not use model {str(model)[:128]!r} (allowed: "
            f"{', '.join(limits.models)})",
            code="model_not_allowed",
        )

    def _finish_call(self, call: _Call, stream: RelayStream) -> None:
        """Count what an admitted request used against its key's limits; note its tokens and
        its model for the usage store, the inspector and the log line."""
        now = time.time()
        prompt, completion, estimated = call.tokens(stream.bytes_received)
        call.prompt, call.completion, call.estimated = prompt, completion, estimated
        if call.model is None and call.body:  # the answer named none (e.g. an LLM's error)
            call.model = _model_named(call.body)
            if call.model is not None:
                call.facts.model = call.facts.model or call.model
        call.body = None
        self.limiter.finish(call.key_id, prompt + completion, now)
        if call.rec is not None and (prompt or completion):
            rec = call.rec
            rec.prompt_tokens, rec.completion_tokens = prompt, completion
            rec.tokens_estimated = estimated
            rec.model = call.model or rec.model
            if call.first_chunk is not None and call.last_chunk is not None:
                rec.first_chunk_ms = round((call.first_chunk - call.facts.started) * 1000, 3)
                if completion > 1 and call.last_chunk > call.first_chunk:
                    rec.tokens_per_second = round(
                        completion / (call.last_chunk - call.first_chunk), 1
                    )

    def _record_usage(self, call: _Call) -> None:
        """A request of a valid key in the usage store, once its outcome is known: refused
        by the bridge (a 4xx it made) or an error by the same rule as the metrics."""
        if self.usage_store is None:
            return
        facts = call.facts
        outcome = facts.outcome or "cancelled"
        self.usage_store.record(
            call.key_id,
            call.model or "unknown",
            prompt=call.prompt,
            completion=call.completion,
            estimated=call.estimated,
            error=is_error(outcome, facts.status),
            refused=outcome == "refused",
            now=time.time(),
        )

    async def _to_llm(
        self,
        stream: RelayStream,
        facts: Facts,
        call: _Call,
        url: httpx.URL,
        content: bytes | AsyncIterator[bytes],
    ) -> str:
        """Wait for an LLM slot (fairly), send the request, stream the answer back."""
        head = stream.request_head
        assert head is not None
        request = self._llm_request(head, url, content, call)
        # one deadline for the wait in the queue and the LLM's first byte together
        first_byte_by = trio.current_time() + float(self.limits.first_byte_timeout)
        refused = await self._take_slot(stream, facts, call, first_byte_by)
        if refused is not None:
            return refused
        # The LLM slot is held for the LLM's work only: until its answer ends, or until it
        # fails to give one (the error is answered after the slot is free: a broker that
        # takes no answer never pins a slot).
        failure: BaseException | None = None
        try:
            with trio.CancelScope(deadline=first_byte_by) as first_byte:
                response = await self.transport.send(*request)
        except (_BodyRefused, httpx.HTTPError) as exc:
            failure = exc
        except BaseException:
            self.slots.release()
            raise
        if failure is None and first_byte.cancelled_caught:
            failure = trio.TooSlowError()
        if failure is not None:
            self.slots.release()
            return await self._no_answer(stream, facts, failure)
        try:
            return await self._answer(stream, facts, call, response)
        finally:
            self.slots.release()

    def _llm_request(
        self,
        head: RequestHead,
        url: httpx.URL,
        content: bytes | AsyncIterator[bytes],
        call: _Call,
    ) -> tuple[str, httpx.URL, list[tuple[bytes, bytes]], bytes | AsyncIterator[bytes]]:
        """The request for the LLM, as ``H11Transport.send`` takes it: the user's key and
        hop-by-hop headers out, the correlation id (and an upstream key) in."""
        headers = strip_hop_by_hop(head.headers, also=_DROP_UPSTREAM)
        headers.append((REQUEST_ID, head.request_id.encode()))
        if call.rec is not None:  # what a replay sends again (never the upstream key)
            call.rec.target = head.target
            call.rec.forward_headers = list(headers)
        if self._upstream_auth is not None:
            headers.append(self._upstream_auth)
        return head.method, url, headers, content

    def _url_for(self, target: str) -> httpx.URL:
        """The LLM's URL for a request target (:class:`BadTarget` for one that may not go)."""
        url = self._urls.get(target)
        if url is None:
            url = self.llm_base.url_for(target)
            if len(self._urls) >= 256:  # many distinct targets (query strings): start over
                self._urls.clear()
            self._urls[target] = url
        return url

    async def _take_slot(
        self, stream: RelayStream, facts: Facts, call: _Call, deadline: float
    ) -> str | None:
        """An LLM slot for ``call`` (None), or the outcome of the answer that refused it."""
        if self.slots.try_acquire():  # a free slot (the usual case): no scope, no wait
            if call.rec is not None:
                call.rec.queue_wait_ms = 0.0
            return None
        queued_at = trio.current_time()
        try:
            with trio.fail_at(deadline):
                await self.slots.acquire(call.key_id, call.limits.priority)
        except QueueFull:
            self.metrics.limit_hits.labels("connector", "queue").inc()
            return await self._reply_error(
                stream,
                facts,
                429,
                "the LLM is busy and its queue is full; retry shortly",
                retry_after=1,
            )
        except trio.TooSlowError:
            return await self._reply_error(
                stream, facts, 504, "the LLM did not start answering in time (queued)"
            )
        if call.rec is not None:
            call.rec.queue_wait_ms = round((trio.current_time() - queued_at) * 1000, 3)
        return None

    async def _no_answer(self, stream: RelayStream, facts: Facts, exc: BaseException) -> str:
        """The LLM gave no response head: say why in an OpenAI-shaped error (httpx's errors
        are mapped here, once)."""
        if isinstance(exc, trio.TooSlowError):
            return await self._reply_error(
                stream, facts, 504, "the LLM did not start answering in time"
            )
        if isinstance(exc, _BodyRefused):  # part of the body may have gone: no answer fits
            stream.reset(exc.code, exc.message)
            return "too_large" if isinstance(exc, _TooLarge) else "refused"
        if isinstance(exc, httpx.ConnectError):
            self.llm_failed(f"ConnectError: {exc}")
            return await self._reply_error(stream, facts, 502, "the LLM server is unreachable")
        if isinstance(exc, httpx.TimeoutException):
            return await self._reply_error(stream, facts, 502, "connecting to the LLM timed out")
        return await self._reply_error(
            stream, facts, 502, f"the LLM server failed: {type(exc).__name__}"
        )

    async def _answer(
        self, stream: RelayStream, facts: Facts, call: _Call, response: httpx.Response
    ) -> str:
        """Stream the LLM's answer back (the LLM slot is held until it ends)."""
        head = stream.request_head
        assert head is not None
        facts.status = response.status_code
        facts.head_at = time.monotonic()
        try:
            raw_headers = response.headers.raw
            resp_headers = strip_hop_by_hop(raw_headers, also=_DROP_DOWNSTREAM)
            resp_headers.append((REQUEST_ID, head.request_id.encode()))
            if call.limits.rpm is not None or call.limits.tokens_per_minute is not None:
                resp_headers += self.limiter.headers(call.key_id, call.limits, time.time())
            await stream.send_response(ResponseHead(response.status_code, resp_headers))
            if call.rec is not None:
                call.rec.response_headers = scrub(resp_headers)
            call.sniffer = sniffer = UsageSniffer(
                header(raw_headers, b"content-type"), header(raw_headers, b"content-encoding")
            )
            outcome = await self._pump(stream, response, call)
            if outcome != "ok":
                return outcome
            await stream.end()
            if sniffer.active:
                self._count_usage(call, facts.started, streamed=sniffer.streamed)
            return "ok"
        except httpx.HTTPError as exc:
            stream.reset(
                ResetCode.UPSTREAM_ERROR, f"the LLM failed mid-response: {type(exc).__name__}"
            )
            return "upstream_error"
        except StreamReset as exc:
            return "client_gone" if exc.code == ResetCode.CANCEL else "reset"
        finally:
            await close_response(response)

    async def _pump(self, stream: RelayStream, response: httpx.Response, call: _Call) -> str:
        """The answer's chunks from the LLM into the stream, as they come ("ok" at its end)."""
        # raw bytes as the LLM sent them (what aiter_raw gives, minus its per-chunk wrapper)
        chunks = aiter(response.stream)  # type: ignore[arg-type]
        idle = float(self.limits.idle_timeout)
        stall = float(self.limits.stall_timeout)
        assert call.sniffer is not None
        sniff = call.sniffer.feed if call.sniffer.active else None
        capture = call.rec if self.inspector.capture_bodies else None
        # One scope for the whole answer, its deadline moved per phase (cheaper than two new
        # scopes per chunk): reading from the LLM is bounded by idle_timeout, waiting for the
        # relay to take a chunk (credit from a slow client) by stall_timeout. While reading,
        # the deadline moves only once it is 1 % (at most a second) short of idle_timeout: a
        # token every few ms does not move it each time, and it never fires early.
        slack = min(idle / 100, 1.0)
        reading = False  # the first turn sets the deadline
        with trio.CancelScope() as deadline:
            while True:
                due = trio.current_time() + idle
                if not reading or deadline.deadline < due:
                    deadline.deadline = due + slack
                reading = True
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                call.last_chunk = time.monotonic()
                if call.first_chunk is None:
                    call.first_chunk = call.last_chunk
                if sniff is not None:
                    sniff(chunk)
                if not chunk:
                    continue
                if capture is not None and not capture.response_truncated:
                    capture.response_body, capture.response_truncated = self.inspector.capture(
                        chunk, capture.response_body
                    )
                if not stream.can_send(len(chunk)):
                    deadline.deadline = trio.current_time() + stall
                    reading = False
                await stream.send_data(chunk)
        if deadline.cancelled_caught:
            if reading:
                stream.reset(ResetCode.TIMEOUT, "the LLM stalled (idle timeout)")
                return "idle_timeout"
            stream.reset(ResetCode.TIMEOUT, "the client stopped reading (stall timeout)")
            return "client_stalled"
        return "ok"

    def _capture_request(
        self, rec: RequestRecord, content: bytes | AsyncIterator[bytes]
    ) -> bytes | AsyncIterator[bytes]:
        """Keep (the start of) the request body for the inspector; the body sent is unchanged."""
        if isinstance(content, bytes):
            rec.request_body, rec.request_truncated = self.inspector.capture(content, None)
            return content

        async def tee(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            async for chunk in chunks:
                if not rec.request_truncated:
                    rec.request_body, rec.request_truncated = self.inspector.capture(
                        chunk, rec.request_body
                    )
                yield chunk

        rec.request_body = b""
        return tee(content)

    async def _read_body(self, stream: RelayStream, guard: _RelayGuard, key_id: str) -> bytes:
        """The whole request body, its bytes taken from the relay's ``guard`` as they come
        (given back by the caller once the call ends; here if reading fails). Raises
        :class:`_BodyRefused`: beyond max_body, slower than min_body_rate, over the budget."""
        if stream.recv_done:  # all here already (a small request): no waiting
            body, _ = stream.take_ready()
            if len(body) > self.max_body:
                raise _TooLarge
            guard.take(len(body), key_id)
            return body
        parts: list[bytes] = []
        taken = 0
        try:
            async for chunk in self._body(stream):
                guard.take(len(chunk), key_id)
                taken += len(chunk)
                parts.append(chunk)
        except BaseException:
            guard.give(taken, key_id)
            raise
        return b"".join(parts)

    async def _body(self, stream: RelayStream) -> AsyncIterator[bytes]:
        """The request body as it comes: at most max_body (else _TooLarge); at least
        min_body_rate bytes per second on average after head_timeout of grace, as the broker
        holds its public clients to, and all of it within first_byte_timeout (else
        _TooSlow)."""
        size = 0
        grace, rate = float(self.limits.head_timeout), int(self.limits.min_body_rate)
        started = trio.current_time()
        latest = started + float(self.limits.first_byte_timeout)
        while True:
            with trio.move_on_at(min(started + grace + size / rate, latest)) as slow:
                chunk = await stream.receive_data()
            if slow.cancelled_caught:
                raise _TooSlow
            if not chunk:
                return
            size += len(chunk)
            if size > self.max_body:
                raise _TooLarge
            yield chunk


async def _drain_buffered(stream: RelayStream) -> list[bytes]:
    parts = []
    while chunk := await stream.receive_data():
        parts.append(chunk)
    return parts


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
        return False, _rejection(url, exc)
    except (OSError, trio.BrokenResourceError) as exc:
        return False, f"cannot reach broker: {_connect_failure(exc)}"
    except RelayClosed as exc:
        return False, f"the broker closed the connection during the handshake ({exc.reason})"
    except RemoteProtocolError as exc:
        return False, f"not a trio-bridge relay endpoint ({exc})"
    finally:
        if ws is not None:
            await ws.aclose()
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
    if exc.status in (401, 403):
        return f"broker refused the relay: HTTP {exc.status} (check the connector token)"
    if exc.status == 429:
        return "broker refused the relay: HTTP 429 (too many refused tokens from this address)"
    return (
        f"broker refused the relay: HTTP {exc.status} (is {url} the broker's relay URL, "
        "ws(s)://HOST/_bridge/relay on its public port?)"
    )


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

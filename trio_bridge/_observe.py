"""Logging: one JSON line per event on stderr (or a readable text line), with request fields.

Every log call may pass ``extra={...}`` with fields such as ``request_id``, ``route``,
``status``; they become keys of the JSON object. Secrets are never passed to the logger:
keys are identified by their public id only.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import deque
from typing import Any

import attrs
import trio

_STD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

request_log = logging.getLogger("trio_bridge.request")
#: a path logged from a request is cut here (it came from outside)
MAX_LOGGED = 512
# one encoder for every line (json.dumps with arguments builds a new one per call)
_ENCODE = json.JSONEncoder(default=str, separators=(",", ":")).encode


_last_second: list[Any] = [-1, ""]  # the last whole second _utc formatted, and its text


def _utc(created: float) -> str:
    """``2026-12-02T00:37:36.123Z``: readable, sortable, and in UTC on every machine."""
    second = int(created)
    if second != _last_second[0]:
        _last_second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_last_second[1]}.{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _utc(record.created),
            "t": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _ENCODE(out)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = _text_line(record.created, record.levelname, record.name, record.getMessage(),
                          {k: v for k, v in record.__dict__.items()
                           if k not in _STD and not k.startswith("_")})  # fmt: skip
        if record.exc_info:  # its lines stay lines; nothing else of it reaches a terminal raw
            line += "\n" + "\n".join(
                terminal_safe(part) for part in self.formatException(record.exc_info).split("\n")
            )
        return line


#: what a text log line never holds raw: C0/C1 controls, DEL, line and paragraph separators
#: (a forged line, or an escape sequence for the operator's terminal)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: a field value written bare (else quoted, JSON-style): no space, quote, '=' or control
_BARE = re.compile('[^\\s"=\x00-\x1f\x7f-\x9f\u2028\u2029]*\\Z')


def _escape(m: re.Match[str]) -> str:
    return f"\\u{ord(m.group()):04x}"


def terminal_safe(text: str) -> str:
    """``text`` with every control character (and line separator) as a ``\\uXXXX`` escape."""
    return _UNSAFE.sub(_escape, text)


def _text_value(v: Any) -> str:
    text = str(v)
    return text if _BARE.match(text) else json.dumps(text)


def _text_line(created: float, level: str, name: str, msg: str, fields: dict[str, Any]) -> str:
    """A text line that is one line, whatever it carries: controls in the message escaped,
    a field value with a space, quote or '=' quoted (so no value can pose as another field)."""
    t = time.strftime("%H:%M:%S", time.localtime(created))
    line = f"{t} {level:<7} {name}: {terminal_safe(msg)}"
    if fields:
        line += "  " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
    return line


class _RequestLines:
    """The end-of-request line written straight to the role's own handler: the same line
    JsonFormatter / TextFormatter would write, without a LogRecord and the logging
    machinery's per-record work (8-10 % of a role's CPU per small request, profiled). Used
    only while that handler is the only place the line goes (no other handler, filter or
    level in the way: a test's caplog, or an embedding application's handler, get records)."""

    def __init__(self, handler: logging.StreamHandler[Any], fmt: str) -> None:
        self.handler = handler
        self.json = fmt == "json"
        self.root = logging.getLogger()

    def usable(self) -> bool:
        handler = self.handler
        return (
            self.root.handlers == [handler]
            and not request_log.handlers
            and request_log.propagate
            and not request_log.filters
            and not self.root.filters
            and not handler.filters
            and handler.level <= logging.INFO
        )

    def write(self, fields: dict[str, Any]) -> None:
        now = time.time()  # wall clock
        if self.json:
            line = _ENCODE({"ts": _utc(now), "t": round(now, 3), "level": "info",
                            "logger": request_log.name, "msg": "request", **fields})  # fmt: skip
        else:
            line = _text_line(now, "INFO", request_log.name, "request", fields)
        handler = self.handler
        handler.acquire()
        try:
            handler.stream.write(line + "\n")
            handler.flush()
        finally:
            handler.release()


_direct: _RequestLines | None = None


def setup_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure the root logger once for a role process (idempotent). ``fmt`` "auto":
    readable text on a terminal, JSON lines otherwise (journald, files, pipes)."""
    stream = stream or sys.stderr
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        fmt = "text" if isatty is not None and isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_trio_bridge", False):
            root.removeHandler(h)
    handler._trio_bridge = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    global _direct
    _direct = _RequestLines(handler, fmt)
    root.setLevel(level.upper())
    # hypercorn's own info lines ("Running on ...") are noise next to ours
    logging.getLogger("hypercorn.error").setLevel(max(logging.WARNING, root.level))
    quiet_third_party_loggers()


def quiet_third_party_loggers() -> None:
    """httpx logs every request URL (query strings included, where users sometimes put keys)
    at INFO, and trio-websocket logs handshake details at DEBUG: keep them to warnings."""
    for noisy in ("httpx", "httpcore", "trio-websocket", "trio_websocket"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@attrs.define(slots=True)
class Facts:
    """What one role knows about one request, for its end-of-request log line, its metrics
    and (connector) its inspector entry: the same record in both roles. Times are
    ``trio.current_time()`` (a test's clock); the log line gets ``duration_ms`` and ``ttfb_ms``
    from them."""

    request_id: str
    method: str
    path: str
    started: float = attrs.field(factory=trio.current_time)
    route: str | None = None
    connector: str | None = None
    key_id: str | None = None
    model: str | None = None
    status: int | None = None
    outcome: str | None = None
    reset: str | None = None
    limit: str | None = None  # the key limit that refused it (connector)
    #: why the bridge answered an error itself (its message to the user, without the request)
    reason: str | None = None
    head_at: float | None = None  # when the response head went out
    ended: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def duration(self) -> float:
        return (self.ended or trio.current_time()) - self.started

    @property
    def ttfb(self) -> float | None:
        return None if self.head_at is None else self.head_at - self.started

    def line(self, role: str) -> dict[str, Any]:
        """The log line's fields (unset ones left out)."""
        path = self.path
        if len(path) > MAX_LOGGED:  # what came from outside is logged at a bounded length
            path = path[:MAX_LOGGED] + "…"
        out: dict[str, Any] = {"request_id": self.request_id, "method": self.method,
                               "path": path}  # fmt: skip
        for name in ("route", "connector", "key_id", "model", "status", "outcome", "reset",
                     "limit", "reason"):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                if type(value) is str and len(value) > 128:
                    value = value[:128] + "…"
                out[name] = value
        out["bytes_in"], out["bytes_out"] = self.bytes_in, self.bytes_out
        out["duration_ms"] = round(self.duration * 1000, 3)
        if (ttfb := self.ttfb) is not None:
            out["ttfb_ms"] = round(ttfb * 1000, 3)
        out["role"] = role
        return out


def log_request(role: str, facts: Facts) -> None:
    """The end-of-request line of one role (cheap when the level filters it out)."""
    if not request_log.isEnabledFor(logging.INFO):
        return
    fields = facts.line(role)
    direct = _direct
    if direct is not None and direct.usable():
        try:
            direct.write(fields)
            return
        except Exception:  # a broken stream: let logging report it its own way
            pass
    request_log.info("request", extra=fields)


# ---- metrics ---------------------------------------------------------------------------------

# Buckets that suit LLM traffic: a few ms (errors, cached answers) up to ten minutes (long
# generations).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFB_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)
MAX_LABEL_VALUES = 50  # per free-form label (model names): beyond, "other"


def bridge_outcome(status: int) -> str:
    """The outcome of an answer the bridge made itself: ``refused`` for the client's own
    errors (4xx: a bad key, a limit, a bad request), ``bridge_error`` for ours (5xx)."""
    return "refused" if status < 500 else "bridge_error"


def is_error(outcome: str, status: int | None) -> bool:
    """Counted in error rates (the same rule in both roles): a 5xx, or an answer that broke
    off; a refusal (4xx) or a client that left is not the bridge failing."""
    return outcome not in ("ok", "client_gone", "refused") or (status or 0) >= 500


def status_class(status: int | None) -> str:
    return f"{status // 100}xx" if status else "none"


_RESET_REASONS = {
    0: "none",
    1: "protocol",
    2: "internal",
    3: "client_gone",
    4: "refused",
    5: "timeout",
    6: "upstream_error",
    7: "protocol",
    8: "shutdown",
    9: "too_large",
    10: "relay_lost",
}


def reset_reason(code: int) -> str:
    """A bounded metric label for a reset code (see ``_frames.ResetCode``)."""
    return _RESET_REASONS.get(code, "other")


class Metrics:
    """Prometheus metrics of one role instance (its own registry: several roles can live in one
    process, as in tests). Label values are bounded: no paths, no secrets, no request ids."""

    def __init__(self, role: str) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series

        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "trio_bridge_requests",
            "Requests finished, by route, status class and outcome.",
            ["role", "route", "status_class", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "trio_bridge_request_duration_seconds",
            "Time from request to last response byte.",
            ["role", "route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "trio_bridge_time_to_first_byte_seconds",
            "Time from request to response head.",
            ["role", "route"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "trio_bridge_in_flight_requests", "Requests in flight.", ["role"], registry=r
        )
        self.bytes = Counter(
            "trio_bridge_body_bytes",
            "Body bytes: in = request bodies, out = response bodies.",
            ["role", "direction"],
            registry=r,
        )
        self.resets = Counter(
            "trio_bridge_resets",
            "Streams ended abnormally, by reason.",
            ["role", "reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "trio_bridge_auth_failures",
            "Refused API keys (connector) or connector tokens (broker).",
            ["role"],
            registry=r,
        )
        self.relays_refused = Counter(
            "trio_bridge_relays_refused",
            "Relay connections the broker refused, by reason (bad_token, rate_limited, "
            "route_not_allowed, bad_route, handshake).",
            ["role", "reason"],
            registry=r,
        )
        self.limit_hits = Counter(
            "trio_bridge_limit_hits",
            "Requests or connections refused or cut by a limit (head_timeout, body_rate, "
            "connections_per_address, header_bytes, uri, body, ...).",
            ["role", "limit"],
            registry=r,
        )
        self.relay_connected = Gauge(
            "trio_bridge_relay_connected",
            "1 while the relay to this broker is up (connector).",
            ["role", "broker"],
            registry=r,
        )
        self.relays = Gauge(
            "trio_bridge_relays",
            "Connector relays held, per route (broker).",
            ["role", "route"],
            registry=r,
        )
        self.reconnects = Counter(
            "trio_bridge_relay_reconnects",
            "Relays re-established after a loss (connector), per broker URL.",
            ["role", "broker"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "trio_bridge_queue_wait_seconds",
            "Time a request waited for a connector (broker).",
            ["role", "route"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.model_requests = Counter(
            "trio_bridge_model_requests",
            "Finished requests that named a model, by model and outcome.",
            ["role", "model", "outcome"],
            registry=r,
        )
        self.model_ttfb = Histogram(
            "trio_bridge_model_time_to_first_byte_seconds",
            "Time from request to response head, by model.",
            ["role", "model"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.key_queue_wait = Histogram(
            "trio_bridge_key_queue_wait_seconds",
            "Time a request waited for an LLM slot in the connector's fair queue, per API key id.",
            ["key_id"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.queued = Gauge(
            "trio_bridge_queued_requests",
            "Requests waiting for a connector (broker).",
            ["role"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "trio_bridge_upstream_up",
            "1 while the LLM answers its health probe (connector).",
            ["role"],
            registry=r,
        )
        self.tokens = Counter(
            "trio_bridge_llm_tokens",
            "Tokens reported by the LLM, per API key id and model.",
            ["key_id", "model", "kind"],
            registry=r,
        )
        self.ttft = Histogram(
            "trio_bridge_time_to_first_token_seconds",
            "Time to the first streamed chunk, by model (connector).",
            ["model"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.tps = Histogram(
            "trio_bridge_tokens_per_second",
            "Completion tokens per second of streamed answers, by model (connector).",
            ["model"],
            buckets=TPS_BUCKETS,
            registry=r,
        )
        self._models: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus_client validates the labels
        and takes a lock on every ``labels()`` call, a few µs each, several per request.
        Label values are bounded (see the class docstring), so is this cache."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def count_model(self, model: str | None, outcome: str, ttfb: float | None) -> None:
        """Per-model request count and time to first byte (model names capped: 50)."""
        if not model:
            return
        label = self.model_label(model)
        self.child(self.model_requests, self.role, label, outcome).inc()
        if ttfb is not None:
            self.child(self.model_ttfb, self.role, label).observe(ttfb)

    def model_label(self, model: str) -> str:
        model = model[:64]
        if model in self._models:
            return model
        if len(self._models) < MAX_LABEL_VALUES:
            self._models.add(model)
            return model
        return "other"

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


#: the admin page's picture of the last minutes: requests and errors per 10 s, 15 minutes
SERIES_STEP = 10.0
SERIES_LEN = 90


class RecentStats:
    """Requests of the last ``window`` seconds: count, error rate, latency percentiles; and
    requests and errors per ``step`` seconds over the last ``step`` × ``length`` seconds
    (:meth:`series`; fixed memory: ``length`` pairs of counts)."""

    def __init__(
        self,
        window: float = 300.0,
        maxlen: int = 20000,
        *,
        step: float = SERIES_STEP,
        length: int = SERIES_LEN,
    ) -> None:
        self.window = window
        self._items: deque[tuple[float, float, float | None, bool]] = deque(maxlen=maxlen)
        self._step = step
        #: a ring of [requests, errors] per step; slot ``i % length`` holds step ``i``
        self._buckets = [[0, 0] for _ in range(length)]
        self._newest: int | None = None  # the first request or view sets it

    def _advance(self, now: float) -> list[int]:
        """The bucket of ``now`` (buckets of steps since the newest one emptied first)."""
        step = int(now // self._step)
        ring = self._buckets
        if self._newest is None:
            self._newest = step
        elif step > self._newest:
            for i in range(self._newest + 1, min(step, self._newest + len(ring)) + 1):
                ring[i % len(ring)] = [0, 0]
            self._newest = step
        return ring[step % len(ring)]

    def add(self, duration: float, ttfb: float | None, error: bool) -> None:
        now = trio.current_time()
        self._items.append((now, duration, ttfb, error))
        bucket = self._advance(now)
        bucket[0] += 1
        bucket[1] += error

    def series(self) -> dict[str, Any]:
        """Requests and errors per step, oldest first; ``end``: the Unix time the newest step
        ends at (it is the one in progress)."""
        now = trio.current_time()
        self._advance(now)
        ring, newest = self._buckets, self._newest
        assert newest is not None
        steps = [ring[i % len(ring)] for i in range(newest - len(ring) + 1, newest + 1)]
        return {
            "step_s": self._step,
            "end": time.time() + ((newest + 1) * self._step - now),  # wall clock
            "requests": [b[0] for b in steps],
            "errors": [b[1] for b in steps],
        }

    def summary(self) -> dict[str, Any]:
        cutoff = trio.current_time() - self.window
        items = [i for i in self._items if i[0] >= cutoff]
        durations = sorted(i[1] for i in items)
        ttfbs = sorted(i[2] for i in items if i[2] is not None)
        errors = sum(1 for i in items if i[3])

        def pcts(values: list[float]) -> dict[str, float | None]:
            def p(q: float) -> float | None:
                if not values:
                    return None
                return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)

            return {"p50_ms": p(0.50), "p95_ms": p(0.95), "p99_ms": p(0.99)}

        return {
            "window_s": self.window,
            "requests": len(items),
            "errors": errors,
            "error_rate": round(errors / len(items), 4) if items else 0.0,
            "latency": pcts(durations),
            "time_to_first_byte": pcts(ttfbs),
        }

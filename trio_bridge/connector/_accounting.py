"""Where a relayed request's end is written down: metrics, recent stats, the inspector, the
usage store, the in-memory token counters and the log line; all in :meth:`Accounting.ended`,
once per request (plus the answer's token metrics when an answer completes)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from trio_bridge._observe import (
    Metrics,
    RecentStats,
    is_error,
    log_request,
    reset_reason,
    status_class,
)
from trio_bridge.accounts._usagestore import UsageBook
from trio_bridge.admin._inspect import Inspector
from trio_bridge.http._messages import ModelUnknown, declared_model
from trio_bridge.relay._frames import ResetCode

if TYPE_CHECKING:
    from trio_bridge.connector._request import RelayedRequest

#: request bodies up to this size are read for their "model" when the answer names none
_MODEL_SCAN_LIMIT = 256 * 1024
_CANCEL_OUTCOME: dict[int, str] = {
    ResetCode.CANCEL: "client_gone",
    ResetCode.RELAY_LOST: "relay_lost",
}


def model_named(body: bytes) -> str | None:
    """The ``"model"`` a request body names, for accounting only (the inspector, usage, the
    log line), when the LLM's answer named none (an error answer, say); None if it cannot be
    read with certainty or the body is large (parsing it is not worth its CPU here)."""
    if len(body) > _MODEL_SCAN_LIMIT:
        return None
    try:
        return declared_model(body, None)
    except ModelUnknown:
        return None


class Accounting:
    """The connector's books: ``usage`` holds tokens per key id and model since the start
    (``[prompt, completion]``), for ``status`` when there is no usage store."""

    def __init__(
        self,
        route: str,
        metrics: Metrics,
        inspector: Inspector,
        usage_store: UsageBook | None,
    ) -> None:
        self.route = route
        self.metrics = metrics
        self.inspector = inspector
        self.usage_store = usage_store
        self.stats = RecentStats()
        self.usage: dict[str, dict[str, list[int]]] = {}

    def limit_hit(self, limit: str) -> None:
        self.metrics.limit_hits.labels("connector", limit).inc()

    def waited(self, key_id: str, seconds: float) -> None:
        """A request of ``key_id`` waited ``seconds`` in the fair queue."""
        self.metrics.child(self.metrics.key_queue_wait, key_id).observe(seconds)

    def answer_counted(self, req: RelayedRequest) -> None:
        """An answer ended whole: its tokens (as the LLM reported them) and its pace."""
        sniffer = req.sniffer
        assert sniffer is not None
        sniffer.finish()
        m, key_id = self.metrics, req.key_id
        p, c = sniffer.prompt_tokens, sniffer.completion_tokens
        req.model = req.model or sniffer.model
        if req.model:
            req.facts.model = req.model
        model = m.model_label(sniffer.model or req.model or "unknown")
        if p is not None and c is not None:
            m.child(m.tokens, key_id, model, "prompt").inc(p)
            m.child(m.tokens, key_id, model, "completion").inc(c)
            counts = self.usage.setdefault(key_id, {}).setdefault(model, [0, 0])
            counts[0] += p
            counts[1] += c
        first, last = req.first_chunk, req.last_chunk
        if sniffer.streamed and first is not None:
            m.child(m.ttft, model).observe(first - req.facts.started)
            # without usage in the stream, its events stand for tokens (one per event)
            n = c if c is not None else sniffer.events
            if n > 1 and last is not None and last > first:
                m.child(m.tps, model).observe(n / (last - first))

    def ended(self, req: RelayedRequest) -> None:
        """The request ended (answered, refused, reset or cancelled): write it down."""
        facts, stream = req.facts, req.stream
        reset = stream.reset_error
        if facts.outcome is None:
            code = reset.code if reset is not None else -1
            facts.outcome = _CANCEL_OUTCOME.get(code, "cancelled")
        facts.ended = trio.current_time()
        facts.bytes_in, facts.bytes_out = stream.bytes_received, stream.bytes_sent
        reset_code = None
        if reset is not None and reset.code != ResetCode.NO_ERROR:
            facts.reset = reset.reason
            reset_code = reset.code
        prompt, completion, estimated = req.tokens()
        if req.model is None and req.body:  # the answer named none (e.g. an LLM's error)
            req.model = model_named(req.body)
            if req.model is not None:
                facts.model = facts.model or req.model
        req.body = None
        if req.counted and self.usage_store is not None:
            self.usage_store.record(
                req.key_id,
                req.model or "unknown",
                prompt=prompt,
                completion=completion,
                estimated=estimated,
                error=is_error(facts.outcome, facts.status),
                refused=facts.outcome == "refused",
                now=time.time(),  # wall clock
            )
        self._metrics(req, reset_code)
        self._inspected(req, prompt, completion, estimated)
        if facts.limit != "key_failures":  # those are summed up per relay instead
            log_request("connector", facts)

    def _metrics(self, req: RelayedRequest, reset_code: int | None) -> None:
        m, route, facts = self.metrics, self.route, req.facts
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
        self.stats.add(duration, ttfb, is_error(outcome, status))
        m.count_model(facts.model, outcome, ttfb)

    def _inspected(
        self, req: RelayedRequest, prompt: int, completion: int, estimated: bool
    ) -> None:
        """The end of a request, for the inspector (cheap: a few attribute copies)."""
        rec, facts = req.rec, req.facts
        if prompt or completion:
            rec.prompt_tokens, rec.completion_tokens = prompt, completion
            rec.tokens_estimated = estimated
            first, last = req.first_chunk, req.last_chunk
            if first is not None and last is not None:
                rec.first_chunk_ms = round((first - facts.started) * 1000, 3)
                if completion > 1 and last > first:
                    rec.tokens_per_second = round(completion / (last - first), 1)
        rec.status = facts.status
        rec.outcome = facts.outcome or ""
        rec.reset = facts.reset or ""
        rec.model = req.model or rec.model or facts.model or ""
        rec.duration_ms = round(facts.duration * 1000, 3)
        ttfb = facts.ttfb
        rec.ttfb_ms = None if ttfb is None else round(ttfb * 1000, 3)
        rec.bytes_in, rec.bytes_out = facts.bytes_in, facts.bytes_out
        self.inspector.finish(rec)

    def tokens_status(self) -> dict[str, Any]:
        """Tokens per key and model since the start, for ``status``."""
        return {
            key: {model: {"prompt": p, "completion": c} for model, (p, c) in models.items()}
            for key, models in self.usage.items()
        }

"""One relayed request on the connector, start to end: :meth:`RelayedRequest.run`.

It runs in its stream's own cancel scope (see ``relay/_relay.py``), which also holds the call to
the LLM: when the broker resets the stream (client gone) or the relay is lost, the scope is
cancelled and the upstream connection closed, so the LLM stops generating.

Each check either lets the request go on or gives the :class:`Refusal` that answers it;
:meth:`RelayedRequest._serve` reads top to bottom. What a request holds (the key's
counters, body bytes in its relay's budget, an LLM slot) is released in one place, at its end.

httpx exceptions are mapped here and only here: before the response head they become an
OpenAI-shaped 502 (LLM unreachable or broken) or 504 (no first byte in time); after it, a
RESET (UPSTREAM_ERROR or TIMEOUT) that makes the broker abort the client's response.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import attrs
import httpx
import trio

from trio_bridge._errors import QueueFull, StreamReset
from trio_bridge._observe import Facts, bridge_outcome
from trio_bridge.accounts._keys import SecretEntry, budget
from trio_bridge.accounts._limits import KeyLimits, ratelimit_headers
from trio_bridge.accounts._pool import STORE_DOWN, Admission
from trio_bridge.accounts._usage import UsageSniffer
from trio_bridge.admin._inspect import Inspector, RequestRecord, scrub
from trio_bridge.connector._body import (
    WHOLE_BEFORE_SLOT,
    BodyChunks,
    BodyRefused,
    RelayGuard,
    TooLarge,
    read_start,
    read_whole,
)
from trio_bridge.connector._selfservice import USAGE_PATH, answer_usage
from trio_bridge.http._messages import (
    REQUEST_ID,
    ModelUnknown,
    declared_model,
    error_response,
    header,
    presented_key,
    strip_hop_by_hop,
)
from trio_bridge.http._target import BadTarget, check_method
from trio_bridge.http._upstream import close_response
from trio_bridge.relay._frames import ResetCode
from trio_bridge.relay._protocol import ResponseHead
from trio_bridge.relay._relay import RelayStream

if TYPE_CHECKING:
    from trio_bridge.connector._forwarder import Forwarder

_DROP_DOWNSTREAM = frozenset({REQUEST_ID})
#: the outcome of an answer of the LLM's own with a 5xx status (relayed as it was)
LLM_ERROR = "llm_error"
#: the outcome of a request handed back to the broker because the LLM could not be reached
LLM_UNREACHABLE = "llm_unreachable"
_NO_LIMITS = KeyLimits()
Content = bytes | AsyncIterator[bytes]


@attrs.frozen
class Refusal:
    """How a request is answered when a check stops it: an OpenAI-shaped error."""

    status: int
    message: str
    retry_after: int | None = None
    code: str | None = None
    extra: list[tuple[bytes, bytes]] | None = None


class RelayedRequest:
    """One request from a broker: its stream, what it holds, and what it used.

    Cancellation: the stream's scope; whatever it holds is released by :meth:`run`'s end.
    """

    __slots__ = (
        "admitted",
        "body",
        "budget",
        "counted",
        "facts",
        "first_byte_by",
        "first_chunk",
        "fw",
        "guard",
        "head",
        "held",
        "key_id",
        "last_chunk",
        "limits",
        "model",
        "pooled",
        "rec",
        "slot",
        "sniffer",
        "stream",
    )

    def __init__(self, fw: Forwarder, stream: RelayStream, guard: RelayGuard) -> None:
        head = stream.request_head
        assert head is not None
        self.fw, self.stream, self.guard, self.head = fw, stream, guard, head
        self.facts = facts = Facts(head.request_id, head.method, head.target.split("?", 1)[0])
        facts.route = fw.route
        self.rec = fw.inspector.start(head.request_id, head.method, facts.path)
        self.key_id = ""
        #: what its key's limits and memory share count under (:func:`budget`: the name)
        self.budget = ""
        self.limits = _NO_LIMITS
        #: in the usage store when it ends (a valid key; not ``/_bridge/usage``)
        self.counted = False
        #: what it holds, released at its end
        self.admitted = False
        #: the pool's answer (a pooled admission); None: this connector's own limiter
        self.pooled: Admission | None = None
        self.held = 0
        self.slot = False
        self.first_byte_by = 0.0
        self.model: str | None = None
        #: the whole request body, when it was read whole (its "model", if the answer names none)
        self.body: bytes | None = None
        self.sniffer: UsageSniffer | None = None
        self.first_chunk: float | None = None
        self.last_chunk: float | None = None

    async def run(self) -> None:
        """Serve the request, then release what it holds and account for it."""
        try:
            self.facts.outcome = await self._serve()
        finally:
            self._release()
            self.fw.accounting.ended(self)

    async def _serve(self) -> str:
        """Key → limits → body → LLM slot → LLM → answer: the outcome. Each check either
        lets the request go on or gives the :class:`Refusal` that is its answer."""
        entry = self._check_key()
        if isinstance(entry, Refusal):
            return await self.answer(entry)
        if self.facts.path == USAGE_PATH:  # answered here, not by the LLM
            return await answer_usage(self, entry)
        self.counted = True  # whatever the answer, a request of this key in its usage
        url = self._check_target()
        if isinstance(url, Refusal):
            return await self.answer(url)
        refusal = (  # before anything of the body
            self.admit(self.limits, self.limits)
            if self.fw.pool is None
            else await self.admit_pooled()
        )
        if refusal is not None:
            return await self.answer(refusal)
        content = await self._take_body()
        if isinstance(content, Refusal):
            return await self.answer(content)
        if refusal := await self._take_slot():
            return await self.answer(refusal)
        return await self._call_llm(url, content)

    # -- the steps, in order --
    def _check_key(self) -> SecretEntry | Refusal:
        fw, head = self.fw, self.head
        if fw.pool is not None and (down := fw.pool.keys_unavailable()) is not None:
            # the pool's keys were never read: no key can be checked, and a 401 would tell a
            # good key it is unknown
            self.facts.limit = down.limit
            fw.accounting.limit_hit(down.limit)
            return Refusal(503, down.message, down.retry_after, code=down.limit)
        presented = presented_key(head.headers)
        entry = fw.keys.lookup(presented) if presented is not None else None
        if entry is None:
            if not self.guard.key_failed(trio.current_time()):
                self.facts.limit = "key_failures"
                fw.accounting.limit_hit("key_failures")
                return Refusal(429, "too many failed key checks; retry later", retry_after=5)
            return Refusal(401, "missing API key" if presented is None else "invalid API key")
        self.key_id = self.facts.key_id = entry.id
        self.budget = budget(entry)
        rec = self.rec
        rec.key_id, rec.key_name = entry.id, entry.name
        if entry.revoked:
            return Refusal(
                401,
                f"this API key was revoked at {entry.revoked}; ask the operator for a new one",
                code="key_revoked",
            )
        if entry.expired():
            if entry.replaced:
                why = (
                    f"this API key was replaced by a new one at {entry.replaced} and stopped "
                    f"working at {entry.expires}; use the new key"
                )
            else:
                why = (
                    f"this API key expired at {entry.expires}; ask the operator to extend it "
                    "or for a new one"
                )
            return Refusal(401, why, code="key_expired")
        rec.request_headers = scrub(head.headers)
        self.limits = fw.keys.limits_for(entry)
        return entry

    def _check_target(self) -> httpx.URL | Refusal:
        """The LLM's URL for this request: the one rule for what may reach the LLM (the
        broker's word is not taken), and a declared length within max_body."""
        try:
            check_method(self.head.method, self.fw.methods)
            url = self.fw.url_for(self.head.target)
        except BadTarget as exc:
            return Refusal(exc.status, str(exc))
        declared = header(self.head.headers, b"content-length")
        if declared is not None and (
            not declared.isdigit() or int(declared) > self.fw.body_rules.max_body
        ):
            return Refusal(413, "request body too large")
        return url

    def admit(self, limits: KeyLimits, shown: KeyLimits) -> Refusal | None:
        """Count the request in under the key's ``limits``, or the 429 (rate-limit headers
        from ``shown``)."""
        limiter = self.fw.limiter
        now = trio.current_time()
        refusal = limiter.admit(self.budget, limits, now, wall=time.time())  # wall clock
        if refusal is None:
            self.admitted = True
            return None
        self.facts.limit = refusal.limit
        self.fw.accounting.limit_hit(refusal.limit)
        return Refusal(
            429,
            refusal.message,
            retry_after=refusal.retry_after,
            extra=limiter.headers(self.budget, shown, now),
        )

    async def admit_pooled(self, limits: KeyLimits | None = None) -> Refusal | None:
        """:meth:`admit` in the pool's shared store (one round trip), under ``limits`` (the
        key's by default): the 429 of a limit of the pool, or the 503 of a store that cannot
        be reached with on_store_failure = "closed"."""
        pool = self.fw.pool
        assert pool is not None
        self.pooled = decision = await pool.admit(self.budget, limits or self.limits)
        refusal = decision.refusal
        if refusal is None:
            self.admitted = True
            return None
        self.facts.limit = refusal.limit
        self.fw.accounting.limit_hit(refusal.limit)
        if refusal.limit == STORE_DOWN:
            return Refusal(503, refusal.message, refusal.retry_after, code=STORE_DOWN)
        return Refusal(429, refusal.message, refusal.retry_after, extra=self._pooled_headers())

    def _pooled_headers(self) -> list[tuple[bytes, bytes]]:
        """The rate-limit headers of a pooled admission (as the store counted them)."""
        d = self.pooled
        if d is None or not d.shared:
            return self.fw.limiter.headers(self.budget, self.limits, trio.current_time())
        return ratelimit_headers(self.limits, d.requests, d.tokens)

    async def _take_body(self) -> Content | Refusal:
        """The body to send on: read whole when it is all here, when it declares at most
        WHOLE_BEFORE_SLOT bytes (every chat request: a body that crawls in then holds no LLM
        slot meanwhile) or the key has a model allowlist (which needs the "model" before
        anything is sent), else streamed as it comes (an upload; one of unknown length once
        its first WHOLE_BEFORE_SLOT bytes are here: read whole if it ends before). Refused:
        413 / 408 / 429 / 503 (:class:`BodyRefused`), 400 (no readable model) and 403 (a
        model the key may not use)."""
        stream, limits = self.stream, self.limits
        content: Content
        declared = header(self.head.headers, b"content-length")  # digits: _check_target
        if (
            stream.recv_done
            or limits.models
            or (declared is not None and int(declared) <= WHOLE_BEFORE_SLOT)
        ):
            try:
                content = await read_whole(stream, self.fw.body_rules, self.guard, self.budget)
            except BodyRefused as exc:
                return Refusal(exc.status, exc.message)  # noqa: ASYNC910  raised from a read
            self.held = len(content)  # given back at the end
            self.body = content
            if limits.models:
                model = self._allowed_model(content)
                if isinstance(model, Refusal):
                    self._give_back()  # refused: nothing is held for it
                    return model
                self.model = model
        elif declared is None:  # chunked: its first WHOLE_BEFORE_SLOT bytes before the slot
            try:
                start = await read_start(
                    stream, self.fw.body_rules, self.guard, self.budget, WHOLE_BEFORE_SLOT
                )
            except BodyRefused as exc:
                return Refusal(exc.status, exc.message)  # noqa: ASYNC910  raised from a read
            self.held = len(start if isinstance(start, bytes) else start.first)
            if isinstance(start, bytes):
                self.body = start
            content = start
        else:
            content = BodyChunks(stream, self.fw.body_rules)
        if self.fw.inspector.capture_bodies:
            content = self._captured(content)
        return content  # noqa: ASYNC910  all here already: the LLM call right after awaits

    def _allowed_model(self, body: bytes) -> str | Refusal | None:
        limits = self.limits
        try:
            model = declared_model(body, header(self.head.headers, b"content-encoding"))
        except ModelUnknown as exc:
            return Refusal(400, str(exc), code="model_unknown")
        if not limits.allows_model(model):
            return Refusal(
                403,
                f"this API key may not use model {str(model)[:128]!r} (allowed: "
                f"{', '.join(limits.models)})",
                code="model_not_allowed",
            )
        return model

    async def _take_slot(self) -> Refusal | None:
        """An LLM slot (fairly, by key); one deadline for the wait in the queue and the LLM's
        first byte together. Refused: 429 (queue full) or 504 (no slot in time)."""
        fw = self.fw
        self.first_byte_by = trio.current_time() + fw.first_byte_timeout
        if fw.slots.try_acquire():  # a free slot (the usual case): no scope, no wait
            self.slot = True
            self.rec.queue_wait_ms = 0.0
            return None  # noqa: ASYNC910  a free slot: the LLM call right after awaits
        queued_at = trio.current_time()
        try:
            with trio.fail_at(self.first_byte_by):
                await fw.slots.acquire(self.key_id, self.limits.priority)
        except QueueFull:
            fw.accounting.limit_hit("queue")
            return Refusal(429, "the LLM is busy and its queue is full; retry shortly", 1)  # noqa: ASYNC910  raised from the wait
        except trio.TooSlowError:
            return Refusal(504, "the LLM did not start answering in time (queued)")  # noqa: ASYNC910  the wait ran out
        self.slot = True
        self.rec.queue_wait_ms = round((trio.current_time() - queued_at) * 1000, 3)
        return None

    async def _call_llm(self, url: httpx.URL, content: Content) -> str:
        """Send the request to the LLM and stream its answer back. The LLM slot is held for
        the LLM's work only: until its answer ends, or until it fails to give one (the error
        is answered after the slot is free: a broker that takes no answer never pins one)."""
        request = self.fw.llm_request(self.head, url, content, self.rec)
        failure: BaseException | None = None
        try:
            with trio.CancelScope(deadline=self.first_byte_by) as first_byte:
                response = await self.fw.transport.send(*request)
        except (BodyRefused, httpx.HTTPError) as exc:
            failure = exc
        if failure is None and first_byte.cancelled_caught:
            failure = trio.TooSlowError()
        if failure is not None:
            self._free_slot()
            return await self._no_answer(failure)
        try:
            return await self._answer(response)
        finally:
            self._free_slot()

    async def _no_answer(self, exc: BaseException) -> str:
        """The LLM gave no response head: say why in an OpenAI-shaped error."""
        if isinstance(exc, trio.TooSlowError):
            return await self.reply_error(504, "the LLM did not start answering in time")
        if isinstance(exc, BodyRefused):  # part of the body may have gone: no answer fits
            self.stream.reset(exc.code, exc.message)
            return "too_large" if isinstance(exc, TooLarge) else "refused"  # noqa: ASYNC910  the LLM call raised after reading part of the body
        if isinstance(exc, httpx.ConnectError):
            self.fw.llm.failed(f"ConnectError: {exc}")  # the brokers hear it first (STATUS)
            if self.body is not None:
                # Nothing reached any LLM and the broker holds the whole body: REFUSED lets
                # it take the request to another connector of the route (or say none is
                # ready), instead of a 502 from this one.
                self.facts.reason = "the LLM server is unreachable"
                self.stream.reset(ResetCode.REFUSED, "the LLM server is unreachable")
                await trio.lowlevel.checkpoint()
                return LLM_UNREACHABLE
            return await self.reply_error(502, "the LLM server is unreachable")
        if isinstance(exc, httpx.TimeoutException):
            return await self.reply_error(502, "connecting to the LLM timed out")
        return await self.reply_error(502, f"the LLM server failed: {type(exc).__name__}")

    async def _answer(self, response: httpx.Response) -> str:
        """Stream the LLM's answer back, as it comes."""
        fw, stream, facts = self.fw, self.stream, self.facts
        facts.status = response.status_code
        facts.head_at = trio.current_time()
        try:
            raw_headers = response.headers.raw
            headers = strip_hop_by_hop(raw_headers, also=_DROP_DOWNSTREAM)
            headers.append((REQUEST_ID, self.head.request_id.encode()))
            if self.limits.rpm is not None or self.limits.tokens_per_minute is not None:
                headers += (
                    fw.limiter.headers(self.budget, self.limits, trio.current_time())
                    if self.pooled is None
                    else self._pooled_headers()
                )
            await stream.send_response(ResponseHead(response.status_code, headers))
            self.rec.response_headers = scrub(headers)
            self.sniffer = sniffer = UsageSniffer(
                header(raw_headers, b"content-type"), header(raw_headers, b"content-encoding")
            )
            outcome = await self._pump(response)
            if outcome != "ok":
                return outcome
            await stream.end()
            if sniffer.active:
                fw.accounting.answer_counted(self)
            # relayed as it was: the LLM's own error is an error in every view
            return LLM_ERROR if response.status_code >= 500 else "ok"
        except httpx.HTTPError as exc:
            stream.reset(
                ResetCode.UPSTREAM_ERROR, f"the LLM failed mid-response: {type(exc).__name__}"
            )
            return "upstream_error"  # noqa: ASYNC910  the LLM failed mid-answer: it was read from (awaited)
        except StreamReset as exc:
            return "client_gone" if exc.code == ResetCode.CANCEL else "reset"  # noqa: ASYNC910  the reset came while sending (awaited)
        finally:
            await close_response(response)

    async def _pump(self, response: httpx.Response) -> str:
        """The answer's chunks from the LLM into the stream ("ok" at its end)."""
        # raw bytes as the LLM sent them (what aiter_raw gives, minus its per-chunk wrapper)
        chunks = aiter(response.stream)  # type: ignore[arg-type]
        fw, stream = self.fw, self.stream
        idle, stall = fw.idle_timeout, fw.stall_timeout
        assert self.sniffer is not None
        sniff = self.sniffer.feed if self.sniffer.active else None
        capture = self.rec if fw.inspector.capture_bodies else None
        # One scope for the whole answer, its deadline moved per phase (cheaper than two new
        # scopes per chunk): reading from the LLM is bounded by idle_timeout, waiting for the
        # relay to take a chunk (credit from a slow client) by stall_timeout. While reading,
        # the deadline moves only once it is 1 % (at most a second) short of idle_timeout: a
        # token every few ms does not move it each time, and it never fires early.
        slack = min(idle / 100, 1.0)
        reading = False  # the first turn sets the deadline
        with trio.CancelScope() as deadline:  # noqa: ASYNC912  every turn awaits the LLM's next chunk
            while True:
                now = trio.current_time()
                if not reading or deadline.deadline < now + idle:
                    deadline.deadline = now + idle + slack
                reading = True
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                self.last_chunk = trio.current_time()
                if self.first_chunk is None:
                    self.first_chunk = self.last_chunk
                if sniff is not None:
                    sniff(chunk)
                if not chunk:
                    continue
                if capture is not None and not capture.response_truncated:
                    capture.response_body, capture.response_truncated = fw.inspector.capture(
                        chunk, capture.response_body
                    )
                if not stream.can_send(len(chunk)):
                    deadline.deadline = trio.current_time() + stall
                    reading = False
                await stream.send_data(chunk)
        if deadline.cancelled_caught:
            if reading:
                stream.reset(ResetCode.TIMEOUT, "the LLM stalled (idle timeout)")
                return "idle_timeout"  # noqa: ASYNC910  reached after awaiting the LLM's chunks
            stream.reset(ResetCode.TIMEOUT, "the client stopped reading (stall timeout)")
            return "client_stalled"  # noqa: ASYNC910  reached after awaiting the LLM's chunks
        return "ok"  # noqa: ASYNC910  reached after awaiting the LLM's chunks

    # -- answers the connector makes itself --
    async def answer(self, refusal: Refusal) -> str:
        """Answer with a bridge-made error: its outcome."""
        return await self.reply_error(
            refusal.status,
            refusal.message,
            retry_after=refusal.retry_after,
            code=refusal.code,
            extra=refusal.extra,
        )

    async def reply_error(
        self,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        code: str | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> str:
        """Answer with a bridge-made error; its outcome. The message is the log line's
        ``reason`` too."""
        self.facts.status = status
        self.facts.reason = message
        _, headers, body = error_response(
            status, message, self.facts.request_id, retry_after=retry_after, code=code
        )
        if not await self.send_whole(ResponseHead(status, headers + (extra or [])), body):
            return "client_stalled"
        return bridge_outcome(status)

    async def send_whole(self, head: ResponseHead, body: bytes) -> bool:
        """Send an answer the connector made itself; a broker that takes no part of it within
        ``stall_timeout`` gets the stream reset instead (False): nothing waits on it for ever."""
        stream = self.stream
        with trio.move_on_after(self.fw.stall_timeout) as stalled:
            await stream.send_response(head)
            await stream.send_data(body, end_stream=True)
        if stalled.cancelled_caught:
            stream.reset(ResetCode.TIMEOUT, "the broker took no answer (stall timeout)")
            return False
        return True

    # -- what it holds --
    def _captured(self, content: Content) -> Content:
        """Keep (the start of) the request body for the inspector; the body sent is unchanged."""
        rec, inspector = self.rec, self.fw.inspector
        if isinstance(content, bytes):
            rec.request_body, rec.request_truncated = inspector.capture(content, None)
            return content
        rec.request_body = b""
        return _Tee(content, rec, inspector)

    def _give_back(self) -> None:
        self.guard.give(self.held, self.budget)
        self.held = 0

    def _free_slot(self) -> None:
        if self.slot:
            self.slot = False
            self.fw.slots.release()

    def tokens(self) -> tuple[int, int, bool]:
        """(prompt, completion, estimated): as the LLM reported them; else estimated: one
        completion token per streamed event, prompt = request bytes / 4."""
        s = self.sniffer
        if s is not None and s.prompt_tokens is not None and s.completion_tokens is not None:
            return s.prompt_tokens, s.completion_tokens, False
        if s is None or not s.streamed:
            return 0, 0, False  # no answer, or one that is not a generation (e.g. /v1/models)
        return self.stream.bytes_received // 4, s.events, True

    def _release(self) -> None:
        """Give back what the request holds: its LLM slot, its body bytes, its place in the
        key's counters (with the tokens it used)."""
        self._free_slot()
        self._give_back()
        if self.admitted:
            self.admitted = False
            prompt, completion, _ = self.tokens()
            if self.pooled is not None:
                assert self.fw.pool is not None
                self.fw.pool.finish(self.budget, prompt + completion, shared=self.pooled.shared)
                return
            self.fw.limiter.finish(
                self.budget,
                prompt + completion,
                trio.current_time(),
                wall=time.time(),  # wall clock
            )


class _Tee:
    """A streamed request body as it goes to the LLM, its start kept for the inspector."""

    __slots__ = ("chunks", "inspector", "rec")

    def __init__(
        self, chunks: AsyncIterator[bytes], rec: RequestRecord, inspector: Inspector
    ) -> None:
        self.chunks, self.rec, self.inspector = chunks, rec, inspector

    def __aiter__(self) -> _Tee:
        return self

    async def __anext__(self) -> bytes:
        chunk = await anext(self.chunks)
        rec = self.rec
        if not rec.request_truncated:
            rec.request_body, rec.request_truncated = self.inspector.capture(
                chunk, rec.request_body
            )
        return chunk

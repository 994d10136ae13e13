"""One public request, one object: an :class:`Exchange` sends a request through a relay to a
connector of its route and relays the answer back, inside its own scope (its nursery). What
all requests share (settings, the registry, metrics, who is in flight) is one
:class:`~trio_bridge.broker._exchanges.Exchanges`.

    client ──▶ Exchange.run: check the head → route and model → a connector (waiting up to
               queue_timeout) → the request on a relay stream
                 ├─ task: pump the rest of the body into the stream, then watch for the
                 │        client going away
                 └─ main: response head → chunks → client, as they arrive
               → account: metrics, the request's log line

Cancellation: a client disconnect resets the stream (CANCEL); the connector then cancels its
upstream call. A stream reset after the response head aborts the client's response (the
connection is closed without a terminating chunk), so a truncated answer never looks complete.
A broker that stops (:meth:`Exchange.abort`) cancels the request's scope with the reason; the
client gets 503 if nothing was sent yet, else the answer stops short; the stream is reset
(SHUTDOWN).

Error handling: every failure ends as the request's outcome (its log line and metrics), none
reaches the server: ``refused`` / ``bridge_error`` (an answer the broker made), ``client_gone``,
``aborted`` (cut after the head), ``bad_answer`` (the connector's answer could not be sent as
HTTP/1.1: a 502 if nothing went out yet).
"""

from __future__ import annotations

import logging

import trio

from trio_bridge._errors import (
    BadBody,
    ClientDisconnected,
    HeadTooLarge,
    RelayClosed,
    StreamReset,
    UnsendableAnswer,
)
from trio_bridge._observe import Facts, bridge_outcome, log_request
from trio_bridge.broker._exchanges import Exchanges
from trio_bridge.broker._registry import DEFAULT_ROUTE
from trio_bridge.broker._rules import (
    Refusal,
    head_refusal,
    model_list_answer,
    model_not_found,
    route_of,
    with_length,
)
from trio_bridge.http._messages import MODEL_LISTS, error_response, request_id_from, with_model
from trio_bridge.http._server import Request
from trio_bridge.http._target import DEFAULT_METHODS, BadTarget, check_target
from trio_bridge.relay._frames import MAX_PAYLOAD, ResetCode
from trio_bridge.relay._protocol import RequestHead, ResponseHead
from trio_bridge.relay._relay import RelayStream

#: the outcome of a 5xx answer relayed from a connector
UPSTREAM_ERROR = "upstream_error"
#: outcomes that count against a connector's health (with its 502/504 resets)
_FAILED = frozenset({UPSTREAM_ERROR, "bad_answer"})


def _is_portal(target: str) -> bool:
    """A request for a connector's self-service portal (``/_bridge/portal/``, issue 28): its
    5xx pages (the identity provider down or slow) are no failure of the connector's LLM,
    so they never count toward ejecting it (anyone may ask for them)."""
    path = target.split("?", 1)[0]
    return path == "/_bridge/portal" or path.startswith("/_bridge/portal/")


log = logging.getLogger("trio_bridge.broker")

MAX_ATTEMPTS = 3
#: what _respond returns when the connector REFUSED the stream (never processed: try another)
_RETRY = "retry elsewhere"
#: what _respond returns when a fallback model may be tried (nothing reached the client)
_FALLBACK = "fall back"
_INITIAL_BODY = MAX_PAYLOAD  # bodies up to this size travel with the head in one message
WATCH_AFTER = 0.02  # watch for client disconnects once an answer takes longer than this
_RESET_STATUS = {
    ResetCode.TIMEOUT: (504, "the LLM did not answer in time"),
    ResetCode.TOO_LARGE: (413, "request body too large"),
    ResetCode.REFUSED: (503, "the connector refused the request; retry"),
    ResetCode.SHUTDOWN: (503, "the connector is shutting down; retry"),
    ResetCode.RELAY_LOST: (502, "the connection to the LLM's connector was lost"),
}


class Exchange:
    """One public request relayed to a connector: :meth:`run` tells its story top to bottom.

    Two tasks at most share it, in its nursery (the request scope): the main one (head, the
    connector, the answer) and, once the body outlasts the first relay message or the answer
    takes a while, the reader (the rest of the body, then the client going away).
    """

    __slots__ = (
        "bad_body",
        "body_done",
        "body_size",
        "client_gone",
        "facts",
        "merge_models",
        "nursery",
        "queued",
        "reader_started",
        "req",
        "request_id",
        "shutdown",
        "stream",
        "svc",
        "too_large",
    )

    def __init__(self, svc: Exchanges, req: Request) -> None:
        self.svc = svc
        self.req = req
        self.request_id = request_id_from(req.headers)
        self.facts = Facts(self.request_id, req.method, req.path)
        self.nursery: trio.Nursery | None = None
        self.stream: RelayStream | None = None
        self.body_size = 0
        self.body_done = req.body_done
        self.reader_started = False  # the task reading the rest of the body / watching
        #: the wait in the route's queue, while there is one (a client that leaves ends it)
        self.queued: trio.CancelScope | None = None
        self.client_gone = False
        self.bad_body = ""
        self.too_large = False
        self.merge_models = False  # answer /v1/models with the route's merged list
        self.shutdown = ""  # why the broker aborted it (see abort)

    async def run(self) -> None:
        """The request's story: check its head → its route and model → a connector with
        room → the request on a relay stream → the answer to the client → account for it
        (metrics, recent figures, the request's log line).

        Error handling: every failure becomes the request's outcome; only
        ClientDisconnected (an answer written to a client that left) reaches the server,
        which then closes the connection.
        Cancellation: :meth:`abort` cancels the request scope and answers (see there); a
        cancel from outside (the server stopping) resets the stream (CANCEL) and counts the
        request as ``cancelled``.
        """
        svc, facts = self.svc, self.facts
        if svc.draining:
            try:
                facts.outcome = await self._error(503, "the broker is shutting down; retry", 1)
            finally:
                self._account()  # counted like any answer
            return
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                svc.enter(self)  # from here on abort() can reach it
                try:
                    facts.outcome = await self._relay()
                except BadBody as exc:
                    facts.outcome = await self._error(400, str(exc))
                except ClientDisconnected:
                    facts.outcome = "client_gone"
                except UnsendableAnswer as exc:
                    facts.outcome = await self._bad_answer(str(exc))
                nursery.cancel_scope.cancel()  # the reader, if it still runs
            if self.shutdown and facts.outcome is None:
                facts.outcome = await self._shut_down()
        finally:
            svc.leave(self)
            self._account()

    async def _relay(self) -> str:
        """Check the head, read the first part of the body, find the route and the model
        candidates, and send the request to a connector of the route: the outcome."""
        req, svc, facts = self.req, self.svc, self.facts
        if req.method == "OPTIONS" and req.target == b"*":  # the server's own, never relayed
            facts.status, facts.head_at = 204, trio.current_time()
            allow = ", ".join(DEFAULT_METHODS).encode()
            await req.respond(
                204, [(b"allow", allow), (b"x-request-id", self.request_id.encode())], end=True
            )
            return "ok"
        refusal = head_refusal(
            req, svc.limits, svc.relay_path, svc.token_mark, svc.in_flight, svc.limit_hit
        )
        if refusal is not None:
            return await self._error(*refusal)
        first = await self._first_body_part()
        if self.body_size > svc.max_body:
            svc.limit_hit("body")
            return await self._error(413, "request body too large")
        route, target = route_of(req, svc.route_domain)
        facts.route = route
        try:  # what goes to the connector (after /r/<route> is taken off) passes the rule
            check_target(target)
        except BadTarget as exc:
            return await self._error(exc.status, str(exc))
        unknown = svc.unknown_route(route)
        if unknown is not None:
            return await self._error(*unknown)
        model, candidates, served = svc.candidates(route, first, self.body_done)
        if not candidates:
            facts.model = model
            return await self._error(*model_not_found(model, served))
        self.merge_models = (
            req.method == "GET" and target.split("?", 1)[0] in MODEL_LISTS and served is not None
            and len({n for names in served.values() for n in names}) > 1
        )  # fmt: skip
        headers = svc.trust.forwarded_headers(req)
        for n, candidate in enumerate(candidates):
            body = first if candidate == model else with_model(first, candidate)
            if candidate or model:
                facts.model = candidate or model
            head = RequestHead(
                req.method, target, with_length(headers, body, first), self.request_id
            )
            last = n == len(candidates) - 1
            outcome = await self._to_route(route, head, body, candidate, last=last)
            if outcome != _FALLBACK:
                return outcome
            log.info(
                "model %s failed before answering; trying %s",
                candidate,
                candidates[n + 1],
                extra={"request_id": self.request_id, "route": route},
            )
        raise AssertionError("the last candidate never falls back")  # pragma: no cover

    async def _first_body_part(self) -> bytes:
        """Up to 64 KiB of the body, so a small request travels as one relay message."""
        parts: list[bytes | bytearray] = []
        while self.body_size < _INITIAL_BODY:
            chunk = await self.req.receive_body()
            if not chunk:
                self.body_done = True
                break
            parts.append(chunk)
            self.body_size += len(chunk)
        return b"".join(parts)  # noqa: ASYNC910  each turn awaits the body

    async def _to_route(
        self, route: str, head: RequestHead, first: bytes, model: str | None, *, last: bool
    ) -> str:
        """Send the request to a connector of ``route`` that serves ``model``, and answer
        from its stream; a stream the connector REFUSED was never processed, so it goes to
        another one (we hold the body)."""
        for _attempt in range(MAX_ATTEMPTS):
            handle = await self.svc.acquire(route, model, self._waiting)
            self.queued = None
            if self.client_gone:  # it left while queued: nothing was sent anywhere
                if not isinstance(handle, Refusal):
                    self.svc.registry.release(handle)
                return "client_gone"
            if isinstance(handle, Refusal):
                if self.body_done and not last:
                    return _FALLBACK  # none for this model now: the next candidate's
                return await self._error(*handle)
            self.facts.connector = handle.name
            try:
                stream = handle.relay.open_stream(head, end_stream=self.body_done and not first)
            except RelayClosed:
                continue
            except HeadTooLarge:
                return await self._error(431, "request head too large for the relay")
            finally:
                self.svc.registry.release(handle)
            self.stream = stream
            if first:
                # queued behind the head without a checkpoint: one relay message for both
                try:
                    await stream.send_data(first, end_stream=self.body_done)
                except StreamReset:
                    pass  # answered below from the reset
            if not self.body_done:
                self._start_reader()  # the rest of the upload goes into the stream
            outcome = await self._respond(
                may_retry=self.body_done, may_fall_back=self.body_done and not last
            )
            if _is_portal(head.target):
                pass  # the portal's answers say nothing of the LLM's health (see _is_portal)
            elif outcome in _FAILED or (
                outcome == "bridge_error" and self.facts.status in (502, 504)
            ):
                handle.answered(False, trio.current_time())
            elif outcome == "ok":
                handle.answered(True, trio.current_time())
            if outcome != _RETRY:
                return outcome
        return await self._error(503, "every connector refused; retry", 1)

    async def _respond(self, *, may_retry: bool, may_fall_back: bool) -> str:
        """Answer the client from the stream: the outcome, or _RETRY / _FALLBACK (nothing
        reached the client: try another connector / the next candidate model)."""
        stream = self.stream
        assert stream is not None
        try:
            head = await self._response_head(stream)
        except StreamReset as exc:
            return await self._answer_reset(exc, may_retry, may_fall_back)
        if may_fall_back and head.status in (502, 503, 504):
            stream.reset(ResetCode.CANCEL, "falling back to another model")
            return _FALLBACK
        if self.merge_models and head.status == 200:
            return await self._merged_models(stream, head)
        self.facts.status = head.status
        self.facts.head_at = trio.current_time()
        try:
            await self._relay_answer(stream, head)
        except StreamReset as exc:
            # Abort: returning without the end makes the server close the connection, so the
            # client sees an incomplete response, never a complete one.
            self.facts.reset = exc.reason
            return "client_gone" if self.client_gone else "aborted"
        # a 5xx from behind the relay (the connector's line of the same request id says
        # whether the LLM or the connector made it): an error in every view
        return UPSTREAM_ERROR if head.status >= 500 else "ok"

    async def _response_head(self, stream: RelayStream) -> ResponseHead:
        # Most small answers are back within a couple of milliseconds: only then start
        # the task that watches for the client going away (it costs a task and a poll
        # registration per request). Cancel latency grows by at most this wait.
        if stream.response_head is None and not self.reader_started:
            with trio.CancelScope(deadline=trio.current_time() + WATCH_AFTER):
                await stream.receive_response_head()
            if stream.response_head is None:
                self._start_reader()
        return await stream.receive_response_head()

    async def _answer_reset(self, exc: StreamReset, may_retry: bool, may_fall_back: bool) -> str:
        """The stream was reset before its answer began: say why, or try elsewhere."""
        if self.bad_body:
            return await self._error(400, self.bad_body)
        if self.client_gone:
            return "client_gone"  # noqa: ASYNC910  the reset came while awaiting the answer
        if may_retry and exc.code == ResetCode.REFUSED:
            return _RETRY  # noqa: ASYNC910  the reset came while awaiting the answer
        if self.too_large:
            return await self._error(413, "request body too large")
        if may_fall_back:
            return _FALLBACK  # noqa: ASYNC910  the reset came while awaiting the answer; nothing reached the client: the next candidate model
        status, message = _RESET_STATUS.get(
            exc.code,
            (502, "the connector failed to answer"),  # type: ignore[call-overload]
        )
        self.facts.reset = exc.reason
        return await self._error(status, message, 1 if status == 503 else None)

    async def _relay_answer(self, stream: RelayStream, head: ResponseHead) -> None:
        """Write the head and the body to the client as they arrive; StreamReset if the
        stream is reset before its end."""
        req = self.req
        # What already arrived goes out with the head, in one write.
        first, done = stream.take_ready()
        await self._send_head(head, head.headers, first, done)
        if done:
            return
        self._start_reader()  # a streamed answer: watch for the client going away
        # A reset of an unfinished answer must also stop a write that is blocked on a
        # client who stopped reading (the connector resets after its stall_timeout):
        # otherwise this request and its connection would stay forever.
        # The same scope bounds each write by the send timeout (one scope per answer, not
        # one per chunk).
        with trio.CancelScope() as writing:
            stream.on_reset = lambda: None if stream.recv_done else writing.cancel()
            while chunk := await stream.receive_data():
                more, done = stream.take_ready()
                await req.send(chunk + more if more else chunk, end=done, within=writing)
                if done:
                    return
        if writing.cancelled_caught:
            if stream.reset_error is not None:
                raise stream.reset_error
            assert req.send_timed_out
            raise ClientDisconnected("the client stopped reading (send timeout)")
        await req.end()

    async def _merged_models(self, stream: RelayStream, head: ResponseHead) -> str:
        """A connector accepted the key for ``/v1/models`` (``/api/tags``): answer with the
        models of every connector of the route instead of that one's list."""
        try:
            while await stream.receive_data():  # read and dropped (bounded by the window)
                pass
        except StreamReset as exc:  # nothing went to the client yet: say why
            return await self._answer_reset(exc, False, False)
        route = self.facts.route or DEFAULT_ROUTE
        path = self.req.path.removeprefix(f"/r/{self.facts.route or ''}")
        served = self.svc.registry.models(route) or {}
        headers, body = model_list_answer(path, served, head.headers)
        self.facts.status = 200
        self.facts.head_at = trio.current_time()
        await self._send_head(head, headers, body, True)
        return "ok"

    async def _send_head(
        self, head: ResponseHead, headers: list[tuple[bytes, bytes]], body: bytes, end: bool
    ) -> None:
        """The connector's head (with ``headers``) and ``body`` to the client;
        UnsendableAnswer if HTTP/1.1 cannot carry them (nothing was written)."""
        try:
            await self.req.respond(head.status, headers, body, end=end)
        except UnsendableAnswer as exc:
            raise UnsendableAnswer(f"status {head.status}: {exc}") from None

    async def _bad_answer(self, why: str) -> str:
        """The connector's answer could not go out: reset its stream, log why, and answer
        502 if the server can still answer (a head it refused left the connection usable; a
        body that broke its framing did not: the connection then just closes)."""
        if self.stream is not None:
            self.stream.reset(ResetCode.PROTOCOL_ERROR, "bad answer: " + why)
        facts = self.facts
        facts.reset = why
        extra = {"request_id": self.request_id, "route": facts.route, "connector": facts.connector}
        log.warning("the connector sent a bad answer: %s", why, extra=extra)
        if self.req.answer_started:  # its head went out: the connection just closes
            return "bad_answer"  # noqa: ASYNC910  the bad answer came from an await
        try:
            await self._error(502, "the LLM's connector sent a bad answer")
        except (ClientDisconnected, UnsendableAnswer):
            facts.status = facts.head_at = None  # nothing went out
        return "bad_answer"  # noqa: ASYNC910  the bad answer came from an await; the error reply awaited unless gone

    def abort(self, reason: str) -> None:
        """Stop the request now (the broker stops): its scope is cancelled with ``reason``;
        :meth:`run` then answers 503, or ends an answer that began without its end, and
        resets the stream (SHUTDOWN)."""
        self.shutdown = reason
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel(reason=reason)

    async def _shut_down(self) -> str:
        """After :meth:`abort`: 503 if nothing went out yet, else the answer ends short."""
        if self.stream is not None:  # the connector stops first
            self.stream.reset(ResetCode.SHUTDOWN, self.shutdown)
        self.facts.reset = self.shutdown
        if self.req.answer_started:
            return "aborted"  # noqa: ASYNC910  after abort(): the request's scope was cancelled; the server closes the connection without the answer's end
        return await self._error(503, "the broker is shutting down; retry", 1)

    def _start_reader(self) -> None:
        if not self.reader_started:
            self.reader_started = True
            assert self.nursery is not None
            self.nursery.start_soon(self._read_request)

    async def _read_request(self) -> None:
        """Feed the rest of the body into the stream (or discard it once the stream is gone
        or the body is over the limit), then watch for the client going away."""
        req = self.req
        try:
            while not self.body_done:
                chunk = await req.receive_body()
                self.body_size += len(chunk)
                done = not chunk
                stream = self.stream
                if self.body_size > self.svc.max_body:
                    if stream is not None:
                        stream.reset(ResetCode.TOO_LARGE, "request body too large")
                    self.too_large = True
                    return  # the server discards the rest (bounded) once we answered
                if stream is not None and stream.reset_error is None:
                    try:
                        await stream.send_data(chunk, end_stream=done)
                    except StreamReset:
                        pass  # the connector answered already or the stream failed: discard
                self.body_done = done
        except BadBody as exc:
            self.bad_body = str(exc)
            self._client_gone(str(exc))
            return  # noqa: ASYNC910  a task's body: the body read awaited
        except ClientDisconnected as exc:
            self._client_gone(str(exc))
            return  # noqa: ASYNC910  a task's body: the body read awaited
        await req.wait_disconnect()
        self._client_gone("client disconnected")

    def _waiting(self, scope: trio.CancelScope) -> None:
        """About to wait in the route's queue: a client that leaves meanwhile gives its place
        up at once (with the whole body here, the reader watches for it)."""
        self.queued = scope
        if self.body_done:
            self._start_reader()

    def _client_gone(self, reason: str) -> None:
        self.client_gone = True
        if self.queued is not None:
            self.queued.cancel()
        if self.stream is not None:
            self.stream.reset(ResetCode.CANCEL, reason)

    async def _error(
        self, status: int, message: str, retry_after: int | None = None, code: str | None = None
    ) -> str:
        """Answer with an OpenAI-shaped error the broker made: its outcome (the message is
        the log line's ``reason`` too)."""
        self.facts.status = status
        self.facts.reason = message
        self.facts.head_at = trio.current_time()
        s, h, body = error_response(
            status, message, self.request_id, retry_after=retry_after, code=code
        )
        if not self.body_done or self.svc.draining:
            # a body we will not read; or, draining, a client that would retry on this very
            # connection (its pool keeps it) instead of reaching another broker
            h.append((b"connection", b"close"))
        if self.stream is None:
            self.facts.bytes_out = len(body)  # else: what the stream brought (see _account)
        await self.req.respond(s, h, body, end=True)
        return bridge_outcome(status)

    def _account(self) -> None:
        """The end of the request: its stream reset if unfinished, its metrics, its line."""
        facts, stream = self.facts, self.stream
        reset_code = None
        if stream is not None:
            if self.shutdown:
                stream.reset(ResetCode.SHUTDOWN, self.shutdown)
            elif not stream.finished:
                stream.reset(ResetCode.CANCEL, "client went away")
            facts.bytes_out = stream.bytes_received
            if stream.reset_error is not None and stream.reset_error.code != ResetCode.NO_ERROR:
                reset_code = stream.reset_error.code
        if facts.outcome is None:
            facts.outcome = "cancelled"
        facts.bytes_in = self.body_size
        facts.ended = trio.current_time()
        self.svc.account(facts, reset_code)
        log_request("broker", facts)

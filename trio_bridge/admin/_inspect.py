"""The connector's request inspector: recent requests in memory, live to subscribers.

Every request the connector handles gets a :class:`RequestRecord` (time, key name, model, path,
status, outcome, queue wait, time to first byte, duration, tokens, reset reason, headers with
secrets redacted, a small waterfall of timings). The last ``max_records`` (500) are kept;
subscribers (the admin page's server-sent events) get each start and end as it happens, through
bounded channels: a subscriber that cannot keep up loses events, never slows a request.

Bodies are kept only when the operator opts in (``[inspector] capture_bodies = true``): in
memory, never on disk and never sent to the broker; at most ``max_body_bytes`` (64 KiB) of each
request and answer, at most ``max_captured`` (100) requests and ``max_captured_bytes``
(16 MiB) in all, the oldest dropped first. Those bounds hold the bodies of finished requests
(a request in progress holds at most ``max_body_bytes`` of each body); a record pushed off the
list while its request runs keeps none.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

import attrs
import trio

from trio_bridge.http._messages import KEY_HEADERS, Headers

REDACTED = "[redacted]"
SECRET_HEADERS = KEY_HEADERS | {
    b"cookie",
    b"set-cookie",
    b"proxy-authorization",
    b"x-upstream-key",
}


def scrub(headers: Headers) -> Headers:
    """Secret values replaced, names and the rest kept as bytes (cheap: no decoding; for the
    request path). Header names from h11 are lower-case already."""
    # the same tuple where nothing is replaced: an open request keeps these (~0.4 KiB less)
    return [(kv[0], _REDACTED_B) if kv[0] in SECRET_HEADERS else kv for kv in headers]


_REDACTED_B = REDACTED.encode()


def redact(headers: Headers) -> list[tuple[str, str]]:
    """Headers as text, with every secret-bearing value replaced."""
    return [
        (k.decode("latin-1"), REDACTED if k.lower() in SECRET_HEADERS else v.decode("latin-1"))
        for k, v in headers
    ]


@attrs.define
class RequestRecord:
    seq: int
    request_id: str
    started: float  # Unix time
    method: str
    path: str
    key_id: str = ""
    key_name: str = ""
    model: str = ""
    status: int | None = None
    outcome: str = ""  # "" while in progress
    reset: str = ""
    queue_wait_ms: float | None = None
    ttfb_ms: float | None = None
    first_chunk_ms: float | None = None
    duration_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_estimated: bool = False
    tokens_per_second: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    #: as received / sent, secrets already scrubbed; decoded only when shown
    request_headers: Headers = attrs.field(factory=list, repr=False)
    response_headers: Headers = attrs.field(factory=list, repr=False)
    replay_of: str = ""
    #: captured bodies (only with capture_bodies; bounded and truncated)
    request_body: bytes | None = None
    response_body: bytes | None = None
    request_truncated: bool = False
    response_truncated: bool = False
    #: to replay: what went to the LLM (method, target, headers without the user's key)
    target: str = ""
    forward_headers: Headers = attrs.field(factory=list, repr=False)
    #: the Inspector's bookkeeping: still in its list; body bytes counted in its captured
    #: total (None: not among the captured records)
    _listed: bool = attrs.field(default=True, init=False, repr=False)
    _counted: int | None = attrs.field(default=None, init=False, repr=False)

    def summary(self) -> dict[str, Any]:
        """The list view's fields (no headers, no bodies)."""
        return {
            "seq": self.seq,
            "id": self.request_id,
            "time": self.started,
            "method": self.method,
            "path": self.path,
            "key": self.key_name or self.key_id,
            "model": self.model,
            "status": self.status,
            "outcome": self.outcome or "in progress",
            "reset": self.reset,
            "queue_wait_ms": self.queue_wait_ms,
            "ttfb_ms": self.ttfb_ms,
            "duration_ms": self.duration_ms,
            "tokens": None
            if self.completion_tokens is None
            else (self.prompt_tokens or 0) + self.completion_tokens,
            "tokens_estimated": self.tokens_estimated,
            "tokens_per_second": self.tokens_per_second,
            "captured": self.request_body is not None,
            "replay_of": self.replay_of,
        }

    def detail(self) -> dict[str, Any]:
        doc = self.summary()
        doc.update(
            request_headers=redact(self.request_headers),
            response_headers=redact(self.response_headers),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            first_chunk_ms=self.first_chunk_ms,
            request_body=_text(self.request_body),
            response_body=_text(self.response_body),
            request_truncated=self.request_truncated,
            response_truncated=self.response_truncated,
        )
        return doc


def _text(body: bytes | None) -> str | None:
    return None if body is None else body.decode("utf-8", "replace")


class Inspector:
    def __init__(
        self,
        *,
        capture_bodies: bool = False,
        max_records: int = 500,
        max_body_bytes: int = 64 * 1024,
        max_captured: int = 100,
        max_captured_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.capture_bodies = capture_bodies
        self.max_body_bytes = max_body_bytes
        self.max_captured = max_captured
        self.max_captured_bytes = max_captured_bytes
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()
        self._max_records = max_records
        # finished records that keep bodies, oldest first; invariant: _captured_bytes is the
        # sum of their _counted (what they hold), every one of them is listed in _records
        self._captured: deque[RequestRecord] = deque()
        self._captured_bytes = 0
        self._seq = itertools.count(1)
        self._subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self.timeline: deque[tuple[float, str, str]] = deque(maxlen=1000)

    @property
    def captured_bytes(self) -> int:
        """Bytes of the bodies kept for finished requests (bounded by max_captured_bytes)."""
        return self._captured_bytes

    # -- recording (the connector's request path) --
    def start(self, request_id: str, method: str, path: str) -> RequestRecord:
        rec = RequestRecord(next(self._seq), request_id, time.time(), method, path)  # wall clock
        key = f"{rec.seq}:{request_id}"
        self._records[key] = rec
        while len(self._records) > self._max_records:
            _, old = self._records.popitem(last=False)
            old._listed = False
            if old._counted is not None:
                self._captured.remove(old)  # at most max_captured records: a short scan
            self._forget_bodies(old)
        self._publish("start", rec)
        return rec

    def finish(self, rec: RequestRecord) -> None:
        """The request ended: its captured bodies join the kept ones (the oldest dropped
        past max_captured / max_captured_bytes). A record that left the list while its
        request ran keeps none: nobody could see them."""
        if rec.request_body is not None or rec.response_body is not None:
            if not rec._listed:
                self._forget_bodies(rec)
            elif rec._counted is None:
                size = len(rec.request_body or b"") + len(rec.response_body or b"")
                rec._counted = size
                self._captured.append(rec)
                self._captured_bytes += size
                while self._captured and (
                    len(self._captured) > self.max_captured
                    or self._captured_bytes > self.max_captured_bytes
                ):
                    self._forget_bodies(self._captured.popleft())
        self._publish("end", rec)

    def capture(self, data: bytes, kept: bytes | None) -> tuple[bytes, bool]:
        """``kept`` + ``data``, truncated to max_body_bytes; (bytes, truncated)."""
        kept = kept or b""
        room = self.max_body_bytes - len(kept)
        if room <= 0:
            return kept, bool(data)
        return kept + data[:room], len(data) > room

    def state(self, what: str, state: str) -> None:
        """A relay or the LLM changed state (for the up/down timeline)."""
        now = time.time()  # wall clock: shown on the admin page
        self.timeline.append((now, what, state))
        self._send({"type": "state", "time": now, "what": what, "state": state})

    def _forget_bodies(self, rec: RequestRecord) -> None:
        """Drop ``rec``'s bodies; the total loses what it counted for them (nothing for a
        request in progress: its bodies count when it finishes). The caller takes it out of
        ``_captured``."""
        if rec._counted is not None:
            self._captured_bytes -= rec._counted
            rec._counted = None
        if rec.request_body is None and rec.response_body is None:
            return
        rec.request_body = rec.response_body = None
        rec.forward_headers = []

    # -- reading (the admin pages) --
    def recent(self, limit: int = 200) -> list[dict[str, Any]]:
        recs = list(self._records.values())[-limit:]
        return [r.summary() for r in reversed(recs)]

    def get(self, seq: int) -> RequestRecord | None:
        for key, rec in reversed(self._records.items()):
            if rec.seq == seq:
                return rec
            if int(key.split(":", 1)[0]) < seq:
                break
        return None

    @contextlib.contextmanager
    def subscription(self, size: int = 256) -> Iterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """Events as they happen, for the ``with`` block (a bounded channel)."""
        send, receive = trio.open_memory_channel[dict[str, Any]](size)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()

    def _publish(self, kind: str, rec: RequestRecord) -> None:
        if self._subscribers:
            self._send({"type": kind, "request": rec.summary()})

    def _send(self, event: dict[str, Any]) -> None:
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                pass  # a slow page loses events; requests never wait for it
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(send)

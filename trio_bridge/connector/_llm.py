"""Watching the LLM: is it up (``health_path`` answers below 500), and which models it serves
(``models`` in the config, else OpenAI's ``/v1/models`` or Ollama's ``/api/tags``).

One task (:meth:`LLMWatch.run`) probes every ``health_interval`` while the LLM is up, and with
backoff while it is down; a request that cannot reach the LLM calls :meth:`LLMWatch.failed`,
which reports not-ready at once and probes now. Every change is told to ``on_change`` (the
connector passes it to its brokers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx
import trio

from trio_bridge._backoff import Backoff
from trio_bridge._config import Config
from trio_bridge.http._messages import MODEL_LISTS, model_ids
from trio_bridge.http._upstream import H11Transport

log = logging.getLogger("trio_bridge.connector")

NOT_PROBED = "not probed yet"
#: why the LLM is not ready when local_url reaches a broker (by another name than broker_urls':
#: the same name is refused when the config is read)
A_BROKER = (
    "local_url reaches a trio-bridge broker (its relay endpoint answered), not an LLM: set "
    "[connector] local_url to the LLM server's own address"
)


class LLMWatch:
    """The LLM's state as last seen: ``ready``, ``since`` (wall time, for people),
    ``last_error``, ``models`` (None: not known; brokers send it anything)."""

    def __init__(
        self,
        config: Config,
        transport: H11Transport,
        upstream_auth: tuple[bytes, bytes] | None,
        on_change: Callable[[], None],
    ) -> None:
        c = config.connector
        self.local_url = c.local_url.rstrip("/")
        self._health_url = self.local_url + c.health_path
        self._configured = tuple(c.models) or None
        self._interval = float(c.health_interval)
        self._timeout = float(config.limits.connect_timeout) + 5
        self._transport = transport
        self._headers = [upstream_auth] if upstream_auth is not None else []
        self._on_change = on_change
        self.ready = False
        self.since = time.time()  # wall clock
        self.last_error = NOT_PROBED
        self.models: tuple[str, ...] | None = self._configured
        self._probe_now = trio.Event()
        #: local_url answered as a broker does (looked at again by each probe)
        self._a_broker = False

    async def first_look(self) -> None:
        """Probe once and learn the models (bound it with a deadline)."""
        self.set(*await self.probe())
        if self.ready:
            await self.learn_models()

    async def run(self) -> None:
        """Probe for ever (until cancelled)."""
        backoff = Backoff(base=0.5, cap=self._interval)
        while True:
            self.set(*await self.probe())
            if self.ready:
                await self.learn_models()
                backoff.attempt = 0
                delay = self._interval
            else:
                delay = max(0.25, backoff.next_delay())
            with trio.move_on_after(delay):
                await self._probe_now.wait()
            self._probe_now = trio.Event()

    async def _get(self, url: str) -> tuple[int, bytes]:
        """One GET to the LLM, bounded; raises TooSlowError or httpx.HTTPError."""
        with trio.fail_after(self._timeout):
            r = await self._transport.handle_async_request(
                httpx.Request("GET", url, headers=self._headers)
            )
            try:
                body = await r.aread()
            finally:
                await r.aclose()
        return r.status_code, body

    async def probe(self) -> tuple[bool, str]:
        """(up, reason): up if the LLM answers ``health_path`` with a status below 500."""
        try:
            status, _ = await self._get(self._health_url)
        except trio.TooSlowError:
            return False, "health probe timed out"  # noqa: ASYNC910  the GET raised (it awaited)
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__  # noqa: ASYNC910  the GET raised (it awaited)
        if status >= 500 or self._a_broker:  # a broker answers 503 while this is not ready
            self._a_broker = await self._answers_as_a_broker()
            if self._a_broker:
                return False, A_BROKER
        if status >= 500:
            return False, f"health probe answered HTTP {status}"
        return True, f"answers HTTP {status}"

    async def _answers_as_a_broker(self) -> bool:
        """True if local_url answers a plain GET of the relay path as a broker does (a broker
        answers the health probe too: through this very connector, with a 401)."""
        try:
            status, body = await self._get(self.local_url + "/_bridge/relay")
        except (trio.TooSlowError, httpx.HTTPError):
            return False  # noqa: ASYNC910  the GET raised (it awaited)
        return status == 400 and b"the relay endpoint" in body[:200]

    def set(self, up: bool, reason: str) -> None:
        if up == self.ready and self.last_error != NOT_PROBED:
            return
        self.ready = up
        self.since = time.time()  # wall clock
        self.last_error = "" if up else reason
        if up:
            log.info("LLM is up: %s", reason, extra={"llm": self.local_url})
        else:
            log.warning("LLM is down: %s", reason, extra={"llm": self.local_url})
        self._on_change()

    def failed(self, reason: str) -> None:
        """A request could not reach the LLM: report not-ready now and probe at once."""
        self.set(False, reason)
        self._probe_now.set()

    async def learn_models(self) -> None:  # noqa: ASYNC910  configured models: nothing to ask
        """What the LLM serves, told on when it changes; unknown (None) changes nothing."""
        models = self._configured or await self._discover_models()
        if models is None and not self._configured and await self._answers_as_a_broker():
            self._a_broker = True
            self.set(False, A_BROKER)
            return  # noqa: ASYNC910  the GETs awaited
        if models is None or models == self.models:
            return  # noqa: ASYNC910  configured models: nothing to ask
        self.models = models
        log.info("LLM models: %s", ", ".join(models) or "(none)", extra={"llm": self.local_url})
        self._on_change()

    async def _discover_models(self) -> tuple[str, ...] | None:
        """Model ids from OpenAI's ``/v1/models``, else Ollama's ``/api/tags``; None if
        neither answers with a list."""
        for path in MODEL_LISTS:
            try:
                status, body = await self._get(self.local_url + path)
            except (trio.TooSlowError, httpx.HTTPError):
                continue
            if (ids := model_ids(path, status, body)) is not None:
                return tuple(dict.fromkeys(n for n in ids if 0 < len(n) <= 256))[:1000]  # noqa: ASYNC910  each turn awaits a GET
        return None  # noqa: ASYNC910  each turn awaits a GET

"""What every relayed request of a connector shares: the key store and the keys' live counters,
the LLM's slots and its transport, the rules a request is held to, and the books its end goes
in. One :class:`Forwarder` per connector; each stream gets a
:class:`~trio_bridge.connector._request.RelayedRequest` that uses it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from trio_bridge._config import Config
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.accounts._limits import Limiter
from trio_bridge.accounts._pool import PoolStore
from trio_bridge.accounts._usagestore import UsageBook
from trio_bridge.admin._inspect import Inspector, RequestRecord
from trio_bridge.connector._accounting import Accounting
from trio_bridge.connector._body import BodyRules, RelayGuard
from trio_bridge.connector._llm import LLMWatch
from trio_bridge.connector._request import RelayedRequest
from trio_bridge.connector._slots import FairSlots
from trio_bridge.http._messages import KEY_HEADERS, REQUEST_ID, strip_hop_by_hop
from trio_bridge.http._target import LLMBase
from trio_bridge.http._upstream import H11Transport
from trio_bridge.relay._protocol import RequestHead
from trio_bridge.relay._relay import RelayStream

_DROP_UPSTREAM = KEY_HEADERS | {REQUEST_ID, b"host", b"expect"}
LLMRequest = tuple[str, httpx.URL, list[tuple[bytes, bytes]], bytes | AsyncIterator[bytes]]


class Forwarder:
    """The parts a relayed request uses (public attributes; :class:`RelayedRequest` reads
    them) and the request's rules, read once from the config."""

    def __init__(
        self,
        config: Config,
        *,
        keys: SecretStore,
        limiter: Limiter,
        slots: FairSlots,
        transport: H11Transport,
        llm: LLMWatch,
        inspector: Inspector,
        accounting: Accounting,
        usage_store: UsageBook | None,
        upstream_auth: tuple[bytes, bytes] | None,
        pool: PoolStore | None = None,
    ) -> None:
        """``pool``: the pool's shared store (admissions go there; ``limiter`` is then its
        local stand-in while the store is unreachable); ``usage_store``: where usage goes."""
        c, lim = config.connector, config.limits
        self.route = c.route
        self.keys, self.limiter, self.slots = keys, limiter, slots
        self.transport, self.llm, self.inspector = transport, llm, inspector
        self.accounting, self.usage_store, self.pool = accounting, usage_store, pool
        #: sent to the LLM with every request (the LLM's own key, never the user's)
        self.upstream_auth = upstream_auth
        self.methods = frozenset(c.methods)
        #: where every relayed request goes: local_url's scheme, host, port and path
        self.llm_base = LLMBase(c.local_url)
        #: LLM URLs by request target: an API has a handful of paths, and checking and
        #: building one costs ~20 µs (a third of building the request)
        self._urls: dict[str, httpx.URL] = {}
        self.body_rules = BodyRules.from_config(config)
        self.first_byte_timeout = float(lim.first_byte_timeout)
        self.idle_timeout = float(lim.idle_timeout)
        self.stall_timeout = float(lim.stall_timeout)
        self.max_buffered = int(config.relay.max_buffered)

    async def handle_stream(self, stream: RelayStream, guard: RelayGuard | None = None) -> None:
        """One relayed request, start to end; ``guard``: what its relay may cost (bodies
        held, failed key checks)."""
        if guard is None:
            guard = RelayGuard(self.max_buffered)
        await RelayedRequest(self, stream, guard).run()

    def url_for(self, target: str) -> httpx.URL:
        """The LLM's URL for a request target (:class:`BadTarget` for one that may not go)."""
        url = self._urls.get(target)
        if url is None:
            url = self.llm_base.url_for(target)
            if len(self._urls) >= 256:  # many distinct targets (query strings): start over
                self._urls.clear()
            self._urls[target] = url
        return url

    def llm_request(
        self,
        head: RequestHead,
        url: httpx.URL,
        content: bytes | AsyncIterator[bytes],
        rec: RequestRecord | None = None,
    ) -> LLMRequest:
        """The request for the LLM, as ``H11Transport.send`` takes it: the user's key and
        hop-by-hop headers out, the correlation id (and an upstream key) in."""
        headers = strip_hop_by_hop(head.headers, also=_DROP_UPSTREAM)
        headers.append((REQUEST_ID, head.request_id.encode()))
        if rec is not None:  # what a replay sends again (never the upstream key)
            rec.target = head.target
            rec.forward_headers = list(headers)
        if self.upstream_auth is not None:
            headers.append(self.upstream_auth)
        return head.method, url, headers, content

"""A pool's shared store, one connector's side: API keys, limit windows, revocations and usage
counted once for every connector that names the same ``connector.store`` (Redis; ``pip
install 'trio-bridge[redis]'``). See docs/pool.md; what the store holds and its Lua scripts:
``accounts/_poolscripts.py``.

Each admission is ONE round trip: :data:`ADMIT`, a Lua script run by EVALSHA, checks and
counts concurrency, requests per minute, tokens per minute and tokens per day atomically,
on the store's clock (``TIME``: one clock for the whole pool). The end of a request is not
on its path: :meth:`PoolStore.finish` and :meth:`PoolStore.record` only count in memory;
:meth:`PoolStore.run` writes them WRITE_DELAY later in one pipeline (with whatever ended
meanwhile), and polls the keys' version and renews the heartbeat every SYNC_INTERVAL.

A box's requests in flight are counted by the box itself and *set* in the store (by the
admission script and by the end's), never added to: a late write, a lost answer or a store
that restarted empty cannot make the count drift for longer than the box's next write, and
a sequential client of one box never races the write of its previous request's end. Each
such write carries the box's next sequence number and the store applies only a newer one
than it holds (answers of concurrent admissions may arrive in any order); a count that
included admissions since refused is written again at once (no phantom in flight).

The store unreachable (a round trip that fails or takes longer than ROUND_TRIP_TIMEOUT):
one error line, ``problems`` in ``/readyz`` and ``status``, the gauge ``trio_bridge_store_up``
at 0 and ``trio_bridge_store_failures_total``; admissions then follow ``on_store_failure``:
``open`` counts on this connector alone (its :class:`Limiter`), ``closed`` refuses with 503
``store_unavailable``. Ends of requests and usage wait in memory (bounded: MAX_PENDING_ROWS
usage rows) and are written when the store is back (one info line says how much); the keys
last read stay in force. Not carried over: the requests admitted during the outage do not
enter the store's per-minute request window (the minute after may admit up to ``rpm`` more).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import attrs
import trio

from trio_bridge._backoff import Backoff
from trio_bridge._config import Config, redact_url
from trio_bridge._errors import ConfigError, leaves
from trio_bridge.accounts._limits import KeyLimits, Limiter, Refusal, limit_refusal
from trio_bridge.accounts._poolbacklog import MAX_PENDING_ROWS, Backlog, Batch
from trio_bridge.accounts._poolclient import (
    ROUND_TRIP_TIMEOUT,
    store_client,
    store_errors,
    why_failed,
)
from trio_bridge.accounts._poolkeys import Base, PoolKeys, fetch_keys, put_keys
from trio_bridge.accounts._poolscripts import (
    ADMIT,
    KEYS_VERSION,
    LIMIT_OF_CODE,
    PREFIX,
    WRITE,
    per_key,
)
from trio_bridge.accounts._poolusage import UsageSummary
from trio_bridge.accounts._usagestore import ModelNames, utc_day

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("trio_bridge.pool")

#: keys' version polled, heartbeat renewed, usage summary refreshed this often
SYNC_INTERVAL = 0.5
#: ends and usage are written this long after a request ended, with whatever ended meanwhile
WRITE_DELAY = 0.05
#: a connector whose heartbeat is this old counts no request in flight any more
ALIVE_TTL = 15
#: the store unreachable: probed again after this long, doubling up to RETRY_MAX
RETRY_BASE, RETRY_MAX = 0.25, 5.0
#: the refusal while the store is unreachable and on_store_failure = "closed"
STORE_DOWN = "store_unavailable"


@attrs.define
class Admission:
    """A pooled admission's answer: ``refusal`` (None: admitted), whether the store counted
    it (``shared``; else this connector did, the store being unreachable), and the key's
    per-minute windows after it, for the rate-limit headers: (used, seconds until one
    leaves) for requests and tokens."""

    refusal: Refusal | None
    shared: bool
    requests: tuple[int, float] = (0, 0.0)
    tokens: tuple[int, float] = (0, 0.0)


def _snapshot(
    limits: KeyLimits, in_flight: int, requests: int, tokens: int, today: int
) -> dict[str, int | None]:
    def left(limit: int | None, used: int) -> int | None:
        return None if limit is None else max(0, limit - used)

    return {
        "in_flight": in_flight,
        "concurrency_left": left(limits.concurrency, in_flight),
        "requests_this_minute": requests,
        "requests_left_this_minute": left(limits.rpm, requests),
        "tokens_this_minute": tokens,
        "tokens_left_this_minute": left(limits.tokens_per_minute, tokens),
        "tokens_today": today,
        "tokens_left_today": left(limits.tokens_per_day, today),
    }


class PoolStore:
    """One connector's side of the pool's store: admissions, ends, usage, the keys.

    ``models``: the model names the connector knows (usage under others is "other");
    ``registry``: where its metrics go. Cancellation: :meth:`run` owns the connection; each
    call on the request path is bounded by ROUND_TRIP_TIMEOUT. The ``key_id`` of admissions,
    ends and snapshots is what a key's limits count under (``accounts._keys.budget``: its
    name, the same for all its secrets); usage rows are by the secret's id."""

    def __init__(
        self,
        config: Config,
        *,
        models: Callable[[], Collection[str] | None] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        c = config.connector
        self.where = redact_url(c.store)
        self.policy = c.on_store_failure
        self._config = config
        self.client = store_client(config)
        self.instance = secrets.token_hex(6)
        self.keys = PoolKeys(self.where, fetch=self._fetch_keys, put=self._put_keys)
        self.local = Limiter()  # counts while the store is unreachable
        self.up = False
        self.reached = False  # reached at least once since the start
        self.down_since: float | None = None  # wall clock
        self.last_error: str | None = None
        self.failures = 0
        self._model_name = ModelNames(models)
        self._errors = store_errors()
        self._admit = self.client.register_script(ADMIT)
        self._admit_sha = hashlib.sha1(ADMIT.encode()).hexdigest()
        self._write_batch = self.client.register_script(WRITE)
        #: what ended and the usage, not written yet
        self.backlog = Backlog()
        self._writing = trio.Lock()
        #: requests in flight here that the store admitted, per key (told again to a store
        #: that lost them: a restart without persistence)
        self._flight: dict[str, int] = defaultdict(int)
        #: admissions of a key sent to the store and not answered yet
        self._admitting: dict[str, int] = defaultdict(int)
        #: keys this connector admitted requests of (bounded by the number of API keys)
        self._seen: set[str] = set()
        #: the sequence number of this connector's writes of its counts in flight (the
        #: store applies a write only if it is newer than the last one it applied)
        self._seq = 0
        self._wake = trio.Event()
        #: the pool's usage of the recent days (admin page, /_bridge/usage), read by run
        self.summary = UsageSummary()
        self._up_metric: Any = None
        self._fail_metric: Any = None
        if registry is not None:
            from prometheus_client import Counter, Gauge

            self._up_metric = Gauge(
                "trio_bridge_store_up",
                "1 while the pool's shared store answers, else 0 (on_store_failure applies).",
                registry=registry,
            )
            self._fail_metric = Counter(
                "trio_bridge_store_failures",
                "Round trips to the pool's shared store that failed or timed out.",
                registry=registry,
            )

    # -- the request path --
    async def admit(self, key_id: str, limits: KeyLimits) -> Admission:
        """Count a new request of ``key_id`` in, in the store (one round trip), or say why
        not. The store unreachable: ``open`` counts on this connector alone, ``closed``
        refuses (503). Cancellation: nothing is counted if it is cancelled before the
        answer (a script the store ran then still counted it: this connector's count of the
        key is written again with the next write)."""
        wall = time.time()  # wall clock
        if self.up:
            args = (
                self.instance,
                limits.concurrency or 0,
                limits.rpm or 0,
                limits.tokens_per_minute or 0,
                limits.tokens_per_day or 0,
                PREFIX + "alive:",
                self._mine(key_id),
                self._next_seq(),
                per_key(key_id, "day:"),
            )
            keys = (
                per_key(key_id, "flight"),
                per_key(key_id, "rpm"),
                per_key(key_id, "tpm"),
                per_key(key_id, "fseq"),
            )
            answer: Any = None
            self._admitting[key_id] += 1
            try:
                with trio.move_on_after(ROUND_TRIP_TIMEOUT):
                    answer = await self._run_admit(keys, args)
            except self._errors as exc:
                self._failed(exc)
            finally:
                if self._admitting[key_id] <= 1:
                    del self._admitting[key_id]
                else:
                    self._admitting[key_id] -= 1
                if answer is None or int(answer[0]) != 0:
                    # counted as being admitted by writes sent meanwhile (or admitted by a
                    # script whose answer never came): this count is set again soon
                    self._recount(key_id)
            if answer is not None:
                return self._decision(key_id, limits, answer, wall)  # noqa: ASYNC910  the store answered (awaited)
            if self.up:  # no answer in time (a failure was said already)
                self._failed(TimeoutError(f"no answer in {ROUND_TRIP_TIMEOUT:g} s"))
        await trio.lowlevel.checkpoint()
        if self.policy == "closed":
            return Admission(
                Refusal(STORE_DOWN, "the pool's shared limits store is unreachable; retry "
                        "shortly", 1),
                shared=False,
            )  # fmt: skip
        refusal = self.local.admit(key_id, limits, trio.current_time(), wall=wall)
        if refusal is None:
            self._seen.add(key_id)  # told to the store when it is back
        return Admission(refusal, shared=False)

    def _mine(self, key_id: str) -> int:
        """This connector's requests of ``key_id`` in flight or being admitted (those it
        admitted on its own counts while the store was unreachable too: they hold their
        place in the pool until they end)."""
        return (
            self._flight.get(key_id, 0)
            + self._admitting.get(key_id, 0)
            + self.local.in_flight(key_id)
        )

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _flight_entry(self, key_id: str) -> list[Any]:
        """This connector's count of ``key_id`` in flight, to be set in the store by a write
        (with the write's sequence number)."""
        return [key_id, self._mine(key_id), self._next_seq()]

    def _recount(self, key_id: str) -> None:
        """Set this connector's count of ``key_id`` in the store again with the next write."""
        self.backlog.ended[key_id] += 0
        self._wake.set()

    async def _run_admit(self, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        """EVALSHA of the admission script (loaded again into a store that lost it)."""
        from coredis.exceptions import NoScriptError

        try:
            return await self.client.evalsha(self._admit_sha, keys, args)
        except NoScriptError:
            return await self._admit(keys=keys, args=args)

    def _decision(self, key_id: str, limits: KeyLimits, answer: Any, wall: float) -> Admission:
        code, a, b, c, d = (int(x) for x in answer)
        if code == 0:
            self._flight[key_id] += 1
            self._seen.add(key_id)
            return Admission(None, True, (a, b / 1000), (c, d / 1000))
        limit = LIMIT_OF_CODE[code]
        refusal = limit_refusal(limit, limits, in_flight=a, wait=b / 1000, wall=wall)
        window = (a, b / 1000)
        return Admission(refusal, True, window if code == 2 else (0, 0.0),
                         window if code == 3 else (0, 0.0))  # fmt: skip

    def _fetch_keys(self) -> tuple[bytes | None, bytes] | None:
        """The keys document, read from a worker thread (None elsewhere: the one in force)."""
        try:
            return trio.from_thread.run(fetch_keys, self.client)  # type: ignore[no-any-return]
        except RuntimeError:  # not in a trio worker thread (the connector's own start)
            return None
        except self._errors as exc:
            raise ConfigError(f"pool store {self.where}: {why_failed(exc)}") from None

    def _put_keys(self, data: bytes, version: bytes) -> int:
        """Write the keys document from a worker thread (the portal's key changes)."""
        try:
            return int(trio.from_thread.run(put_keys, self.client, data, version))
        except RuntimeError:
            raise ConfigError(f"{self.where}: keys are changed from a worker thread") from None
        except self._errors as exc:
            raise ConfigError(f"pool store {self.where}: {why_failed(exc)}") from None

    async def snapshot(self, key_id: str, limits: KeyLimits) -> dict[str, int | None]:
        """What is left now for ``key_id`` across the pool (for ``/_bridge/usage``), as
        :meth:`Limiter.snapshot` says it for one box: one pipeline, then the day's tokens (the
        store's day); this box's own counts while the store is unreachable."""
        wall = time.time()  # wall clock
        if self.up:
            try:
                with trio.fail_after(ROUND_TRIP_TIMEOUT):
                    async with self.client.pipeline(transaction=False) as p:
                        clock = p.time()
                        flight = p.hgetall(per_key(key_id, "flight"))
                        rpm = p.hgetall(per_key(key_id, "rpm"))
                        tpm = p.hgetall(per_key(key_id, "tpm"))
                    sec = int((await clock).timestamp())
                    day = self.client.get(per_key(key_id, "day:" + utc_day(sec)))  # its clock
                    in_flight = sum(int(v) for v in (await flight).values())
                    requests = sum(int(v) for s, v in (await rpm).items() if int(s) > sec - 60)
                    tokens = sum(int(v) for s, v in (await tpm).items() if int(s) > sec - 60)
                    today = int((await day) or 0)
            except self._errors:
                pass  # said by the next round trip of the request path; this box's counts
            else:
                return _snapshot(limits, in_flight, requests, tokens, today)
        await trio.lowlevel.checkpoint()
        return self.local.snapshot(key_id, limits, trio.current_time(), wall=wall)

    def keys_unavailable(self) -> Refusal | None:
        """Why no API key can be checked, as long as this connector never read the keys
        document (the store not reached since the start, or the document unreadable): every
        request is refused then (503), under either ``on_store_failure`` (that is for the
        limits: there is no key list to fall back on). None once keys were read (the keys
        last read stay in force)."""
        if self.keys.loaded:
            return None
        if not self.up:
            return Refusal(
                STORE_DOWN,
                "the pool's key store is unreachable and this connector has not read the API "
                "keys yet; retry shortly",
                1,
            )
        return Refusal(
            STORE_DOWN, "the pool's API keys cannot be read from its key store; retry later", 1
        )

    def holding(self, key_id: str) -> int:
        """Requests of ``key_id`` in flight here that the store admitted."""
        return self._flight.get(key_id, 0)

    def finish(self, key_id: str, tokens: int, *, shared: bool) -> None:
        """A request of ``key_id`` ended having used ``tokens``; ``shared``: the store had
        admitted it (its place in flight is given back). Memory only; :meth:`run` writes it
        at once (or when the store is back)."""
        if shared:
            self.backlog.ended[key_id] += 1
            n = self._flight[key_id] - 1
            if n > 0:
                self._flight[key_id] = n
            else:
                self._flight.pop(key_id, None)
        else:
            self.local.finish(key_id, tokens, trio.current_time(), wall=time.time())  # wall clock
            self.backlog.ended[key_id] += 0  # its place in the pool's count is given back too
        if tokens:
            self.backlog.tokens[(key_id, utc_day(time.time()))] += tokens  # wall clock
        self._wake.set()

    def record(
        self,
        key_id: str,
        model: str,
        *,
        prompt: int,
        completion: int,
        estimated: bool,
        error: bool,
        now: float,
        refused: bool = False,
    ) -> None:
        """Count one finished request in the pool's usage (memory; written by :meth:`run`)."""
        key = (utc_day(now), key_id, self._model_name(model))
        if self.backlog.count(
            key,
            prompt=prompt,
            completion=completion,
            estimated=estimated,
            error=error,
            refused=refused,
        ):
            self._wake.set()

    # -- the store reached or not --
    def _failed(self, exc: BaseException) -> None:
        if trio.current_effective_deadline() == -math.inf:
            return  # cancelled (a stop): the connection was closed under it, nothing failed
        self.failures += 1
        if self._fail_metric is not None:
            self._fail_metric.inc()
        self.last_error = why_failed(exc)
        if self.up or self.down_since is None:
            self.up = False
            self.down_since = time.time()  # wall clock
            if self._up_metric is not None:
                self._up_metric.set(0)
            meanwhile = (
                "refusing every request (503: no API keys read yet)"
                if not self.keys.loaded
                else "admitting on this connector's own counts"
                if self.policy == "open"
                else "refusing new requests (503)"
            )
            log.error(
                "pool store %s unreachable (%s): %s until it is back (on_store_failure = %s); "
                "usage and token counts wait in memory",
                self.where,
                self.last_error,
                meanwhile,
                self.policy,
            )
        self._wake.set()

    def problems(self) -> list[str]:
        """What ``/readyz`` and ``status`` say of the store."""
        out = []
        if not self.up:
            since = (
                time.strftime("%H:%M:%S UTC", time.gmtime(self.down_since))
                if self.down_since
                else "the start"
            )
            policy = (
                f"no API keys read yet: every request gets 503 {STORE_DOWN}"
                if not self.keys.loaded
                else "limits counted per connector meanwhile"
                if self.policy == "open"
                else "new requests refused meanwhile"
            )
            out.append(
                f"pool store {self.where}: unreachable since {since} "
                f"({self.last_error or 'not reached yet'}; on_store_failure = {self.policy}: "
                f"{policy})"
            )
        elif self.keys.loaded and self.keys.document is None:
            out.append(
                f"pool store {self.where} holds no API keys yet: every request gets 401 "
                "(`trio-bridge keys import` moves a keys file in; `keys add` makes one)"
            )
        if self.keys.reload_error is not None:
            meanwhile = (
                "the last good keys are in force"
                if self.keys.loaded
                else f"no API keys read yet: every request gets 503 {STORE_DOWN}"
            )
            out.append(f"pool keys: {self.keys.reload_error} ({meanwhile})")
        if dropped := self.backlog.rows_dropped:
            out.append(
                f"pool usage: {dropped} usage rows dropped while the store was "
                f"unreachable (more than {MAX_PENDING_ROWS} waited)"
            )
        return out

    # -- reads from memory (admin page, /_bridge/usage) --
    def rows(
        self, *, since_day: str = "", key_ids: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """The pool's usage rows (as the store held them at the last refresh, at most
        SUMMARY_INTERVAL ago), newest day first."""
        return self.summary.rows(since_day=since_day, key_ids=key_ids)

    def tokens_on(self, day: str) -> dict[str, int]:
        return self.summary.tokens_on(day)

    @property
    def loaded(self) -> bool:
        """The usage summary was read from the store at least once."""
        return self.summary.loaded

    async def load(self) -> None:
        """The summary is read by :meth:`run` (nothing to wait for here)."""
        await trio.lowlevel.checkpoint()

    def write_now(self, timeout: float = 2.0) -> bool:
        """Hard stop (the loop may be stuck): what was not written yet cannot be written
        from here. True if nothing is left."""
        return self.backlog.empty

    # -- the connection's life --
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, read the keys, then keep the pool's books until cancelled: write ends
        and usage as they come, poll the keys' version and renew the heartbeat every
        SYNC_INTERVAL; the store unreachable, probe it with backoff and write what waited
        once it answers. Started once the first attempt to read the keys ended (the keys
        may then be unknown: ``not_ready_because`` says so). A last flush on the way out
        (shielded, at most 2 s)."""
        retry = Backoff(base=RETRY_BASE, cap=RETRY_MAX, floor=RETRY_BASE)
        started = False
        try:
            async with self.client:
                while True:
                    ok = await self._sync()
                    if not started:
                        started = True
                        task_status.started()
                    if ok:
                        retry.attempt = 0
                        with trio.move_on_after(SYNC_INTERVAL):
                            await self._wake.wait()
                            await trio.sleep(WRITE_DELAY)  # what ends meanwhile goes along
                        self._wake = trio.Event()
                    else:
                        await trio.sleep(retry.next_delay())
        finally:
            with trio.move_on_after(2, shield=True):
                await self._last_flush()

    async def _last_flush(self) -> None:  # noqa: ASYNC910  the write awaits (or raised trying)
        """What waits, written on a new connection (this one's tasks were cancelled with
        :meth:`run`); said in one line if it cannot be."""
        if self.write_now() or not self.reached:
            await trio.lowlevel.checkpoint()
            return
        client = store_client(self._config)
        errors: tuple[type[BaseException], ...] = (*self._errors, BaseExceptionGroup)
        try:
            async with client:
                await self._write_all(client)
        except errors as exc:  # raised from inside the new client's task group
            found = leaves(exc)
            if not all(isinstance(e, self._errors) for e in found):
                raise
            rows, tokens = self.backlog.waiting()
            log.warning(
                "pool store %s: %d usage rows and %d token counts not written at the stop (%s)",
                self.where,
                rows,
                tokens,
                why_failed(found[0]),
            )

    async def flush(self) -> bool:
        """Write what waits (if the store is up); True if nothing is left."""
        if self.up:
            await self._sync()
        else:
            await trio.lowlevel.checkpoint()
        return self.write_now()

    async def _sync(self) -> bool:
        """One round trip: what ended, the usage, the heartbeat, the keys' version (and the
        keys document and the usage summary when due), within ROUND_TRIP_TIMEOUT * 2. Then a
        new keys document is parsed and merged in a worker thread, outside that deadline (tens
        of thousands of keys take a second and more: no sign of a slow store, and the event
        loop serves meanwhile), and what the store's lacks is written back (its own round
        trip). False if the store did not answer."""
        was_up = self.up
        base = self.keys.base()  # before the read: a change's version put in force since wins
        fetched: tuple[bytes | None, bytes] | None = None
        try:
            with trio.fail_after(ROUND_TRIP_TIMEOUT * 2):
                alive, version, (ends, tokens, rows) = await self._write_all(self.client)
                if not alive or not was_up:  # the store lost this connector's flight (or
                    await self._tell_flight()  # it was unreachable): say it again
                if self.keys.wants(version):
                    fetched = await fetch_keys(self.client)
                else:
                    self.keys.confirm(version)
                if self.summary.due:
                    await self.summary.read(self.client)
            if fetched is not None:
                await self._take_keys(*fetched, base)
            if self.keys.lacking is not None:  # not written back yet
                with trio.fail_after(ROUND_TRIP_TIMEOUT * 2):
                    await self._write_back()
        except self._errors as exc:
            self._failed(exc)
            return False  # noqa: ASYNC910  the write was awaited (it raised)
        if not was_up:
            self.up = self.reached = True
            if self._up_metric is not None:
                self._up_metric.set(1)
            if self.down_since is not None:
                log.info(
                    "pool store %s reachable again: %d ends, %d token counts and %d usage rows "
                    "that waited written; the store counts the limits again",
                    self.where,
                    ends,
                    tokens,
                    rows,
                )
            else:
                log.info("pool store %s: %d API keys", self.where, len(self.keys))
            self.down_since = None
            self.last_error = None
        return True

    async def _take_keys(self, doc: bytes | None, version: bytes, base: Base) -> None:
        """The keys document (of ``version``) merged with ``base``, the one in force when the
        sync began (a revoked key stays revoked: :mod:`accounts._poolkeys`), and put in force:
        parsed once, in a worker thread (nothing of the store's state is touched there); not
        put in force if a change (the portal's) put another in force meanwhile or holds the
        lock (the next sync reads again)."""
        if doc is None or doc == base.held.doc:  # nothing to parse
            await trio.lowlevel.checkpoint()
            held = self.keys.prepare(doc, version, base)
        else:
            try:
                held = await trio.to_thread.run_sync(
                    self.keys.prepare, doc, version, base, abandon_on_cancel=True
                )
            except ConfigError as exc:
                self.keys.unreadable(exc, version)
                return  # noqa: ASYNC910  the parse was awaited (it raised)
        self.keys.install(held, base)

    async def _write_back(self) -> None:
        """What the store's keys document lacks (all of it, if it restarted empty), written
        if its version is still the one the document in force was merged with (another write
        first: the next sync reads and merges that)."""
        held = self.keys.held
        if held.lacking is None or held.doc is None:
            await trio.lowlevel.checkpoint()
            return
        if await put_keys(self.client, held.doc, held.version) > 0:
            self.keys.written(held)  # the next sync reads the new version (the document held)

    async def _write_all(self, client: Any) -> tuple[bool, bytes, tuple[int, int, int]]:
        """The batch that may not have been written (again, as it was), then what waits:
        (the heartbeat was there, the keys' version, (ends, token counts, usage rows))."""
        async with self._writing:  # one at a time (run's and flush's)
            written = (0, 0, 0)
            backlog = self.backlog
            if (unsent := backlog.unsent) is not None:
                await self._write(unsent, client)
                written = (unsent.ends, unsent.tokens, unsent.rows)
                backlog.unsent = None
            backlog.unsent = batch = backlog.take(self._flight_entry)
            alive, version = await self._write(batch, client)
            backlog.unsent = None
        return alive, version, (written[0] + batch.ends, written[1] + batch.tokens,
                                written[2] + batch.rows)  # fmt: skip

    async def _write(self, batch: Batch, client: Any) -> tuple[bool, bytes]:
        """A batch and the heartbeat in one pipeline: (the heartbeat was there, the keys'
        version)."""
        async with client.pipeline(transaction=False) as p:
            if batch.keys or batch.tokens or batch.rows:
                self._write_batch(
                    keys=(PREFIX + "wrote:" + self.instance,),
                    args=(PREFIX, self.instance, batch.number, batch.payload),
                    client=p,
                )
            alive = p.set(PREFIX + "alive:" + self.instance, b"1", ex=ALIVE_TTL, get=True)
            version = p.get(KEYS_VERSION)
        return (await alive) is not None, (await version) or b""

    async def _tell_flight(self) -> None:
        """Set this connector's requests in flight in the store to what it holds (after the
        store lost them, or after an outage during which an admission's answer was lost)."""
        if not self._seen:
            await trio.lowlevel.checkpoint()
            return
        flight = [self._flight_entry(k) for k in self._seen]
        payload = json.dumps({"flight": flight, "tokens": [], "usage": []}).encode()
        await self._write_batch(
            keys=(PREFIX + "wrote:" + self.instance,),
            args=(PREFIX, self.instance, 0, payload),
        )

"""A pool's shared store: API keys, limit windows, revocations and usage counted once for
every connector that names the same ``connector.store`` (Redis; ``pip install
'trio-bridge[redis]'``). See docs/pool.md.

What lives where (every name under ``tb:``; a store may hold one pool per database)::

    tb:keys                 the keys document: the keys file's TOML (SHA-256 hashes only)
    tb:keys:v               its version, new with every write (a counter, tb:keys:v:n, and
                            a random token); each connector polls it every SYNC_INTERVAL
                            and re-reads the document when it changed
    tb:alive:<instance>     a connector process's heartbeat (expires after ALIVE_TTL)
    tb:k:<id>:flight        hash: connector instance -> requests of key <id> in progress
                            there (an instance whose heartbeat expired counts for nothing)
    tb:k:<id>:rpm           hash: Unix second -> requests admitted in it (the last 60 s)
    tb:k:<id>:tpm           hash: Unix second -> tokens counted in it (the last 60 s)
    tb:k:<id>:day:<day>     tokens of key <id> on that UTC day
    tb:usage:<day>          hash: "<key id> TAB <model> TAB <column>" -> count
    tb:wrote:<instance>     the number of the last batch of ends and usage applied
    tb:imported             hash: "<day> TAB <key id> TAB <model> TAB <column>" -> the
                            count that ``keys import`` added from a usage file

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
import os
import secrets
import ssl
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from trio_bridge._backoff import Backoff
from trio_bridge._config import Config, redact_url
from trio_bridge._errors import ConfigError, leaves
from trio_bridge.accounts._keys import SecretEntry, SecretStore, check_private
from trio_bridge.accounts._limits import KeyLimits, Limiter, Refusal, limit_refusal
from trio_bridge.accounts._usagestore import COLUMNS, ModelNames, utc_day

if TYPE_CHECKING:
    import coredis
    from prometheus_client import CollectorRegistry

log = logging.getLogger("trio_bridge.pool")

PREFIX = "tb:"
#: a round trip to the store that takes longer counts as a failure
ROUND_TRIP_TIMEOUT = 1.0
#: keys' version polled, heartbeat renewed, usage summary refreshed this often
SYNC_INTERVAL = 0.5
#: ends and usage are written this long after a request ended, with whatever ended meanwhile
WRITE_DELAY = 0.05
#: a connector whose heartbeat is this old counts no request in flight any more
ALIVE_TTL = 15
#: the usage summary (admin page, /_bridge/usage) is re-read this often
SUMMARY_INTERVAL = 2.0
SUMMARY_DAYS = 31
#: the summary's older days (before yesterday: they change only by late writes and imports)
#: are re-read this often; each refresh reads today and yesterday
SUMMARY_FULL_INTERVAL = 60.0
#: usage rows (day x key x model) kept in memory while the store is unreachable
MAX_PENDING_ROWS = 100_000
#: the store unreachable: probed again after this long, doubling up to RETRY_MAX
RETRY_BASE, RETRY_MAX = 0.25, 5.0
#: the refusal while the store is unreachable and on_store_failure = "closed"
STORE_DOWN = "store_unavailable"

# The UTC day (YYYY-MM-DD) of a Unix second, on the store's clock (days from civil, H. Hinnant)
DAY_LUA = """
local function utc_day(sec)
  local z = math.floor(sec / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02d', y, m, doy - math.floor((153 * mp + 2) / 5) + 1)
end
"""

# KEYS: flight, rpm, tpm, fseq; ARGV: instance, concurrency, rpm, tpm, tpd (0: no
# limit), the heartbeat prefix, this instance's requests of the key in flight or being
# admitted (it counts them itself: the value is set, never added to, so a lost or late write
# cannot drift), the write's sequence number, the prefix of the key's day keys (the day is
# the store's: one clock for the pool). A write older than the last one applied
# (fseq: instance -> sequence; a late answer, another connection) sets nothing: the newer
# value already counts this admission (as being admitted), so the check uses it.
# A refusal sets nothing (the connector writes its count again soon after).
# Returns {code, a, b, c, d}: 0 admitted (a requests in the window now, b ms until one
# leaves it, c tokens in the window, d ms until some leave it; only for the limits set);
# 1 concurrency (a in flight); 2 requests, 3 tokens (a in the window, b ms until there is
# room); 4 the day's tokens (a used).
ADMIT = (
    DAY_LUA
    + """
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec + tonumber(t[2]) / 1000000
local function window(key)
  local h = redis.call('HGETALL', key)
  local total, items = 0, {}
  for i = 1, #h, 2 do
    local s = tonumber(h[i])
    if s <= sec - 60 then
      redis.call('HDEL', key, h[i])
    else
      local n = tonumber(h[i + 1])
      total = total + n
      items[#items + 1] = {s, n}
    end
  end
  return total, items
end
local function reset_ms(items, need)
  table.sort(items, function(a, b) return a[1] < b[1] end)
  local freed = 0
  for _, it in ipairs(items) do
    freed = freed + it[2]
    if freed >= need then return math.max(0, math.floor((it[1] + 60 - now) * 1000)) end
  end
  return 60000
end
local conc, rpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local tpm, tpd = tonumber(ARGV[4]), tonumber(ARGV[5])
local mine, seq = tonumber(ARGV[7]), tonumber(ARGV[8])
local newer = seq > tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
if not newer then
  mine = math.max(0, tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') - 1)
end
if conc > 0 then
  local h = redis.call('HGETALL', KEYS[1])
  local n = mine
  for i = 1, #h, 2 do
    if h[i] ~= ARGV[1] then
      if redis.call('EXISTS', ARGV[6] .. h[i]) == 1 then
        n = n + tonumber(h[i + 1])
      else
        redis.call('HDEL', KEYS[1], h[i])
        redis.call('HDEL', KEYS[4], h[i])
      end
    end
  end
  if n >= conc then
    return {1, n, 0, 0, 0}
  end
end
local requests, ritems = 0, {}
if rpm > 0 then
  requests, ritems = window(KEYS[2])
  if requests >= rpm then
    return {2, requests, reset_ms(ritems, requests - rpm + 1), 0, 0}
  end
end
local tokens, titems = 0, {}
if tpm > 0 then
  tokens, titems = window(KEYS[3])
  if tokens >= tpm then
    return {3, tokens, reset_ms(titems, tokens - tpm + 1), 0, 0}
  end
end
if tpd > 0 then
  local used = tonumber(redis.call('GET', ARGV[9] .. utc_day(sec)) or '0')
  if used >= tpd then
    return {4, used, 0, 0, 0}
  end
end
if newer then
  redis.call('HSET', KEYS[4], ARGV[1], seq)
  redis.call('EXPIRE', KEYS[4], 86400)
  redis.call('HSET', KEYS[1], ARGV[1], mine + 1)
  redis.call('EXPIRE', KEYS[1], 86400)
end
redis.call('HINCRBY', KEYS[2], sec, 1)
redis.call('EXPIRE', KEYS[2], 61)
local rreset = 0
if rpm > 0 then
  ritems[#ritems + 1] = {sec, 1}
  rreset = reset_ms(ritems, 1)
end
local treset = 0
if tokens > 0 then treset = reset_ms(titems, 1) end
return {0, requests + 1, rreset, tokens, treset}
"""
)

# KEYS: document, version, write counter; ARGV: the new document, the version it replaces
# ("" = none), a random token. A version is the counter and the token: one that a store
# restarted empty counts again never equals one a connector read before the restart.
PUT_KEYS = """
local v = redis.call('GET', KEYS[2]) or ''
if v ~= ARGV[2] then return -1 end
redis.call('SET', KEYS[1], ARGV[1])
local n = redis.call('INCR', KEYS[3])
redis.call('SET', KEYS[2], n .. '.' .. ARGV[3])
return n
"""

# A batch of what ended and the usage (one call per sync). KEYS: this connector's last batch
# applied; ARGV: the key prefix, the instance, the batch's number, the batch (JSON: "flight":
# [key id, in flight or being admitted, sequence] as in ADMIT; "tokens": [key id, tokens],
# counted in the store's minute and UTC day; "usage": [day, field, count]). A batch is
# applied once: one that the store ran but whose answer never came is sent again as it was,
# and then only its counts in flight (newer than the last applied) are set; number 0: only
# the counts in flight.
WRITE = (
    DAY_LUA
    + """
local prefix, instance, number = ARGV[1], ARGV[2], tonumber(ARGV[3])
local b = cjson.decode(ARGV[4])
local fresh = number > tonumber(redis.call('GET', KEYS[1]) or '0')
local sec = tonumber(redis.call('TIME')[1])
local today = utc_day(sec)
for _, f in ipairs(b.flight) do
  local k = prefix .. 'k:' .. f[1] .. ':'
  if f[3] > tonumber(redis.call('HGET', k .. 'fseq', instance) or '0') then
    redis.call('HSET', k .. 'fseq', instance, f[3])
    redis.call('EXPIRE', k .. 'fseq', 86400)
    if f[2] > 0 then
      redis.call('HSET', k .. 'flight', instance, f[2])
      redis.call('EXPIRE', k .. 'flight', 86400)
    else
      redis.call('HDEL', k .. 'flight', instance)
    end
  end
end
if not fresh then return 0 end
redis.call('SET', KEYS[1], number, 'EX', 604800)
for _, t in ipairs(b.tokens) do
  local k = prefix .. 'k:' .. t[1] .. ':'
  redis.call('HINCRBY', k .. 'tpm', sec, t[2])
  redis.call('EXPIRE', k .. 'tpm', 61)
  redis.call('INCRBY', k .. 'day:' .. today, t[2])
  redis.call('EXPIRE', k .. 'day:' .. today, 172800)
end
for _, u in ipairs(b.usage) do
  redis.call('HINCRBY', prefix .. 'usage:' .. u[1], u[2], u[3])
end
return 1
"""
)

# KEYS: what was imported of each usage count; ARGV: the key prefix, the counts (JSON: [day,
# key id, model, column, count]). Each count adds what it grew by since it was last imported.
# Returns how many counts added something.
IMPORT = """
local added = 0
for _, r in ipairs(cjson.decode(ARGV[2])) do
  local field = r[2] .. '\t' .. r[3] .. '\t' .. r[4]
  local seen = r[1] .. '\t' .. field
  local before = tonumber(redis.call('HGET', KEYS[1], seen) or '0')
  if r[5] > before then
    redis.call('HINCRBY', ARGV[1] .. 'usage:' .. r[1], field, r[5] - before)
    redis.call('HSET', KEYS[1], seen, r[5])
    added = added + 1
  end
end
return added
"""

_LIMIT_OF_CODE = {1: "concurrency", 2: "requests", 3: "tokens", 4: "tokens_per_day"}
KEYS_DOC, KEYS_VERSION = PREFIX + "keys", PREFIX + "keys:v"


def _key(key_id: str, what: str) -> str:
    return f"{PREFIX}k:{key_id}:{what}"


def usage_key(day: str) -> str:
    return f"{PREFIX}usage:{day}"


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a failed round trip raises (coredis's errors, the transport's, anyio's)."""
    import anyio
    from coredis.exceptions import RedisError

    return (
        RedisError,
        OSError,
        anyio.BrokenResourceError,
        anyio.ClosedResourceError,
        anyio.EndOfStream,
        trio.TooSlowError,
    )


def store_client(config: Config) -> coredis.Redis[bytes]:
    """A client for ``connector.store`` (password: ``store_password_file``, the environment
    variable TRIO_BRIDGE_STORE_PASSWORD, or the URL; TLS for ``rediss://``, verified with
    ``store_ca_file`` or the system CAs). ConfigError without the [redis] extra."""
    c = config.connector
    try:
        import coredis
        from coredis.exceptions import ConnectionError as StoreConnectionError
        from coredis.retry import ConstantRetryPolicy
    except ImportError:
        raise ConfigError(
            "connector.store needs the Redis client: pip install 'trio-bridge[redis]'"
        ) from None
    import urllib.parse

    parts = urllib.parse.urlsplit(c.store)
    password = os.environ.get("TRIO_BRIDGE_STORE_PASSWORD") or None
    if password is None and c.store_password_file:
        path = config.path(c.store_password_file)
        check_private(path)
        try:
            password = path.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(f"connector.store_password_file: {path}: {exc.strerror}") from None
    if password is None and parts.password:
        password = urllib.parse.unquote(parts.password)
    context = None
    if parts.scheme == "rediss":
        cafile = str(config.path(c.store_ca_file)) if c.store_ca_file else None
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"connector.store_ca_file: {cafile}: {exc}") from None
    return coredis.Redis(
        host=parts.hostname,
        port=parts.port or 6379,
        db=int(parts.path.strip("/") or 0),
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=password,
        ssl=context is not None,
        ssl_context=context,
        connect_timeout=ROUND_TRIP_TIMEOUT,
        stream_timeout=max(ROUND_TRIP_TIMEOUT, 5.0),
        # once, at once: a connection of the pool that the store closed (it restarted) is
        # dropped and a new one dialled; a store that is down fails fast all the same
        retry_policy=ConstantRetryPolicy((StoreConnectionError,), 1, delay=0),
        client_name="trio-bridge",
    )


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class PoolKeys(SecretStore):
    """The API keys of a pool: the keys file's document, kept in the store (hashes only).

    In a connector, :meth:`apply` gives it each new version that :class:`PoolStore` read, and
    ``fetch`` and ``put`` work from trio's worker threads (the portal changes keys there);
    for the CLI they are each a short ``trio.run``. ``fetch`` may return None (nothing read:
    the document in force stays). ``path`` is the store's address (no password)."""

    def __init__(
        self,
        where: str,
        *,
        fetch: Callable[[], tuple[bytes | None, bytes] | None] | None = None,
        put: Callable[[bytes, bytes], int] | None = None,
    ) -> None:
        self._fetch, self._put = fetch, put
        self._doc: bytes | None = None
        self._version = b""
        self.loaded = False
        super().__init__(Path(), "tbk")
        self.path = where  # type: ignore[assignment]  # a name in messages, not a file

    def _load(self) -> dict[str, Any] | None:
        if self._doc is None:
            return None
        import tomllib

        try:
            return tomllib.loads(self._doc.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path}: the keys document is invalid: {exc}") from None

    def _save(self, data: bytes) -> None:
        if self._put is None:
            raise ConfigError(f"{self.path}: keys are changed with the CLI, not by a connector")
        version = self._put(data, self._version)
        if version < 0:
            raise ConfigError(
                f"{self.path}: the keys changed meanwhile (another `keys` command); run it again"
            )

    def reload(self) -> None:
        fetched = self._fetch() if self._fetch is not None else None
        if fetched is not None:
            self._doc, self._version = fetched
        self._by_id = {e.id: e for e in self._read()}
        self.generation += 1

    def maybe_reload(self) -> None:
        """Nothing to look at: :class:`PoolStore` applies new versions as it reads them."""

    def apply(self, doc: bytes | None, version: bytes) -> None:
        """A version of the document read from the store; one that cannot be read keeps the
        last good keys in force (said once, and in :attr:`reload_error`)."""
        old = self._doc, self._version
        self._doc, self._version = doc, version
        try:
            self.reload()
        except ConfigError as exc:
            self._doc, self._version = old
            if self.reload_error != str(exc):
                log.error("pool keys cannot be read, the last good ones stay in force: %s", exc)
            self.reload_error = str(exc)
        else:
            self.loaded = True
            if self.reload_error is not None:
                log.info("pool keys readable again (%d entries)", len(self._by_id))
            self.reload_error = None

    @property
    def version(self) -> bytes:
        return self._version

    def merge(self, entries: list[SecretEntry], defaults: KeyLimits) -> list[SecretEntry]:
        """Add the ``entries`` whose ids it does not hold (``keys import``); ``defaults``
        apply if it has none. Returns the entries added."""
        self.reload()
        have = {e.id for e in self.entries()}
        new = [e for e in entries if e.id not in have]
        mine = self.defaults if self.defaults != KeyLimits() else defaults
        if new or mine != self.defaults:
            self._write([*self.entries(), *new], mine)
        return new

    @property
    def document(self) -> bytes | None:
        """The document in force (None before one was read)."""
        return self._doc


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


@attrs.define
class _Batch:
    """What ended and the usage, as one call of :data:`WRITE` (sent again as it is until the
    store answers: it applies a batch once)."""

    number: int
    payload: bytes
    ends: int
    tokens: int
    rows: int
    #: keys whose count in flight it sets
    keys: int = 0


def _zeros() -> list[int]:
    return [0] * len(COLUMNS)


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
    call on the request path is bounded by ROUND_TRIP_TIMEOUT."""

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
        self._errors = _store_errors()
        self._admit = self.client.register_script(ADMIT)
        self._admit_sha = hashlib.sha1(ADMIT.encode()).hexdigest()
        self._write_batch = self.client.register_script(WRITE)
        #: what ended and was not written yet: requests the store had admitted, per key
        #: id (the key's in-flight count is set again); tokens per (key id, UTC day); usage
        #: rows per (day, key id, model)
        self._ended: dict[str, int] = defaultdict(int)
        self._tokens: dict[tuple[str, str], int] = defaultdict(int)
        self._usage: dict[tuple[str, str, str], list[int]] = defaultdict(_zeros)
        #: a batch sent whose answer never came (the store may have applied it): sent again
        #: as it is before anything else (at most one; what ends meanwhile waits above)
        self._unsent: _Batch | None = None
        self._batches = 0
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
        self._summary: list[dict[str, Any]] = []
        self._summary_at = -1e9
        self._summary_days: dict[str, list[dict[str, Any]]] = {}
        self._summary_full_at = -1e9
        self.rows_dropped = 0
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
                _key(key_id, "day:"),
            )
            keys = (
                _key(key_id, "flight"),
                _key(key_id, "rpm"),
                _key(key_id, "tpm"),
                _key(key_id, "fseq"),
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

    def _recount(self, key_id: str) -> None:
        """Set this connector's count of ``key_id`` in the store again with the next write."""
        self._ended[key_id] += 0
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
        limit = _LIMIT_OF_CODE[code]
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
            raise ConfigError(f"pool store {self.where}: {_why(exc)}") from None

    def _put_keys(self, data: bytes, version: bytes) -> int:
        """Write the keys document from a worker thread (the portal's key changes)."""
        try:
            return int(trio.from_thread.run(put_keys, self.client, data, version))
        except RuntimeError:
            raise ConfigError(f"{self.where}: keys are changed from a worker thread") from None
        except self._errors as exc:
            raise ConfigError(f"pool store {self.where}: {_why(exc)}") from None

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
                        flight = p.hgetall(_key(key_id, "flight"))
                        rpm = p.hgetall(_key(key_id, "rpm"))
                        tpm = p.hgetall(_key(key_id, "tpm"))
                    sec = int((await clock).timestamp())
                    day = self.client.get(_key(key_id, "day:" + utc_day(sec)))  # its clock
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

    def holding(self, key_id: str) -> int:
        """Requests of ``key_id`` in flight here that the store admitted."""
        return self._flight.get(key_id, 0)

    def finish(self, key_id: str, tokens: int, *, shared: bool) -> None:
        """A request of ``key_id`` ended having used ``tokens``; ``shared``: the store had
        admitted it (its place in flight is given back). Memory only; :meth:`run` writes it
        at once (or when the store is back)."""
        if shared:
            self._ended[key_id] += 1
            n = self._flight[key_id] - 1
            if n > 0:
                self._flight[key_id] = n
            else:
                self._flight.pop(key_id, None)
        else:
            self.local.finish(key_id, tokens, trio.current_time(), wall=time.time())  # wall clock
            self._ended[key_id] += 0  # its place in the pool's count is given back too
        if tokens:
            self._tokens[(key_id, utc_day(time.time()))] += tokens  # wall clock
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
        if key not in self._usage and len(self._usage) >= MAX_PENDING_ROWS:
            self.rows_dropped += 1
            return
        row = self._usage[key]
        row[0] += 1
        row[1] += prompt
        row[2] += completion
        row[3] += estimated
        row[4] += error
        row[5] += refused
        self._wake.set()

    # -- the store reached or not --
    def _failed(self, exc: BaseException) -> None:
        if trio.current_effective_deadline() == -math.inf:
            return  # cancelled (a stop): the connection was closed under it, nothing failed
        self.failures += 1
        if self._fail_metric is not None:
            self._fail_metric.inc()
        self.last_error = _why(exc)
        if self.up or self.down_since is None:
            self.up = False
            self.down_since = time.time()  # wall clock
            if self._up_metric is not None:
                self._up_metric.set(0)
            meanwhile = (
                "admitting on this connector's own counts"
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
                "limits counted per connector meanwhile"
                if self.policy == "open"
                else "new requests refused meanwhile"
            )
            out.append(
                f"pool store {self.where}: unreachable since {since} "
                f"({self.last_error or 'not reached yet'}; on_store_failure = {self.policy}: "
                f"{policy})"
            )
        elif self.keys.document is None:
            out.append(
                f"pool store {self.where} holds no API keys yet: every request gets 401 "
                "(`trio-bridge keys import` moves a keys file in; `keys add` makes one)"
            )
        if self.keys.reload_error is not None:
            out.append(f"pool keys: {self.keys.reload_error} (the last good keys are in force)")
        if self.rows_dropped:
            out.append(
                f"pool usage: {self.rows_dropped} usage rows dropped while the store was "
                f"unreachable (more than {MAX_PENDING_ROWS} waited)"
            )
        return out

    # -- reads from memory (admin page, /_bridge/usage) --
    def rows(
        self, *, since_day: str = "", key_ids: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """The pool's usage rows (as the store held them at the last refresh, at most
        SUMMARY_INTERVAL ago), newest day first."""
        wanted = None if key_ids is None else set(key_ids)
        return [
            r
            for r in self._summary
            if r["day"] >= since_day and (wanted is None or r["key_id"] in wanted)
        ]

    def tokens_on(self, day: str) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for r in self._summary:
            if r["day"] == day:
                totals[r["key_id"]] += r["prompt_tokens"] + r["completion_tokens"]
        return dict(totals)

    @property
    def loaded(self) -> bool:
        """The usage summary was read from the store at least once."""
        return self._summary_at > -1e9

    async def load(self) -> None:
        """The summary is read by :meth:`run` (nothing to wait for here)."""
        await trio.lowlevel.checkpoint()

    def write_now(self, timeout: float = 2.0) -> bool:
        """Hard stop (the loop may be stuck): what was not written yet cannot be written
        from here. True if nothing is left."""
        return not (self._unsent or self._ended or self._tokens or self._usage)

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
            unsent = self._unsent or _Batch(0, b"", 0, 0, 0)
            log.warning(
                "pool store %s: %d usage rows and %d token counts not written at the stop (%s)",
                self.where,
                len(self._usage) + unsent.rows,
                len(self._tokens) + unsent.tokens,
                _why(found[0]),
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
        keys and usage summary when due). False if the store did not answer."""
        was_up = self.up
        try:
            with trio.fail_after(ROUND_TRIP_TIMEOUT * 2):
                alive, version, (ends, tokens, rows) = await self._write_all(self.client)
                if not alive or not was_up:  # the store lost this connector's flight (or
                    await self._tell_flight()  # it was unreachable): say it again
                if version != self.keys.version or not self.keys.loaded:
                    doc = await self.client.get(KEYS_DOC)
                    if doc is None and self.keys.document is not None:
                        # the store lost the keys (restarted without persistence): the last
                        # ones read go back (a version that another connector wrote wins)
                        await put_keys(self.client, self.keys.document, b"")
                        version = b""
                        log.warning(
                            "pool store %s held no keys document: the %d keys last read were "
                            "written back",
                            self.where,
                            len(self.keys),
                        )
                    else:
                        self.keys.apply(doc, version)
                if trio.current_time() - self._summary_at >= SUMMARY_INTERVAL:
                    await self._read_summary()
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

    def _take_batch(self) -> _Batch:
        """What waits (ends, tokens, usage), taken as the next batch."""
        ended, tokens, usage = self._ended, self._tokens, self._usage
        self._ended, self._tokens = defaultdict(int), defaultdict(int)
        self._usage = defaultdict(_zeros)
        per_key: dict[str, int] = defaultdict(int)
        for (k, _day), n in tokens.items():
            per_key[k] += n
        flight = [[k, self._mine(k), self._next_seq()] for k in {*ended, *per_key}]
        self._batches += 1
        payload = {
            "flight": flight,
            "tokens": [[k, n] for k, n in per_key.items() if n],
            "usage": [
                [day, f"{key_id}\t{model}\t{column}", n]
                for (day, key_id, model), counts in usage.items()
                for column, n in zip(COLUMNS, counts, strict=True)
                if n
            ],
        }
        # an empty list must stay a JSON array for cjson: "[]", never "{}"
        blob = json.dumps(payload, separators=(",", ":")).encode()
        return _Batch(
            self._batches, blob, sum(ended.values()), len(tokens), len(usage), len(flight)
        )

    async def _write_all(self, client: Any) -> tuple[bool, bytes, tuple[int, int, int]]:
        """The batch that may not have been written (again, as it was), then what waits:
        (the heartbeat was there, the keys' version, (ends, token counts, usage rows))."""
        async with self._writing:  # one at a time (run's and flush's)
            written = (0, 0, 0)
            if (unsent := self._unsent) is not None:
                await self._write(unsent, client)
                written = (unsent.ends, unsent.tokens, unsent.rows)
                self._unsent = None
            self._unsent = batch = self._take_batch()
            alive, version = await self._write(batch, client)
            self._unsent = None
        return alive, version, (written[0] + batch.ends, written[1] + batch.tokens,
                                written[2] + batch.rows)  # fmt: skip

    async def _write(self, batch: _Batch, client: Any) -> tuple[bool, bytes]:
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
        flight = [[k, self._mine(k), self._next_seq()] for k in self._seen]
        payload = json.dumps({"flight": flight, "tokens": [], "usage": []}).encode()
        await self._write_batch(
            keys=(PREFIX + "wrote:" + self.instance,),
            args=(PREFIX, self.instance, 0, payload),
        )

    async def _read_summary(self) -> None:
        """The usage summary: today and yesterday (the whole month every
        SUMMARY_FULL_INTERVAL: reading it is ~13 µs of the event loop per row)."""
        now = time.time()  # wall clock
        month = [utc_day(now - i * 86400) for i in range(SUMMARY_DAYS)]
        full = trio.current_time() - self._summary_full_at >= SUMMARY_FULL_INTERVAL
        days = month if full else month[:2]
        async with self.client.pipeline(transaction=False) as p:
            answers = [p.hgetall(usage_key(day)) for day in days]
        for day, answer in zip(days, answers, strict=True):
            self._summary_days[day] = rows_from([(day, await answer)])
        self._summary_days = {d: self._summary_days[d] for d in month if d in self._summary_days}
        self._summary = [row for d in month for row in self._summary_days.get(d, ())]
        self._summary_at = trio.current_time()
        if full:
            self._summary_full_at = self._summary_at


def rows_from(days: list[tuple[str, dict[bytes, bytes]]]) -> list[dict[str, Any]]:
    """Usage rows from the store's day hashes, newest day first."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for day, fields in days:
        for field, value in fields.items():
            key_id, model, column = field.decode(errors="replace").split("\t", 2)
            row = rows.get((day, key_id, model))
            if row is None:
                row = {"day": day, "key_id": key_id, "model": model}
                row.update(dict.fromkeys(COLUMNS, 0))
                rows[(day, key_id, model)] = row
            if column in row:
                row[column] += int(value)
    return sorted(rows.values(), key=lambda r: (r["day"], r["key_id"], r["model"]), reverse=True)


async def fetch_keys(client: Any) -> tuple[bytes | None, bytes]:
    """The keys document and its version (b"" when there is none)."""
    return await client.get(KEYS_DOC), (await client.get(KEYS_VERSION)) or b""


async def put_keys(client: Any, data: bytes, version: bytes) -> int:
    """Replace the keys document if its version is still ``version``: the new version, or
    -1 if another write came first."""
    script = client.register_script(PUT_KEYS)
    keys = (KEYS_DOC, KEYS_VERSION, KEYS_VERSION + ":n")
    return int(await script(keys=keys, args=(data, version, secrets.token_hex(8))))


async def read_usage(client: Any, since_day: str = "") -> list[dict[str, Any]]:
    """The pool's usage rows since ``since_day``, newest day first."""
    found = [k async for k in client.scan_iter(match=PREFIX + "usage:*")]
    days = sorted(
        d for k in found if (d := k.decode().removeprefix(PREFIX + "usage:")) >= since_day
    )
    return rows_from([(d, await client.hgetall(usage_key(d))) for d in days])


# -- the CLI's side (synchronous: each call one short trio.run) --
class StoreCLI:
    """``keys``, ``usage`` and ``keys import`` on the pool's store, from the command line."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.where = redact_url(config.connector.store)

    def _run(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)`` in a short ``trio.run``; a store that cannot be reached is a
        ConfigError (one line, no password), however coredis raised it (its client raises
        from inside an exception group)."""
        errors: tuple[type[BaseException], ...] = (*_store_errors(), BaseExceptionGroup)

        async def main() -> Any:
            client = store_client(self.config)
            async with client:
                with trio.fail_after(10):
                    return await fn(client)

        try:
            return trio.run(main)
        except errors as exc:
            found = leaves(exc)
            if not all(isinstance(e, _store_errors()) for e in found):
                raise
            raise ConfigError(f"pool store {self.where}: {_why(found[0])}") from None

    def keys(self) -> PoolKeys:
        return PoolKeys(
            self.where,
            fetch=lambda: self._run(fetch_keys),
            put=lambda data, version: self._run(lambda c: put_keys(c, data, version)),
        )

    def usage_rows(self, since_day: str) -> list[dict[str, Any]]:
        return list(self._run(lambda c: read_usage(c, since_day)))

    def import_usage(self, rows: list[dict[str, Any]]) -> bool:
        """Add a usage file's rows to the pool's usage (False: nothing new, every row was
        imported before). The store keeps what it imported of each row (tb:imported): a row
        imported again adds only what it grew by since, so the same file, or the same file
        grown, never counts a request twice."""
        counts = [
            [r["day"], r["key_id"], r["model"], column, r[column]]
            for r in rows
            for column in COLUMNS
            if r[column]
        ]

        async def add(client: Any) -> bool:
            script = client.register_script(IMPORT)
            added = 0
            await trio.lowlevel.checkpoint()
            for i in range(0, len(counts), 1000):  # the store is not held long by one call
                chunk = json.dumps(counts[i : i + 1000]).encode()
                added += int(await script(keys=(PREFIX + "imported",), args=(PREFIX, chunk)))
            return added > 0

        return bool(self._run(add))

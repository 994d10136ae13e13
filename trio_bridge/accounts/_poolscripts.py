"""What a pool keeps in its store (Redis), and the Lua scripts that change it atomically.

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

How a connector uses them: ``accounts/_pool.py``.
"""

from __future__ import annotations

PREFIX = "tb:"
KEYS_DOC, KEYS_VERSION = PREFIX + "keys", PREFIX + "keys:v"


def per_key(key_id: str, what: str) -> str:
    """The name of what the store keeps of API key ``key_id`` (``what``: "flight", "rpm",
    "tpm", "fseq", "day:<day>")."""
    return f"{PREFIX}k:{key_id}:{what}"


def usage_key(day: str) -> str:
    return f"{PREFIX}usage:{day}"


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
#: what an answer of :data:`ADMIT` other than 0 refused
LIMIT_OF_CODE = {1: "concurrency", 2: "requests", 3: "tokens", 4: "tokens_per_day"}

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

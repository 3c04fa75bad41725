"""The Lua scripts of the Redis backend: every check-and-change runs inside Redis, atomically.

Each script is a named constant with its contract above it (``KEYS``, ``ARGV``, what it
returns). :class:`~enhanced_locking.backends.redis_store.RedisBackend` registers them once and
calls them by SHA; redis-py reloads a script when the server answers ``NOSCRIPT`` (after a
restart or a failover).

Conventions shared by every script:

* ``base`` (an ``ARGV``) is ``{key-prefix}{namespace}:``; a lock key ``K`` lives in
  ``{base}lock:{K}``, its fencing counter in ``{base}fence:{K}``. The braces are a hash tag:
  everything about one lock key hashes to one slot.
* A lock is a hash: ``data`` (Atlantis's JSON), ``repo`` and ``pull`` (the owner), ``token``
  (fencing token) and ``exp`` (lease end in server milliseconds, ``0`` for none). Redis expires
  the hash itself at ``exp`` (``PEXPIREAT``), so an expired lock is simply absent.
* Time is the server's (``TIME``), never a client clock.
* A lock is answered as the six values ``key, data, token, exp, repo, pull``.
* Index sets: ``{base}held`` (keys that may be held), ``{base}fenced`` (keys with a counter),
  ``{base}pull:{repo#num}`` (keys a pull may hold). Indexes may lag (a lease expired); readers
  check the lock itself and prune stale entries. The per-pull index key is derived inside the
  scripts from ``base``, which is why the backend needs a single Redis (or Sentinel), not a
  Redis Cluster.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "ADOPT", "LIST", "RAISE_TOKEN", "REFRESH", "RELEASE", "RELEASE_BY_PULL"]

_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function lock_name(base, key) return base .. 'lock:{' .. key .. '}' end
local function pull_index(base, repo, pull)
  return base .. 'pull:{' .. repo .. '#' .. pull .. '}'
end
local function read(name)
  return redis.call('HMGET', name, 'data', 'token', 'exp', 'repo', 'pull')
end
"""

ACQUIRE = _COMMON + """
-- acquire: grant a free key to a new holder, or answer who holds it.
-- KEYS[1] the key's lock hash      KEYS[2] the key's fencing counter
-- KEYS[3] index of held keys       KEYS[4] index of fenced keys
-- ARGV[1] base  ARGV[2] lock key  ARGV[3] repo  ARGV[4] pull number
-- ARGV[5] Atlantis JSON of the new lock  ARGV[6] lease in ms (0: none)
-- returns {1, token, exp} granted, or {0, data, token, exp, repo, pull} held
local held = read(KEYS[1])
if held[1] then
  return {0, held[1], held[2], held[3], held[4], held[5]}
end
local token = redis.call('INCR', KEYS[2])
local lease = tonumber(ARGV[6])
local exp = 0
if lease > 0 then exp = now_ms() + lease end
redis.call('HSET', KEYS[1], 'data', ARGV[5], 'token', token, 'exp', exp,
           'repo', ARGV[3], 'pull', ARGV[4])
if exp > 0 then redis.call('PEXPIREAT', KEYS[1], exp) end
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[2])
redis.call('SADD', pull_index(ARGV[1], ARGV[3], ARGV[4]), ARGV[2])
return {1, token, exp}
"""

RELEASE = _COMMON + """
-- release: free a key, optionally only for the pull that holds it.
-- KEYS[1] the key's lock hash  KEYS[2] index of held keys
-- ARGV[1] base  ARGV[2] lock key  ARGV[3] owner repo ('' = whoever holds it)  ARGV[4] owner pull
-- returns {0} free, {1, data, token, exp, repo, pull} released,
--         {2, data, token, exp, repo, pull} held by another pull (nothing changed)
local held = read(KEYS[1])
if not held[1] then
  return {0}
end
if ARGV[3] ~= '' and (held[4] ~= ARGV[3] or held[5] ~= ARGV[4]) then
  return {2, held[1], held[2], held[3], held[4], held[5]}
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('SREM', pull_index(ARGV[1], held[4], held[5]), ARGV[2])
return {1, held[1], held[2], held[3], held[4], held[5]}
"""

LIST = _COMMON + """
-- list: the live locks named by an index set, pruning entries whose lock is gone.
-- KEYS[1] an index set (held keys, or one pull's keys)
-- ARGV[1] base  ARGV[2] repo filter ('' = any)  ARGV[3] pull filter ('' = any)
-- returns a flat list of six values per lock: key, data, token, exp, repo, pull
-- With both filters KEYS[1] is that pull's index: an entry whose key is now held by another
-- pull is stale and pruned too.
local out = {}
local pull_index = ARGV[2] ~= '' and ARGV[3] ~= ''
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local held = read(lock_name(ARGV[1], key))
  if not held[1] then
    redis.call('SREM', KEYS[1], key)
  elseif (ARGV[2] == '' or held[4] == ARGV[2]) and (ARGV[3] == '' or held[5] == ARGV[3]) then
    table.insert(out, key)
    for i = 1, 5 do table.insert(out, held[i]) end
  elseif pull_index then
    redis.call('SREM', KEYS[1], key)
  end
end
return out
"""

RELEASE_BY_PULL = _COMMON + """
-- release-by-pull: free every key a pull holds (Atlantis does this when a pull closes).
-- KEYS[1] the pull's index set  KEYS[2] index of held keys
-- ARGV[1] base  ARGV[2] repo  ARGV[3] pull number
-- returns a flat list of six values per released lock: key, data, token, exp, repo, pull
local out = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local name = lock_name(ARGV[1], key)
  local held = read(name)
  if held[1] and held[4] == ARGV[2] and held[5] == ARGV[3] then
    redis.call('DEL', name)
    redis.call('SREM', KEYS[2], key)
    table.insert(out, key)
    for i = 1, 5 do table.insert(out, held[i]) end
  end
end
redis.call('DEL', KEYS[1])
return out
"""

REFRESH = _COMMON + """
-- refresh: extend the lease of a held lock, from now (server time).
-- KEYS[1] the key's lock hash
-- ARGV[1] owner repo  ARGV[2] owner pull  ARGV[3] new lease in ms (> 0)
-- returns {0} not held, {1, data, token, exp, repo, pull} refreshed,
--         {2, data, token, exp, repo, pull} held by another pull
local held = read(KEYS[1])
if not held[1] then
  return {0}
end
if held[4] ~= ARGV[1] or held[5] ~= ARGV[2] then
  return {2, held[1], held[2], held[3], held[4], held[5]}
end
local exp = now_ms() + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'exp', exp)
redis.call('PEXPIREAT', KEYS[1], exp)
return {1, held[1], held[2], exp, held[4], held[5]}
"""

RAISE_TOKEN = """
-- raise-token: make a key's fencing counter at least a value (counters never fall).
-- KEYS[1] the key's fencing counter  KEYS[2] index of fenced keys
-- ARGV[1] lock key  ARGV[2] value
-- returns the counter after the call
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local wanted = tonumber(ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
if wanted > current then
  redis.call('SET', KEYS[1], wanted)
  return wanted
end
return current
"""

ADOPT = _COMMON + """
-- adopt: take over a lock from another store, keeping its token and lease.
-- KEYS[1] the key's lock hash  KEYS[2] the key's fencing counter
-- KEYS[3] index of held keys   KEYS[4] index of fenced keys
-- ARGV[1] base  ARGV[2] lock key  ARGV[3] repo  ARGV[4] pull  ARGV[5] Atlantis JSON
-- ARGV[6] fencing token  ARGV[7] lease end in server ms (0: none)
-- returns 1 adopted (or already held by the same pull), 0 held here by another pull,
--         2 skipped because its lease already ended
local held = read(KEYS[1])
local token = tonumber(ARGV[6])
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SADD', KEYS[4], ARGV[2])
if token > current then
  redis.call('SET', KEYS[2], token)
end
if held[1] then
  if held[4] == ARGV[3] and held[5] == ARGV[4] then
    return 1
  end
  return 0
end
local exp = tonumber(ARGV[7])
if exp > 0 and exp <= now_ms() then
  return 2
end
redis.call('HSET', KEYS[1], 'data', ARGV[5], 'token', token, 'exp', exp,
           'repo', ARGV[3], 'pull', ARGV[4])
if exp > 0 then
  redis.call('PEXPIREAT', KEYS[1], exp)
end
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('SADD', pull_index(ARGV[1], ARGV[3], ARGV[4]), ARGV[2])
return 1
"""

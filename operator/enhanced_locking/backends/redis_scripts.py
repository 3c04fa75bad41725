"""The Lua scripts of the Redis backend: every check-and-change runs inside Redis, atomically.

Each script is a named constant with its contract above it (``KEYS``, ``ARGV``, what it
returns). :class:`~enhanced_locking.backends.redis_store.RedisBackend` registers them once and
calls them by SHA; redis-py loads a script again when the server answers ``NOSCRIPT`` (after a
restart or a failover). They share one library (:data:`LIBRARY`), prepended to each.

**Arguments every script takes**: ``ARGV[1]`` is ``base`` (``{key-prefix}{namespace}:``),
``ARGV[2..5]`` the queue policy (priority flag 0/1, starvation threshold in ms, max boost, max
queue size), ``ARGV[6]`` the calling replica's id, ``ARGV[7..9]`` the store epoch the caller
knows, a fresh epoch id to use if a new one must be started, and the restart quarantine in ms;
``ARGV[10]`` the policy rules compiled by :func:`enhanced_locking.policies.compile_rules` (JSON,
``''`` for none). Script-specific arguments start at ``ARGV[11]``. ``KEYS`` name the lock hashes a call is
about; the indexes below are derived from ``base`` inside the scripts, which is why the backend
needs one Redis (or Sentinel), not a Redis Cluster. Everything about one lock key carries the
key as a hash tag (``{K}``).

**Keys** (``K`` a lock key, ``W`` a waiter id, ``R`` a replica id)::

    lock:{K}        hash: data (Atlantis JSON), token, at, exp, repo, pull [, claim, lease]
    fence:{K}       the key's fencing counter (INCR; never lowered)
    queue0..3:{K}   sorted sets, one per base priority: member "%016d(seq):W", score enqueue ms
    waiter:W        hash: id, keys (JSON), repo, pull, level, enq, seq, deadline, ttl, replica,
                    rid, and "d:K" = the Atlantis JSON to store for each key K
    outcome:W       hash, kept a few minutes: kind (granted/timeout/...), waiter, locks
    held, fenced, queued          sets of keys (held, with a counter, with waiters)
    pull:{repo#num} set of the keys a pull may hold
    replicas        sorted set: R scored by the server time until which R counts as alive
    seq             the enqueue counter (FIFO tie-break across keys)
    epoch           hash: id, base (first fencing token - 1 of new counters), until, since
    op:C            a write's answer under its call id C (kept OP_MS, for a retried call)
    notify:R        pub/sub channel: "kind:W" when one of R's waiters is granted or dropped

**Epochs.** Every script that changes something first checks the store's epoch (``guard``).
A Redis that comes back without its data (restarted without persistence) has no epoch; the
first replica that notices starts a new one whose fencing counters continue from the server
clock (``ms * 1000``, above any token handed out before) and whose grants wait out the
restart quarantine, so a lock granted before the loss is not granted again at once. A new
store (no replica knew an epoch) starts at 0 without quarantine.

**Time** is the server's (``TIME``), read once per call. A lock is held while ``exp`` is 0
or in the future; the hash itself is given a Redis expiry a grace period after ``exp`` so it
is collected even if no caller ever looks at it again, but every decision is made on ``exp``
(so an expiry can be reported with the lock that expired).

**Service order** mirrors :func:`enhanced_locking.backends.waiting.service_order` exactly:
effective level ``min(3, base + min(boost, floor(waited / threshold)))`` (0 for everybody when
the priority flag is off), highest first, then enqueue time, then ``seq``. Within one base
priority the FIFO order *is* the service order (an earlier waiter has waited longer, so its
level is at least as high), so the next waiter is the best of the four queue heads: a hand-off
reads a handful of entries, not the whole queue. Computing a waiter's position walks the queue
up to it (bounded by ``max-queue-size``).

**Hand-off and claims.** A release frees the key and, in the same script, grants it to the
first waiter in service order that can take it: its deadline has not passed, its replica is
alive (heartbeat in ``replicas``), and each of its other keys (a batch) is free or its own.
Waiters failing the first two tests are dropped and told why. The grant is *claimed*: its
``exp`` is at most ``CLAIM_MS`` away until the waiter's replica confirms it (``CONFIRM``), so a
grant made to a replica that died a moment ago lapses and moves on instead of staying held by
nobody. The waiter's replica learns of the grant through ``PUBLISH notify:R``.
"""

from __future__ import annotations

__all__ = [
    "ACQUIRE",
    "ADOPT",
    "CANCEL",
    "CLAIM_MS",
    "CONFIRM",
    "EXPIRE",
    "GET",
    "GRACE_MS",
    "HEARTBEAT",
    "LIBRARY",
    "LIST",
    "OP_MS",
    "OUTCOME_MS",
    "PING",
    "QUEUE",
    "RAISE_TOKEN",
    "REFRESH",
    "RELEASE",
    "RELEASE_BY_PULL",
    "REPLICA_MS",
    "STATUS",
    "WAIT_GRAPH",
]

CLAIM_MS = 5_000
"""How long a grant from the queue waits for its waiter's replica to confirm it."""

GRACE_MS = 60_000
"""How long after ``exp`` Redis keeps an expired lock's hash (decisions use ``exp``)."""

OUTCOME_MS = 300_000
"""How long a waiter's outcome is kept (for a cancel that lost the race, or a reconnect)."""

REPLICA_MS = 5_000
"""A replica counts as alive this long after its last heartbeat (it beats every second)."""

OP_MS = 10_000
"""How long a write's answer is kept for a retry of the same call (retries come at once; the
answers of a busy store, about 1 KB each, should not pile up)."""

LIBRARY = """
local base = ARGV[1]
local POLICY = {priority = tonumber(ARGV[2]), threshold = tonumber(ARGV[3]),
                boost = tonumber(ARGV[4]), max_size = tonumber(ARGV[5])}
local REPLICA = ARGV[6]
local KNOWN_EPOCH, NEW_EPOCH, QUARANTINE_MS = ARGV[7], ARGV[8], tonumber(ARGV[9])
local CLAIM_MS, GRACE_MS = @CLAIM_MS@, @GRACE_MS@
local OUTCOME_MS, REPLICA_MS, OP_MS = @OUTCOME_MS@, @REPLICA_MS@, @OP_MS@
local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local HELD, FENCED, QUEUED = base .. 'held', base .. 'fenced', base .. 'queued'
local REPLICAS, SEQ, EPOCH = base .. 'replicas', base .. 'seq', base .. 'epoch'
local TOKEN_BASE = 0

-- Whole numbers as exact text: Lua's own tostring keeps 14 digits, tokens can have 16.
local function int(x) return string.format('%.0f', x) end

local OP = base .. 'op:' .. NEW_EPOCH  -- the call id doubles as a proposed new epoch id

-- A script that changes anything first asks: did this very call run already (a retry)? does
-- Redis still have the data the caller knew (the store's epoch)? Returns nil to go on, else
-- the reply to send back (nothing changed).
local function guard()
  local done = redis.call('GET', OP)
  if done then return cjson.decode(done) end  -- this very call ran before: same answer
  local e = redis.call('HMGET', EPOCH, 'id', 'base', 'until')
  if not e[1] then
    if KNOWN_EPOCH == '' then  -- a new store: counters start at 0
      redis.call('HSET', EPOCH, 'id', NEW_EPOCH, 'base', 0, 'until', 0, 'since', NOW)
      return {'epoch', NEW_EPOCH, 0, NOW}
    end
    -- The caller knew this store and it has forgotten everything (a restart without
    -- persistence): tokens continue from the clock, and grants wait out the quarantine.
    local till = NOW + QUARANTINE_MS
    redis.call('HSET', EPOCH, 'id', NEW_EPOCH, 'base', int(NOW * 1000), 'until', till,
               'since', NOW, 'lost', KNOWN_EPOCH)
    return {'epoch', NEW_EPOCH, till, NOW}
  end
  if e[1] ~= KNOWN_EPOCH then return {'epoch', e[1], tonumber(e[3]), NOW} end
  if tonumber(e[3]) > NOW then return {'quarantine', e[1], tonumber(e[3]), NOW} end
  TOKEN_BASE = tonumber(e[2])
  return nil
end

-- Remember a write's answer under its call id for OP_MS: a caller that lost the reply
-- (the connection broke) asks again with the same id and gets the same answer, and the write
-- happens once.
local function finish(reply)
  redis.call('SET', OP, cjson.encode(reply), 'PX', OP_MS)
  return reply
end

local function lock_name(k) return base .. 'lock:{' .. k .. '}' end
local function fence_name(k) return base .. 'fence:{' .. k .. '}' end
local function queue_name(k, level) return base .. 'queue' .. level .. ':{' .. k .. '}' end
local function waiter_name(id) return base .. 'waiter:' .. id end
local function outcome_name(id) return base .. 'outcome:' .. id end
local function pull_index(repo, pull) return base .. 'pull:{' .. repo .. '#' .. pull .. '}' end

-- A lock is answered as {key, data, token, at, exp, repo, pull, claim, lease} (all strings;
-- claim and lease false unless a grant from the queue awaits confirmation).
local function read_lock(k)
  local v = redis.call('HMGET', lock_name(k), 'data', 'token', 'at', 'exp', 'repo', 'pull',
                       'claim', 'lease')
  if not v[1] then return nil end
  return {k, v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]}
end

local function lapsed(lock)
  local exp = tonumber(lock[5])
  return exp > 0 and exp <= NOW
end

local function same_owner(lock, repo, pull) return lock[6] == repo and lock[7] == pull end

local function drop_lock(lock)
  redis.call('DEL', lock_name(lock[1]))
  redis.call('SREM', HELD, lock[1])
  redis.call('SREM', pull_index(lock[6], lock[7]), lock[1])
end

local function collect_after(k, exp)
  if exp > 0 then
    redis.call('PEXPIREAT', lock_name(k), exp + GRACE_MS)
  else
    redis.call('PERSIST', lock_name(k))
  end
end

-- The holder of k, or nil. A lapsed lease is dropped and added to `expired` (if given).
local function live(k, expired)
  local lock = read_lock(k)
  if not lock then return nil end
  if lapsed(lock) then
    drop_lock(lock)
    if expired then table.insert(expired, lock) end
    return nil
  end
  return lock
end

-- The holder of k without changing anything (reads).
local function peek(k)
  local lock = read_lock(k)
  if lock and lapsed(lock) then return nil end
  return lock
end

-- Grant k: next fencing token, server time, lease; with `claim` (a waiter id) the grant must
-- be confirmed within CLAIM_MS.
local function stamp(k, data, repo, pull, ttl, claim)
  if TOKEN_BASE > 0 and redis.call('EXISTS', fence_name(k)) == 0 then
    redis.call('SET', fence_name(k), int(TOKEN_BASE))
  end
  local token = redis.call('INCR', fence_name(k))
  redis.call('SADD', FENCED, k)
  local lease_end = 0
  if ttl > 0 then lease_end = NOW + ttl end
  local exp = lease_end
  local name = lock_name(k)
  redis.call('DEL', name)  -- a lapsed lock's hash may linger (with its expiry): start afresh
  if claim then
    local by = NOW + CLAIM_MS
    if exp == 0 or by < exp then exp = by end
    redis.call('HSET', name, 'data', data, 'token', int(token), 'at', NOW, 'repo', repo,
               'pull', pull, 'exp', exp, 'claim', claim, 'lease', lease_end)
  else
    redis.call('HSET', name, 'data', data, 'token', int(token), 'at', NOW, 'repo', repo,
               'pull', pull, 'exp', exp)
  end
  if exp > 0 then redis.call('PEXPIREAT', name, exp + GRACE_MS) end
  redis.call('SADD', HELD, k)
  redis.call('SADD', pull_index(repo, pull), k)
  local pending = false
  if claim then pending = int(lease_end) end
  return {k, data, int(token), int(NOW), int(exp), repo, pull, claim or false,
          pending}
end

-- The waiter took its grant: its own lease applies from the grant on.
local function settle_claim(lock)
  local lease_end = tonumber(lock[9])
  redis.call('HDEL', lock_name(lock[1]), 'claim', 'lease')
  redis.call('HSET', lock_name(lock[1]), 'exp', lease_end)
  collect_after(lock[1], lease_end)
  lock[5], lock[8], lock[9] = int(lease_end), false, false
  return lock
end

-- --- waiters ------------------------------------------------------------------------------
local function effective(level, enq)
  if POLICY.priority == 0 then return 0 end
  local boost = 0
  if POLICY.threshold > 0 and POLICY.boost > 0 then
    local waited = NOW - enq
    if waited < 0 then waited = 0 end
    boost = math.min(POLICY.boost, math.floor(waited / POLICY.threshold))
  end
  return math.min(3, level + boost)
end

local function queue_size(k)
  local n = 0
  for level = 0, 3 do n = n + redis.call('ZCARD', queue_name(k, level)) end
  return n
end

-- An iterator over k's queue in service order: a 4-way merge of the per-priority queues.
local function walker(k)
  local index, heads = {0, 0, 0, 0}, {}
  local function head(level)
    local at = index[level + 1]
    local r = redis.call('ZRANGE', queue_name(k, level), at, at, 'WITHSCORES')
    if #r == 0 then return false end
    return {id = string.sub(r[1], 18), seq = tonumber(string.sub(r[1], 1, 16)),
            enq = tonumber(r[2]), level = level, member = r[1]}
  end
  for level = 0, 3 do heads[level + 1] = head(level) end
  return function()
    local best, best_level = false, -1
    for level = 0, 3 do
      local h = heads[level + 1]
      if h then
        local e = effective(level, h.enq)
        if not best or e > best_level or (e == best_level and (h.enq < best.enq
            or (h.enq == best.enq and h.seq < best.seq))) then
          best, best_level = h, e
        end
      end
    end
    if best then
      index[best.level + 1] = index[best.level + 1] + 1
      heads[best.level + 1] = head(best.level)
    end
    return best
  end
end

local function position(k, id)
  local next_waiter, n = walker(k), 0
  while true do
    local entry = next_waiter()
    if not entry then return 0 end
    n = n + 1
    if entry.id == id then return n end
  end
end

local function read_waiter(id)
  local flat = redis.call('HGETALL', waiter_name(id))
  if #flat == 0 then return nil end
  local rec = {}
  for i = 1, #flat, 2 do rec[flat[i]] = flat[i + 1] end
  rec.flat = flat
  rec.keys = cjson.decode(rec['keys'])
  return rec
end

local function unqueue(id, rec)
  local member = string.format('%016d', tonumber(rec.seq)) .. ':' .. id
  for _, k in ipairs(rec.keys) do
    redis.call('ZREM', queue_name(k, rec.level), member)
    if queue_size(k) == 0 then redis.call('SREM', QUEUED, k) end
  end
  redis.call('DEL', waiter_name(id))
end

local function remember(id, rec, kind, locks)
  local tokens = {}
  for _, lock in ipairs(locks) do table.insert(tokens, {lock[1], lock[3]}) end
  local name = outcome_name(id)
  redis.call('HSET', name, 'kind', kind, 'waiter', cjson.encode(rec.flat),
             'locks', cjson.encode(tokens))
  redis.call('PEXPIRE', name, OUTCOME_MS)
end

local function tell(rec, id, kind)
  redis.call('PUBLISH', base .. 'notify:' .. rec.replica, kind .. ':' .. id)
end

local function new_effects() return {expired = {}, granted = {}, dropped = {}} end

local function drop_waiter(id, rec, kind, fx)
  unqueue(id, rec)
  remember(id, rec, kind, {})
  tell(rec, id, kind)
  if fx then table.insert(fx.dropped, rec.flat) end
end

local function grant(id, rec, fx)
  local locks = {}
  for _, k in ipairs(rec.keys) do
    local holder = live(k, nil)
    if holder then
      table.insert(locks, holder)
    else
      table.insert(locks, stamp(k, rec['d:' .. k], rec.repo, rec.pull, tonumber(rec.ttl), id))
    end
  end
  unqueue(id, rec)
  remember(id, rec, 'granted', locks)
  tell(rec, id, 'granted')
  table.insert(fx.granted, {rec.flat, locks})
  return locks
end

local alive = {}
local function replica_alive(replica)
  if alive[replica] == nil then
    local score = redis.call('ZSCORE', REPLICAS, replica)
    alive[replica] = score ~= false and tonumber(score) >= NOW
  end
  return alive[replica]
end

-- Give free key k to the first waiter that can take it; drop waiters past their deadline or
-- whose replica is gone. Returns the granted locks, or nil. Only a free key is handed out (a
-- batch grant made while freeing several keys may already have taken k).
local function hand_out(k, fx)
  if redis.call('SISMEMBER', QUEUED, k) == 0 then return nil end  -- nobody waits: done
  if live(k, nil) then return nil end
  local next_waiter, dropped, locks = walker(k), {}, nil
  while true do
    local entry = next_waiter()
    if not entry then break end
    local rec = read_waiter(entry.id)
    if not rec then
      table.insert(dropped, {entry, false})
    elseif tonumber(rec.deadline) <= NOW then
      table.insert(dropped, {entry, rec, 'timeout'})
    elseif not replica_alive(rec.replica) then
      table.insert(dropped, {entry, rec, 'unavailable'})
    else
      local free = true
      for _, other in ipairs(rec.keys) do
        if other ~= k then
          local holder = live(other, nil)
          if holder and not same_owner(holder, rec.repo, rec.pull) then
            free = false
            break
          end
        end
      end
      if free then
        locks = grant(entry.id, rec, fx)
        break
      end
    end
  end
  for _, d in ipairs(dropped) do
    if d[2] then
      drop_waiter(d[1].id, d[2], d[3], fx)
    else
      redis.call('ZREM', queue_name(k, d[1].level), d[1].member)
    end
  end
  if queue_size(k) == 0 then redis.call('SREM', QUEUED, k) end
  return locks
end

-- The holder of k after expiring a lapsed lease and serving a grantable waiter.
local function settle(k, fx)
  local holder = live(k, fx.expired)
  if holder then return holder end
  local locks = hand_out(k, fx)
  if locks then
    for _, lock in ipairs(locks) do
      if lock[1] == k then return lock end
    end
  end
  return nil
end
"""

# Every script: LIBRARY, then its own body. Replies use {} for "no lock".


_GUARD = "local refused = guard()\nif refused then return refused end\n"


def _script(body: str) -> str:
    if _GUARD in body:  # a write: guarded, and its answer kept for a retried call
        header, _, rest = body.partition(_GUARD)
        body = f"{header}{_GUARD}local function main()\n{rest}end\nreturn finish(main())\n"
    text = LIBRARY + body
    for name, value in (("CLAIM_MS", CLAIM_MS), ("GRACE_MS", GRACE_MS),
                        ("OUTCOME_MS", OUTCOME_MS), ("REPLICA_MS", REPLICA_MS), ("OP_MS", OP_MS)):
        text = text.replace(f"@{name}@", str(value))
    return text


ACQUIRE = _script("""
-- acquire-or-enqueue: grant every key of a batch (one key is a batch of one), or queue one
-- waiter on every key, or refuse.
-- KEYS   the lock hash of each key (documentation; names are derived from the keys below)
-- ARGV[11] lease in ms (0: none)  ARGV[12] waiter id ('' = fail fast)  ARGV[13] wait in ms
-- ARGV[14] request id ('' none)  ARGV[15] owner repo  ARGV[16] owner pull
-- ARGV[17] base priority level 0..3  ARGV[18..] pairs: lock key, Atlantis JSON to store
-- returns {'granted', {lock...}, fresh 0/1}
--         {'held', key, lock}
--         {'queue_full', key, lock or {}}
--         {'queued', waiter record (flat), key, its holder or {}, position}
local refused = guard()
if refused then return refused end
local ttl, wait_id, wait_ms = tonumber(ARGV[11]), ARGV[12], tonumber(ARGV[13])
local rid, repo, pull, level = ARGV[14], ARGV[15], ARGV[16], ARGV[17]
local keys, datas = {}, {}
for i = 18, #ARGV, 2 do
  table.insert(keys, ARGV[i])
  datas[ARGV[i]] = ARGV[i + 1]
end
if wait_id ~= '' then
  local rec = read_waiter(wait_id)
  if rec then  -- the same waiter asking again: where it stands
    local k = rec.keys[1]
    return {'queued', rec.flat, k, peek(k) or {}, position(k, wait_id)}
  end
end
local fx = new_effects()
local mine, blocked, blocked_lock = {}, false, false
for _, k in ipairs(keys) do
  local holder = settle(k, fx)
  if holder then
    if same_owner(holder, repo, pull) then
      mine[k] = holder
    elseif not blocked then
      blocked, blocked_lock = k, holder
    end
  end
end
if not blocked then
  local locks, fresh = {}, 0
  for _, k in ipairs(keys) do
    if mine[k] then
      table.insert(locks, mine[k])
    else
      table.insert(locks, stamp(k, datas[k], repo, pull, ttl, false))
      fresh = 1
    end
  end
  return {'granted', locks, fresh}
end
if wait_id == '' or wait_ms <= 0 then
  return {'held', blocked, blocked_lock}
end
for _, k in ipairs(keys) do
  if queue_size(k) >= POLICY.max_size then
    return {'queue_full', k, peek(k) or {}}
  end
end
redis.call('ZADD', REPLICAS, NOW + REPLICA_MS, REPLICA)
local seq = redis.call('INCR', SEQ)
local deadline = NOW + wait_ms
local name = waiter_name(wait_id)
redis.call('HSET', name, 'id', wait_id, 'keys', cjson.encode(keys), 'repo', repo, 'pull', pull,
           'level', level, 'enq', NOW, 'seq', seq, 'deadline', deadline, 'ttl', ttl,
           'replica', REPLICA, 'rid', rid)
for _, k in ipairs(keys) do redis.call('HSET', name, 'd:' .. k, datas[k]) end
redis.call('PEXPIREAT', name, deadline + GRACE_MS)
local member = string.format('%016d', seq) .. ':' .. wait_id
for _, k in ipairs(keys) do
  redis.call('ZADD', queue_name(k, level), NOW, member)
  redis.call('SADD', QUEUED, k)
end
return {'queued', read_waiter(wait_id).flat, blocked, blocked_lock, position(blocked, wait_id)}
""")

RELEASE = _script("""
-- release-and-hand-off: free a key (optionally only for the pull that holds it) and give it
-- to the next waiter; also the admin's force-unlock (no owner).
-- KEYS[1] the key's lock hash
-- ARGV[11] lock key  ARGV[12] owner repo ('' = whoever holds it)  ARGV[13] owner pull
-- returns {'not_owned', lock} (nothing changed), or
--         {'released', lock or {}, granted, dropped} where granted is a list of
--         {waiter record, {lock...}} and dropped a list of waiter records
local refused = guard()
if refused then return refused end
local k = ARGV[11]
local holder = live(k, nil)
if holder and ARGV[12] ~= '' and not same_owner(holder, ARGV[12], ARGV[13]) then
  return {'not_owned', holder}
end
if holder then drop_lock(holder) end
local fx = new_effects()
hand_out(k, fx)
return {'released', holder or {}, fx.granted, fx.dropped}
""")

EXPIRE = _script("""
-- expire: if the key's lease has lapsed, free it; serve the queue of a free key.
-- KEYS[1] the key's lock hash
-- ARGV[11] lock key
-- returns {expired lock or {}, granted, dropped} (as RELEASE)
local refused = guard()
if refused then return refused end
local fx = new_effects()
settle(ARGV[11], fx)
return {fx.expired[1] or {}, fx.granted, fx.dropped}
""")

RELEASE_BY_PULL = _script("""
-- release-by-pull: free every key a pull holds and hand each to its next waiter.
-- KEYS   none (the pull's index is derived)
-- ARGV[11] repo  ARGV[12] pull number
-- returns {released locks (leases still running), granted, dropped}
local refused = guard()
if refused then return refused end
local index = pull_index(ARGV[11], ARGV[12])
local released, freed = {}, {}
for _, k in ipairs(redis.call('SMEMBERS', index)) do
  local holder = read_lock(k)
  if holder and same_owner(holder, ARGV[11], ARGV[12]) then
    drop_lock(holder)
    table.insert(freed, k)
    if not lapsed(holder) then table.insert(released, holder) end
  end
end
redis.call('DEL', index)
-- Every key is freed first, then each is handed on, in key order (as every backend does).
table.sort(freed)
local fx = new_effects()
for _, k in ipairs(freed) do hand_out(k, fx) end
return {released, fx.granted, fx.dropped}
""")

CANCEL = _script("""
-- cancel: take a waiter out of every queue it is in and tell its replica why.
-- KEYS   none (the waiter's record names its keys)
-- ARGV[11] waiter id  ARGV[12] reason (cancelled, timeout, deadlock, unavailable)
-- returns {'removed', waiter record}, {'none'}, or, when it had been granted already,
--         {'granted', waiter record, locks it still holds (now confirmed)}
local refused = guard()
if refused then return refused end
local id = ARGV[11]
local rec = read_waiter(id)
if rec then
  drop_waiter(id, rec, ARGV[12], nil)
  return {'removed', rec.flat}
end
local out = redis.call('HMGET', outcome_name(id), 'kind', 'waiter', 'locks')
if out[1] ~= 'granted' then return {'none'} end
local still = {}
for _, pair in ipairs(cjson.decode(out[3])) do
  local holder = live(pair[1], nil)
  if holder and holder[3] == pair[2] then
    if holder[8] then settle_claim(holder) end
    table.insert(still, holder)
  end
end
return {'granted', cjson.decode(out[2]), still}
""")

CONFIRM = _script("""
-- confirm: the waiter's replica takes the locks it was granted (ends the claim).
-- KEYS   none
-- ARGV[11] waiter id
-- returns {'granted', locks} or {'lost', locks it still holds} (a claim lapsed first)
local refused = guard()
if refused then return refused end
local out = redis.call('HMGET', outcome_name(ARGV[11]), 'kind', 'locks')
if out[1] ~= 'granted' then return {'lost', {}} end
local held, lost = {}, false
for _, pair in ipairs(cjson.decode(out[2])) do
  local holder = live(pair[1], nil)
  if holder and holder[3] == pair[2] then
    if holder[8] == ARGV[11] then settle_claim(holder) end
    table.insert(held, holder)
  else
    lost = true
  end
end
if lost then return {'lost', held} end
return {'granted', held}
""")

STATUS = _script("""
-- status: where each of a replica's waiters stands (after its notifications were cut off).
-- KEYS   none
-- ARGV[11..] waiter ids
-- returns one word per id: queued, granted, timeout, cancelled, deadlock, unavailable, gone
local out = {}
for i = 11, #ARGV do
  if redis.call('EXISTS', waiter_name(ARGV[i])) == 1 then
    table.insert(out, 'queued')
  else
    table.insert(out, redis.call('HGET', outcome_name(ARGV[i]), 'kind') or 'gone')
  end
end
redis.call('ZADD', REPLICAS, NOW + REPLICA_MS, REPLICA)
return out
""")

GET = _script("""
-- get: the holder of a key (a lapsed lease is not a holder), changing nothing.
-- KEYS[1] the key's lock hash
-- ARGV[11] lock key
-- returns the lock or {}
return peek(ARGV[11]) or {}
""")

LIST = _script("""
-- list: the live locks named by an index set, pruning entries whose lock is gone.
-- KEYS   none (the index is derived)
-- ARGV[11] '' for every held key, else the repo and ARGV[12] the pull of a pull's index
-- ARGV[13] repo filter ('' = any)  ARGV[14] pull filter ('' = any)
-- returns a list of locks
local index = HELD
if ARGV[11] ~= '' then index = pull_index(ARGV[11], ARGV[12]) end
local out = {}
for _, k in ipairs(redis.call('SMEMBERS', index)) do
  local lock = read_lock(k)
  if not lock then
    redis.call('SREM', index, k)
  elseif not lapsed(lock) and (ARGV[13] == '' or lock[6] == ARGV[13])
      and (ARGV[14] == '' or lock[7] == ARGV[14]) then
    table.insert(out, lock)
  elseif index ~= HELD and not same_owner(lock, ARGV[11], ARGV[12]) then
    redis.call('SREM', index, k)
  end
end
return out
""")

REFRESH = _script("""
-- refresh: restart the lease of a held lock from now (server time); ends a pending claim.
-- KEYS[1] the key's lock hash
-- ARGV[11] lock key  ARGV[12] owner repo  ARGV[13] owner pull  ARGV[14] lease in ms (> 0)
-- returns {'refreshed', lock}, {'not_held'} or {'not_owned', lock}
local refused = guard()
if refused then return refused end
local lock = peek(ARGV[11])
if not lock then return {'not_held'} end
if not same_owner(lock, ARGV[12], ARGV[13]) then return {'not_owned', lock} end
local exp = NOW + tonumber(ARGV[14])
redis.call('HDEL', lock_name(ARGV[11]), 'claim', 'lease')
redis.call('HSET', lock_name(ARGV[11]), 'exp', exp)
collect_after(ARGV[11], exp)
lock[5], lock[8], lock[9] = int(exp), false, false
return {'refreshed', lock}
""")

QUEUE = _script("""
-- queue: the waiters of one key (the caller orders them with the shared service order).
-- KEYS[1] the key's lock hash
-- ARGV[11] lock key
-- returns {now ms, waiter records}
local records = {}
for level = 0, 3 do
  for _, member in ipairs(redis.call('ZRANGE', queue_name(ARGV[11], level), 0, -1)) do
    local rec = read_waiter(string.sub(member, 18))
    if rec then table.insert(records, rec.flat) end
  end
end
return {NOW, records}
""")

WAIT_GRAPH = _script("""
-- wait-graph: every key with waiters, its holder's owner and its waiters, in one snapshot
-- (so deadlock detection sees the waits of every replica at once).
-- KEYS   none
-- returns {now ms, {{key, holder repo or '', holder pull or '', {waiter ids}}...},
--          waiter records}
local entries, records, seen = {}, {}, {}
for _, k in ipairs(redis.call('SMEMBERS', QUEUED)) do
  local ids = {}
  for level = 0, 3 do
    for _, member in ipairs(redis.call('ZRANGE', queue_name(k, level), 0, -1)) do
      local id = string.sub(member, 18)
      if not seen[id] then
        local rec = read_waiter(id)
        seen[id] = rec or false
        if rec then table.insert(records, rec.flat) end
      end
      if seen[id] then table.insert(ids, id) end
    end
  end
  if #ids > 0 then
    local holder = peek(k)
    if holder then
      table.insert(entries, {k, holder[6], holder[7], ids})
    else
      table.insert(entries, {k, '', '', ids})
    end
  end
end
return {NOW, entries, records}
""")

PING = _script("""
-- ping: Redis answers and still has the data this replica knew (if it lost it, the epoch
-- guard starts the quarantine now, so readiness reports it before any request does).
-- KEYS   none
-- returns 'ok'
local refused = guard()
if refused then return refused end
return 'ok'
""")

HEARTBEAT = _script("""
-- heartbeat: this replica is alive (its waiters may be granted) for REPLICA_MS more.
-- KEYS   none
-- returns the server time in ms
redis.call('ZADD', REPLICAS, NOW + REPLICA_MS, REPLICA)
redis.call('ZREMRANGEBYSCORE', REPLICAS, '-inf', NOW - 86400000)
return NOW
""")

RAISE_TOKEN = _script("""
-- raise-token: make a key's fencing counter at least a value (counters never fall).
-- KEYS[1] the key's fencing counter
-- ARGV[11] lock key  ARGV[12] value
-- returns the counter after the call
local refused = guard()
if refused then return refused end
local current = tonumber(redis.call('GET', fence_name(ARGV[11])) or '0')
local wanted = tonumber(ARGV[12])
redis.call('SADD', FENCED, ARGV[11])
if wanted > current then
  redis.call('SET', fence_name(ARGV[11]), ARGV[12])
  return ARGV[12]
end
return int(current)
""")

ADOPT = _script("""
-- adopt: take over a lock from another store, keeping its token, times and lease.
-- KEYS[1] the key's lock hash
-- ARGV[11] lock key  ARGV[12] repo  ARGV[13] pull  ARGV[14] Atlantis JSON  ARGV[15] token
-- ARGV[16] acquired at (ms)  ARGV[17] lease end (ms, 0: none)
-- returns 1 adopted (or already held by the same pull), 0 held here by another pull,
--         2 skipped because its lease already ended
local refused = guard()
if refused then return refused end
local k = ARGV[11]
local token = tonumber(ARGV[15])
local current = tonumber(redis.call('GET', fence_name(k)) or '0')
redis.call('SADD', FENCED, k)
if token > current then redis.call('SET', fence_name(k), ARGV[15]) end
local holder = live(k, nil)
if holder then
  if same_owner(holder, ARGV[12], ARGV[13]) then return 1 end
  return 0
end
local exp = tonumber(ARGV[17])
if exp > 0 and exp <= NOW then return 2 end
redis.call('HSET', lock_name(k), 'data', ARGV[14], 'token', ARGV[15], 'at', ARGV[16],
           'exp', exp, 'repo', ARGV[12], 'pull', ARGV[13])
collect_after(k, exp)
redis.call('SADD', HELD, k)
redis.call('SADD', pull_index(ARGV[12], ARGV[13]), k)
return 1
""")

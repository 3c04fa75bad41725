"""The Lua scripts of the Redis backend: every check-and-change runs inside Redis, atomically.

Each script is a named constant with its contract above it (``KEYS``, ``ARGV``, what it
returns). :class:`~enhanced_locking.backends.redis_store.RedisBackend` registers them once and
calls them by SHA; redis-py loads a script again when the server answers ``NOSCRIPT`` (after a
restart or a failover). They share one library (:data:`LIBRARY`), prepended to each.

**Arguments every script takes**: ``ARGV[1]`` is ``base`` (``{key-prefix}{namespace}:``),
``ARGV[2..5]`` the queue policy (priority flag 0/1, starvation threshold in ms, max boost, max queue
size), ``ARGV[6]`` the calling replica's id, ``ARGV[7..9]`` the store epoch the caller knows, a
fresh epoch id to use if a new one must be started, and the restart quarantine in ms; ``ARGV[10]``
the policy rules compiled by :func:`enhanced_locking.policies.compile_rules` (JSON, ``''`` for
none). Script-specific arguments start at ``ARGV[11]``. ``KEYS`` name the lock hashes a call is
about; the indexes below are derived from ``base`` inside the scripts, which is why the backend
needs one Redis (or Sentinel), not a Redis Cluster. Everything about one lock key carries the key as
a hash tag (``{K}``).

**Keys** (``K`` a lock key, ``W`` a waiter id, ``R`` a replica id)::

    lock:{K}        hash: data (Atlantis JSON), token, at, exp, repo, pull, path, ws
                    [, claim, lease]: the exclusive holder
    shared:{K}      hash: "repo#pull" -> the JSON of a shared holder's lock tuple
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

**Rules and modes.** The grant step (``verdict`` in the library) mirrors
:func:`enhanced_locking.policies.verdict` line by line, the way the service order is mirrored:
Python compiles the rules once per change into ``ARGV[10]`` (globs as anchored Lua patterns,
times in ms) and the script decides with Redis's own state, so a grant in a release's hand-off
follows the same rules as a new request, on whichever replica runs it. We chose this over
deciding in Python under a per-key guard: a guard would cost a round trip per decision and
could not cover a hand-off across the keys of a concurrency group in one atomic step. The
unit tests of ``tests/unit/test_policy_rules.py`` run the same table against every store.
Concurrency counts scan the held set (cost: one read per held lock, only when a limit
applies).

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
    "HOLDERS",
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
    "WAKE",
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
local function shared_name(k) return base .. 'shared:{' .. k .. '}' end
local function fence_name(k) return base .. 'fence:{' .. k .. '}' end
local function queue_name(k, level) return base .. 'queue' .. level .. ':{' .. k .. '}' end
local function waiter_name(id) return base .. 'waiter:' .. id end
local function outcome_name(id) return base .. 'outcome:' .. id end
local function pull_index(repo, pull) return base .. 'pull:{' .. repo .. '#' .. pull .. '}' end

-- A lock is answered as {key, data, token, at, exp, repo, pull, claim, lease, mode, path, ws}
-- (strings; claim and lease false unless a grant from the queue awaits confirmation; mode
-- 'exclusive' or 'shared'; path and workspace are the project's, which the rules look at).
local function with_parts(lock)
  if not lock[11] or not lock[12] then  -- written before the rules existed: read the JSON
    local ok, doc = pcall(cjson.decode, lock[2])
    if not ok or type(doc) ~= 'table' then doc = {} end
    local project = doc['Project']
    if type(project) ~= 'table' then project = {} end
    lock[11] = project['Path'] or '.'
    lock[12] = doc['Workspace'] or 'default'
  end
  return lock
end

local function read_lock(k)
  local v = redis.call('HMGET', lock_name(k), 'data', 'token', 'at', 'exp', 'repo', 'pull',
                       'claim', 'lease', 'path', 'ws')
  if not v[1] then return nil end
  return with_parts({k, v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], 'exclusive', v[9],
                     v[10]})
end

-- Every shared holder of k (lapsed ones too), oldest grant first.
local function read_shared(k)
  local out = {}
  for _, text in ipairs(redis.call('HVALS', shared_name(k))) do
    table.insert(out, cjson.decode(text))
  end
  table.sort(out, function(a, b) return tonumber(a[3]) < tonumber(b[3]) end)
  return out
end

local function save_shared(lock)
  redis.call('HSET', shared_name(lock[1]), lock[6] .. '#' .. lock[7], cjson.encode(lock))
end

local function lapsed(lock)
  local exp = tonumber(lock[5])
  return exp > 0 and exp <= NOW
end

local function same_owner(lock, repo, pull) return lock[6] == repo and lock[7] == pull end

local function drop_lock(lock)
  local k = lock[1]
  if lock[10] == 'shared' then
    redis.call('HDEL', shared_name(k), lock[6] .. '#' .. lock[7])
    if redis.call('EXISTS', shared_name(k)) == 0 then redis.call('SREM', HELD, k) end
  else
    redis.call('DEL', lock_name(k))
    if redis.call('EXISTS', shared_name(k)) == 0 then redis.call('SREM', HELD, k) end
  end
  redis.call('SREM', pull_index(lock[6], lock[7]), k)
end

local function collect_after(k, exp)
  if exp > 0 then
    redis.call('PEXPIREAT', lock_name(k), exp + GRACE_MS)
  else
    redis.call('PERSIST', lock_name(k))
  end
end

-- The exclusive holder of k, or nil. A lapsed lease is dropped and added to `expired`.
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

-- Every live holder of k (the exclusive one, or the shared ones), changing nothing.
local function holders(k)
  local lock = read_lock(k)
  if lock and not lapsed(lock) then return {lock} end
  local out = {}
  for _, s in ipairs(read_shared(k)) do
    if not lapsed(s) then table.insert(out, s) end
  end
  return out
end

-- Drop k's lapsed leases (exclusive and shared), adding them to `expired` (if given).
local function expire_lapsed(k, expired)
  live(k, expired)
  for _, s in ipairs(read_shared(k)) do
    if lapsed(s) then
      drop_lock(s)
      if expired then table.insert(expired, s) end
    end
  end
end

-- The first holder of k without changing anything (reads).
local function peek(k) return holders(k)[1] end

local function holder_with_token(k, token)
  for _, h in ipairs(holders(k)) do
    if h[3] == token then return h end
  end
  return nil
end

-- Grant k: next fencing token, server time, lease; with `claim` (a waiter id) the grant must
-- be confirmed within CLAIM_MS.
local function stamp(k, data, repo, pull, ttl, claim, mode, path, ws)
  if TOKEN_BASE > 0 and redis.call('EXISTS', fence_name(k)) == 0 then
    redis.call('SET', fence_name(k), int(TOKEN_BASE))
  end
  local token = redis.call('INCR', fence_name(k))
  redis.call('SADD', FENCED, k)
  local lease_end = 0
  if ttl > 0 then lease_end = NOW + ttl end
  local exp = lease_end
  if claim then
    local by = NOW + CLAIM_MS
    if exp == 0 or by < exp then exp = by end
  end
  local pending = false
  if claim then pending = int(lease_end) end
  local lock = {k, data, int(token), int(NOW), int(exp), repo, pull, claim or false, pending,
                mode, path, ws}
  if mode == 'shared' then
    save_shared(lock)
  else
    local name = lock_name(k)
    redis.call('DEL', name)  -- a lapsed lock's hash may linger (with its expiry): start afresh
    redis.call('HSET', name, 'data', data, 'token', int(token), 'at', NOW, 'repo', repo,
               'pull', pull, 'exp', exp, 'path', path, 'ws', ws)
    if claim then redis.call('HSET', name, 'claim', claim, 'lease', lease_end) end
    if exp > 0 then redis.call('PEXPIREAT', name, exp + GRACE_MS) end
  end
  redis.call('SADD', HELD, k)
  redis.call('SADD', pull_index(repo, pull), k)
  return lock
end

-- The waiter took its grant: its own lease applies from the grant on.
local function settle_claim(lock)
  local lease_end = tonumber(lock[9])
  lock[5], lock[8], lock[9] = int(lease_end), false, false
  if lock[10] == 'shared' then
    save_shared(lock)
    return lock
  end
  redis.call('HDEL', lock_name(lock[1]), 'claim', 'lease')
  redis.call('HSET', lock_name(lock[1]), 'exp', lease_end)
  collect_after(lock[1], lease_end)
  return lock
end

-- --- the rules (mirror enhanced_locking.policies.verdict) --------------------------------
local RULES = false
local function rules()
  if not RULES then
    if not ARGV[10] or ARGV[10] == '' then
      RULES = {f = {}, c = {}}
    else
      RULES = cjson.decode(ARGV[10])
    end
  end
  return RULES
end

local function matches(m, key, repo, path, ws)
  if m['repo'] and not string.find(repo, m['repo']) then return false end
  if m['path'] and not (path == m['pathx']
      or string.sub(path, 1, #m['path'] + 1) == m['path'] .. '/') then return false end
  if m['ws'] and not string.find(ws, m['ws']) then return false end
  if m['key'] and not string.find(key, m['key']) then return false end
  return true
end

-- The concurrency groups of a key, in rule order: a list of {group, limit}.
local function groups_of(k, repo, path, ws)
  local out = {}
  for _, c in ipairs(rules()['c']) do
    if matches(c['m'], k, repo, path, ws) then
      local g = c['name']
      if c['per'] == 'repository' then
        g = g .. ':' .. repo
      elseif c['per'] == 'organisation' then
        g = g .. ':' .. (string.match(repo, '^([^/]*)') or '')
      end
      table.insert(out, {g, c['limit']})
    end
  end
  return out
end

local function group_counts()
  local counts = {}
  for _, k in ipairs(redis.call('SMEMBERS', HELD)) do
    for _, h in ipairs(holders(k)) do
      for _, g in ipairs(groups_of(k, h[6], h[11], h[12])) do
        counts[g[1]] = (counts[g[1]] or 0) + 1
      end
    end
  end
  return counts
end

-- The first active freeze covering one of `parts` (a refusing one first): {key, freeze}.
local function active_freeze(parts)
  local found = false
  for _, p in ipairs(parts) do
    for _, f in ipairs(rules()['f']) do
      if (f['from'] == 0 or f['from'] <= NOW) and (f['until'] == 0 or NOW < f['until'])
          and matches(f['m'], p.key, p.repo, p.path, p.ws) then
        if f['refuse'] then return {p.key, f} end
        if not found then found = {p.key, f} end
      end
    end
  end
  return found
end

local function read_waiter(id)
  local flat = redis.call('HGETALL', waiter_name(id))
  if #flat == 0 then return nil end
  local rec = {}
  for i = 1, #flat, 2 do rec[flat[i]] = flat[i + 1] end
  rec.flat = flat
  rec.keys = cjson.decode(rec['keys'])
  rec.mode = rec['mode'] or 'exclusive'
  return rec
end

local function waiter_parts(rec)
  local parts = {}
  for _, k in ipairs(rec.keys) do
    local path, ws = rec['p:' .. k], rec['w:' .. k]
    if not path or not ws then
      local l = with_parts({k, rec['d:' .. k]})
      path, ws = l[11], l[12]
    end
    table.insert(parts, {key = k, repo = rec.repo, path = path, ws = ws})
  end
  return parts
end

-- Whether an exclusive request of another pull waits on k (new shared requests queue then).
local function exclusive_waiting(k, repo, pull)
  for level = 0, 3 do
    for _, member in ipairs(redis.call('ZRANGE', queue_name(k, level), 0, -1)) do
      local rec = read_waiter(string.sub(member, 18))
      if rec and rec.mode == 'exclusive' and not (rec.repo == repo and rec.pull == pull)
          and tonumber(rec.deadline) > NOW then
        return true
      end
    end
  end
  return false
end

-- {'grant'} | {'held', key} | {'frozen', key, freeze} | {'limited', key}
local function verdict(repo, pull, mode, parts, new)
  local hs, mine, all_mine = {}, {}, true
  for _, p in ipairs(parts) do
    hs[p.key] = holders(p.key)
    mine[p.key] = false
    local unchanged = false
    for _, h in ipairs(hs[p.key]) do
      if same_owner(h, repo, pull) then
        mine[p.key] = true
        if not (mode == 'exclusive' and h[10] == 'shared') then unchanged = true end
      end
    end
    if not unchanged then all_mine = false end
  end
  if all_mine then return {'grant'} end
  local frozen = active_freeze(parts)
  if new and frozen and frozen[2]['refuse'] then return {'frozen', frozen[1], frozen[2]} end
  for _, p in ipairs(parts) do
    for _, h in ipairs(hs[p.key]) do
      if not same_owner(h, repo, pull) and (h[10] ~= 'shared' or mode == 'exclusive') then
        return {'held', p.key}
      end
    end
    if new and mode == 'shared' and exclusive_waiting(p.key, repo, pull) then
      return {'held', p.key}
    end
  end
  if frozen then return {'frozen', frozen[1], frozen[2]} end
  if #rules()['c'] == 0 then return {'grant'} end
  local adding, limits, order = {}, {}, {}
  for _, p in ipairs(parts) do
    if not mine[p.key] then
      for _, g in ipairs(groups_of(p.key, p.repo, p.path, p.ws)) do
        if not adding[g[1]] then
          table.insert(order, g[1])
          adding[g[1]] = 0
        end
        adding[g[1]] = adding[g[1]] + 1
        limits[g[1]] = g[2]
      end
    end
  end
  if #order == 0 then return {'grant'} end
  local counts = group_counts()
  for _, g in ipairs(order) do
    if (counts[g] or 0) + adding[g] > limits[g] then
      for _, p in ipairs(parts) do
        for _, pg in ipairs(groups_of(p.key, p.repo, p.path, p.ws)) do
          if pg[1] == g then return {'limited', p.key} end
        end
      end
    end
  end
  return {'grant'}
end

-- The lock a pull gets on k: the one it holds, or a fresh one (an exclusive request of the
-- key's only shared holder is an upgrade: a new token).
local function take(k, data, repo, pull, ttl, claim, mode, path, ws)
  local mine = false
  for _, h in ipairs(holders(k)) do
    if same_owner(h, repo, pull) then mine = h end
  end
  if mine and not (mode == 'exclusive' and mine[10] == 'shared') then return mine, false end
  if mine then drop_lock(mine) end
  return stamp(k, data, repo, pull, ttl, claim, mode, path, ws), true
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

local function before(a, b)
  local ea, eb = effective(a.level, a.enq), effective(b.level, b.enq)
  if ea ~= eb then return ea > eb end
  if a.enq ~= b.enq then return a.enq < b.enq end
  return a.seq < b.seq
end

-- An iterator over k's queue in service order: a 4-way merge of the per-priority queues.
-- `gone(entry)` says the entry just returned left the queue (so the merge does not skip).
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
  local function next_entry()
    local best = false
    for level = 0, 3 do
      local h = heads[level + 1]
      if h and (not best or before(h, best)) then best = h end
    end
    if best then
      index[best.level + 1] = index[best.level + 1] + 1
      heads[best.level + 1] = head(best.level)
    end
    return best
  end
  local function gone(entry)
    index[entry.level + 1] = index[entry.level + 1] - 1
  end
  return next_entry, gone
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

local function unqueue(id, rec)
  local member = string.format('%016d', tonumber(rec.seq)) .. ':' .. id
  for _, k in ipairs(rec.keys) do
    redis.call('ZREM', queue_name(k, rec.level), member)
    if queue_size(k) == 0 then redis.call('SREM', QUEUED, k) end
  end
  redis.call('DEL', waiter_name(id))
end

local function remember(id, rec, kind, locks, fresh)
  local tokens = {}
  for _, lock in ipairs(locks) do table.insert(tokens, {lock[1], lock[3]}) end
  local name = outcome_name(id)
  redis.call('HSET', name, 'kind', kind, 'waiter', cjson.encode(rec.flat),
             'locks', cjson.encode(tokens), 'fresh', fresh or 0)
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

-- fresh 1: some lock is new to the waiter; 0: its pull held every key already (unchanged).
local function grant(id, rec, fx)
  local locks, fresh = {}, 0
  local parts = waiter_parts(rec)
  for i, k in ipairs(rec.keys) do
    local lock, new = take(k, rec['d:' .. k], rec.repo, rec.pull, tonumber(rec.ttl), id,
                           rec.mode, parts[i].path, parts[i].ws)
    table.insert(locks, lock)
    if new then fresh = 1 end
  end
  unqueue(id, rec)
  remember(id, rec, 'granted', locks, fresh)
  tell(rec, id, 'granted')
  table.insert(fx.granted, {rec.flat, locks, fresh})
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

-- Serve k's queue (no concurrency rules): grant each waiter the rules allow, in service
-- order; a waiter held back by k's holders, or an exclusive grant, ends the walk; one held
-- back by a freeze, a limit or another key of its batch keeps its place. Waiters past their
-- deadline or whose replica is gone are dropped.
local function walk_key(k, fx)
  if redis.call('SISMEMBER', QUEUED, k) == 0 then return end  -- nobody waits: done
  local ex = read_lock(k)
  if ex and not lapsed(ex) then return end  -- held exclusively: nobody can be served yet
  local next_waiter, gone = walker(k)
  local dropped = {}
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
      local d = verdict(rec.repo, rec.pull, rec.mode, waiter_parts(rec), false)
      if d[1] == 'grant' then
        grant(entry.id, rec, fx)
        gone(entry)
        if rec.mode ~= 'shared' then break end
      elseif d[1] == 'held' and d[2] == k then
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
end

-- Serve every queue at once, in one service order (concurrency rules: a lock freed in a
-- group may go to a waiter of another key); a holder stops only its own key's line.
local function walk_all(fx)
  local entries, by_id = {}, {}
  for _, k in ipairs(redis.call('SMEMBERS', QUEUED)) do
    for level = 0, 3 do
      local r = redis.call('ZRANGE', queue_name(k, level), 0, -1, 'WITHSCORES')
      for i = 1, #r, 2 do
        local id = string.sub(r[i], 18)
        local e = by_id[id]
        if not e then
          e = {id = id, seq = tonumber(string.sub(r[i], 1, 16)), enq = tonumber(r[i + 1]),
               level = level, refs = {}}
          by_id[id] = e
          table.insert(entries, e)
        end
        table.insert(e.refs, {k, level, r[i]})
      end
    end
  end
  table.sort(entries, before)
  local stopped = {}
  for _, e in ipairs(entries) do
    local rec = read_waiter(e.id)
    if not rec then
      for _, ref in ipairs(e.refs) do
        redis.call('ZREM', queue_name(ref[1], ref[2]), ref[3])
        if queue_size(ref[1]) == 0 then redis.call('SREM', QUEUED, ref[1]) end
      end
    elseif tonumber(rec.deadline) <= NOW then
      drop_waiter(e.id, rec, 'timeout', fx)
    elseif not replica_alive(rec.replica) then
      drop_waiter(e.id, rec, 'unavailable', fx)
    else
      local blocked = false
      for _, k in ipairs(rec.keys) do
        if stopped[k] then blocked = true end
      end
      if not blocked then
        local d = verdict(rec.repo, rec.pull, rec.mode, waiter_parts(rec), false)
        if d[1] == 'grant' then
          grant(e.id, rec, fx)
        elseif d[1] == 'held' then
          stopped[d[2]] = true
        end
      end
    end
  end
end

-- Serve the queues of `keys` (in the order given), or every queue under concurrency rules.
local function serve(keys, fx)
  if #rules()['c'] > 0 then
    walk_all(fx)
    return
  end
  for _, k in ipairs(keys) do walk_key(k, fx) end
end

-- The first holder of k after expiring lapsed leases and serving grantable waiters.
local function settle(k, fx)
  expire_lapsed(k, fx.expired)
  serve({k}, fx)
  return peek(k)
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
-- acquire-or-enqueue: grant every key of a batch (one key is a batch of one) as the rules
-- allow, or queue one waiter on every key, or refuse.
-- KEYS   the lock hash of each key (documentation; names are derived from the keys below)
-- ARGV[11] lease in ms (0: none)  ARGV[12] waiter id ('' = fail fast)  ARGV[13] wait in ms
-- ARGV[14] request id ('' none)  ARGV[15] owner repo  ARGV[16] owner pull
-- ARGV[17] base priority level 0..3  ARGV[18] mode  ARGV[19] head commit ('' unknown)
-- ARGV[20] caller ('' none)  ARGV[21..] quads: lock key, Atlantis JSON, path, workspace
-- returns {'granted', {lock...}, fresh 0/1}
--         {'held' | 'limited', key, its holder or {}}
--         {'frozen', key, its holder or {}, freeze name}
--         {'queue_full', key, lock or {}, superseded waiter records}
--         {'queued', waiter record (flat), key, its holder or {}, position, freeze name or '',
--          superseded waiter records}
local refused = guard()
if refused then return refused end
local ttl, wait_id, wait_ms = tonumber(ARGV[11]), ARGV[12], tonumber(ARGV[13])
local rid, repo, pull, level = ARGV[14], ARGV[15], ARGV[16], ARGV[17]
local mode, head, caller = ARGV[18], ARGV[19], ARGV[20]
local keys, datas, parts = {}, {}, {}
for i = 21, #ARGV, 4 do
  table.insert(keys, ARGV[i])
  datas[ARGV[i]] = ARGV[i + 1]
  table.insert(parts, {key = ARGV[i], repo = repo, path = ARGV[i + 2], ws = ARGV[i + 3]})
end
if wait_id ~= '' then
  local rec = read_waiter(wait_id)
  if rec then  -- the same waiter asking again (a retry takes it over): where it stands
    if caller ~= '' and rec['caller'] ~= caller then
      redis.call('HSET', waiter_name(wait_id), 'caller', caller, 'replica', REPLICA)
      rec = read_waiter(wait_id)
    end
    local k = rec.keys[1]
    return {'queued', rec.flat, k, peek(k) or {}, position(k, wait_id), '', {}}
  end
  local out = redis.call('HMGET', outcome_name(wait_id), 'kind', 'locks')
  if out[1] == 'granted' then  -- granted while its caller was away: the retry takes it
    local still, all = {}, true
    for _, pair in ipairs(cjson.decode(out[2])) do
      local h = holder_with_token(pair[1], pair[2])
      if h then
        if h[8] then settle_claim(h) end
        table.insert(still, h)
      else
        all = false
      end
    end
    if all and #still > 0 then
      redis.call('HSET', outcome_name(wait_id), 'kind', 'taken')
      return {'granted', still, 0}
    end
  end
end
local fx = new_effects()
for _, k in ipairs(keys) do expire_lapsed(k, fx.expired) end
serve(keys, fx)
local d = verdict(repo, pull, mode, parts, true)
if d[1] == 'grant' then
  local locks, fresh = {}, 0
  for i, k in ipairs(keys) do
    local lock, new = take(k, datas[k], repo, pull, ttl, false, mode, parts[i].path, parts[i].ws)
    table.insert(locks, lock)
    if new then fresh = 1 end
  end
  return {'granted', locks, fresh}
end
local blocked = d[2]
local holder = peek(blocked) or {}
local waits = wait_id ~= '' and wait_ms > 0
if d[1] == 'frozen' and (d[3]['refuse'] or not waits) then
  return {'frozen', blocked, holder, d[3]['name']}
end
if not waits then return {d[1], blocked, holder} end
-- A newer head commit of the same pull pushes its older queued requests out.
local superseded = {}
if head ~= '' then
  local stale = {}
  for _, k in ipairs(keys) do
    for lv = 0, 3 do
      for _, member in ipairs(redis.call('ZRANGE', queue_name(k, lv), 0, -1)) do
        local id = string.sub(member, 18)
        if id ~= wait_id and not stale[id] then
          local rec = read_waiter(id)
          if rec and rec.repo == repo and rec.pull == pull and (rec['head'] or '') ~= ''
              and rec['head'] ~= head then
            stale[id] = rec
          end
        end
      end
    end
  end
  for id, rec in pairs(stale) do
    drop_waiter(id, rec, 'superseded', nil)
    table.insert(superseded, rec.flat)
  end
end
for _, k in ipairs(keys) do
  if queue_size(k) >= POLICY.max_size then
    return {'queue_full', k, peek(k) or {}, superseded}
  end
end
redis.call('ZADD', REPLICAS, NOW + REPLICA_MS, REPLICA)
local seq = redis.call('INCR', SEQ)
local deadline = NOW + wait_ms
local name = waiter_name(wait_id)
redis.call('HSET', name, 'id', wait_id, 'keys', cjson.encode(keys), 'repo', repo, 'pull', pull,
           'level', level, 'enq', NOW, 'seq', seq, 'deadline', deadline, 'ttl', ttl,
           'replica', REPLICA, 'rid', rid, 'mode', mode, 'head', head, 'caller', caller)
for i, k in ipairs(keys) do
  redis.call('HSET', name, 'd:' .. k, datas[k], 'p:' .. k, parts[i].path, 'w:' .. k,
             parts[i].ws)
end
redis.call('PEXPIREAT', name, deadline + GRACE_MS)
local member = string.format('%016d', seq) .. ':' .. wait_id
for _, k in ipairs(keys) do
  redis.call('ZADD', queue_name(k, level), NOW, member)
  redis.call('SADD', QUEUED, k)
end
local freeze = ''
if d[1] == 'frozen' then freeze = d[3]['name'] end
return {'queued', read_waiter(wait_id).flat, blocked, holder, position(blocked, wait_id), freeze,
        superseded}
""")

RELEASE = _script("""
-- release-and-hand-off: free a key (optionally only the lock of the pull that holds it) and
-- serve its queue; also the admin's force-unlock (no owner: every holder goes).
-- KEYS[1] the key's lock hash
-- ARGV[11] lock key  ARGV[12] owner repo ('' = whoever holds it)  ARGV[13] owner pull
-- returns {'not_owned', lock} (nothing changed), or
--         {'released', lock or {}, granted, dropped, other locks released} where granted is a
--         list of {waiter record, {lock...}} and dropped a list of waiter records
local refused = guard()
if refused then return refused end
local k = ARGV[11]
expire_lapsed(k, nil)
local hs = holders(k)
if ARGV[12] ~= '' then
  local mine = {}
  for _, h in ipairs(hs) do
    if same_owner(h, ARGV[12], ARGV[13]) then table.insert(mine, h) end
  end
  if #hs > 0 and #mine == 0 then return {'not_owned', hs[1]} end
  hs = mine
end
for _, h in ipairs(hs) do drop_lock(h) end
local fx = new_effects()
serve({k}, fx)
local others = {}
for i = 2, #hs do table.insert(others, hs[i]) end
return {'released', hs[1] or {}, fx.granted, fx.dropped, others}
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
-- release-by-pull: free every lock a pull holds and serve each key's queue.
-- KEYS   none (the pull's index is derived)
-- ARGV[11] repo  ARGV[12] pull number
-- returns {released locks (leases still running), granted, dropped}
local refused = guard()
if refused then return refused end
local index = pull_index(ARGV[11], ARGV[12])
local released, freed = {}, {}
for _, k in ipairs(redis.call('SMEMBERS', index)) do
  local found = {}
  local holder = read_lock(k)
  if holder then table.insert(found, holder) end
  local text = redis.call('HGET', shared_name(k), ARGV[11] .. '#' .. ARGV[12])
  if text then table.insert(found, cjson.decode(text)) end
  for _, lock in ipairs(found) do
    if same_owner(lock, ARGV[11], ARGV[12]) then
      drop_lock(lock)
      table.insert(freed, k)
      if not lapsed(lock) then table.insert(released, lock) end
    end
  end
end
redis.call('DEL', index)
-- Every key is freed first, then each queue is served, in key order (as every backend does).
table.sort(freed)
local fx = new_effects()
serve(freed, fx)
return {released, fx.granted, fx.dropped}
""")

CANCEL = _script("""
-- cancel: take a waiter out of every queue it is in and tell its replica why.
-- KEYS   none (the waiter's record names its keys)
-- ARGV[11] waiter id  ARGV[12] reason (cancelled, timeout, deadlock, unavailable)
-- ARGV[13] caller ('': any; else only if that caller still owns the waiter)
-- returns {'removed', waiter record}, {'kept', waiter record} (a retry owns it now),
--         {'none'}, or, when it had been granted already,
--         {'granted', waiter record, locks it still holds (now confirmed), fresh 0/1}
local refused = guard()
if refused then return refused end
local id = ARGV[11]
local rec = read_waiter(id)
if rec then
  if ARGV[13] ~= '' and rec['caller'] ~= ARGV[13] then return {'kept', rec.flat} end
  drop_waiter(id, rec, ARGV[12], nil)
  return {'removed', rec.flat}
end
local out = redis.call('HMGET', outcome_name(id), 'kind', 'waiter', 'locks', 'fresh')
if out[1] ~= 'granted' then return {'none'} end
local still = {}
for _, pair in ipairs(cjson.decode(out[3])) do
  local holder = holder_with_token(pair[1], pair[2])
  if holder then
    if holder[8] then settle_claim(holder) end
    table.insert(still, holder)
  end
end
return {'granted', cjson.decode(out[2]), still, tonumber(out[4]) or 1}
""")

CONFIRM = _script("""
-- confirm: the waiter's replica takes the locks it was granted (ends the claim).
-- KEYS   none
-- ARGV[11] waiter id
-- returns {'granted', locks, fresh 0/1} or {'lost', locks it still holds and must give back}
-- (a claim lapsed first; none when its pull held them already: fresh 0)
local refused = guard()
if refused then return refused end
local out = redis.call('HMGET', outcome_name(ARGV[11]), 'kind', 'locks', 'fresh')
if out[1] ~= 'granted' then return {'lost', {}} end
local fresh = tonumber(out[3]) or 1
local held, lost = {}, false
for _, pair in ipairs(cjson.decode(out[2])) do
  local holder = holder_with_token(pair[1], pair[2])
  if holder then
    if holder[8] == ARGV[11] then settle_claim(holder) end
    table.insert(held, holder)
  else
    lost = true
  end
end
if lost then
  if fresh == 0 then return {'lost', {}} end
  return {'lost', held}
end
return {'granted', held, fresh}
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
  local found = read_shared(k)
  local ex = read_lock(k)
  if ex then table.insert(found, 1, ex) end
  local kept = false
  for _, lock in ipairs(found) do
    if index == HELD or same_owner(lock, ARGV[11], ARGV[12]) then kept = true end
    if not lapsed(lock) and (ARGV[13] == '' or lock[6] == ARGV[13])
        and (ARGV[14] == '' or lock[7] == ARGV[14]) then
      table.insert(out, lock)
    end
  end
  if not kept then redis.call('SREM', index, k) end
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
local hs = holders(ARGV[11])
if #hs == 0 then return {'not_held'} end
local lock = false
for _, h in ipairs(hs) do
  if same_owner(h, ARGV[12], ARGV[13]) then lock = h end
end
if not lock then return {'not_owned', hs[1]} end
local exp = NOW + tonumber(ARGV[14])
lock[5], lock[8], lock[9] = int(exp), false, false
if lock[10] == 'shared' then
  save_shared(lock)
else
  redis.call('HDEL', lock_name(ARGV[11]), 'claim', 'lease')
  redis.call('HSET', lock_name(ARGV[11]), 'exp', exp)
  collect_after(ARGV[11], exp)
end
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
-- wait-graph: every key with waiters, its holders' owners and its waiters, in one snapshot
-- (so deadlock detection sees the waits of every replica at once).
-- KEYS   none
-- returns {now ms, {{key, first holder repo or '', its pull or '', {waiter ids},
--          {{repo, pull} of every holder}}...}, waiter records}
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
    local owners = {}
    for _, h in ipairs(holders(k)) do table.insert(owners, {h[6], h[7]}) end
    if #owners > 0 then
      table.insert(entries, {k, owners[1][1], owners[1][2], ids, owners})
    else
      table.insert(entries, {k, '', '', ids, owners})
    end
  end
end
return {NOW, entries, records}
""")

HOLDERS = _script("""
-- holders: every live holder of a key (one, or several when held shared), changing nothing.
-- KEYS[1] the key's lock hash
-- ARGV[11] lock key
-- returns a list of locks
return holders(ARGV[11])
""")

WAKE = _script("""
-- wake: serve every queue (the rules changed, or a freeze started or ended).
-- KEYS   none
-- returns {{}, granted, dropped} (as RELEASE)
local refused = guard()
if refused then return refused end
local keys = redis.call('SMEMBERS', QUEUED)
table.sort(keys)
local fx = new_effects()
serve(keys, fx)
return {{}, fx.granted, fx.dropped}
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
-- adopt: take over a lock from another store, keeping its token, times, lease and mode.
-- KEYS[1] the key's lock hash
-- ARGV[11] lock key  ARGV[12] repo  ARGV[13] pull  ARGV[14] Atlantis JSON  ARGV[15] token
-- ARGV[16] acquired at (ms)  ARGV[17] lease end (ms, 0: none)  ARGV[18] mode
-- ARGV[19] path  ARGV[20] workspace
-- returns 1 adopted (or already held by the same pull), 0 held here by another pull,
--         2 skipped because its lease already ended
local refused = guard()
if refused then return refused end
local k = ARGV[11]
local token = tonumber(ARGV[15])
local current = tonumber(redis.call('GET', fence_name(k)) or '0')
redis.call('SADD', FENCED, k)
if token > current then redis.call('SET', fence_name(k), ARGV[15]) end
expire_lapsed(k, nil)
local mode = ARGV[18]
for _, h in ipairs(holders(k)) do
  if same_owner(h, ARGV[12], ARGV[13]) then return 1 end
  if mode ~= 'shared' or h[10] ~= 'shared' then return 0 end
end
local exp = tonumber(ARGV[17])
if exp > 0 and exp <= NOW then return 2 end
if mode == 'shared' then
  save_shared({k, ARGV[14], ARGV[15], ARGV[16], ARGV[17], ARGV[12], ARGV[13], false, false,
               'shared', ARGV[19], ARGV[20]})
else
  redis.call('HSET', lock_name(k), 'data', ARGV[14], 'token', ARGV[15], 'at', ARGV[16],
             'exp', exp, 'repo', ARGV[12], 'pull', ARGV[13], 'path', ARGV[19], 'ws', ARGV[20])
  collect_after(k, exp)
end
redis.call('SADD', HELD, k)
redis.call('SADD', pull_index(ARGV[12], ARGV[13]), k)
return 1
""")

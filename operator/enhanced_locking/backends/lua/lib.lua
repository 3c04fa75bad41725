-- The library the scripts of the Redis backend share. redis_scripts.py loads it into Redis
-- once, as a function library, with each script as a function of it (a call runs `begin`,
-- then the script's file). Before it comes a generated preamble setting the time constants
-- of redis_scripts.py: CLAIM_MS, GRACE_MS, OUTCOME_MS, REPLICA_MS, OP_MS
-- KEYS[1..7] the namespace's own keys, named by RedisKeys (redis_store.py), in this order:
--   incarnation, op:<call id>, held, fenced, queued, liveness, seq; every other key a script
--   touches follows (KEYS[8..], in no fixed order: names are looked up, never positions).
--   On a Redis Cluster every key of a namespace carries one hash tag.
-- Names kept in stored data from before the names below: the incarnation hash is stored
--   under the key `epoch` and the waiters' liveness set under `replicas` (RedisKeys keeps
--   both names, so a store written by an earlier release is read as it is), and a waiter's
--   record keeps its replica id in the field `replica`. Renaming them would need a
--   migration of stored data; inside the scripts they are the incarnation, the liveness set
--   and the replica id.
-- ARGV[1] base: RedisKeys.base, the start of every key name of the namespace; the names
--   of keys found while the script runs (a waiter's record, the lock of a key in an index)
--   are formed from it by the *_name functions below, the mirror of RedisKeys
-- ARGV[2..5] queue policy: priority flag 0/1, starvation threshold ms, max boost, max queue size
-- ARGV[6] the calling replica's id (the service's replica id; its waiters' notifications go to
--         the channel notify:<replica id>)
-- ARGV[7..9] the store's incarnation the caller knows ('' none yet), a fresh id (the call id;
--            also the id of a new incarnation if one must start), the restart quarantine in ms
-- ARGV[10] the policy rules compiled by enhanced_locking.policies.compile_rules (JSON, '' none)
-- Script-specific arguments start at ARGV[11]. (The lean functions take a shorter layout:
-- `begin_lean` below.)
-- A refused write (guard) replies {'incarnation' | 'quarantine', incarnation id, until ms,
-- now ms}
-- (decoded by redis_replies.refusal); a lock is the row `read_lock` answers (redis_replies.lock).
-- luacheck: push ignore 211
-- The state of one call: Redis runs one function at a time, so the library's upvalues below
-- are the running call's. `begin` sets every one of them first (the same values the scripts
-- computed for themselves when each was a script of its own).
local KEYS, ARGV
-- redis.call and redis.pcall, taken once (at the first call's `begin`: loading the library
-- may not touch them): each `redis.call` reads the global `redis`, then its field, two table
-- lookups a command.
local CALL, PCALL = false, false
local base, POLICY, REPLICA_ID, KNOWN_INCARNATION, NEW_INCARNATION, QUARANTINE_MS, NOW
local INCARNATION, OP, HELD, FENCED, QUEUED, LIVENESS, SEQ
local TOKEN_BASE = 0
local RULES = false
local LEAN_CALL = false
local alive = {}
local fetched = {}

local function begin(keys, args)
  KEYS, ARGV = keys, args
  if not CALL then CALL, PCALL = redis.call, redis.pcall end
  base = ARGV[1]
  POLICY = false  -- read from ARGV[2..5] when first asked for (`policy`)
  LEAN_CALL = false
  REPLICA_ID = ARGV[6]
  KNOWN_INCARNATION, NEW_INCARNATION, QUARANTINE_MS = ARGV[7], ARGV[8], ARGV[9]
  local clock = CALL('TIME')
  NOW = clock[1] * 1000 + math.floor(clock[2] / 1000)  -- (Lua reads the digits as numbers)
  INCARNATION, OP, HELD, FENCED, QUEUED = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
  LIVENESS, SEQ = KEYS[6], KEYS[7]
  TOKEN_BASE = 0
  RULES = false
  alive = {}
  fetched = {}
end

-- `begin` of the lean functions (LEAN_ACQUIRE, LEAN_RELEASE), which take only what their code
-- reads: KEYS[1..5] incarnation, op:<call id>, held, fenced, queued (the namespace's keys in
-- `begin`'s order, without the liveness set and seq); ARGV[1] the store's incarnation the
-- caller knows (ARGV[7] of the other scripts); their own arguments start at ARGV[2]. No base
-- (they form no name), no call id (it ends KEYS[2]: `fresh_id`), no restart quarantine (a
-- store that lost its data is left to the full scripts: `guard`), no queue policy, replica id
-- or rules: the caller sends a call there only without rules, and nothing there serves a
-- queue. Each argument costs Redis about 0.4k instructions a call (read, copied into KEYS or
-- ARGV), and about 1.7k more where it makes a ninth (Redis's Lua grows the table then).
local function begin_lean(keys, args)
  KEYS, ARGV = keys, args
  if not CALL then CALL, PCALL = redis.call, redis.pcall end
  -- (`base` is left as it is: a lean call forms no name, and `checked` fails one that would)
  POLICY = false
  LEAN_CALL = true
  REPLICA_ID = false
  -- (ARGV[1] is the incarnation here, not base as in `begin`: read as the layout's own)
  KNOWN_INCARNATION, NEW_INCARNATION, QUARANTINE_MS = args[1], false, false
  NOW = false  -- read when first needed (`clock`): a lean release of a lock without a lease
               -- reads no TIME (in a store without a quarantine in force)
  INCARNATION, OP, HELD, FENCED, QUEUED = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
  LIVENESS, SEQ = false, false
  TOKEN_BASE = 0
  RULES = false
  fetched = {}  -- (`alive` is not reset: only a queue walk reads it, and no lean call walks)
end

-- The server's time in ms, read once per call: `begin` reads it at once (the full scripts
-- read NOW everywhere), a lean call when it first needs it (`begin_lean`).
local function clock()
  if not NOW then
    local t = CALL('TIME')
    NOW = t[1] * 1000 + math.floor(t[2] / 1000)  -- (Lua reads the digits as numbers)
  end
  return NOW
end

-- Whole numbers as exact text: Lua's own tostring keeps 14 digits, tokens can have 16.
-- '%d' prints Redis's Lua numbers (doubles, whole to 2^53) as the 64-bit integers they are;
-- '%.0f' printed the double itself, which cost Redis about 2.7k instructions more a number.
-- Only for whole numbers below 2^63 (every caller's: tokens, clock ms, counts): '%d' of a
-- larger number or of NaN prints a wrong (negative) integer.
local function int(x) return string.format('%d', x) end

-- Whether reply is Redis's refusal of a command because of what its key holds: another Redis
-- type (WRONGTYPE), or, for INCR, a value that is not a whole number it can raise. The scripts
-- read those as a key written over by something else (`redis.pcall`). Any other refusal is not
-- about the value stored (an ACL user denied the command or the key: Redis 7.0 says "The user
-- executing the script can't ..."; OOM, READONLY or NOREPLICAS, which Redis 6.2 gives a
-- script's first write): it is raised, and the call fails with Redis's own error, which the
-- service reports as Redis refusing it. Read as another type, it would have a readable index
-- rebuilt (and found "not a set" again), a lock reported unreadable, a counter marked damaged.
local function is_error(reply)
  if type(reply) ~= 'table' then return false end
  local err = reply['err']
  if err == nil then return false end
  if string.find(err, '^WRONGTYPE') or string.find(err, '^ERR value is not an integer')
      or string.find(err, '^ERR increment or decrement would overflow') then
    return true
  end
  error(reply)
end

-- Whether v is stored text that reads as a whole number INCR can raise (digits, at most 18).
local function whole(v)
  return type(v) == 'string' and string.match(v, '^%d+$') ~= nil and #v <= 18
end

-- The queue policy of ARGV[2..5], read the first time a call needs it (most never do).
local function policy()
  if not POLICY then
    if LEAN_CALL then error('a lean function has no queue policy') end
    POLICY = {priority = tonumber(ARGV[2]), threshold = tonumber(ARGV[3]),
              boost = tonumber(ARGV[4]), max_size = tonumber(ARGV[5])}
  end
  return POLICY
end

-- --- declared keys -----------------------------------------------------------------------
-- Every key a script touches is in KEYS (Redis Cluster's rule). The names of keys a script
-- finds while it runs (a waiter named by a queue entry, the lock of a key in an index) are
-- formed by the *_name functions below, and each formed name is checked against KEYS: a
-- script first finds out which names it will need (its discovery, reads only) and, when one
-- is not declared, answers {'need', names} having written nothing; its caller calls again
-- with them declared (RedisBackend._run). Every write goes through `w`; a name missing after
-- the first write would be a discovery that missed it, and fails the call loudly (the tests
-- run every script this way; it is never relied on).
-- The state below belongs to one call: it starts afresh when KEYS is another table (each
-- call has its own), so it holds whether the library runs per script or as functions.
local CALL_KEYS, DECLARED, MISSING, ASKED, WROTE, COLLECT = false, {}, {}, {}, false, 0
local PROBE = false  -- inside `declared`: a name is only looked up
-- (a lean call reads no waiter: its MEMO is NO_MEMO, one empty table nothing writes, rather
-- than a table made per call; each table a call makes costs Redis about 0.35k instructions,
-- and as much again in Lua's collector)
local NO_MEMO = {}
local MEMO = {}  -- by key: the waiter records read_waiter read, until the call's first write
local VIEW, GONE = {}, {}  -- the discovery's picture of holders and waiters (see `serve`)
local NEED = {}  -- raised (as an error value) when a name to read is not declared
-- Found of the store's own keys written over by something else (another Redis type, a
-- counter that is not a number), by key: DAMAGE[k] why k's fencing counter cannot serve a
-- grant (false: it can), QUEUE_DAMAGE[k] why one of k's queues cannot be read.
local DAMAGE, QUEUE_DAMAGE = {}, {}
local INDEX = {}  -- raised (as an error value) when an index set is of another type
local BROKEN = false  -- that index: {name, why}

local function call_state()
  if CALL_KEYS ~= KEYS then
    if LEAN_CALL then  -- a lean call forms no name (it takes its keys by position): no set
      CALL_KEYS, WROTE, MEMO = KEYS, false, NO_MEMO
      return
    end
    local keys, first = KEYS, 1
    CALL_KEYS, MISSING, ASKED, WROTE, COLLECT = keys, {}, {}, false, 0
    if #keys >= 7 then  -- the namespace's own keys: one constructor sizes the set at once
      DECLARED = {[keys[1]] = true, [keys[2]] = true, [keys[3]] = true, [keys[4]] = true,
                  [keys[5]] = true, [keys[6]] = true, [keys[7]] = true}
      first = 8
    else
      DECLARED = {}
    end
    VIEW, GONE, MEMO = {}, {}, {}
    DAMAGE, QUEUE_DAMAGE, BROKEN = {}, {}, false
    for i = first, #keys do DECLARED[keys[i]] = true end
  end
end

-- `name` if declared. Else it is noted as needed; inside `expect` (names a later step will
-- touch) that is all, otherwise the key is to be read now, so the script stops and asks.
local function checked(name)
  call_state()
  if LEAN_CALL then  -- (no set was built: `call_state`)
    error('a lean function formed the name ' .. name .. ': it takes its keys by position', 0)
  end
  if DECLARED[name] then return name end
  if PROBE then return false end
  if WROTE then error('script touched the undeclared key ' .. name .. ' after a write') end
  if not ASKED[name] then
    ASKED[name] = true
    table.insert(MISSING, name)
  end
  if COLLECT == 0 then error(NEED) end
  return name
end

-- Form the names fn(...) forms, noting the undeclared ones without stopping.
local function expect(fn, ...)
  call_state()
  COLLECT = COLLECT + 1
  fn(...)
  COLLECT = COLLECT - 1
end

-- The name fn(...) forms if it is declared, else false (nothing noted, nothing touched).
local function declared(fn, ...)
  call_state()
  PROBE = true
  local found = fn(...)
  PROBE = false
  return found or false
end

-- Stop and ask for every name noted so far (the end of a discovery).
local function ask()
  call_state()
  if #MISSING > 0 then error(NEED) end
end

-- Every write: after it, no undeclared name may turn up.
-- (A discovery reads what the writes that follow read again: the holders are kept per key
-- (`fetched`, below) until the call writes them, the waiter records it read in MEMO until
-- its first write. A lean call's MEMO is NO_MEMO, always empty: not asked, as `next` is a
-- global read and a call of its own, about 0.5k instructions a write.)
local function w(...)
  if CALL_KEYS ~= KEYS then call_state() end  -- (set up already: no call, as most writes)
  WROTE = true
  if MEMO ~= NO_MEMO and next(MEMO) ~= nil then MEMO = {} end
  return CALL(...)
end

-- A write that may meet another Redis type where the store keeps one of its own (written over
-- by something else): its reply, or nil when Redis refused it, having changed nothing. Used
-- where that is not an error: an index entry added or removed (an index of another type is
-- rebuilt when it is read: `members`), a member taken out of a set or queue that is not one
-- (nothing of ours is there), and the fencing counter, which `stamp` takes first.
local function w_try(...)
  if CALL_KEYS ~= KEYS then call_state() end
  local reply = PCALL(...)
  -- (0 or 1, the answer of most: known not to be Redis's refusal without a call to `type`)
  if reply ~= 1 and reply ~= 0 and type(reply) == 'table' and reply['err'] and is_error(reply) then
    return nil
  end
  WROTE = true
  if MEMO ~= NO_MEMO and next(MEMO) ~= nil then MEMO = {} end
  return reply
end

-- The id of an incarnation this call starts: its call id (ARGV[8] of a full script; a lean
-- call's is the end of its KEYS[2], op:<call id>).
local function fresh_id() return NEW_INCARNATION or string.match(OP, '[^:]*$') end

-- A script that changes anything first asks: did this very call run already (a retry)? does
-- Redis still have the data the caller knew (the store's incarnation)? Returns nil to go on, else
-- the reply to send back (nothing changed). With `unsent` the caller has found nothing kept
-- under the call id (`lean_absent`), and the GET is not sent.
local function guard(unsent)
  local done = not unsent and CALL('GET', OP)
  if done then  -- this very call ran before: the same answer
    local ok, kept = pcall(cjson.decode, done)
    -- Every answer kept is JSON, and a table in it has a list part or nothing (`as_answered`);
    -- anything else was written over by something else (another type there fails the GET,
    -- which the caller finds out by itself): the caller deletes it and calls again, and the
    -- call runs as a first call (redis_replies.spoiled_answer).
    if ok and not (type(kept) == 'table' and kept[1] == nil and next(kept) ~= nil) then
      if LEAN_CALL then return done end  -- (a lean function answers the text it kept)
      return kept
    end
    return {'spoiled_answer', ok and 'a JSON object' or 'not JSON'}
  end
  local e = PCALL('HMGET', INCARNATION, 'id', 'base', 'until')
  local why = false
  if e['err'] and is_error(e) then  -- (HMGET answers a list, or Redis's refusal: a table)
    why = 'not a hash (Redis type ' .. CALL('TYPE', INCARNATION)['ok'] .. ')'
  elseif e[1] and not ((e[2] == '0' or whole(e[2])) and (e[3] == '0' or whole(e[3]))) then
    -- (each compared as the text '0' first, which nearly every call finds: no pattern then)
    why = 'a hash whose base or until is not a whole number'
  end
  if why then
    -- Another Redis type where the incarnation is kept, or a hash of it whose numbers do not
    -- read (written over by something else): the locks and counters are where they were, so
    -- a new incarnation starts at once, without quarantine; counters started from now on
    -- continue from the clock, above any token a lost counter could have handed out. The
    -- reply's fifth field says why (Python logs it).
    local now, id = clock(), fresh_id()
    w('DEL', INCARNATION)
    w('HSET', INCARNATION, 'id', id, 'base', int(now * 1000), 'until', 0,
               'since', now, 'replaced', why)
    return {'incarnation', id, 0, now, why}
  end
  if not e[1] then
    local now, id = clock(), fresh_id()
    if KNOWN_INCARNATION == '' then  -- a new store: counters start at 0
      w('HSET', INCARNATION, 'id', id, 'base', 0, 'until', 0, 'since', now)
      return {'incarnation', id, 0, now}
    end
    -- The caller knew this store and it has forgotten everything (a restart without
    -- persistence): tokens continue from the clock, and grants wait out the quarantine. A
    -- lean call is not told the quarantine (once per lost store, not an argument every call):
    -- it writes nothing and the caller sends the call to the full script, which starts the
    -- new incarnation.
    if not QUARANTINE_MS then return {'full'} end
    local till = now + tonumber(QUARANTINE_MS)
    w('HSET', INCARNATION, 'id', id, 'base', int(now * 1000), 'until', till,
               'since', now, 'lost', KNOWN_INCARNATION)
    return {'incarnation', id, till, now}
  end
  if e[1] ~= KNOWN_INCARNATION then
    if KNOWN_INCARNATION ~= '' and e[2] == '0' then
      -- A store started anew (counters from 0) by a caller that knew none before it (a
      -- replica started after Redis lost its data), while this caller knew another one: the
      -- data was lost and nobody started the quarantine. It starts now, as if this caller had
      -- been the first: grants wait it out, and counters continue from the clock (those
      -- started meanwhile too: `stamp`). A lean call leaves it to the full script.
      if not QUARANTINE_MS then return {'full'} end
      local now = clock()
      local till = now + tonumber(QUARANTINE_MS)
      w('HSET', INCARNATION, 'base', int(now * 1000), 'until', till, 'lost', KNOWN_INCARNATION)
      return {'incarnation', e[1], till, now}
    end
    return {'incarnation', e[1], tonumber(e[3]), clock()}
  end
  -- (`until` is 0 unless a quarantine was started: then no clock is needed; `base` is 0 in a
  -- store that never lost its data. Each is compared as the text stored before it is read as
  -- a number: a number read from text costs Redis about 1k instructions.)
  local till = e[3]
  if till ~= '0' and tonumber(till) > clock() then
    return {'quarantine', e[1], tonumber(till), NOW}
  end
  TOKEN_BASE = e[2] == '0' and 0 or tonumber(e[2])
  return nil
end

-- The lean functions' first read: one EXISTS of the call id's kept answer, of the key's
-- holders' hashes (the shared holders', and the lock's when given) and of the `queued` index.
-- On a first send for a free key, nearly every lean call, none of the first ones is there,
-- and the call sends neither the GET of its call id (`guard`) nor the EXISTS of the holders
-- (`grant_free`, `release_own`): one command a call instead of two. Anything found (a retry,
-- a key held, an answer written over by something else) sends the call down the usual reads,
-- in their usual order, which tell the cases apart as before.
-- The index is named once more than the other names together (4 times beside 3 names, 3
-- beside 2), so the count says both: it adds that many when the index is there, the others
-- at most one fewer. With no key of the namespace waited for (no index: Redis deletes an
-- empty set, and `queue_left` takes out a key whose last waiter left), nobody waits for this
-- key either and its SISMEMBER (`maybe_queued`) is not sent; else it is, as before. The two
-- answers: nothing kept and no holder; the `queued` index absent.
local function lean_absent(shared_hash, lock_hash)
  if lock_hash then
    local n = CALL('EXISTS', OP, lock_hash, shared_hash, QUEUED, QUEUED, QUEUED, QUEUED)
    return n % 4 == 0, n < 4
  end
  local n = CALL('EXISTS', OP, shared_hash, QUEUED, QUEUED, QUEUED)
  return n % 3 == 0, n < 3
end

-- A reply as Redis answers it: each table's list part only. (A row may carry marks of its
-- own, `ex` or `bad`, which Redis leaves out of a reply; cjson would turn such a table into
-- a JSON object, read back as a table with no list part: an empty answer.)
local function as_answered(v)
  if type(v) ~= 'table' then return v end
  local out = {}
  for i = 1, #v do out[i] = as_answered(v[i]) end
  return out
end

-- Remember a write's answer under its call id for OP_MS: a caller that lost the reply
-- (the connection broke) asks again with the same id and gets the same answer, and the write
-- happens once.
-- Each SET of a kept answer (here, `finish_flat`, `finish_took`) carries GET. The key is
-- absent when it runs: the call's first read found nothing there (`lean_absent`'s EXISTS, or
-- `guard`'s GET, which answers the call from an answer kept there and fails on a key of
-- another type), and nothing between writes it. So GET finds nothing and Redis answers nil,
-- which reaches Lua as false; a SET without GET answers the status OK, which Redis makes
-- into a Lua table with an `ok` field (about 1.2k instructions more a SET, counted under
-- callgrind).
local OP_PX = OP_MS .. ''  -- as text once (at load), not converted by every call
local function finish(reply)
  w('SET', OP, cjson.encode(as_answered(reply)), 'PX', OP_PX, 'GET')
  return reply
end

-- `finish` of the lean paths' answers, which are flat lists of strings made by the call
-- (nothing to leave out: `as_answered` would copy them as they are). A lean function (LEAN_CALL)
-- answers the text it keeps, one string, which the caller decodes as JSON: Redis turns a table
-- answered into a reply element by element, after looking up the marks a table may carry
-- (`err`, `ok`, `map`...), about 5k instructions for these four or five strings; one string
-- costs it a few hundred. ACQUIRE's and RELEASE's lean paths answer the table, as the rest
-- of those scripts do.
local function finish_flat(reply)
  local text = cjson.encode(reply)
  w('SET', OP, text, 'PX', OP_PX, 'GET')
  if LEAN_CALL then return text end
  return reply
end

-- A grant's {'took', token, at, exp} holds numbers formatted by `int` (digits, nothing JSON
-- escapes), so its text is the one cjson would make, written without cjson (which costs
-- Redis more than the SET that keeps it).
local function finish_took(token, at, exp)
  local text = '["took","' .. token .. '","' .. at .. '","' .. exp .. '"]'
  w('SET', OP, text, 'PX', OP_PX, 'GET')
  if LEAN_CALL then return text end
  return {'took', token, at, exp}
end

-- Run main: its reply (with `remember`, kept under the call id: `finish`), or
-- {'need', names} when a name it needs is not declared: nothing was written, nothing is kept,
-- and the caller calls again with them declared (decoded by redis_replies.need); or
-- {'index', name, why} when an index set it reads is another Redis type (`members`): nothing
-- was written, and the caller rebuilds the index and calls again (redis_replies.broken_index).
local function run(main, remember)
  call_state()
  local ok, reply = pcall(main)
  if not ok then
    if reply == NEED then return {'need', MISSING} end
    if reply == INDEX then return {'index', BROKEN[1], BROKEN[2]} end
    error(reply, 0)
  end
  if remember then return finish(reply) end
  return reply
end

-- The names of keys found at run time: the mirror of RedisKeys (a test checks they agree).
-- Each is checked against KEYS (`checked`).
local function lock_name(k) return checked(base .. 'lock:{' .. k .. '}') end
local function shared_name(k) return checked(base .. 'shared:{' .. k .. '}') end
local function fence_name(k) return checked(base .. 'fence:{' .. k .. '}') end
local function queue_name(k, level)
  return checked(base .. 'queue' .. level .. ':{' .. k .. '}')
end
local function waiter_name(id) return checked(base .. 'waiter:' .. id) end
local function outcome_name(id) return checked(base .. 'outcome:' .. id) end
local function pull_index(repo, pull)
  return checked(base .. 'pull:{' .. repo .. '#' .. pull .. '}')
end
local function by_pull_name(k) return checked(base .. 'bypull:{' .. k .. '}') end
local function by_pull_mark() return checked(base .. 'bypull') end
local function waits_name(repo, pull)
  return checked(base .. 'waits:{' .. repo .. '#' .. pull .. '}')
end

-- A waiter's entry in a queue (`queue_name`): its enqueue number (its record's seq),
-- zero-padded to 16 digits (so that text order is number order), ':', its id; and the id and
-- the number read back from one. The mirror of RedisKeys.queue_member and member_waiter
-- (redis_store.py, SEQ_DIGITS: a test holds the two to each other).
local function queue_member(seq, id) return string.format('%016d', seq) .. ':' .. id end
local function member_waiter(member) return string.sub(member, 18) end
local function member_seq(member) return tonumber(string.sub(member, 1, 16)) end

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

-- A key's stored holder that is not one (another Redis type where a hash is kept, a hash
-- without its fields, a shared holder's record that is not the tuple it should be): answered
-- as a lock row whose 13th field says why (redis_replies.LockRow.unreadable), with the bytes
-- found as its data (Python reports their size and digest, never them). It holds the key for
-- nobody: nothing is granted over it, a release by an owner is refused with it, and a
-- force-unlock deletes it (`bad` tells drop_lock what to delete: the lock hash, one shared
-- holder's field, or the whole shared hash).
local function unreadable(k, raw, why, bad)
  local row = {k, raw or '', '0', '0', '0', '', '', false, false, 'exclusive', '.', 'default',
               why}
  row.bad = bad
  return row
end

local function not_a(name, wanted)
  return 'not a ' .. wanted .. ' (Redis type ' .. CALL('TYPE', name)['ok'] .. ')'
end

-- The members of one of the store's index sets (held, queued, a pull's). Where another Redis
-- type stands, the call stops before any write and answers {'index', name, why} (`run`): the
-- caller rebuilds the index from the keys of the namespace and calls again.
local function members(name)
  local found = PCALL('SMEMBERS', name)
  if not is_error(found) then return found end
  BROKEN = {name, 'not a set (Redis type ' .. CALL('TYPE', name)['ok'] .. ')'}
  if WROTE then error('the index ' .. name .. ' is ' .. BROKEN[2] .. ' (met after a write)', 0) end
  error(INDEX)
end

-- Whether k may have waiters (QUEUED lists it; an index of another type: maybe).
local function maybe_queued(k)
  local found = PCALL('SISMEMBER', QUEUED, k)
  -- (0, nearly always: the answer is known without a call to tell an error apart)
  return found ~= 0 and (found == 1 or is_error(found))
end

-- Why k's fencing counter cannot serve a grant (another Redis type, or not a whole number
-- INCR can raise), or false. Asked once per call and key, before a grant's first write.
local function fence_damage(k)
  local known = DAMAGE[k]
  if known == nil then
    local name = fence_name(k)
    local v = PCALL('GET', name)
    if is_error(v) then
      known = 'its fencing counter is ' .. not_a(name, 'number')
    elseif v and not whole(v) then
      known = 'its fencing counter is not a whole number'
    else
      known = false
    end
    DAMAGE[k] = known
  end
  return known
end

-- k's queue of one base priority, read where another Redis type may stand: that one reads as
-- empty (its waiters cannot be told apart) and QUEUE_DAMAGE[k] says why.
local function queue_broken(k, level, name)
  local levels = {'low', 'normal', 'high', 'critical'}  -- (not a library local: see `one_char`)
  QUEUE_DAMAGE[k] = QUEUE_DAMAGE[k] or
    ('its ' .. levels[level + 1] .. ' queue is ' .. not_a(name, 'sorted set'))
end

-- The members of k's queue of one base priority from rank first to last; with 'WITHSCORES'
-- (`...`), each followed by its score (the enqueue time).
local function queue_range(k, level, first, last, ...)
  local name = queue_name(k, level)
  local found = PCALL('ZRANGE', name, first, last, ...)
  if is_error(found) then
    queue_broken(k, level, name)
    return {}
  end
  return found
end

local function queue_card(k, level)
  local name = queue_name(k, level)
  local found = PCALL('ZCARD', name)
  if is_error(found) then
    queue_broken(k, level, name)
    return 0
  end
  return found
end

-- What this call has read of each key's holders, until it writes them: k -> {lock = row, or
-- false when the hash holds none of our fields; shared = rows}. A grant reads the same key's
-- holders several times (expire, serve, verdict, take); Redis is asked once.
local function forget(k, part)
  if fetched[k] then fetched[k][part] = nil end
end

-- k's exclusive holder as stored in its hash `name` (nil: none; a row whose 13th field says
-- why: unreadable), path and workspace as stored (see `with_parts`).
local function lock_row(k, name)
  local v = PCALL('HMGET', name, 'data', 'token', 'at', 'exp', 'repo', 'pull',
                        'claim', 'lease', 'path', 'ws', 'damaged')
  -- (HMGET answers a list, or Redis's refusal: a table either way)
  if v['err'] and is_error(v) then
    return unreadable(k, '', not_a(name, 'hash'), {lock = true})
  end
  if v[11] then return unreadable(k, '', v[11], {lock = true}) end  -- `set_aside`
  if not v[1] then
    if v[2] or v[5] then
      return unreadable(k, '', 'a lock hash without its data field', {lock = true})
    end
    return nil
  end
  if not (tonumber(v[2]) and tonumber(v[3]) and tonumber(v[4]) and v[5] and v[6]) then
    return unreadable(k, v[1], 'a lock hash whose token, times or owner do not read',
                      {lock = true})
  end
  return {k, v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], 'exclusive', v[9], v[10], false}
end

local function fetch_lock(k)
  local row = lock_row(k, lock_name(k))
  return row and with_parts(row)
end

-- What this call has read of k's holders so far (`fetched`), started empty.
local function known_of(k)
  local known = fetched[k]
  if not known then
    known = {}
    fetched[k] = known
  end
  return known
end

local function read_lock(k)
  local known = known_of(k)
  if known.lock == nil then known.lock = fetch_lock(k) or false end
  return known.lock or nil
end

-- How many answers told a shared holder's owner it holds it (`relied_on`), by its row as read:
-- kept in its record's 13th place (which a row read leaves for why it is unreadable, false).
-- A count there that is not a number (not written by this store: a hand edit, another
-- program) counts one answer of someone unknown, as an exclusive hold's `told` is read
-- (`count_told`), and is written as a number again with the record.
local SHARED_TOLD = {}

local function shared_count(told)
  if told == nil or told == false or told == cjson.null then return nil end
  return tonumber(told) or 1
end

-- One shared holder's record (the JSON of its lock row), or its unreadable row.
local function shared_row(k, field, text)
  local ok, row = pcall(cjson.decode, text)
  if not ok then
    return unreadable(k, text, 'a shared holder\'s record is not JSON', {field = field})
  end
  if type(row) ~= 'table' or row[1] ~= k or type(row[2]) ~= 'string'
      or not (tonumber(row[3]) and tonumber(row[4]) and tonumber(row[5]))
      or type(row[6]) ~= 'string' or type(row[7]) ~= 'string' or row[10] ~= 'shared' then
    return unreadable(k, text, 'a shared holder\'s record is not a lock', {field = field})
  end
  SHARED_TOLD[row] = shared_count(row[13])
  row[13] = false
  return row
end

local function fetch_shared(k)
  local name = shared_name(k)
  local flat = PCALL('HGETALL', name)
  if is_error(flat) then return {unreadable(k, '', not_a(name, 'hash'), {shared = true})} end
  local out = {}
  for i = 1, #flat, 2 do table.insert(out, shared_row(k, flat[i], flat[i + 1])) end
  table.sort(out, function(a, b) return tonumber(a[3]) < tonumber(b[3]) end)
  return out
end

-- Every shared holder of k (lapsed ones too), oldest grant first (a list of the caller's own).
local function read_shared(k)
  local known = known_of(k)
  if not known.shared then known.shared = fetch_shared(k) end
  local out = {}
  for i, row in ipairs(known.shared) do out[i] = row end
  return out
end

-- Whether k has no shared holder's hash (asked only if this call has not read it).
local function no_shared(k)
  local known = fetched[k]
  if known and known.shared then return #known.shared == 0 end
  return CALL('EXISTS', shared_name(k)) == 0
end

local function save_shared(lock)
  forget(lock[1], 'shared')
  local record = {}
  for i = 1, 12 do record[i] = lock[i] end
  record[13] = SHARED_TOLD[lock] or lock[13]
  w('HSET', shared_name(lock[1]), lock[6] .. '#' .. lock[7], cjson.encode(record))
end

-- A shared holder's owner was answered that it holds it (`relied_on`): counted in its record.
local function told_shared(lock)
  SHARED_TOLD[lock] = (SHARED_TOLD[lock] or 0) + 1
  save_shared(lock)
end

-- Whether an answer told a shared holder's owner it holds it (`told_shared`).
local function shared_told(lock) return (SHARED_TOLD[lock] or 0) > 0 end

local function lapsed(lock)
  if lock[5] == '0' then return false end  -- no lease (most locks): no number to read
  local exp = tonumber(lock[5])
  return exp > 0 and exp <= clock()
end

local function same_owner(lock, repo, pull) return lock[6] == repo and lock[7] == pull end

-- An exclusive lock's hash deleted, its key taken out of the pull's index, and out of the held
-- index when no shared holder is left (`none_shared`).
local function drop_exclusive(k, lock_hash, pull_set, none_shared)
  w('DEL', lock_hash)
  known_of(k).lock = false  -- deleted: known to be free
  if none_shared then w_try('SREM', HELD, k) end
  w_try('SREM', pull_set, k)
end

local function drop_lock(lock)
  local k = lock[1]
  if lock.bad then  -- an unreadable holder: delete what was found
    fetched[k] = nil
    if lock.bad.lock then w('DEL', lock_name(k)) end
    if lock.bad.shared then w('DEL', shared_name(k)) end
    if lock.bad.field then w('HDEL', shared_name(k), lock.bad.field) end
    if CALL('EXISTS', lock_name(k), shared_name(k)) == 0 then
      w_try('SREM', HELD, k)
    end
    return
  end
  if lock[10] == 'shared' then
    forget(k, 'shared')
    w('HDEL', shared_name(k), lock[6] .. '#' .. lock[7])
    if CALL('EXISTS', shared_name(k)) == 0 then w_try('SREM', HELD, k) end
    w_try('SREM', pull_index(lock[6], lock[7]), k)
  else
    drop_exclusive(k, lock_name(k), pull_index(lock[6], lock[7]), no_shared(k))
  end
end

local function collect_after(k, exp)
  if exp > 0 then
    w('PEXPIREAT', lock_name(k), exp + GRACE_MS)
  else
    w('PERSIST', lock_name(k))
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
  if lock and not lapsed(lock) then
    lock.ex = true  -- from the lock hash (not in the reply: Redis answers the list part)
    return {lock}
  end
  local out = {}
  for _, s in ipairs(read_shared(k)) do
    if not lapsed(s) then table.insert(out, s) end
  end
  return out
end

-- One key of the wait-for graph (wait_graph.lua, wait_graph_from.lua): {k, its first
-- holder's repo or '', its pull or '', ids (its waiters), {{repo, pull} of every holder},
-- 1 if every holder holds it shared else 0}; an unreadable holder is nobody's (and not
-- shared). `each_holder(repo, pull)`, if given, is called for every holder listed.
local function graph_entry(k, ids, each_holder)
  local owners, shared = {}, 1
  for _, h in ipairs(holders(k)) do
    if not h.bad then
      table.insert(owners, {h[6], h[7]})
      if each_holder then each_holder(h[6], h[7]) end
    end
    if h.bad or h[10] ~= 'shared' then shared = 0 end
  end
  if #owners > 0 then return {k, owners[1][1], owners[1][2], ids, owners, shared} end
  return {k, '', '', ids, owners, 0}
end

-- The holders of k as the running discovery pictures them after the writes it foresees
-- (VIEW, see `serve`); outside a discovery, the holders.
local function view_holders(k)
  return VIEW[k] or holders(k)
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
-- be confirmed within CLAIM_MS. The names: k's fencing counter, its lock hash (unused by a
-- shared grant), the owner's pull index.
local function stamp(k, data, repo, pull, ttl, claim, mode, path, ws, counter, lock_hash,
                     pull_set)
  local started = false
  if TOKEN_BASE > 0 then
    -- A counter below the incarnation's base was started before the base was set (a store
    -- started anew at 0 that lost data found later, an incarnation written over): it
    -- continues from the base, as one started now does. (One of another type or not a number
    -- is left to INCR's refusal.)
    local v = PCALL('GET', counter)
    if not v or (whole(v) and tonumber(v) < TOKEN_BASE) then
      w('SET', counter, int(TOKEN_BASE))
      started = true
    end
  end
  -- The counter is taken first: one that is not a number (written over by something else)
  -- refuses INCR and nothing of the grant is written (nil; the full paths have asked
  -- `fence_damage` before, the lean ones go to them).
  local token = w_try('INCR', counter)
  if not token then return nil end
  -- FENCED lists every key with a counter; nothing takes a key out of it, so a counter that
  -- was there before this grant is listed already (each write that starts one lists it).
  if started or token == 1 then w_try('SADD', FENCED, k) end
  local now = clock()
  local lease_end = 0
  if ttl > 0 then lease_end = now + ttl end
  local exp = lease_end
  if claim then
    local by = now + CLAIM_MS
    if exp == 0 or by < exp then exp = by end
  end
  local pending = false
  if claim then pending = int(lease_end) end
  local lock = {k, data, int(token), int(now), exp == 0 and '0' or int(exp), repo, pull,
                claim or false, pending, mode, path, ws}
  if mode == 'shared' then
    save_shared(lock)
  else
    -- A lapsed lock's hash may linger (with its expiry): start afresh, unless this call saw
    -- that the hash holds none of our fields (or deleted it).
    if not (fetched[k] and fetched[k].lock == false) then w('DEL', lock_hash) end
    forget(k, 'lock')
    -- The numbers as the text made above (lock[3..5]): Redis would format them again.
    if claim then
      w('HSET', lock_hash, 'data', data, 'token', lock[3], 'at', lock[4], 'repo', repo,
                 'pull', pull, 'exp', lock[5], 'path', path, 'ws', ws, 'claim', claim,
                 'lease', pending)
    else
      w('HSET', lock_hash, 'data', data, 'token', lock[3], 'at', lock[4], 'repo', repo,
                 'pull', pull, 'exp', lock[5], 'path', path, 'ws', ws)
    end
    if exp > 0 then w('PEXPIREAT', lock_hash, exp + GRACE_MS) end
  end
  w_try('SADD', HELD, k)
  w_try('SADD', pull_set, k)
  return lock
end

-- The claim on lock h, a lock of waiter id's grant (its outcome's `locks`) found by the
-- grant's token, as a call about that grant reads it (CONFIRM, CANCEL, a retry taking the
-- grant over), or a lock a request of its pull that does not wait is answered with (`take`,
-- id false): it ends when it is the waiter's own, or when it is another waiter's and a
-- caller of this waiter is answered with the grant (`heard`); the holder's own lease applies
-- from its grant on. Another waiter's claim is on a lock the pull held already when this
-- waiter was granted (`take` answered it unchanged: another request of the pull was granted
-- it from the queue, unconfirmed). Heard, the pull relies on that lock, and left claimed it
-- would lapse under the caller when that waiter's replica never confirms (a replica that
-- died after its last heartbeat): the key granted to another pull while this caller holds
-- it. Not heard (the caller went away and gives the grant back, which leaves the locks its
-- pull held already), ending it would leave the lock held for nobody who knows of it,
-- without the lapse that frees a claim nobody confirms.
local function settle_heard(h, id, heard)
  if not h[8] or (h[8] ~= id and not heard) then return end
  local lease_end = tonumber(h[9])
  h[5], h[8], h[9] = int(lease_end), false, false
  if h[10] == 'shared' then
    save_shared(h)
    return
  end
  forget(h[1], 'lock')
  w('HDEL', lock_name(h[1]), 'claim', 'lease')
  w('HSET', lock_name(h[1]), 'exp', lease_end)
  collect_after(h[1], lease_end)
end

-- --- the rules (mirror enhanced_locking.policies.verdict) --------------------------------
-- A glob's ? is one character, as in Python, not one byte: policies.glob_to_lua writes it
-- '%?' (which it writes for nothing else: in a glob ? is always the wildcard), made here the
-- bytes of one UTF-8 character (a pattern cannot travel in JSON with bytes past 127 alone).
-- Every % of such a pattern begins a two-byte escape, so a scan of the pairs finds them all.
-- (`one_char` is a local of `utf8_globs`: the library's own locals are near Lua's bound of
-- 200 a function, which a script's chunk shares when it is sent whole: redis_scripts.script.)
local function utf8_globs(list)
  local function one_char(escape)
    if escape == '?' then return '[%z\1-\127\194-\244][\128-\191]*' end
    return '%' .. escape
  end
  for _, rule in ipairs(list) do
    local m = rule['m']
    for _, field in ipairs({'repo', 'ws', 'key'}) do
      if m[field] then m[field] = string.gsub(m[field], '%%(.)', one_char) end
    end
  end
end

local function rules()
  if not RULES then
    if not ARGV[10] or ARGV[10] == '' then
      RULES = {f = {}, c = {}}
    else
      RULES = cjson.decode(ARGV[10])
      utf8_globs(RULES['f'])
      utf8_globs(RULES['c'])
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
  local keys, seen = members(HELD), {}
  for _, k in ipairs(keys) do seen[k] = true end
  for k, _ in pairs(VIEW) do
    if not seen[k] then table.insert(keys, k) end
  end
  for _, k in ipairs(keys) do
    for _, h in ipairs(view_holders(k)) do
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

-- A waiter's record, or nil when there is none or it does not read (another Redis type, a
-- field missing or not a number, keys that are not a JSON list): such a record is passed over
-- like a missing one (its queue entries go when a walk meets them), never an error.
local function read_waiter(id)
  local name = waiter_name(id)
  local flat = MEMO[name]
  if flat == nil then
    flat = PCALL('HGETALL', name)
    MEMO[name] = flat
  end
  if is_error(flat) or #flat == 0 then return nil end
  local rec = {}
  for i = 1, #flat, 2 do rec[flat[i]] = flat[i + 1] end
  local ok, keys = pcall(cjson.decode, rec['keys'] or '')
  if not ok or type(keys) ~= 'table' or #keys == 0 then return nil end
  for _, k in ipairs(keys) do
    if type(k) ~= 'string' or not rec['d:' .. k] then return nil end
  end
  if not (tonumber(rec['deadline']) and tonumber(rec['seq']) and tonumber(rec['level'])
          and tonumber(rec['enq']) and tonumber(rec['ttl']) and rec['id'] and rec['repo']
          and rec['pull'] and rec['replica']) then
    return nil
  end
  rec.flat = flat
  rec.keys = keys
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

-- A waiter's level after aging: its base `level`, raised by how long it waited since `enq`.
local function effective(level, enq)
  local p = policy()
  if p.priority == 0 then return 0 end
  local boost = 0
  if p.threshold > 0 and p.boost > 0 then
    local waited = NOW - enq
    if waited < 0 then waited = 0 end
    boost = math.min(p.boost, math.floor(waited / p.threshold))
  end
  return math.min(3, level + boost)
end

-- A walk over the entries of k's queues that a new request of base level `mine` would wait
-- behind, from the head of each queue of a base priority, a few at a time (LOOK_CHUNK a
-- `ZRANGE`): those of an effective level at or above its own now, a prefix of each queue
-- (`aged_by`), less those this call's plan takes out (GONE). `visit(id)` is called on each
-- in turn; the walk stops when it answers true, and answers whether it did.
local LOOK_CHUNK = 16
local function walk_ahead(k, mine, visit)
  local least = effective(mine, NOW)
  for level = 0, 3 do
    local from, more = 0, true
    while more do
      local r = queue_range(k, level, from, from + LOOK_CHUNK - 1, 'WITHSCORES')
      more = #r == 2 * LOOK_CHUNK
      from = from + LOOK_CHUNK
      for i = 1, #r, 2 do
        if effective(level, tonumber(r[i + 1])) < least then
          more = false
          break
        end
        local id = member_waiter(r[i])
        if not GONE[id] and visit(id) then return true end
      end
    end
  end
  return false
end

-- Whether waiter record rec keeps a new shared request of repo#pull waiting behind it: an
-- exclusive request of another pull, before its deadline.
local function keeps_shared_waiting(rec, repo, pull)
  return rec and rec.mode == 'exclusive' and not (rec.repo == repo and rec.pull == pull)
    and tonumber(rec.deadline) > NOW
end

-- Whether an exclusive request of another pull waits on k ahead of a new one of base level
-- `mine` (a shared request waits behind it, as the walk would serve it first): the records
-- `walk_ahead` meets, read until one keeps it waiting.
local function exclusive_waiting(k, repo, pull, mine)
  return walk_ahead(k, mine, function(id)
    return keeps_shared_waiting(read_waiter(id), repo, pull)
  end)
end

-- The discovery's half of `exclusive_waiting`: the same walk, naming the records it reads.
-- A record declared is read, and one that keeps the request waiting ends the walk, as it
-- ends the verdict's there or before; one not declared is asked for, with the next ones up
-- to as many as the walk read already (LOOK_CHUNK at least: whether the walk stops at one is
-- known only once it is read), and the call, made again with them, walks on. So a walk that
-- meets an exclusive request near the head names a few records, not every waiter of k, and
-- one over n records asks O(log n) times.
local function expect_exclusive_look(k, repo, pull, mine)
  local asked, read = 0, 0
  walk_ahead(k, mine, function(id)
    if declared(waiter_name, id) then
      read = read + 1
      return keeps_shared_waiting(read_waiter(id), repo, pull)
    end
    expect(waiter_name, id)
    asked = asked + 1
    return asked >= math.max(LOOK_CHUNK, read)
  end)
end

-- Whether holder h keeps a request of repo#pull in `mode` out of its key.
local function keeps_out(h, repo, pull, mode)
  return not same_owner(h, repo, pull) and (h[10] ~= 'shared' or mode == 'exclusive')
end

-- The keys of a new shared request's `parts` whose queues its verdict may look at for an
-- exclusive request waiting ahead (`exclusive_waiting`), in order: every key up to the first
-- whose holders keep it out (the verdict answers 'held' there, before it looks), read on the
-- holders as pictured (VIEW). The discovery of acquire.lua names those queues' records only.
local function may_look_behind(parts, repo, pull)
  local out = {}
  for _, p in ipairs(parts) do
    for _, h in ipairs(view_holders(p.key)) do
      if keeps_out(h, repo, pull, 'shared') then return out end
    end
    table.insert(out, p.key)
  end
  return out
end

-- A grant, unless the fencing counter of a key it would stamp (`stamps`) cannot serve it:
-- {'damaged', key, why}.
local function grant_of(stamps)
  for _, k in ipairs(stamps) do
    local why = fence_damage(k)
    if why then return {'damaged', k, why} end
  end
  return {'grant'}
end

-- {'grant'} | {'held', key} | {'frozen', key, freeze} | {'limited', key} | {'damaged', key, why}
-- `new`: a request not queued yet, of base priority level `level` (a queued waiter: false)
local function verdict(repo, pull, mode, parts, new, level)
  local hs, mine, stamps = {}, {}, {}
  for _, p in ipairs(parts) do
    hs[p.key] = view_holders(p.key)
    mine[p.key] = false
    local unchanged = false
    for _, h in ipairs(hs[p.key]) do
      if same_owner(h, repo, pull) then
        mine[p.key] = true
        if not (mode == 'exclusive' and h[10] == 'shared') then unchanged = true end
      end
    end
    if not unchanged then table.insert(stamps, p.key) end
  end
  if #stamps == 0 then return {'grant'} end
  local frozen = active_freeze(parts)
  if new and frozen and frozen[2]['refuse'] then return {'frozen', frozen[1], frozen[2]} end
  for _, p in ipairs(parts) do
    for _, h in ipairs(hs[p.key]) do
      if keeps_out(h, repo, pull, mode) then
        return {'held', p.key}
      end
    end
    if new and mode == 'shared' and exclusive_waiting(p.key, repo, pull, level) then
      return {'held', p.key}
    end
  end
  if frozen then return {'frozen', frozen[1], frozen[2]} end
  if #rules()['c'] == 0 then return grant_of(stamps) end
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
  if #order == 0 then return grant_of(stamps) end
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
  return grant_of(stamps)
end

-- One more answer in lock hash `name`'s `told`. A `told` that is not a number (not written by
-- this store: a hand edit, another program) counts one answer of someone unknown, as every
-- reader takes it (`tonumber(...) or 1`), and is written as a number again from it (HINCRBY
-- refused it, and the call failed: a request of the pull asking again was answered with an
-- error).
local function count_told(name)
  local told = CALL('HGET', name, 'told')
  if told and not tonumber(told) then
    w('HSET', name, 'told', '2')
  else
    w('HINCRBY', name, 'told', 1)
  end
end

-- The answers lock hash `name`'s `told` counts, `known` among them when true (an answer the
-- caller takes back next, which the count holds). A `told` that is not a number (not written
-- by this store) counts one answer of someone unknown, never taken back, and `known`'s
-- besides: taking `known`'s back leaves the unknown one, as the embedded store's and etcd's
-- reading of such a count ("?") keeps the hold.
local function told_count(name, known)
  local told = tonumber(CALL('HGET', name, 'told') or '0')
  if told then return told end
  return known and 2 or 1
end

-- The lock a pull gets on k: the one it holds, or a fresh one (an exclusive request of the
-- key's only shared holder is an upgrade: a new token).
-- A call answered its owner with the exclusive lock h it held already (the owner asked for it
-- again, or a store adopted it as the owner's): someone now knows of the hold, and a give-back
-- of the call that granted it leaves it. `told` counts those answers (REFRESH's too), and
-- `told:<this call's op name>` names this one: its own give-back (its caller told unavailable
-- too, as when the pull asked again while Redis was frozen) takes its count back
-- (give_back.lua). A shared hold counts such answers in its record (`told_shared`); its
-- give-back leaves it once any was made.
local function relied_on(h)
  if h.bad then return end
  if h[10] == 'shared' then
    told_shared(h)
  else
    local name = lock_name(h[1])
    count_told(name)
    w('HSET', name, 'told:' .. OP, '1')
  end
end

local function take(k, data, repo, pull, ttl, claim, mode, path, ws)
  local mine = false
  for _, h in ipairs(holders(k)) do
    if same_owner(h, repo, pull) then mine = h end
  end
  if mine and not (mode == 'exclusive' and mine[10] == 'shared') then
    relied_on(mine)
    -- Answered to its caller now (no `claim`: not a grant from the queue, which its waiter
    -- hears later), a claim on it ends: another waiter's, whose grant the pull held it by
    -- (`settle_heard`).
    if not claim then settle_heard(mine, false, true) end
    return mine, false, false
  end
  if mine then drop_lock(mine) end
  local lock = stamp(k, data, repo, pull, ttl, claim, mode, path, ws, fence_name(k),
                     mode ~= 'shared' and lock_name(k), pull_index(repo, pull))
  if not lock then error('the fencing counter of ' .. k .. ' failed after its check', 0) end
  -- An upgrade of the pull's shared hold (a new token, announced as a new lock is) is not
  -- the grant's to give back: its pull held the key before, and a give-back by its token
  -- would free that hold with it. Returns the lock, new, upgraded.
  if mine then return lock, false, true end
  return lock, true, false
end

-- A key whose fencing counter cannot serve a grant is set aside: when nobody holds it, a mark
-- in its lock hash (`damaged`: why) makes it an unreadable holder for every replica and call
-- (nothing is granted over it, it is listed as unreadable) until a force-unlock repairs the
-- counter (`repair`). Its row, to answer with (one made for this answer while holders stay).
local function set_aside(k, why)
  if #holders(k) == 0 then
    w('HSET', lock_name(k), 'damaged', why)
    w_try('SADD', HELD, k)  -- listed (as unreadable) like any held key
    forget(k, 'lock')
    return read_lock(k)
  end
  return unreadable(k, '', why, {})
end

-- What a force-unlock finds wrong with k's own keys beside its holders (its fencing counter,
-- its queues), or false.
local function damaged_parts(k)
  for level = 0, 3 do queue_card(k, level) end
  return fence_damage(k) or QUEUE_DAMAGE[k] or false
end

-- A force-unlock's repair of k's own keys: with `fence`, its fencing counter, not a number,
-- starts again from the server clock (ms * 1000, above any token handed out before, as after
-- a restart without persistence); a queue of another type goes (its waiters were lost with
-- it: each is answered when its wait ends).
local function repair(k, fence)
  if fence then
    w('SET', fence_name(k), int(math.max(NOW * 1000, TOKEN_BASE)))
    w_try('SADD', FENCED, k)
  end
  DAMAGE[k] = false
  if QUEUE_DAMAGE[k] then
    for level = 0, 3 do
      local name = queue_name(k, level)
      local kind = CALL('TYPE', name)['ok']
      if kind ~= 'zset' and kind ~= 'none' then w('DEL', name) end
    end
    QUEUE_DAMAGE[k] = nil
  end
end

-- --- waiters ------------------------------------------------------------------------------
-- Every entry of k's queues, lowest base priority first (a queue of another Redis type: none),
-- each one's waiter record expected (asked for at the next `ask`).
local function expect_queued(k)
  local found = {}
  for level = 0, 3 do
    for _, member in ipairs(queue_range(k, level, 0, -1)) do
      table.insert(found, member)
      expect(waiter_name, member_waiter(member))
    end
  end
  return found
end

-- The ids of `entries` (queue entries, their records read: `expect_queued` then `ask`) whose
-- waiter records are there, for a key of the wait-for graph (wait_graph.lua,
-- wait_graph_from.lua): each record read once across the keys (`seen`: id -> its record, or
-- false when it is gone) and, the first time, its flat form added to `records`.
local function graph_waiters(entries, seen, records)
  local ids = {}
  for _, member in ipairs(entries) do
    local id = member_waiter(member)
    if seen[id] == nil then
      local rec = read_waiter(id)
      seen[id] = rec or false
      if rec then table.insert(records, rec.flat) end
    end
    if seen[id] then table.insert(ids, id) end
  end
  return ids
end

local function queue_size(k)
  local n = 0
  for level = 0, 3 do n = n + queue_card(k, level) end
  return n
end

-- --- k's waiters by pull -------------------------------------------------------------------
-- `by_pull_name(k)` keeps one entry for each entry of k's queues, "repo#pull\nW", all of score
-- 0: a pull's own waiters on k are one range of it by text (`pull_waiters`), read in
-- O(log n), where finding them in the queues read every waiter's record. Every write that
-- queues a waiter adds its entry (acquire.lua), every one that takes it out of the queues
-- takes it out (`unqueue`). An entry whose record is gone or does not read is kept as "\nW"
-- (no pull: it is nobody's); a queue entry a walk takes out because its record is gone takes
-- that one out too.
local function pull_entry(repo, pull, id) return repo .. '#' .. pull .. '\n' .. id end

-- The ids in k's index by pull of the waiters of repo#pull (each one's record still to be
-- read: an id whose record is gone may be listed).
local function pull_waiters(k, repo, pull)
  local owner = repo .. '#' .. pull
  local found = CALL('ZRANGEBYLEX', by_pull_name(k), '[' .. owner .. '\n', '(' .. owner .. '\v')
  local ids, from = {}, #owner + 2
  for i, entry in ipairs(found) do ids[i] = string.sub(entry, from) end
  return ids
end

-- Whether the indexes by pull can be trusted, store-wide: the mark `by_pull_mark()` (a hash)
-- keeps `seq`, the enqueue counter as the last enqueue that kept its entries left it, and
-- `gen`, the indexes' generation. A replica of a release that keeps no index (or keeps it
-- without this mark), during a rolling upgrade, queues a waiter without its entries and
-- raises the counter without the mark: the counter is then not the mark's `seq`, and the
-- generation moves on (to the server's clock in ms, or one past the last, whichever is
-- higher: a mark deleted or written over starts a generation no index was stamped with).
-- Each key's index is stamped with the generation in which it was last made whole
-- (`pull_stamp`), so every index made before such an enqueue reads as untrusted, whichever
-- key that waiter queued on, and is made again by the call that needs it; a waiter such a
-- replica takes out of the queues leaves the sizes apart (or, with one it queued, equal: the
-- hole the mark closes). Returns the generation, and, when it moved on, the counter as read
-- (the caller keeps both before it stamps an index: `keep_pull_mark`).
local function pull_generation()
  local mark = PCALL('HMGET', by_pull_mark(), 'seq', 'gen')
  local seq, gen = '0', 0
  if not is_error(mark) then seq, gen = mark[1] or '0', tonumber(mark[2]) or 0 end
  local enqueues = PCALL('GET', SEQ)
  if is_error(enqueues) then  -- another type there: no enqueue can be told from another
    enqueues = ''
  elseif (enqueues or '0') == seq then
    return gen, false
  end
  return math.max(gen + 1, NOW), enqueues or '0'
end

-- Keep the mark: the counter `seq` as this call leaves it, the generation `gen`.
local function keep_pull_mark(seq, gen)
  local name = by_pull_mark()
  if not w_try('HSET', name, 'seq', seq, 'gen', int(gen)) then
    w('DEL', name)  -- another type where the mark goes: this one replaces it
    w('HSET', name, 'seq', seq, 'gen', int(gen))
  end
end

-- --- a pull's waits ----------------------------------------------------------------------
-- `waits_name(repo, pull)` is a set of the ids of the pull's waiters, so the deadlock check
-- walks from a pull to the keys it waits on (wait_graph_from.lua) instead of reading every
-- queue of the namespace. Every enqueue lists its waiter there (acquire.lua), `unqueue` takes
-- it out, and the set expires with the record of the latest waiter it listed. An id whose
-- record is gone (taken out by a release that keeps no such index) stays listed until then:
-- a reader passes over it. Whether the sets list every waiter is the mark's field `waits`
-- (`by_pull_mark()`): the enqueue counter as the last enqueue that listed its waiter left it.
-- An enqueue of a release that keeps no such set raises the counter alone, and the sets read
-- as untrusted until reindex_waits.lua makes them whole from the queues.
local function waits_trusted()
  local kept = PCALL('HGET', by_pull_mark(), 'waits')
  local enqueues = PCALL('GET', SEQ)
  if is_error(kept) or is_error(enqueues) then return false end
  return (kept or '0') == (enqueues or '0')
end

-- Trust the sets as whole up to the enqueue counter's value `seq`.
local function keep_waits_mark(seq)
  local name = by_pull_mark()
  if not w_try('HSET', name, 'waits', seq) then
    w('DEL', name)  -- another type where the mark goes: this one replaces it
    w('HSET', name, 'waits', seq)
  end
end

-- List waiter id in its pull's set, kept until `until_ms` at least (its record's end).
-- Whether the set was whole (false: another Redis type stood there and was replaced, so the
-- waiters it listed are not).
local function list_wait(repo, pull, id, until_ms)
  local name = waits_name(repo, pull)
  local whole_set = w_try('SADD', name, id) ~= nil
  if not whole_set then
    w('DEL', name)
    w('SADD', name, id)
  end
  if CALL('PTTL', name) < until_ms - NOW then w('PEXPIREAT', name, until_ms) end
  return whole_set
end

-- An enqueue's part (acquire.lua): list waiter id, just queued, in its pull's set, and, when
-- the sets were trusted up to the counter before this enqueue raised it to `seq` (the
-- mark's `waits` one below it: an enqueue that raised it from 0 finds no mark, read as 0),
-- keep them trusted up to `seq`. (One function: each the script calls is an upvalue of it,
-- and a Lua function has at most 60.)
local function list_enqueued(repo, pull, id, until_ms, seq)
  local kept = PCALL('HGET', by_pull_mark(), 'waits')
  local trusted = not is_error(kept) and (kept or '0') == int(tonumber(seq) - 1)
  if list_wait(repo, pull, id, until_ms) and trusted then keep_waits_mark(seq) end
end

-- The member that stamps k's index with generation gen: first in the index's order (a tab
-- comes before every entry: "\nW" and "repo#pull\nW"), and in no pull's range.
local function pull_stamp(gen) return '\t' .. int(gen) end

-- An enqueue's entries (acquire.lua): waiter id, of repo#pull, base priority `level` and
-- enqueue number `seq`, enqueued at NOW on each of `keys`, its queue entry and its entry in
-- the key's index by pull (a key nobody waited on, `sizes[k]` 0: the index made anew,
-- stamped with generation `gen`), the key listed as queued. (One function, as
-- `list_enqueued`: each name acquire.lua calls is an upvalue of its function.)
local function queue_entries(keys, level, seq, id, repo, pull, sizes, gen)
  local member = queue_member(seq, id)
  local entry = pull_entry(repo, pull, id)
  for _, k in ipairs(keys) do
    w('ZADD', queue_name(k, level), NOW, member)
    if sizes[k] == 0 then  -- the first waiter: the index is made anew, stamped
      w('DEL', by_pull_name(k))
      w('ZADD', by_pull_name(k), 0, pull_stamp(gen), 0, entry)
    else
      w_try('ZADD', by_pull_name(k), 0, entry)
    end
    w_try('SADD', QUEUED, k)
  end
end

-- Whether k's index by pull can be read for its waiters: it is stamped with the current
-- generation `gen` and holds one entry for each entry of k's queues. A store written by an
-- earlier release has none for the waiters that release queued (and a replica of that
-- release, during a rolling upgrade, queues and takes out waiters without it: the generation
-- moves on, `pull_generation`); a queue entry whose record expired and was then taken out
-- leaves its entry behind; another Redis type there reads as none. Such an index is made
-- again from the queues by the call that needs it (`reindex_pulls`), which reads every
-- waiter's record once.
local function pulls_indexed(k, gen)
  local name = by_pull_name(k)
  local n = PCALL('ZCARD', name)
  if type(n) ~= 'number' then
    is_error(n)  -- (anything but another Redis type there is raised)
    return false
  end
  return n == queue_size(k) + 1 and CALL('ZRANGE', name, 0, 0)[1] == pull_stamp(gen)
end

-- Make k's index by pull again from its queues, stamped with generation gen: each entry's
-- record (declared to the call, read by its discovery) gives its pull; one whose record is
-- gone or does not read is listed as nobody's ("\nW").
local function reindex_pulls(k, gen)
  local entries = {pull_stamp(gen)}
  for level = 0, 3 do
    for _, member in ipairs(queue_range(k, level, 0, -1)) do
      local id = member_waiter(member)
      local rec = read_waiter(id)
      table.insert(entries, rec and pull_entry(rec.repo, rec.pull, id) or '\n' .. id)
    end
  end
  local name = by_pull_name(k)
  w('DEL', name)
  for i = 1, #entries, 500 do  -- (a few hundred arguments a command: Lua's stack is bounded)
    local args = {}
    for j = i, math.min(i + 499, #entries) do
      table.insert(args, 0)
      table.insert(args, entries[j])
    end
    w('ZADD', name, unpack(args))
  end
end

-- After a waiter left k's queues: a key nobody waits on leaves the `queued` index, and its
-- index by pull goes (its stamp, and any entry left behind).
local function queue_left(k)
  if queue_size(k) == 0 then
    w_try('SREM', QUEUED, k)
    w('DEL', by_pull_name(k))
  end
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
    local r = queue_range(k, level, at, at, 'WITHSCORES')
    if #r == 0 then return false end
    return {id = member_waiter(r[1]), seq = member_seq(r[1]),
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
  -- The ids of the next n entries (or fewer), the walk itself not moved on.
  local function upcoming(n)
    local saved_index, saved_heads = {index[1], index[2], index[3], index[4]},
      {heads[1], heads[2], heads[3], heads[4]}
    local ids = {}
    while #ids < n do
      local e = next_entry()
      if not e then break end
      table.insert(ids, e.id)
    end
    index, heads = saved_index, saved_heads
    return ids
  end
  return next_entry, gone, upcoming
end

-- The latest enqueue time by which a waiter of base level `level` has aged to effective level
-- `target` or above now (math.huge: every one of them is there; false: none is). `effective`
-- never rises as the enqueue time does, so those waiters are a prefix of that level's queue.
local function aged_by(level, target)
  local p = policy()
  if p.priority == 0 then return target <= 0 and math.huge end
  if target <= level then return math.huge end
  if target > 3 or p.threshold <= 0 or p.boost < target - level then return false end
  return NOW - p.threshold * (target - level)
end

-- How many entries of k's queue of one base priority were enqueued by `upto` (math.huge: all);
-- with `seq`, enqueued before (upto, seq) instead, that one's enqueue time and number.
local function queue_count(k, level, upto, seq)
  local name = queue_name(k, level)
  local last = upto == math.huge and '+inf' or string.format('%.17g', upto)
  local found = PCALL('ZCOUNT', name, '-inf', seq and ('(' .. last) or last)
  if is_error(found) then
    queue_broken(k, level, name)
    return 0
  end
  if seq then  -- those of the same millisecond with a lower number are before it too
    for _, member in ipairs(PCALL('ZRANGEBYSCORE', name, last, last)) do
      if member_seq(member) < seq then found = found + 1 end
    end
  end
  return found
end

-- Waiter rec's 1-based place in k's service order (0: it is not in k's queue): the entries
-- `before` it counted in each queue of a base priority, each a prefix of its queue (those
-- aged above its effective level, or at it and enqueued before it), never walked: a few
-- ZCOUNTs, O(log n) in the queue's length, where walking the queue to it was O(n).
local function position(k, rec)
  local level, seq = tonumber(rec.level), tonumber(rec.seq)
  local score = PCALL('ZSCORE', queue_name(k, level), queue_member(seq, rec.id))
  if is_error(score) or not score then return 0 end
  local enq = tonumber(score)
  local mine, n = effective(level, enq), 1
  for l = 0, 3 do
    local above, at = aged_by(l, mine + 1), aged_by(l, mine)
    if above and above >= enq then
      n = n + queue_count(k, l, above)
    elseif at and at >= enq then
      n = n + queue_count(k, l, enq, seq)
    elseif at then
      n = n + queue_count(k, l, at)
    end
  end
  return n
end

local function unqueue(id, rec)
  local member = queue_member(tonumber(rec.seq), id)
  local entry = pull_entry(rec.repo, rec.pull, id)
  for _, k in ipairs(rec.keys) do
    w_try('ZREM', queue_name(k, rec.level), member)
    w_try('ZREM', by_pull_name(k), entry)
    queue_left(k)
  end
  w_try('SREM', waits_name(rec.repo, rec.pull), id)
  w('DEL', waiter_name(id))
end

-- An outcome's `locks` are {key, token, held} each: `held` 1 when the waiter's pull held that
-- lock already as it was granted (answered unchanged: not the grant's to give back), 2 when
-- the grant upgraded the pull's shared hold of it to exclusive (a new token, yet not the
-- grant's to give back either), else 0 (`held`, one per lock, 1 or 2 for every one when
-- `fresh` is 0). An outcome written before `held` existed has {key, token} (an older
-- replica's grant): `kept_keys` says it cannot tell.
local function remember(id, rec, kind, locks, fresh, held)
  local tokens = {}
  for i, lock in ipairs(locks) do
    table.insert(tokens, {lock[1], lock[3], held and held[i] or 0})
  end
  local name = outcome_name(id)
  if not w_try('HSET', name, 'kind', kind, 'waiter', cjson.encode(rec.flat),
               'locks', cjson.encode(tokens), 'fresh', fresh or 0) then
    w('DEL', name)  -- another type where the outcome goes: this one replaces it
    w('HSET', name, 'kind', kind, 'waiter', cjson.encode(rec.flat),
               'locks', cjson.encode(tokens), 'fresh', fresh or 0)
  end
  w('PEXPIRE', name, OUTCOME_MS)
end

local function tell(rec, id, kind)
  CALL('PUBLISH', base .. 'notify:' .. rec.replica, kind .. ':' .. id)
end

local function new_effects() return {expired = {}, granted = {}, dropped = {}} end

local function drop_waiter(id, rec, kind, fx)
  unqueue(id, rec)
  remember(id, rec, kind, {})
  tell(rec, id, kind)
  if fx then table.insert(fx.dropped, rec.flat) end
end

-- The keys of an outcome's `locks` (see `remember`) its pull held already when granted, or
-- false when the outcome does not say (written before it did: an older replica's); and,
-- second, those of them whose pull's shared hold the grant upgraded (`held` 2: announced as
-- new locks are, never given back).
local function kept_keys(pairs_of)
  local kept, upgraded = {}, {}
  for _, pair in ipairs(pairs_of) do
    if pair[3] == nil then return false, {} end
    if pair[3] == 1 or pair[3] == 2 then table.insert(kept, pair[1]) end
    if pair[3] == 2 then table.insert(upgraded, pair[1]) end
  end
  return kept, upgraded
end

-- Whether lock h of waiter id's grant (found by its token; `held` its outcome's mark: 1 when
-- its pull held it already) is answered as its pull's held already (added to `kept`, the
-- keys `kept_keys` gave), not the grant's to give back, by a call about the grant: `heard`
-- when its caller is answered with it (CONFIRM, a retry taking it over, CANCEL on timeout or
-- deadlock), else the grant is given back (CANCEL of a caller gone, CONFIRM of a lapsed claim).
-- A lock the grant made is another caller's too once an answer told its pull it holds it
-- (`told`, `relied_on`: a request that does not wait, another waiter's grant, REFRESH): a
-- grant heard keeps its own answer (new; its give-back later leaves the lock by RELEASE's
-- `unless_told`); given back unheard, it leaves it, marked `unheard` as give_back.lua marks
-- its own grant left to a later answer, and it goes with the last of those answers given
-- back. Another waiter's grant counts in `told` from the grant on (`take`), before anyone
-- heard it; given back unheard it
-- takes its count back (once a grant: the outcome's `untold:<key>`), and when no count is
-- left and the lock's own grant was given back `unheard`, the lock goes with it (answered not
-- kept, again as often as asked: its caller gives it back by token). A shared hold is kept
-- once any answer told it (`told_shared`), as give_back.lua keeps it.
local function kept_for_others(h, id, held, heard, kept)
  if h.bad or held == 2 then return end  -- an upgrade stays its pull's: kept
  -- A grant heard keeps its own answer (the lock it made is new to its caller; a give-back
  -- of it later leaves what `told` counts: RELEASE's `unless_told`).
  if h[10] == 'shared' then
    if held ~= 1 and not heard and shared_told(h) then table.insert(kept, h[1]) end
    return
  end
  local name = lock_name(h[1])
  if held ~= 1 then
    if heard or told_count(name, false) <= 0 then return end
    w('HSET', name, 'unheard', '1')
    table.insert(kept, h[1])
    return
  end
  if heard then return end
  local outcome, mark = outcome_name(id), 'untold:' .. h[1]
  local untold = not CALL('HGET', outcome, mark)  -- this answer is still in the count
  local told = told_count(name, untold)
  if told > 0 and untold then
    w('HSET', outcome, mark, '1')
    told = told - 1
    w('HSET', name, 'told', told)  -- (as read: a count written over keeps its unknown one)
  end
  if told > 0 or CALL('HGET', name, 'unheard') == false then return end
  for i, k in ipairs(kept) do
    if k == h[1] then
      table.remove(kept, i)
      return
    end
  end
end

-- A grant's `fresh` as answered with `kept` (the keys `kept_for_others` left): 0 when every
-- lock of its outcome's `locks` is kept, else 1; the outcome's own when `kept` is false.
local function fresh_with(tokens, kept, fresh)
  if not kept then return fresh end
  return #kept < #tokens and 1 or 0
end

-- fresh 1: some lock is new to the waiter; 0: its pull held every key already (unchanged).
local function grant(id, rec, fx)
  local locks, fresh, held = {}, 0, {}
  local parts = waiter_parts(rec)
  for i, k in ipairs(rec.keys) do
    local lock, new, upgraded = take(k, rec['d:' .. k], rec.repo, rec.pull,
                                     tonumber(rec.ttl), id, rec.mode, parts[i].path,
                                     parts[i].ws)
    table.insert(locks, lock)
    if new then fresh = 1 end
    held[i] = upgraded and 2 or new and 0 or 1
  end
  unqueue(id, rec)
  remember(id, rec, 'granted', locks, fresh, held)
  tell(rec, id, 'granted')
  table.insert(fx.granted, {rec.flat, locks, fresh})
  return locks
end

-- This replica is alive for REPLICA_MS more. Another Redis type where the liveness set goes
-- is replaced by a set of this replica and a mark, the empty member (never a replica id: an
-- empty setting means a generated one), alive as long: until then a replica missing from the
-- set counts as alive, as it did while the set was of another type. Without the mark, every
-- other replica's waiters would be dropped as gone until that replica beat again (replicas
-- with waiters beat every second, well inside REPLICA_MS).
local function beat()
  if not w_try('ZADD', LIVENESS, NOW + REPLICA_MS, REPLICA_ID) then
    w('DEL', LIVENESS)
    w('ZADD', LIVENESS, NOW + REPLICA_MS, REPLICA_ID, NOW + REPLICA_MS, '')
  end
end

local function replica_alive(replica_id)
  if alive[replica_id] == nil then
    local score = PCALL('ZSCORE', LIVENESS, replica_id)
    if is_error(score) then
      score = NOW  -- a liveness set of another type: `beat` mends it
    elseif score == false then
      score = CALL('ZSCORE', LIVENESS, '')  -- not heard since `beat` mended the set?
    end
    alive[replica_id] = score ~= false and tonumber(score) >= NOW
  end
  return alive[replica_id]
end

-- --- discovery: the keys a script's writes will touch, named before its first write --------
-- Each writing script first runs the reads that decide what it will change, forming (and so
-- checking) every name its writes will use; `planned` then asks for the undeclared ones, or
-- lets the script go on and do exactly what it did without them. Serving a queue decides
-- grant by grant on the holders the earlier grants left: its discovery is the walk itself,
-- run to plan (below), which makes the same decisions on VIEW, the holders as those grants
-- will leave them, and GONE, the waiters they will take out of the queues.

-- Every key of lock key k a write may touch.
local function key_names(k)
  lock_name(k)
  shared_name(k)
  fence_name(k)
  for level = 0, 3 do queue_name(k, level) end
  by_pull_name(k)
end

-- Every key a grant to waiter id, or its drop, touches (rec: its record, once read).
local function waiter_names(id, rec)
  waiter_name(id)
  outcome_name(id)
  if rec then
    pull_index(rec.repo, rec.pull)
    waits_name(rec.repo, rec.pull)
    for _, k in ipairs(rec.keys) do key_names(k) end
  end
end

-- Waiter id's record, read in a discovery, its grant's or drop's keys expected.
local function plan_waiter(id)
  expect(waiter_names, id, nil)
  local rec = read_waiter(id)
  if rec then expect(waiter_names, id, rec) end
  return rec
end

-- The indexes of the pulls whose lapsed leases on k a write will drop.
local function plan_lapsed(k)
  local rows = read_shared(k)
  local ex = read_lock(k)
  if ex then table.insert(rows, ex) end
  for _, h in ipairs(rows) do
    if not h.bad and lapsed(h) then expect(pull_index, h[6], h[7]) end
  end
end

-- `grant(id, rec)` pictured: each key taken as `take` takes it, the waiter out of the queues.
local function plan_grant(id, rec)
  local parts = waiter_parts(rec)
  for i, k in ipairs(rec.keys) do
    local hs, mine = view_holders(k), false
    for _, h in ipairs(hs) do
      if same_owner(h, rec.repo, rec.pull) then mine = h end
    end
    if not mine or (rec.mode == 'exclusive' and mine[10] == 'shared') then
      local after = {}
      for _, h in ipairs(hs) do
        if h ~= mine then table.insert(after, h) end
      end
      local row = {k, rec['d:' .. k], '0', int(NOW), '0', rec.repo, rec.pull, id, false,
                   rec.mode, parts[i].path, parts[i].ws, false}
      row.ex = rec.mode ~= 'shared'
      table.insert(after, row)
      VIEW[k] = after
    end
  end
  GONE[id] = true
end

-- --- serving the queues: one walk, run to plan and then to write ----------------------------
-- A writing script that serves queues walks them twice, with the same functions: first to
-- plan, in its discovery (`fx` is PLAN), then to write (`fx` is the call's effects, which
-- collect what was granted, dropped and expired). Planning, each waiter met has its record
-- read and every name its grant or drop would touch formed (`plan_waiter`), a grant is
-- pictured in VIEW and GONE (`plan_grant`), a drop in GONE, and nothing is written. Writing,
-- `planned` has emptied VIEW and GONE, so the same decisions read what the writes left. Only
-- the steps below that look at `fx` differ between the two; every decision is made once.
local PLAN = false

-- The record of the waiter a walk meets, or nil: none that reads, or (planning) one the plan
-- has already taken out of the queues.
local function meet(id, fx)
  if GONE[id] then return nil end
  if fx == PLAN then return plan_waiter(id) end
  return read_waiter(id)
end

-- Why a waiter leaves the queues ungranted ('timeout': past its deadline, 'unavailable': its
-- replica is gone), or nil when it stays.
local function turned_away(rec)
  if tonumber(rec.deadline) <= NOW then return 'timeout' end
  if not replica_alive(rec.replica) then return 'unavailable' end
  return nil
end

local function give(id, rec, fx)
  if fx == PLAN then
    plan_grant(id, rec)
  else
    grant(id, rec, fx)
  end
end

-- Whether k has a live exclusive holder (planning: in the picture, VIEW, where it has one).
local function held_exclusively(k)
  local pictured = VIEW[k]
  if not pictured then
    local ex = read_lock(k)
    return ex ~= nil and not lapsed(ex)
  end
  for _, h in ipairs(pictured) do
    if h.ex then return true end
  end
  return false
end

-- Serve k's queue (no concurrency rules): grant each waiter the rules allow, in service
-- order; a waiter held back by k's holders, or an exclusive grant, ends the walk; one held
-- back by a freeze, a limit or another key of its batch keeps its place. Waiters past their
-- deadline or whose replica is gone are dropped, after the walk, with the entries whose
-- record is missing.
local function walk_key(k, fx)
  if not maybe_queued(k) then return end  -- nobody waits: done
  if held_exclusively(k) then return end  -- nobody can be served yet
  local writing = fx ~= PLAN
  local next_waiter, gone, upcoming = walker(k)
  local dropped = writing and {}
  local walked = 0
  while true do
    local entry = next_waiter()
    if not entry then break end
    if not writing and not GONE[entry.id] and not declared(waiter_name, entry.id) then
      -- Planning, a record not declared: ask for it and the next ones, as many as the walk
      -- met already (LOOK_CHUNK at least), so a walk over n waiters asks O(log n) times.
      expect(waiter_names, entry.id, nil)
      for _, id in ipairs(upcoming(math.max(LOOK_CHUNK, walked))) do
        if not GONE[id] then expect(waiter_names, id, nil) end
      end
      ask()
    end
    walked = walked + 1
    local rec = meet(entry.id, fx)
    local why = rec and turned_away(rec)
    if why then
      if writing then
        table.insert(dropped, {entry, rec, why})
      else
        GONE[entry.id] = true
      end
    elseif rec then
      local d = verdict(rec.repo, rec.pull, rec.mode, waiter_parts(rec), false)
      if d[1] == 'grant' then
        give(entry.id, rec, fx)
        if writing then gone(entry) end  -- (planning, its entry stays in the queue)
        if rec.mode ~= 'shared' then break end
      elseif d[1] == 'held' and d[2] == k then
        break
      elseif d[1] == 'damaged' then
        if writing then set_aside(d[2], d[3]) end
        if d[2] == k then break end
      end
    elseif writing then
      table.insert(dropped, {entry, false})
    end
  end
  if not writing then return end
  for _, d in ipairs(dropped) do
    if d[2] then
      drop_waiter(d[1].id, d[2], d[3], fx)
    else
      w_try('ZREM', queue_name(k, d[1].level), d[1].member)
      w_try('ZREM', by_pull_name(k), '\n' .. d[1].id)
    end
  end
  queue_left(k)
end

-- Every waiter of every queue (of `queued`, the members of QUEUED when read already), in one
-- service order, each with its queue entries.
local function all_entries(queued)
  local entries, by_id = {}, {}
  for _, k in ipairs(queued or members(QUEUED)) do
    for level = 0, 3 do
      local r = queue_range(k, level, 0, -1, 'WITHSCORES')
      for i = 1, #r, 2 do
        local id = member_waiter(r[i])
        local e = by_id[id]
        if not e then
          e = {id = id, seq = member_seq(r[i]), enq = tonumber(r[i + 1]),
               level = level, refs = {}}
          by_id[id] = e
          table.insert(entries, e)
        end
        table.insert(e.refs, {k, level, r[i]})
      end
    end
  end
  table.sort(entries, before)
  return entries
end

-- Serve every queue at once, in one service order (concurrency rules: a lock freed in a
-- group may go to a waiter of another key); a holder stops only its own key's line.
-- Planning, it first names every queued key's keys and every held key's holders (the limits
-- count them), then every waiter's record.
local function walk_all(fx)
  local writing = fx ~= PLAN
  local queued = nil
  if not writing then
    queued = members(QUEUED)
    for _, k in ipairs(queued) do expect(key_names, k) end
    for _, k in ipairs(members(HELD)) do
      expect(lock_name, k)
      expect(shared_name, k)
    end
    ask()
  end
  local entries = all_entries(queued)
  if not writing then
    for _, e in ipairs(entries) do expect(waiter_names, e.id, nil) end
    ask()
  end
  local stopped = {}
  for _, e in ipairs(entries) do
    local rec = meet(e.id, fx)
    local why = rec and turned_away(rec)
    if why then
      if writing then
        drop_waiter(e.id, rec, why, fx)
      else
        GONE[e.id] = true
      end
    elseif rec then
      local blocked = false
      for _, k in ipairs(rec.keys) do
        if stopped[k] then blocked = true end
      end
      if not blocked then
        local d = verdict(rec.repo, rec.pull, rec.mode, waiter_parts(rec), false)
        if d[1] == 'grant' then
          give(e.id, rec, fx)
        elseif d[1] == 'held' then
          stopped[d[2]] = true
        elseif d[1] == 'damaged' then
          if writing then set_aside(d[2], d[3]) end
          stopped[d[2]] = true
        end
      end
    elseif writing then
      for _, ref in ipairs(e.refs) do
        w_try('ZREM', queue_name(ref[1], ref[2]), ref[3])
        w_try('ZREM', by_pull_name(ref[1]), '\n' .. e.id)
        queue_left(ref[1])
      end
    end
  end
end

-- Serve the queues of `keys` (in the order given), or every queue under concurrency rules;
-- fx: the call's effects, or PLAN (in a discovery; VIEW may first picture what the script
-- frees before serving).
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

-- The next waiters of k (up to two, in service order), for the caller to declare next time:
-- {id, repo, pull, keys (JSON)} each, the last three '' when its record was not declared to
-- this call (so a hand-off names the waiter after next, and the one after that by id).
local function ahead(k)
  local out = {}
  if not maybe_queued(k) then return out end
  local next_waiter = walker(k)
  while #out < 2 do
    local entry = next_waiter()
    if not entry then break end
    local rec = declared(waiter_name, entry.id) and read_waiter(entry.id)
    if rec then
      table.insert(out, {entry.id, rec.repo, rec.pull, cjson.encode(rec.keys)})
    else
      table.insert(out, {entry.id, '', '', ''})
    end
  end
  return out
end

-- The end of a discovery: ask for what is not declared, else go on with the writes.
local function planned()
  ask()
  VIEW, GONE = {}, {}
end

-- --- the lean paths (acquire.lua and release.lua, and the lean functions of their own) ------
-- The uncontended acquire, lean: one exclusive key k, no waiting, no rules, nobody queued and
-- nothing stored at the key (no lock hash, no shared holders). It grants exactly as
-- acquire.lua's `main` would (`stamp`, the same reply kept under the call id), without the
-- discovery, the serving and the verdict, which all find nothing to do then. It answers only
-- what the caller does not know ({'took', token, at, exp}): a lock row and its copy kept under
-- the call id cost Redis more than the grant. nil when it cannot serve the call (nothing is
-- written before that is decided). The caller has checked the rest (one key, exclusive, no
-- waiting, no rules). The names it touches are given: the key's lock hash, shared holders'
-- hash, fencing counter and the owner's pull index (false: one is not declared, and the call
-- goes to the full path). ACQUIRE's lean path looks them up (`lean_acquire`); the lean
-- function LEAN_ACQUIRE takes them by position in its KEYS and forms none: forming and
-- checking each name cost more than a tenth of its call.
local function grant_free(k, data, repo, pull, ttl, path, ws, lock_hash, shared_hash, counter,
                          pull_set, free, unqueued)
  if not (lock_hash and shared_hash and counter and pull_set) then return nil end
  -- (`unqueued`: the caller found no `queued` index (`lean_absent`))
  if not unqueued and maybe_queued(k) then return nil end
  -- (`free`: the caller found neither hash (`lean_absent`))
  if not free and CALL('EXISTS', lock_hash, shared_hash) > 0 then return nil end
  if TOKEN_BASE > 0 then  -- a store that lost its data once: `stamp` checks the counter first
    fetched[k] = {lock = false}  -- known free (the grant reads nothing more of its holders)
    local lock = stamp(k, data, repo, pull, ttl, false, 'exclusive', path, ws, counter,
                       lock_hash, pull_set)
    if not lock then return nil end  -- its fencing counter is not one: nothing written
    return finish_took(lock[3], lock[4], lock[5])
  end
  -- The rest is `stamp`'s grant of a free key without a claim, its writes in its order, with
  -- neither its row nor its checks for the cases this one has not (a claim, a shared grant,
  -- a hash to delete first, a counter below the base): each bytecode Lua runs costs Redis
  -- about 50 instructions, and `stamp` ran some 150 more a grant than this.
  local token = PCALL('INCR', counter)
  -- (a counter that is not one refuses INCR: nothing written; another refusal is raised)
  if type(token) ~= 'number' and is_error(token) then return nil end
  WROTE = true
  if token == 1 then w_try('SADD', FENCED, k) end  -- as in `stamp`
  local at, tok, exp = int(clock()), int(token), '0'
  if ttl > 0 then exp = int(NOW + ttl) end
  w('HSET', lock_hash, 'data', data, 'token', tok, 'at', at, 'repo', repo, 'pull', pull,
             'exp', exp, 'path', path, 'ws', ws)
  if ttl > 0 then w('PEXPIREAT', lock_hash, NOW + ttl + GRACE_MS) end
  w_try('SADD', HELD, k)
  w_try('SADD', pull_set, k)
  return finish_took(tok, at, exp)
end

local function lean_acquire(k, data, repo, pull, ttl, path, ws)
  return grant_free(k, data, repo, pull, ttl, path, ws, declared(lock_name, k),
                    declared(shared_name, k), declared(fence_name, k),
                    declared(pull_index, repo, pull))
end

-- The uncontended release, lean: the owner's own exclusive lock of k, readable and live, no
-- rules, no shared holders and nobody queued on the key. It releases exactly as release.lua's
-- `main` would (`drop_lock`'s `drop_exclusive`, its reply kept under the call id), without
-- the discovery and the serving, which find nothing to do then, and answers only what the
-- caller does not know ({'dropped', data, token, at, exp}; data false when the lock has the
-- stamp `sent`, `<token>:<grant time ms>` of the lock the caller believes stored: the key's
-- lock as it last read or made it). nil when it
-- cannot serve the call (nothing written). The names are given as to `grant_free`: RELEASE's
-- lean path looks them up (`lean_release`), LEAN_RELEASE takes them by position.
-- Whether `named`, `<token>:<grant time ms>` as a caller names a lock it knows, names a lock
-- stored with `token` and `at`: as text (the caller's own grant, nearly always: one string
-- made and compared), else as the numbers they read as (the full path reads them so: a token
-- written over as ' 2' is the lock of token 2).
local function same_stamp(named, token, at)
  if named == token .. ':' .. at then return true end
  local t, a = string.match(named, '^(%d+):(%d+)$')
  return t ~= nil and tonumber(t) == tonumber(token) and tonumber(a) == tonumber(at)
end

local function release_own(k, repo, pull, lock_hash, shared_hash, pull_set, sent, unshared,
                           unqueued)
  if not (lock_hash and shared_hash and pull_set) then return nil end
  if not unqueued and maybe_queued(k) then return nil end  -- (`unqueued`: as in `grant_free`)
  -- The hash read as `lock_row` reads it, its fields looked at in place rather than made into
  -- a row (each bytecode Lua runs costs Redis about 50 instructions): a lock to release here
  -- is one `lock_row` answers as a readable row (not set aside, its data, token, times and
  -- owner there and its numbers numbers), not lapsed (`lapsed`) and the owner's
  -- (`same_owner`); anything else goes to the full path, which reads it again.
  local v = PCALL('HMGET', lock_hash, 'data', 'token', 'at', 'exp', 'repo', 'pull', 'damaged')
  if v['err'] and is_error(v) then return nil end  -- (not a hash: `lock_row`'s unreadable)
  local data, exp = v[1], v[4]
  if v[7] or not data or v[5] ~= repo or v[6] ~= pull
      or not (tonumber(v[2]) and tonumber(v[3])) then
    return nil
  end
  if exp ~= '0' then  -- (no lease, most locks: no number to read)
    local ends = tonumber(exp)
    if not ends or (ends > 0 and ends <= clock()) then return nil end
  end
  -- (`unshared`: the caller found no shared holders' hash (`lean_absent`))
  if not unshared and CALL('EXISTS', shared_hash) > 0 then return nil end
  -- `drop_exclusive`'s writes (no shared holder is left), without its note of the key as
  -- known free: this call reads nothing after them, and the note is a table Lua makes
  w('DEL', lock_hash)
  w_try('SREM', HELD, k)
  w_try('SREM', pull_set, k)
  -- The data the caller has is not sent back: JSON-encoding it for the answer kept under the
  -- call id cost Redis more than the commands of the release. The caller names it by its
  -- token and grant time, not by the JSON itself, which would cross into Lua once more (about
  -- 12 instructions a byte): a lock's data is written only with a new token (`stamp`,
  -- `grant_free`) or as given with its own token and time (ADOPT, REPLACE), never changed
  -- under them.
  if sent and sent ~= '' and same_stamp(sent, v[2], v[3]) then data = false end
  return finish_flat({'dropped', data, v[2], v[3], exp})
end

local function lean_release(k, repo, pull)
  return release_own(k, repo, pull, declared(lock_name, k), declared(shared_name, k),
                     declared(pull_index, repo, pull), false)
end

-- ADOPT and REPLACE: the lock as given (ARGV[11] key .. ARGV[20] workspace, adopt.lua's
-- layout). `raise_to_given` lifts k's counter to its token (a damaged counter starts from the
-- clock first); `store_given` stores it, keeping its token, times, lease and mode.
local function raise_to_given(k)
  if fence_damage(k) then repair(k, true) end
  local current = tonumber(CALL('GET', fence_name(k)) or '0')
  w_try('SADD', FENCED, k)
  if tonumber(ARGV[15]) > current then w('SET', fence_name(k), ARGV[15]) end
end

local function store_given(k, exp)
  if ARGV[18] == 'shared' then
    save_shared({k, ARGV[14], ARGV[15], ARGV[16], ARGV[17], ARGV[12], ARGV[13], false, false,
                 'shared', ARGV[19], ARGV[20]})
  else
    w('HSET', lock_name(k), 'data', ARGV[14], 'token', ARGV[15], 'at', ARGV[16],
               'exp', exp, 'repo', ARGV[12], 'pull', ARGV[13], 'path', ARGV[19], 'ws', ARGV[20])
    collect_after(k, exp)
  end
  w_try('SADD', HELD, k)
  w_try('SADD', pull_index(ARGV[12], ARGV[13]), k)
end
-- luacheck: pop

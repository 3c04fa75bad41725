-- acquire-or-enqueue: grant every key of a batch (one key is a batch of one) as the rules
-- allow, or queue one waiter on every key, or refuse.
-- KEYS[8..] every key of each lock key (RedisKeys.of_key, its index by pull among them), the
--   owner's pull index, the waiter's record and outcome and, with them, the indexes' mark
--   (RedisKeys.by_pull_mark) and the owner's index of waits (RedisKeys.waits); what it finds
--   while it runs it asks for (lib.lua: `run`)
-- ARGV[11] lease in ms (0: none)  ARGV[12] waiter id ('' = fail fast)  ARGV[13] wait in ms
-- ARGV[14] request id ('' none)  ARGV[15] owner repo  ARGV[16] owner pull
-- ARGV[17] base priority level 0..3  ARGV[18] mode  ARGV[19] head commit ('' unknown)
-- ARGV[20] caller ('' none)  ARGV[21..] quads: lock key, Atlantis JSON, path, workspace
-- returns {'granted', {lock...}, fresh 0/1, the keys of those its pull held already (answered
--          unchanged; a grant a retry takes over is heard: its own answer, lib.lua
--          `kept_for_others`), or false when the grant a retry takes
--          over does not say (an older replica's: lib.lua `kept_keys`), the keys of those
--          whose shared hold of its pull it upgraded to exclusive (lib.lua `kept_keys`;
--          none when a retry takes over a grant another caller heard first)}
--         {'took', token, at, exp}: granted by the lean path (`uncontended`), the one key as
--          asked (the caller sent the rest of the lock)
--         {'held' | 'limited', key, its holder or {}}
--         {'frozen', key, its holder or {}, freeze name}
--         {'queue_full', key, lock or {}, superseded waiter records}
--         {'queued', waiter record (flat), key, its holder or {}, position, freeze name or '',
--          superseded waiter records}
--         each but 'took' with, after it, the locks whose lease had run out and that the call
--         dropped before it decided, when there are any or it served a waiter, and after them
--         the waiters it served before it decided ({waiter record, locks, fresh} each), when
--         there are any
-- decoded by redis_replies.acquire
local refused = guard()
if refused then return refused end
-- The uncontended case, lean (lib.lua: `lean_acquire`): one exclusive key, no waiting, no
-- rules; anything else, or a key someone holds or waits for, goes on to `main`. The client
-- sends such a call to the lean function of its own (lean_acquire.lua) first; this one
-- serves it when the client sent it here in full.
local function uncontended()
  if #ARGV ~= 24 or ARGV[12] ~= '' or ARGV[10] ~= '' or ARGV[18] ~= 'exclusive' then
    return nil
  end
  return lean_acquire(ARGV[21], ARGV[22], ARGV[15], ARGV[16], tonumber(ARGV[11]), ARGV[23],
                      ARGV[24])
end
local quick = uncontended()
if quick then return quick end
local function main()
  local ttl, wait_id, wait_ms = tonumber(ARGV[11]), ARGV[12], tonumber(ARGV[13])
  local rid, repo, pull, level = ARGV[14], ARGV[15], ARGV[16], ARGV[17]
  local mode, head, caller = ARGV[18], ARGV[19], ARGV[20]
  local keys, datas, parts = {}, {}, {}
  for i = 21, #ARGV, 4 do
    table.insert(keys, ARGV[i])
    datas[ARGV[i]] = ARGV[i + 1]
    table.insert(parts, {key = ARGV[i], repo = repo, path = ARGV[i + 2], ws = ARGV[i + 3]})
  end
  -- The caller declares these (RedisKeys.acquire); expected here so that one answer asks
  -- for all of them if it did not.
  for _, k in ipairs(keys) do expect(key_names, k) end
  expect(pull_index, repo, pull)
  if wait_id ~= '' then
    expect(waiter_names, wait_id, nil)
    expect(by_pull_mark)
    expect(waits_name, repo, pull)
    local rec = read_waiter(wait_id)
    if rec then  -- the same waiter asking again (a retry takes it over): where it stands
      expect(key_names, rec.keys[1])
      planned()
      if caller ~= '' and rec['caller'] ~= caller then
        w('HSET', waiter_name(wait_id), 'caller', caller, 'replica', REPLICA_ID)
        rec = read_waiter(wait_id)
      end
      local k = rec.keys[1]
      return {'queued', rec.flat, k, peek(k) or {}, position(k, rec), '', {}}
    end
    -- Granted while its caller was away: the retry takes it. (Another type where the outcome
    -- goes is no outcome of ours.)
    local out = redis.pcall('HMGET', outcome_name(wait_id), 'kind', 'locks', 'fresh')
    if not is_error(out) and out[1] == 'granted' then
      local still, all, unheard, tokens = {}, true, true, cjson.decode(out[2])
      for _, pair in ipairs(tokens) do
        expect(lock_name, pair[1])
        expect(shared_name, pair[1])
      end
      planned()
      local kept, upgraded = kept_keys(tokens)
      for _, pair in ipairs(tokens) do
        local h = holder_with_token(pair[1], pair[2])
        if h then
          -- Confirmed: the retry's caller is answered with it, so every claim on it ends,
          -- another waiter's on a lock its pull held already too (lib.lua `settle_heard`).
          -- (A lock without a claim that its pull did not hold already was heard of before.)
          if h[8] then settle_heard(h, wait_id, true) elseif pair[3] ~= 1 then unheard = false end
          table.insert(still, h)
          -- heard: the grant's own answer (lib.lua `kept_for_others`)
          if kept then kept_for_others(h, wait_id, pair[3], true, kept) end
        else
          all = false
        end
      end
      if all and #still > 0 then
        w('HSET', outcome_name(wait_id), 'kind', 'taken')
        -- nobody heard of it yet: the retry's to give back, fresh as it was granted
        -- (heard before, an upgrade it made was announced by its first hearer)
        local fresh = fresh_with(tokens, kept, tonumber(out[3]) or 1)
        return {'granted', still, unheard and fresh or 0, kept, unheard and upgraded or {}}
      end
    end
  end
  -- Discovery: the lapsed leases it drops, the queues it serves, the waiters it reads.
  for _, k in ipairs(keys) do plan_lapsed(k) end
  serve(keys, PLAN)
  -- Its pull's older requests it supersedes, if it waits: those its keys' indexes by pull
  -- list; every waiter of a key whose index is not of the current generation or lists fewer
  -- or more than its queues (written by an earlier release: made again below,
  -- `reindex_pulls`).
  -- A shared request: the records its verdict may read looking for an exclusive request
  -- ahead on each key (`exclusive_waiting`, named by `expect_exclusive_look`; none where a
  -- holder keeps it out first).
  local scan = head ~= '' and wait_id ~= '' and wait_ms > 0
  -- The indexes' generation (`pull_generation`), for a call that may queue.
  local gen, moved = 0, false
  if wait_id ~= '' and wait_ms > 0 then gen, moved = pull_generation() end
  local others, unindexed = {}, {}
  if mode == 'shared' then
    for _, k in ipairs(may_look_behind(parts, repo, pull)) do
      expect_exclusive_look(k, repo, pull, tonumber(level))
    end
  end
  for _, k in ipairs(keys) do
    if scan and not pulls_indexed(k, gen) then unindexed[k] = true end
    if unindexed[k] then
      for lv = 0, 3 do
        for _, member in ipairs(queue_range(k, lv, 0, -1)) do
          local id = member_waiter(member)
          if id ~= wait_id and not GONE[id] then
            expect(waiter_names, id, nil)
            table.insert(others, id)
          end
        end
      end
    end
    if scan and not unindexed[k] then
      for _, id in ipairs(pull_waiters(k, repo, pull)) do
        if id ~= wait_id and not GONE[id] then
          expect(waiter_names, id, nil)
          table.insert(others, id)
        end
      end
    end
  end
  for _, id in ipairs(others) do
    local rec = read_waiter(id)
    if rec and rec.repo == repo and rec.pull == pull then expect(waiter_names, id, rec) end
  end
  planned()
  local fx = new_effects()
  for _, k in ipairs(keys) do expire_lapsed(k, fx.expired) end
  -- The answer, with the leases that ran out and were dropped above after it (if any): the
  -- caller tells each as expired; then the waiters served on the way (if any): the caller
  -- counts each hand-off.
  local function told(reply)
    if #fx.expired > 0 or #fx.granted > 0 then table.insert(reply, fx.expired) end
    if #fx.granted > 0 then table.insert(reply, fx.granted) end
    return reply
  end
  serve(keys, fx)
  local d = verdict(repo, pull, mode, parts, true, tonumber(level))
  -- A key whose fencing counter cannot serve the grant: answered as held by an unreadable
  -- lock (set aside; a force-unlock repairs it), waiting or not.
  if d[1] == 'damaged' then return told({'held', d[2], set_aside(d[2], d[3])}) end
  if d[1] == 'grant' then
    local locks, fresh, kept, upgraded = {}, 0, {}, {}
    for i, k in ipairs(keys) do
      local lock, new, up = take(k, datas[k], repo, pull, ttl, false, mode, parts[i].path,
                                 parts[i].ws)
      table.insert(locks, lock)
      if new then fresh = 1 else table.insert(kept, k) end
      if up then table.insert(upgraded, k) end
    end
    return told({'granted', locks, fresh, kept, upgraded})
  end
  local blocked = d[2]
  local holder = peek(blocked) or {}
  local waits = wait_id ~= '' and wait_ms > 0
  if d[1] == 'frozen' and (d[3]['refuse'] or not waits) then
    return told({'frozen', blocked, holder, d[3]['name']})
  end
  if not waits then return told({d[1], blocked, holder}) end
  -- A generation moved on is kept before an index is stamped with it.
  if moved then keep_pull_mark(moved, gen) end
  -- A newer head commit of the same pull pushes its older queued requests out.
  local superseded = {}
  if head ~= '' then
    local stale, freed = {}, {}
    for _, k in ipairs(keys) do
      if unindexed[k] then reindex_pulls(k, gen) end
      freed[k] = 0
      for _, id in ipairs(pull_waiters(k, repo, pull)) do
        if id ~= wait_id and not stale[id] then
          local rec = read_waiter(id)
          if rec and rec.repo == repo and rec.pull == pull and (rec['head'] or '') ~= ''
              and rec['head'] ~= head then
            stale[id] = rec
          end
        end
        if stale[id] then freed[k] = freed[k] + 1 end
      end
    end
    -- A full queue refuses the request before it pushes anything out: one that does not
    -- queue leaves its pull's older requests queued, as one that does not wait does (the
    -- places of those it would push out count as free). A damaged queue is answered below.
    for _, k in ipairs(keys) do
      local size = queue_size(k)
      if not QUEUE_DAMAGE[k] and size - freed[k] >= policy().max_size then
        return told({'queue_full', k, peek(k) or {}, {}})
      end
    end
    for id, rec in pairs(stale) do
      drop_waiter(id, rec, 'superseded', nil)
      table.insert(superseded, rec.flat)
    end
  end
  local sizes = {}
  for _, k in ipairs(keys) do
    local size = queue_size(k)
    sizes[k] = size
    -- A queue of another Redis type (written over): nobody can wait on the key in order, so
    -- the request is answered as held by an unreadable lock (a force-unlock repairs it).
    if QUEUE_DAMAGE[k] then
      return told({'held', k, unreadable(k, '', QUEUE_DAMAGE[k], {})})
    end
    if size >= policy().max_size then
      return told({'queue_full', k, peek(k) or {}, superseded})
    end
  end
  beat()
  local seq = w_try('INCR', SEQ)
  if not seq then  -- another type where the enqueue counter is: it starts again above it
    seq = int(NOW * 1000)
    w('SET', SEQ, seq)
  end
  keep_pull_mark(seq, gen)  -- (this enqueue keeps its entries)
  local deadline = NOW + wait_ms
  local name = waiter_name(wait_id)
  w('DEL', name)  -- nothing readable is there (read_waiter found none): another type may be
  w('HSET', name, 'id', wait_id, 'keys', cjson.encode(keys), 'repo', repo, 'pull', pull,
             'level', level, 'enq', NOW, 'seq', seq, 'deadline', deadline, 'ttl', ttl,
             'replica', REPLICA_ID, 'rid', rid, 'mode', mode, 'head', head, 'caller', caller)
  for i, k in ipairs(keys) do
    w('HSET', name, 'd:' .. k, datas[k], 'p:' .. k, parts[i].path, 'w:' .. k,
               parts[i].ws)
  end
  w('PEXPIREAT', name, deadline + GRACE_MS)
  list_enqueued(repo, pull, wait_id, deadline + GRACE_MS, seq)
  queue_entries(keys, level, seq, wait_id, repo, pull, sizes, gen)
  local freeze = ''
  if d[1] == 'frozen' then freeze = d[3]['name'] end
  local rec = read_waiter(wait_id)
  return told({'queued', rec.flat, blocked, holder, position(blocked, rec), freeze, superseded})
end
return run(main, true)

-- give-back: undo an acquire whose caller was told the store did not answer (`unavailable`:
-- Redis took the call and answered too late, or the connection broke) or went away while it was
-- on its way, by that call's id C. Redis runs a call it took however late, so the call may have
-- granted. (A call that may wait and queued a waiter instead kept `queued` as its answer: it
-- grants nothing here; its waiter is withdrawn by its id.)
-- What C granted, as the answer kept under op:<C> says (the lean path's {'took', token, ...}
-- for the one key asked, or the rows of {'granted', locks, fresh, kept, upgraded}), is
-- released and its key's queue served, as RELEASE does, but only an exclusive lock that is
-- still that grant (same owner, same token, live) and that no later call was answered with
-- (`take` and REFRESH mark it `told`): a later request of the same pull that was told it holds
-- the lock keeps it. An upgrade C made of its pull's shared hold stays (the pull held the key
-- before C; giving the upgrade back would free that hold with it), and is answered while it
-- is still that upgrade (same owner, same token, live): nobody heard of it, and the locker
-- announces it.
-- Nothing is kept under op:<C> when C has not run yet (still on its way, or in a frozen
-- Redis's input): a mark is kept there instead, which C answers as its kept answer when it
-- runs, writing nothing. (After OP_MS the answer C kept is gone too: what C granted then
-- stays held.)
-- KEYS[8] op:<C>, taken by position (no name function forms it); KEYS[9..] each asked lock
--   key's keys (RedisKeys.of_key), the owner's pull index; the names serving the queues
--   touches it asks for
-- ARGV[11] owner repo  ARGV[12] owner pull  ARGV[13..] the lock keys C asked for
-- returns {'released', lock or {}, granted, dropped, other locks released, {}, expired,
--         upgrades kept} as RELEASE (the locks given back: the first, then the rest), and the
--         upgrades C made that it leaves held
-- decoded by redis_replies.give_back
local refused = guard()
if refused then return refused end
local function main()
  local op, repo, pull = KEYS[8], ARGV[11], ARGV[12]
  local granted = {}  -- by lock key: the token C granted it with
  local shared = {}  -- the same, of the shared holds C answered
  local upgrades = {}  -- the same, of its pull's shared holds C upgraded (kept)
  local kept = PCALL('GET', op)
  if type(kept) == 'string' then
    local ok, answer = pcall(cjson.decode, kept)
    if ok and type(answer) == 'table' then
      if answer[1] == 'took' then
        granted[ARGV[13]] = answer[2]
      elseif answer[1] == 'granted' and type(answer[2]) == 'table' then
        local upgraded = {}
        if type(answer[5]) == 'table' then
          for _, k in ipairs(answer[5]) do upgraded[k] = true end
        end
        for _, row in ipairs(answer[2]) do
          if type(row) == 'table' and row[10] == 'exclusive' then
            if upgraded[row[1]] then
              upgrades[row[1]] = row[3]
            else
              granted[row[1]] = row[3]
            end
          end
          if type(row) == 'table' and row[10] == 'shared' then shared[row[1]] = row[3] end
        end
      end
    end
  end
  -- A lock C answered as held already (`told:<op>`, lib.lua's `relied_on`) takes C's count
  -- back from `told`; C's own grant (no such mark) left for a later answer is marked
  -- `unheard`. Either goes once no answer that may have been heard is left (`told` 0) and
  -- its grant was unheard too (C granted it, or `unheard`).
  local going, keys, untold, unheard, kept_up = {}, {}, {}, {}, {}
  local left = {}  -- by lock name in `untold`: its `told` less this answer
  local mine = 'told:' .. op
  for i = 13, #ARGV do
    local k = ARGV[i]
    if granted[k] then
      expect(key_names, k)
      expect(pull_index, repo, pull)
      plan_lapsed(k)
      local h = read_lock(k)
      if h and not h.bad and not lapsed(h) and same_owner(h, repo, pull)
          and h[3] == granted[k] then
        local name = lock_name(k)
        local teller = CALL('HGET', name, mine) ~= false
        local told = told_count(name, teller)
        if teller then
          told = told - 1
          table.insert(untold, name)
          left[name] = told
        end
        if told <= 0 and (not teller or CALL('HGET', name, 'unheard') ~= false) then
          table.insert(going, h)
          table.insert(keys, k)
          VIEW[k] = {}
        elseif not teller then
          table.insert(unheard, name)
        end
      end
    elseif upgrades[k] then
      expect(key_names, k)
      local h = read_lock(k)
      if h and not h.bad and not lapsed(h) and same_owner(h, repo, pull)
          and h[3] == upgrades[k] then
        table.insert(kept_up, h)
      end
    elseif shared[k] then
      -- C's shared hold of k goes if it is still C's (live, same token) and no answer told
      -- its owner it holds it (`told_shared`: C's own, when C found it held already); the
      -- key's other shared holders stay.
      expect(key_names, k)
      expect(pull_index, repo, pull)
      plan_lapsed(k)
      local rest, mine_now = {}, nil
      for _, h in ipairs(holders(k)) do
        if not h.bad and h[10] == 'shared' and same_owner(h, repo, pull)
            and h[3] == shared[k] and not shared_told(h) then
          mine_now = h
        else
          table.insert(rest, h)
        end
      end
      if mine_now then
        table.insert(going, mine_now)
        table.insert(keys, k)
        VIEW[k] = rest
      end
    end
  end
  serve(keys, PLAN)
  planned()
  for _, name in ipairs(untold) do
    w('HDEL', name, mine)
    w('HSET', name, 'told', left[name])  -- (as read: a count written over keeps its unknown one)
  end
  for _, name in ipairs(unheard) do w('HSET', name, 'unheard', '1') end
  local expired = {}
  for _, k in ipairs(keys) do expire_lapsed(k, expired) end
  for _, h in ipairs(going) do drop_lock(h) end
  local fx = new_effects()
  serve(keys, fx)
  w('SET', op, '["given_back"]', 'PX', OP_PX)
  local others = {}
  for i = 2, #going do table.insert(others, going[i]) end
  return {'released', going[1] or {}, fx.granted, fx.dropped, others, {}, expired, kept_up}
end
return run(main, true)

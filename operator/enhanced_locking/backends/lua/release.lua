-- release-and-hand-off: free a key (optionally only the lock of the pull that holds it) and
-- serve its queue; also the admin's force-unlock (no owner: every holder goes).
-- KEYS[8..] the key's keys (RedisKeys.of_key), the owner's pull index; more (its next
--   waiters', a holder's index) it asks for
-- ARGV[11] lock key  ARGV[12] owner repo ('' = whoever holds it)  ARGV[13] owner pull
-- ARGV[14] fencing token (optional, with an owner): only the owner's lock with that token goes;
--   without an owner (a force-unlock): the tokens of the holds the caller's right was asked
--   about, joined by commas ('' none): a holder with another token is 'not_owned'
-- ARGV[15] 'unless_told' (optional, with a token): the give-back of a grant nobody heard
--   (its CANCEL or CONFIRM answered the lock as the grant's own: no answer had told its pull
--   it holds it); a lock an answer told its pull it holds since (`told`, lib.lua `relied_on`;
--   a shared hold: `shared_told`) stays, 'not_owned'
-- returns {'not_owned', lock} (nothing changed), or
--         {'released', lock or {}, granted, dropped, other locks released} where granted is a
--         list of {waiter record, {lock...}} and dropped a list of waiter records, then the
--         key's next waiters (lib.lua: `ahead`), then the locks whose lease had run out and
--         that the call dropped before it released, or
--         {'dropped', data, token, at, exp}: released by the lean path (`uncontended`), nobody
--          waiting (the lock's owner and key are the caller's)
-- decoded by redis_replies.release
local refused = guard()
if refused then return refused end
-- The uncontended case, lean (lib.lua: `lean_release`): the owner's own exclusive lock,
-- readable and live, no rules, no shared holders and nobody queued on the key; anything else
-- goes on to `main`. The client sends such a call to the lean function of its own
-- (lean_release.lua) first; this one serves it when the client sent it here in full.
local function uncontended()
  if #ARGV ~= 13 or ARGV[12] == '' or ARGV[10] ~= '' then return nil end
  return lean_release(ARGV[11], ARGV[12], ARGV[13])
end
local quick = uncontended()
if quick then return quick end
-- Whether an answer told h's owner it holds h (ARGV[15]).
local function told_since(h)
  if h.bad then return false end
  if h[10] == 'shared' then return shared_told(h) end
  return (tonumber(CALL('HGET', lock_name(h[1]), 'told') or '0') or 1) > 0
end
-- Whether h is what the call frees: the owner's lock (with ARGV[14], only its hold of that
-- token).
local function mine(h)
  return same_owner(h, ARGV[12], ARGV[13])
    and (ARGV[14] == nil or tonumber(h[3]) == tonumber(ARGV[14]))
    and not (ARGV[15] == 'unless_told' and told_since(h))
end
-- A force-unlock's checked holds (ARGV[14] without an owner), by fencing token.
local function checked_tokens()
  if ARGV[12] ~= '' or ARGV[14] == nil then return nil end
  local set = {}
  for t in string.gmatch(ARGV[14], '[^,]+') do set[tonumber(t)] = true end
  return set
end
local function main()
  local k = ARGV[11]
  expect(key_names, k)
  if ARGV[12] ~= '' then expect(pull_index, ARGV[12], ARGV[13]) end
  -- A force-unlock also repairs the key's own keys written over by something else (its
  -- fencing counter, its queues: `repair`); its discovery plans the serving as after it.
  local fix, fence = false, false
  if ARGV[12] == '' then
    fix, fence = damaged_parts(k), fence_damage(k)
    DAMAGE[k] = false  -- the serving below is planned as after the repair
  end
  -- Discovery: the leases it drops (lapsed ones, then the owner's or all), the queue it serves
  -- once they are gone.
  plan_lapsed(k)
  local now_held, going = holders(k), {}
  for _, h in ipairs(now_held) do
    if ARGV[12] == '' or mine(h) then
      going[h] = true
      if not h.bad then expect(pull_index, h[6], h[7]) end
    end
  end
  local rest = {}
  for _, h in ipairs(now_held) do
    if not going[h] then table.insert(rest, h) end
  end
  VIEW[k] = rest
  serve({k}, PLAN)
  planned()
  local expired = {}
  expire_lapsed(k, expired)
  local hs = holders(k)
  if ARGV[12] ~= '' then
    local owned = {}
    for _, h in ipairs(hs) do
      if mine(h) then table.insert(owned, h) end
    end
    if #hs > 0 and #owned == 0 then return {'not_owned', hs[1]} end
    hs = owned
  else
    local asked = checked_tokens()
    if asked then
      for _, h in ipairs(hs) do
        if h.bad or not asked[tonumber(h[3])] then return {'not_owned', h} end
      end
    end
  end
  for _, h in ipairs(hs) do drop_lock(h) end
  if fix then repair(k, fence) end
  local fx = new_effects()
  serve({k}, fx)
  local others = {}
  for i = 2, #hs do table.insert(others, hs[i]) end
  return {'released', hs[1] or {}, fx.granted, fx.dropped, others, ahead(k), expired}
end
return run(main, true)

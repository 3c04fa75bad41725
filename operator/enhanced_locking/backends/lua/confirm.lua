-- confirm: the waiter's replica takes the locks it was granted (ends the claim; granted, the
-- claim of another waiter of its pull on a lock the pull held already as well: lib.lua
-- `settle_heard`).
-- KEYS[8..] the waiter's record and outcome (and its keys' keys, if known); more it asks for
-- ARGV[11] waiter id
-- returns {'granted', locks, fresh 0/1, the caller that owned the waiter when it was granted,
--         the keys of those its pull held already (answered unchanged), or false when the
--         grant does not say (an older replica's: lib.lua `kept_keys`), the keys of those
--         whose shared hold of its pull the grant upgraded (lib.lua `kept_keys`)}
-- or {'lost', locks it still holds and must give back} (a claim lapsed first; none that its
-- pull held already: fresh 0, or one the grant names so, or one another answer told its pull
-- it holds, unless its count in `told` was the last: lib.lua `kept_for_others`)
-- (granted, the grant's own answer: a lock it made is new to its caller even when another
-- answer told its pull it holds it; a give-back later leaves it: RELEASE's `unless_told`)
-- decoded by redis_replies.confirm
local refused = guard()
if refused then return refused end
local function main()
  local out = redis.pcall('HMGET', outcome_name(ARGV[11]), 'kind', 'locks', 'fresh', 'waiter')
  if is_error(out) or out[1] ~= 'granted' then return {'lost', {}} end
  local fresh = tonumber(out[3]) or 1
  local tokens = cjson.decode(out[2])
  for _, pair in ipairs(tokens) do
    expect(lock_name, pair[1])
    expect(shared_name, pair[1])
  end
  planned()
  local held, marks, lost = {}, {}, false
  for _, pair in ipairs(tokens) do
    local holder = holder_with_token(pair[1], pair[2])
    if holder then
      table.insert(held, holder)
      table.insert(marks, pair[3])
    else
      lost = true
    end
  end
  -- Granted, the caller hears it: every claim on its locks ends (another waiter's too, on a
  -- lock its pull held already: lib.lua `settle_heard`). Lost, only its own: the caller is
  -- told unavailable and gives its own back, not those another answer told its pull it holds
  -- (lib.lua `kept_for_others`).
  for _, holder in ipairs(held) do settle_heard(holder, ARGV[11], not lost) end
  local kept, upgraded = kept_keys(tokens)
  if kept then
    for i, holder in ipairs(held) do kept_for_others(holder, ARGV[11], marks[i], not lost, kept) end
  end
  if lost then
    if fresh == 0 and not kept then return {'lost', {}} end
    local ours, keep = {}, {}
    for _, k in ipairs(kept or {}) do keep[k] = true end
    for i, holder in ipairs(held) do
      if not keep[holder[1]] and (kept or marks[i] ~= 1) then table.insert(ours, holder) end
    end
    return {'lost', ours}
  end
  local caller, granted_to = '', out[4] and cjson.decode(out[4]) or {}
  for i = 1, #granted_to, 2 do
    if granted_to[i] == 'caller' then caller = granted_to[i + 1] end
  end
  return {'granted', held, fresh_with(tokens, kept, fresh), caller, kept, upgraded}
end
return run(main, true)

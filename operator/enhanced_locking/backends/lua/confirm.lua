-- confirm: the waiter's replica takes the locks it was granted (ends the claim).
-- KEYS[8..] the waiter's record and outcome (and its keys' keys, if known); more it asks for
-- ARGV[11] waiter id
-- returns {'granted', locks, fresh 0/1} or {'lost', locks it still holds and must give back}
-- (a claim lapsed first; none when its pull held them already: fresh 0)
-- decoded by redis_replies.confirm
local refused = guard()
if refused then return refused end
local function main()
  local out = redis.pcall('HMGET', outcome_name(ARGV[11]), 'kind', 'locks', 'fresh')
  if is_error(out) or out[1] ~= 'granted' then return {'lost', {}} end
  local fresh = tonumber(out[3]) or 1
  for _, pair in ipairs(cjson.decode(out[2])) do
    expect(lock_name, pair[1])
    expect(shared_name, pair[1])
  end
  planned()
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
end
return run(main, true)

-- replace: put a lock in place of whatever is stored under its key, in one step (the fallback
-- journal's write: a key's entry replaced by a newer one, never a moment with neither).
-- Keeps the lock's token, times, lease and mode as adopt does; serves no queue (the journal
-- is a store nobody waits in).
-- KEYS[8..] the key's keys (RedisKeys.of_key) and the owner's pull index; more it asks for
--   (the index of the pull whose lock it replaces)
-- ARGV[11] lock key  ARGV[12] repo  ARGV[13] pull  ARGV[14] Atlantis JSON  ARGV[15] token
-- ARGV[16] acquired at (ms)  ARGV[17] lease end (ms, 0: none)  ARGV[18] mode
-- ARGV[19] path  ARGV[20] workspace
-- returns 1 stored, 2 not stored because its lease already ended (what was there is gone)
local refused = guard()
if refused then return refused end
local function main()
  local k = ARGV[11]
  expect(key_names, k)
  expect(pull_index, ARGV[12], ARGV[13])
  plan_lapsed(k)
  for _, h in ipairs(holders(k)) do
    if not h.bad then expect(pull_index, h[6], h[7]) end
  end
  planned()
  raise_to_given(k)
  expire_lapsed(k, nil)
  for _, h in ipairs(holders(k)) do drop_lock(h) end
  local exp = tonumber(ARGV[17])
  if exp > 0 and exp <= NOW then return 2 end
  store_given(k, exp)
  return 1
end
return run(main, true)

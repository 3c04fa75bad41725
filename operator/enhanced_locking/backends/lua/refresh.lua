-- refresh: restart the lease of a held lock from now (server time), or end it (the lock kept
-- until released, as one granted without a lease); ends a pending claim.
-- KEYS[8..] the key's keys (RedisKeys.of_key)
-- ARGV[11] lock key  ARGV[12] owner repo  ARGV[13] owner pull  ARGV[14] lease in ms (0: none)
-- returns {'refreshed', lock}, {'not_held'} or {'not_owned', lock}
-- decoded by redis_replies.refresh
local refused = guard()
if refused then return refused end
local function main()
  expect(key_names, ARGV[11])
  local hs = holders(ARGV[11])
  if #hs == 0 then return {'not_held'} end
  local lock = false
  for _, h in ipairs(hs) do
    if same_owner(h, ARGV[12], ARGV[13]) then lock = h end
  end
  if not lock then return {'not_owned', hs[1]} end
  local lease = tonumber(ARGV[14])
  local exp = 0
  if lease > 0 then exp = NOW + lease end
  lock[5], lock[8], lock[9] = exp == 0 and '0' or int(exp), false, false
  if lock[10] == 'shared' then
    told_shared(lock)  -- (its owner acts on it, as below)
  else
    w('HDEL', lock_name(ARGV[11]), 'claim', 'lease')
    -- (`told`: its owner acts on it, see lib.lua's `relied_on`)
    w('HSET', lock_name(ARGV[11]), 'exp', lock[5])
    count_told(lock_name(ARGV[11]))
    collect_after(ARGV[11], exp)
  end
  return {'refreshed', lock}
end
return run(main, true)

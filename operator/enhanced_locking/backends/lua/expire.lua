-- expire: if the key's lease has lapsed, free it; serve the queue of a free key.
-- KEYS[8..] the key's keys (RedisKeys.of_key); more (its next waiters') it asks for
-- ARGV[11] lock key
-- returns {expired lock or {}, granted, dropped, the other expired locks, every live holder
-- the step left, the server's time in ms} (as RELEASE: shared holders whose leases all ended
-- are each told; the holders and the time, read in this step, say when to look again)
-- decoded by redis_replies.expiry
local refused = guard()
if refused then return refused end
local function main()
  expect(key_names, ARGV[11])
  plan_lapsed(ARGV[11])
  serve({ARGV[11]}, PLAN)
  planned()
  local fx = new_effects()
  settle(ARGV[11], fx)
  local others = {}
  for i = 2, #fx.expired do table.insert(others, fx.expired[i]) end
  return {fx.expired[1] or {}, fx.granted, fx.dropped, others, holders(ARGV[11]),
          int(clock())}
end
return run(main, true)

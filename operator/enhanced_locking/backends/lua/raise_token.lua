-- raise-token: make a key's fencing counter at least a value (counters never fall).
-- KEYS[8..] the key's keys (RedisKeys.of_key: its fencing counter among them)
-- ARGV[11] lock key  ARGV[12] value
-- returns the counter after the call
local refused = guard()
if refused then return refused end
local function main()
  expect(fence_name, ARGV[11])
  ask()
  if fence_damage(ARGV[11]) then repair(ARGV[11], true) end  -- not a number: from the clock
  local current = tonumber(redis.call('GET', fence_name(ARGV[11])) or '0')
  local wanted = tonumber(ARGV[12])
  w_try('SADD', FENCED, ARGV[11])
  if wanted > current then
    w('SET', fence_name(ARGV[11]), ARGV[12])
    return ARGV[12]
  end
  return int(current)
end
return run(main, true)

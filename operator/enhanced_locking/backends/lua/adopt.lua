-- adopt: take over a lock from another store, keeping its token, times, lease and mode.
-- KEYS[8..] the key's keys (RedisKeys.of_key) and the owner's pull index; more it asks for
-- ARGV[11] lock key  ARGV[12] repo  ARGV[13] pull  ARGV[14] Atlantis JSON  ARGV[15] token
-- ARGV[16] acquired at (ms)  ARGV[17] lease end (ms, 0: none)  ARGV[18] mode
-- ARGV[19] path  ARGV[20] workspace
-- returns 1 adopted (or already held by the same pull), 0 held here by another pull,
--         2 skipped because its lease already ended
local refused = guard()
if refused then return refused end
local function main()
  local k = ARGV[11]
  expect(key_names, k)
  expect(pull_index, ARGV[12], ARGV[13])
  plan_lapsed(k)
  planned()
  raise_to_given(k)
  expire_lapsed(k, nil)
  local mode = ARGV[18]
  for _, h in ipairs(holders(k)) do
    if same_owner(h, ARGV[12], ARGV[13]) then
      relied_on(h)
      return 1
    end
    if mode ~= 'shared' or h[10] ~= 'shared' then return 0 end
  end
  local exp = tonumber(ARGV[17])
  if exp > 0 and exp <= NOW then return 2 end
  store_given(k, exp)
  return 1
end
return run(main, true)

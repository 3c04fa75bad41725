-- wake: serve every queue (the rules changed, or a freeze started or ended).
-- KEYS   the seven of lib.lua; every queued key's keys and its waiters it asks for
-- returns {{}, granted, dropped} (as RELEASE)
-- decoded by redis_replies.served
local refused = guard()
if refused then return refused end
local function main()
  local keys = members(QUEUED)
  table.sort(keys)
  for _, k in ipairs(keys) do expect(key_names, k) end
  ask()
  serve(keys, PLAN)
  planned()
  local fx = new_effects()
  serve(keys, fx)
  return {{}, fx.granted, fx.dropped}
end
return run(main, true)

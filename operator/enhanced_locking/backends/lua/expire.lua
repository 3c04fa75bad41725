-- expire: if the key's lease has lapsed, free it; serve the queue of a free key.
-- KEYS[8] the key's lock hash
-- ARGV[11] lock key
-- returns {expired lock or {}, granted, dropped} (as RELEASE)
-- decoded by redis_replies.served
local refused = guard()
if refused then return refused end
local function main()
  local fx = new_effects()
  settle(ARGV[11], fx)
  return {fx.expired[1] or {}, fx.granted, fx.dropped}
end
return finish(main())

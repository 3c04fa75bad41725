-- ping: Redis answers and still has the data this replica knew (if it lost it, the
-- incarnation guard starts the quarantine now, so readiness reports it before any request does).
-- KEYS   the seven of lib.lua only
-- returns 'ok'
local refused = guard()
if refused then return refused end
local function main()
  return 'ok'
end
return run(main, true)

-- release-and-hand-off: free a key (optionally only the lock of the pull that holds it) and
-- serve its queue; also the admin's force-unlock (no owner: every holder goes).
-- KEYS[8] the key's lock hash
-- ARGV[11] lock key  ARGV[12] owner repo ('' = whoever holds it)  ARGV[13] owner pull
-- returns {'not_owned', lock} (nothing changed), or
--         {'released', lock or {}, granted, dropped, other locks released} where granted is a
--         list of {waiter record, {lock...}} and dropped a list of waiter records
-- decoded by redis_replies.release
local refused = guard()
if refused then return refused end
local function main()
  local k = ARGV[11]
  expire_lapsed(k, nil)
  local hs = holders(k)
  if ARGV[12] ~= '' then
    local mine = {}
    for _, h in ipairs(hs) do
      if same_owner(h, ARGV[12], ARGV[13]) then table.insert(mine, h) end
    end
    if #hs > 0 and #mine == 0 then return {'not_owned', hs[1]} end
    hs = mine
  end
  for _, h in ipairs(hs) do drop_lock(h) end
  local fx = new_effects()
  serve({k}, fx)
  local others = {}
  for i = 2, #hs do table.insert(others, hs[i]) end
  return {'released', hs[1] or {}, fx.granted, fx.dropped, others}
end
return finish(main())

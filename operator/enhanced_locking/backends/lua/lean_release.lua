-- the uncontended release on its own: release.lua's lean path (lib.lua: `lean_release`) with
-- only the keys it needs, so that Redis handles fewer of them per call. The client sends a
-- release here first when it names the owner, without rules, and nobody of its own waits
-- for the key nor was the key found busy lately.
-- KEYS[8..10] the key's lock and shared holders, the owner's pull index
-- ARGV[11] lock key  ARGV[12] owner repo  ARGV[13] owner pull
-- returns {'dropped', data, token, at, exp} as release.lua's lean path does (the same writes,
--         the same reply kept under the call id), or
--         {'full'}: it cannot serve the call (someone waits for the key, or shares it, the
--          lock is not the owner's, or a name is not declared); nothing was written or kept,
--          and the caller sends the call to release.lua in full
-- decoded by redis_replies.release / redis_replies.full
local refused = guard()
if refused then return refused end
if #ARGV ~= 13 or ARGV[12] == '' or ARGV[10] ~= '' then return {'full'} end
return lean_release(ARGV[11], ARGV[12], ARGV[13]) or {'full'}

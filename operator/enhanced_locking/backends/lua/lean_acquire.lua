-- the uncontended acquire on its own: acquire.lua's lean path (lib.lua: `lean_acquire`) with
-- only the keys and arguments it needs, so that Redis handles fewer of them per call. The
-- client sends an acquire here first when it is one exclusive key, without waiting and
-- without rules, and the key was not found busy lately.
-- KEYS[8..11] the key's lock, shared holders and fencing counter, the owner's pull index
-- ARGV[11] lease in ms (0: none)  ARGV[12] lock key  ARGV[13] Atlantis JSON
-- ARGV[14] owner repo  ARGV[15] owner pull  ARGV[16] path  ARGV[17] workspace
-- returns {'took', token, at, exp} as acquire.lua's lean path does (the same writes, the same
--         reply kept under the call id), or
--         {'full'}: it cannot serve the call (someone holds or waits for the key, or a name
--          is not declared); nothing was written or kept, and the caller sends the call to
--          acquire.lua in full
-- decoded by redis_replies.acquire / redis_replies.full
local refused = guard()
if refused then return refused end
if #ARGV ~= 17 or ARGV[10] ~= '' then return {'full'} end
return lean_acquire(ARGV[12], ARGV[13], ARGV[14], ARGV[15], tonumber(ARGV[11]), ARGV[16],
                    ARGV[17]) or {'full'}

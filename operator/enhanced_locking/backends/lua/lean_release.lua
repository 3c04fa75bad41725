-- the uncontended release on its own: release.lua's lean path (lib.lua: `release_own`) with
-- only the keys it needs, so that Redis handles fewer of them per call. The client sends a
-- release here first when it names the owner, without rules, and nobody of its own waits
-- for the key nor was the key found busy lately. Its call starts with `begin_lean` (lib.lua):
-- KEYS[1..5] and ARGV[1] are the lean layout's.
-- KEYS[6..8] the key's lock and shared holders, the owner's pull index, in this order: taken
--   by position, as in lean_acquire.lua
-- ARGV[2] lock key  ARGV[3] owner repo  ARGV[4] owner pull  ARGV[5] the stamp of the lock the
--   caller believes stored, `<token>:<grant time ms>` (the key's lock as it last read or made
--   it; '' none): not its JSON, which would cross into Lua a second time (each byte costs
--   Redis about 12 instructions); a lock's data never changes under its token and grant time
-- returns the JSON text of {'dropped', data, token, at, exp}, one string, as release.lua's
--         lean path keeps it under the call id (the same writes; that path answers the list),
--         but data false when the lock stored has the stamp of ARGV[5], or
--         {'full'}: it cannot serve the call (someone waits for the key, or shares it, the
--          lock is not the owner's, the store lost its data); nothing was written or kept,
--          and the caller sends the call to release.lua in full
-- decoded by redis_replies.release / redis_replies.full
-- (one EXISTS first: nothing kept under the call id, no shared holders, and whether anyone in
-- the namespace waits; then neither `guard` nor `release_own` asks again, and `release_own`
-- asks whether anyone waits for this key only if the `queued` index is there)
local unshared, unqueued = lean_absent(KEYS[7])
local refused = guard(unshared)
if refused then return refused end
if #ARGV ~= 5 or ARGV[3] == '' then return {'full'} end
return release_own(ARGV[2], ARGV[3], ARGV[4], KEYS[6], KEYS[7], KEYS[8], ARGV[5], unshared,
                   unqueued) or {'full'}

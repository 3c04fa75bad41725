-- the uncontended acquire on its own: acquire.lua's lean path (lib.lua: `grant_free`) with
-- only the keys and arguments it needs, so that Redis handles fewer of them per call. The
-- client sends an acquire here first when it is one exclusive key, without waiting and
-- without rules, and the key was not found busy lately. Its call starts with `begin_lean`
-- (lib.lua): KEYS[1..5] and ARGV[1] are the lean layout's.
-- KEYS[6..9] the key's lock, shared holders and fencing counter, the owner's pull index, in
--   this order: taken by position, no name formed here (RedisKeys forms them as lib.lua's
--   *_name functions do: tests/integration/test_redis_lean_path.py reads what the full
--   path stored under the names lib.lua formed by RedisKeys' names)
-- ARGV[2] lease in ms (0: none)  ARGV[3] lock key  ARGV[4] Atlantis JSON
-- ARGV[5] owner repo  ARGV[6] owner pull  ARGV[7] path  ARGV[8] workspace
-- returns the JSON text of {'took', token, at, exp}, one string, as acquire.lua's lean path
--         keeps it under the call id (the same writes; that path answers the list), or
--         {'full'}: it cannot serve the call (someone holds or waits for the key, or the
--          store lost its data: `guard`); nothing was written or kept, and the caller
--          sends the call to acquire.lua in full
-- decoded by redis_replies.acquire / redis_replies.full
-- (one EXISTS first: nothing kept under the call id, no lock, no shared holders, and whether
-- anyone in the namespace waits; then neither `guard` nor `grant_free` asks again, and
-- `grant_free` asks whether anyone waits for this key only if the `queued` index is there)
local free, unqueued = lean_absent(KEYS[7], KEYS[6])
local refused = guard(free)
if refused then return refused end
if #ARGV ~= 8 then return {'full'} end
local ttl = ARGV[2] == '0' and 0 or tonumber(ARGV[2])  -- (most grants have no lease)
return grant_free(ARGV[3], ARGV[4], ARGV[5], ARGV[6], ttl, ARGV[7], ARGV[8],
                  KEYS[6], KEYS[7], KEYS[8], KEYS[9], free, unqueued) or {'full'}

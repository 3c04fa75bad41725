-- try_lock: Atlantis's TryLock, atomically (the Atlantis-layout store, atlantis_redis.py).
-- A script of its own, called by EVALSHA: it works on a Redis an Atlantis shares, where the
-- enhanced store's function library need not be loaded.
-- KEYS[1] pr/{lockKey}
-- ARGV[1] the new lock as Atlantis's JSON
-- returns {1} granted (stored without expiry), or {0, json} with the current lock
local current = redis.call('GET', KEYS[1])
if current then
  return {0, current}
end
redis.call('SET', KEYS[1], ARGV[1])
return {1}

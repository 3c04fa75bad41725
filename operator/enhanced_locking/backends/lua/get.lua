-- get: the holder of a key (a lapsed lease is not a holder), changing nothing.
-- KEYS[8] the key's lock hash
-- ARGV[11] lock key
-- returns the lock or {}
-- decoded by redis_replies.maybe_lock
return peek(ARGV[11]) or {}

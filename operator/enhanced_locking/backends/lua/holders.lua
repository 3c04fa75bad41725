-- holders: every live holder of a key (one, or several when held shared), changing nothing.
-- KEYS[8] the key's lock hash
-- ARGV[11] lock key
-- returns a list of locks
-- decoded by redis_replies.locks
return holders(ARGV[11])

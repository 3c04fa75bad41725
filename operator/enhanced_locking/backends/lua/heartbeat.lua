-- heartbeat: this replica is alive (its waiters may be granted) for REPLICA_MS more.
-- KEYS   the seven of lib.lua only
-- returns the server time in ms
beat()
w('ZREMRANGEBYSCORE', LIVENESS, '-inf', NOW - 86400000)
return NOW

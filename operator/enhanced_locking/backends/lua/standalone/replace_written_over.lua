-- replace_written_over: after a WRONGTYPE at a key of the service's own (the events' stream,
-- the audit log's keys), delete what something else wrote there so the next write makes it
-- anew; the check and the delete are one step, so a key another replica has just made anew is
-- kept. A script of its own, called by EVALSHA (redis_connection.py): the events and the audit
-- log do not depend on the enhanced store's function library.
-- KEYS[1] a key the service keeps one Redis type at
-- ARGV[1] that type (as TYPE names it)
-- returns the type KEYS[1] held, deleted; or '' when it held ARGV[1] or nothing (another
-- replica replaced it first: what it wrote there stays)
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == ARGV[1] or kind == 'none' then return '' end
redis.call('DEL', KEYS[1])
return kind

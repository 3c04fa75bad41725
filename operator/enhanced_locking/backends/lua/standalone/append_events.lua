-- append_events: one write of the event bus's outbox (redis_events.py), appended once however
-- often it is sent: a write sent again after its answer was lost (the connection dropped
-- after Redis ran it) finds its tag in the writer key and appends nothing. A script of its
-- own, called by EVALSHA: the events do not depend on the enhanced store's function library.
-- KEYS[1] the events' stream
-- KEYS[2] the writer key of the calling process (in the stream's slot)
-- ARGV[1] the write's tag
-- ARGV[2] the stream's length to trim to (about: MAXLEN ~)
-- ARGV[3] seconds the writer key is kept after the write
-- ARGV[4..] the events, one JSON each
-- returns 1 when appended, 0 when the tag was there (appended by an earlier attempt)
-- The stream is trimmed by the write's last XADD (MAXLEN ~, which Redis applies after adding
-- the entry, as an XTRIM after it would): one command a write fewer than an XTRIM of its own,
-- and one look at the stream's length a write, not one an event.
if redis.call('GET', KEYS[2]) == ARGV[1] then return 0 end
local last = #ARGV
for i = 4, last - 1 do
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
end
if last >= 4 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[last])
else
  redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', ARGV[2])
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
return 1

-- append_audit_entry: one entry of the audit trail's stream (audit_store.py), trimmed so that
-- refusals never push out the other entries. The ids of the refusals the stream holds are
-- kept in a list beside it, at most ARGV[2] of them (beyond that the oldest go, from the list
-- and from the stream), and the stream is trimmed (about: MAXLEN ~) to ARGV[2] more entries
-- than the list holds, so at least ARGV[2] of the other entries stay. The prune by age takes
-- the ids of the entries it removes out of the list (prune_audit.lua); an id whose entry the
-- trim removed stays in the list until it is among the oldest there: meanwhile the other
-- entries may keep up to that many more. A list written over by
-- something else (another Redis type) is dropped: it is an index only. A script of its own,
-- called by EVALSHA: the audit trail does not depend on the enhanced store's function library.
-- KEYS[1] the audit stream
-- KEYS[2] the list of the refusals' ids (in the stream's slot)
-- ARGV[1] the entry, as JSON
-- ARGV[2] the most entries of each kind kept (audit-max-entries)
-- ARGV[3] '1' when the entry is a refusal, else '0'
-- returns the entry's id in the stream
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'list' and kind ~= 'none' then redis.call('DEL', KEYS[2]) end
local most = tonumber(ARGV[2])
local refusals
if ARGV[3] == '1' then
  refusals = redis.call('RPUSH', KEYS[2], id)
  while refusals > most do
    local gone = redis.call('LPOP', KEYS[2], math.min(refusals - most, 1000))
    redis.call('XDEL', KEYS[1], unpack(gone))
    refusals = refusals - #gone
  end
else
  refusals = redis.call('LLEN', KEYS[2])
end
redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', most + refusals)
return id

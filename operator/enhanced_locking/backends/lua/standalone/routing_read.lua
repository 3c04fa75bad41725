-- routing_read: every report in the migration's replica registry (routing_registry.py), with
-- the Redis server's clock, pruning those long gone. A script of its own, called by EVALSHA,
-- for the reason routing_report.lua gives.
-- KEYS[1] the replicas hash
-- ARGV[1] prune age in ms: reports older than this are deleted
-- returns {server ms, '', id1, value1, id2, value2, ...} for the reports kept, or
-- {server ms, type} when KEYS[1] is another Redis type (the next report replaces it)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then return {now, kind} end
local all = redis.call('HGETALL', KEYS[1])
local out = {now, ''}
for i = 1, #all, 2 do
  local seen = tonumber(string.match(all[i + 1], '^(%d+) '))
  if seen == nil or now - seen > tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], all[i])
  else
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out

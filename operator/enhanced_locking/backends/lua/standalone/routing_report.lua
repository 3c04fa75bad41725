-- routing_report: a replica's report to the migration's replica registry (routing_registry.py),
-- stamped with the Redis server's clock. A script of its own, called by EVALSHA: the registry's
-- key lies outside the store's namespaces, whose checks every function of the store's library
-- begins with, and the registry does not wait for that library to be loaded.
-- KEYS[1] the replicas hash
-- ARGV[1] replica id  ARGV[2] the report (a JSON object, without its time)
-- stores "<server ms> <report>" under the id
-- returns {server time in ms, ''}, or, when KEYS[1] was another Redis type (written over by
-- something else), replaces it with a hash holding this report, stamped "replaced": <server
-- ms>, and returns {ms, that type}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kind = redis.call('TYPE', KEYS[1])['ok']
local report = ARGV[2]
if kind == 'hash' or kind == 'none' then
  kind = ''
else
  redis.call('DEL', KEYS[1])
  -- the stamp spliced in before the closing brace (the weight stays as Python wrote it)
  report = string.sub(report, 1, -2) .. ',"replaced":' .. now .. '}'
end
redis.call('HSET', KEYS[1], ARGV[1], now .. ' ' .. report)
return {now, kind}

-- reindex: rebuild one of the store's index sets (held, queued, fenced, a pull's) that a
-- script found to be another Redis type (lib.lua: `members` answered {'index', name, why}):
-- whatever stands there is replaced by a set of the lock keys the caller found in the
-- namespace (RedisBackend._rebuild_index); a set there (rebuilt meanwhile) only gains them.
-- An index may list more keys than it needs (every reader checks each), never fewer.
-- KEYS[8] the index
-- ARGV[11..] the lock keys to list in it
-- returns the Redis type that stood there before ('set' when it was one already)
return run(function()
  local index = KEYS[8]
  local kind = redis.call('TYPE', index)['ok']
  if kind ~= 'set' then w('DEL', index) end
  for i = 11, #ARGV do w('SADD', index, ARGV[i]) end
  return kind
end)

-- list: the live locks named by an index set, pruning entries whose lock is gone.
-- KEYS   the seven of lib.lua only (the index is derived)
-- ARGV[11] '' for every held key, else the repo and ARGV[12] the pull of a pull's index
-- ARGV[13] repo filter ('' = any)  ARGV[14] pull filter ('' = any)
-- returns a list of locks
-- decoded by redis_replies.locks
local index = HELD
if ARGV[11] ~= '' then index = pull_index(ARGV[11], ARGV[12]) end
local out = {}
for _, k in ipairs(redis.call('SMEMBERS', index)) do
  local found = read_shared(k)
  local ex = read_lock(k)
  if ex then table.insert(found, 1, ex) end
  local kept = false
  for _, lock in ipairs(found) do
    if index == HELD or same_owner(lock, ARGV[11], ARGV[12]) then kept = true end
    if not lapsed(lock) and (ARGV[13] == '' or lock[6] == ARGV[13])
        and (ARGV[14] == '' or lock[7] == ARGV[14]) then
      table.insert(out, lock)
    end
  end
  if not kept then redis.call('SREM', index, k) end
end
return out

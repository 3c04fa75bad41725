-- list: the live locks named by an index set, pruning entries whose lock is gone.
-- KEYS[8..] the pull's index (a pull's list); the keys of its members it asks for
-- ARGV[11] '' for every held key, else the repo and ARGV[12] the pull of a pull's index
-- ARGV[13] repo filter ('' = any)  ARGV[14] pull filter ('' = any)
-- returns a list of locks
-- decoded by redis_replies.locks
local function main()
  local index = HELD
  if ARGV[11] ~= '' then index = pull_index(ARGV[11], ARGV[12]) end
  local keys = members(index)
  for _, k in ipairs(keys) do
    expect(lock_name, k)
    expect(shared_name, k)
  end
  ask()
  local out = {}
  for _, k in ipairs(keys) do
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
    if not kept then w_try('SREM', index, k) end
  end
  return out
end
return run(main)

-- release-by-pull: free every lock a pull holds and serve each key's queue.
-- KEYS   the seven of lib.lua only (the pull's index is derived)
-- ARGV[11] repo  ARGV[12] pull number
-- returns {released locks (leases still running), granted, dropped}
-- decoded by redis_replies.release_by_pull
local refused = guard()
if refused then return refused end
local function main()
  local index = pull_index(ARGV[11], ARGV[12])
  local released, freed = {}, {}
  for _, k in ipairs(redis.call('SMEMBERS', index)) do
    local found = {}
    local holder = read_lock(k)
    if holder then table.insert(found, holder) end
    local field = ARGV[11] .. '#' .. ARGV[12]
    local text = redis.pcall('HGET', shared_name(k), field)
    if text and not is_error(text) then table.insert(found, shared_row(k, field, text)) end
    for _, lock in ipairs(found) do
      if same_owner(lock, ARGV[11], ARGV[12]) then
        drop_lock(lock)
        table.insert(freed, k)
        if not lapsed(lock) then table.insert(released, lock) end
      end
    end
  end
  redis.call('DEL', index)
  -- Every key is freed first, then each queue is served, in key order (as every backend does).
  table.sort(freed)
  local fx = new_effects()
  serve(freed, fx)
  return {released, fx.granted, fx.dropped}
end
return finish(main())
